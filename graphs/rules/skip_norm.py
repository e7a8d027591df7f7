"""Residual Add + RMSNormalization -> com.microsoft SkipSimplifiedLayerNormalization.

    s = Add(a, b); y = RMSNormalization(s, gamma)   ->   y, _, _, s = SkipSimplifiedLayerNormalization(a, b, gamma)

Output 3 (input_skip_bias_sum) replaces the residual sum for the next layer. Under tensor parallelism ``a``
is the DistCollective (all-reduce) output: the collective stays its own node and the Add after it fuses.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import attr, dims, fail

MS = "com.microsoft"


class FuseSkipRmsNorm(RewriteRuleClassBase):
    def __init__(self, name: str) -> None:
        super().__init__(name, remove_nodes=False)

    def pattern(self, op, a, b, gamma):
        total = op.Add(a, b, _outputs=["total"])
        return op.RMSNormalization(total, gamma, _outputs=["y"]), total

    def check(self, context, a, b, gamma, y, **_) -> MatchResult:
        node = y.producer()
        da, db = dims(a), dims(b)
        if da is None or da != db or len(da) not in (2, 3):
            return fail("residual operands are not known to have one 2-D/3-D shape (no broadcasting)", a)
        if None in da[-1:] or dims(gamma) != da[-1:]:
            return fail("gamma is not [hidden]", gamma)
        if attr(node, "axis", -1) not in (-1, len(da) - 1) or attr(node, "stash_type", 1) != 1:
            return fail("norm is not over the last axis with an fp32 stash", node)
        if a.dtype != b.dtype or a.dtype != gamma.dtype:
            return fail("operands and gamma differ in dtype", gamma)
        return MatchResult()

    def rewrite(self, op, a, b, gamma, y, **_):
        eps = float(attr(y.producer(), "epsilon", 1e-5))
        normed, _mean, _inv_std, total = op.SkipSimplifiedLayerNormalization(
            a, b, gamma, epsilon=eps, _domain=MS, _outputs=4)
        return normed, total


def rules() -> list[pattern.RewriteRule]:
    return [FuseSkipRmsNorm.rule("SkipSimplifiedLayerNormalization")]


