"""`decodekit export` as a library function: SOURCE -> artifact folder (manifest + one ONNX file per rank).

The folder is written under a temporary sibling name and renamed into place at the end, so an
interrupted export never leaves a half-written artifact at OUT.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import onnx
import torch

from ..dtypes import precision, tensor_name
from . import verify_cache
from .checkpoint import source_accounting, source_config
from .config import ConfigError, ModelConfig
from .gguf import is_gguf
from .gguf_tokenizer import write_gguf_tokenizer
from .folders import EXTERNAL_DATA_THRESHOLD, atomic_folder
from .manifest import STD_CAPABILITIES, Manifest, RankEntry, TensorSpec, file_entry, write_manifest
from .onnx_writer import OnnxWriter
from .rope import static_table_note
from .ops import ONNX_OPSET
from .sharding import check_tp
from .tokenizer import copy_tokenizer, write_tiny_tokenizer
from .trace_cache import cached_step_graph
from .template import template_model
from .weights import (WeightSource, WeightSpec, bind_weights, open_source, prefetched, rank_weights,
                      weight_specs)

if TYPE_CHECKING:  # onnx_ir, torch.onnx and graphs/ load when a trace is needed, not on a trace-cache hit
    import onnx_ir as ir


Progress = Callable[[str], None]
Written = Callable[[int, int], None]


@dataclass(frozen=True)
class ExportOptions:
    tp: int = 1
    dtype: str = "fp32"
    max_batch: int = 8
    max_seq: int = 256
    logits: str = "all"
    force: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        precision(self.dtype)  # an unsupported dtype is refused in one line
        if self.logits not in ("all", "last"):
            raise ConfigError(f"--logits must be 'all' or 'last', got {self.logits!r}")
        if self.max_batch < 1 or self.max_seq < 2:
            raise ConfigError("--max-batch must be >= 1 and --max-seq >= 2")


def export_artifact(source: str, out: str | Path, options: ExportOptions = ExportOptions(),
                    progress: Progress = lambda msg: None, written: Written = lambda done, total: None) -> Manifest:
    """Export SOURCE to an artifact folder at OUT; `progress` gets one message per phase, `written` the bytes
    of weights written so far (all ranks) and their total."""
    out = Path(out)
    started = time.perf_counter()
    config = source_config(source)
    check_tp(config, options.tp)
    config.check_max_seq(options.max_seq)
    if (note := static_table_note(config, options.max_seq)) is not None:
        progress(note)
    fields = source_accounting(source)
    if fields is not None and (fields.ignored or fields.unknown):
        progress(f"config.json fields ignored (no effect on inference math): {', '.join(fields.ignored) or 'none'}; "
                 f"unknown to decodekit and to transformers' {config.family} config: "
                 f"{', '.join(fields.unknown) or 'none'}")
    with atomic_folder(out, options.force, keep=[source]) as tmp:
        progress(f"loading {source} ({options.dtype}, {config.num_parameters() / 1e6:.1f}M parameters)")
        weights = open_source(source, config, options.dtype, options.seed)
        skeleton, specs = cached_step_graph(config, options, lambda: step_graph(config, options, progress), progress)
        ranks = _write_ranks(skeleton, specs, weights, config, options, tmp, progress, written)
        tokenizer = _tokenizer(source, config, tmp)
        manifest = Manifest(
            config=config, dtype=options.dtype, dialect="std", opset=ONNX_OPSET, tp=options.tp,
            max_batch=options.max_batch, max_seq=options.max_seq, logits=options.logits, ranks=ranks,
            inputs=_specs(skeleton.graph.input), outputs=_specs(skeleton.graph.output),
            kv_layout=kv_layout(config, options), source=source,
            seed=options.seed if source.startswith("preset:") else None,
            tokenizer=[file_entry(tmp, n) for n in tokenizer], capabilities=dict(STD_CAPABILITIES),
            config_fields=fields.to_dict() if fields is not None else {})
        write_manifest(tmp, manifest)
    for rank in ranks:  # hashed while written: later opens of this artifact need not hash them again
        for entry in [rank.onnx, *rank.external_data]:
            verify_cache.remember(out / entry.file, entry.sha256)
    progress(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return manifest


def step_graph(config: ModelConfig, options: ExportOptions, progress: Progress = lambda msg: None
               ) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    """The step graph of rank 0 without its weights (weight references named ``model.{param}[.T]``).

    The block is traced once: a template of at most TEMPLATE_LAYERS layers goes through torch.onnx, the other
    layers are copies of its last one (graphs/replicate.py), each reading the mask and RoPE tables of its own
    kind (sliding window or not, local or global RoPE). Every rank has this graph; only weights differ.
    Should the traced graph not show the repeated block (a torch.onnx without module-scope metadata), or the
    layers have more kinds than a template shows, all layers are traced instead."""
    from ..graphs.replicate import LayerStructureError, replicate_layers, template_layers

    L = config.num_layers
    kinds = [config.layer_kind(i, options.max_seq) for i in range(L)]
    chosen = template_layers(kinds)
    if chosen is None:
        progress(f"tracing all {L} layers (more than two kinds of layers)")
        return _serialized(_traced(config, options, list(range(L))))
    progress(f"tracing rank 1/{options.tp} ({len(chosen)} of {L} layers traced, the others replicated)")
    model = _traced(config, options, chosen)
    if L > len(chosen):
        try:
            replicate_layers(model, L, kinds, [kinds[i] for i in chosen])
        except LayerStructureError as e:
            progress(f"cannot replicate the traced block ({e}); tracing all {L} layers")
            model = _traced(config, options, list(range(L)))
    return _serialized(model)


def _serialized(model: ir.Model) -> tuple[onnx.ModelProto, list[WeightSpec]]:
    from onnx_ir import serde as ir_serde

    return ir_serde.serialize_model(model), weight_specs(model.graph)


def _traced(config: ModelConfig, options: ExportOptions, layers: list[int]) -> ir.Model:
    """A trace of config's `layers` (named layers 0..n-1) with distinct untouched weights (export/template.py),
    its initializers bound to parameter names."""
    from .trace import trace

    template = template_model(config, layers, options.dtype, options.max_seq, options.tp)
    program = trace(template, options.max_batch, options.max_seq, options.logits)
    model = program.model
    bind_weights(model, template)
    for p in template.parameters():  # torch keeps references to the traced parameters: free their storage
        p.data = torch.empty(0, dtype=p.dtype)
    return model


def _write_ranks(skeleton: onnx.ModelProto, specs: list[WeightSpec], weights: WeightSource, config: ModelConfig,
                 options: ExportOptions, folder: Path, progress: Progress, written: Written) -> list[RankEntry]:
    shapes = {s.ref.name: s.shape for s in specs}
    external = sum(s.nbytes for s in specs) > EXTERNAL_DATA_THRESHOLD
    progress("checking the graph")
    onnx.checker.check_model(_checkable(skeleton, specs), full_check=True)
    names = [f"rank{r}.onnx" for r in range(options.tp)]
    progress(f"writing {', '.join(names)}" + (" with external data" if external else ""))
    writers = [OnnxWriter(folder / n, skeleton, external) for n in names]
    total = sum(s.nbytes for s in specs) * options.tp
    written(0, total)
    try:
        for ref, tensors in prefetched(rank_weights([s.ref for s in specs], weights, config, options.tp)):
            for w, t in zip(writers, tensors):
                if tuple(t.shape) != shapes[ref.name]:
                    raise RuntimeError(f"{ref.name}: traced shape {shapes[ref.name]}, weight {tuple(t.shape)}")
                w.add(ref.name, t)
            written(sum(w.written for w in writers), total)
    except BaseException:
        for w in writers:
            w.abort()
        raise
    entries = [w.close() for w in writers]
    return [RankEntry(r, onnx_entry, data) for r, (onnx_entry, data) in enumerate(entries)]


def _checkable(skeleton: onnx.ModelProto, specs: list[WeightSpec]) -> onnx.ModelProto:
    """The skeleton with its weights as graph inputs: the checker validates nodes, types and shapes without data."""
    model = onnx.ModelProto()
    model.CopyFrom(skeleton)
    model.graph.input.extend(onnx.helper.make_tensor_value_info(s.ref.name, s.elem_type, s.shape) for s in specs)
    return model


def kv_layout(config: ModelConfig, options: ExportOptions) -> dict:
    c = config
    kv_local = max(c.num_kv_heads // options.tp, 1)
    return {"layout": "batch,kv_heads,max_seq,head_dim", "num_layers": c.num_layers, "kv_heads_local": kv_local,
            "head_dim": c.head_dim, "max_seq": options.max_seq, "past": "past_key_values.{i}.key|value",
            "present": "present.{i}.key|value", "in_place": True, "write": "TensorScatter(axis=-2, linear)"}


def _tokenizer(source: str, config: ModelConfig, folder: Path) -> list[str]:
    if source.startswith("preset:"):
        c = config
        return write_tiny_tokenizer(folder, c.vocab_size, c.bos_token_id, c.eos_token_ids) if c.vocab_size <= 4096 else []
    if is_gguf(source):
        return write_gguf_tokenizer(source, folder)
    return copy_tokenizer(Path(source), folder)


def _specs(values) -> list[TensorSpec]:
    return [TensorSpec(v.name, tensor_name(v.type.tensor_type.elem_type),
                       [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
