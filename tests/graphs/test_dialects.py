"""Each dialect against the std export on ONNX Runtime CPU: same outputs, expected node counts, valid artifacts.

Parity runs a mixed-length schedule (right-padded prefill of 6/2/4 tokens, 4 ragged decode steps, a 2-token
chunk on top of the cache, one row padded) with past and present bound to one buffer, and compares the valid
logit rows (fp32, within 1e-4 of the logit scale) and the valid cache rows.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import pytest

from decodekit.export.config import ConfigError
from decodekit.export.manifest import read_manifest
from decodekit.graphs.dialects import DIALECTS, get_dialect
from decodekit.graphs.pipeline import optimize

L = 2  # layers of the test checkpoints and preset:tiny
MS = "com.microsoft::"
TOL = 1e-4  # fp32: max-abs logit error relative to the logit scale


def ops(folder: Path, rank: int = 0) -> Counter:
    m = onnx.load(str(folder / f"rank{rank}.onnx"))
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in m.graph.node)


def expected_ops(dialect: str, qk_norm: bool) -> dict[str, int]:
    norms = 2 * L + 1 + (2 * L if qk_norm else 0)
    return {
        "std": {"Attention": L, "TensorScatter": 2 * L, "RMSNormalization": norms, "RotaryEmbedding": 2 * L},
        "ort-gqa": {MS + "GroupQueryAttention": L, MS + "SkipSimplifiedLayerNormalization": 2 * L,
                    "RMSNormalization": norms - 2 * L, "Attention": 0, "TensorScatter": 0, "RotaryEmbedding": 0,
                    MS + "RotaryEmbedding": 0},
        "decomposed": {"ScatterElements": 2 * L, "Softmax": L, "Attention": 0, "TensorScatter": 0,
                       "RMSNormalization": 0, "RotaryEmbedding": 0},
    }[dialect]


def assert_parity(ortkit, src: Path, dst: Path, vocab: int) -> tuple[float, float]:
    plan = ortkit.make_plan(vocab)
    ref, got = ortkit.OrtLoop(src / "rank0.onnx", 3), ortkit.OrtLoop(dst / "rank0.onnx", 3)
    logits_err = ortkit.compare(plan, ref.run(plan), got.run(plan))
    cache_err = ortkit.compare_caches(plan, ref, got)
    assert logits_err <= TOL, f"logits differ by {logits_err:.2e} of the logit scale"
    assert cache_err <= 1e-4, f"valid cache rows differ by {cache_err:.2e}"
    return logits_err, cache_err


@pytest.mark.parametrize("dialect", ["std", "ort-gqa", "decomposed"])
def test_dialect_matches_std_on_ort_cpu(dialect, llama_std, optimized, ortkit):
    out, report = optimized(llama_std, dialect)
    counts = ops(out)
    for op, n in expected_ops(dialect, qk_norm=False).items():
        assert counts[op] == n, f"{dialect}: {op} x{counts[op]}, expected {n} ({dict(counts)})"
    err = assert_parity(ortkit, llama_std, out, read_manifest(llama_std).config.vocab_size)
    print(f"{dialect}: relative logit error {err[0]:.2e}, cache error {err[1]:.2e}, counts {report['counts']}")


@pytest.mark.parametrize("dialect", ["ort-gqa", "decomposed"])
def test_qk_norm_family_lowers_and_matches(dialect, qwen3_std, optimized, ortkit):
    out, _ = optimized(qwen3_std, dialect)
    counts = ops(out)
    for op, n in expected_ops(dialect, qk_norm=True).items():
        assert counts[op] == n, f"{dialect}: {op} x{counts[op]}, expected {n}"
    assert_parity(ortkit, qwen3_std, out, read_manifest(qwen3_std).config.vocab_size)


def test_decomposed_fuses_back_to_std(llama_std, optimized, ortkit):
    decomposed, _ = optimized(llama_std, "decomposed")
    back, report = optimized(decomposed, "std")
    want = expected_ops("std", qk_norm=False)
    assert report["counts"]["fuse-std"] == want
    original, fused = ops(llama_std), ops(back)
    assert {op: fused[op] for op in want} == want
    assert sum(fused.values()) <= sum(original.values())  # nothing of the decomposition is left behind
    assert read_manifest(back).opset == 24 and read_manifest(decomposed).opset == 21
    assert_parity(ortkit, llama_std, back, read_manifest(llama_std).config.vocab_size)


def test_ort_gqa_with_separate_contrib_rotary(llama_std, tmp_path, ortkit):
    """fuse_rotary=False: com.microsoft RotaryEmbedding on q/k, then GroupQueryAttention(do_rotary=0)."""
    import onnx_ir as ir

    from decodekit.graphs.passes.lower_ort_gqa import LowerOrtGqaPass
    from decodekit.graphs.passes.shape_inference import ShapeInferencePass

    model = ir.load(str(llama_std / "rank0.onnx"))
    ShapeInferencePass()(model)
    lower = LowerOrtGqaPass(fuse_rotary=False)
    assert lower(model).modified
    (tmp_path / "a").mkdir()
    ir.save(model, str(tmp_path / "a" / "rank0.onnx"))
    counts = ops(tmp_path / "a")
    assert counts[MS + "RotaryEmbedding"] == 2 * L and counts[MS + "GroupQueryAttention"] == L
    assert all(attr.i == 0 for n in onnx.load(str(tmp_path / "a" / "rank0.onnx")).graph.node
               if n.op_type == "GroupQueryAttention" for attr in n.attribute if attr.name == "do_rotary")
    assert_parity(ortkit, llama_std, tmp_path / "a", read_manifest(llama_std).config.vocab_size)


def test_tp2_lowers_to_ort_gqa_keeping_collectives(tiny_tp2, optimized):
    out, report = optimized(tiny_tp2, "ort-gqa")
    man = read_manifest(out)
    assert man.tp == 2 and [r.onnx.file for r in man.ranks] == ["rank0.onnx", "rank1.onnx"]
    for rank in range(2):
        counts = ops(out, rank)
        assert counts["trt::DistCollective"] == 2 * L
        assert counts[MS + "GroupQueryAttention"] == L and counts[MS + "SkipSimplifiedLayerNormalization"] == 2 * L
        g = onnx.load(str(out / f"rank{rank}.onnx")).graph
        producer = {o: n.op_type for n in g.node for o in n.output}
        skips = [n for n in g.node if n.op_type == "SkipSimplifiedLayerNormalization"]
        assert all(producer[n.input[0]] == "DistCollective" for n in skips)  # all-reduce, then Add+RMSNorm fused
        gqa = next(n for n in g.node if n.op_type == "GroupQueryAttention")
        heads = {a.name: a.i for a in gqa.attribute}
        assert (heads["num_heads"], heads["kv_num_heads"]) == (2, 1)  # tiny: 4 heads / 2 kv heads over 2 ranks
    assert [r["rank"] for r in report["ranks"]] == [0, 1]


@pytest.mark.parametrize("dialect", ["ort-gqa", "decomposed"])
def test_manifest_and_files_of_the_new_artifact(dialect, llama_std, optimized):
    out, report = optimized(llama_std, dialect)
    src, man = read_manifest(llama_std), read_manifest(out, verify=True)  # checksums of every written file
    assert (man.dialect, man.dtype, man.tp, man.max_seq) == (dialect, "fp32", 1, src.max_seq)
    assert man.kv_layout["write"] == get_dialect(dialect).kv_write and man.kv_layout["in_place"]
    assert [s.name for s in man.inputs] == [s.name for s in src.inputs]
    assert [s.name for s in man.outputs] == [s.name for s in src.outputs]
    assert {p["name"] for p in man.passes} >= {"fold-constants", "fuse-std", "precision", "contract",
                                               f"lower-{dialect}"}
    assert man.tokenizer == src.tokenizer and all((out / f.file).is_file() for f in man.tokenizer)
    m = onnx.load(str(out / "rank0.onnx"))
    assert m.ir_version == 10
    opsets = {o.domain: o.version for o in m.opset_import}
    assert opsets[""] == man.opset == (24 if dialect == "ort-gqa" else 21)
    if dialect == "decomposed":
        assert all(onnx.defs.has(n.op_type, 21) for n in m.graph.node if n.domain == "")
        assert "com.microsoft" not in opsets
    onnx.checker.check_model(m, full_check=True)


def test_weights_over_the_threshold_go_to_external_data(llama_std, tmp_path, monkeypatch, ortkit):
    from decodekit.graphs import pipeline

    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 0)  # as if the model were over 2 GB
    man, _ = optimize(llama_std, tmp_path / "ext", "ort-gqa")
    assert [f.file for f in man.ranks[0].external_data] == ["rank0.onnx.data"]
    assert (tmp_path / "ext" / "rank0.onnx").stat().st_size < 100_000
    read_manifest(tmp_path / "ext", verify=True)
    assert_parity(ortkit, llama_std, tmp_path / "ext", man.config.vocab_size)


def test_refuses_unknown_dialect_and_bad_requests(llama_std, optimized, tmp_path):
    with pytest.raises(ConfigError, match="known dialects: " + ", ".join(DIALECTS)):
        optimize(llama_std, tmp_path / "x", "tensorrt-llm")
    with pytest.raises(ConfigError, match="unsupported dtype"):
        optimize(llama_std, tmp_path / "x", "std", dtype="int4")
    with pytest.raises(ConfigError, match="input artifact"):
        optimize(llama_std, llama_std, "std", force=True)
    gqa, _ = optimized(llama_std, "ort-gqa")
    with pytest.raises(ConfigError, match="optimize the std export"):
        optimize(gqa, tmp_path / "y", "decomposed")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(ConfigError, match="--force"):
        optimize(llama_std, tmp_path / "busy", "std")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no partial folders left


def test_ort_gqa_generates_the_same_greedy_tokens_as_std(llama_std, optimized):
    generate = pytest.importorskip("decodekit.runtime.generate")
    backend_mod = pytest.importorskip("decodekit.runtime.backend")
    gqa, _ = optimized(llama_std, "ort-gqa")
    prompts = [[1, 5, 9, 33, 2, 7], [1, 100], [1, 7, 200, 31]]  # mixed lengths: a right-padded prefill
    tokens = {}
    for name, folder in (("std", llama_std), ("ort-gqa", gqa)):
        with backend_mod.load_backend("ort", folder) as backend:
            tokens[name] = generate.generate_ids(backend, prompts, 32, eos_ids=())
    assert tokens["ort-gqa"] == tokens["std"]
    assert all(len(t) == 32 for t in tokens["std"])
