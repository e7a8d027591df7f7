"""Fuse sibling projections: MatMuls reading the same activation with constant weights become one MatMul + Split.

Per layer the exporter emits q/k/v as three MatMul(x, W^T) and gate/up as two, all reading one normed
activation. At decode (one row per sequence) each is a bandwidth-bound GEMV whose kernel launch, ramp-up and
tail cost the most on the smallest matrices; one GEMV over the concatenated [K, sum N] weight reads the same
bytes in one kernel:

    y_i = MatMul(x, W_i)            ->   y_0, ..., y_n = Split(MatMul(x, Concat(W_0..W_n, axis=1)), [N_0..N_n], axis=-1)
    y_i = Add(MatMul(x, W_i), b_i)  ->   y_0, ..., y_n = Split(Add(MatMul(x, W), Concat(b_0..b_n)), ...)

Split outputs keep the names of the values they replace (layer bisection and debugging read the same
names). Groups are formed only from MatMuls whose weight is a 2-D float initializer of one dtype and whose
activation is the same value; biases fuse only when every member has one (a constant 1-D Add, the sole
consumer of its MatMul). The ort-gqa lowering then feeds a fused q/k/v straight into GroupQueryAttention's
packed-QKV input (graphs/rules/gqa.py), so the Split disappears there.

Report counts: {"groups": n, "matmuls": m (fused away into the groups), "biases": groups with fused biases}.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...dtypes import FLOAT_ONNX_TYPES
from .base import PassOutcome, ReportingPass



def _weight(node: ir.Node) -> ir.Value | None:
    """The constant 2-D float weight of MatMul(x, W), else None."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    w = node.inputs[1]
    if w is None or w.const_value is None or not w.is_initializer() or w.dtype not in FLOAT_ONNX_TYPES:
        return None
    return w if len(w.const_value.shape) == 2 else None


def _bias(node: ir.Node, graph_outputs: set[int]) -> tuple[ir.Node, ir.Value] | None:
    """(Add node, constant 1-D bias) when MatMul's output feeds exactly one Add(y, b) and nothing else."""
    y = node.outputs[0]
    uses = list(y.uses())
    if len(uses) != 1 or id(y) in graph_outputs:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2 \
            or id(add.outputs[0]) in graph_outputs:
        return None
    b = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    n = node.inputs[1].const_value.shape[1]
    if b is None or b.const_value is None or tuple(b.const_value.shape) != (n,) or b.dtype != y.dtype:
        return None
    return add, b


def _groups(graph: ir.Graph, min_members: int = 2) -> list[list[ir.Node]]:
    """MatMuls sharing (activation, weight dtype, K), in graph order; only groups of min_members or more."""
    by_input: dict[tuple[int, ir.DataType, int], list[ir.Node]] = {}
    for node in graph:
        w = _weight(node)
        if w is not None and node.inputs[0] is not None:
            key = (id(node.inputs[0]), w.dtype, w.const_value.shape[0])
            by_input.setdefault(key, []).append(node)
    return [g for g in by_input.values() if len(g) >= min_members]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    base, i = name, 0
    while name in graph.initializers:
        i += 1
        name = f"{base}_{i}"
    tensor = ir.Tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _concat(values: list[ir.Value], axis: int) -> np.ndarray:
    # bfloat16 tensors come back as ml_dtypes arrays: np.concatenate keeps the dtype
    return np.concatenate([v.const_value.numpy() for v in values], axis=axis)


def _fuse(graph: ir.Graph, group: list[ir.Node], graph_outputs: set[int]) -> bool:
    """Rewrite one group in place; returns whether biases were fused too."""
    x = group[0].inputs[0]
    weights = [n.inputs[1] for n in group]
    sizes = [w.const_value.shape[1] for w in weights]
    biases = [_bias(n, graph_outputs) for n in group]
    with_bias = all(b is not None for b in biases)
    fused_w = _initializer(graph, f"{weights[0].name or 'weight'}.fused{len(group)}", _concat(weights, 1),
                           weights[0].dtype)
    olds = [b[0].outputs[0] for b in biases] if with_bias else [n.outputs[0] for n in group]

    matmul = ir.node("MatMul", [x, fused_w], name=f"{group[0].name}.fused")
    y = matmul.outputs[0]
    y.name, y.dtype = f"{olds[0].name}.fused", olds[0].dtype
    new_nodes = [matmul]
    if with_bias:
        bias = _initializer(graph, f"{biases[0][1].name}.fused{len(group)}", _concat([b[1] for b in biases], 0),
                            y.dtype)
        add = ir.node("Add", [y, bias], name=f"{group[0].name}.fused_bias")
        add.outputs[0].dtype = y.dtype
        new_nodes.append(add)
        y = add.outputs[0]
        y.name = f"{olds[0].name}.fused_bias"
    split_sizes = _initializer(graph, f"{fused_w.name}.split", np.array(sizes, np.int64), ir.DataType.INT64)
    split = ir.node("Split", [y, split_sizes], attributes={"axis": -1}, num_outputs=len(group),
                    name=f"{group[0].name}.split")
    new_nodes.append(split)
    if olds[0].shape is not None:
        y.shape = ir.Shape([*olds[0].shape[:-1], sum(sizes)])
        if with_bias:
            matmul.outputs[0].shape = y.shape
    graph.insert_before(group[0], new_nodes)

    for old, new in zip(olds, split.outputs):
        new.dtype, new.shape = old.dtype, old.shape
        ir.convenience.replace_all_uses_with(old, new)
        name, old.name = old.name, None
        new.name = name
    dead = [b[0] for b in biases] if with_bias else []
    graph.remove([*dead, *group], safe=True)
    return with_bias


class FuseProjectionsPass(ReportingPass):
    """min_members=3 fuses q/k/v but leaves gate/up apart (no Split before SwiGLU): a measurement knob."""

    name = "fuse-projections"

    def __init__(self, debug: bool = False, min_members: int = 2) -> None:
        super().__init__(debug)
        self.min_members = min_members

    def run(self, model: ir.Model) -> PassOutcome:
        graph = model.graph
        outputs = {id(v) for v in graph.outputs}
        groups = [g for g in _groups(graph, self.min_members) if not any(id(n.outputs[0]) in outputs for n in g)]
        counts = {"groups": 0, "matmuls": 0, "biases": 0}
        for group in groups:
            counts["biases"] += _fuse(graph, group, outputs)
            counts["groups"] += 1
            counts["matmuls"] += len(group)
        return PassOutcome(bool(groups), counts)
