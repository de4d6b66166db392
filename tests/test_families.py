"""The model-family boundary: checkpoints are recognised by family, and a second family merges
through the same command line.

The MLP family (``merging.families.mlp``) shares nothing with CLIP ViTs but the interface, so
merging it with OPCM (which projects matrices) and task arithmetic through ``python -m merging
merge`` shows that nothing CLIP-specific is left outside ``merging.families.clip_vit``.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merging.cli.main import main
from merging.errors import CheckpointError
from merging.experiment.driver import Experiment
from merging.families import FAMILIES, family_of
from merging.families.clip_vit import CLIP_VIT
from merging.families.mlp import MLP_FAMILY, MLPArch
from merging.io.checkpoints import open_encoder
from merging.methods import create_merger

from .encoders import finetuned, random_encoder, write_hf, write_open_clip

SIZES = (6, 12, 10, 4)


def mlp_state(sizes=SIZES, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return {k: v.detach().clone() for k, v in MLPArch(tuple(sizes)).build().state_dict().items()}


def mlp_finetuned(pretrained: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """θ0 plus a low-rank update of every weight and some noise everywhere, as fine-tuning gives."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in pretrained.items():
        delta = 0.01 * torch.randn(value.shape, generator=g)
        if value.dim() == 2:
            m, n = value.shape
            delta += 0.2 * torch.randn(m, 1, generator=g) @ torch.randn(1, n, generator=g)
        out[key] = value + delta
    return out


@pytest.fixture
def mlp_checkpoints(tmp_path):
    """A pretrained MLP and three fine-tuned ones as .safetensors files."""
    pretrained = mlp_state()
    save_file(pretrained, str(tmp_path / "pretrained.safetensors"))
    paths = []
    for seed in (1, 2, 3):
        path = tmp_path / f"task{seed}.safetensors"
        save_file(mlp_finetuned(pretrained, seed), str(path))
        paths.append(path)
    return tmp_path / "pretrained.safetensors", paths


def merge_command(method: str, pretrained, checkpoints, out, *extra: str) -> list[str]:
    argv = ["merge", "--method", method, "--pretrained", str(pretrained), "--out", str(out), *extra]
    for path in checkpoints:
        argv += ["--checkpoint", str(path)]
    return argv


def test_clip_checkpoints_are_recognised_as_the_clip_vit_family(tmp_path):
    state = random_encoder()
    assert family_of(state.keys()) is CLIP_VIT
    for path in (write_open_clip(state, tmp_path / "a.safetensors"), write_hf(finetuned(state, 1), tmp_path / "b")):
        reader = open_encoder(path)
        assert reader.family is CLIP_VIT and reader.arch.summary == "2 blocks of width 32"
    assert set(FAMILIES) == {"clip_vit", "mlp"}


