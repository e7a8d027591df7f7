"""Artifact folders written atomically (temporary sibling, then rename), with no heavy imports:
graphs/ and tools/ reuse these without loading torch."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .config import ConfigError

EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, with headroom for the graph
ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def prepare_output(out: Path, force: bool) -> Path:
    """Refuse a non-empty OUT unless forced; return the temporary folder to write into."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it or choose another -o")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_output(tmp: Path, out: Path) -> None:
    """Atomically put tmp at out (replacing an old folder when forced)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_folder(out: Path, force: bool) -> Iterator[Path]:
    """Write a folder at `out` all or nothing: yields a temporary sibling, renamed into place when the block
    ends; on any exception (KeyboardInterrupt included) the temporary folder is removed and `out` untouched."""
    tmp = prepare_output(Path(out), force)
    try:
        yield tmp
        commit_output(tmp, Path(out))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
