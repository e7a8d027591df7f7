"""Artifact folders written atomically (temporary sibling, then rename), with no heavy imports:
graphs/ and tools/ reuse these without loading torch.

    atomic_folder(OUT, force, keep=(SOURCE,)) -> yields .OUT.partial-PID beside OUT; renamed to OUT at the end

Nothing is left behind: on any exception, Ctrl-C (SIGINT) or SIGTERM the partial folder and the parent folders
made for it are removed before the exception goes on (the CLI then exits 1 / 130 / 143). A partial folder
(``.OUT.partial-PID``) or replaced folder (``.OUT.old-PID``) left by a process that was killed outright
(SIGKILL, power loss) is recognised by its name and removed by the next write to OUT once PID is no longer
alive. What ``force`` may replace is checked before any work: never a file, the current folder or one of its
parents, nor a folder holding one of ``keep`` (the inputs).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import ConfigError, sigterm_raises

# weights over this go to an external data file beside the graph (always under protobuf's 2 GB limit): ONNX Runtime
# memory-maps external weights, while inline ones are parsed out of the protobuf and copied (0.65 s of CPU for
# SmolLM2's 540 MB, a quarter of its time to first token); small models stay one file
EXTERNAL_DATA_THRESHOLD = 64 * 1024**2
_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def scratch_name(out: Path, kind: str, pid: int | None = None) -> Path:
    """``.NAME.partial-PID`` (being written) or ``.NAME.old-PID`` (being replaced) beside OUT."""
    return out.parent / f".{out.name}.{kind}-{os.getpid() if pid is None else pid}"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale(out: Path) -> list[Path]:
    """Remove the partial / replaced folders of OUT left by processes that no longer run; returns them."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)")
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_destination(out: Path, force: bool, keep: Iterable[str | Path] = ()) -> None:
    """Refuse, before any work, an OUT that cannot or must not be (re)placed; raises ConfigError."""
    target = out.resolve()
    for parent in [out, *out.parents]:
        if parent.exists() or parent.is_symlink():
            if parent != out and not parent.is_dir():
                raise ConfigError(f"cannot write {out}: {parent} is a file, not a folder; choose another -o")
            break
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file; -o names a folder to write (remove the file yourself or choose "
                          f"another -o)" + (" — --force replaces folders only" if force else ""))
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:  # a folder cannot be renamed over the one a process runs in
        raise ConfigError(f"cannot write the artifact at {out}: it is the current folder or one of its parents; "
                          f"choose a new folder for -o")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise ConfigError(f"{out} exists and is not empty; pass --force to replace it or choose another -o")
    for path in keep:
        kept = Path(path).resolve()
        if Path(path).exists() and (target == kept or target in kept.parents):
            raise ConfigError(f"refusing --force on {out}: it holds the input {path}; choose another -o")


def _missing_parents(out: Path) -> list[Path]:
    """The ancestors of OUT that do not exist yet, deepest first (the ones a failed write must remove)."""
    missing = []
    for parent in out.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGINT / SIGTERM during a rename or a cleanup; they are delivered when the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def commit_output(tmp: Path, out: Path) -> None:
    """Atomically put tmp at out (replacing an old folder when forced)."""
    old = scratch_name(out, "old")
    with _signals_blocked():
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)


def _discard(tmp: Path, made: list[Path]) -> None:
    with _signals_blocked():
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in made:  # deepest first; stops at the first one something else wrote into
            try:
                parent.rmdir()
            except OSError:
                break


@contextmanager
def atomic_folder(out: Path, force: bool, keep: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Write a folder at `out` all or nothing: yields a temporary sibling, renamed into place when the block
    ends; on any exception, SIGINT or SIGTERM the temporary folder and the parents made for it are removed
    and `out` is untouched. `keep`: input paths that --force must never replace."""
    out = Path(out)
    check_destination(out, force, keep)
    remove_stale(out)
    made = _missing_parents(out)
    tmp = scratch_name(out, "partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with sigterm_raises():
        try:  # a signal landing between mkdir's system call and its return is cleaned up too
            try:
                tmp.mkdir(parents=True)
            except OSError as e:
                raise ConfigError(f"cannot create {out}: {e.strerror or e}; choose another -o") from None
            yield tmp
            commit_output(tmp, out)
        except BaseException:
            _discard(tmp, made)
            raise

