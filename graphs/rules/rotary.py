"""RotaryEmbedding (opset 23, 4-D [B,H,S,D], non-interleaved, position_ids) <-> its decomposition.

    cos_B1SD2 = Unsqueeze(Gather(cos_cache, position_ids), [1])     (sin likewise)
    x1, x2 = Split(x, 2, axis=-1)
    y = Concat(x1*cos - x2*sin, x2*cos + x1*sin, axis=-1)

computed in the input dtype, as the std op does.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import attr, const_equals, fail, ints, static


class DecomposeRotary(RewriteRuleClassBase):
    def pattern(self, op, x, cos, sin, pos):
        return op.RotaryEmbedding(x, cos, sin, pos, _outputs=["y"])

    def check(self, context, x, cos, sin, pos, y, **_) -> MatchResult:
        node = y.producer()
        if attr(node, "interleaved", 0) != 0:
            return fail("interleaved rotary is not decomposed", node)
        if x.shape is None or x.shape.rank() != 4:
            return fail("input is not known to be 4-D [B,H,S,D]", x)
        d = static(x, 3)
        if d is None or d % 2 or attr(node, "rotary_embedding_dim", 0) not in (0, d):
            return fail("head_dim unknown, odd, or partial rotary", x)
        if static(cos, 1) != d // 2 or static(sin, 1) != d // 2:
            return fail("cos/sin caches are not [positions, head_dim/2]", cos)
        return MatchResult()

    def rewrite(self, op, x, cos, sin, pos, **_):
        c = op.Unsqueeze(op.Gather(cos, pos, axis=0), ints(op, [1]))
        s = op.Unsqueeze(op.Gather(sin, pos, axis=0), ints(op, [1]))
        x1, x2 = op.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return op.Concat(op.Sub(op.Mul(x1, c), op.Mul(x2, s)), op.Add(op.Mul(x2, c), op.Mul(x1, s)), axis=-1)


class FuseRotary(RewriteRuleClassBase):
    def __init__(self, name: str) -> None:
        super().__init__(name, remove_nodes=False)

    def pattern(self, op, x, cos, sin, pos, ax_c, ax_s):
        c = op.Unsqueeze(op.Gather(cos, pos, axis=0), ax_c)
        s = op.Unsqueeze(op.Gather(sin, pos, axis=0), ax_s)
        x1, x2 = op.Split(x, axis=-1, num_outputs=2, _outputs=2)
        return op.Concat(op.Sub(op.Mul(x1, c), op.Mul(x2, s)), op.Add(op.Mul(x2, c), op.Mul(x1, s)), axis=-1)

    def check(self, context, x, cos, sin, pos, ax_c, ax_s, **_) -> MatchResult:
        if not (const_equals(ax_c, [1]) and const_equals(ax_s, [1])):
            return fail("cos/sin are not unsqueezed at axis 1", ax_c)
        if x.shape is None or x.shape.rank() != 4:
            return fail("input is not known to be 4-D [B,H,S,D]", x)
        d = static(x, 3)
        if d is None or static(cos, 1) != d // 2 or static(sin, 1) != d // 2:
            return fail("cos/sin caches are not [positions, head_dim/2]", cos)
        if pos.shape is None or pos.shape.rank() != 2:
            return fail("position ids are not 2-D [B,S]", pos)
        return MatchResult()

    def rewrite(self, op, x, cos, sin, pos, **_):
        return op.RotaryEmbedding(x, cos, sin, pos, interleaved=0)


def decompose_rules() -> list[pattern.RewriteRule]:
    return [DecomposeRotary.rule("RotaryEmbedding")]


def fuse_rules() -> list[pattern.RewriteRule]:
    return [FuseRotary.rule("RotaryEmbedding")]
