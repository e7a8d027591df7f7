"""RMSNormalization (opset 23) <-> its decomposition, computed in fp32 (stash_type=1).

    decomposed:  xf = Cast(x, FLOAT)?   n = xf * Reciprocal(Sqrt(ReduceMean(Pow(xf, 2), [-1]) + eps))
                 y = Mul(Cast(n, x.dtype)?, scale)

The Cast pair appears only for low-precision inputs, so fp16/bf16 graphs keep the fp32 accumulation the
std op has. The decomposition is the form onnxscript's own RmsNormFusion recognizes, and ``FuseRmsNorm``
below turns it back into one node.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import FLOAT, attr, fail, float_scalar, ints, scalar


class DecomposeRmsNorm(RewriteRuleClassBase):
    def pattern(self, op, x, scale):
        return op.RMSNormalization(x, scale, _outputs=["y"])

    def check(self, context, x, scale, y, **_) -> MatchResult:
        node = y.producer()
        rank = x.shape.rank() if x.shape is not None else None
        axis = attr(node, "axis", -1)
        if axis != -1 and (rank is None or axis != rank - 1):
            return fail(f"normalizes from axis {axis}, not over the last axis only", node)
        if attr(node, "stash_type", 1) != 1:
            return fail("stash_type is not 1 (fp32)", node)
        if x.dtype is None or scale.dtype is None:
            return fail("input dtypes unknown (run shape inference first)", x)
        return MatchResult()

    def rewrite(self, op, x, scale, y, **_):
        eps = float(attr(y.producer(), "epsilon", 1e-5))
        low = x.dtype != FLOAT
        xf = op.Cast(x, to=FLOAT) if low else x
        mean_sq = op.ReduceMean(op.Pow(xf, float_scalar(op, 2.0)), ints(op, [-1]), keepdims=1, noop_with_empty_axes=0)
        normed = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(mean_sq, float_scalar(op, eps)))))
        if low:
            normed = op.Cast(normed, to=x.dtype)
        return op.Mul(normed, scale)


class FuseRmsNorm(RewriteRuleClassBase):
    def __init__(self, name: str, cast: bool) -> None:
        super().__init__(name, remove_nodes=False)
        self.cast = cast

    def pattern(self, op, x, scale, two, axes, eps):
        xf = op.Cast(x, to=FLOAT) if self.cast else x
        mean_sq = op.ReduceMean(op.Pow(xf, two), axes, keepdims=1)
        normed = op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(mean_sq, eps))))
        if self.cast:
            normed = op.Cast(normed, _outputs=["normed_cast"])
        return op.Mul(normed, scale)

    def check(self, context, x, scale, two, axes, eps, normed_cast=None, **_) -> MatchResult:
        if scalar(two) != 2.0:
            return fail("Pow exponent is not the constant 2", two)
        a = scalar(axes)
        rank = x.shape.rank() if x.shape is not None else None
        if a is None or (a != -1 and a != (rank or 0) - 1):
            return fail("ReduceMean is not over the last axis only", axes)
        if not isinstance(scalar(eps), float):
            return fail("epsilon is not a float constant", eps)
        if x.dtype is None or scale.dtype is None:
            return fail("input dtypes unknown (run shape inference first)", x)
        if self.cast and (x.dtype == FLOAT or attr(normed_cast.producer(), "to") != x.dtype):
            return fail("casts do not go fp32 and back to the input dtype", x)
        if not self.cast and x.dtype != FLOAT:
            return fail("low-precision input normalized without an fp32 stash", x)
        return MatchResult()

    def rewrite(self, op, x, scale, eps, **_):
        return op.RMSNormalization(x, scale, axis=-1, epsilon=float(scalar(eps)), stash_type=1)


def decompose_rules() -> list[pattern.RewriteRule]:
    return [DecomposeRmsNorm.rule("RMSNormalization")]


def fuse_rules() -> list[pattern.RewriteRule]:
    return [FuseRmsNorm.rule("RMSNormalization", cast=False), FuseRmsNorm.rule("RMSNormalization", cast=True)]

