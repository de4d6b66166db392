"""Build the embedded mini benchmark into assets/mini (see scripts/minibench/build.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.minibench.build import main

if __name__ == "__main__":
    main()
