"""The error a RobustFT run raises when it cannot go on."""

from __future__ import annotations


class RobustFTError(RuntimeError):
    """A RobustFT run that cannot go on (bad input, nothing kept, ...)."""
