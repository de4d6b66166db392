"""The command line's argument parser: one-line errors and exit status 2, and nothing heavy to import.

``python -m merging --help`` is answered from here without importing torch or any method.
"""

from __future__ import annotations

import argparse

EXIT_BAD_INPUT = 2


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``error: ...``) and exit status 2, like the rest."""

    def error(self, message: str):  # type: ignore[override]
        one_line = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)  # argv may hold newlines
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {one_line} (see --help)\n")
