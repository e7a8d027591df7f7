"""Lower std to the "decomposed" dialect: ai.onnx opset 21 only, for runtimes without the opset-23/24 ops.

    RMSNormalization -> Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul, fp32 inside (Cast pair for fp16/bf16)
    RotaryEmbedding  -> Gather(cos/sin, position_ids), Split, Mul/Sub/Add, Concat
    TensorScatter    -> ScatterElements(axis=2) at rows write_indices[b] + arange(S)
    Attention        -> explicit GQA head repeat, MatMul, Where(mask & arange(T) < nonpad), Softmax, MatMul

The graph I/O is unchanged, and the present outputs are still ScatterElements over the past inputs, so
binding past and present to one buffer keeps the cache update in place. Softmax runs in fp32 when the
Attention node asked for it (softmax_precision=1, which the precision pass sets for fp16/bf16).
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from ..rules import attention, cache_update, rms_norm, rotary
from ..rules.apply import apply_rules, why_not
from .base import DialectError, PassOutcome, ReportingPass

OPSET = 21


def decompose_rules():
    return [*rms_norm.decompose_rules(), *rotary.decompose_rules(), *cache_update.decompose_rules(),
            *attention.decompose_rules()]


class LowerDecomposedPass(ReportingPass):
    name = "lower-decomposed"

    def run(self, model: ir.Model) -> PassOutcome:
        outcome = apply_rules(model, decompose_rules(), self.debug)
        model.opset_imports[""] = OPSET
        TopologicalSortPass()(model)
        return PassOutcome(True, outcome.counts, outcome.why_not)

    def ensures(self, model: ir.Model) -> None:
        newer = sorted({n.op_type for n in model.graph
                        if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type, OPSET)})
        if newer:
            reasons = why_not(model, decompose_rules())
            raise DialectError(f"decomposed: {', '.join(newer)} could not be lowered to opset {OPSET}"
                               f"{_format(reasons)}; keep --dialect std for this model")


def _format(reasons: dict[str, list[str]]) -> str:
    flat = [f"{rule}: {r}" for rule, rs in reasons.items() for r in rs[:2]]
    return f" ({'; '.join(flat)})" if flat else ""
