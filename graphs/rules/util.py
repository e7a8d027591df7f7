"""Small helpers shared by the rules: constant values, static dims, attributes, match failures."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult

FLOAT = ir.DataType.FLOAT


def const(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer or Constant output), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def scalar(value: ir.Value | None) -> Any:
    """The Python number of a one-element constant, else None."""
    a = const(value)
    return a.item() if a is not None and a.size == 1 else None


def const_equals(value: ir.Value | None, expected: Any) -> bool:
    a = const(value)
    return a is not None and a.shape == np.shape(expected) and bool(np.all(a == np.asarray(expected)))


def dims(value: ir.Value | None) -> tuple[int | str | None, ...] | None:
    """The value's shape as ints (static) / strings (symbolic) / None (unknown), or None without a shape."""
    if value is None or value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else (d.value if d.value is not None else None) for d in value.shape)


def static(value: ir.Value | None, axis: int) -> int | None:
    d = dims(value)
    if d is None or not -len(d) <= axis < len(d):
        return None
    return d[axis] if isinstance(d[axis], int) else None


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def fail(reason: str, *where: Any) -> MatchResult:
    return MatchResult().fail(reason, list(where) if where else None)


def ints(op: Any, values: list[int]) -> ir.Value:
    """A 1-D int64 constant in a replacement graph."""
    return op.Constant(value_ints=list(values))


def int_scalar(op: Any, value: int) -> ir.Value:
    return op.Constant(value_int=int(value))


def float_scalar(op: Any, value: float, dtype: ir.DataType = FLOAT) -> ir.Value:
    return op.Constant(value=ir.tensor(np.array(value, dtype=dtype.numpy())))
