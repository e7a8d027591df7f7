"""Precision conversion of a uniformly typed std graph: fp32 -> fp16 / bf16 (or back), weights and activations.

- Every float initializer, Constant / ConstantOfShape value, Cast target and value type of the source
  float dtype becomes the target dtype, graph I/O included: the KV caches (past and present) and logits
  change dtype together, so past/present still bind to one buffer. Integer inputs are untouched.
- fp32 is kept where the op allows it: RMSNormalization keeps stash_type=1 (fp32 statistics) and, when the
  target reads it (softmax_attr, set by the pipeline for dialects that lower Attention: the decomposed form
  then computes its softmax in fp32), Attention gets softmax_precision=1 whenever the result is fp16/bf16.
  The std dialect leaves the attribute out: TensorRT-RTX 1.7 refuses it ("Setting softmax precision is not
  supported in TensorRT Attention"; its fused kernels accumulate in fp32), and ORT CPU's result is the same.

It requires one float dtype throughout (no mixed-precision islands): the pipeline runs it on the std graph
before any lowering, so decompositions and contrib ops are created in the target dtype.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx_ir as ir

from ...dtypes import FLOAT_ONNX_TYPES, precision
from ...export.names import COLLECTIVE_DOMAIN
from .base import DialectError, PassOutcome, ReportingPass


def _values(graph: ir.Graph) -> Iterator[ir.Value]:
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from (v for v in node.outputs if v is not None)


def float_dtypes(model: ir.Model) -> set[ir.DataType]:
    return {v.dtype for v in _values(model.graph) if v.dtype in FLOAT_ONNX_TYPES}


class ConvertPrecisionPass(ReportingPass):
    name = "precision"

    def __init__(self, dtype: str | None, debug: bool = False, softmax_attr: bool = True) -> None:
        super().__init__(debug)
        self.softmax_attr = softmax_attr
        self.target = None if dtype is None else ir.DataType(precision(dtype).onnx)
        self.dtype = dtype

    def requires(self, model: ir.Model) -> None:
        found = float_dtypes(model)
        if len(found) > 1:
            raise DialectError(f"precision conversion needs one float dtype in the graph, found "
                               f"{sorted(d.name for d in found)}; convert the std artifact instead")
        contrib = {n.domain for n in model.graph} - {"", "ai.onnx", COLLECTIVE_DOMAIN}
        if contrib:
            raise DialectError(f"precision conversion runs before lowering; this graph already has "
                               f"{sorted(contrib)} ops")

    def run(self, model: ir.Model) -> PassOutcome:
        found = float_dtypes(model)
        source = next(iter(found)) if found else None
        target = self.target or source
        counts = {"initializers": 0, "constants": 0, "values": 0, "casts": 0}
        if source is not None and target != source:
            counts = _convert(model.graph, source, target)
        counts.update(_fp32_policy(model.graph, target, self.softmax_attr))
        return PassOutcome(any(counts.values()), counts)


def _convert(graph: ir.Graph, source: ir.DataType, target: ir.DataType) -> dict[str, int]:
    counts = {"initializers": 0, "constants": 0, "values": 0, "casts": 0}
    for value in graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == source:
            value.const_value = _cast_tensor(value.const_value, target, value.name)
            counts["initializers"] += 1
    for node in graph:
        a = node.attributes.get("value")
        if node.op_type in ("Constant", "ConstantOfShape") and a is not None and a.value.dtype == source:
            node.attributes["value"] = ir.AttrTensor("value", _cast_tensor(a.value, target, a.value.name))
            counts["constants"] += 1
        if node.op_type == "Cast" and node.attributes.get("to") is not None and node.attributes["to"].value == source:
            node.attributes["to"] = ir.AttrInt64("to", int(target))
            counts["casts"] += 1
    for value in _values(graph):
        if value.dtype == source:
            value.dtype = target
            counts["values"] += 1
    return counts


def _cast_tensor(tensor: ir.TensorProtocol, target: ir.DataType, name: str | None) -> ir.Tensor:
    return ir.Tensor(np.asarray(tensor.numpy()).astype(target.numpy()), dtype=target, name=name)


def _fp32_policy(graph: ir.Graph, target: ir.DataType | None, softmax_attr: bool) -> dict[str, int]:
    """fp32 statistics and softmax inside low-precision graphs, where the op has an attribute for it."""
    counts = {"rmsnorm_fp32_stash": 0, "attention_fp32_softmax": 0}
    if target in (None, ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return counts
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "RMSNormalization" and _int(node, "stash_type", 1) != 1:
            node.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
            counts["rmsnorm_fp32_stash"] += 1
        if softmax_attr and node.op_type == "Attention" and _int(node, "softmax_precision", 0) != int(ir.DataType.FLOAT):
            node.attributes["softmax_precision"] = ir.AttrInt64("softmax_precision", int(ir.DataType.FLOAT))
            counts["attention_fp32_softmax"] += 1
    return counts


def _int(node: ir.Node, name: str, default: int) -> int:
    a = node.attributes.get(name)
    return default if a is None else int(a.value)
