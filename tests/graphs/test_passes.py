"""The passes one by one: the onnx_ir pass contract, reports, shape inference, precision, debug reasons."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from decodekit.export.manifest import read_manifest
from decodekit.graphs.dialects import get_dialect
from decodekit.graphs.passes.base import DialectError
from decodekit.graphs.passes.cse import CsePass
from decodekit.graphs.passes.dead_code import DeadCodeEliminationPass
from decodekit.graphs.passes.fold_constants import FoldConstantsPass
from decodekit.graphs.passes.lower_ort_gqa import LowerOrtGqaPass
from decodekit.graphs.passes.precision import ConvertPrecisionPass
from decodekit.graphs.passes.shape_inference import ShapeInferencePass
from decodekit.graphs.passes.contract import io_signature
from decodekit.graphs.pipeline import build_passes, optimize_model

L = 2


def load(folder) -> ir.Model:
    return ir.load(str(folder / "rank0.onnx"))


def ops(model: ir.Model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def test_pipeline_reports_every_pass_and_whether_it_modified(llama_std):
    model = load(llama_std)
    names = [p.name for p in build_passes(get_dialect("ort-gqa"), None, io_signature(model))]
    reports = optimize_model(model, "ort-gqa")
    assert [r.name for r in reports] == names
    assert all(isinstance(v, int) for r in reports for v in r.counts.values())
    by_name = {r.name: r for r in reports}
    assert by_name["lower-ort-gqa"].modified
    assert by_name["lower-ort-gqa"].counts == {"GroupQueryAttention": L, "SkipSimplifiedLayerNormalization": 2 * L}
    assert not by_name["fuse-std"].modified  # nothing decomposed in an export
    again = LowerOrtGqaPass()(model)  # idempotent: nothing left to lower, and it says so
    assert not again.modified and again.model is model


def test_fold_cse_and_dead_code_on_a_small_graph():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    nodes = [
        helper.make_node("Constant", [], ["a"], value=helper.make_tensor("a", TensorProto.FLOAT, [2], [1, 2])),
        helper.make_node("Constant", [], ["b"], value=helper.make_tensor("b", TensorProto.FLOAT, [2], [3, 4])),
        helper.make_node("Add", ["a", "b"], ["ab"]),  # constant: folds
        helper.make_node("Add", ["x", "ab"], ["y"]),
        helper.make_node("Neg", ["x"], ["n1"]), helper.make_node("Neg", ["x"], ["n2"]),  # common subexpression
        helper.make_node("Add", ["n1", "n2"], ["z"]),
        helper.make_node("Mul", ["x", "x"], ["unused"]),  # dead
    ]
    graph = helper.make_graph(nodes, "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]),
                                                  helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10))
    passes = [FoldConstantsPass(), CsePass(), DeadCodeEliminationPass()]
    results = [p(model) for p in passes]
    assert all(r.modified for r in results)
    assert passes[0].report.counts["nodes_removed"] >= 1 and passes[1].report.counts["nodes_removed"] == 1
    assert ops(model) == Counter({"Add": 2, "Neg": 1})
    assert not any(p(model).modified for p in passes)  # a second run finds nothing


def test_shape_inference_gives_rules_what_they_check(llama_std):
    proto = onnx.load(str(llama_std / "rank0.onnx"))
    del proto.graph.value_info[:]  # no intermediate shapes: the GQA rule cannot see head counts
    with pytest.raises(ir.passes.PostconditionError) as e:
        LowerOrtGqaPass()(ir.from_proto(proto))
    assert isinstance(e.value.__cause__, DialectError) and "not static" in str(e.value.__cause__)
    model = ir.from_proto(proto)
    infer = ShapeInferencePass()
    assert infer(model).modified and infer.report.counts["newly_typed"] > 0
    assert LowerOrtGqaPass()(model).modified


@pytest.mark.parametrize("dtype,onnx_type", [("fp16", ir.DataType.FLOAT16), ("bf16", ir.DataType.BFLOAT16)])
def test_precision_converts_weights_io_and_keeps_fp32_where_ops_allow(llama_std, dtype, onnx_type):
    model = load(llama_std)
    reports = {r.name: r for r in optimize_model(model, "std", dtype)}
    g = model.graph
    inputs = {v.name: v.dtype for v in g.inputs}
    steps = ("input_ids", "position_ids", "write_indices", "nonpad_kv_seqlen")
    assert all(inputs[n] == ir.DataType.INT64 for n in steps)
    assert {inputs[n] for n in inputs if n.startswith("past_")} == {onnx_type}
    assert {v.dtype for v in g.outputs} == {onnx_type}  # logits and present caches
    assert {v.dtype for v in g.initializers.values() if v.dtype.is_floating_point()} == {onnx_type}
    # std stays TensorRT-parsable: no softmax_precision (TensorRT-RTX refuses it); RMSNorm statistics in fp32
    assert all("softmax_precision" not in n.attributes for n in g if n.op_type == "Attention")
    assert all(n.attributes.get_int("stash_type", 1) == 1 for n in g if n.op_type == "RMSNormalization")
    assert reports["precision"].counts["attention_fp32_softmax"] == 0


def test_decomposed_fp16_keeps_fp32_islands_and_precision_refuses_them(llama_std):
    model = load(llama_std)
    optimize_model(model, "decomposed", "fp16")
    g = model.graph
    to_fp32 = [n for n in g if n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.FLOAT]
    assert len(to_fp32) == (2 * L + 1) + L  # every RMSNorm and every softmax runs in fp32
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT for n in g if n.op_type in ("Softmax", "ReduceMean"))
    with pytest.raises(ir.passes.PreconditionError) as e:
        ConvertPrecisionPass("bf16")(model)
    assert "one float dtype" in str(e.value.__cause__)


def _greedy(loop, prompts: list[list[int]], steps: int, forced: np.ndarray | None = None):
    """Greedy decoding, or teacher forcing with `forced` [steps, B]; returns tokens [steps, B], logits [steps, B, V]."""
    B = len(prompts)
    n = np.array([len(p) for p in prompts])
    ids = np.zeros((B, n.max()), np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    logits = loop.step(ids, np.tile(np.arange(n.max()), (B, 1)), np.zeros(B, np.int64), n)
    last = logits[np.arange(B), n - 1]
    tokens, rows = [], []
    for t in range(steps):
        rows.append(last)
        tokens.append(last.argmax(-1) if forced is None else forced[t])
        last = loop.step(tokens[-1][:, None], n[:, None], n, n + 1)[:, 0]
        n = n + 1
    return np.array(tokens), np.array(rows)


@pytest.mark.parametrize("dialect", ["std", "ort-gqa"])
def test_fp16_greedy_agrees_with_fp32_over_64_steps(dialect, llama_std, optimized, ortkit):
    steps, prompts = 64, [[1, 5, 9, 33, 2, 7], [1, 100], [1, 7, 200, 31]]
    fp16, _ = optimized(llama_std, dialect, "fp16")
    assert read_manifest(fp16).dtype == "fp16"
    ref_tokens, ref_logits = _greedy(ortkit.OrtLoop(llama_std / "rank0.onnx", 3), prompts, steps)
    _, forced_logits = _greedy(ortkit.OrtLoop(fp16 / "rank0.onnx", 3), prompts, steps, forced=ref_tokens)
    free_tokens, _ = _greedy(ortkit.OrtLoop(fp16 / "rank0.onnx", 3), prompts, steps)
    err = np.abs(forced_logits - ref_logits)
    scale = float(np.abs(ref_logits).max())
    top2 = np.sort(ref_logits, -1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]  # fp32 gap between the best and second-best token
    top1 = float((forced_logits.argmax(-1) == ref_tokens).mean())
    agree = [int(np.argmax(free_tokens[:, b] != ref_tokens[:, b])) if (free_tokens[:, b] != ref_tokens[:, b]).any()
             else steps for b in range(len(prompts))]
    print(f"\nfp16 {dialect}: max abs logit err {err.max():.4f} (mean {err.mean():.5f}, logit scale {scale:.2f}, "
          f"relative {err.max() / scale:.2e}); teacher-forced top-1 agreement {top1:.3f}; greedy tokens agree "
          f"for {agree} of {steps} steps; fp32 top-2 margin where they part: "
          f"{[round(float(margin[a, b]), 4) for b, a in enumerate(agree) if a < steps]}")
    assert err.max() / scale < 1e-2
    assert top1 >= 0.95
    assert max(agree) == steps  # at least one sequence identical over all 64 steps
    for b, a in enumerate(agree):  # any divergence is at a near-tie that fp16 rounding can flip
        assert a == steps or margin[a, b] <= 2 * err.max(), f"prompt {b} parted at step {a}, margin {margin[a, b]}"


def test_debug_says_why_rules_did_not_match(llama_std):
    model = load(llama_std)
    reports = {r.name: r for r in optimize_model(model, "ort-gqa", debug=True)}
    skip = reports["lower-ort-gqa"].why_not["SkipSimplifiedLayerNormalization"]
    assert any("expected Add, got Gather" in r for r in skip)  # the embedding's norm has no residual add
    assert reports["fuse-std"].why_not  # nothing to fuse in an export, and the reasons say where it stopped
    quiet = optimize_model(load(llama_std), "ort-gqa")  # without debug, no reasons are collected
    assert all(not r.why_not and "why_not" not in r.to_dict() for r in quiet)


def test_unlowerable_attention_is_refused_with_the_reason(llama_std):
    model = load(llama_std)
    attn = next(n for n in model.graph if n.op_type == "Attention")
    mask = attn.inputs[3]
    inverted = ir.node("Not", [ir.node("Not", [mask]).outputs[0]])  # same mask, not the contract's form
    double = inverted.inputs[0].producer()
    model.graph.insert_before(attn, [double, inverted])
    attn.replace_input_with(3, inverted.outputs[0])
    with pytest.raises(DialectError, match="attention mask is not"):
        optimize_model(model, "ort-gqa")
