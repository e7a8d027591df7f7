"""The trace cache (export/trace_cache.py): a hit writes the bytes a fresh trace writes, any change of what decides
the graph misses, and a damaged entry is ignored and written again."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from decodekit.export import trace_cache
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.config import preset

OPTIONS = ExportOptions(max_seq=32, max_batch=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache folder of this test's own; returns the folder of its step-graph entries."""
    monkeypatch.setenv("DECODEKIT_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / trace_cache.FOLDER


def _export(source: str, out, options: ExportOptions = OPTIONS) -> list[str]:
    messages: list[str] = []
    export_artifact(source, out, options, progress=messages.append)
    return messages


def _traced(messages: list[str]) -> bool:
    return any(m.startswith("tracing") for m in messages)


def _hit(messages: list[str]) -> bool:
    return any("from the trace cache" in m for m in messages)


def _same_files(a, b) -> None:
    for name in ("rank0.onnx", "manifest.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cached_export_equals_a_fresh_one(cache, hf_checkpoint, tmp_path):
    """5 layers: 3 traced, 2 replicated. The second export traces nothing and writes the same bytes."""
    hf = str(hf_checkpoint("llama", num_hidden_layers=5))
    fresh = _export(hf, tmp_path / "fresh")
    assert _traced(fresh) and not _hit(fresh)
    assert len(list(cache.glob(f"*{trace_cache.SUFFIX}"))) == 1
    cached = _export(hf, tmp_path / "cached")
    assert _hit(cached) and not _traced(cached)
    _same_files(tmp_path / "fresh", tmp_path / "cached")
    onnx.checker.check_model(str(tmp_path / "cached" / "rank0.onnx"), full_check=True)


def test_a_damaged_entry_is_traced_again_and_rewritten(cache, tmp_path):
    _export("preset:tiny", tmp_path / "first")
    (entry,) = cache.glob(f"*{trace_cache.SUFFIX}")
    good = entry.read_bytes()
    entry.write_bytes(good[:-100] + bytes(b ^ 0xFF for b in good[-100:]))  # same length, payload damaged
    again = _export("preset:tiny", tmp_path / "again")
    assert _traced(again) and not _hit(again)
    assert entry.read_bytes() == good  # written again, whole
    _same_files(tmp_path / "first", tmp_path / "again")
    for damage in (b"", b"not an entry", good[:len(good) // 2]):
        entry.write_bytes(damage)
        assert trace_cache.load(entry.name.removesuffix(trace_cache.SUFFIX)) is None


def test_everything_that_decides_the_graph_is_in_the_key():
    config = preset("tiny")
    key = trace_cache.graph_key(config, OPTIONS)
    changed_configs = [dataclasses.replace(config, num_layers=3), dataclasses.replace(config, rms_norm_eps=1e-6),
                       dataclasses.replace(config, tie_word_embeddings=not config.tie_word_embeddings),
                       dataclasses.replace(config, hidden_act="gelu_tanh")]
    changed_options = [dataclasses.replace(OPTIONS, **{f: v}) for f, v in
                       (("max_seq", 64), ("max_batch", 4), ("dtype", "fp16"), ("tp", 2), ("logits", "last"))]
    keys = [trace_cache.graph_key(c, OPTIONS) for c in changed_configs]
    keys += [trace_cache.graph_key(config, o) for o in changed_options]
    assert key not in keys and len(set(keys)) == len(keys)
    for field, value in (("seed", 7), ("force", True)):  # pick weights or overwrite: the same graph
        assert trace_cache.graph_key(config, dataclasses.replace(OPTIONS, **{field: value})) == key
    material = trace_cache.key_material(config, OPTIONS)
    assert material["source"] == trace_cache.source_digest() and len(material["source"]) == 64
    assert set(material["versions"]) == {"python", *trace_cache.PACKAGES}
    assert material["versions"]["torch"] is not None


def test_another_keys_entry_and_an_unwritable_folder(cache, tmp_path, monkeypatch):
    skeleton = onnx.helper.make_model(onnx.helper.make_graph([], "g", [], []))
    assert trace_cache.store("a" * 64, skeleton, [], {"what": "test"})
    trace_cache.entry_path("a" * 64).rename(trace_cache.entry_path("b" * 64))
    assert trace_cache.load("b" * 64) is None  # its header names key a
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("DECODEKIT_CACHE_DIR", str(blocker))
    assert trace_cache.store("c" * 64, skeleton, [], {}) is False  # not fatal: the export goes on without it
    assert trace_cache.load("c" * 64) is None
