"""Constant folding through onnxscript's optimizer (FoldConstantsPass): nodes whose inputs are all constant.

A Cast of a constant is folded whatever its size (onnxscript's default stops at 8192 input elements): the
exporter leaves Cast(fp32 rope cache) -> fp16 unfolded once the cache passes that size (head_dim 128 at
max_seq 192, the llama-3.1-8b shape), and the precision pass needs one float dtype throughout.
"""

from __future__ import annotations

import onnx_ir as ir
import onnxscript.optimizer

from .base import PassOutcome, ReportingPass, node_total


class FoldConstantsPass(ReportingPass):
    name = "fold-constants"

    def run(self, model: ir.Model) -> PassOutcome:
        before = node_total(model)
        result = onnxscript.optimizer.fold_constants(model, should_fold=_always_cast)
        return PassOutcome(bool(result.modified), {"nodes_removed": before - node_total(model)})


def _always_cast(node: ir.Node) -> bool | None:
    return True if node.op_type == "Cast" and node.domain in ("", "ai.onnx") else None