def test_an_unknown_key_scheme_raises_naming_the_source_and_what_was_expected(tmp_path):
    path = tmp_path / "conv.safetensors"
    save_file({"encoder.block.0.weight": torch.zeros(2, 2), "head.bias": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError) as exc:
        open_encoder(path)
    message = str(exc.value)
    assert "\n" not in message and message.startswith(f"{path}: unknown checkpoint layout")
    assert "not a CLIP ViT image encoder nor an MLP" in message and "encoder.block.0.weight" in message
    # a method that needs matrices does not silently find none in an unrecognised state dict
    with pytest.raises(CheckpointError, match="the pretrained encoder: unknown checkpoint layout"):
        create_merger("opcm").start({"encoder.block.0.weight": torch.zeros(2, 2)})


def test_the_mlp_family_describes_checks_and_finds_matrices(tmp_path, mlp_checkpoints):
    pretrained, _ = mlp_checkpoints
    reader = open_encoder(pretrained)
    assert reader.family is MLP_FAMILY and reader.arch == MLPArch(SIZES)
    assert reader.describe().endswith(
        "MLP of nn.Linear layers (layers.N.weight, layers.N.bias), 3 linear layers 6→12→10→4"
    )
    assert MLP_FAMILY.matrix_labels(reader) == ["layers.0.weight", "layers.1.weight", "layers.2.weight"]
    weight = reader["layers.1.weight"]
    assert MLP_FAMILY.matrix_views("layers.1.weight", weight)[0][1].data_ptr() == weight.data_ptr()
    assert MLP_FAMILY.matrix_views("layers.1.bias", reader["layers.1.bias"]) == []
    broken = tmp_path / "broken.safetensors"
    save_file({"layers.0.weight": torch.zeros(4, 3), "layers.1.weight": torch.zeros(2, 5)}, str(broken))
    with pytest.raises(CheckpointError, match=r"layers\.1\.weight takes 5 inputs but the layer before it gives 4"):
        open_encoder(broken)


@pytest.mark.parametrize("method", ["task_arithmetic", "opcm"])
def test_an_mlp_merges_through_the_command_line_as_in_memory(tmp_path, capsys, mlp_checkpoints, method):
    pretrained, checkpoints = mlp_checkpoints
    out = tmp_path / f"merged-{method}.safetensors"
    code = main(merge_command(method, pretrained, checkpoints, out))
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert stdout.count("step ") == 3 and f"wrote {out} (safetensors layout)" in stdout
    written = load_file(str(out))
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata()["merging.method"] == method
        assert handle.metadata()["merging.layout"] == "mlp"

    theta0 = load_file(str(pretrained))
    models = [load_file(str(p)) for p in checkpoints]
    merger = create_merger(method)
    merger.start(theta0)  # the family comes from the keys
    for model in models:
        result = merger.step(model)
    assert set(written) == set(theta0)
    for key, value in written.items():
        torch.testing.assert_close(value, result.merged[key], rtol=0, atol=0)
    module = MLPArch(SIZES).build()
    module.load_state_dict(written)  # the output is a working MLP
    assert module(torch.ones(2, SIZES[0])).shape == (2, SIZES[-1])

    plain = {k: theta0[k] + 0.3 * sum(m[k] - theta0[k] for m in models) for k in theta0}
    if method == "task_arithmetic":  # θ0 + λ Σ τ with its default λ = 0.3
        for key in theta0:
            torch.testing.assert_close(written[key], plain[key], rtol=1e-6, atol=1e-6)
    else:  # OPCM found the MLP's matrices through the family and projected them
        matrices = result.diagnostics["matrices"]
        assert merger.family is MLP_FAMILY
        assert set(matrices) == {"layers.0.weight", "layers.1.weight", "layers.2.weight"}
        assert all(entry["removed_share"] > 0 for entry in matrices.values())
        assert result.diagnostics["removed_share"] > 0


def test_a_shape_mismatched_mlp_fails_before_any_work_naming_it(tmp_path, capsys, mlp_checkpoints):
    pretrained, checkpoints = mlp_checkpoints
    wider = tmp_path / "wider.safetensors"
    save_file(mlp_finetuned(mlp_state((6, 16, 10, 4)), 4), str(wider))
    out = tmp_path / "merged.safetensors"
    code = main(merge_command("opcm", pretrained, [*checkpoints, wider], out))
    stdout, stderr = capsys.readouterr()
    assert code == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ")
    assert f"shape mismatch at layers.0.bias: pretrained (12,) vs {wider} (16,)" in stderr
    assert "layer sizes 6→16→10→4 vs 6→12→10→4" in stderr
    assert "step " not in stdout and not out.exists()


def test_families_do_not_mix_and_each_writes_its_own_formats(tmp_path, capsys, mlp_checkpoints):
    pretrained, checkpoints = mlp_checkpoints
    clip = write_open_clip(random_encoder(), tmp_path / "clip.safetensors")
    with pytest.raises(CheckpointError, match=r"clip\.safetensors is a CLIP ViT image encoder, but the pretrained"):
        Experiment(str(pretrained), [str(checkpoints[0]), str(clip)]).open()
    folder = tmp_path / "folder"
    assert main(merge_command("task_arithmetic", pretrained, checkpoints, folder)) == 2
    assert "an MLP is written to a .safetensors file" in capsys.readouterr().err
    out = tmp_path / "m.safetensors"
    assert main(merge_command("task_arithmetic", pretrained, checkpoints, out, "--format", "hf")) == 2
    assert "is written in format safetensors, not hf" in capsys.readouterr().err


def test_opening_is_explicit_and_happens_once(mlp_checkpoints, monkeypatch):
    """Constructors store configuration only; open() reads headers once, however often it is called."""
    import merging.experiment.driver

    pretrained, checkpoints = mlp_checkpoints
    calls = []
    real = merging.experiment.driver.open_encoder
    monkeypatch.setattr(merging.experiment.driver, "open_encoder", lambda *a, **k: calls.append(a) or real(*a, **k))
    experiment = Experiment(str(pretrained), [str(p) for p in checkpoints])
    assert calls == [] and not experiment.is_open
    experiment.open()
    experiment.open()
    assert len(calls) == 4 and experiment.family is MLP_FAMILY and len(experiment.readers) == 3
