"""RotaryEmbedding (opset 23, 4-D [B,H,S,D], non-interleaved, position_ids) <-> its decomposition.

    cos_B1SR2 = Unsqueeze(Gather(cos_cache, position_ids), [1])     (sin likewise; R = 2 * cos_cache.shape[1])
    x_rot, x_pass = Split(x, [R, D - R], axis=-1)                     (partial rotary, R < D: rotary_embedding_dim=R)
    x1, x2 = Split(x_rot, 2, axis=-1)
    y = Concat(x1*cos - x2*sin, x2*cos + x1*sin[, x_pass], axis=-1)

computed in the input dtype, as the std op does.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import attr, const_equals, fail, ints, static


def rotary_dim(node, x) -> int | None:
    """The dimensions a RotaryEmbedding node rotates (rotary_embedding_dim, 0 = all of head_dim)."""
    return attr(node, "rotary_embedding_dim", 0) or static(x, 3)


def _rotated(op, x_rot, c, s):
    x1, x2 = op.Split(x_rot, axis=-1, num_outputs=2, _outputs=2)
    return op.Sub(op.Mul(x1, c), op.Mul(x2, s)), op.Add(op.Mul(x2, c), op.Mul(x1, s))


def _gathered(op, cos, sin, pos, ax_c, ax_s):
    return op.Unsqueeze(op.Gather(cos, pos, axis=0), ax_c), op.Unsqueeze(op.Gather(sin, pos, axis=0), ax_s)


class DecomposeRotary(RewriteRuleClassBase):
    def pattern(self, op, x, cos, sin, pos):
        return op.RotaryEmbedding(x, cos, sin, pos, _outputs=["y"])

    def check(self, context, x, cos, sin, pos, y, **_) -> MatchResult:
        node = y.producer()
        if attr(node, "interleaved", 0) != 0:
            return fail("interleaved rotary is not decomposed", node)
        if x.shape is None or x.shape.rank() != 4:
            return fail("input is not known to be 4-D [B,H,S,D]", x)
        d, r = static(x, 3), rotary_dim(node, x)
        if d is None or r is None or r % 2 or r > d:
            return fail("head_dim unknown, or rotary dimension odd or larger than head_dim", x)
        if static(cos, 1) != r // 2 or static(sin, 1) != r // 2:
            return fail("cos/sin caches are not [positions, rotary_dim/2]", cos)
        return MatchResult()

    def rewrite(self, op, x, cos, sin, pos, y, **_):
        d, r = static(x, 3), rotary_dim(y.producer(), x)
        c, s = _gathered(op, cos, sin, pos, ints(op, [1]), ints(op, [1]))
        if r == d:
            return op.Concat(*_rotated(op, x, c, s), axis=-1)
        x_rot, x_pass = op.Split(x, ints(op, [r, d - r]), axis=-1, _outputs=2)
        return op.Concat(*_rotated(op, x_rot, c, s), x_pass, axis=-1)


class FuseRotary(RewriteRuleClassBase):
    def __init__(self, name: str) -> None:
        super().__init__(name, remove_nodes=False)

    def pattern(self, op, x, cos, sin, pos, ax_c, ax_s):
        return op.Concat(*_rotated(op, x, *_gathered(op, cos, sin, pos, ax_c, ax_s)), axis=-1)

    def check(self, context, x, cos, sin, pos, ax_c, ax_s, sizes=None, **_) -> MatchResult:
        if not (const_equals(ax_c, [1]) and const_equals(ax_s, [1])):
            return fail("cos/sin are not unsqueezed at axis 1", ax_c)
        if x.shape is None or x.shape.rank() != 4:
            return fail("input is not known to be 4-D [B,H,S,D]", x)
        d, r = static(x, 3), 2 * (static(cos, 1) or 0)
        if d is None or not r or static(sin, 1) != r // 2:
            return fail("cos/sin caches are not [positions, rotary_dim/2]", cos)
        if (r, sizes) != (d, None) and not const_equals(sizes, [r, d - r]):
            return fail(f"the rotated part is not the first {r} of {d} dimensions", cos)
        if pos.shape is None or pos.shape.rank() != 2:
            return fail("position ids are not 2-D [B,S]", pos)
        return MatchResult()

    def rewrite(self, op, x, cos, sin, pos, **_):
        r, d = 2 * static(cos, 1), static(x, 3)
        return op.RotaryEmbedding(x, cos, sin, pos, interleaved=0, **({"rotary_embedding_dim": r} if r < d else {}))


class FusePartialRotary(FuseRotary):
    """The partial form: only the first rotary_dim dimensions are rotated, the rest concatenated back."""

    def pattern(self, op, x, cos, sin, pos, ax_c, ax_s, sizes):
        x_rot, x_pass = op.Split(x, sizes, axis=-1, _outputs=2)
        return op.Concat(*_rotated(op, x_rot, *_gathered(op, cos, sin, pos, ax_c, ax_s)), x_pass, axis=-1)


def decompose_rules() -> list[pattern.RewriteRule]:
    return [DecomposeRotary.rule("RotaryEmbedding")]


def fuse_rules() -> list[pattern.RewriteRule]:
    return [FuseRotary.rule("RotaryEmbedding"), FusePartialRotary.rule("RotaryEmbedding")]
