"""The artifact manifest: what a loader needs to trust an artifact folder, checked before use.

Every loader calls ``read_manifest(folder)`` and is refused with the fix ("re-export with ...")
when the format, version, files or checksums do not match.

Integrity, checked in this order:
- ``manifest_sha256``: the sha256 of the manifest's own content (canonical JSON: sorted keys, no spaces,
  without that field). An edited or corrupted manifest.json is refused in one line. Manifests written before
  this field existed (same format version) are accepted as they are; ``decodekit inspect`` notes it.
- with ``verify`` (the default of every loader): each listed file's size and sha256 (``verify_file``, the
  one per-file check), then every external-data location each rank's ONNX file names must be one of the
  files the manifest lists for that rank, inside the folder (no ``..``, no absolute path, no link leaving
  it): checked on the file's bytes before any library opens the model.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ArtifactError, WireFormatError  # noqa: F401 - ArtifactError re-exported
from . import verify_cache
from .config import ModelConfig
from .external_data import external_data_locations

FORMAT = "decodekit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CHECKSUM = "manifest_sha256"


# What a graph may allow its runtime; dialects declare their values (graphs/dialects.py), manifests record them.
CAPABILITIES = {
    "mixed_lengths": "prompts of different lengths prefill together in one right-padded batch",
    "cache_append": "multi-token steps into a cache that already holds tokens (a chat turn appended to the history)",
    "host_free_decode": "a one-token step reads no value on the host, so the whole step can be captured as a CUDA graph "
                        "(written False where onnxruntime-gpu would run some node on the CPU: CUDA_PRECISIONS)",
}
STD_CAPABILITIES = {"mixed_lengths": True, "cache_append": True, "host_free_decode": False}
# The precisions at which onnxruntime-gpu has a CUDA kernel for every op of a dialect (a dialect not listed: all).
# Outside them ORT places nodes on the CPU under the CUDA provider and copies to the host inside the step, which no
# CUDA graph can hold: GroupQueryAttention's CUDA kernels are fp16/bf16 only (measured on the H200, onnxruntime-gpu
# 1.31: an fp32 ort-gqa-static session puts both GQA nodes of preset:tiny on the CPU behind MemcpyToHost nodes, and
# capturing its step fails with CUDA error 907, cudaEventSynchronize inside the capture).
CUDA_PRECISIONS: dict[str, tuple[str, ...]] = {
    d: ("fp16", "bf16") for d in ("ort-gqa", "ort-gqa-uniform", "ort-gqa-static")}


def cuda_resident(dialect: str, dtype: str) -> bool:
    """Whether onnxruntime-gpu runs every node of a ``dialect`` graph at ``dtype`` on the GPU (CUDA_PRECISIONS)."""
    return dtype in CUDA_PRECISIONS.get(dialect, (dtype,))


# artifacts written before manifests recorded capabilities
LEGACY_CAPABILITIES = {
    "std": STD_CAPABILITIES, "decomposed": STD_CAPABILITIES, "ort-gqa": STD_CAPABILITIES,
    "ort-gqa-uniform": {"mixed_lengths": False, "cache_append": False, "host_free_decode": False},
    "ort-gqa-static": {"mixed_lengths": False, "cache_append": False, "host_free_decode": True},
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class FileEntry:
    file: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class RankEntry:
    rank: int
    onnx: FileEntry
    external_data: list[FileEntry] = field(default_factory=list)
    engine: FileEntry | None = None


@dataclass(frozen=True)
class Manifest:
    config: ModelConfig
    dtype: str
    dialect: str
    opset: int
    tp: int
    max_batch: int
    max_seq: int
    logits: str
    ranks: list[RankEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    kv_layout: dict[str, Any]
    source: str = ""
    seed: int | None = None  # weight seed of a preset:NAME source (random weights): the torch backend rebuilds them
    tokenizer: list[FileEntry] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    engines: dict[str, Any] = field(default_factory=dict)
    config_fields: dict[str, list[str]] = field(default_factory=dict)  # config.json fields ignored / unknown
    # what the graph allows its runtime (written by export / optimize from the dialect registry): see CAPABILITIES
    capabilities: dict[str, bool] = field(default_factory=dict)
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}
        return json.dumps({**d, CHECKSUM: manifest_checksum(d)}, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d.pop(CHECKSUM, None)
        d["config"] = ModelConfig.from_dict(d["config"])
        d["ranks"] = [_rank(r) for r in d["ranks"]]
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        d["tokenizer"] = [FileEntry(**f) for f in d.get("tokenizer", [])]
        return cls(**d)

    def allows(self, capability: str) -> bool:
        """Whether the artifact's graph allows `capability` (a key of CAPABILITIES)."""
        if capability not in CAPABILITIES:
            raise KeyError(f"unknown capability {capability!r}; known: {', '.join(CAPABILITIES)}")
        caps = self.capabilities or LEGACY_CAPABILITIES.get(self.dialect, {})
        return bool(caps.get(capability, False))

    def cuda_resident(self) -> bool:
        """Whether onnxruntime-gpu runs every node of this artifact on the GPU (CUDA_PRECISIONS)."""
        return cuda_resident(self.dialect, self.dtype)

    def rank_file(self, folder: Path, rank: int = 0) -> Path:
        return Path(folder) / self.ranks[rank].onnx.file


