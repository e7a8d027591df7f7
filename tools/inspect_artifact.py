"""What an artifact folder, an ONNX file or a TensorRT engine holds (what `decodekit inspect` prints).

    inspect_path(path) -> InspectReport

Artifact: the manifest summary, graph inputs/outputs, per rank the op histogram, parameter count (floating-point
initializers, rotary tables excluded), collective count and KV-cache memory at max batch and max sequence:

    kv_bytes per rank = 2 (key, value) x layers x max_batch x kv_heads_local x max_seq x head_dim x dtype size

Engines (``rank{r}.engine`` of a built artifact, or a bare ``*.engine`` file): the engine's layer types from the
TensorRT engine inspector when TensorRT / TensorRT-RTX can load the engine here; otherwise (e.g. a TensorRT-RTX
engine on a CPU-only machine) from the layer information `decodekit build` recorded in ``build.log``, and the
report says which source it used and why.

Verification (artifacts): what ``read_manifest``'s checks found (files and checksums, external-data binding,
the manifest's own checksum) is part of the report (``verification``); when it fails, the command prints the
report and then exits 1 with the failure as its one stderr line (``failed_verification``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..dtypes import FLOAT_ONNX_TYPES, dtype, tensor_name
from ..export.manifest import (CHECKSUM, MANIFEST, ArtifactError, Manifest, all_files, bind_external_data,
                               read_manifest, verify_file)

COLLECTIVE_OPS = {"DistCollective", "AllReduce", "AllGather", "ReduceScatter"}
KV_FORMULA = "2 x layers x max_batch x kv_heads_local x max_seq x head_dim x dtype_bytes"


@dataclass(frozen=True)
class GraphInfo:
    rank: int
    file: str
    bytes: int
    nodes: int
    ops: dict[str, int]
    parameters: int
    parameter_bytes: int
    collectives: int
    opset: dict[str, int]


@dataclass(frozen=True)
class EngineInfo:
    rank: int
    file: str
    bytes: int
    layers: int
    layer_types: dict[str, int]
    source: str  # "engine inspector" | "build.log" | "unavailable"
    note: str = ""
    network_layer_types: dict[str, int] = field(default_factory=dict)  # parsed network's LayerTypes (manifest)


@dataclass(frozen=True)
class InspectReport:
    path: str
    kind: str  # "artifact" | "onnx" | "engine"
    manifest: dict[str, Any] | None
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    ranks: list[GraphInfo]
    kv_cache: dict[str, Any] | None
    engines: list[EngineInfo] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ graphs

def _op_name(node: Any) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"


def graph_info(path: Path, rank: int = 0) -> GraphInfo:
    """Op histogram, parameters and collectives of one ONNX file (external data is not loaded)."""
    model = load_graph(path)
    g = model.graph
    rotary = {name for n in g.node if n.op_type == "RotaryEmbedding" for name in n.input[1:]}
    params = nbytes = 0
    for init in g.initializer:
        numel = 1
        for d in init.dims:
            numel *= d
        if init.data_type in FLOAT_ONNX_TYPES and numel > 1 and init.name not in rotary and "rope_" not in init.name:
            params += numel
            nbytes += numel * dtype(init.data_type).itemsize
    ops = Counter(_op_name(n) for n in g.node)
    size = path.stat().st_size + sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p != path)
    return GraphInfo(rank, path.name, size, len(g.node), dict(ops.most_common()), params, nbytes,
                     sum(1 for n in g.node if n.op_type in COLLECTIVE_OPS),
                     {(o.domain or "ai.onnx"): o.version for o in model.opset_import})


def load_graph(path: Path) -> Any:
    """The ONNX ModelProto at path without its external data; an unreadable file is an ArtifactError."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        return onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ArtifactError(f"{path}: not a readable ONNX file ({why}); re-export it or pass an artifact folder, "
                            f"an .onnx file or an .engine file") from None


