"""The model the exporter traces: a few layers of the real shapes whose weight memory is never written.

Tracing only needs the weights' shapes and dtypes; what export/weights.py ``bind_weights`` needs on top is that
every weight tells itself apart from the others (it finds initializers by value: a fingerprint of a few elements
at both ends of the tensor and of its transpose, then an exact comparison). So each large parameter lives in
fresh private anonymous memory (``mmap(MAP_PRIVATE)``: reads map the kernel's zero page, which RSS does not
count, until a page is written; Python's default MAP_SHARED would be shared memory, whose reads allocate)
and only its fingerprint elements get random values: a few pages per tensor are touched, not the tensor.
Small parameters (norms, biases) are filled whole, which costs nothing.

The template is built on the meta device, cast and sliced to rank 0 there (export/sharding.py), and only then
given memory, so neither the cast nor the slicing materializes a full-size copy.
"""

from __future__ import annotations

import math
import mmap

import torch
from torch import nn

from ..dtypes import precision
from .config import ModelConfig
from .meta import meta_device
from .model import Decoder
from .sharding import shard

SMALL_BYTES = 64 << 10  # parameters below this are filled whole: their pages would be touched by any marking
ENDS = 8  # elements at each end that export/weights.py's _fingerprint reads


def template_model(config: ModelConfig, layers: int | list[int], dtype: str, rope_positions: int, tp: int
                   ) -> Decoder:
    """The model to trace: config's first `layers` layers (or those listed: their kinds, window and RoPE) with
    the real shapes of rank 0, distinct weight fingerprints and untouched weight memory (module docstring)."""
    chosen = list(range(layers)) if isinstance(layers, int) else layers
    with meta_device():
        model = Decoder(config.select_layers(chosen), rope_positions)
    model = model.to(precision(dtype).torch).eval()
    if tp > 1:
        shard(model, 0, tp)
    _materialize_untouched(model)
    model.reset_rope_tables()
    gen = torch.Generator().manual_seed(0x5EED)
    with torch.no_grad():
        for p in model.parameters():
            _mark(p, gen)
    return model


def untouched(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Zeros in fresh private anonymous memory: no page is resident until written (reading maps the zero page)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE), dtype=dtype).view(shape)


def _materialize_untouched(model: nn.Module) -> None:
    """Give every meta parameter (tied ones once) untouched CPU memory, every meta buffer empty CPU memory."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in made:
                made[id(p)] = nn.Parameter(untouched(tuple(p.shape), p.dtype))
            setattr(module, name, made[id(p)])
        for name, b in list(module.named_buffers(recurse=False)):
            if b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype)


def _mark(p: torch.Tensor, gen: torch.Generator) -> None:
    """Random values where a fingerprint looks (the ends of the first and last row, and of the first and last
    column: the transpose's rows); the whole tensor when small or not 1-D/2-D."""
    if p.numel() * p.element_size() < SMALL_BYTES or p.ndim not in (1, 2):
        p.uniform_(-1.0, 1.0, generator=gen)
        return
    if p.ndim == 1:
        ends = [p[:ENDS], p[-ENDS:]]
    else:
        ends = [p[0, :ENDS], p[-1, -ENDS:], p[:ENDS, 0], p[-ENDS:, -1]]
    for e in ends:
        e.uniform_(-1.0, 1.0, generator=gen)
