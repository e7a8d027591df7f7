"""The per-block offset term of a float-zero-point grid, added beside an integer MatMulNBits (used by quantize).

A block grid w = lo_b + scale_b * code (a llama.cpp Q4_1 block, or any asymmetric [min, max] grid) is, in
MatMulNBits, either a float zero_points input -- which onnxruntime 1.32's CPU kernel runs on a slow path (B
dequantized to float at every call) -- or, exactly, the integer kernel plus a small dense term
(graphs/quant.py ``split_offsets``):

    y = MatMulNBits(x, codes, scales)                  zero point 2^(bits-1): the packed integer kernels
      + MatMul(MatMul(x, S), offsets)                  S [K, k_blocks] 0/1: x summed over each block;
                                                       offsets [k_blocks, N]: (2^(bits-1) - zp) * scale

The offset MatMul is 1/block of the original's size and in the activation type, so the sum is the float-zero-point
result to float rounding, at every accuracy_level (int8 activations touch only the kernel's part). MatMul(x, S)
works for any rank and a K that is not a multiple of the block; it is made once per activation (q/k/v read one)
and S once per (K, block, dtype).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .. import quant
from .base import add_initializer


class BlockOffsets:
    """Emits the offset term for the MatMulNBits nodes of one graph, sharing block sums and indicator matrices."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._indicators: dict[tuple[int, int, ir.DataType], ir.Value] = {}
        self._sums: dict[tuple[int, int], ir.Value] = {}

    def _block_sums(self, x: ir.Value, k: int, block: int, dtype: ir.DataType, before: ir.Node) -> ir.Value:
        key = (id(x), block)
        if key not in self._sums:
            ikey = (k, block, dtype)
            if ikey not in self._indicators:
                self._indicators[ikey] = add_initializer(self.graph, f"block_indicator_k{k}_b{block}",
                                                         quant.block_indicator(k, block).astype(dtype.numpy()), dtype)
            node = ir.node("MatMul", [x, self._indicators[ikey]], name=f"{before.name}_block_sums")
            node.outputs[0].name = f"{before.name}_block_sums"
            node.outputs[0].dtype = dtype
            self.graph.insert_before(before, node)
            self._sums[key] = node.outputs[0]
        return self._sums[key]

    def add(self, kernel: ir.Node, offsets: np.ndarray, block: int, name: str, dtype: ir.DataType) -> list[ir.Value]:
        """Make what read `kernel`'s output read kernel + block_sums(x) @ offsets (offsets and block sums in
        `dtype`, the activations' type); returns the new initializers."""
        x, y = kernel.inputs[0], kernel.outputs[0]
        k = kernel.attributes["K"].as_int()
        uses = list(y.uses())
        made = len(self._indicators)
        sums = self._block_sums(x, k, block, dtype, kernel)
        m = add_initializer(self.graph, f"{name}_block_offsets", offsets.astype(dtype.numpy()), dtype)
        term = ir.node("MatMul", [sums, m], name=f"{kernel.name}_offset_term")
        add = ir.node("Add", [y, term.outputs[0]], name=f"{kernel.name}_plus_offsets")
        for node in (term, add):
            node.outputs[0].dtype, node.outputs[0].shape = dtype, y.shape
            node.outputs[0].name = node.name
        for use, index in uses:
            use.replace_input_with(index, add.outputs[0])
        if y.is_graph_output():  # the Add takes over the output and its name
            outputs = self.graph.outputs
            outputs[outputs.index(y)] = add.outputs[0]
            name_, y.name = y.name, f"{kernel.name}_kernel_out"
            add.outputs[0].name = name_
        self.graph.insert_after(kernel, [term, add])
        return [m] + ([self._indicators[(k, block, dtype)]] if len(self._indicators) > made else [])
