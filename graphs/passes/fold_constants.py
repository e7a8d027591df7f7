"""Constant folding through onnxscript's optimizer (FoldConstantsPass): nodes whose inputs are all constant."""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer

from .base import PassOutcome, ReportingPass, node_total


class FoldConstantsPass(ReportingPass):
    name = "fold-constants"

    def run(self, model: ir.Model) -> PassOutcome:
        before = node_total(model)
        result = onnxscript.optimizer.fold_constants(model)
        return PassOutcome(bool(result.modified), {"nodes_removed": before - node_total(model)})
