"""``~`` in a path a person typed, expanded without letting a stranger's text crash the caller."""

from __future__ import annotations

from pathlib import Path


def expanded(text: str | Path) -> Path:
    """``text`` with a leading ``~`` or ``~user`` expanded, or as written when there is no such home.

    ``Path.expanduser`` raises ``RuntimeError`` for ``~user`` naming no account (or for ``~``
    followed by a control character, as a fuzzed checkpoint list found). Such text is then a
    relative path like any other, which does not exist, so the caller's own message about a
    missing checkpoint names it instead of a traceback.
    """
    path = Path(text)
    try:
        return path.expanduser()
    except RuntimeError:
        return path
