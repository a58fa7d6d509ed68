"""The one exception of our config checks."""

from __future__ import annotations


class OPDConfigError(ValueError):
    """A bad `opd.*` (or related verl) setting; the message is one line naming the key and the fix."""
