"""The dialects an artifact can be optimized into: a registry of name -> lowering passes (no if/elif on names).

    std         ai.onnx opset 24 as exported (TensorScatter + Attention, RMSNormalization, RotaryEmbedding),
                re-optimized (folded, fused back from decompositions, CSE/DCE), optionally converted in precision
    ort-gqa     com.microsoft GroupQueryAttention on the shared KV buffer + SkipSimplifiedLayerNormalization:
                ONNX Runtime's tuned fast path (limits in graphs/passes/lower_ort_gqa.py)
    ort-gqa-uniform / ort-gqa-static  the 16-input GQA form of onnxruntime < 1.32; -static also keeps
                lengths off the host, for CUDA graph capture (graphs/passes/lower_ort_gqa.py)
    decomposed  ai.onnx opset 21 only (ScatterElements cache write, MatMul/Softmax attention), for runtimes
                without the opset-23/24 ops
    trt         std with the Attention nodes TensorRT's ATTENTION layer refuses (softcap: Gemma 2) decomposed
                (graphs/passes/lower_trt.py): build Gemma 2 engines from it
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..export.config import ConfigError
from ..export.manifest import STD_CAPABILITIES, cuda_resident
from .passes.base import ReportingPass
from .passes.lower_decomposed import LowerDecomposedPass
from .passes.lower_ort_gqa import LowerOrtGqaPass
from .passes.lower_trt import LowerTrtPass


@dataclass(frozen=True)
class Dialect:
    name: str
    summary: str
    kv_write: str  # the manifest's kv_layout["write"]: how a step writes its K/V rows
    lowering: Callable[[bool], tuple[ReportingPass, ...]]  # debug -> passes after the std front end
    # what the lowered graph allows its runtime (export/manifest.py CAPABILITIES), written into the manifest
    capabilities: dict[str, bool] = field(default_factory=lambda: dict(STD_CAPABILITIES))
    # the precision pass asks Attention for an fp32 softmax (softmax_precision) in fp16/bf16 graphs: not where the
    # Attention nodes go to TensorRT, which refuses the attribute
    fp32_softmax_attr: bool = True

    def capabilities_at(self, dtype: str) -> dict[str, bool]:
        """What a graph of this dialect at ``dtype`` allows its runtime: no host-free decode step where
        onnxruntime-gpu runs some node on the CPU (export/manifest.py CUDA_PRECISIONS)."""
        caps = dict(self.capabilities)
        if not cuda_resident(self.name, dtype):
            caps["host_free_decode"] = False
        return caps


DIALECTS: dict[str, Dialect] = {
    d.name: d
    for d in (
        Dialect("std", "ai.onnx opset 24: TensorScatter + Attention, RMSNormalization, RotaryEmbedding",
                "TensorScatter(axis=-2, linear)", lambda debug: (), fp32_softmax_attr=False),
        Dialect("ort-gqa", "com.microsoft GroupQueryAttention (shared past/present buffer) + "
                "SkipSimplifiedLayerNormalization", "GroupQueryAttention(past/present shared buffer)",
                lambda debug: (LowerOrtGqaPass(debug=debug),)),
        Dialect("ort-gqa-uniform", "ort-gqa without GroupQueryAttention's query_seqlens input (the 16-input form "
                "onnxruntime < 1.32 reads, e.g. onnxruntime-gpu 1.31): prompts of one batch must have equal lengths",
                "GroupQueryAttention(past/present shared buffer)",
                lambda debug: (LowerOrtGqaPass(debug=debug, query_seqlens=False),),
                {"mixed_lengths": False, "cache_append": False, "host_free_decode": False}),
        Dialect("ort-gqa-static", "ort-gqa-uniform with total_sequence_length from shapes alone (max_seq at "
                "one-token steps): the decode step onnxruntime-gpu captures as a CUDA graph; multi-token steps must "
                "be prefills into an empty cache of equal-length prompts",
                "GroupQueryAttention(past/present shared buffer)",
                lambda debug: (LowerOrtGqaPass(debug=debug, query_seqlens=False, static_total=True),),
                {"mixed_lengths": False, "cache_append": False, "host_free_decode": True}),
        Dialect("decomposed", "ai.onnx opset 21: ScatterElements cache write, MatMul/Softmax attention",
                "ScatterElements(axis=2)", lambda debug: (LowerDecomposedPass(debug=debug),)),
        Dialect("trt", "std for TensorRT: soft-capped Attention (Gemma 2) as MatMul/Tanh/Softmax, the rest std",
                "TensorScatter(axis=-2, linear)", lambda debug: (LowerTrtPass(debug=debug),), fp32_softmax_attr=False),
    )
}

READABLE = ("std", "decomposed")  # dialects `optimize` accepts as input (both fuse back to std first)


def get_dialect(name: str) -> Dialect:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ConfigError(f"unknown dialect {name!r}; known dialects: {', '.join(DIALECTS)}") from None
