"""Every external-data location an ONNX file names, read from its protobuf wire format without parsing the model.

    external_data_locations(path) -> ["rank0.onnx.data", ...]   (in file order, repeated per tensor)

The manifest check (export/manifest.py) binds each location to a file the manifest lists inside the artifact
folder BEFORE onnx, onnx_ir, ONNX Runtime or TensorRT open the model and follow it (onnxruntime < 1.32 follows
``../x`` and absolute paths). The file is memory-mapped and walked field by field: weight bytes (``raw_data``)
are skipped, never copied, so a 600 MB rank file costs milliseconds, not a second parse of the whole model.
The walk covers every place a TensorProto may sit: graph initializers, sparse initializers, node attributes
(Constant values, subgraphs of If/Loop/Scan, recursively) and model-local functions. Field numbers are onnx.proto's
(tests/export/test_external_data.py checks them against onnx's descriptors).
"""

from __future__ import annotations

import mmap
from pathlib import Path

from ..errors import WireFormatError

# message kind -> {length-delimited field number: kind of the embedded message}
_MODEL, _GRAPH, _FUNCTION, _NODE, _ATTRIBUTE, _SPARSE, _TENSOR, _ENTRY = range(8)
SCHEMA: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 25: _FUNCTION},  # ModelProto.graph, .functions
    _FUNCTION: {7: _NODE},  # FunctionProto.node
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # GraphProto.node, .initializer, .sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # NodeProto.attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t g tensors graphs ...
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # SparseTensorProto.values, .indices
    _TENSOR: {13: _ENTRY},  # TensorProto.external_data (StringStringEntryProto key=1, value=2)
}


def _varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireFormatError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _embedded(buf: mmap.mmap | bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]."""
    fields, pos = [], start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            fields.append((key >> 3, pos, pos + size))
            pos += size
        else:
            raise WireFormatError(f"unexpected wire type {wire}")
    if pos != end:
        raise WireFormatError("a field runs past the end of its message")
    return fields


def _locations(buf: mmap.mmap | bytes, end: int) -> list[str]:
    found, stack = [], [(_MODEL, 0, end)]
    while stack:
        kind, start, stop = stack.pop()
        fields = _embedded(buf, start, stop)
        if kind == _ENTRY:
            entry = {f: bytes(buf[s:e]).decode("utf-8", "replace") for f, s, e in fields if f in (1, 2)}
            if entry.get(1) == "location":
                found.append(entry.get(2, ""))
            continue
        stack.extend((SCHEMA[kind][f], s, e) for f, s, e in reversed(fields) if f in SCHEMA[kind])
    return found


def external_data_locations(path: str | Path) -> list[str]:
    """The ``location`` of every tensor stored as external data in the ONNX file at path."""
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise WireFormatError("empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _locations(buf, size)
