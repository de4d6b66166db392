"""Copy the standard CLIP task data the app needs from ../shared/benchmark into assets/.

    python scripts/import_clip_tasks.py [--shared ../shared/benchmark]

Writes assets/tasks.json (class names, templates, Hugging Face dataset, split and columns of
the 20 tasks, and the TA8 / TALL14 / TALL20 lists) and copies the published results and the
single-model accuracies to assets/reference/. The app reads only assets/ at run time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "benchmark")
    args = parser.parse_args()
    source = json.loads((args.shared / "clip_tasks.json").read_text())
    tasks = {}
    for name, entry in source["tasks"].items():
        dataset = {
            "hub": entry["dataset"],
            "config": entry.get("config"),
            "split": entry["split"],
            "image_column": entry.get("image_column", "image"),
            "label_column": entry.get("label_column", "label"),
        }
        if "note" in entry:
            dataset["note"] = entry["note"]
        tasks[name] = {"classnames": entry["classnames"], "templates": entry["templates"], "dataset": dataset}
    registry = {
        "_about": "The 20 standard CLIP tasks of the continual-merging literature (FusionBench TA8 / TALL14 / "
        "TALL20): class names, prompt templates ({} is the class name) and the Hugging Face dataset each is "
        "evaluated on. Imported from shared/benchmark/clip_tasks.json by scripts/import_clip_tasks.py.",
        "checkpoint_pattern": source["checkpoint_pattern"],
        "pretrained": source["pretrained"],
        "sets": {name: source[name] for name in ("TA8", "TALL14", "TALL20")},
        "tasks": tasks,
    }
    assets = ROOT / "assets"
    (assets / "tasks.json").write_text(json.dumps(registry, indent=1, ensure_ascii=False) + "\n")
    reference = assets / "reference"
    reference.mkdir(exist_ok=True)
    for path in [*sorted(args.shared.glob("*.csv")), args.shared / "reference_results.json"]:
        shutil.copyfile(path, reference / path.name)
    print(f"wrote {assets / 'tasks.json'} ({len(tasks)} tasks) and {reference}/")


if __name__ == "__main__":
    main()
