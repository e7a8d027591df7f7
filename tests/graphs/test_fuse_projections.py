"""fuse-projections: sibling MatMuls -> one MatMul + Split, checked against the unfused graph on ONNX Runtime CPU."""

from __future__ import annotations

from collections import Counter

import onnx
import pytest

from decodekit.export.manifest import read_manifest
from decodekit.graphs.passes.quantize import QuantOptions
from decodekit.graphs.pipeline import PassOptions, optimize

L = 2  # layers of the test checkpoints
TOL = 1e-5  # relative logit error: the same products, summed in another kernel


def ops(folder) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(folder / "rank0.onnx"), load_external_data=False).graph.node)


def parity(ortkit, a, b) -> float:
    plan = ortkit.make_plan(read_manifest(a).config.vocab_size)
    ref, got = ortkit.OrtLoop(a / "rank0.onnx", 3), ortkit.OrtLoop(b / "rank0.onnx", 3)
    err = ortkit.compare(plan, ref.run(plan), got.run(plan))
    assert ortkit.compare_caches(plan, ref, got) <= 1e-5
    return err


@pytest.fixture(scope="module")
def llama_pair(llama_std, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuse")
    _, fused = optimize(llama_std, root / "fused", "std")
    _, plain = optimize(llama_std, root / "plain", "std", options=PassOptions(fuse_projections=False))
    return root / "plain", root / "fused", fused


def test_qkv_and_gate_up_become_one_matmul_each(llama_pair):
    plain, fused, report = llama_pair
    assert report["counts"]["fuse-projections"] == {"groups": 2 * L, "matmuls": 5 * L}
    a, b = ops(plain), ops(fused)
    assert a["MatMul"] == 7 * L + 1 and b["MatMul"] == 4 * L + 1  # + the LM head
    assert a["Split"] == 0 and b["Split"] == 2 * L
    model = onnx.load(str(fused / "rank0.onnx"), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    cfg = read_manifest(fused).config
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
    fused_w = sorted(v for k, v in shapes.items() if ".fused" in k and not k.endswith(".split"))
    assert fused_w == sorted([[cfg.hidden_size, qkv]] * L + [[cfg.hidden_size, 2 * cfg.intermediate_size]] * L)
    names = {o for n in model.graph.node if n.op_type == "Split" for o in n.output}
    assert "linear" in names  # the Split outputs keep the replaced values' names


def test_qkv_only_leaves_gate_up_apart(llama_std, llama_pair, tmp_path, ortkit):
    plain, _, _ = llama_pair
    _, report = optimize(llama_std, tmp_path / "qkv", "std", options=PassOptions(fuse_min_members=3))
    assert report["counts"]["fuse-projections"] == {"groups": L, "matmuls": 3 * L}
    counts = ops(tmp_path / "qkv")
    assert counts["MatMul"] == 5 * L + 1 and counts["Split"] == L
    assert parity(ortkit, plain, tmp_path / "qkv") <= TOL


def test_fused_graph_computes_the_unfused_one(llama_pair, ortkit):
    plain, fused, _ = llama_pair
    assert parity(ortkit, plain, fused) <= TOL


def test_biases_fuse_with_their_projections(hf_checkpoint, exported, tmp_path, ortkit):
    src = exported(str(hf_checkpoint("qwen2")), max_seq=96, max_batch=4)  # q/k/v carry biases
    _, report = optimize(src, tmp_path / "fused", "std")
    counts = report["counts"]["fuse-projections"]
    assert counts == {"groups": 2 * L, "matmuls": 5 * L, "biases": L}
    _, _ = optimize(src, tmp_path / "plain", "std", options=PassOptions(fuse_projections=False))
    assert parity(ortkit, tmp_path / "plain", tmp_path / "fused") <= TOL


def test_gqa_reads_the_packed_qkv(llama_std, optimized):
    out, _ = optimized(llama_std, "ort-gqa")
    model = onnx.load(str(out / "rank0.onnx"), load_external_data=False)
    gqa = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == L and all(n.input[1] == "" and n.input[2] == "" for n in gqa)
    assert ops(out)["Split"] == L  # only gate/up is split; q/k/v go into GQA packed


def test_quantize_reads_the_fused_weights(llama_std, tmp_path):
    _, report = optimize(llama_std, tmp_path / "q", "ort-gqa", quantize=QuantOptions(4, 32))
    counts = report["counts"]["quantize"]
    assert counts["MatMulNBits"] == 4 * L and counts["skipped_lm_head"] == 1


def test_tp2_ranks_fuse_their_shards(tiny_tp2, tmp_path):
    _, report = optimize(tiny_tp2, tmp_path / "tp2", "std")
    for rank in report["ranks"]:
        fp = next(p for p in rank["passes"] if p["name"] == "fuse-projections")
        assert fp["counts"]["groups"] == 2 * L and fp["counts"]["matmuls"] == 5 * L
        assert rank["ops"]["trt::DistCollective"] == 2 * L


def test_weights_nk_computes_the_same_model(llama_std, tmp_path, ortkit):
    _, report = optimize(llama_std, tmp_path / "nk", "ort-gqa", options=PassOptions(weights_nk=True))
    assert report["counts"]["weights-nk"] == {"FusedMatMul": 4 * L + 1}
    assert ops(tmp_path / "nk")["MatMul"] == 0
    assert parity(ortkit, llama_std, tmp_path / "nk") <= 1e-4  # GQA vs std attention: test_dialects' tolerance
