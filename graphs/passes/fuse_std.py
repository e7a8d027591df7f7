"""Recover the std ops (RMSNormalization, RotaryEmbedding, TensorScatter, Attention) from their decompositions.

Matches the forms ``lower_decomposed`` emits (see graphs/rules/*), so decompose -> fuse is an identity on the
std op counts and outputs. Raises the default-domain opset to 24 when it fused anything (TensorScatter and
Attention with nonpad_kv_seqlen are opset 24).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from ..rules import attention, cache_update, rms_norm, rotary
from ..rules.apply import apply_rules
from .base import PassOutcome, ReportingPass

STD_OPSET = 24


def fuse_rules():
    return [*rms_norm.fuse_rules(), *rotary.fuse_rules(), *cache_update.fuse_rules(), *attention.fuse_rules()]


class FuseStdPass(ReportingPass):
    name = "fuse-std"

    def run(self, model: ir.Model) -> PassOutcome:
        outcome = apply_rules(model, fuse_rules(), self.debug)
        modified = any(outcome.counts.values())
        if modified and model.opset_imports.get("", 0) < STD_OPSET:
            model.opset_imports[""] = STD_OPSET
        if modified:
            TopologicalSortPass()(model)
        return PassOutcome(modified, outcome.counts, outcome.why_not)
