"""Where each ONNX initializer's bytes come from, and the per-rank stream of those bytes.

The step graph is traced on a template model (export/template.py: a few layers of the real shapes, weights that
are zero pages but for a few distinct values each), so its initializers hold the template's values.
``bind_weights`` finds, by value, which template parameter (as stored, or transposed: torch.onnx folds the
Linear's weight transpose) each initializer is, renames it ``model.{param}`` or ``model.{param}.T`` and takes it
out of the graph: it becomes a weight reference that the writer (export/onnx_writer.py) fills from the real source. The rotary tables and shape constants stay.

``rank_weights`` then yields, per rank, each weight reference with its tensor, read from the source one layer at
a time and sliced for tensor parallelism by export/sharding.py's own rules (a layer of the source is read once
for all ranks); nothing else of the model is ever materialized.
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Protocol, TypeVar

import numpy as np
import onnx
import torch

from ..dtypes import DTYPES, from_safetensors, precision
from .checkpoint import (CheckpointError, _safetensors_files, from_checkpoint, fused_tensors, hf_name_map,
                         random_parameters)
from .config import ModelConfig
from .model import Decoder, DecoderLayer
from .sharding import shard
from .meta import meta_device

if TYPE_CHECKING:  # annotations only: onnx_ir loads with the tracer, not on a trace-cache hit
    import onnx_ir as ir

_LAYER_PARAM = re.compile(r"^layers\.(\d+)\.(.+)$")
TRANSPOSED = ".T"


@dataclass(frozen=True)
class WeightRef:
    """An initializer filled by the writer: `name` in the graph = `param` (transposed when `transpose`)."""

    name: str
    param: str
    transpose: bool

    @property
    def layer(self) -> int | None:
        m = _LAYER_PARAM.match(self.param)
        return int(m.group(1)) if m else None


def weight_name(param: str, transpose: bool) -> str:
    return f"model.{param}{TRANSPOSED if transpose else ''}"


def parse_weight_name(name: str) -> WeightRef:
    param = name.removeprefix("model.")
    transpose = param.endswith(TRANSPOSED)
    return WeightRef(name, param.removesuffix(TRANSPOSED) if transpose else param, transpose)


def bind_weights(model: ir.Model, template: Decoder) -> list[WeightRef]:
    """Turn every initializer equal to a template parameter (or its transpose) into a weight reference."""
    params = dict(template.named_parameters())
    index: dict[tuple, list[tuple[str, bool]]] = {}
    for param, p in params.items():
        for transpose in ((False, True) if p.ndim == 2 else (False,)):
            x = p.detach().t() if transpose else p.detach()
            index.setdefault(_fingerprint(x), []).append((param, transpose))
    refs = []
    for value in list(model.graph.initializers.values()):
        data = value.const_value.numpy()
        found = index.get(_fingerprint(data), [])
        match = [(p, t) for p, t in found if _same(params[p].detach(), t, data)]
        if not match:
            continue  # rotary tables, shape constants: not weights
        if len(match) > 1:
            raise RuntimeError(f"template initializer {value.name} equals several parameters {match}; "
                               f"the template weights must be distinct")
        param, transpose = match[0]
        model.graph.initializers.pop(value.name)
        value.const_value = None
        value.name = weight_name(param, transpose)
        refs.append(parse_weight_name(value.name))
    return refs


_BITS = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}


def _fingerprint(x: torch.Tensor | np.ndarray) -> tuple:
    """Shape, element size and a few elements' bit patterns from both ends: cheap, unique for random weights."""
    size = x.element_size() if isinstance(x, torch.Tensor) else x.dtype.itemsize
    shape = tuple(x.shape)
    if not shape:
        return shape, size
    ends = [x[(0,) * (len(shape) - 1)][:8], x[(-1,) * (len(shape) - 1)][-8:]]
    if isinstance(x, torch.Tensor):
        bits = [tuple(e.contiguous().view(_BITS[size][0]).tolist()) for e in ends]
    else:
        bits = [tuple(np.ascontiguousarray(e).view(_BITS[size][1]).tolist()) for e in ends]
    return shape, size, *bits


