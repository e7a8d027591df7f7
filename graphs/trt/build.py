"""`decodekit build` as a library function: artifact (ONNX per rank) -> NEW artifact folder with one engine per rank.

    build_engines(artifact, out, BuildOptions(opt_seq=64)) -> Manifest

The output folder holds a copy of the input artifact's files, ``rank{r}.engine``, ``build.log`` (TensorRT's build
log and each engine's layer information as the engine inspector reports it: JSON with layer names, types and the
ONNX nodes each layer came from) and a manifest whose ``ranks[r].engine`` carries the engine's sha256 and whose
``engines`` records the flavour, version, profiles, build time and layer-type counts. It is written under a
temporary name and renamed into place, so a failed build leaves nothing at OUT.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import onnx

from ...export.folders import atomic_folder
from ...export.config import ConfigError
from ...export.manifest import Manifest, file_entry, read_manifest, write_manifest
from ...export.user_cache import cache_dir
from ...errors import EngineBuildError  # noqa: F401 - re-exported
from . import api
from .profiles import PROFILE_SETS, Profile, add_profiles, plan_profiles

Progress = Callable[[str], None]
BUILD_LOG = "build.log"
BACKENDS = ("tensorrt",)
# ONNX ops that TensorRT imports as dedicated layers, and the LayerType each becomes
KEY_OPS = {"TensorScatter": "KV_CACHE_UPDATE", "Attention": "ATTENTION", "DistCollective": "DIST_COLLECTIVE",
           "RMSNormalization": "NORMALIZATION", "RotaryEmbedding": "ROTARY_EMBEDDING"}
_BEGIN, _END = "-- begin layer information: rank ", "-- end layer information: rank "
# a fragment of TensorRT's parser message -> the decodekit step that avoids the op
PARSER_FIXES = {"softcap": "build from `decodekit optimize ARTIFACT -o OUT --dialect trt` (soft-capped attention as "
                           "MatMul/Tanh/Softmax)"}


@dataclass(frozen=True)
class BuildOptions:
    backend: str = "tensorrt"
    opt_seq: int | None = None  # prefill profile's optimal seq; None: min(128, max_seq)
    opt_batch: int = 1
    max_batch: int | None = None  # None: the artifact's max_batch
    profiles: str = "split"  # "split": decode (seq=1) + prefill (seq 1..max_seq); "single": one profile
    timing_cache: str | Path | None = None  # None: ~/.cache/decodekit/timing-<flavour>-<version>.cache (full TensorRT)
    decomposable_attention: bool = True  # let TensorRT decompose attention where no fused kernel fits
    workspace_mib: int | None = None
    verbose_log: bool = False  # keep TensorRT's verbose messages in build.log
    force: bool = False

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown build backend {self.backend!r}; use one of {', '.join(BACKENDS)}")
        if self.profiles not in PROFILE_SETS:
            raise ConfigError(f"--profiles must be one of {', '.join(PROFILE_SETS)}, got {self.profiles!r}")
        if self.opt_batch < 1 or (self.max_batch is not None and self.max_batch < 1):
            raise ConfigError("--opt-batch and --max-batch must be >= 1")
        if self.workspace_mib is not None and self.workspace_mib < 1:
            raise ConfigError("--workspace-mib must be >= 1")


@dataclass(frozen=True)
class RankBuild:
    rank: int
    engine: str
    seconds: float
    layer_types: dict[str, int]
    engine_layers: list[dict[str, Any]]
    layer_source: str
    onnx_nodes_in_engine: dict[str, list[int]]  # ONNX op -> [nodes found in engine layers' metadata, nodes in graph]
    decomposable_attention: int
    log: api.BuildLog


def default_timing_cache(t: api.TRT) -> Path:
    return cache_dir() / f"timing-{t.flavour}-{t.version}.cache"


def build_engines(artifact: str | Path, out: str | Path, options: BuildOptions = BuildOptions(),
                  progress: Progress = lambda msg: None) -> Manifest:
    artifact, out = Path(artifact), Path(out)
    started = time.perf_counter()
    manifest = read_manifest(artifact, verify=True)
    progress(f"checked {artifact}")
    t = api.load()
    profiles = _profiles(manifest, options)
    cache = Path(options.timing_cache).expanduser() if options.timing_cache else default_timing_cache(t)
    progress(f"{t.label}; profiles " + ", ".join(f"{p.name} (batch {p.batch[0]}..{p.batch[2]}, seq {p.seq[0]}.."
                                                 f"{p.seq[2]})" for p in profiles))
    if not api.timing_cache_supported(t) and options.timing_cache:
        progress(f"note: {t.label} has no timing cache (its timing-cache calls are no-ops); --timing-cache ignored")
    with atomic_folder(out, options.force, keep=[artifact]) as tmp:
        _copy_artifact(artifact, manifest, tmp)
        builds = [_build_rank(t, tmp, manifest, r, profiles, options, cache, progress) for r in range(manifest.tp)]
        _write_build_log(tmp / BUILD_LOG, t, artifact, out, profiles, builds)
        built = replace(manifest, ranks=[replace(r, engine=file_entry(tmp, b.engine))
                                         for r, b in zip(manifest.ranks, builds)],
                        engines=_summary(t, manifest, profiles, options, cache, builds, tmp))
        write_manifest(tmp, built)
    progress(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return built


def _profiles(manifest: Manifest, options: BuildOptions) -> list[Profile]:
    max_batch = options.max_batch or manifest.max_batch
    if max_batch > manifest.max_batch:
        raise ConfigError(f"--max-batch {max_batch} exceeds the artifact's max_batch {manifest.max_batch}; "
                          f"re-export with a larger --max-batch")
    opt_seq = options.opt_seq if options.opt_seq is not None else min(128, manifest.max_seq)
    return plan_profiles(max_batch, manifest.max_seq, opt_seq, options.opt_batch, options.profiles)


def _copy_artifact(artifact: Path, manifest: Manifest, tmp: Path) -> None:
    """The input's ONNX, external data and tokenizer files (not its old engines: they are rebuilt)."""
    names = [f.file for r in manifest.ranks for f in [r.onnx, *r.external_data]] + [f.file for f in manifest.tokenizer]
    for name in names:
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(artifact / name, tmp / name)


