"""ONNX shape inference (onnx_ir's ShapeInferencePass): types and shapes of intermediate values.

Rules read head counts, head_dim and dtypes from value shapes, so this runs before every rewrite pass.
Custom-domain nodes (trt::DistCollective, com.microsoft::*) keep whatever type information they had.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass as _OnnxShapeInference

from .base import PassOutcome, ReportingPass


def _typed(model: ir.Model) -> int:
    return sum(1 for n in model.graph for v in n.outputs if v.type is not None and v.shape is not None)


class ShapeInferencePass(ReportingPass):
    name = "shape-inference"

    def run(self, model: ir.Model) -> PassOutcome:
        before = _typed(model)
        modified = _OnnxShapeInference()(model).modified
        after = _typed(model)
        return PassOutcome(modified, {"typed_values": after, "newly_typed": after - before})
