"""The app's start-up imports only what building the page needs (issue 16: ready in ≤ 4 s).

torchvision (and, through it, torch._dynamo: about 1 s of imports on the 2-core CPU) is
needed only to decode images, open_clip and the transformers it imports only to load a
backbone, POT only for OTMF: a fresh ``import app`` loads none of them, and the first
decode, backbone or OTMF step imports them where they are used.
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


def test_the_datasets_module_imports_torchvision_only_to_decode():
    assert loaded_after("import merging.evaluation.datasets") == []
    code = (
        "from PIL import Image\n"
        "from merging.evaluation.backbones import Preprocess\n"
        "from merging.evaluation.datasets import preprocess_image\n"
        "image = preprocess_image(Image.new('RGB', (40, 30)), Preprocess(image_size=16))\n"
        "assert tuple(image.shape) == (3, 16, 16)"
    )
    assert "torchvision" in loaded_after(code)
