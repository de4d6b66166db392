"""Errors caused by user input.

Every error a person can trigger (a bad path, a wrong architecture, an unknown option)
is a :class:`MergingError` whose message is one line that names the culprit. The
command line prints it as is and the app shows it in a toast; anything else that
escapes is a bug.
"""

from __future__ import annotations


class MergingError(Exception):
    """Base class: a one-line, user-facing message naming what is wrong."""


class CheckpointError(MergingError):
    """A checkpoint cannot be found, read, recognised, or does not fit the others."""


class OptionError(MergingError):
    """An unknown method, an unknown option, or an option value out of range."""
