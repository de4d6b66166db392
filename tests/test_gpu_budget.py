"""GPU memory budgets for sweep trials, on the CPU: the estimate's formula, the packing decision,
the local pool's per-GPU slots, ``--gpu-memory-budget`` and the Ray backend's GPU fraction.

No GPU is needed: ``torch.cuda``'s device count and memory calls are replaced by fakes, and
the trials of the scheduling tests are fake too (they only record where and when they ran).
"""

from __future__ import annotations

import threading
import time
import types
from pathlib import Path

import pytest
import torch

from merging.cli.main import main
from merging.errors import MergingError
from merging.experiment import gpu_budget, sweep_ray, sweep_runner
from merging.experiment.gpu_budget import GIB, Budget, GpuSlots, parse_budget
from merging.experiment.runner import RunConfig, parse_checkpoint
from merging.experiment.sweep import Point, plan
from merging.methods import method_names

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("digits", "colors", "shapes")
SAMPLES = 16


def trials_of(*points: Point, seeds=(42,)):
    checkpoints = [parse_checkpoint(str(ROOT / "assets/mini/checkpoints" / f"mini-{t}")) for t in TASKS]
    template = RunConfig(backbone="mini", checkpoints=checkpoints, samples=SAMPLES)
    return plan(template, checkpoints, list(points), list(seeds))


@pytest.fixture(scope="module")
def shared():
    """The mini benchmark's shared inputs (3 tasks, 16 test and train images each), for OTMF and the rest."""
    return sweep_runner.prepare_shared(trials_of(Point("otmf", "otmf", {"steps": 1})))


