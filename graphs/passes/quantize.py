"""Weight-only blockwise quantization of the linear layers: MatMul(x, W) with W a constant 2-D float initializer
(and a tied LM head: MatMul(x, Transpose(E)) in std, com.microsoft FusedMatMul(x, E, transB=1) in ORT dialects).

The exporter emits every nn.Linear as MatMul(x, W^T) with W^T [K, N] an initializer (after the front end's
constant folding). Each such weight is quantized in blocks along K (graphs/quant.py holds the math) and the
MatMul is replaced by, per ``QuantOptions.format``:

    ort   com.microsoft MatMulNBits(A, B uint8 [N, k_blocks, blob], scales [N, k_blocks] [, zero_points packed uint8])
          attributes K, N, bits, block_size [, accuracy_level]: ONNX Runtime's fused weight-only kernel.
          Float zero points (``float_zero_points``) become, by default, the integer kernel without zero points
          plus an exact per-block offset term (graphs/passes/block_offsets.py), since ORT's CPU kernel runs a float
          zero_points input on a slow path; ``float_zp_form="input"`` writes that input instead.
    qdq   DequantizeLinear(codes [K, N] int4/int8 or uint4/uint8, scales [k_blocks, N] [, zero points], axis=0,
          block_size) -> MatMul: standard ONNX (opset 21+ blocked quantization) that TensorRT's parser imports
          as weight-only quantization. Symmetric scales are positive here (absmax / (2^(bits-1) - 1)): TensorRT
          refuses negative ones. TensorRT-RTX 1.7 imports only the symmetric (signed int4/int8, no zero point)
          form, and needs K to be a multiple of the block size.

Embeddings (Gather), norms and every non-MatMul weight keep their precision; the LM head (the MatMul feeding the
"logits" output through data-movement ops; by its vocabulary width when there is no such path) is kept
unless ``lm_head=True`` (then with ``head_options()``: ``lm_head_bits`` may differ from the rest); a tied head's
table stays in float for the embedding Gather. The pipeline runs this pass after the back end's
constant folding, so the DequantizeLinear of the qdq form is not folded back into a float weight.

Report counts: {"MatMulNBits" or "DequantizeLinear": n, "skipped_lm_head": 0|1, "skipped_shape": n,
"bytes_before": weight bytes of the quantized MatMuls before, "bytes_after": the same after (codes + scales
+ zero points)}.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ...dtypes import FLOAT_ONNX_TYPES
from .. import quant
from .base import DialectError, PassOutcome, ReportingPass, add_initializer
from .block_offsets import BlockOffsets

FORMATS = ("ort", "qdq")
# How a float-zero-point grid reaches MatMulNBits: "offsets" = the integer kernel + an exact per-block offset term
# (graphs/passes/block_offsets.py; ONNX Runtime's packed kernels, accuracy_level 4 included); "input" = the
# kernel's float zero_points input (onnxruntime 1.32 CPU: B dequantized at every call, ~20x slower at decode).
FLOAT_ZP_FORMS = ("offsets", "input")


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True
    lm_head: bool = False
    format: str = "ort"
    accuracy_level: int | None = None  # MatMulNBits only: 0/None = compute in the activation type, 4 = int8
    method: str = "rtn"  # rtn: round-to-nearest; search: error-minimizing scale search per block (graphs/quant.py)
    float_zero_points: bool = False  # asymmetric MatMulNBits: grid min + scale * code, zero points in the scales' type
    float_zp_form: str = "offsets"  # FLOAT_ZP_FORMS: how float zero points reach MatMulNBits
    # with lm_head: the head's bits when they differ from `bits` (None: the same scheme as the rest). Such a head is
    # symmetric with scale absmax / (2^(bits-1) - 1) per block: at 8 bits llama.cpp's Q8_0 grid, which GGUF files
    # often use for a tied embedding table (exact there).
    lm_head_bits: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in quant.BITS:
            raise DialectError(f"unsupported quantization bits {self.bits}; use int4 or int8")
        if self.block_size not in quant.BLOCK_SIZES:
            raise DialectError(f"unsupported block size {self.block_size}; use one of "
                               f"{', '.join(map(str, quant.BLOCK_SIZES))}")
        if self.method not in quant.METHODS:
            raise DialectError(f"unsupported quantization method {self.method!r}; use one of {', '.join(quant.METHODS)}")
        if self.format not in FORMATS:
            raise DialectError(f"unsupported quantization format {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.float_zp_form not in FLOAT_ZP_FORMS:
            raise DialectError(f"unsupported float zero point form {self.float_zp_form!r}; use one of "
                               f"{', '.join(FLOAT_ZP_FORMS)}")
        if self.lm_head_bits is not None and self.lm_head_bits not in quant.BITS:
            raise DialectError(f"unsupported LM head bits {self.lm_head_bits}; use 4 or 8")
        if self.float_zero_points and (self.symmetric or self.format != "ort"):
            raise DialectError("float zero points need --asymmetric and the ort (MatMulNBits) format; "
                               "DequantizeLinear takes zero points of the codes' type only")

    @property
    def scheme(self) -> str:
        """e.g. "int4-b32-sym" ("asymf": float zero points, "asymf-zpinput" as MatMulNBits' float zero_points input
        rather than offsets; + "-lmhead" when the LM head is quantized, "-qdq" for the DequantizeLinear form,
        "-search" for the scale search)."""
        s = f"int{self.bits}-b{self.block_size}-{'sym' if self.symmetric else 'asym'}"
        s += ("f" + ("-zpinput" if self.float_zp_form == "input" else "")) if self.float_zero_points else ""
        s += ("-lmhead" + (str(self.head_options().bits) if self.head_options().bits != self.bits else "")
              if self.lm_head else "") + ("-qdq" if self.format == "qdq" else "")
        return s + ("-search" if self.method == "search" else "")

    def head_options(self) -> "QuantOptions":
        """The options the LM head is quantized with (lm_head_bits: symmetric, positive scales, round-to-nearest)."""
        if self.lm_head_bits is None or self.lm_head_bits == self.bits:
            return self
        return replace(self, bits=self.lm_head_bits, symmetric=True, float_zero_points=False, method="rtn",
                       lm_head_bits=None)


# The default scheme of each weight format: the best one its consumers accept, measured on a real model
# (SmolLM2-135M-Instruct from its Q4_1 GGUF, teacher-forced; benchmarks/int4_quality.py, results/int4_quality.json).
# ort: float zero points (the block's [min, max] grid, exact for a Q4_1 GGUF source) as integer kernel + offsets,
# the LM head at 8 bits (Q8_0's grid, exact for a Q8_0 table), accuracy_level 4 (int8 activations: +0.6% perplexity,
# and what makes ORT's CPU kernel fast; 0.93x onnxruntime-genai's int4 time at rest, results/smollm2_cpu_decode.json).
# TensorRT imports only symmetric blocked DequantizeLinear, so qdq stays symmetric. The scale search lowers the
# weight error but raised this model's perplexity (outliers it clips matter): round-to-nearest stays the method.
DEFAULT_SCHEMES: dict[str, dict] = {
    "ort": {"symmetric": False, "float_zero_points": True, "method": "rtn", "lm_head": True, "lm_head_bits": 8,
            "accuracy_level": 4},
    "qdq": {"symmetric": True, "method": "rtn"},
}


def default_quant_options(bits: int = 4, format: str = "ort", **overrides) -> QuantOptions:
    """QuantOptions with the default scheme of ``format``; keyword ``overrides`` (None = keep the default) win."""
    if format not in DEFAULT_SCHEMES:
        raise DialectError(f"unsupported quantization format {format!r}; use one of {', '.join(FORMATS)}")
    chosen = {k: v for k, v in overrides.items() if v is not None}
    return QuantOptions(**{"bits": bits, "format": format, **DEFAULT_SCHEMES[format], **chosen})


_PASS_THROUGH = {"Reshape", "Slice", "Gather", "Squeeze", "Unsqueeze", "Cast", "Identity", "Transpose", "Flatten"}
_MS = "com.microsoft"


def _const_2d(v: ir.Value | None) -> ir.Value | None:
    c = None if v is None else v.const_value
    return v if c is not None and c.dtype in FLOAT_ONNX_TYPES and len(c.shape) == 2 else None


def _weight(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(the initializer holding x @ W's weight, True when it is stored [N, K]) for

        MatMul(x, W)                            W [K, N] constant
        MatMul(x, Transpose(E, perm=[1, 0]))    E [N, K]: a tied LM head (the embedding table) in std
        FusedMatMul(x, E, transB=1)             E [N, K]: the same in ORT dialects (graphs/passes/tied_lm_head.py)
    """
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2:
        w = node.inputs[1]
        if _const_2d(w) is not None:
            return w, False
        t = None if w is None else w.producer()
        perm = None if t is None else t.attributes.get("perm")
        if t is not None and t.op_type == "Transpose" and t.domain in ("", "ai.onnx") \
                and (perm is None or list(perm.as_ints()) == [1, 0]) and _const_2d(t.inputs[0]) is not None:
            return t.inputs[0], True
        return None
    if node.op_type == "FusedMatMul" and node.domain == _MS and len(node.inputs) == 2:
        attrs = {k: v.value for k, v in node.attributes.items()}
        plain = {"transA": 0, "transBatchA": 0, "transBatchB": 0, "alpha": 1.0}
        if attrs.get("transB") == 1 and all(attrs.get(k, d) == d for k, d in plain.items()) \
                and _const_2d(node.inputs[1]) is not None:
            return node.inputs[1], True
    return None


