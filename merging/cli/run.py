"""``python -m merging run``: a continual run with evaluation, from flags or a saved config."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from merging.compute.devices import DEVICE_CHOICES
from merging.errors import MergingError, OptionError
from merging.evaluation.evaluator import DEFAULT_SAMPLES
from merging.experiment.results import RunResults
from merging.experiment.runner import ContinualRun, RunConfig, parse_checkpoint, preset_checkpoints, shuffled
from merging.io.outputs import check_outputs, write_or_rescue
from merging.io.sources import check_no_duplicates, locate
from merging.methods import METHODS, get_method


def nonnegative_int(text: str) -> int:
    """A whole number ≥ 0 (argparse turns the ValueError into a one-line error)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


nonnegative_int.__name__ = "whole number >= 0"  # what argparse calls the type in its message


def integer(text: str) -> int:
    return int(text)


integer.__name__ = "integer"

# Flags that a replayed configuration fixes; combining one with --config is an error rather
# than silently ignored. --device (replay on another machine) and --out may be combined.
CONFIG_FIXES = (
    "backbone",
    "preset",
    "checkpoint",
    "method",
    "opt",
    "samples",
    "order_seed",
    "eval",
    "allow_duplicates",
)


def add_run_parser(commands) -> None:
    run = commands.add_parser(
        "run",
        help="merge continually with one or more methods and evaluate every step",
        description="Run continual merging step by step, evaluating each merged model on the tasks seen so far "
        "(or all tasks), and write results.json with a CSV accuracy matrix per method beside it.",
    )
    run.add_argument("--config", metavar="RESULTS.json", help="replay the run recorded in a results file")
    add_experiment_flags(run)
    run.add_argument(
        "--order-seed",
        type=integer,
        default=None,
        help="shuffle the order with random.seed(S) then random.shuffle (seeds 42-51 in the papers)",
    )
    run.add_argument(
        "--out",
        metavar="RESULTS.json",
        help="where to write the results (default: results.json, or replay.json beside --config); checked "
        "before the run starts",
    )
    add_tracker_flag(run)


def add_tracker_flag(parser: argparse.ArgumentParser) -> None:
    """``--tracker``, on ``run`` and ``sweep``: off unless given (the trackers are optional packages)."""
    from merging.experiment.tracking import TRACKERS

    parser.add_argument(
        "--tracker",
        choices=TRACKERS,
        default=None,
        help="also log the results to TensorBoard (event files beside --out) or MLflow (its configured store: "
        "MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME); needs that package",
    )


