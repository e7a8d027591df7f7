"""Progress of export / optimize / build on stderr: a tqdm bar on a terminal, a few plain lines otherwise.

``ProgressBar(label)`` is the ``progress`` callback the library functions take (one message per phase) and
``bar.written(done, total)`` reports bytes written. On a TTY the bar shows the current phase and the bytes
written so far; when stderr is not a TTY (CI logs, pipes) each phase is one line and the bytes are reported
once, at the end; with ``quiet`` (``--json``) nothing is printed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TextIO


class ProgressBar:
    def __init__(self, label: str, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.label, self.quiet = label, quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar = None
        self._done = 0
        self._started = time.perf_counter()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, message: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self._ensure_bar().set_description_str(f"[{self.label}] {message}", refresh=True)
        else:
            print(f"[{self.label}] {message}", file=self.stream, flush=True)

    def written(self, done: int, total: int) -> None:
        """`done` of `total` bytes written (all files of this command together)."""
        self._done = done
        if self.quiet or not self.tty:
            return
        bar = self._ensure_bar()
        if bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    def finish(self, out: str | Path) -> None:
        """One closing line: the bytes now in OUT and the time taken."""
        if self.quiet:
            return
        self.close()
        nbytes = sum(p.stat().st_size for p in Path(out).rglob("*") if p.is_file()) if Path(out).is_dir() else 0
        print(f"[{self.label}] {out}: {nbytes / 2**20:.1f} MiB written in {time.perf_counter() - self._started:.1f} s",
              file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _ensure_bar(self):
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=None, unit="B", unit_scale=True, unit_divisor=1024, file=self.stream,
                             leave=False, dynamic_ncols=True, bar_format="{desc} {bar} {n_fmt}/{total_fmt}B {rate_fmt}")
        return self._bar