def _lm_head(graph: ir.Graph) -> ir.Node | None:
    """The MatMul (or FusedMatMul) whose output reaches the "logits" output through data-movement ops only."""
    value = next((v for v in graph.outputs if v.name == "logits"), None)
    while value is not None:
        node = value.producer()
        if node is None:
            return None
        if node.op_type in ("MatMul", "FusedMatMul") and node.domain in ("", "ai.onnx", _MS):
            return node
        value = node.inputs[0] if node.op_type in _PASS_THROUGH and node.domain in ("", "ai.onnx") else None
    return None


def _vocab(graph: ir.Graph) -> int | None:
    for v in graph.outputs:
        if v.name == "logits" and v.shape is not None and isinstance(v.shape[-1], int):
            return int(v.shape[-1])
    for node in graph:
        if node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            return int(node.inputs[0].const_value.shape[0])
    return None


class QuantizePass(ReportingPass):
    name = "quantize"

    def __init__(self, options: QuantOptions, debug: bool = False) -> None:
        super().__init__(debug)
        self.options = options

    def run(self, model: ir.Model) -> PassOutcome:
        o, graph = self.options, model.graph
        op = "MatMulNBits" if o.format == "ort" else "DequantizeLinear"
        counts = {op: 0, "skipped_lm_head": 0, "skipped_shape": 0, "bytes_before": 0, "bytes_after": 0}
        why_not: dict[str, list[str]] = {}
        head = _lm_head(graph)
        vocab = _vocab(graph) if head is None else None  # by shape only when the path to logits is not plain
        targets = []
        for node in graph:
            found = _weight(node)
            if found is None:
                continue
            w, nk = found
            k, n = (int(d) for d in w.const_value.shape[::-1 if nk else 1])
            is_head = node is head or (vocab is not None and n == vocab) \
                or any(out in graph.outputs for out in node.outputs)
            if is_head and not o.lm_head:
                counts["skipped_lm_head"] += 1
                continue
            if k < 16 or (o.format == "ort" and o.bits == 4 and k % 2):
                counts["skipped_shape"] += 1
                if self.debug:
                    why_not.setdefault(op, []).append(f"at {node.name}: weight {w.name} [{k}, {n}] too small")
                continue
            targets.append((node, w, nk, o.head_options() if is_head else o))
        if o.format == "ort" and targets:
            model.opset_imports.setdefault(_MS, 1)
        offsets = BlockOffsets(graph)
        for node, w, nk, opts in targets:
            dtype = w.const_value.dtype
            counts["bytes_before"] += w.const_value.nbytes
            w_kn = np.asarray(w.const_value.numpy(), np.float32)
            q = quant.quantize_blockwise(w_kn.T if nk else w_kn, opts.bits, opts.block_size, opts.symmetric,
                                         positive_scales=opts.format == "qdq" or opts is not o, method=opts.method,
                                         float_zero_points=opts.float_zero_points)
            transpose = node.inputs[1].producer() if nk and node.op_type == "MatMul" else None
            if o.format == "ort":
                new_inits = self._ort(graph, node, w, q, dtype, opts, offsets)
            else:
                new_inits = self._qdq(graph, node, w, q, dtype, opts)
            counts["bytes_after"] += sum(v.const_value.nbytes for v in new_inits)
            counts[op] += 1
            if transpose is not None and not transpose.outputs[0].uses():
                graph.remove(transpose, safe=True)
            if not w.uses() and not w.is_graph_output():
                graph.initializers.pop(w.name)
        return PassOutcome(bool(targets), counts, why_not)

    @staticmethod
    def _ort(graph: ir.Graph, node: ir.Node, w: ir.Value, q: quant.Blockwise, dtype: ir.DataType, o: QuantOptions,
             offsets: BlockOffsets) -> list[ir.Value]:
        split = q.zero_points.dtype == np.float32 and o.float_zp_form == "offsets"
        kernel_q, block_offsets = quant.split_offsets(q) if split else (q, None)
        b, scales, zp = quant.matmul_nbits_tensors(kernel_q)
        base = w.name or node.name
        inits = [add_initializer(graph, f"{base}_Q{o.bits}", b, ir.DataType.UINT8),
                 add_initializer(graph, f"{base}_scales", scales.astype(dtype.numpy()), dtype)]
        if zp is not None and zp.dtype == np.float32:  # float zero points: [N * k_blocks] in the scales' type
            inits.append(add_initializer(graph, f"{base}_zero_points", zp.reshape(-1).astype(dtype.numpy()), dtype))
        elif zp is not None:
            inits.append(add_initializer(graph, f"{base}_zero_points", zp, ir.DataType.UINT8))
        attrs = {"K": q.k, "N": int(b.shape[0]), "bits": o.bits, "block_size": o.block_size}
        if o.accuracy_level is not None:
            attrs["accuracy_level"] = o.accuracy_level
        new = ir.node("MatMulNBits", [node.inputs[0], *inits], attrs, domain=_MS, name=f"{node.name}_nbits")
        new.outputs[0].dtype, new.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [new], node.outputs, new.outputs)
        if block_offsets is not None:
            inits += offsets.add(new, block_offsets, o.block_size, base, dtype)
        return inits

    @staticmethod
    def _qdq(graph: ir.Graph, node: ir.Node, w: ir.Value, q: quant.Blockwise, dtype: ir.DataType,
             o: QuantOptions) -> list[ir.Value]:
        codes, scales, zp = quant.qdq_tensors(q)
        base = w.name or node.name
        if o.bits == 4:
            ctype = ir.DataType.INT4 if q.symmetric else ir.DataType.UINT4
            codes = codes.astype(ml_dtypes.int4 if q.symmetric else ml_dtypes.uint4)
            zp = None if zp is None else zp.astype(ml_dtypes.uint4)
        else:
            ctype = ir.DataType.INT8 if q.symmetric else ir.DataType.UINT8
        inits = [add_initializer(graph, f"{base}_q{o.bits}", codes, ctype),
                 add_initializer(graph, f"{base}_scales", scales.astype(dtype.numpy()), dtype)]
        if zp is not None:
            inits.append(add_initializer(graph, f"{base}_zero_points", zp, ctype))
        dq = ir.node("DequantizeLinear", inits, {"axis": 0, "block_size": o.block_size}, name=f"{node.name}_dq")
        dq.outputs[0].name = f"{base}_dq"
        dq.outputs[0].dtype, dq.outputs[0].shape = dtype, ir.Shape([q.k, int(scales.shape[1])])
        mm = ir.node("MatMul", [node.inputs[0], dq.outputs[0]], name=node.name)  # a FusedMatMul(transB) head too
        mm.outputs[0].dtype, mm.outputs[0].shape = node.outputs[0].dtype, node.outputs[0].shape
        ir.convenience.replace_nodes_and_values(graph, node, [node], [dq, mm], node.outputs, mm.outputs)
        return inits