def add_experiment_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that say what an experiment runs, shared by ``run`` and ``sweep`` so they read the same."""
    parser.add_argument(
        "--backbone",
        default=None,
        help="mini (default); ViT-B-32, ViT-B-16, ViT-L-14 (open_clip, OpenAI weights); openai/clip-vit-base-patch32 "
        "and the other transformers repositories (converted with their text towers); hf-hub:ORG/NAME[@REV] "
        "(open_clip format); transformers:ORG/NAME; local-dir:PATH",
    )
    parser.add_argument(
        "--preset",
        metavar="NAME",
        help="a preset checkpoint list: mini-8, mini-12 (mini backbone), or TA8, TALL14, TALL20 (FusionBench's "
        "tanganke/<family>_<task> fine-tunes of the chosen OpenAI backbone)",
    )
    parser.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="SRC[=TASK]",
        help="a fine-tuned checkpoint, in merge order (repeatable); its task comes from its name or from =TASK",
    )
    parser.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a method to run (repeatable), or all: {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="a method option; without METHOD. it applies to every chosen method that has it",
    )
    parser.add_argument(
        "--samples",
        type=nonnegative_int,
        default=None,
        help=f"test images per task, a deterministic subset (default {DEFAULT_SAMPLES}; 0: all)",
    )
    parser.add_argument(
        "--eval",
        choices=("seen", "all"),
        default=None,
        help="evaluate the tasks seen so far (default) or all tasks at every step",
    )
    parser.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default=None,
        help="where merging and evaluation run (default auto; with --config it overrides the recorded device)",
    )
    parser.add_argument(
        "--allow-duplicates",
        action="store_true",
        default=None,
        help="merge a checkpoint listed twice twice (refused by default: it is almost always a slip)",
    )


def method_options(methods: list[str], pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``--method`` and ``--opt`` flags → {method: {option: typed value}}, parsed and range-checked once.

    Only the options given are kept (so configurations stay short), typed as the method
    declares them, which is also how the app records its options.
    """
    if not methods:
        raise OptionError(f"no method given; valid methods: {', '.join(METHODS)}, all")
    names = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    for name in names:
        get_method(name)
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise OptionError(f"option {pair!r} is not [METHOD.]KEY=VALUE")
        key, value = key.strip(), value.strip()
        method, dot, option = key.rpartition(".")
        if dot:
            if method not in options:
                raise OptionError(f"option {pair}: method {method} is not among the methods run ({', '.join(names)})")
            options[method][option] = value
            continue
        takers = [n for n in names if any(o.name == key for o in get_method(n).options)]
        if not takers and len(names) == 1:
            options[names[0]][key] = value  # the method names the unknown option and lists its own
            continue
        if not takers:
            raise OptionError(f"option {pair}: none of the methods run ({', '.join(names)}) has an option {key!r}")
        for name in takers:
            options[name][key] = value
    return {name: typed_options(name, given) for name, given in options.items()}


