"""``python -m merging run``: a continual run with evaluation, from flags or a saved config."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .devices import DEVICE_CHOICES
from .errors import MergingError, OptionError
from .evaluation import DEFAULT_SAMPLES
from .methods import METHODS, get_method
from .runner import ContinualRun, RunConfig, parse_checkpoint, preset_checkpoints, shuffled


def add_run_parser(commands) -> None:
    run = commands.add_parser(
        "run",
        help="merge continually with one or more methods and evaluate every step",
        description="Run continual merging step by step, evaluating each merged model on the tasks seen so far "
        "(or all tasks), and write results.json with a CSV accuracy matrix per method beside it.",
    )
    run.add_argument("--config", metavar="RESULTS.json", help="replay the run recorded in a results file")
    run.add_argument(
        "--backbone",
        default="mini",
        help="mini (default); ViT-B-32, ViT-B-16, ViT-L-14 (open_clip, OpenAI weights); openai/clip-vit-base-patch32 "
        "and the other transformers repositories (converted with their text towers); hf-hub:ORG/NAME[@REV] "
        "(open_clip format); transformers:ORG/NAME; local-dir:PATH",
    )
    run.add_argument(
        "--preset",
        metavar="NAME",
        help="a preset checkpoint list: mini-8, mini-12 (mini backbone), or TA8, TALL14, TALL20 (FusionBench's "
        "tanganke/<family>_<task> fine-tunes of the chosen OpenAI backbone)",
    )
    run.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="SRC[=TASK]",
        help="a fine-tuned checkpoint, in merge order (repeatable); its task comes from its name or from =TASK",
    )
    run.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME",
        help=f"a method to run (repeatable), or all: {', '.join(METHODS)}",
    )
    run.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="[METHOD.]KEY=VALUE",
        help="a method option; without METHOD. it applies to every chosen method that has it",
    )
    run.add_argument(
        "--samples",
        type=int,
        default=DEFAULT_SAMPLES,
        help=f"test images per task, a deterministic subset (default {DEFAULT_SAMPLES}; 0: all)",
    )
    run.add_argument(
        "--order-seed",
        type=int,
        default=None,
        help="shuffle the order with random.seed(S) then random.shuffle (seeds 42-51 in the papers)",
    )
    run.add_argument(
        "--eval",
        choices=("seen", "all"),
        default="seen",
        help="evaluate the tasks seen so far (default) or all tasks at every step",
    )
    run.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where merging and evaluation run")
    run.add_argument(
        "--out", metavar="RESULTS.json", help="where to write the results (default: results.json, or beside --config)"
    )


def method_options(methods: list[str], pairs: list[str]) -> dict[str, dict[str, Any]]:
    """``--method`` and ``--opt`` flags → {method: {option: raw value}}."""
    if not methods:
        raise OptionError(f"no --method given; valid methods: {', '.join(METHODS)}, all")
    names = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    for name in names:
        get_method(name)
    options: dict[str, dict[str, Any]] = {name: {} for name in names}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise OptionError(f"--opt {pair!r} is not [METHOD.]KEY=VALUE")
        method, dot, option = key.rpartition(".")
        if dot:
            if method not in options:
                raise OptionError(f"--opt {pair}: method {method} is not among the methods run ({', '.join(names)})")
            options[method][option] = value
            continue
        takers = [n for n in names if any(o.name == key for o in get_method(n).options)]
        if not takers:
            raise OptionError(f"--opt {pair}: none of the methods run ({', '.join(names)}) has an option {key!r}")
        for name in takers:
            options[name][key] = value
    return options


def config_from_args(args: argparse.Namespace) -> RunConfig:
    if args.config:
        try:
            data = json.loads(Path(args.config).read_text())
        except (OSError, ValueError) as exc:
            raise MergingError(f"cannot read run configuration {args.config}: {exc}") from None
        return RunConfig.from_json(data.get("config", data))
    if bool(args.preset) == bool(args.checkpoint):
        raise MergingError("give either --preset NAME or --checkpoint SRC (one or more), not both or neither")
    if args.preset:
        checkpoints = preset_checkpoints(args.preset, backbone=args.backbone)
    else:
        checkpoints = [parse_checkpoint(c) for c in args.checkpoint]
    return RunConfig(
        backbone=args.backbone,
        checkpoints=shuffled(checkpoints, args.order_seed),
        methods=method_options(args.method, args.opt),
        samples=None if args.samples == 0 else args.samples,
        eval=args.eval,
        device=args.device,
        preset=args.preset,
        order_seed=args.order_seed,
    )


def run_command(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    out = (
        Path(args.out)
        if args.out
        else (Path(args.config).with_name("replay.json") if args.config else Path("results.json"))
    )
    run = ContinualRun(config)
    print(
        f"backbone {config.backbone}; {len(config.checkpoints)} checkpoints; methods {', '.join(config.methods)}; "
        f"{config.samples or 'all'} test images per task; evaluating {config.eval} tasks",
        flush=True,
    )
    references = run.references
    try:
        for report in run.steps():
            parts = [f"step {report.step}/{report.total} +{report.task}"]
            for name, step in report.methods.items():
                bwt = "" if step.bwt is None else f" BWT {100 * step.bwt:+.1f}"
                parts.append(
                    f"{name}: ACC {100 * step.acc:.1f}{bwt} ({step.merge_seconds:.2f}+{step.eval_seconds:.2f} s)"
                )
            print("  ".join(parts), flush=True)
    except (MergingError, KeyboardInterrupt) as exc:
        if not run.reports:
            raise
        run.save(out)
        reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc)
        raise MergingError(f"{reason}; the {len(run.reports)} completed steps are saved in {out}") from None
    written = run.save(out)
    print(final_table(run.results(), references))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def final_table(results: dict[str, Any], references: dict[str, dict[str, float]]) -> str:
    def mean(values) -> float:
        values = list(values)
        return 100 * sum(values) / len(values)

    tasks = results["tasks"]
    lines = [f"{'':<18}{'ACC':>7}{'BWT':>7}"]
    lines.append(f"{'pretrained':<18}{mean(references['pretrained'][t] for t in tasks):7.1f}{'':>7}")
    lines.append(f"{'fine-tuned':<18}{mean(references['finetuned'][t] for t in tasks):7.1f}{'':>7}")
    for name, data in results["methods"].items():
        bwt = "" if data["bwt"] is None else f"{100 * data['bwt']:7.1f}"
        lines.append(f"{name:<18}{100 * data['acc']:7.1f}{bwt}")
        if "acc_zeroshot_head" in data:  # tuned heads: also the same encoders with zero-shot heads
            bwt = "" if data["bwt_zeroshot_head"] is None else f"{100 * data['bwt_zeroshot_head']:7.1f}"
            lines.append(f"{'  zero-shot heads':<18}{100 * data['acc_zeroshot_head']:7.1f}{bwt}")
    return "\n".join(lines)
