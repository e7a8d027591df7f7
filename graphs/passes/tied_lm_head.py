"""A tied LM head reads the embedding table itself: com.microsoft FusedMatMul(transB=1), ONNX Runtime dialects.

With tied word embeddings (llama-3.2-1b, qwen2.5-0.5b) the export stores the table once and computes the head as

    MatMul(h, Transpose(E, perm=[1, 0]))                           E: [vocab, hidden], also read by Gather

ONNX Runtime folds that Transpose at session load into a second [hidden, vocab] copy: 525 MB more device memory
for the 1B shape (a fifth of its weights). This pass multiplies by E directly instead, so one buffer serves
both the embedding Gather and the head:

    FusedMatMul(h, E, transB=1)

Report counts: {"FusedMatMul": 1} when a tied head was found, else {}.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import PassOutcome, ReportingPass
from .weights_nk import replace_with_fused_transb


def _tied_weight(node: ir.Node) -> ir.Value | None:
    """E when `node` is MatMul(x, Transpose(E, perm=[1, 0])) with E a 2-D initializer that a Gather also reads."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    t = node.inputs[1].producer() if node.inputs[1] is not None else None
    if t is None or t.op_type != "Transpose" or t.domain not in ("", "ai.onnx"):
        return None
    perm = t.attributes.get("perm")
    w = t.inputs[0]
    if w is None or not w.is_initializer() or w.shape is None or len(w.shape) != 2:
        return None
    if perm is not None and list(perm.as_ints()) != [1, 0]:
        return None
    if not any(u.op_type == "Gather" for u, _ in w.uses()):
        return None
    return w


class TiedLmHeadPass(ReportingPass):
    name = "tied-lm-head"

    def run(self, model: ir.Model) -> PassOutcome:
        n = 0
        for node in list(model.graph):
            w = _tied_weight(node)
            if w is None:
                continue
            replace_with_fused_transb(model, node, w, "tied")  # E is [vocab, hidden]: already [N, K]
            n += 1
        return PassOutcome(bool(n), {"FusedMatMul": n} if n else {})
