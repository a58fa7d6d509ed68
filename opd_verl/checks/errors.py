"""The one exception of our config checks, and the hint its unknown-key messages give."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OPDConfigError(ValueError):
    """A bad `opd.*` (or related verl) setting; the message is one line naming the key and the fix."""


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """' did you mean <prefix><closest>?' for the choice closest to a mistyped `name` ('' when none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" did you mean {prefix}{close[0]}?" if close else ""
