"""runtime/background.py: work in a thread, its value or its exception handed to the caller of result()."""

from __future__ import annotations

import threading

import pytest

from decodekit.errors import BackendError
from decodekit.runtime.background import Background


def test_result_is_the_value_computed_in_another_thread():
    pending = Background(lambda a, b=0: (a + b, threading.current_thread().name), 2, b=3)
    value, thread = pending.result()
    assert value == 5 and thread != threading.current_thread().name


def test_result_raises_the_exception_of_the_work():
    def fails():
        raise BackendError("onnxruntime could not load x on cpu: bad model")

    with pytest.raises(BackendError, match="could not load"):
        Background(fails).result()