def _io(values: Any) -> list[dict[str, Any]]:
    out = []
    for v in values:
        t = v.type.tensor_type
        out.append({"name": v.name, "dtype": tensor_name(t.elem_type),
                    "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
    return out


def kv_cache_bytes(m: Manifest) -> dict[str, Any]:
    kv = m.kv_layout
    values = {"layers": int(kv.get("num_layers", m.config.num_layers)), "max_batch": m.max_batch,
              "kv_heads_local": int(kv["kv_heads_local"]), "max_seq": m.max_seq, "head_dim": int(kv["head_dim"]),
              "dtype_bytes": dtype(m.dtype).itemsize}
    per_rank = 2
    for v in values.values():
        per_rank *= v
    return {"bytes_per_rank": per_rank, "bytes_total": per_rank * m.tp, "formula": KV_FORMULA, **values}


def _manifest_summary(m: Manifest) -> dict[str, Any]:
    c = m.config
    return {"format_version": m.format_version, "source": m.source, "family": c.family, "dtype": m.dtype,
            "dialect": m.dialect, "opset": m.opset, "tp": m.tp, "max_batch": m.max_batch, "max_seq": m.max_seq,
            "logits": m.logits, "layers": c.num_layers, "hidden_size": c.hidden_size, "heads": c.num_heads,
            "kv_heads": c.num_kv_heads, "head_dim": c.head_dim, "vocab_size": c.vocab_size,
            "config_parameters": c.num_parameters(), "tokenizer": [f.file for f in m.tokenizer],
            "sliding_window": c.sliding_window,
            "sliding_layers": [i for i in range(c.num_layers) if c.window(i) is not None],
            "passes": m.passes,
            "engines": {k: v for k, v in m.engines.items() if k in ("flavour", "version", "profiles")}}


# ------------------------------------------------------------------------------------------------ engines

def engine_info(path: Path, rank: int = 0, manifest: Manifest | None = None) -> EngineInfo:
    """Layer types of a serialized engine: the engine inspector if it loads here, else build.log's record."""
    layers: list[dict[str, Any]] = []
    source, why = "unavailable", ""
    try:
        from ..graphs.trt import api

        t = api.load()
        layers, source = api.engine_layers(t, path.read_bytes(), api.BuildLog())
        if not layers:
            why = "no CUDA GPU here to deserialize the engine" if api.cuda_device_count() == 0 else \
                f"{t.label} could not deserialize the engine on this machine"
    except ImportError as e:
        why = f"TensorRT modules unavailable ({e})"
    except Exception as e:  # noqa: BLE001 - BackendError (not installed) or a refused engine: fall back to build.log
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
    if not layers:
        recorded = _recorded_layers(path.parent, rank)
        if recorded is not None:
            layers, source = recorded, "build.log"
    note = f"layer list from build.log recorded at build time ({why})" if source == "build.log" else (
        why if not layers else "")
    types = Counter(x.get("LayerType", "") or "?" for x in layers)
    network = {}
    if manifest is not None:
        per_rank = {int(r.get("rank", -1)): r for r in manifest.engines.get("per_rank", [])}
        network = per_rank.get(rank, {}).get("layer_types") or manifest.engines.get("layer_types") or {}
    return EngineInfo(rank, path.name, path.stat().st_size, len(layers), dict(types.most_common()), source, note,
                      dict(network))


def _recorded_layers(folder: Path, rank: int) -> list[dict[str, Any]] | None:
    if not (folder / "build.log").is_file():
        return None
    try:
        from ..graphs.trt.build import read_layer_information

        return read_layer_information(folder).get(rank)
    except (ImportError, ValueError, KeyError, IndexError):
        return None


# ------------------------------------------------------------------------------------------------ entry

def inspect_path(path: str | Path, verify: bool = True) -> InspectReport:
    """Inspect an artifact folder, an ONNX file or a ``*.engine`` file."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"{path}: no such file or folder; pass an artifact folder, an .onnx file or an "
                            f".engine file")
    if path.is_dir():
        return _inspect_artifact(path, verify)
    if path.suffix == ".onnx":
        model = load_graph(path)
        return InspectReport(str(path), "onnx", None, _io(model.graph.input), _io(model.graph.output),
                             [graph_info(path)], None)
    if path.suffix in (".engine", ".plan", ".trt"):
        rank = int(path.stem.removeprefix("rank")) if path.stem.removeprefix("rank").isdigit() else 0
        manifest = _maybe_manifest(path.parent)
        return InspectReport(str(path), "engine", _manifest_summary(manifest) if manifest else None, [], [], [],
                             kv_cache_bytes(manifest) if manifest else None, [engine_info(path, rank, manifest)])
    raise ArtifactError(f"{path}: not an artifact folder, .onnx file or .engine file")


def _maybe_manifest(folder: Path) -> Manifest | None:
    if not (folder / MANIFEST).is_file():
        return None
    try:
        return read_manifest(folder, verify=False)
    except ArtifactError:
        return None


def verification(folder: Path, m: Manifest, verify: bool) -> dict[str, Any]:
    """What the loader's checks find in an artifact folder (never raises for a failed check: reports it)."""
    raw = json.loads((folder / MANIFEST).read_text())
    found: dict[str, Any] = {"checked": verify, "passed": None, "error": None, "files": len(all_files(m)),
                             "bytes": sum(f.bytes for f in all_files(m)), "external_data": [],
                             "manifest_checksum": "ok" if CHECKSUM in raw else "absent (written by an older "
                                                                                 "decodekit; not checked)"}
    if not verify:
        return found
    try:
        for entry in all_files(m):
            verify_file(folder, entry)
        found["external_data"] = sorted({loc for r in m.ranks for loc in bind_external_data(folder, r)})
        found["passed"] = True
    except ArtifactError as e:
        found.update(passed=False, error=str(e))
    return found


def failed_verification(report: InspectReport) -> str | None:
    """The one-line failure of a verified artifact's report, or None."""
    return report.verification.get("error") if report.verification.get("passed") is False else None


def _inspect_artifact(folder: Path, verify: bool) -> InspectReport:
    m = read_manifest(folder, verify=False)  # format, version and the manifest's own checksum
    checks = verification(folder, m, verify)
    notes = [] if verify else ["checksums not verified (--no-verify): file contents and external-data locations "
                               "unchecked"]
    if checks["passed"] is False:  # do not parse files that failed their checks: report the manifest only
        return InspectReport(str(folder), "artifact", _manifest_summary(m), [], [], [], kv_cache_bytes(m), [],
                             notes, checks)
    ranks = [graph_info(m.rank_file(folder, r.rank), r.rank) for r in m.ranks]
    first = load_graph(m.rank_file(folder))
    engines = [engine_info(folder / r.engine.file, r.rank, m) for r in m.ranks if r.engine is not None]
    if ranks and m.tp == 1 and ranks[0].parameters != m.config.num_parameters():
        notes.append(f"parameters counted from initializers ({ranks[0].parameters:,}) differ from the config's "
                     f"({m.config.num_parameters():,}): tied / fused / quantized weights or graph constants")
    return InspectReport(str(folder), "artifact", _manifest_summary(m), _io(first.graph.input), _io(first.graph.output),
                         ranks, kv_cache_bytes(m), engines, notes, checks)


# ------------------------------------------------------------------------------------------------ text

def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def format_inspect(r: InspectReport) -> str:
    lines = [f"{r.kind} {r.path}"]
    if r.manifest:
        m = r.manifest
        lines.append(f"  model: {m['family']} (source {m['source'] or '?'}), {m['layers']} layers, hidden "
                     f"{m['hidden_size']}, heads {m['heads']}/{m['kv_heads']} kv, head_dim {m['head_dim']}, "
                     f"vocab {m['vocab_size']}, {m['config_parameters']:,} parameters (config)")
        if m.get("sliding_layers"):
            lines.append(f"  attention: sliding window of {m['sliding_window']} tokens on layers "
                         f"{', '.join(map(str, m['sliding_layers']))}; full attention on the others")
        lines.append(f"  artifact: format v{m['format_version']}, {m['dtype']}, dialect {m['dialect']}, opset "
                     f"{m['opset']}, tp {m['tp']}, max_batch {m['max_batch']}, max_seq {m['max_seq']}, "
                     f"logits {m['logits']}, tokenizer {', '.join(m['tokenizer']) or 'none'}")
        if m["passes"]:
            lines.append("  passes: " + ", ".join(str(p.get("name", p)) if isinstance(p, dict) else str(p)
                                                  for p in m["passes"]))
    for title, values in (("inputs", r.inputs), ("outputs", r.outputs)):
        if values:
            shown = values if len(values) <= 8 else values[:6] + [{"name": f"... ({len(values) - 6} more)"}]
            lines.append(f"  {title}:")
            lines += [f"    {v['name']}" + (f"  {v['dtype']} {v['shape']}" if "dtype" in v else "") for v in shown]
    for g in r.ranks:
        lines.append(f"  rank {g.rank}: {g.file} ({_mib(g.bytes)}), {g.nodes} nodes, {g.parameters:,} parameters "
                     f"({_mib(g.parameter_bytes)}), {g.collectives} collectives")
        lines.append("    ops: " + ", ".join(f"{k} {v}" for k, v in g.ops.items()))
    if r.kv_cache:
        kv = r.kv_cache
        lines.append(f"  KV cache at max batch and max seq: {_mib(kv['bytes_per_rank'])} per rank "
                     f"({kv['bytes_per_rank']:,} bytes = 2 x {kv['layers']} x {kv['max_batch']} x "
                     f"{kv['kv_heads_local']} x {kv['max_seq']} x {kv['head_dim']} x {kv['dtype_bytes']})")
    for e in r.engines:
        lines.append(f"  engine rank {e.rank}: {e.file} ({_mib(e.bytes)}), {e.layers} layers (from {e.source})")
        if e.layer_types:
            lines.append("    engine layer types: " + ", ".join(f"{k} {v}" for k, v in e.layer_types.items()))
        if e.network_layer_types:
            lines.append("    network layer types (parsed ONNX): "
                         + ", ".join(f"{k} {v}" for k, v in e.network_layer_types.items()))
        if e.note:
            lines.append(f"    note: {e.note}")
    if r.verification:
        lines.append(f"  verification: {_verification_line(r.verification)}")
    lines += [f"  note: {n}" for n in r.notes]
    return "\n".join(lines)


def _verification_line(v: dict[str, Any]) -> str:
    checksum = f"manifest checksum {v['manifest_checksum']}"
    if not v["checked"]:
        return f"skipped (--no-verify); {checksum}"
    if not v["passed"]:
        return f"FAILED: {v['error']}"
    data = ", ".join(v["external_data"]) or "none"
    return f"passed: {v['files']} files ({_mib(v['bytes'])}) match their sha256; external data: {data}; {checksum}"
