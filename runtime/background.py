"""Work started in a thread while the caller does something else: ``Background(fn, *args).result()``.

For work that runs without the GIL (ONNX Runtime loading and optimizing a graph: ~0.8 s of CPU for a 540 MB
model) overlapped with work that needs it (importing torch: ~0.9 s): on a 2-core CPU the pair takes the longer
of the two instead of their sum. ``result()`` waits and returns fn's value or raises fn's exception.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Generic, TypeVar

T = TypeVar("T")


class Background(Generic[T]):
    def __init__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> None:
        self._value: T | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True,
                                        name=f"decodekit-{getattr(fn, '__name__', 'background')}")
        self._thread.start()

    def _run(self, fn: Callable[..., T], args: tuple, kwargs: dict) -> None:
        try:
            self._value = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the caller of result()
            self._error = e

    def result(self) -> T:
        self._thread.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        return self._value  # type: ignore[return-value]
