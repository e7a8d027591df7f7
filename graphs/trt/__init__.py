"""TensorRT engine building: artifact (ONNX per rank) in -> artifact with one engine per rank out.

- ``api``: the only module that knows full TensorRT (``tensorrt``) from TensorRT-RTX (``tensorrt_rtx``);
  both are imported lazily, so importing this package never loads either.
- ``profiles``: the optimization profiles (decode: seq=1, prefill: seq 1..max_seq).
- ``build``: ``build_engines(artifact, out, BuildOptions()) -> Manifest``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuildOptions", "build_engines"]


def __getattr__(name: str) -> Any:  # lazy: `from decodekit.graphs.trt import build_engines` loads build.py only then
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(name)
