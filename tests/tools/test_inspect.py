"""decodekit inspect (library): manifest summary, I/O, op histogram, parameters, KV memory, collectives, engines."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from decodekit.export.config import preset
from decodekit.export.manifest import ArtifactError
from decodekit.tools.inspect_artifact import failed_verification, format_inspect, graph_info, inspect_path

HAS_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx", "tensorrt"))


def shared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """preset:tiny (max_seq 64, max_batch 4), exported once per session and shared read-only by tests/tools."""
    folder = tmp_path_factory.getbasetemp() / "tiny-shared"
    if not (folder / "manifest.json").is_file():
        from decodekit.export.artifact import ExportOptions, export_artifact

        export_artifact("preset:tiny", folder, ExportOptions(max_batch=4, max_seq=64, force=True))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny(tmp_path_factory)


def test_artifact_report(tiny: Path) -> None:
    r = inspect_path(tiny)
    c = preset("tiny")
    assert r.kind == "artifact" and r.manifest["dialect"] == "std" and r.manifest["tp"] == 1
    assert [i["name"] for i in r.inputs][:4] == ["input_ids", "position_ids", "write_indices", "nonpad_kv_seqlen"]
    assert r.inputs[4] == {"name": "past_key_values.0.key", "dtype": "float32", "shape": ["batch", 2, 64, 16]}
    assert r.outputs[0]["name"] == "logits" and len(r.outputs) == 1 + 2 * c.num_layers
    (g,) = r.ranks
    assert g.parameters == c.num_parameters() and g.parameter_bytes == 4 * c.num_parameters()
    assert g.ops["TensorScatter"] == 2 * c.num_layers and g.ops["Attention"] == c.num_layers and g.collectives == 0
    assert r.kv_cache["bytes_per_rank"] == 2 * c.num_layers * 4 * c.num_kv_heads * 64 * c.head_dim * 4
    assert r.engines == [] and r.notes == []
    json.dumps(r.to_dict())
    text = format_inspect(r)
    assert "KV cache at max batch and max seq: " in text and "TensorScatter 4" in text


def test_onnx_file_and_collectives(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    w = helper.make_tensor("w", TensorProto.FLOAT, [8, 8], [0.0] * 64)
    attrs = dict(collective_operation="all_reduce", reduce_op="sum", nb_rank=2, root=-1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
             helper.make_node("DistCollective", ["a"], ["b"], domain="trt", **attrs),
             helper.make_node("MatMul", ["b", "w"], ["c"]),
             helper.make_node("DistCollective", ["c"], ["y"], domain="trt", **attrs)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]),
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("trt", 1)])
    onnx.save(model, str(tmp_path / "m.onnx"))
    g = graph_info(tmp_path / "m.onnx")
    assert g.collectives == 2 and g.ops == {"MatMul": 2, "trt::DistCollective": 2} and g.parameters == 64
    r = inspect_path(tmp_path / "m.onnx")
    assert r.kind == "onnx" and r.inputs == [{"name": "x", "dtype": "float32", "shape": [2, 8]}]


def test_bad_paths(tmp_path: Path, tiny: Path) -> None:
    with pytest.raises(ArtifactError, match="no such file or folder"):
        inspect_path(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ArtifactError, match="not an artifact folder"):
        inspect_path(tmp_path / "notes.txt")
    with pytest.raises(ArtifactError, match="not a decodekit artifact"):
        inspect_path(tmp_path)
    shutil.copytree(tiny, tmp_path / "t")
    data = bytearray((tmp_path / "t" / "rank0.onnx").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "t" / "rank0.onnx").write_bytes(bytes(data))
    report = inspect_path(tmp_path / "t")  # reported, not raised: the CLI prints it, then exits 1
    assert report.verification["passed"] is False and "checksum" in failed_verification(report)
    assert report.manifest is not None and report.ranks == []
    assert inspect_path(tmp_path / "t", verify=False).notes[0].startswith("checksums not verified")


@pytest.mark.skipif(not HAS_TRT, reason="neither tensorrt nor tensorrt_rtx is installed")
def test_engine_layers(tiny: Path, tmp_path: Path) -> None:
    from decodekit.graphs.trt.build import BuildOptions, build_engines

    build_engines(tiny, tmp_path / "trt", BuildOptions(opt_seq=16, max_batch=2))
    r = inspect_path(tmp_path / "trt")
    (e,) = r.engines
    assert e.file == "rank0.engine" and e.layers > 0 and sum(e.layer_types.values()) == e.layers
    assert e.source in ("engine inspector", "build.log")
    if e.source == "build.log":  # no GPU able to load the engine here: says so
        assert "build.log" in e.note
    assert e.network_layer_types.get("KV_CACHE_UPDATE") == 4
    bare = inspect_path(tmp_path / "trt" / "rank0.engine")
    assert bare.kind == "engine" and bare.engines[0].layer_types == e.layer_types
    assert "engine layer types" in format_inspect(r)


def test_verification_is_reported(tmp_path: Path, tiny: Path) -> None:
    report = inspect_path(tiny)
    v = report.verification
    assert v["passed"] is True and v["external_data"] == [] and v["manifest_checksum"] == "ok"
    assert v["files"] == 1 + len(report.manifest["tokenizer"])
    assert "verification: passed" in format_inspect(report)
    # a manifest written before manifest_sha256 existed is read as it is, and the report says so
    shutil.copytree(tiny, tmp_path / "old")
    d = json.loads((tmp_path / "old" / "manifest.json").read_text())
    del d["manifest_sha256"]
    (tmp_path / "old" / "manifest.json").write_text(json.dumps(d))
    old = inspect_path(tmp_path / "old")
    assert old.verification["passed"] is True and old.verification["manifest_checksum"].startswith("absent")
    assert "manifest checksum absent" in format_inspect(old)