def _same(p: torch.Tensor, transpose: bool, data: np.ndarray) -> bool:
    """Bit-for-bit equality of p (or p.T) and data, through views (no copy of either)."""
    torch_bits, np_bits = _BITS[p.element_size()]
    x = (p.t() if transpose else p).view(torch_bits)
    return tuple(x.shape) == data.shape and torch.equal(x, torch.from_numpy(data.view(np_bits)))


@dataclass(frozen=True)
class WeightSpec:
    """A weight reference as the graph declares it: shape and ONNX element type."""

    ref: WeightRef
    shape: tuple[int, ...]
    elem_type: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * onnx.helper.tensor_dtype_to_np_dtype(self.elem_type).itemsize


def weight_specs(graph: ir.Graph) -> list[WeightSpec]:
    """The weight references of a graph, in first-use order: values read by nodes that nothing defines."""
    defined = {v.name for v in graph.inputs} | set(graph.initializers)
    seen: dict[str, WeightSpec] = {}
    for node in graph:
        for v in node.inputs:
            if v is not None and v.producer() is None and v.name not in defined and v.name not in seen:
                seen[v.name] = WeightSpec(parse_weight_name(v.name), tuple(int(d) for d in v.shape), int(v.dtype))
    return list(seen.values())


class WeightSource(Protocol):
    """Full (unsharded) parameters by decodekit name, in the export dtype."""

    def get(self, param: str) -> torch.Tensor: ...


class PresetWeights:
    """preset:NAME's random weights, drawn one tensor at a time exactly as checkpoint.random_model draws them.

    Draws are sequential: asking for a later parameter draws (and keeps) the ones before it until asked for."""

    def __init__(self, config: ModelConfig, dtype: str, seed: int) -> None:
        self._draws = random_parameters(config, dtype, seed)
        self._pending: dict[str, torch.Tensor] = {}

    def get(self, param: str) -> torch.Tensor:
        while param not in self._pending:
            name, t = next(self._draws)
            self._pending[name] = t
        return self._pending.pop(param)