def _build_rank(t: api.TRT, folder: Path, manifest: Manifest, rank: int, profiles: list[Profile],
                options: BuildOptions, cache: Path, progress: Progress) -> RankBuild:
    onnx_file = manifest.ranks[rank].onnx.file
    where = f"rank {rank + 1}/{manifest.tp}"
    log = api.BuildLog(keep_verbose=options.verbose_log)
    logger = api.make_logger(t, log)
    builder = api.create_builder(t, logger)
    network = api.create_network(t, builder)
    progress(f"{where}: parsing {onnx_file}")
    issues = api.parse_file(t, network, logger, folder / onnx_file)
    if issues:
        raise EngineBuildError(_parser_message(t, folder / onnx_file, issues))
    decomposable = api.allow_decomposed_attention(t, network) if options.decomposable_attention else 0
    config = api.create_config(t, builder, options.workspace_mib * 2**20 if options.workspace_mib else None)
    add_profiles(builder, config, network, manifest.inputs, profiles)
    timing = api.attach_timing_cache(t, config, cache)
    progress(f"{where}: building the engine ({len(profiles)} profiles, {network.num_layers} network layers)")
    started = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - started
    if serialized is None:
        raise EngineBuildError(_build_failure(t, onnx_file, log, options))
    if timing is not None:
        api.save_timing_cache(t, config, cache)
    name = f"rank{rank}.engine"
    data = memoryview(serialized)
    (folder / name).write_bytes(data)
    layers, source = api.engine_layers(t, data, log)
    progress(f"{where}: wrote {name} ({len(data) / 2**20:.1f} MiB) in {seconds:.1f} s; {len(layers)} engine layers")
    return RankBuild(rank, name, seconds, api.network_layer_types(network), layers, source,
                     _coverage(folder / onnx_file, layers), decomposable, log)


def _parser_message(t: api.TRT, path: Path, issues: list[api.ParserIssue]) -> str:
    domains = {n.name: n.domain for n in onnx.load(str(path), load_external_data=False).graph.node}
    first = issues[0]
    if first.node_index < 0:
        return f"{path}: {t.label}'s ONNX parser failed: {first.message}"
    domain = domains.get(first.node_name) or "ai.onnx"
    more = f" (+{len(issues) - 1} more: " + ", ".join(f"{i.node_name} ({i.op})" for i in issues[1:4]) + ")" \
        if len(issues) > 1 else ""
    fix = next((f for key, f in PARSER_FIXES.items() if key in first.message),
               "rewrite or remove the op (see `decodekit optimize --dialect`), or register a TensorRT plugin for it")
    return (f"{path.name}: {t.label} cannot import node {first.node_name!r} (op {domain}::{first.op}, node "
            f"#{first.node_index}): {first.message}{more}; TensorRT has no layer or plugin for it: {fix}")


