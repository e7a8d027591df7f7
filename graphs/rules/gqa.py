"""The std attention block of one layer -> com.microsoft GroupQueryAttention on the shared KV buffer.

Matched (per layer, what the exporter emits):

    q = RotaryEmbedding(Transpose(q_BSHD)),  k = RotaryEmbedding(Transpose(k_BSKD)),  v = Transpose(v_BSKD)
    present.k = TensorScatter(past.k, k, write_indices)          present.v likewise
    out_BS(HD) = Reshape(Transpose(Attention(q, present.k, present.v, causal_position_mask, nonpad_kv_seqlen)))

where the mask is the contract's causal one (arange(T) <= position_ids), or that And a sliding window of W keys
(arange(T) > position_ids - W): GQA's local_window_size = W (ORT's convention: the W keys up to and including the
query's own; measured on onnxruntime 1.32 CPU, W - 1 drops a key). Attention's scale and softcap become GQA's.

Replaced by (3-D q/k/v, the past buffers, and per-step scalars computed from the contract's inputs):

    seqlens_k   = int32(nonpad_kv_seqlen - 1)                      valid cache length after the step, minus 1
    total_len   = int32(max(max_b nonpad_kv_seqlen, S))             an upper bound of every seqlens_k + 1
    query_lens  = int32(min(nonpad_kv_seqlen - write_indices, S))   valid (non-padding) rows of the chunk
    out, present.k, present.v = GroupQueryAttention(q, k, v, past.k, past.v, seqlens_k, total_len,
                                    cos, sin, query_seqlens=query_lens, do_rotary=1)

With ``fuse_rotary=False`` the rotation is a separate com.microsoft RotaryEmbedding on the 3-D q/k (with the
contract's position_ids) and GQA runs with do_rotary=0.

Partial rotary (RotaryEmbedding's rotary_embedding_dim R < D, cos/sin [positions, R/2]): GQA rotates the first
2 * cos_cache.shape[1] dimensions itself when that half-width is a multiple of 8 (onnxruntime 1.32 refuses other
widths at run time); otherwise the rotation stays a separate com.microsoft RotaryEmbedding (rotary_embedding_dim=R).
RoPE scaling is data: the cos/sin tables (attention factor included) go to GQA unchanged.

When q, k and v are the three outputs of one Split of a fused projection (graphs/passes/fuse_projections.py),
GQA reads the packed [B, S, (H + 2K) * D] tensor as its query and gets no key/value inputs: no Split kernel.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase, pattern

from .rotary import rotary_dim
from .util import attr, const_equals, dims, fail, ints, scalar, static

MS = "com.microsoft"
INT32 = ir.DataType.INT32
PERM = [0, 2, 1, 3]


class LowerAttentionToGqa(RewriteRuleClassBase):
    def __init__(self, name: str, fuse_rotary: bool = True, query_seqlens: bool = True,
                 static_total: bool = False) -> None:
        super().__init__(name, remove_nodes=False)
        self.fuse_rotary = fuse_rotary
        self.query_seqlens = query_seqlens  # False: the 16-input form of onnxruntime < 1.32 (uniform batches)
        self.static_total = static_total  # total_sequence_length from shapes only (see _static_total)

    def pattern(self, op, q_bshd, k_bshd, v_bshd, cos, sin, pos, past_k, past_v, write, mask, nonpad, out_shape):
        q = op.RotaryEmbedding(op.Transpose(q_bshd, perm=PERM), cos, sin, pos, _outputs=["q_rot"])
        k = op.RotaryEmbedding(op.Transpose(k_bshd, perm=PERM), cos, sin, pos, _outputs=["k_rot"])
        v = op.Transpose(v_bshd, perm=PERM)
        present_k = op.TensorScatter(past_k, k, write, _outputs=["present_k"])
        present_v = op.TensorScatter(past_v, v, write, _outputs=["present_v"])
        attn = op.Attention(q, present_k, present_v, mask, None, None, nonpad, _outputs=["attn"])
        out = op.Reshape(op.Transpose(attn, perm=PERM), out_shape)
        return out, present_k, present_v

    def check(self, context, q_bshd, k_bshd, v_bshd, cos, pos, past_k, mask, q_rot, k_rot, present_k, present_v,
              attn, **_) -> MatchResult:
        H, K, D, T = static(q_bshd, 2), static(past_k, 1), static(q_bshd, 3), static(past_k, 2)
        if None in (H, K, D, T) or static(k_bshd, 2) != K or static(v_bshd, 2) != K:
            return fail("heads, head_dim or cache length are not static", q_bshd)
        if H % K:
            return fail(f"{H} query heads are not a multiple of {K} kv heads", q_bshd)
        if D % 16:
            return fail(f"head_dim {D}: ORT GroupQueryAttention requires a multiple of 16", q_bshd)
        R = rotary_dim(q_rot.producer(), q_bshd)
        for rot in (q_rot, k_rot):
            n = rot.producer()
            if attr(n, "interleaved", 0) or rotary_dim(n, q_bshd) != R or R is None or R % 2 or R > D:
                return fail("interleaved rotary, or q and k rotate different or invalid dimensions", n)
        if static(cos, 1) != R // 2 or (static(cos, 0) or 0) < T:
            return fail(f"cos/sin caches are not [>= {T}, {R // 2}]", cos)
        for tsc in (present_k.producer(), present_v.producer()):
            if attr(tsc, "axis", -2) not in (-2, 2) or attr(tsc, "mode", "linear") != "linear":
                return fail("cache update is not a linear write along the sequence axis", tsc)
        node = attn.producer()
        if attr(node, "is_causal", 0) or len(node.outputs) != 1:
            return fail("attention is causal-by-attribute or has extra outputs", node)
        reason, _ = _position_mask_window(mask, pos, T)
        return fail(reason, mask) if reason else MatchResult()

    def rewrite(self, op, q_bshd, k_bshd, v_bshd, cos, sin, pos, past_k, past_v, write, mask, nonpad, attn, q_rot,
                **_):
        H, K, D = static(q_bshd, 2), static(past_k, 1), static(q_bshd, 3)
        R = rotary_dim(q_rot.producer(), q_bshd)
        fuse_rotary = self.fuse_rotary and (R == D or (R // 2) % 8 == 0)
        q3, k3, v3 = (_flatten_heads(op, t) for t in (q_bshd, k_bshd, v_bshd))
        packed = _packed_qkv(q3, k3, v3) if fuse_rotary else None
        seq_1 = op.Shape(pos, start=1, end=2)  # S, from an input every layer shares (CSE merges these)
        seqlens_k = op.Cast(op.Sub(nonpad, ints(op, [1])), to=INT32)
        if self.static_total:
            total = _static_total(op, seq_1, static(past_k, 2))
        else:
            total = op.Cast(op.ReduceMax(op.Concat(nonpad, seq_1, axis=0), keepdims=0), to=INT32)
        query_lens = op.Cast(op.Min(op.Sub(nonpad, write), seq_1), to=INT32)
        if fuse_rotary:
            caches, rotary = (cos, sin), {"do_rotary": 1, "rotary_interleaved": 0}
        else:
            partial = {"rotary_embedding_dim": R} if R < D else {}
            q3, k3 = (op.RotaryEmbedding(t, pos, cos, sin, interleaved=0, _domain=MS,
                                         **(partial and {**partial, "num_heads": heads}))
                      for t, heads in ((q3, H), (k3, K)))
            caches, rotary = (None, None), {"do_rotary": 0}
        scale = float(attr(attn.producer(), "scale", 1.0 / math.sqrt(D)))
        qkv = (packed, None, None) if packed is not None else (q3, k3, v3)
        out, present_k, present_v = op.GroupQueryAttention(
            *qkv, past_k, past_v, seqlens_k, total, *caches, *([None] * 7 + [query_lens] if self.query_seqlens else []),
            num_heads=H, kv_num_heads=K, scale=scale, **rotary, **_window_softcap(attn, mask, pos, static(past_k, 2)),
            _domain=MS, _outputs=3)
        return out, present_k, present_v


def _flatten_heads(op, x_BSHD: ir.Value) -> ir.Value:
    """[B,S,H,D] -> [B,S,H*D]: reuse the 3-D projection the exporter reshaped, else Reshape(0, 0, -1)."""
    producer, heads, head_dim = x_BSHD.producer(), static(x_BSHD, 2), static(x_BSHD, 3)
    if producer is not None and producer.op_type == "Reshape" and producer.domain == "" and heads and head_dim:
        flat = producer.inputs[0]
        if dims(flat) is not None and len(dims(flat)) == 3 and static(flat, 2) == heads * head_dim:
            return flat
    return op.Reshape(x_BSHD, ints(op, [0, 0, -1]))


def _static_total(op, seq_1: ir.Value, max_seq: int) -> ir.Value:
    """total_sequence_length = max_seq for one-token steps, S for longer ones, computed from shapes alone.

    Shapes live on the host, so onnxruntime's CUDA EP needs no device->host copy of a length and a captured
    decode step stays valid as the cache grows (GQA bounds each row by seqlens_k). With S > 1 GQA then sees
    total == S, its "first prompt" case: a prefill into an empty cache (write_indices 0), any batch size.
    """
    one = ints(op, [1])
    return op.Cast(op.ReduceMax(op.Where(op.Equal(seq_1, one), ints(op, [max_seq]), seq_1), keepdims=0), to=INT32)


def _packed_qkv(q3: ir.Value, k3: ir.Value, v3: ir.Value) -> ir.Value | None:
    """The fused [B, S, (H+2K)*D] projection when q/k/v are outputs 0, 1, 2 of one last-axis Split of it."""
    split = q3.producer()
    if split is None or split.op_type != "Split" or split.domain not in ("", "ai.onnx") or len(split.outputs) != 3:
        return None
    if [q3, k3, v3] != list(split.outputs) or q3.index() != 0:
        return None
    packed = split.inputs[0]
    rank = len(dims(packed) or ())
    return packed if rank == 3 and attr(split, "axis", 0) in (-1, 2) else None


def _window_softcap(attn: ir.Value, mask: ir.Value, pos: ir.Value, T: int) -> dict[str, int | float]:
    """GQA's local_window_size (the W keys up to and including the query's own, as transformers' window) and
    softcap attributes, only where the std graph has a window / a soft cap."""
    _, window = _position_mask_window(mask, pos, T)
    softcap = float(attr(attn.producer(), "softcap", 0.0) or 0.0)
    return {**({"local_window_size": window} if window else {}), **({"softcap": softcap} if softcap else {})}


def _position_mask_window(mask: ir.Value, pos: ir.Value, T: int) -> tuple[str | None, int | None]:
    """(why the mask is not one GQA applies itself, or None; the sliding window W, or None for causal).

    GQA masks by cache row: row <= P + s, and with local_window_size also row > P + s - W. Accepted: the
    contract's causal mask arange(T) <= position_ids, alone or And-ed with arange(T) > position_ids - W
    (export/model.py attention_masks)."""
    node = mask.producer()
    if node is not None and node.op_type == "And" and node.domain == "":
        a, b = node.inputs
        causal, window = (a, b) if a.producer() is not None and a.producer().op_type == "LessOrEqual" else (b, a)
        reason = _causal_reason(causal, pos, T)
        if reason:
            return reason, None
        return _window_of(window, causal.producer().inputs[1], T)
    return _causal_reason(mask, pos, T), None


def _causal_reason(mask: ir.Value, pos: ir.Value, T: int) -> str | None:
    node = mask.producer()
    if node is None or node.op_type != "LessOrEqual":
        return "attention mask is not LessOrEqual(arange(T), position_ids) (GQA applies its own causal mask)"
    rows, positions = node.inputs
    unsq = positions.producer() if positions is not None else None
    if not const_equals(rows, [[[list(range(T))]]]) or unsq is None or unsq.op_type != "Unsqueeze" \
            or unsq.inputs[0] is not pos:
        return "attention mask is not arange(T)[None,None,None,:] <= position_ids[:,None,:,None]"
    return None


def _window_of(window: ir.Value, positions: ir.Value, T: int) -> tuple[str | None, int | None]:
    """W of Greater(arange(T), Sub(positions, W)), the sliding-window half of the mask."""
    node = window.producer()
    sub = node.inputs[1].producer() if node is not None and node.op_type == "Greater" else None
    if sub is None or sub.op_type != "Sub" or not const_equals(node.inputs[0], [[[list(range(T))]]]) \
            or sub.inputs[0] is not positions:
        return "attention mask is not causal And arange(T) > position_ids - W (a sliding window)", None
    w = scalar(sub.inputs[1])
    if not isinstance(w, int) or w < 1:
        return "sliding-window width is not a positive integer constant", None
    return None, w


def rules(fuse_rotary: bool = True, query_seqlens: bool = True,
          static_total: bool = False) -> list[pattern.RewriteRule]:
    return [LowerAttentionToGqa.rule("GroupQueryAttention", fuse_rotary=fuse_rotary, query_seqlens=query_seqlens,
                                     static_total=static_total)]
