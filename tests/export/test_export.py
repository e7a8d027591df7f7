"""The ONNX contract of an exported artifact: structure, collectives, manifest checks, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import pytest

from decodekit.export import artifact as artifact_mod
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.config import ConfigError
from decodekit.export.manifest import ArtifactError, bind_external_data, read_manifest
from helpers import edit_manifest

L = 2  # preset:tiny layers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "tiny"
    export_artifact("preset:tiny", out, ExportOptions(max_seq=64, max_batch=4))
    return out


@pytest.fixture(scope="module")
def tiny_tp2_fp16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("a") / "tiny-tp2"
    export_artifact("preset:tiny", out, ExportOptions(tp=2, dtype="fp16", max_seq=64))
    return out


def _dims(v) -> list:
    return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]


def test_contract_inputs_outputs(tiny):
    m = onnx.load(str(tiny / "rank0.onnx"))
    ins = {i.name: (i.type.tensor_type.elem_type, _dims(i)) for i in m.graph.input}
    outs = {o.name: (o.type.tensor_type.elem_type, _dims(o)) for o in m.graph.output}
    i64 = onnx.TensorProto.INT64
    assert ins["input_ids"] == (i64, ["batch", "seq"])
    assert ins["position_ids"] == (i64, ["batch", "seq"])
    assert ins["write_indices"] == (i64, ["batch"])
    assert ins["nonpad_kv_seqlen"] == (i64, ["batch"])
    for i in range(L):
        for kv in ("key", "value"):
            assert ins[f"past_key_values.{i}.{kv}"] == (onnx.TensorProto.FLOAT, ["batch", 2, 64, 16])
            assert outs[f"present.{i}.{kv}"] == ins[f"past_key_values.{i}.{kv}"]
    assert outs["logits"] == (onnx.TensorProto.FLOAT, ["batch", "seq", 512])
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["TensorScatter"] == 2 * L and ops["Attention"] == L
    assert ops["RMSNormalization"] == 2 * L + 1 and ops["RotaryEmbedding"] == 2 * L
    assert "DistCollective" not in ops
    assert m.ir_version == 10 and {o.domain: o.version for o in m.opset_import}[""] == 24
    onnx.checker.check_model(m, full_check=True)


def test_manifest_describes_artifact(tiny):
    man = read_manifest(tiny)
    assert (man.dialect, man.opset, man.tp, man.max_seq, man.max_batch, man.dtype) == ("std", 24, 1, 64, 4, "fp32")
    assert [s.name for s in man.inputs][:4] == ["input_ids", "position_ids", "write_indices", "nonpad_kv_seqlen"]
    assert man.kv_layout["kv_heads_local"] == 2 and man.kv_layout["in_place"]
    assert {f.file for f in man.tokenizer} == {"tokenizer.json", "tokenizer_config.json"}
    assert len(man.ranks[0].onnx.sha256) == 64


def test_tp2_has_one_collective_per_row_parallel_output(tiny_tp2_fp16):
    man = read_manifest(tiny_tp2_fp16)
    assert [r.onnx.file for r in man.ranks] == ["rank0.onnx", "rank1.onnx"]
    for r in range(2):
        m = onnx.load(str(tiny_tp2_fp16 / f"rank{r}.onnx"))
        coll = [n for n in m.graph.node if n.op_type == "DistCollective"]
        assert len(coll) == 2 * L
        for n in coll:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs == {"collective_operation": b"all_reduce", "reduce_op": b"sum", "nb_rank": 2, "root": -1}
            assert n.domain == "trt"
        kv = next(i for i in m.graph.input if i.name == "past_key_values.0.key")
        assert _dims(kv) == ["batch", 1, 64, 16] and kv.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16


def test_tensorrt_rtx_parser_parses_tp1_and_tp2_fp16(tmp_path, tiny_tp2_fp16):
    trt = pytest.importorskip("tensorrt_rtx", reason="needs the tensorrt-rtx package (pip install tensorrt-rtx)")
    tp1 = tmp_path / "tp1"
    export_artifact("preset:tiny", tp1, ExportOptions(dtype="fp16", max_seq=64))
    for path in [tp1 / "rank0.onnx", tiny_tp2_fp16 / "rank0.onnx", tiny_tp2_fp16 / "rank1.onnx"]:
        logger = trt.Logger(trt.Logger.ERROR)
        net = trt.Builder(logger).create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(net, logger)
        assert parser.parse_from_file(str(path)), [parser.get_error(i).desc() for i in range(parser.num_errors)]
        types = Counter(str(net.get_layer(i).type).split(".")[-1] for i in range(net.num_layers))
        assert types["KV_CACHE_UPDATE"] == 2 * L and types["ATTENTION_INPUT"] == L == types["ATTENTION_OUTPUT"]
        assert types["ROTARY_EMBEDDING"] == 2 * L
        assert types["DIST_COLLECTIVE"] == (2 * L if "tp2" in str(path) else 0)


def test_external_data_stays_inside_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(artifact_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "ext"
    man = export_artifact("preset:tiny", out, ExportOptions(max_seq=32))
    assert man.ranks[0].external_data and (out / man.ranks[0].external_data[0].file).is_file()
    onnx.checker.check_model(str(out / "rank0.onnx"), full_check=True)
    assert bind_external_data(out, read_manifest(out).ranks[0]) == [man.ranks[0].external_data[0].file] * len(
        [t for t in onnx.load(str(out / "rank0.onnx"), load_external_data=False).graph.initializer
         if t.data_location == onnx.TensorProto.EXTERNAL])
    # a manifest that names a file outside the artifact is refused
    d = json.loads((out / "manifest.json").read_text())
    d["ranks"][0]["external_data"][0]["file"] = "../elsewhere.data"
    (out / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="manifest.json was edited or corrupted"):
        read_manifest(out)
    edit_manifest(out, lambda m: m["ranks"][0]["external_data"][0].update(file="../elsewhere.data"))
    with pytest.raises(ArtifactError, match="outside the artifact folder"):
        read_manifest(out)


def test_tampered_or_mismatched_artifact_is_refused(tmp_path, tiny):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    data = bytearray((bad / "rank0.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "rank0.onnx").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum"):
        read_manifest(bad)
    d = json.loads((tiny / "manifest.json").read_text())
    d["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match="re-export"):
        read_manifest(bad)
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(tmp_path / "missing")


def test_bad_inputs(tmp_path, tiny):
    with pytest.raises(ConfigError, match="unknown preset"):
        export_artifact("preset:nope", tmp_path / "x")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        ExportOptions(dtype="int3")
    with pytest.raises(ConfigError, match="not empty"):
        export_artifact("preset:tiny", tiny, ExportOptions(max_seq=64))
    with pytest.raises(ConfigError, match="does not divide num_heads"):
        export_artifact("preset:tiny", tmp_path / "tp3", ExportOptions(tp=3))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="unsupported architecture"):
        export_artifact(str(gpt2), tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists() and not (tmp_path / "tp3").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_force_replaces_atomically(tmp_path):
    out = tmp_path / "a"
    export_artifact("preset:tiny", out, ExportOptions(max_seq=32))
    export_artifact("preset:tiny", out, ExportOptions(max_seq=48, force=True))
    assert read_manifest(out).max_seq == 48
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_cli_export_json(tmp_path):
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "decodekit.tools.cli", "export", "preset:tiny", "-o", str(out),
                        "--max-seq", "32", "--json"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["format"] == "decodekit-artifact" and doc["max_seq"] == 32
    r = subprocess.run([sys.executable, "-m", "decodekit.tools.cli", "export", "preset:nope", "-o", str(tmp_path / "n")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "unknown preset" in r.stderr
