"""User-facing error types shared by export/, graphs/, runtime/ and tools/ (the CLI prints them as one line)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what was expected and found."""


class UserError(Exception):
    """A bad command-line input; printed as one line."""


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package, device, incompatible artifact); says what to do."""
