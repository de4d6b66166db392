"""Start-up and the default run import only what they use (issue 16: app ready in ≤ 4 s,
the default command-line run in ≤ 8 s).

torchvision (and, through it, torch._dynamo: about 1 s of imports on the 2-core CPU) is
needed only to decode JPEGs on a GPU; open_clip (about 2 s: torchvision, transformers, timm)
only for a backbone that is not the plain CLIP (merging.evaluation.clip_model); POT only for
OTMF. A fresh ``import app`` loads none of them, and neither does a whole default run on the
mini benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
DEFERRED = ("torchvision", "torch._dynamo", "open_clip", "transformers", "ot", "spaces")


def loaded_after(code: str) -> list[str]:
    """Which of DEFERRED a fresh interpreter holds after running ``code``."""
    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {DEFERRED!r} if m in sys.modules]))"
    env = {k: v for k, v in os.environ.items() if k not in ("SPACES_ZERO_GPU", "SPACE_ID")}
    done = subprocess.run([sys.executable, "-c", probe], cwd=PROJECT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_app_imports_no_decoder_backbone_or_method_dependency():
    assert loaded_after("import app") == []


def test_decoding_on_the_cpu_imports_no_torchvision():
    assert loaded_after("import merging.evaluation.datasets") == []
    code = (
        "from PIL import Image\n"
        "from merging.evaluation.backbones import Preprocess\n"
        "from merging.evaluation.datasets import preprocess_image\n"
        "image = preprocess_image(Image.new('RGB', (40, 30)), Preprocess(image_size=16))\n"
        "assert tuple(image.shape) == (3, 16, 16)"
    )
    assert loaded_after(code) == []


def test_a_default_run_from_a_cold_cache_imports_neither_open_clip_nor_torchvision(tmp_path):
    """The default command (``run --preset mini-8 --method opcm``) on an empty cache: the backbone,
    its tokenizer, the zero-shot heads, decoding, merging and evaluation, all without them."""
    code = (
        "import os\n"
        f"os.environ['MERGING_CACHE'] = {str(tmp_path / 'cache')!r}\n"
        "from merging.cli.main import main\n"
        f"assert main(['run', '--preset', 'mini-8', '--method', 'opcm', '--samples', '40', "
        f"'--out', {str(tmp_path / 'results.json')!r}]) == 0"
    )
    assert loaded_after(code) == []