def typed_options(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options given to ``method``, converted to their declared types (errors name method and option)."""
    parsed = get_method(method).parse_options(given)
    return {key: parsed[key] for key in given}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's configuration from the flags, or from ``--config`` (with ``--device`` as the one override)."""
    if args.config:
        given = [name for name in CONFIG_FIXES if getattr(args, name) not in (None, [], False)]
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise MergingError(
                f"{flags} cannot be combined with --config, which fixes the run; edit the configuration or run "
                "without --config (only --device and --out may be given with it)"
            )
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise MergingError(f"cannot read run configuration {args.config}: {exc}") from None
        if not isinstance(data, dict):
            raise MergingError(f"run configuration {args.config} is not a JSON object")
        config = RunConfig.from_json(data.get("config", data))
        if args.device is not None:
            config.device = args.device
        return config
    if bool(args.preset) == bool(args.checkpoint):
        raise MergingError("give either --preset NAME or --checkpoint SRC (one or more), not both or neither")
    backbone = args.backbone or "mini"
    if args.preset:
        checkpoints = preset_checkpoints(args.preset, backbone=backbone)
    else:
        checkpoints = [parse_checkpoint(c) for c in args.checkpoint]
        for spec in checkpoints:
            spec.source = locate(spec.source)
    samples = DEFAULT_SAMPLES if args.samples is None else args.samples
    return RunConfig(
        backbone=backbone,
        checkpoints=shuffled(checkpoints, args.order_seed),
        methods=method_options(args.method, args.opt),
        samples=None if samples == 0 else samples,
        eval=args.eval or "seen",
        device=args.device or "auto",
        preset=args.preset,
        order_seed=args.order_seed,
        allow_duplicates=bool(args.allow_duplicates),
    )


def output_files(out: Path, config: RunConfig) -> list[Path]:
    """results.json and the CSV matrix per method that ``run`` writes beside it."""
    return [out, *(out.with_name(f"{out.stem}.{method}.csv") for method in config.methods)]


def prepare_run(args: argparse.Namespace) -> tuple[RunConfig, Path]:
    """Everything checked before any work: flags, configuration, methods and options, the output."""
    config = config_from_args(args)
    check_no_duplicates([c.source for c in config.checkpoints], config.allow_duplicates)
    config.methods = {name: typed_options(name, options) for name, options in config.methods.items()}
    if args.out:
        out = Path(args.out)
    else:
        out = Path(args.config).with_name("replay.json") if args.config else Path("results.json")
    inputs = [c.source for c in config.checkpoints] + ([args.config] if args.config else [])
    if args.tracker:
        from merging.experiment.tracking import check_tracker

        check_tracker(args.tracker)  # a missing package fails now, in one line, not after the run
    check_outputs(output_files(out, config), inputs)
    return config, out


def run_command(prepared: tuple[RunConfig, Path], tracker: str | None = None) -> int:
    config, out = prepared
    run = ContinualRun(config)
    run.prepare()  # every input opened and checked before the first line of output
    print(
        f"backbone {config.backbone}; {len(config.checkpoints)} checkpoints; methods {', '.join(config.methods)}; "
        f"{config.samples or 'all'} test images per task; evaluating {config.eval} tasks",
        flush=True,
    )
    try:
        references = run.references
        for warning in run.warnings:
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        for report in run.steps():
            parts = [f"step {report.step}/{report.total} +{report.task}"]
            for name, step in report.methods.items():
                so_far = run.results(references=False).methods[name]
                bwt = "" if so_far.bwt is None else f" BWT {100 * so_far.bwt:+.1f}"
                parts.append(
                    f"{name}: ACC {100 * (so_far.acc or 0.0):.1f}{bwt} "
                    f"({step.merge_seconds:.2f}+{step.eval_seconds:.2f} s)"
                )
            print("  ".join(parts), flush=True)
    except (MergingError, KeyboardInterrupt) as exc:
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        if not run.reports:
            raise MergingError(reason) from None
        written = write_or_rescue(run.save, out, f"the {len(run.reports)} completed steps")
        raise MergingError(f"{reason}; the {len(run.reports)} completed steps are saved in {written[0]}") from None
    written = write_or_rescue(run.save, out)
    print(final_table(run.results(), references))
    print("wrote " + ", ".join(str(p) for p in written))
    if tracker:
        log_to_tracker(tracker, run.results(), written, out)
    return 0


def log_to_tracker(kind: str, results: RunResults, written: list[Path], out: Path) -> None:
    """The finished run in ``kind`` (TensorBoard: ``OUT.tensorboard/`` beside results.json); the results are
    already written, so a tracker failure says where they are."""
    from merging.experiment.tracking import open_tracker

    root = out.with_name(out.stem + ".tensorboard")
    try:
        tracker = open_tracker(kind, root)
        tracker.log_run(results, written, out.stem)
        tracker.finish()
    except Exception as exc:
        reason = str(exc) if isinstance(exc, MergingError) else f"{type(exc).__name__}: {exc}"
        raise MergingError(
            f"the results are in {written[0]}, but logging them failed: {' '.join(reason.split())}"
        ) from None
    print(f"logged to {kind}" + (f" in {root}" if kind == "tensorboard" else ""))


def final_table(results: RunResults, references: dict[str, dict[str, float]]) -> str:
    def mean(values) -> float:
        values = list(values)
        return 100 * sum(values) / len(values)

    tasks = results.tasks
    lines = [f"{'':<18}{'ACC':>7}{'BWT':>7}"]
    lines.append(f"{'pretrained':<18}{mean(references['pretrained'][t] for t in tasks):7.1f}{'':>7}")
    lines.append(f"{'fine-tuned':<18}{mean(references['finetuned'][t] for t in tasks):7.1f}{'':>7}")
    for name, data in results.methods.items():
        if not data.steps:
            continue
        bwt = "" if data.bwt is None else f"{100 * data.bwt:7.1f}"
        lines.append(f"{name:<18}{100 * (data.acc or 0.0):7.1f}{bwt}")
        if data.has_zeroshot_heads:  # tuned heads: also the same encoders with zero-shot heads
            bwt = "" if data.bwt_zeroshot_head is None else f"{100 * data.bwt_zeroshot_head:7.1f}"
            lines.append(f"{'  zero-shot heads':<18}{100 * (data.acc_zeroshot_head or 0.0):7.1f}{bwt}")
    return "\n".join(lines)
