"""Dead-code elimination: nodes, initializers, functions and opset imports nothing uses (onnx_ir common passes)."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedFunctionsPass, RemoveUnusedNodesPass, RemoveUnusedOpsetsPass

from .base import PassOutcome, ReportingPass, node_total


class DeadCodeEliminationPass(ReportingPass):
    name = "dead-code"

    def run(self, model: ir.Model) -> PassOutcome:
        nodes, inits = node_total(model), len(model.graph.initializers)
        modified = False
        for p in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            modified = p(model).modified or modified
        return PassOutcome(modified, {"nodes_removed": nodes - node_total(model),
                                      "initializers_removed": inits - len(model.graph.initializers)})
