"""Trace the block once: a 3-layer trace extended to L layers (graphs/replicate.py) equals a full L-layer trace,
and an artifact exported that way computes what transformers computes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest
import torch

from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.checkpoint import random_model
from decodekit.export.config import preset
from decodekit.export.sharding import shard
from decodekit.export.trace import trace
from decodekit.export.template import template_model
from decodekit.export.weights import bind_weights
from decodekit.graphs.replicate import TEMPLATE_LAYERS, LayerStructureError, node_layer, replicate_layers
from helpers import build_hf_checkpoint

L = 5  # two layers beyond the 3-layer template: copy 4 reads the chain from copy 3


def _traced(config, layers: int, tp: int, full: bool) -> ir.Model:
    if full:
        model = random_model(dataclasses.replace(config, num_layers=layers), seed=7, rope_positions=64)
        if tp > 1:
            shard(model, 0, tp)
    else:
        model = template_model(config, TEMPLATE_LAYERS, "fp32", 64, tp)
    program = trace(model, 4, 64, "last")
    bind_weights(program.model, model)
    if not full:
        replicate_layers(program.model, layers)
    return program.model


def _describe(model: ir.Model) -> dict:
    """Everything a full trace fixes, with intermediate value names replaced by (producer index, output index)."""
    g = model.graph
    nodes = list(g)
    where = {out: (i, o) for i, n in enumerate(nodes) for o, out in enumerate(n.outputs)}

    def constant(v):  # shape constants are named val_N by a counter that depends on the layer count
        name = v.name if not v.name.startswith("val_") else "val_*"
        return name, str(v.shape), v.const_value.tobytes()

    def ref(v):
        if v is None:
            return None
        if v.is_initializer():
            return constant(v)
        return where.get(v, v.name)  # graph inputs and weights by name

    def io(values):
        return [(v.name, str(v.type), str(v.shape)) for v in values]

    return {
        "inputs": io(g.inputs),
        "outputs": [(v.name, str(v.type), str(v.shape), where.get(v)) for v in g.outputs],
        "nodes": [(n.domain, n.op_type, node_layer(n),
                   sorted((k, str(a.value)) for k, a in n.attributes.items()), [ref(v) for v in n.inputs])
                  for n in nodes],
        "initializers": sorted(constant(v) for v in g.initializers.values()),
        "weights": sorted({(v.name, str(v.shape), str(v.type)) for n in nodes for v in n.inputs
                           if v is not None and v.producer() is None and v.name.startswith("model.")
                           and v.name not in g.initializers}),
    }


@pytest.mark.parametrize("tp", [1, 2])
def test_replicated_graph_equals_a_full_trace(tp):
    config = dataclasses.replace(preset("tiny"), num_layers=L)
    full, replicated = _describe(_traced(config, L, tp, True)), _describe(_traced(config, L, tp, False))
    for key in ("inputs", "outputs", "initializers", "weights"):
        assert replicated[key] == full[key], key
    assert len(replicated["nodes"]) == len(full["nodes"])
    for i, (a, b) in enumerate(zip(replicated["nodes"], full["nodes"])):
        assert a == b, f"node {i}: {a} != {b}"
    per_layer = [sum(1 for n in full["nodes"] if n[2] == k) for k in range(L)]
    assert per_layer[1:] == [per_layer[1]] * (L - 1)
    collectives = [n for n in full["nodes"] if n[1] == "DistCollective"]
    assert len(collectives) == (2 * L if tp > 1 else 0)
    assert len(full["weights"]) == 2 + 9 * L + 1  # embed, input norm, 9 per layer, lm_head


def test_replicate_refuses_a_graph_without_the_layer_structure():
    model = _traced(preset("tiny"), 2, 1, True)  # 2 layers: no middle layer to copy
    with pytest.raises(LayerStructureError):
        replicate_layers(model, 5)


S, F = "sliding_attention", "full_attention"
REPLICATED = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    # layers of two kinds, window 3 (shorter than the prompt): layer 2 is traced as layer 3's kind (the template
    # needs one of each), then reads its own kind's mask (and Gemma 3's local RoPE tables) again
    "qwen2-max_window_layers=3": ("qwen2", {"use_sliding_window": True, "sliding_window": 3, "max_window_layers": 3}),
    "gemma3_text-SSSFS": ("gemma3_text", {"sliding_window": 3, "layer_types": [S, S, S, F, S]}),
    "gemma2": ("gemma2", {"sliding_window": 3}),
}


@pytest.mark.parametrize("name", list(REPLICATED))
def test_replicated_export_matches_transformers(tmp_path, name):
    """A 5-layer checkpoint (2 layers replicated) through ONNX Runtime: the logits of transformers."""
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    family, overrides = REPLICATED[name]
    hf = build_hf_checkpoint(family, tmp_path / "hf", num_hidden_layers=L, **overrides)
    out = tmp_path / "art"
    said: list[str] = []
    manifest = export_artifact(str(hf), out, ExportOptions(max_seq=32, max_batch=2), said.append)
    assert any(f"3 of {L} layers traced" in m for m in said) and not any("tracing all" in m for m in said), said
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32, attn_implementation="eager").eval()
    ids = np.array([[3, 17, 42, 7, 99, 5]], dtype=np.int64)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    sess = ort.InferenceSession(str(out / "rank0.onnx"), providers=["CPUExecutionProvider"])
    kv = manifest.kv_layout
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None], "write_indices": np.zeros(1, np.int64),
             "nonpad_kv_seqlen": np.array([ids.shape[1]], np.int64)}
    for i in range(L):
        for k in ("key", "value"):
            feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, kv["kv_heads_local"], 32, kv["head_dim"]), np.float32)
    got = sess.run(["logits"], feeds)[0]
    assert np.abs(got - want).max() <= 1e-4 * max(float(np.abs(want).max()), 1.0)


def test_streamed_rank_weights_are_the_sharded_checkpoint(tmp_path):
    """tp=2 over a 5-layer qwen3 checkpoint (q/k norms): each rank file holds export/sharding.py's slices."""
    import onnx

    from decodekit.export.checkpoint import load_hf
    from decodekit.export.weights import parse_weight_name

    hf = build_hf_checkpoint("qwen3", tmp_path / "hf", num_hidden_layers=L)
    export_artifact(str(hf), tmp_path / "art", ExportOptions(max_seq=32, max_batch=2, tp=2))
    for rank in range(2):
        want = dict(shard(load_hf(hf), rank, 2).named_parameters())
        model = onnx.load(str(tmp_path / "art" / f"rank{rank}.onnx"))
        weights = [t for t in model.graph.initializer if t.name.startswith("model.") and "rope" not in t.name]
        assert len(weights) == 2 + 11 * L + 1
        for t in weights:
            ref = parse_weight_name(t.name)
            p = want[ref.param].detach()
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), (p.t() if ref.transpose else p).numpy(),
                                          err_msg=t.name)


def test_export_falls_back_to_a_full_trace_without_layer_metadata(tmp_path, monkeypatch):
    """No module-scope metadata (node_layer finds nothing): the exporter traces all layers and says so."""
    import decodekit.graphs.replicate as replicate_mod
    from decodekit.export.artifact import step_graph

    config = dataclasses.replace(preset("tiny"), num_layers=4)
    monkeypatch.setattr(replicate_mod, "node_layer", lambda node: None)
    said: list[str] = []
    full, specs = step_graph(config, ExportOptions(max_seq=64, max_batch=4), said.append)
    assert any("tracing all 4 layers" in m for m in said)
    assert [v.name for v in full.graph.input][-2:] == ["past_key_values.3.key", "past_key_values.3.value"]
    assert sum(n.op_type == "Attention" for n in full.graph.node) == 4
    assert len(specs) == 2 + 9 * 4 + 1
