"""Checksums verified once: per process, and across processes through the cache (export/verify_cache.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from decodekit.export import manifest as manifest_mod
from decodekit.export import verify_cache
from decodekit.export.manifest import ArtifactError, read_manifest


@pytest.fixture
def cache_home(tmp_path, monkeypatch, artifact):
    """A private cache folder and a clean process memory; counts the files hashed after `artifact` exists."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(verify_cache.ENV, raising=False)
    monkeypatch.setattr(verify_cache, "_mode", None)
    verify_cache.forget_process_memory()
    hashed: list[str] = []
    real = manifest_mod.sha256_file

    def counting(path, *a, **kw):
        hashed.append(Path(path).name)
        return real(path, *a, **kw)

    monkeypatch.setattr(manifest_mod, "sha256_file", counting)
    yield hashed
    verify_cache.forget_process_memory()


@pytest.fixture
def artifact(tmp_path, exported) -> Path:
    art = tmp_path / "art"
    shutil.copytree(exported("preset:tiny", max_seq=32), art)
    return art


def test_each_file_hashed_once_per_process_and_remembered_across(cache_home, artifact):
    n_files = len(manifest_mod.all_files(read_manifest(artifact, verify=False)))
    read_manifest(artifact)
    read_manifest(artifact)
    assert len(cache_home) == n_files  # the second open hashed nothing
    verify_cache.forget_process_memory()  # as a new process would start
    read_manifest(artifact)
    assert len(cache_home) == n_files  # the on-disk cache answered
    doc = json.loads(verify_cache.cache_path().read_text())
    assert str((artifact / "rank0.onnx").resolve()) in doc["files"]


def test_changed_file_is_hashed_again_and_refused(cache_home, artifact):
    read_manifest(artifact)
    onnx_file = artifact / "rank0.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[-10] ^= 0xFF  # same size, new bytes
    onnx_file.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_manifest(artifact)
    verify_cache.forget_process_memory()
    with pytest.raises(ArtifactError, match="checksum"):
        read_manifest(artifact)


def test_modes(cache_home, artifact, monkeypatch):
    read_manifest(artifact)
    first = len(cache_home)
    verify_cache.forget_process_memory()
    verify_cache.set_mode("always")  # ignores the disk cache, hashes once in this process
    read_manifest(artifact)
    read_manifest(artifact)
    assert len(cache_home) == 2 * first
    verify_cache.set_mode("never")  # sizes only
    verify_cache.forget_process_memory()
    read_manifest(artifact)
    assert len(cache_home) == 2 * first
    (artifact / "rank0.onnx").write_bytes(b"x")  # a wrong size is refused even then
    with pytest.raises(ArtifactError, match="checksum"):
        read_manifest(artifact)
    with pytest.raises(ValueError, match="always, auto, never"):
        verify_cache.set_mode("sometimes")
    monkeypatch.setattr(verify_cache, "_mode", None)
    monkeypatch.setenv(verify_cache.ENV, "never")
    assert verify_cache.mode() == "never"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"files": {"x": 3}}', ""])
def test_broken_cache_file_is_ignored(cache_home, artifact, content):
    path = verify_cache.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    read_manifest(artifact)  # no error: hashed, then the cache is rewritten
    assert json.loads(path.read_text())["files"]


def test_cache_entry_of_other_identity_is_not_trusted(cache_home, artifact):
    read_manifest(artifact)
    path = verify_cache.cache_path()
    doc = json.loads(path.read_text())
    key = str((artifact / "rank0.onnx").resolve())
    doc["files"][key]["sha256"] = "0" * 64  # a lie about the current identity would be believed ...
    doc["files"][key]["identity"][1] += 1  # ... but not once the mtime differs
    path.write_text(json.dumps(doc))
    verify_cache.forget_process_memory()
    read_manifest(artifact)


def test_cli_verify_option(tmp_path, artifact):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "c"))
    cmd = [sys.executable, "-m", "decodekit.tools.cli", "inspect", str(artifact), "--json"]
    r = subprocess.run(cmd + ["--verify", "never"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "c" / "decodekit" / "verified.json").exists()
    r = subprocess.run(cmd + ["--verify", "auto"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c" / "decodekit" / "verified.json").is_file()
    r = subprocess.run(cmd + ["--verify", "maybe"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--verify" in r.stderr  # a usage error
