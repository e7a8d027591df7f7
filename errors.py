"""Every user-facing error type of decodekit, under one base (the CLI prints any of them as one line, exit 1).

Layers raise the most specific type; the command line (tools/cli.py) catches ``DecodekitError`` only, so a new
type is a user error by being defined here. Anything that is not a ``DecodekitError`` is a bug and keeps its
traceback. ``Interrupted`` is not an error but a signal (SIGTERM) turned into an exception so that cleanup
code runs (tools/cli.py exits 128 + signal number).

Standard library only: every layer (and ``decodekit --help``) imports this module without loading torch or onnx.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator


class DecodekitError(Exception):
    """Base of every user-facing error: the message is one line that says what is wrong and what to do."""


class UserError(DecodekitError):
    """A bad command-line input."""


class ConfigError(DecodekitError, ValueError):
    """A configuration problem (model config, export/optimize options, an unsupported value)."""


class CheckpointError(DecodekitError, ValueError):
    """A checkpoint that cannot be loaded; the message says what was expected and found."""


class ArtifactError(DecodekitError, ValueError):
    """An artifact (folder, manifest, ONNX or engine file) that cannot be used as it is."""


class WireFormatError(ArtifactError):
    """Bytes that are not a well-formed protobuf message (a truncated file, or not an ONNX file)."""


class BackendError(DecodekitError, RuntimeError):
    """A backend that cannot run here (missing package, device, incompatible artifact)."""


class PartitionError(DecodekitError, ValueError):
    """A graph the tensor-parallel partitioner cannot cut; the message says why."""


class DialectError(ConfigError):
    """The graph cannot be put in the requested dialect; the message says why and what to do."""


class GenerationError(ConfigError):
    """A generation request that cannot run (too long, too many prompts, empty)."""


class QueueFullError(GenerationError):
    """The serving scheduler's wait queue is full: try again later (`decodekit serve` answers HTTP 429)."""


class ApiRequestError(GenerationError):
    """A bad request to `decodekit serve`, answered with an OpenAI-style JSON error and a 4xx ``status``."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


class ValidationError(ConfigError):
    """A validation request that cannot run (bad backend list, prompts, steps)."""


class TpError(BackendError):
    """A tensor-parallel run that cannot go on (a peer died or hung, ranks disagree); says which rank."""


class EngineBuildError(BackendError):
    """TensorRT could not import or build a rank's graph; the message names the node and what to do."""


class LayerStructureError(DecodekitError, ValueError):
    """A traced step graph that does not show the repeated layer structure graphs/replicate.py copies (export then
    traces every layer instead: internal, never reaches the user)."""


class Interrupted(BaseException):
    """A termination signal (SIGTERM) raised in the main thread so that ``finally`` / cleanup blocks run.

    A BaseException like KeyboardInterrupt (SIGINT): ``except Exception`` handlers do not swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Interrupted`` in the main thread (as SIGINT raises KeyboardInterrupt),
    unless someone already handles SIGTERM; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
