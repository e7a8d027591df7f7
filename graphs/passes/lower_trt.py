"""Lower std to the "trt" dialect: what TensorRT's ONNX parser imports as layers, with no op it refuses.

TensorRT(-RTX 1.7)'s ATTENTION layer refuses Attention's ``softcap`` attribute ("Setting softcap is not supported
in TensorRT Attention"): each soft-capped Attention node (Gemma 2) becomes the decomposed attention of
graphs/rules/attention.py (MatMul, Tanh(scores / cap) * cap, Where(mask), Softmax in fp32, MatMul). Everything
else stays std: TensorScatter (KV_CACHE_UPDATE, in place), the other Attention nodes (fused ATTENTION kernels),
RMSNormalization, RotaryEmbedding. The opset stays 24. On a graph without soft caps the dialect is std.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from ..rules import attention
from ..rules.apply import apply_rules
from .base import DialectError, PassOutcome, ReportingPass


class LowerTrtPass(ReportingPass):
    name = "lower-trt"

    def run(self, model: ir.Model) -> PassOutcome:
        outcome = apply_rules(model, attention.decompose_rules(softcap_only=True), self.debug)
        modified = any(outcome.counts.values())
        if modified:
            TopologicalSortPass()(model)
        return PassOutcome(modified, outcome.counts, outcome.why_not)

    def ensures(self, model: ir.Model) -> None:
        left = [n.name for n in model.graph if n.op_type == "Attention" and n.domain in ("", "ai.onnx")
                and n.attributes.get("softcap") is not None and n.attributes["softcap"].value]
        if left:
            raise DialectError(f"trt: {len(left)} soft-capped Attention node(s) could not be decomposed "
                               f"(e.g. {left[0]!r}); TensorRT cannot import them")
