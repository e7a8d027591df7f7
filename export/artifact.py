"""`decodekit export` as a library function: SOURCE -> artifact folder (manifest + one ONNX file per rank).

The folder is written under a temporary sibling name and renamed into place at the end, so an
interrupted export never leaves a half-written artifact at OUT.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import onnx

from .checkpoint import DTYPES, load_source, source_config
from .config import ConfigError
from .gguf import is_gguf
from .gguf_tokenizer import write_gguf_tokenizer
from .folders import EXTERNAL_DATA_THRESHOLD, ONNX_DTYPES, atomic_folder
from .manifest import Manifest, RankEntry, TensorSpec, file_entry, write_manifest
from .model import Decoder
from .ops import ONNX_OPSET
from .sharding import check_tp, shard
from .tokenizer import copy_tokenizer, write_tiny_tokenizer
from .trace import trace


Progress = Callable[[str], None]


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
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; use one of {', '.join(DTYPES)}")
        if self.logits not in ("all", "last"):
            raise ConfigError(f"--logits must be 'all' or 'last', got {self.logits!r}")
        if self.max_batch < 1 or self.max_seq < 2:
            raise ConfigError("--max-batch must be >= 1 and --max-seq >= 2")


def export_artifact(source: str, out: str | Path, options: ExportOptions = ExportOptions(),
                    progress: Progress = lambda msg: None) -> Manifest:
    out = Path(out)
    started = time.perf_counter()
    config = source_config(source)
    check_tp(config, options.tp)
    if options.max_seq > config.max_position_embeddings:
        raise ConfigError(f"--max-seq {options.max_seq} exceeds the model's max_position_embeddings "
                          f"{config.max_position_embeddings}")
    with atomic_folder(out, options.force) as tmp:
        progress(f"loading {source} ({options.dtype}, {config.num_parameters() / 1e6:.1f}M parameters)")
        model = load_source(source, options.dtype, rope_positions=options.max_seq, seed=options.seed)
        ranks = [_export_rank(model, r, options, tmp, progress) for r in range(options.tp)]
        tokenizer = _tokenizer(source, model, tmp)
        first = onnx.load(str(tmp / ranks[0].onnx.file), load_external_data=False)
        manifest = Manifest(
            config=config, dtype=options.dtype, dialect="std", opset=ONNX_OPSET, tp=options.tp,
            max_batch=options.max_batch, max_seq=options.max_seq, logits=options.logits, ranks=ranks,
            inputs=_specs(first.graph.input), outputs=_specs(first.graph.output),
            kv_layout=kv_layout(model, options), source=source,
            seed=options.seed if source.startswith("preset:") else None,
            tokenizer=[file_entry(tmp, n) for n in tokenizer])
        write_manifest(tmp, manifest)
    progress(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return manifest


def kv_layout(model: Decoder, options: ExportOptions) -> dict:
    c = model.config
    kv_local = max(c.num_kv_heads // options.tp, 1)
    return {"layout": "batch,kv_heads,max_seq,head_dim", "num_layers": c.num_layers, "kv_heads_local": kv_local,
            "head_dim": c.head_dim, "max_seq": options.max_seq, "past": "past_key_values.{i}.key|value",
            "present": "present.{i}.key|value", "in_place": True, "write": "TensorScatter(axis=-2, linear)"}


def _export_rank(model: Decoder, rank: int, options: ExportOptions, folder: Path, progress: Progress) -> RankEntry:
    progress(f"tracing rank {rank + 1}/{options.tp}")
    if options.tp > 1:
        # share every parameter with the full model; shard() replaces only the sliced ones
        model = shard(copy.deepcopy(model, memo={id(p): p for p in model.parameters()}), rank, options.tp)
    program = trace(model, options.max_batch, options.max_seq, options.logits)
    name = f"rank{rank}.onnx"
    external = _weight_bytes(model) > EXTERNAL_DATA_THRESHOLD
    progress(f"writing {name}" + (" with external data" if external else ""))
    program.save(str(folder / name), external_data=external)
    del program
    progress(f"checking {name}")
    onnx.checker.check_model(str(folder / name), full_check=True)
    data = sorted(p.name for p in folder.iterdir() if p.name.startswith(name) and p.name != name)
    return RankEntry(rank, file_entry(folder, name), [file_entry(folder, d) for d in data])


def _weight_bytes(model: Decoder) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _tokenizer(source: str, model: Decoder, folder: Path) -> list[str]:
    if source.startswith("preset:"):
        c = model.config
        return write_tiny_tokenizer(folder, c.vocab_size, c.bos_token_id, c.eos_token_ids) if c.vocab_size <= 4096 else []
    if is_gguf(source):
        return write_gguf_tokenizer(source, folder)
    return copy_tokenizer(Path(source), folder)


def _specs(values) -> list[TensorSpec]:
    return [TensorSpec(v.name, ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                       [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]
