"""Checksum verification done where it matters and once.

Every loader checks an artifact's files against the sha256 in its manifest (export/manifest.py). Hashing a
540 MB weight file takes seconds, and one `decodekit bench` opened the same artifact three times (each TP
rank again for all ranks' files). This module makes that check cheap without making it weaker:

- in one process, a file whose identity (size, mtime_ns, ctime_ns, inode, device) has not changed since it
  was hashed is not hashed again;
- across processes (mode "auto", the default), verified files are remembered in a small JSON cache,
  ``verified.json`` in the user cache folder (export/user_cache.py: ``$DECODEKIT_CACHE_DIR``, else
  ``$XDG_CACHE_HOME/decodekit``, else ``~/.cache/decodekit``), keyed by absolute
  path, holding that identity and the sha256; a file that changed in any of those is hashed again. The
  cache is written atomically; an unreadable or malformed cache is ignored (and rewritten), never fatal;
- "always" ignores the cross-process cache (files are hashed once per process), "never" skips the hash
  (the manifest's file sizes are still checked).

Modes come from ``--verify always|auto|never`` on the commands that open artifacts (``set_mode``), or from
the environment variable ``DECODEKIT_VERIFY``. Torch-free: tools and runtimes import it cheaply.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from .user_cache import cache_dir, write_atomically

MODES = ("always", "auto", "never")
ENV = "DECODEKIT_VERIFY"
MAX_ENTRIES = 1024  # oldest entries dropped beyond this (a cache, not a registry)

_lock = threading.Lock()
_mode: str | None = None
_seen: dict[str, tuple[tuple[int, ...], str]] = {}  # absolute path -> (identity, sha256), this process


def set_mode(mode: str) -> None:
    """Process-wide verification mode (the CLI's --verify)."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"verify mode must be one of {', '.join(MODES)}, got {mode!r}")
    _mode = mode


def mode() -> str:
    """The current mode: set_mode's, else $DECODEKIT_VERIFY's when valid, else "auto"."""
    if _mode is not None:
        return _mode
    env = os.environ.get(ENV, "auto")
    return env if env in MODES else "auto"


def cache_path() -> Path:
    return cache_dir() / "verified.json"


def matches(path: str | Path, sha256: str) -> bool:
    """True when the file at `path` has this sha256 (or the mode is "never"), hashing it only when needed."""
    current = mode()
    if current == "never":
        return True
    return known_sha256(path, use_disk=current == "auto") == sha256


def known_sha256(path: str | Path, use_disk: bool = True) -> str:
    """The file's sha256: remembered when its identity is unchanged, else computed and remembered."""
    key = str(Path(path).resolve())
    ident = _identity(key)
    with _lock:
        hit = _seen.get(key)
    if hit is not None and hit[0] == ident:
        return hit[1]
    if use_disk:
        entry = _read_cache().get(key)
        if isinstance(entry, dict) and tuple(entry.get("identity", ())) == ident and isinstance(entry.get("sha256"), str):
            with _lock:
                _seen[key] = (ident, entry["sha256"])
            return entry["sha256"]
    from .manifest import sha256_file  # the one hashing implementation (manifest imports this module)

    digest = sha256_file(key)
    remember(key, digest, ident)
    return digest


def remember(path: str | Path, sha256: str, identity: tuple[int, ...] | None = None) -> None:
    """Record that `path` (as it is now) has this sha256: in this process and in the on-disk cache.

    Call it only with a hash computed from the file's bytes (the exporter hashes what it writes)."""
    key = str(Path(path).resolve())
    ident = identity if identity is not None else _identity(key)
    with _lock:
        _seen[key] = (ident, sha256)
    _write_entry(key, ident, sha256)


def forget_process_memory() -> None:
    """Drop what this process remembers (tests; the disk cache is untouched)."""
    with _lock:
        _seen.clear()


def _identity(path: str) -> tuple[int, ...]:
    st = os.stat(path)
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _read_cache() -> dict:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    return files if isinstance(files, dict) else {}


def _write_entry(key: str, ident: tuple[int, ...], sha256: str) -> None:
    """Read-modify-write the cache atomically (temporary file + rename); failures only cost a re-hash later."""
    path = cache_path()
    files = _read_cache()
    files.pop(key, None)
    files[key] = {"identity": list(ident), "sha256": sha256}
    files = {k: v for k, v in list(files.items())[-MAX_ENTRIES:] if k == key or os.path.exists(k)}
    write_atomically(path, json.dumps({"format": "decodekit-verified", "version": 1, "files": files}).encode())
