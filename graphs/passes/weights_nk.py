"""Store linear weights as [N, K] and multiply with com.microsoft FusedMatMul(transB=1) (ONNX Runtime only).

The exporter's MatMul(x, W^T) keeps W^T [K, N] row-major. cuBLAS picks different kernels for the [N, K]
layout PyTorch's nn.Linear uses (x @ W.T); at decode, with one row per sequence, the two layouts do not run
equally fast (benchmarks/gemm_ceiling.py measures both). This pass lets the benchmark put ONNX Runtime on either
(benchmarks/harness.py system decodekit-nk):

    MatMul(x, W_kn)   ->   com.microsoft FusedMatMul(x, W_nk, transB=1)     W_nk = W_kn.T, contiguous

Only constant 2-D float weights are rewritten. Report counts: {"FusedMatMul": n}.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import PassOutcome, ReportingPass
from .fuse_projections import _weight

MS = "com.microsoft"


def replace_with_fused_transb(model: ir.Model, node: ir.Node, w_nk: ir.Value, suffix: str) -> None:
    """Replace MatMul `node` (x @ W) with com.microsoft FusedMatMul(x, w_nk, transB=1), w_nk = W^T as [N, K]."""
    new = ir.node("FusedMatMul", [node.inputs[0], w_nk], {"transB": 1, "alpha": 1.0}, domain=MS,
                  name=f"{node.name}.{suffix}")
    new.outputs[0].dtype, new.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
    ir.convenience.replace_nodes_and_values(model.graph, node, [node], [new], node.outputs, new.outputs)
    model.opset_imports.setdefault(MS, 1)


class WeightsNkPass(ReportingPass):
    name = "weights-nk"

    def run(self, model: ir.Model) -> PassOutcome:
        graph, n = model.graph, 0
        for node in list(graph):
            w = _weight(node)
            if w is None:
                continue
            arr = np.ascontiguousarray(w.const_value.numpy().T)
            name = f"{w.name}.nk"
            value = ir.Value(name=name, shape=ir.Shape(arr.shape), type=ir.TensorType(w.dtype),
                             const_value=ir.Tensor(arr, dtype=w.dtype, name=name))
            graph.register_initializer(value)
            replace_with_fused_transb(model, node, value, "nk")
            n += 1
        return PassOutcome(bool(n), {"FusedMatMul": n})
