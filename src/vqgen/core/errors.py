"""User-facing errors: the CLI prints them as one paragraph and exits 2."""

from __future__ import annotations

__all__ = ["VqgenError"]


class VqgenError(Exception):
    """Bad input from the user (a file, field or value), described in the message."""