def _build_failure(t: api.TRT, onnx_file: str, log: api.BuildLog, options: BuildOptions) -> str:
    errors = log.errors()
    reason = errors[-1].splitlines()[0] if errors else "no error message"
    hint = ""
    if "Attention" in reason and not options.decomposable_attention:
        hint = "; no fused attention kernel fits these shapes: build without --strict-attention"
    return f"{onnx_file}: {t.label} failed to build the engine: {reason}{hint}"


def _coverage(path: Path, layers: list[dict[str, Any]]) -> dict[str, list[int]]:
    """For each KEY_OPS op in the graph: how many of its nodes the engine's layers name in their metadata."""
    nodes = onnx.load(str(path), load_external_data=False).graph.node
    named = {n for layer in layers for n in api.onnx_nodes(layer)}
    totals, found = Counter(), Counter()
    for n in nodes:
        if n.op_type in KEY_OPS:
            totals[n.op_type] += 1
            found[n.op_type] += n.name in named
    return {op: [found[op], totals[op]] for op in sorted(totals)}


def _summary(t: api.TRT, manifest: Manifest, profiles: list[Profile], options: BuildOptions, cache: Path,
             builds: list[RankBuild], folder: Path) -> dict[str, Any]:
    first = builds[0]
    return {
        "flavour": t.flavour, "version": t.version,
        "profiles": [p.to_json(i) for i, p in enumerate(profiles)],
        "build_seconds": round(sum(b.seconds for b in builds), 3),
        "layer_types": first.layer_types,
        "engine_layer_types": dict(sorted(Counter(x["LayerType"] for x in first.engine_layers).items())),
        "onnx_nodes_in_engine": first.onnx_nodes_in_engine,
        "attention": {"decomposable": options.decomposable_attention, "layers": first.decomposable_attention},
        "timing_cache": {"path": str(cache), "bytes": cache.stat().st_size if cache.is_file() else 0}
        if api.timing_cache_supported(t) else None,
        "layer_information": {"file": BUILD_LOG, "source": first.layer_source},
        "per_rank": [{"rank": b.rank, "engine": b.engine, "engine_bytes": (folder / b.engine).stat().st_size,
                      "build_seconds": round(b.seconds, 3), "layer_types": b.layer_types,
                      "onnx_nodes_in_engine": b.onnx_nodes_in_engine} for b in builds],
    }


def _write_build_log(path: Path, t: api.TRT, artifact: Path, out: Path, profiles: list[Profile],
                     builds: list[RankBuild]) -> None:
    with open(path, "w") as f:
        f.write(f"decodekit build {artifact} -> {out}\n{t.label} ({t.flavour})\n")
        f.write("profiles: " + json.dumps([p.to_json(i) for i, p in enumerate(profiles)]) + "\n")
        for b in builds:
            f.write(f"\n== rank {b.rank}: {b.engine}, built in {b.seconds:.2f} s; TensorRT said "
                    f"{dict(b.log.counts)} ==\n")
            f.writelines(line + "\n" for line in b.log.lines)
            f.write(f"{_BEGIN}{b.rank} (source: {b.layer_source}) --\n")
            f.write(json.dumps({"rank": b.rank, "source": b.layer_source, "Layers": b.engine_layers}, indent=1))
            f.write(f"\n{_END}{b.rank} --\n")


def read_layer_information(folder: str | Path) -> dict[int, list[dict[str, Any]]]:
    """{rank: engine layers (inspector JSON: Name, LayerType, TacticName, Metadata)} from an artifact's build.log."""
    text = (Path(folder) / BUILD_LOG).read_text()
    result: dict[int, list[dict[str, Any]]] = {}
    for block in text.split(_BEGIN)[1:]:
        body = block.split("\n", 1)[1].split(_END, 1)[0]
        info = json.loads(body)
        result[int(info["rank"])] = info["Layers"]
    return result