def fake_gpus(monkeypatch, free: list[int], cached: int = 0) -> None:
    """Visible GPUs with ``free`` bytes free each, and ``cached`` bytes this process's allocator holds unused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(free))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free[i], 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda i=0: cached + 1000)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda i=0: 1000)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


# ---------------------------------------------------------------- the estimate


def test_the_estimate_is_the_documented_formula_on_the_mini_encoder(shared):
    arch = shared.backbone.arch  # width 192, 2 layers, 12 heads, MLP 768, 32 px images, 8 px patches
    assert (arch.width, arch.layers, arch.heads, arch.mlp_width, arch.image_size, arch.patch_size) == (
        192,
        2,
        12,
        768,
        32,
        8,
    )
    encoder = 4 * sum(v.numel() for v in shared.backbone.model.visual.state_dict().values())
    assert encoder == 4 * 943_104
    tokens, pixels = (32 // 8) ** 2 + 1, 3 * 32 * 32
    per_eval_image = 7 * pixels + 4 * (4 * tokens * 192 + 2 * tokens * 768 + 2 * 12 * tokens**2)
    per_train_image = 4 * 2 * (10 * tokens * 192 + 3 * tokens * 768 + 3 * 12 * tokens**2) + 4 * pixels
    assert per_eval_image == 205_920
    evaluation = SAMPLES * per_eval_image  # one batch: the whole 16-image sample
    tower = encoder  # float32 parameters

    [average] = trials_of(Point("weight_average", "weight_average", {}))
    estimate = gpu_budget.estimate_trial(average, shared)
    assert estimate.total == 3 * encoder + tower + evaluation
    assert "3 encoder copies" in estimate.describe() and "evaluation batch of 16" in estimate.describe()

    [magmax] = trials_of(Point("magmax", "magmax", {}))
    assert gpu_budget.estimate_trial(magmax, shared).total == 4 * encoder + tower + evaluation

    [otmf] = trials_of(Point("otmf", "otmf", {}))  # masks on, alternate, keep best, batch 16
    pools = 2 * SAMPLES * pixels
    expected = 14 * encoder + tower + evaluation + tower + 16 * per_train_image + pools
    assert gpu_budget.estimate_trial(otmf, shared).total == expected
    assert gpu_budget.estimate_trial(otmf, shared, own_process=True).total == expected + gpu_budget.CUDA_CONTEXT_BYTES

    [mingle] = trials_of(Point("mingle", "mingle", {}))
    from merging.methods import create_merger

    merger = create_merger("mingle")
    visual = shared.backbone.model.visual.state_dict()
    merger.start({k: torch.empty(v.shape, device="meta") for k, v in visual.items()}, "meta")
    growth = 3 * merger.per_task_bytes()  # 3 tasks' experts, gates and subspace columns
    assert growth > 0
    expected = 3 * encoder + growth + tower + evaluation + tower + 16 * per_train_image + SAMPLES * pixels * 4
    assert gpu_budget.estimate_trial(mingle, shared).total == expected


def test_opcm_and_dop_working_memory_come_from_the_matrix_shapes(shared):
    from merging.methods.dop import chunk_size

    # mini: per block a 576×192 qkv, 192×192 out-proj, 768×192 fc1 and (tall) 768×192 fc2; conv1 and proj
    meta = {k: torch.empty(v.shape, device="meta") for k, v in shared.backbone.model.visual.state_dict().items()}
    from merging.families import family_of

    shapes = gpu_budget.tall_matrix_shapes(meta, family_of(meta.keys()))
    assert all(m >= n for m, n in shapes) and len(shapes) >= 4 * 2
    bases = sum(4 * (n * n + n) for _, n in shapes)
    assert gpu_budget.opcm_work_bytes(shapes, on_cuda=False) == bases
    # every width's Grams fit in one 256 MiB stack here: the largest stack, held twice (Grams, eigenvectors)
    stacks = {n: sum(1 for _, w in shapes if w == n) * 8 * n * n for _, n in shapes}
    assert gpu_budget.opcm_work_bytes(shapes) == bases + 2 * max(stacks.values())
    [opcm] = trials_of(Point("opcm", "opcm", {}))
    [average] = trials_of(Point("weight_average", "weight_average", {}))
    difference = gpu_budget.estimate_trial(opcm, shared).total - gpu_budget.estimate_trial(average, shared).total
    assert difference == gpu_budget.opcm_work_bytes(shapes)

    shape = (768, 192)
    count = sum(1 for s in shapes if s == shape)
    per_matrix = 24 * 768 * 192 * 4 + 4 * 768**2 * 4
    assert gpu_budget.dop_work_bytes([shape] * count) == min(count, chunk_size(shape)) * per_matrix


def test_every_method_has_a_copy_count_and_otmf_counts_its_options():
    assert set(method_names()) <= set(gpu_budget.COPIES)
    defaults = {"masks": "on", "steps": 100, "schedule": "alternate", "keep": "best"}
    count = gpu_budget.method_copies
    assert count("otmf", defaults).count == 14
    assert count("otmf", {**defaults, "schedule": "joint"}).count == 15
    assert count("otmf", {**defaults, "keep": "last"}).count == 12
    assert count("otmf", {**defaults, "masks": "off"}).count == 5
    assert count("otmf", {**defaults, "steps": 0}).count == 5
    assert count("someone_elses_method", {}).count == gpu_budget.UNKNOWN_METHOD_COPIES


# ---------------------------------------------------------------- the packing decision


def test_budgets_are_a_fraction_of_the_free_memory_or_an_amount(monkeypatch):
    fake_gpus(monkeypatch, [10 * GIB, 4 * GIB], cached=GIB)  # cached by this process: free to its trials
    assert gpu_budget.gpu_budgets(Budget(0.5)) == [int(5.5 * GIB), int(2.5 * GIB)]
    assert gpu_budget.gpu_budgets(Budget()) == [int(0.9 * 11 * GIB), int(0.9 * 5 * GIB)]
    assert gpu_budget.gpu_budgets(Budget(fraction=None, amount=3 * GIB)) == [3 * GIB, 3 * GIB]
    assert [gpu_budget.fits(2 * GIB, b) for b in (5 * GIB, 2 * GIB, GIB)] == [2, 1, 0]


def test_the_packing_decision_and_a_trial_that_fits_nowhere(monkeypatch, shared):
    trials = trials_of(Point("weight_average", "weight_average", {}), Point("otmf", "otmf", {}))
    need = {t.point.method: gpu_budget.estimate_trial(t, shared).total for t in trials}
    # GPU 0 holds 2 OTMF trials (or 2 + weight averages); GPU 1 only weight averages
    fake_gpus(monkeypatch, [int(2.5 * need["otmf"] / 0.9), int(0.95 * need["otmf"] / 0.9)])
    slots, estimates = gpu_budget.plan_gpu_slots(trials, shared, Budget())
    assert [gpu_budget.fits(need["otmf"], b) for b in slots.budgets] == [2, 0]
    assert estimates["otmf seed 42"].total == need["otmf"]
    assert gpu_budget.default_gpu_workers(estimates, slots, cores=16) == 2  # OTMF-sized: 2 fit at once
    assert gpu_budget.default_gpu_workers(estimates, slots, cores=1) == 2  # at least one per GPU

    fake_gpus(monkeypatch, [int(0.5 * need["otmf"] / 0.9)] * 2)
    with pytest.raises(MergingError) as error:
        gpu_budget.plan_gpu_slots(trials, shared, Budget())
    message = str(error.value)
    assert message.startswith("trial otmf seed 42 needs about ") and "14 encoder copies" in message
    assert "per GPU: 0.9 of the free memory" in message and "--gpu-memory-budget" in message
    assert "\n" not in message
    with pytest.raises(MergingError, match=r"per GPU: --gpu-memory-budget 1\.0 MiB\)"):
        gpu_budget.plan_gpu_slots(trials, shared, Budget(fraction=None, amount=1 << 20))


def test_slots_wait_for_room_first_come_first_served():
    slots = GpuSlots([10, 4])
    assert slots.acquire(6) == 0 and slots.acquire(4) == 0  # the most room first: 10, then 4 left on GPU 0
    assert slots.acquire(3) == 1
    stop = threading.Event()
    got = []
    waiting = threading.Thread(target=lambda: got.append(slots.acquire(5, stop)))
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and got == []  # 5 fits nowhere until a trial ends
    slots.release(0, 6)
    waiting.join(5)
    assert got == [0] and slots.used == [9, 3] and slots.peak == [2, 1]
    stopped = threading.Thread(target=lambda: got.append(slots.acquire(8, stop)))
    stopped.start()
    stop.set()
    stopped.join(5)
    assert got == [0, None]  # a stop ends the wait
    with pytest.raises(ValueError):
        slots.acquire(11)


# ---------------------------------------------------------------- the local pool on (fake) GPUs


def fake_cuda_pool(monkeypatch, free: list[int]):
    """run_local on fake GPUs: it records, per GPU, how many trials ran at once."""
    import merging.compute.devices as devices
    import merging.compute.threads as threads

    fake_gpus(monkeypatch, free)
    monkeypatch.setattr(devices, "resolve_device", lambda name="auto": torch.device("cuda"))
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    current = threading.local()
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: setattr(current, "gpu", index))
    monkeypatch.setattr(
        sweep_runner, "trial_evaluator", lambda shared, device, cache_dir=None: types.SimpleNamespace(device=device)
    )
    lock = threading.Lock()
    state = {"now": [0] * len(free), "most": [0] * len(free), "ran": []}

    def fake_trial(trial, shared, evaluator, stop=None):
        gpu = evaluator.device.index
        assert current.gpu == gpu  # the thread's "cuda" is the trial's GPU
        with lock:
            state["now"][gpu] += 1
            state["most"][gpu] = max(state["most"][gpu], state["now"][gpu])
            state["ran"].append((trial.name, gpu))
        time.sleep(0.3)
        with lock:
            state["now"][gpu] -= 1
        return "results"

    monkeypatch.setattr(sweep_runner, "run_trial", fake_trial)
    return state


def test_the_local_pool_never_runs_more_trials_on_a_gpu_than_fit(monkeypatch, shared):
    trials = trials_of(Point("otmf", "otmf", {}), seeds=range(42, 50))
    need = gpu_budget.estimate_trial(trials[0], shared).total
    state = fake_cuda_pool(monkeypatch, [int(2.5 * need / 0.9), int(1.5 * need / 0.9)])  # 2 and 1 fit
    done = []
    sweep_runner.run_local(trials, shared, 6, done.append, "cuda")  # 6 threads, 3 slots
    assert sorted(o.trial.name for o in done) == sorted(t.name for t in trials)
    assert all(o.results == "results" and o.error is None for o in done)
    assert state["most"] == [2, 1]  # GPU 0 shared by two trials at a time, never three; GPU 1 one

    state = fake_cuda_pool(monkeypatch, [int(2.5 * need / 0.9), int(1.5 * need / 0.9)])
    pool = []
    real = sweep_runner.ThreadPoolExecutor
    monkeypatch.setattr(
        sweep_runner,
        "ThreadPoolExecutor",
        lambda max_workers, **kw: pool.append(max_workers) or real(max_workers, **kw),
    )
    sweep_runner.run_local(trials[:3], shared, None, lambda outcome: None, "cuda")
    assert pool == [3]  # by default as many threads as trials fit at once


def test_a_trial_that_fits_on_no_gpu_fails_the_local_sweep_before_any_trial(monkeypatch, shared):
    trials = trials_of(Point("weight_average", "weight_average", {}), Point("otmf", "otmf", {}))
    need = gpu_budget.estimate_trial(trials[0], shared).total
    state = fake_cuda_pool(monkeypatch, [int(1.5 * need / 0.9)])  # weight averaging fits, OTMF does not
    with pytest.raises(MergingError, match=r"^trial otmf seed 42 needs about .* more than the budget"):
        sweep_runner.run_local(trials, shared, 2, lambda outcome: None, "cuda")
    assert state["ran"] == []


def test_a_stop_while_trials_wait_for_room_drops_them(monkeypatch, shared):
    trials = trials_of(Point("weight_average", "weight_average", {}), seeds=range(42, 46))
    need = gpu_budget.estimate_trial(trials[0], shared).total
    state = fake_cuda_pool(monkeypatch, [int(1.5 * need / 0.9)])  # one at a time
    stop = threading.Event()
    done = []

    def on_done(outcome):
        done.append(outcome)
        stop.set()

    sweep_runner.run_local(trials, shared, 4, on_done, "cuda", stop=stop)
    assert len(done) >= 1 and len(state["ran"]) < 4 and state["most"] == [1]


def test_cpu_sweeps_take_no_gpu_path(monkeypatch):
    """On the CPU nothing asks CUDA anything: the budget is not even measured."""
    monkeypatch.setattr(gpu_budget, "plan_gpu_slots", lambda *a, **k: pytest.fail("planned GPU slots on the CPU"))
    trials = trials_of(Point("weight_average", "weight_average", {}))
    shared = sweep_runner.prepare_shared(trials)
    done = []
    sweep_runner.run_local(trials, shared, 1, done.append, "cpu")
    assert len(done) == 1 and done[0].results is not None


# ---------------------------------------------------------------- --gpu-memory-budget


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        (None, Budget(0.9)),
        ("0.5", Budget(0.5)),
        ("1", Budget(1.0)),
        ("75%", Budget(0.75)),
        ("40GiB", Budget(None, 40 * GIB)),
        ("1.5 G", Budget(None, int(1.5 * GIB))),
        ("2gib", Budget(None, 2 * GIB)),
    ],
)
def test_the_budget_flag_takes_a_fraction_or_gib(text, budget):
    assert parse_budget(text) == budget


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("2", "--gpu-memory-budget '2': a fraction of the free memory must be in (0, 1]; for an amount write 2GiB"),
        ("0", "a fraction of the free memory must be in (0, 1]"),
        ("150%", "a fraction of the free memory must be in (0, 1]"),
        ("0GiB", "--gpu-memory-budget '0GiB' must be more than 0 GiB"),
        ("1e999GiB", "must be more than 0 GiB and less than a million"),
        ("40GB", "is not a fraction of the free memory (0.9, 90%) or an amount in GiB (40GiB)"),
        ("lots", "--gpu-memory-budget 'lots' is not a fraction of the free memory (0.9, 90%) or an amount"),
        ("-1", "is not a fraction"),
    ],
)
def test_a_bad_budget_is_one_line_naming_it(tmp_path, capsys, text, culprit):
    code = main(
        ["sweep", "--preset", "mini-8", "--method", "opcm", "--out", str(tmp_path / "s"), "--gpu-memory-budget", text]
    )
    stderr = capsys.readouterr().err
    assert code == 2 and stderr.count("\n") == 1 and culprit in stderr
    assert not (tmp_path / "s").exists()


def test_the_budget_flag_with_the_cpu_device_is_refused(tmp_path, capsys):
    args = ["sweep", "--preset", "mini-8", "--method", "opcm", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*args, "--gpu-memory-budget", "0.5"]) == 2
    assert "--gpu-memory-budget is for trials on GPUs, and --device cpu" in capsys.readouterr().err


def test_the_cli_hands_the_budget_to_the_local_pool(tmp_path, capsys, monkeypatch):
    seen = {}

    def fake_run_local(trials, shared, workers, on_done, device, gpu_budget=None):
        seen.update(workers=workers, budget=gpu_budget)

    monkeypatch.setattr(sweep_runner, "run_local", fake_run_local)
    args = ["sweep", *[a for t in TASKS for a in ("--checkpoint", str(ROOT / "assets/mini/checkpoints" / f"mini-{t}"))]]
    args += ["--method", "weight_average", "--order-seeds", "42", "--samples", str(SAMPLES)]
    main([*args, "--out", str(tmp_path / "s"), "--gpu-memory-budget", "12GiB", "--workers", "3"])
    assert seen == {"workers": 3, "budget": Budget(None, 12 * GIB)}


# ---------------------------------------------------------------- Ray's fraction


def test_the_ray_fraction_is_one_over_the_trials_that_fit():
    assert gpu_budget.ray_gpu_fraction(4 * GIB, 10 * GIB) == 0.5  # 2 fit
    assert gpu_budget.ray_gpu_fraction(3 * GIB, 10 * GIB) == 0.3334  # 3 fit; rounded up, so never 4
    assert gpu_budget.ray_gpu_fraction(10 * GIB, 10 * GIB) == 1.0
    assert gpu_budget.ray_gpu_fraction(1, 10 * GIB) == 0.0001  # Ray's smallest share
    with pytest.raises(ValueError):
        gpu_budget.ray_gpu_fraction(11 * GIB, 10 * GIB)


def test_ray_budgets_from_an_amount_local_gpus_or_a_probe(monkeypatch):
    assert sweep_ray.ray_gpu_budget(None, Budget(None, 7 * GIB)) == 7 * GIB
    fake_gpus(monkeypatch, [10 * GIB, 8 * GIB])
    assert sweep_ray.ray_gpu_budget(None, Budget(0.5)) == 4 * GIB  # the smallest GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver without GPUs: ask one of the cluster's
    asked = {}

    class Probe:
        def remote(self):
            return "ref"

    class FakeRay:
        def remote(self, **options):
            asked.update(options)
            return lambda function: Probe()

        def get(self, ref):
            return 20 * GIB

    assert sweep_ray.ray_gpu_budget(FakeRay(), Budget(0.5)) == 10 * GIB and asked["num_gpus"] == 1


def test_ray_gpu_trials_ask_for_their_share_of_a_gpu(monkeypatch, shared):
    """run_ray against a stand-in for Ray: each GPU trial's task is declared with 1/k of a GPU."""
    trials = trials_of(Point("weight_average", "weight_average", {}), Point("otmf", "otmf", {}), seeds=(42, 43))
    own = {t.point.method: gpu_budget.estimate_trial(t, shared, own_process=True).total for t in trials}
    # each trial's own CUDA context dominates on the mini encoder: 10 weight averages fit a GPU, 9 OTMF trials
    budget = 10 * own["weight_average"]
    declared = []

    class Task:
        def __init__(self, options):
            self.declared = options

        def remote(self, refs, trial, device):
            declared.append((trial.name, self.declared))
            return trial.name

        def options(self, **options):  # the CPU path's .options(...)
            return Task(options)

    class FakeRay:
        def is_initialized(self):
            return True

        def cluster_resources(self):
            return {"GPU": 1.0, "CPU": 2.0}

        def remote(self, function=None, **options):
            return Task(options) if function is not None else (lambda function: Task(options))

        def put(self, value):
            return "shared"

        def wait(self, refs, num_returns=1):
            return refs[:1], refs[1:]

        def get(self, ref):
            return {"error": "not run: a stand-in for Ray", "seconds": 0.0}

    monkeypatch.setattr(sweep_ray, "import_ray", lambda: FakeRay())
    monkeypatch.setattr(sweep_ray, "ray_gpu_budget", lambda ray, b: budget)
    done = []
    sweep_ray.run_ray(trials, shared, None, done.append, "auto", "cuda")
    assert len(done) == 4
    shares = {name: options["num_gpus"] for name, options in declared}
    assert budget // own["otmf"] == 9 and shares["otmf seed 42"] == shares["otmf seed 43"] == 0.1112
    assert shares["weight_average seed 42"] == shares["weight_average seed 43"] == 0.1
    assert all(options["num_cpus"] == 1 and options["max_retries"] == 0 for _, options in declared)
    assert all(options["max_calls"] == 1 for _, options in declared)  # a fresh worker process per GPU trial

    monkeypatch.setattr(sweep_ray, "ray_gpu_budget", lambda ray, b: own["otmf"] - 1)
    with pytest.raises(MergingError, match=r"^trial otmf seed 42 needs about .*CUDA context"):
        sweep_ray.run_ray(trials, shared, None, done.append, "auto", "cuda")