def _rank(r: dict[str, Any]) -> RankEntry:
    return RankEntry(rank=r["rank"], onnx=FileEntry(**r["onnx"]),
                     external_data=[FileEntry(**f) for f in r.get("external_data", [])],
                     engine=FileEntry(**r["engine"]) if r.get("engine") else None)


def manifest_checksum(d: dict[str, Any]) -> str:
    """sha256 of a manifest's content: canonical JSON of every field but the checksum itself."""
    content = {k: v for k, v in d.items() if k != CHECKSUM}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(folder: Path, name: str) -> FileEntry:
    path = Path(folder) / name
    return FileEntry(name, sha256_file(path), path.stat().st_size)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    tmp = Path(folder) / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json())
    os.replace(tmp, Path(folder) / MANIFEST)


def read_manifest(folder: str | Path, verify: bool = True) -> Manifest:
    """Read and check an artifact's manifest; with verify, also every file's size and sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder; create one with `decodekit export SOURCE -o {folder}`")
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; this is not a decodekit artifact (re-export with `decodekit export`)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: unreadable JSON ({e.msg}); re-export the artifact") from None
    if d.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a decodekit manifest; re-export with `decodekit export`")
    if d.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format version {d.get('format_version')} but this decodekit reads "
                            f"{FORMAT_VERSION}; re-export with this version of decodekit")
    if CHECKSUM in d and d[CHECKSUM] != manifest_checksum(d):
        source = d.get("source") if isinstance(d.get("source"), str) and d.get("source") else "SOURCE"
        raise ArtifactError(f"{folder}: {MANIFEST} was edited or corrupted (its {CHECKSUM} does not match its "
                            f"content); re-export with `decodekit export {source} -o {folder}`")
    try:
        manifest = Manifest.from_dict(d)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: malformed manifest ({e}); re-export the artifact") from None
    if verify:
        verify_files(folder, manifest)
    return manifest


def all_files(manifest: Manifest) -> list[FileEntry]:
    files = [f for r in manifest.ranks for f in [r.onnx, *r.external_data] + ([r.engine] if r.engine else [])]
    return files + list(manifest.tokenizer)


def verify_files(folder: Path, manifest: Manifest) -> None:
    """Every listed file's size and checksum, then every rank's external-data locations; raises ArtifactError."""
    for entry in all_files(manifest):
        verify_file(folder, entry)
    for rank in manifest.ranks:
        bind_external_data(folder, rank)


def verify_file(folder: Path, entry: FileEntry) -> None:
    """The one per-file check: present inside the folder, with the manifest's size and sha256."""
    path = _inside(folder, entry.file)
    if not path.is_file():
        raise ArtifactError(f"{folder}: {entry.file} is missing; re-export the artifact")
    if path.stat().st_size != entry.bytes or not verify_cache.matches(path, entry.sha256):
        raise ArtifactError(f"{folder}: {entry.file} does not match its manifest checksum (modified or "
                            f"truncated); re-export the artifact")


def bind_external_data(folder: Path, rank: RankEntry) -> list[str]:
    """Refuse a rank file whose external data is not one of the rank's listed files; returns the locations."""
    onnx_file = rank.onnx.file
    try:
        locations = external_data_locations(_inside(folder, onnx_file))
    except (WireFormatError, OSError) as e:
        raise ArtifactError(f"{folder}: {onnx_file} is not a readable ONNX file ({e}); re-export the artifact") \
            from None
    listed = {posixpath.normpath(f.file) for f in rank.external_data}
    for location in dict.fromkeys(locations):
        path = Path(location)
        if path.is_absolute() or ".." in path.parts or posixpath.normpath(location) not in listed:
            raise ArtifactError(f"{folder}: {onnx_file} reads external data from {location!r}, which is not a "
                                f"file of this artifact (listed: {', '.join(sorted(listed)) or 'none'}); refusing "
                                f"to open it: re-export the artifact")
        _inside(folder, location)
    return locations


def _inside(folder: Path, name: str) -> Path:
    path = (Path(folder) / name).resolve()
    if Path(folder).resolve() not in path.parents:
        raise ArtifactError(f"{folder}: manifest names {name!r}, which lies outside the artifact folder; refusing it")
    return path
