"""Where decodekit keeps its per-user caches, and how they are written: one folder, atomic replaces.

``$DECODEKIT_CACHE_DIR`` when set, else ``$XDG_CACHE_HOME/decodekit``, else ``~/.cache/decodekit``. Everything
in it is a cache: deleting the folder costs only time (checksums hashed again, graphs traced again, TensorRT
timings measured again). Torch-free and cheap to import.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

ENV = "DECODEKIT_CACHE_DIR"


def cache_dir() -> Path:
    """The folder of decodekit's caches (not created here)."""
    override = os.environ.get(ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "decodekit"


def write_atomically(path: Path, data: bytes) -> bool:
    """Write `data` to `path` through a temporary sibling and a rename, so readers see the old file or the new
    one, never a part. Returns False (and leaves nothing behind) when the folder is not writable: a cache that
    cannot be written only costs time later."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return True
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False
