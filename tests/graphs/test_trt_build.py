"""TensorRT engine building with TensorRT-RTX on the CPU (it needs no GPU to build): layers, manifest, refusals, CLI.

Nothing here is skipped: these run in CI. Measured figures (build seconds, engine bytes, layer counts) are
printed by test_report_figures (see them with ``pytest -s`` or ``-rP``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import onnx
import onnx.helper as oh
import pytest

from decodekit.export.config import ConfigError
from decodekit.export.manifest import ArtifactError, file_entry, read_manifest, sha256_file, write_manifest
from decodekit.graphs.trt import api
from decodekit.graphs.trt.build import BuildOptions, EngineBuildError, build_engines, read_layer_information
from decodekit.graphs.trt.profiles import Profile, input_shapes, plan_profiles, profile_for
from decodekit.runtime.backend import BackendError

L = 2  # preset:tiny layers
MAX_SEQ = 64


@pytest.fixture(scope="module")
def onnx_tp1(exported) -> Path:
    return exported("preset:tiny", tp=1, dtype="fp16", max_seq=MAX_SEQ, max_batch=4)


@pytest.fixture(scope="module")
def onnx_tp2(exported) -> Path:
    return exported("preset:tiny", tp=2, dtype="fp16", max_seq=MAX_SEQ, max_batch=4)


@pytest.fixture(scope="module")
def built(onnx_tp1, onnx_tp2, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("engines")
    outs = {}
    for tp, src in ((1, onnx_tp1), (2, onnx_tp2)):
        outs[tp] = root / f"tiny-tp{tp}"
        build_engines(src, outs[tp], BuildOptions(opt_seq=32, timing_cache=str(root / "timing.cache")))
    return outs


def _nodes(path: Path, op: str) -> set[str]:
    return {n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type == op}


# ------------------------------------------------------------------------------------ engines and layers

@pytest.mark.parametrize("tp", [1, 2])
def test_engine_layers_hold_kv_cache_update_attention_and_collectives(built, tp):
    out = built[tp]
    m = read_manifest(out)
    layers = read_layer_information(out)
    assert sorted(layers) == list(range(tp))
    wanted = ["TensorScatter", "Attention"] + (["DistCollective"] if tp > 1 else [])
    for rank in range(tp):
        assert layers[rank] and all({"Name", "LayerType", "Metadata"} <= set(x) for x in layers[rank])
        named = {n for x in layers[rank] for n in api.onnx_nodes(x)}
        for op in wanted:  # every such ONNX node became (part of) an engine layer
            nodes = _nodes(out / m.ranks[rank].onnx.file, op)
            assert nodes and nodes <= named, (op, nodes - named)
        attention = [x for x in layers[rank] if _nodes(out / m.ranks[rank].onnx.file, "Attention")
                     & set(api.onnx_nodes(x))]
        assert any("mha" in x["Name"] for x in attention), "no fused multi-head-attention kernel in the engine"
        if tp > 1:
            collectives = [x for x in layers[rank] if "allreduce" in x["LayerType"]]
            assert len(collectives) >= 2 * L  # one per row-parallel output (per profile)
    types = m.engines["layer_types"]  # TensorRT's own layer types of the parsed network
    assert types["KV_CACHE_UPDATE"] == 2 * L
    assert types["ATTENTION_INPUT"] == L and types["ATTENTION_OUTPUT"] == L
    assert types.get("DIST_COLLECTIVE", 0) == (2 * L if tp > 1 else 0)
    covered = m.engines["onnx_nodes_in_engine"]
    assert covered["TensorScatter"] == [2 * L, 2 * L] and covered["Attention"] == [L, L]
    assert covered.get("DistCollective", [0, 0]) == ([2 * L, 2 * L] if tp > 1 else [0, 0])


@pytest.mark.parametrize("tp", [1, 2])
def test_manifest_records_engines(built, tp, onnx_tp1, onnx_tp2):
    out, src = built[tp], {1: onnx_tp1, 2: onnx_tp2}[tp]
    m = read_manifest(out, verify=True)  # every file, engines included, matches its checksum
    for r in m.ranks:
        assert r.engine is not None and r.engine.file == f"rank{r.rank}.engine"
        assert r.engine.sha256 == sha256_file(out / r.engine.file) and r.engine.bytes > 0
        assert sha256_file(out / r.onnx.file) == sha256_file(src / r.onnx.file)  # a copy of the input
    e = m.engines
    import tensorrt_rtx

    assert e["flavour"] == "tensorrt-rtx" and e["version"] == tensorrt_rtx.__version__
    assert [(p["index"], p["name"]) for p in e["profiles"]] == [(0, "decode"), (1, "prefill")]
    assert e["profiles"][0]["seq"] == [1, 1, 1] and e["profiles"][1]["seq"] == [1, 32, MAX_SEQ]
    assert all(p["batch"] == [1, 1, 4] for p in e["profiles"])
    assert e["build_seconds"] > 0 and len(e["per_rank"]) == tp
    assert e["timing_cache"] is None  # TensorRT-RTX: timing-cache calls are no-ops
    assert (out / "build.log").is_file() and "rank 0" in (out / "build.log").read_text()
    assert not read_manifest(src).engines and read_manifest(src).ranks[0].engine is None  # input untouched


def test_tampered_engine_is_refused(built, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(built[1], bad)
    data = bytearray((bad / "rank0.engine").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "rank0.engine").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="rank0.engine does not match its manifest checksum"):
        read_manifest(bad)


def test_report_figures(built, capsys):
    """Build seconds, engine bytes and layer-type counts of the tiny fp16 engines (printed for the record)."""
    lines = []
    for tp, out in built.items():
        e = read_manifest(out).engines
        for r in e["per_rank"]:
            lines.append(f"tiny fp16 tp={tp} rank {r['rank']}: build {r['build_seconds']:.2f} s, "
                         f"engine {r['engine_bytes']} bytes")
        lines.append(f"tiny fp16 tp={tp}: network layer types {e['layer_types']}")
        lines.append(f"tiny fp16 tp={tp}: engine layer types {e['engine_layer_types']}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert lines


# ------------------------------------------------------------------------------------------- refusals

def test_tampered_artifact_is_refused(onnx_tp1, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(onnx_tp1, bad)
    data = bytearray((bad / "rank0.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (bad / "rank0.onnx").write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match="rank0.onnx does not match its manifest checksum"):
        build_engines(bad, out)
    assert not out.exists()


def _with_unknown_op(src: Path, dst: Path) -> None:
    """A valid artifact (checksums rewritten) whose rank0.onnx ends in a made-up op of a custom domain."""
    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "rank0.onnx"))
    for node in model.graph.node:
        node.output[:] = ["logits_pre" if o == "logits" else o for o in node.output]
    model.graph.node.append(oh.make_node("FrobnicateX", ["logits_pre"], ["logits"], name="frobnicate_logits",
                                         domain="example.custom"))
    model.opset_import.append(oh.make_opsetid("example.custom", 1))
    onnx.save(model, str(dst / "rank0.onnx"))
    m = read_manifest(dst, verify=False)  # the ONNX file changed on purpose: rewrite its entry
    rank0 = dataclasses.replace(m.ranks[0], onnx=file_entry(dst, "rank0.onnx"))
    write_manifest(dst, dataclasses.replace(m, ranks=[rank0]))
    read_manifest(dst, verify=True)  # the hand-made artifact is valid


def test_unsupported_op_names_the_node(onnx_tp1, tmp_path):
    art = tmp_path / "custom-op"
    _with_unknown_op(onnx_tp1, art)
    out = tmp_path / "out"
    with pytest.raises(EngineBuildError) as e:
        build_engines(art, out)
    message = str(e.value)
    assert "'frobnicate_logits'" in message and "example.custom::FrobnicateX" in message
    assert "\n" not in message and isinstance(e.value, BackendError)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_strict_attention_reports_missing_kernel(onnx_tp2, tmp_path):
    """tp=2 shards tiny to 2 query heads over 1 KV head: no fused decode kernel; only decomposition builds it."""
    with pytest.raises(EngineBuildError, match="Attention.*--strict-attention"):
        build_engines(onnx_tp2, tmp_path / "out", BuildOptions(decomposable_attention=False))


def test_no_tensorrt_names_the_packages(onnx_tp1, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "tensorrt_rtx", None)
    api.load.cache_clear()
    try:
        with pytest.raises(BackendError, match=r"pip install tensorrt-rtx.*pip install tensorrt"):
            build_engines(onnx_tp1, tmp_path / "out")
    finally:
        api.load.cache_clear()
    assert not (tmp_path / "out").exists()


def test_bad_options(onnx_tp1, tmp_path):
    with pytest.raises(ConfigError, match="--opt-seq"):
        build_engines(onnx_tp1, tmp_path / "o1", BuildOptions(opt_seq=MAX_SEQ + 1))
    with pytest.raises(ConfigError, match="--max-batch"):
        build_engines(onnx_tp1, tmp_path / "o2", BuildOptions(max_batch=99))
    with pytest.raises(ConfigError, match="unknown build backend"):
        BuildOptions(backend="ort")


# ------------------------------------------------------------------------------------------------ CLI

def test_cli_build_json(onnx_tp1, tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "decodekit.tools.cli", "build", str(onnx_tp1), "-o", str(out), "--opt-seq", "16",
           "--profiles", "single", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["ranks"][0]["engine"]["sha256"] == sha256_file(out / "rank0.engine")
    assert [p["name"] for p in doc["engines"]["profiles"]] == ["any"]
    assert "[build]" not in r.stderr  # progress is quiet under --json (tools/progress.py)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # OUT exists: one-line user error
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "--force" in again.stderr and not again.stdout


# ------------------------------------------------------------------------------- profiles and reports

def test_profiles_plan_and_pick():
    split = plan_profiles(max_batch=8, max_seq=128, opt_seq=64)
    assert split == [Profile("decode", (1, 1, 8), (1, 1, 1)), Profile("prefill", (1, 1, 8), (1, 64, 128))]
    assert [p.name for p in plan_profiles(8, 128, 64, kind="single")] == ["any"]
    recorded = [p.to_json(i) for i, p in enumerate(split)]
    assert profile_for(recorded, batch=3, seq=1)["name"] == "decode"
    assert profile_for(recorded, batch=3, seq=2)["index"] == 1
    with pytest.raises(ConfigError, match="no optimization profile"):
        profile_for(recorded, batch=9, seq=1)
    with pytest.raises(ConfigError, match="--opt-seq"):
        plan_profiles(8, 128, 0)
    from decodekit.export.manifest import TensorSpec

    spec = TensorSpec("past_key_values.0.key", "float16", ["batch", 2, 128, 16])
    assert input_shapes(split[1], spec.name, (-1, 2, 128, 16), spec) == ((1, 2, 128, 16), (1, 2, 128, 16),
                                                                           (8, 2, 128, 16))
    ids = TensorSpec("input_ids", "int64", ["batch", "seq"])
    assert input_shapes(split[1], "input_ids", (-1, -1), ids) == ((1, 1), (1, 64), (8, 128))
    with pytest.raises(ConfigError, match="dynamic"):
        input_shapes(split[0], "x", (-1,), TensorSpec("x", "int64", ["tokens"]))


def test_layer_report_parsing():
    report = ("Layers:\nName: _gemm_mha_v2_myl0_6, LayerType: kgen, Inputs: [ { Name: a, Dimensions: [-1] }], "
              "TacticName: t0, StreamId: 0, Metadata: [ONNX Layer: node_attn][ONNX Layer: node_x]\n"
              "Name: node_ar, LayerType: comm_allreduce, Inputs: [], TacticName: , StreamId: 0, Metadata: \n\n"
              "I/O Tensors:\n Name: input_ids, IOMode: Input\n")
    layers = api.parse_layer_report(report)
    assert [(x["Name"], x["LayerType"]) for x in layers] == [("_gemm_mha_v2_myl0_6", "kgen"),
                                                              ("node_ar", "comm_allreduce")]
    assert api.onnx_nodes(layers[0]) == ["node_attn", "node_x"] and api.onnx_nodes(layers[1]) == []
    assert Counter(x["LayerType"] for x in layers) == {"kgen": 1, "comm_allreduce": 1}
