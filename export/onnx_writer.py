"""Write an ONNX file whose weights are streamed in, tensor by tensor, and hashed as they are written.

A protobuf message may be split: a singular embedded field that appears several times is merged by every
parser, and repeated fields concatenate. So the file is the serialized graph without its weights, followed by
one ``ModelProto.graph { initializer: TensorProto }`` record per weight. With ``external=True`` the tensor bytes
go to ``NAME.data`` instead (offsets aligned to 4 KiB) and the record only points at them. Either way each
tensor passes through memory once and no whole-model protobuf is ever built.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import onnx
import torch

from ..dtypes import from_torch
from .manifest import FileEntry

_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto.graph, GraphProto.initializer, TensorProto.raw_data
ALIGN = 4096


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


_OVERLAP_BYTES = 1 << 20  # chunks at least this large are hashed on a second thread while they are written


class _HashedFile:
    def __init__(self, path: Path) -> None:
        self.path, self.sha, self.bytes = path, hashlib.sha256(), 0
        self.f: BinaryIO = open(path, "wb")
        self._hasher: ThreadPoolExecutor | None = None

    def write(self, data) -> None:
        if len(data) < _OVERLAP_BYTES:
            self.f.write(data)
            self.sha.update(data)
        else:  # hashlib and file writes release the GIL: hash and write the same chunk at once
            if self._hasher is None:
                self._hasher = ThreadPoolExecutor(1, thread_name_prefix="decodekit-sha256")
            hashed = self._hasher.submit(self.sha.update, data)
            try:
                self.f.write(data)
            finally:
                hashed.result()
        self.bytes += len(data)

    def close(self) -> FileEntry:
        self.f.close()
        self._shutdown()
        return FileEntry(self.path.name, self.sha.hexdigest(), self.bytes)

    def _shutdown(self) -> None:
        if self._hasher is not None:
            self._hasher.shutdown()
            self._hasher = None


class OnnxWriter:
    """``OnnxWriter(path, skeleton, external)``; ``add(name, tensor)`` per weight; ``close()`` -> file entries."""

    def __init__(self, path: Path, skeleton: onnx.ModelProto, external: bool) -> None:
        self.path, self.external = Path(path), external
        self.onnx = _HashedFile(self.path)
        self.onnx.write(skeleton.SerializeToString())
        self.data = _HashedFile(self.path.with_name(self.path.name + ".data")) if external else None
        self.written = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.detach().contiguous().view(torch.uint8).numpy()
        header = onnx.TensorProto(name=name, dims=list(tensor.shape), data_type=from_torch(tensor.dtype).onnx)
        if self.data is not None:
            pad = -self.data.bytes % ALIGN
            self.data.write(b"\0" * pad)
            header.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", self.data.path.name), ("offset", str(self.data.bytes)),
                               ("length", str(raw.nbytes))):
                header.external_data.add(key=key, value=value)
            self.data.write(memoryview(raw).cast("B") if raw.nbytes else b"")
            body = header.SerializeToString()
            self._record(body, b"")
        else:
            self._record(header.SerializeToString() + _field(_RAW_DATA_FIELD, raw.nbytes), memoryview(raw).cast("B"))
        self.written += raw.nbytes

    def _record(self, head: bytes, raw) -> None:
        tensor_len = len(head) + len(raw)
        graph_len = len(_field(_INITIALIZER_FIELD, tensor_len)) + tensor_len
        self.onnx.write(_field(_GRAPH_FIELD, graph_len) + _field(_INITIALIZER_FIELD, tensor_len) + head)
        if len(raw):
            self.onnx.write(raw)

    def close(self) -> tuple[FileEntry, list[FileEntry]]:
        entry = self.onnx.close()
        return entry, ([self.data.close()] if self.data is not None else [])

    def abort(self) -> None:
        for f in (self.onnx, self.data):
            if f is not None:
                f.f.close()
                f._shutdown()
