"""The artifact manifest: what a loader needs to trust an artifact folder, checked before use.

Every loader calls ``read_manifest(folder)`` and is refused with the fix ("re-export with ...")
when the format, version, files or checksums do not match.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import verify_cache
from .config import ModelConfig

FORMAT = "decodekit-artifact"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArtifactError(ValueError):
    """An artifact that cannot be used as it is; the message says what to do."""


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
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        d = asdict(self)
        d = {"format": d.pop("format"), "format_version": d.pop("format_version"), **d}
        return json.dumps(d, indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["config"] = ModelConfig.from_dict(d["config"])
        d["ranks"] = [_rank(r) for r in d["ranks"]]
        d["inputs"] = [TensorSpec(**t) for t in d["inputs"]]
        d["outputs"] = [TensorSpec(**t) for t in d["outputs"]]
        d["tokenizer"] = [FileEntry(**f) for f in d.get("tokenizer", [])]
        return cls(**d)

    def rank_file(self, folder: Path, rank: int = 0) -> Path:
        return Path(folder) / self.ranks[rank].onnx.file


def _rank(r: dict[str, Any]) -> RankEntry:
    return RankEntry(rank=r["rank"], onnx=FileEntry(**r["onnx"]),
                     external_data=[FileEntry(**f) for f in r.get("external_data", [])],
                     engine=FileEntry(**r["engine"]) if r.get("engine") else None)


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
    for entry in all_files(manifest):
        path = _inside(folder, entry.file)
        if not path.is_file():
            raise ArtifactError(f"{folder}: {entry.file} is missing; re-export the artifact")
        if path.stat().st_size != entry.bytes or not verify_cache.matches(path, entry.sha256):
            raise ArtifactError(f"{folder}: {entry.file} does not match its manifest checksum (modified or "
                                f"truncated); re-export the artifact")


def _inside(folder: Path, name: str) -> Path:
    path = (Path(folder) / name).resolve()
    if Path(folder).resolve() not in path.parents:
        raise ArtifactError(f"{folder}: manifest names {name!r}, which lies outside the artifact folder; refusing it")
    return path
