"""A cache of step graphs: a structure traced once is not traced again, in any later process.

Tracing through torch.onnx is most of an export's time on small models (seconds), and what it produces, the
step graph without its weights (export/artifact.py ``step_graph``: a skeleton plus its weight references), is
decided by a few things only. They form the key:

- the model config, all of it (``ModelConfig.to_dict``: sizes, layers, RoPE, biases, activation, ...);
- every ``ExportOptions`` field except those that only pick weights or overwrite (``NOT_IN_GRAPH``): tp, dtype,
  max batch, max sequence, logits, and any option added later (the safe default: in the key);
- the versions of Python, torch, onnx, onnxscript and onnx-ir;
- the sha256 of decodekit's source that defines the graph: every module of export/ (model, ops, RoPE, tracing,
  weight binding, sharding, ...) and graphs/replicate.py.

Entries live in ``step-graphs/`` of the user cache folder (export/user_cache.py: ``$DECODEKIT_CACHE_DIR``, else
``$XDG_CACHE_HOME/decodekit``, else ``~/.cache/decodekit``), one file per key: a format line, a JSON header (the
key's material, the weight references' shapes and types, the payload's length and sha256) and the serialized
skeleton. They are written atomically; an entry that does not parse, names another key or fails its sha256 is
ignored and written again; the least recently used beyond MAX_ENTRIES are deleted. A hit returns exactly the
bytes a trace produced (tests/export/test_trace_cache.py compares a cached export with a fresh one).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx

from .config import ModelConfig
from .user_cache import cache_dir, write_atomically
from .weights import WeightSpec, parse_weight_name

if TYPE_CHECKING:
    from .artifact import ExportOptions

FORMAT = b"decodekit-step-graph 1\n"
FOLDER = "step-graphs"
SUFFIX = ".step"
MAX_ENTRIES = 64  # a few MB each for real models; least recently used beyond this are deleted
NOT_IN_GRAPH = ("force", "seed")  # ExportOptions fields that change no node, shape or constant of the graph
PACKAGES = ("torch", "onnx", "onnxscript", "onnx-ir")
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("export/*.py", "graphs/replicate.py")  # decodekit's modules that define the step graph

StepGraph = tuple[onnx.ModelProto, list[WeightSpec]]


def key_material(config: ModelConfig, options: ExportOptions) -> dict[str, Any]:
    """Everything that decides the step graph (see the module docstring)."""
    opts = {k: v for k, v in dataclasses.asdict(options).items() if k not in NOT_IN_GRAPH}
    return {"config": config.to_dict(), "options": opts, "versions": versions(), "source": source_digest()}


def graph_key(config: ModelConfig, options: ExportOptions) -> str:
    return _digest(key_material(config, options))


def _digest(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()


@lru_cache(maxsize=1)
def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": ".".join(map(str, sys.version_info[:3]))}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


@lru_cache(maxsize=1)
def source_digest() -> str:
    sha = hashlib.sha256()
    for path in sorted(p for pattern in SOURCES for p in _PACKAGE_ROOT.glob(pattern)):
        sha.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode() + b"\0")
        sha.update(path.read_bytes() + b"\0")
    return sha.hexdigest()


def entry_path(key: str) -> Path:
    return cache_dir() / FOLDER / f"{key}{SUFFIX}"


def cached_step_graph(config: ModelConfig, options: ExportOptions, build: Callable[[], StepGraph],
                      progress: Callable[[str], None] = lambda msg: None) -> StepGraph:
    """The step graph for (config, options): from the cache when this structure was traced before, else
    `build()`'s, which is then stored."""
    material = key_material(config, options)
    key = _digest(material)
    hit = load(key)
    if hit is not None:
        progress(f"step graph from the trace cache ({entry_path(key).name}: same structure, code and versions; "
                 f"nothing traced)")
        return hit
    graph = build()
    store(key, *graph, material=material)
    return graph


def load(key: str) -> StepGraph | None:
    """The entry for `key`, or None when there is none or it is unreadable, truncated or another key's."""
    path = entry_path(key)
    try:
        data = path.read_bytes()
    except OSError:
        return None
    try:
        if not data.startswith(FORMAT):
            return None
        end = data.index(b"\n", len(FORMAT))
        header = json.loads(data[len(FORMAT):end])
        payload = data[end + 1:]
        if header["key"] != key or header["bytes"] != len(payload) or \
                header["sha256"] != hashlib.sha256(payload).hexdigest():
            return None
        skeleton = onnx.ModelProto.FromString(payload)
        specs = [WeightSpec(parse_weight_name(name), tuple(int(d) for d in shape), int(elem_type))
                 for name, shape, elem_type in header["weights"]]
    except Exception:  # noqa: BLE001 - any damage to a cache entry only means tracing again
        return None
    try:
        os.utime(path)  # recently used: pruned last
    except OSError:
        pass
    return skeleton, specs


def store(key: str, skeleton: onnx.ModelProto, specs: list[WeightSpec], material: dict[str, Any]) -> bool:
    """Write the entry for `key` atomically (False when the cache folder is not writable) and prune old ones."""
    payload = skeleton.SerializeToString()
    header = {"key": key, "material": material, "bytes": len(payload),
              "sha256": hashlib.sha256(payload).hexdigest(),
              "weights": [[s.ref.name, list(s.shape), s.elem_type] for s in specs]}
    path = entry_path(key)
    written = write_atomically(path, FORMAT + json.dumps(header, default=str).encode() + b"\n" + payload)
    if written:
        _prune(path.parent)
    return written


def _prune(folder: Path) -> None:
    entries = []
    for p in folder.glob(f"*{SUFFIX}"):
        try:
            entries.append((p.stat().st_mtime_ns, p))
        except OSError:
            continue
    for _, p in sorted(entries)[:-MAX_ENTRIES]:
        try:
            p.unlink()
        except OSError:
            pass
