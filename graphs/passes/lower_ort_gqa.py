"""Lower std to the "ort-gqa" dialect: ONNX Runtime's contrib fast path (tuned on CUDA, also runs on CPU).

Per layer the TensorScatter pair + Attention (+ the q/k RotaryEmbedding) become one com.microsoft
GroupQueryAttention reading and writing the past buffers (present.{i} is GQA's present output, same
[B, kv_heads, max_seq, D] shape: bind it to the past buffer as in std), and every residual Add +
RMSNormalization becomes com.microsoft SkipSimplifiedLayerNormalization (2 per layer; the embedding's norm
and q/k norms stay RMSNormalization). With tp > 1 each trt::DistCollective stays its own node and the
residual Add after it fuses into the Skip norm. The graph inputs stay the contract's: GQA's seqlens_k,
total_sequence_length and query_seqlens are computed inside the graph from nonpad_kv_seqlen/write_indices.

What ort-gqa supports (checked on onnxruntime 1.32 CPU against the std graph, fp32 and fp16):

- Static shared buffer: past and present may be one buffer of max_seq rows (the runtime binds them);
  GQA writes only the step's valid rows [write[b], nonpad[b]) and attends to rows [0, nonpad[b]). Rows at
  or beyond nonpad[b] are unspecified afterwards (std writes padding rows there; neither reads them).
- Required of every step: position_ids[b, s] == write_indices[b] + s for the valid rows,
  0 <= nonpad[b] - write[b] <= S and nonpad[b] >= 1 (GQA needs seqlens_k = nonpad - 1 >= 0). GQA takes positions from the cache row (P + s; it gets no
  position_ids input), and so does the std graph's causal mask arange(T) <= position_ids; a runtime that
  gives positions other than cache rows (left padding with offsets, position-id tricks) must use std.
  decodekit's decode loop (right-padded prefill write=0, position=arange(S), nonpad=len_b; decode
  write=position=len_b) satisfies it.
- Mixed-length batches: right-padded prefill with different lengths, ragged decode (different write
  indices), chunked prefill on top of a cache (S > 1, write > 0, also ragged and right-padded) all match
  std, through GQA's query_seqlens input. Without query_seqlens ORT CPU refuses S > 1 with a non-empty
  past when batch > 1; query_seqlens is honored by the CPU and CUDA EPs only (other EPs reject the node).
- head_dim must be a multiple of 16 (ORT CPU rejects other sizes at run time); the lowering refuses it.
- Sliding-window layers (the std mask And-ed with arange(T) > position_ids - W) get local_window_size = W, soft-capped
  Attention (Gemma 2) GQA's softcap: both match transformers on ORT CPU (tests/export/test_sliding_window.py). A
  mask of another form keeps its layer from lowering, and ``ensures`` names why.
- Output rows of padding positions (s >= nonpad[b] - write[b]) are unspecified (std gives finite values);
  compare or sample valid rows only.
- ``static_total=True`` (dialect ort-gqa-static, implies no query_seqlens) computes total_sequence_length from
  shapes alone (max_seq when S == 1, else S): the form onnxruntime-gpu captures in a CUDA graph. Steps with
  S > 1 must then be prefills into an empty cache (write_indices 0) of equal-length prompts.
- ``fuse_rotary=False`` keeps the rotation out of GQA: com.microsoft RotaryEmbedding on the 3-D q/k with the
  contract's position_ids, then GQA with do_rotary=0.
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import TopologicalSortPass

from ..rules import gqa, skip_norm
from ..rules.apply import apply_rules, why_not
from .base import DialectError, PassOutcome, ReportingPass

CONTRIB = "com.microsoft"


class LowerOrtGqaPass(ReportingPass):
    name = "lower-ort-gqa"

    def __init__(self, fuse_rotary: bool = True, debug: bool = False, query_seqlens: bool = True,
                 static_total: bool = False) -> None:
        super().__init__(debug)
        self.fuse_rotary, self.query_seqlens, self.static_total = fuse_rotary, query_seqlens, static_total

    def _rules(self):
        return [*gqa.rules(self.fuse_rotary, self.query_seqlens, self.static_total), *skip_norm.rules()]

    def requires(self, model: ir.Model) -> None:
        if model.opset_imports.get("", 0) < 24:
            raise DialectError("ort-gqa lowers the std dialect (opset 24); this graph imports opset "
                               f"{model.opset_imports.get('', 0)}")

    def run(self, model: ir.Model) -> PassOutcome:
        outcome = apply_rules(model, self._rules(), self.debug)
        modified = any(outcome.counts.values())
        if modified:
            model.opset_imports.setdefault(CONTRIB, 1)
            TopologicalSortPass()(model)
        return PassOutcome(modified, outcome.counts, outcome.why_not)

    def ensures(self, model: ir.Model) -> None:
        left = [n for n in model.graph if n.domain in ("", "ai.onnx") and n.op_type in ("Attention", "TensorScatter")]
        if left:
            reasons = why_not(model, self._rules()).get("GroupQueryAttention", [])
            raise DialectError(f"ort-gqa: {len(left)} Attention/TensorScatter node(s) could not become "
                               f"GroupQueryAttention ({'; '.join(reasons[:3]) or 'no partial match'}); "
                               f"use --dialect std for this model")