class SafetensorsWeights:
    """A Hugging Face folder read tensor by tensor with plain reads (no memory map: the pages of a mapped
    checkpoint would count in the exporter's resident memory until the end), converted to the export dtype.

    A fused tensor (Phi-3's qkv_proj, gate_up_proj: checkpoint.fused_tensors) is read once and its rows handed out
    as the parameters it holds (the last one read is kept until another is asked for)."""

    def __init__(self, folder: Path, config: ModelConfig, dtype: str) -> None:
        self.config, self.dtype = config, precision(dtype).torch
        with meta_device():
            self.shapes = {n: tuple(p.shape) for n, p in Decoder(config).named_parameters()}
        expected, self.fused = hf_name_map(config), fused_tensors(config)
        self.where: dict[str, tuple[Path, str, dict]] = {}
        self._last: tuple[str, torch.Tensor] | None = None
        extra = []
        for path in _safetensors_files(folder):
            for hf, entry in _safetensors_header(path).items():
                if hf in expected:
                    self.where[expected[hf]] = (path, hf, entry)
                elif hf in self.fused:
                    self.where.update({param: (path, hf, entry) for param, _ in self.fused[hf].parts})
                elif not (config.tie_word_embeddings and hf == "lm_head.weight"):
                    extra.append(hf)
        wanted = [(hf, me) for hf, me in expected.items()] + [(hf, f.parts[0][0]) for hf, f in self.fused.items()]
        missing = sorted(hf for hf, me in wanted if me not in self.where)
        if missing or extra:
            parts = ([f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})"] if missing else []) + \
                    ([f"unexpected {len(extra)} tensors (e.g. {', '.join(sorted(extra)[:3])})"] if extra else [])
            raise CheckpointError(f"{folder}: not a {config.family} checkpoint matching its config.json: "
                                  + "; ".join(parts))

    def get(self, param: str) -> torch.Tensor:
        path, hf, entry = self.where[param]
        fused = self.fused.get(hf)
        if fused is None:
            return from_checkpoint(self.config, param, self._read(path, hf, entry, self.shapes[param]), self.dtype)
        if self._last is None or self._last[0] != hf:
            self._last = None  # free the previous fused tensor before reading the next one
            self._last = hf, self._read(path, hf, entry, (fused.rows, *self.shapes[param][1:])).to(self.dtype)
        return self._last[1][fused.rows_of(param)].clone()

    def _read(self, path: Path, hf: str, entry: dict, want: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(entry["shape"])
        if shape != want:
            raise CheckpointError(f"{hf}: expected shape {want} from config.json, found {shape}")
        start, end = entry["data_offsets"]
        raw = torch.empty(end - start, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(entry["base"] + start)
            if f.readinto(memoryview(raw.numpy())) != end - start:
                raise CheckpointError(f"{path}: truncated while reading {hf}")
        return raw.view(from_safetensors(entry["dtype"]).torch).reshape(shape)  # the checkpoint's own dtype


def _safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets, base} from a .safetensors file's JSON header (the format's spec:
    an 8-byte little-endian header length, the header, then the tensors' bytes at base + offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise CheckpointError(f"{path}: not a safetensors file (unreadable header)") from None
    header.pop("__metadata__", None)
    for name, entry in header.items():
        kind = from_safetensors(entry.get("dtype", ""))
        if kind is None or not kind.is_float:
            raise CheckpointError(f"{path}: {name} has dtype {entry.get('dtype')}; expected a float checkpoint "
                                  f"({', '.join(d.safetensors for d in DTYPES if d.is_float)})")
        entry["base"] = 8 + size
    return header


def open_source(source: str, config: ModelConfig, dtype: str, seed: int) -> WeightSource:
    if source.startswith("preset:"):
        return PresetWeights(config, dtype, seed)
    from .gguf import GgufWeights, is_gguf

    if is_gguf(source):
        return GgufWeights(source, config, dtype)
    return SafetensorsWeights(Path(source), config, dtype)


def rank_weights(refs: list[WeightRef], source: WeightSource, config: ModelConfig, tp: int
                 ) -> Iterator[tuple[WeightRef, list[torch.Tensor]]]:
    """Each weight reference with its tensor for every rank (index = rank), in the model's parameter order.

    Each source tensor is read once (a layer at a time under tensor parallelism, sliced for all ranks)."""
    with meta_device():
        order = {name: i for i, (name, _) in enumerate(Decoder(config).named_parameters())}
    groups: list[tuple[int | None, list[WeightRef]]] = []
    for r in sorted(refs, key=lambda r: (order[r.param], r.transpose)):
        layer = r.layer if tp > 1 else None
        if groups and groups[-1][0] == layer and (layer is not None or groups[-1][1][-1].param == r.param):
            groups[-1][1].append(r)
        else:
            groups.append((layer, [r]))
    for layer, group in groups:
        if layer is None:  # one parameter, replicated on every rank (or tp=1)
            t = source.get(group[0].param)
            for r in group:
                yield r, [_as_stored(t, r.transpose)] * tp
            continue
        ranks = _sharded_layer(source, config, layer, tp)
        for r in group:
            name = _LAYER_PARAM.match(r.param).group(2)
            yield r, [_as_stored(params[name], r.transpose) for params in ranks]


T = TypeVar("T")
_END = object()


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """`items`, produced by a background thread at most `depth` items ahead of the consumer.

    The export streams weights: reading, converting and transposing the next tensor (file reads and torch
    kernels release the GIL) overlaps writing and hashing the current one. `depth` bounds the extra memory to
    that many tensors. An exception in the producer is raised in the consumer; a consumer that stops early
    stops the producer at its next item."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_END, None))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put((_END, e))

    thread = threading.Thread(target=produce, name="decodekit-weight-reader", daemon=True)
    thread.start()
    try:
        while True:
            item, error = q.get()
            if item is _END:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue, then let it see `stop`
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


def _as_stored(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    return (t.t() if transpose else t).contiguous()


def _sharded_layer(source: WeightSource, config: ModelConfig, i: int, tp: int) -> list[dict[str, torch.Tensor]]:
    """Layer i's parameters for every rank, sliced by export/sharding.py (applied to this one layer)."""
    with meta_device():
        names = [n for n, _ in DecoderLayer(config).named_parameters()]
    full = {n: source.get(f"layers.{i}.{n}") for n in names}
    ranks = []
    for rank in range(tp):
        with meta_device():
            holder = Decoder(_one_layer(config))
        holder.layers[0].load_state_dict(full, assign=True, strict=True)
        shard(holder, rank, tp)
        ranks.append({n: p.detach() for n, p in holder.layers[0].named_parameters()})
    return ranks


def _one_layer(config: ModelConfig) -> ModelConfig:
    return config.select_layers([0])
