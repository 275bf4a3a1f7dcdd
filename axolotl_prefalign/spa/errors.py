"""The error the SPA loop raises when it cannot go on."""


class SpaLoopError(RuntimeError):
    """The SPA loop cannot go on (bad settings, a failed stage, missing outputs)."""
