"""Command line: ``python -m merging merge ...``, ``python -m merging run ...`` and ``python -m merging sweep ...``.

Errors caused by input print one line (``error: ...``) and exit with status 2; a failure
part-way through keeps what was merged so far in a ``.partial`` file beside ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from merging.cli.parser import EXIT_BAD_INPUT, OneLineParser
from merging.errors import MergingError
from merging.io.outputs import check_outputs, write_or_rescue
from merging.io.sources import check_no_duplicates, check_source_text

if TYPE_CHECKING:
    from merging.experiment.merge import ContinualMerge

# The commands, for the top-level help, which is answered without importing torch or any
# method; everything else builds the full parser (below), which imports them.
COMMANDS = {
    "merge": "merge fine-tuned checkpoints, one after the other, into the pretrained encoder",
    "run": "merge continually with one or more methods and evaluate every step",
    "sweep": "run methods over several task orders and option grids; mean ± std per method",
}
DESCRIPTION = "Continual merging of fine-tuned CLIP image encoders."


def _methods_help() -> str:
    from merging.methods import METHODS

    lines = []
    for name, cls in METHODS.items():
        opts = ", ".join(f"{o.name}={_show(o.default)}" for o in cls.options) or "no options"
        lines.append(f"  {name:<16} {cls.title}: {opts}")
    return "\n".join(lines)


def _show(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def top_parser() -> argparse.ArgumentParser:
    """The command list alone: enough for ``--help`` and for a missing command."""
    parser = OneLineParser(prog="python -m merging", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    return parser


def build_parser() -> argparse.ArgumentParser:
    from merging.cli.run import add_run_parser
    from merging.cli.sweep import add_sweep_parser
    from merging.compute.devices import DEVICE_CHOICES
    from merging.experiment.merge import DTYPES
    from merging.families import output_formats
    from merging.methods import METHODS

    parser = OneLineParser(prog="python -m merging", description=DESCRIPTION)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    merge = commands.add_parser(
        "merge",
        help=COMMANDS["merge"],
        description="Merge fine-tuned CLIP image encoders (or any supported model family, such as an MLP of "
        "nn.Linear layers) continually, in the order given, and write the result.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="methods and their options (defaults):\n" + _methods_help(),
    )
    merge.add_argument(
        "--method", required=True, choices=list(METHODS), metavar="NAME", help=f"merging method: {', '.join(METHODS)}"
    )
    merge.add_argument(
        "--pretrained",
        required=True,
        metavar="SRC",
        help="pretrained encoder: a checkpoint directory, a .safetensors file or a Hub repository id "
        "ORG/NAME[@REV] (open_clip or Hugging Face CLIP layout)",
    )
    merge.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="SRC",
        help="a fine-tuned encoder (path or Hub id, as for --pretrained); repeat the flag, in merge order",
    )
    merge.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help="output: a .safetensors file, or for --format hf a directory that receives "
        "model.safetensors and config.json",
    )
    merge.add_argument(
        "--format",
        choices=output_formats(),
        default=None,
        help="output layout: hf or open_clip for CLIP ViT encoders, safetensors for an MLP; default: the "
        "layout of the fine-tuned checkpoints",
    )
    merge.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, KEY=VALUE or METHOD.KEY=VALUE (repeatable; see the list below)",
    )
    merge.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="where the arithmetic runs (always float32); auto: CUDA if available",
    )
    merge.add_argument(
        "--dtype",
        choices=("auto", *DTYPES),
        default="auto",
        help="storage dtype of the output; auto: that of the fine-tuned checkpoints",
    )
    merge.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read .bin/.pt pickle checkpoints (with torch.load(weights_only=True)); "
        "off by default because unpickling can run code",
    )
    merge.add_argument(
        "--allow-duplicates",
        action="store_true",
        help="merge a checkpoint listed twice twice (refused by default: it is almost always a slip)",
    )
    add_run_parser(commands)
    add_sweep_parser(commands)
    return parser


def _format_step(step, method: str) -> str:
    from merging.methods import get_method

    d = step.diagnostics
    parts = [
        f"step {step.index}/{step.total}",
        Path(step.source.rstrip("/")).name or step.source,
        f"read and merged in {step.seconds:.2f} s",
        f"|tau|={d['task_norm']:.4g}",
        f"|merged-pretrained|={d['merged_norm']:.4g}",
        *get_method(method).step_summary(d),
    ]
    return "  ".join(parts)


def merge_outputs(out: str) -> list[Path]:
    """The files ``merge --out`` may write, before the checkpoints say which model family they are:
    a ``.safetensors`` file, or a folder that receives the weights and a config."""
    path = Path(out)
    if path.suffix == ".safetensors":
        return [path]
    return [path / "model.safetensors", path / "config.json"]


def prepare_merge(args: argparse.Namespace) -> ContinualMerge:
    """Every check before any work: options, sources, duplicates, the output; then open and
    validate the inputs, and check that their family can write ``--out`` in ``--format``."""
    from merging.cli.run import method_options
    from merging.experiment.merge import ContinualMerge

    if not args.checkpoint:
        raise MergingError("no fine-tuned checkpoints given: pass --checkpoint SRC at least once")
    options = method_options([args.method], args.opt)[args.method]
    sources = [check_source_text(c) for c in args.checkpoint]
    pretrained = check_source_text(args.pretrained)
    check_no_duplicates(sources, args.allow_duplicates)
    check_outputs(merge_outputs(args.out), [pretrained, *sources])
    job = ContinualMerge(
        method=args.method,
        pretrained=pretrained,
        checkpoints=sources,
        options=options,
        device=args.device,
        allow_pickle=args.allow_pickle,
        allow_duplicates=args.allow_duplicates,
    )
    job.prepare()
    job.output_files(args.out, args.format)
    return job


def run_merge(args: argparse.Namespace) -> int:
    job = prepare_merge(args)
    print(f"pretrained: {job.base.describe()}", flush=True)
    for reader in job.readers:
        print(f"checkpoint: {reader.describe()}", flush=True)
    try:
        for step in job.steps():
            print(_format_step(step, args.method), flush=True)
    except (MergingError, KeyboardInterrupt) as exc:
        if job.completed:
            partial = _partial_path(Path(args.out), len(job.completed), len(job.readers))
            written = write_or_rescue(
                lambda path: job.save(path, args.format, args.dtype), partial, "the partial merge"
            )
            reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
            raise MergingError(
                f"{reason}; the merge of the first {len(job.completed)} checkpoints is in {written[0]}"
            ) from None
        if isinstance(exc, KeyboardInterrupt):
            raise MergingError("interrupted before the first checkpoint was merged") from None
        raise
    written = write_or_rescue(
        lambda path: job.save(path, args.format, args.dtype), Path(args.out), "the merged encoder"
    )
    fmt = args.format or job.default_format
    print(f"wrote {', '.join(str(w) for w in written)} ({fmt} layout)", flush=True)
    return 0


def _partial_path(out: Path, done: int, total: int) -> Path:
    tag = f".partial-{done}of{total}"
    return out.with_name(out.stem + tag + out.suffix) if out.suffix else out.with_name(out.name + tag)


def run_command(prepared, tracker: str | None = None) -> int:
    from merging.cli.run import run_command as run

    return run(prepared, tracker)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; input errors print one line and return 2, and so does a failed write."""
    argv = list(sys.argv[1:] if argv is None else argv)
    light = not argv or argv[0] in ("-h", "--help")
    parser = top_parser() if light else build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a flag argparse refused (2, one line already printed)
        return int(exit_.code or 0)
    try:
        if args.command == "run":
            from merging.cli.run import prepare_run

            prepared = prepare_run(args)
            return run_command(prepared, tracker=args.tracker) if args.tracker else run_command(prepared)
        if args.command == "sweep":
            from merging.cli.sweep import prepare_sweep, run_sweep

            return run_sweep(prepare_sweep(args))
        return run_merge(args)
    except MergingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
