"""User-facing error types shared by export/, graphs/, runtime/ and tools/ (the CLI prints them as one line)."""


class BackendError(RuntimeError):
    """A backend that cannot run here (missing package, device, incompatible artifact); says what to do."""
