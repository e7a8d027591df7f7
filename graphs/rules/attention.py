"""Attention (opset 24: 4-D, boolean mask, nonpad_kv_seqlen) <-> MatMul/Softmax attention (opset 21).

    k_BHTD = Reshape(Expand(Unsqueeze(k_BKTD, [2]), [1,1,G,1,1]), [0,H,-1,D])   (GQA head repeat, G = H/K > 1)
    scores = MatMul(q, Transpose(k_BHTD)) * scale
    scores = Tanh(scores / softcap) * softcap               (only with a softcap: Gemma 2)
                                                            (Cast to fp32 when softmax_precision asks for it)
    keep   = mask_B1ST AND (arange(T) < nonpad_kv_seqlen[b])
    out    = MatMul(Softmax(Where(keep, scores, lowest)), v_BHTD)

A fully masked row gives a uniform average instead of the std op's NaN/zeros; no contract step has one.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .util import FLOAT, attr, const_equals, fail, float_scalar, ints, scalar, static


class DecomposeAttention(RewriteRuleClassBase):
    """softcap_only: decompose only soft-capped Attention nodes (TensorRT's ATTENTION layer refuses softcap),
    always with an fp32 softmax for fp16/bf16 (the "trt" dialect; std leaves softmax_precision out for TensorRT)."""

    def __init__(self, name: str, softcap_only: bool = False) -> None:
        super().__init__(name)
        self.softcap_only = softcap_only

    def pattern(self, op, q, k, v, mask, nonpad):
        return op.Attention(q, k, v, mask, None, None, nonpad, _outputs=["o"])

    def check(self, context, q, k, v, mask, nonpad, o, **_) -> MatchResult:
        node = o.producer()
        if any(static(t, a) is None for t in (q, k, v) for a in (1, 3)) or static(k, 2) is None:
            return fail("q/k/v are not 4-D with static heads, head_dim and cache length", q)
        if static(q, 1) % static(k, 1) or static(k, 1) != static(v, 1):
            return fail("query heads are not a multiple of the kv heads", k)
        if attr(node, "is_causal", 0) or attr(node, "qk_matmul_output_mode", 0):
            return fail("is_causal / qk output are not decomposed", node)
        if self.softcap_only and not attr(node, "softcap", 0.0):
            return fail("no softcap: TensorRT imports this Attention as it is", node)
        if len(node.outputs) != 1:
            return fail("attention with present / qk outputs is not decomposed", node)
        if mask.dtype != ir.DataType.BOOL:
            return fail("mask is not boolean", mask)
        return MatchResult()

    def rewrite(self, op, q, k, v, mask, nonpad, o, **_):
        node = o.producer()
        H, K, D, T = static(q, 1), static(k, 1), static(q, 3), static(k, 2)
        if H != K:
            k, v = (op.Reshape(op.Expand(op.Unsqueeze(t, ints(op, [2])), ints(op, [1, 1, H // K, 1, 1])),
                               ints(op, [0, H, -1, D])) for t in (k, v))
        scale = attr(node, "scale", 1.0 / math.sqrt(D))
        scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), float_scalar(op, scale, q.dtype))
        cap = float(attr(node, "softcap", 0.0) or 0.0)
        if cap:  # before the mask, in the query dtype (the op's order)
            scores = op.Mul(op.Tanh(op.Div(scores, float_scalar(op, cap, q.dtype))), float_scalar(op, cap, q.dtype))
        compute = q.dtype
        if (self.softcap_only or attr(node, "softmax_precision", None) == FLOAT) and q.dtype != FLOAT:
            compute, scores = FLOAT, op.Cast(scores, to=FLOAT)
        arange_1T = op.Constant(value=ir.tensor(np.arange(T, dtype=np.int64)[None, :]))
        valid_BT = op.Less(arange_1T, op.Unsqueeze(nonpad, ints(op, [1])))
        keep = op.And(mask, op.Unsqueeze(valid_BT, ints(op, [1, 2])))
        lowest = float_scalar(op, float(np.finfo(compute.numpy()).min), compute)
        probs = op.Softmax(op.Where(keep, scores, lowest), axis=-1)
        if compute != q.dtype:
            probs = op.Cast(probs, to=q.dtype)
        return op.MatMul(probs, v)


class FuseAttention(RewriteRuleClassBase):
    """The decomposition above back to one Attention node (8 variants: head repeat or not, fp32 softmax or not,
    soft cap or not)."""

    def __init__(self, name: str, repeat: bool, cast: bool, softcap: bool) -> None:
        super().__init__(name, remove_nodes=False)
        self.repeat, self.cast, self.softcap = repeat, cast, softcap

    def pattern(self, op, q, k, v, mask, nonpad, scale, arange, ax_n, ax_v, lowest, rep_k, rep_v, flat_k, flat_v,
                cap_in, cap_out):
        if self.repeat:
            k = op.Reshape(op.Expand(op.Unsqueeze(k, [2]), rep_k), flat_k)
            v = op.Reshape(op.Expand(op.Unsqueeze(v, [2]), rep_v), flat_v)
        scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), scale)
        if self.softcap:
            scores = op.Mul(op.Tanh(op.Div(scores, cap_in)), cap_out)
        if self.cast:
            scores = op.Cast(scores, to=FLOAT)
        keep = op.And(mask, op.Unsqueeze(op.Less(arange, op.Unsqueeze(nonpad, ax_n)), ax_v))
        probs = op.Softmax(op.Where(keep, scores, lowest), axis=-1)
        if self.cast:
            probs = op.Cast(probs)
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, mask, scale, arange, ax_n, ax_v, lowest, rep_k=None, rep_v=None, flat_k=None,
              flat_v=None, cap_in=None, cap_out=None, **_) -> MatchResult:
        H, K, D, T = static(q, 1), static(k, 1), static(q, 3), static(k, 2)
        if None in (H, K, D, T):
            return fail("q/k are not 4-D with static heads, head_dim and cache length", q)
        if not isinstance(scalar(scale), float):
            return fail("scale is not a constant", scale)
        if self.softcap and not (isinstance(scalar(cap_in), float) and scalar(cap_in) > 0
                                 and scalar(cap_in) == scalar(cap_out)):
            return fail("soft cap is not Tanh(scores / c) * c with one positive constant c", cap_in)
        if not const_equals(arange, np.arange(T)[None, :]):
            return fail("kv positions are not arange(T)", arange)
        if not (const_equals(ax_n, [1]) and const_equals(ax_v, [1, 2])):
            return fail("nonpad mask is not broadcast as [B,1,1,T]", ax_v)
        if mask.dtype != ir.DataType.BOOL:
            return fail("mask is not boolean", mask)
        fill = scalar(lowest)
        if fill is None or fill > -1e4:
            return fail("masked scores are not filled with a large negative constant", lowest)
        if self.cast and q.dtype == FLOAT:
            return fail("fp32 attention with a cast softmax", q)
        if self.repeat:
            for rep, flat in ((rep_k, flat_k), (rep_v, flat_v)):
                if not (const_equals(rep, [1, 1, H // K, 1, 1]) and const_equals(flat, [0, H, -1, D])):
                    return fail("kv heads are not repeated H/K times", rep)
        elif H != K:
            return fail("query and kv head counts differ without a head repeat", k)
        return MatchResult()

    def rewrite(self, op, q, k, v, mask, nonpad, scale, cap_in=None, **_):
        extra = {"softmax_precision": int(FLOAT)} if self.cast else {}
        if self.softcap:
            extra["softcap"] = float(scalar(cap_in))
        return op.Attention(q, k, v, mask, None, None, nonpad, is_causal=0, scale=float(scalar(scale)), **extra)


def decompose_rules(softcap_only: bool = False) -> list[pattern.RewriteRule]:
    return [DecomposeAttention.rule("Attention", softcap_only=softcap_only)]


def fuse_rules() -> list[pattern.RewriteRule]:
    return [FuseAttention.rule("Attention", repeat=r, cast=c, softcap=sc)
            for sc in (True, False) for r in (True, False) for c in (True, False)]
