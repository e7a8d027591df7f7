"""TensorScatter (opset 24, axis=-2, linear) <-> ScatterElements (opset 18), the in-place KV-cache write.

    rows_BS = write_indices[:, None] + arange(S)[None, :]
    index_BKSD = Expand(Unsqueeze(rows_BS, [1, 3]), Shape(new_BKSD))
    present = ScatterElements(past_BKTD, index_BKSD, new_BKSD, axis=2)

Both write rows [write[b], write[b] + S) of every head of sequence b and leave the rest of the buffer as
it was, so binding past and present to one buffer keeps the update in place in either form.
"""

from __future__ import annotations

from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import attr, const_equals, fail, int_scalar, ints, scalar


class DecomposeTensorScatter(RewriteRuleClassBase):
    def pattern(self, op, past, new, write):
        return op.TensorScatter(past, new, write, _outputs=["present"])

    def check(self, context, past, new, write, present, **_) -> MatchResult:
        node = present.producer()
        if past.shape is None or past.shape.rank() != 4:
            return fail("cache is not known to be 4-D [B,K,T,D]", past)
        if attr(node, "axis", -2) not in (-2, 2):
            return fail(f"axis {attr(node, 'axis')} is not the sequence axis -2", node)
        if attr(node, "mode", "linear") != "linear":
            return fail("circular mode has no decomposition here", node)
        return MatchResult()

    def rewrite(self, op, past, new, write, **_):
        seq = op.Squeeze(op.Shape(new, start=2, end=3), ints(op, [0]))
        steps = op.Range(int_scalar(op, 0), seq, int_scalar(op, 1))
        rows_BS = op.Add(op.Unsqueeze(write, ints(op, [1])), op.Unsqueeze(steps, ints(op, [0])))
        index = op.Expand(op.Unsqueeze(rows_BS, ints(op, [1, 3])), op.Shape(new))
        return op.ScatterElements(past, index, new, axis=2)


class FuseTensorScatter(RewriteRuleClassBase):
    def __init__(self, name: str) -> None:
        super().__init__(name, remove_nodes=False)

    def pattern(self, op, past, new, write, start, seq, delta, ax_w, ax_r, ax_i, shape):
        steps = op.Range(start, seq, delta)
        rows_BS = op.Add(op.Unsqueeze(write, ax_w), op.Unsqueeze(steps, ax_r))
        index = op.Expand(op.Unsqueeze(rows_BS, ax_i), shape)
        return op.ScatterElements(past, index, new, axis=2, _outputs=["present"])

    def check(self, context, past, write, start, delta, ax_w, ax_r, ax_i, present, **_) -> MatchResult:
        if scalar(start) != 0 or scalar(delta) != 1:
            return fail("row offsets are not arange(S)", start)
        if not (const_equals(ax_w, [1]) and const_equals(ax_r, [0]) and const_equals(ax_i, [1, 3])):
            return fail("row index is not write[:, None] + arange(S) broadcast over heads and head_dim", ax_i)
        if attr(present.producer(), "reduction", "none") != "none":
            return fail("ScatterElements reduces instead of overwriting", present)
        if past.shape is None or past.shape.rank() != 4:
            return fail("cache is not known to be 4-D [B,K,T,D]", past)
        if write.shape is None or write.shape.rank() != 1:
            return fail("write indices are not 1-D [B]", write)
        return MatchResult()

    def rewrite(self, op, past, new, write, **_):
        return op.TensorScatter(past, new, write, axis=-2, mode="linear")


def decompose_rules() -> list[pattern.RewriteRule]:
    return [DecomposeTensorScatter.rule("TensorScatter")]


def fuse_rules() -> list[pattern.RewriteRule]:
    return [FuseTensorScatter.rule("TensorScatter")]
