"""Common-subexpression elimination (onnx_ir): e.g. the per-layer copies of seqlens/position computations."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass

from .base import PassOutcome, ReportingPass, node_total


class CsePass(ReportingPass):
    name = "cse"

    def run(self, model: ir.Model) -> PassOutcome:
        before = node_total(model)
        modified = CommonSubexpressionEliminationPass()(model).modified
        return PassOutcome(modified, {"nodes_removed": before - node_total(model)})
