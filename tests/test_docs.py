"""The README's pictures: each one it embeds exists, says what it shows, and is a real screenshot.

This needs no browser, so it runs everywhere (it was once in the browser module, where it
was skipped without chromium while checking only a string). ``docs/lab.png`` is
``artifacts/lab-default-run.png`` from a passing browser test, copied by hand when the page
changes: the checks below fail if it is replaced by a stub, a truncated file, or a picture
taken at another size.
"""

from __future__ import annotations

import re
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SCREENSHOT = ROOT / "docs" / "lab.png"
# the browser tests' viewport (tests/test_browser.py); their screenshots are full-page
VIEWPORT_WIDTH, VIEWPORT_HEIGHT = 1600, 1400
IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<target>[^)\s]+)\)")


def embedded_images() -> dict[str, str]:
    """The README's images, target → alt text."""
    return {m["target"]: m["alt"] for m in IMAGE.finditer(README.read_text(encoding="utf-8"))}


def test_every_image_the_readme_embeds_exists_and_has_alt_text():
    images = embedded_images()
    assert "docs/lab.png" in images
    for target, alt in images.items():
        if re.match(r"^[a-z]+://", target):
            continue  # a link out of the repository is not ours to check
        assert (ROOT / target).resolve().is_relative_to(ROOT) and (ROOT / target).is_file(), target
        assert len(alt.split()) >= 3, f"{target} needs alt text that says what it shows, not {alt!r}"


def test_the_readme_screenshot_is_a_full_page_capture_of_the_lab():
    assert 50_000 < SCREENSHOT.stat().st_size < 5_000_000  # a real capture, not a stub or a raw dump
    with Image.open(SCREENSHOT) as image:
        assert image.format == "PNG"
        image.verify()  # every chunk's checksum: a truncated or corrupted file fails here
    with Image.open(SCREENSHOT) as image:
        width, height = image.size
        assert width == VIEWPORT_WIDTH and height >= VIEWPORT_HEIGHT, image.size  # as the browser test takes it
        colours = image.convert("RGB").resize((width // 4, height // 4)).getcolors(maxcolors=1 << 20)
    # plots, a heatmap and text make thousands of colours; a blank or one-colour page has a few
    assert colours is not None and len(colours) > 1000, len(colours or ())


ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
PATH_MENTION = re.compile(r"`((?:merging|tests|benchmarks|scripts)/[\w/.]*)`")


def test_every_path_the_architecture_page_names_exists_and_every_package_is_described():
    text = ARCHITECTURE.read_text(encoding="utf-8")
    named = set(PATH_MENTION.findall(text))
    assert len(named) >= 10
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, f"docs/ARCHITECTURE.md names paths that do not exist: {missing}"
    packages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "merging").glob("*/__init__.py")}
    undescribed = sorted(p for p in packages if f"`{p}/`" not in text)
    assert not undescribed, f"docs/ARCHITECTURE.md does not describe the packages {undescribed}"
