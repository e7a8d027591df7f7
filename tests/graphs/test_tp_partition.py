"""graphs.tp_partition: a tp=2 rank graph cut at its collectives runs, segment by segment, as the tp=1 graph does.

The reference is the tp=1 artifact of the same preset (whole graph, ONNX Runtime); the tp=2 side runs both
ranks' segments in this process and sums the two partials by hand where the DistCollective was.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from decodekit.graphs.tp_partition import (
    PartitionError,
    collective_inputs,
    insert_cuts,
    partition,
    plan_storage,
    segment_bytes,
)

L = 2  # preset:tiny layers
MAX_SEQ = 512  # = conftest TP_MAX_SEQ (tp1 / tp2 fixtures)




def _session(model: bytes | str, folder: Path | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _steps(vocab: int) -> list[dict[str, np.ndarray]]:
    """A right-padded prefill of two prompts (5 and 3 tokens), then three one-token decode steps."""
    rng = np.random.default_rng(0)
    lens = np.array([5, 3])
    ids = rng.integers(3, vocab, (2, 5))
    steps = [dict(input_ids=ids, position_ids=np.tile(np.arange(5), (2, 1)), write_indices=np.zeros(2, np.int64),
                  nonpad_kv_seqlen=lens)]
    for _ in range(3):
        steps.append(dict(input_ids=rng.integers(3, vocab, (2, 1)), position_ids=lens[:, None].copy(),
                          write_indices=lens.copy(), nonpad_kv_seqlen=lens + 1))
        lens = lens + 1
    return steps


def _zero_caches(session_inputs, batch: int) -> dict[str, np.ndarray]:
    return {i.name: np.zeros([batch if isinstance(d, str) else d for d in i.shape], np.float32)
            for i in session_inputs if i.name.startswith("past_key_values.")}


def _run_whole(path: Path, steps: list[dict]) -> list[np.ndarray]:
    s = _session(str(path))
    caches = _zero_caches(s.get_inputs(), 2)
    out = []
    for feeds in steps:
        names = [o.name for o in s.get_outputs()]
        res = dict(zip(names, s.run(names, {**{k: v.astype(np.int64) for k, v in feeds.items()}, **caches})))
        caches = {k: res[k.replace("past_key_values.", "present.")] for k in caches}
        out.append(res["logits"])
    return out


def _run_segments(parts, sessions, steps: list[dict]) -> list[np.ndarray]:
    """Both ranks' segments in lock step; after each segment the partials are summed over ranks by hand."""
    ranks = range(len(parts))
    reduced_name = {src: dst for dst, src in parts[0].aliases.items()}
    caches = [_zero_caches([i for s in sessions[r] for i in s.get_inputs()], 2) for r in ranks]
    out = []
    for feeds in steps:
        env = [{**{k: v.astype(np.int64) for k, v in feeds.items()}, **caches[r]} for r in ranks]
        for k, seg in enumerate(parts[0].segments):
            for r in ranks:
                seg_r = parts[r].segments[k]
                env[r].update(zip(seg_r.outputs, sessions[r][k].run(list(seg_r.outputs),
                                                                      {n: env[r][n] for n in seg_r.inputs})))
            for name in seg.reduce:
                total = sum(env[r][name] for r in ranks)
                for r in ranks:
                    env[r][reduced_name[name]] = total
        for r in ranks:
            caches[r] = {n: env[r][n.replace("past_key_values.", "present.")] for n in caches[r]}
        out.append(env[0]["logits"])
    return out


def _max_rel(ref: list[np.ndarray], got: list[np.ndarray], steps: list[dict]) -> float:
    scale = max(float(np.abs(r).max()) for r in ref)
    worst = 0.0
    for r, g, feeds in zip(ref, got, steps):
        valid = np.minimum(feeds["nonpad_kv_seqlen"] - feeds["write_indices"], r.shape[1])
        for b, n in enumerate(valid):
            worst = max(worst, float(np.abs(r[b, :n] - g[b, :n]).max()))
    return worst / scale


# ---------------------------------------------------------------------------------------------------- tests


def test_tp2_rank_graph_cuts_into_2L_plus_1_loadable_segments(tp2: Path) -> None:
    for rank in range(2):
        p = partition(ir.load(str(tp2 / f"rank{rank}.onnx")))
        assert p.counts["segments"] == 2 * L + 1 and p.counts["collectives"] == 2 * L
        assert p.counts["cross_tensors"] == 4 * L  # per boundary: the partial sum and the residual, nothing else
        assert [len(s.reduce) for s in p.segments] == [1] * (2 * L) + [0]
        for s in p.segments:
            assert all(n.op_type != "DistCollective" for n in s.model.graph)
            proto = ir.to_proto(s.model)
            onnx.checker.check_model(proto)
            _session(segment_bytes(s))  # ORT-loadable
        # each layer's cache is read and written by one segment: the attention segment 2*i
        for i in range(L):
            for kv in ("key", "value"):
                writers = [s.index for s in p.segments if f"present.{i}.{kv}" in s.outputs]
                assert writers == [2 * i]
                assert f"past_key_values.{i}.{kv}" in p.segments[2 * i].inputs
        assert p.segments[-1].outputs == ("logits",)


def test_storage_plan_shares_the_partial_slot_and_never_aliases_within_a_segment(tp2: Path) -> None:
    p = partition(ir.load(str(tp2 / "rank0.onnx")))
    plan = plan_storage(p)
    for reduced, partial in p.aliases.items():
        assert plan.slot_of[reduced] == plan.slot_of[partial]
    assert len(plan.slots) <= 4  # residual and partial, each double-buffered
    for s in p.segments:
        read = {plan.slot_of[n] for n in s.inputs if n in plan.slot_of}
        written = {plan.slot_of[n] for n in s.outputs if n in plan.slot_of}
        assert not read & written, f"segment {s.index} reads and writes one slot"


def test_segments_with_a_manual_sum_reproduce_tp1_logits(tp1: Path, tp2: Path) -> None:
    parts = [partition(ir.load(str(tp2 / f"rank{r}.onnx"))) for r in range(2)]
    sessions = [[_session(segment_bytes(s)) for s in p.segments] for p in parts]
    steps = _steps(vocab=512)
    ref = _run_whole(tp1 / "rank0.onnx", steps)
    got = _run_segments(parts, sessions, steps)
    assert _max_rel(ref, got, steps) <= 1e-4
    for r, g in zip(ref, got):  # and the greedy choice of every valid position agrees
        assert (r[:, -1].argmax(-1) == g[:, -1].argmax(-1)).all()


def test_tp1_graph_cut_where_tp2_is_cut_matches_the_whole_graph(tp1: Path, tp2: Path) -> None:
    model = ir.load(str(tp1 / "rank0.onnx"))
    assert insert_cuts(model, collective_inputs(ir.load(str(tp2 / "rank0.onnx")))) == 2 * L
    p = partition(model)
    assert p.counts["segments"] == 2 * L + 1
    sessions = [[_session(segment_bytes(s)) for s in p.segments]]
    steps = _steps(vocab=512)
    assert _max_rel(_run_whole(tp1 / "rank0.onnx", steps), _run_segments([p], sessions, steps), steps) <= 1e-6


def test_a_constant_subgraph_moves_to_its_consumer(tp2: Path) -> None:
    """A tied lm_head is exported as MatMul(x, Transpose(embedding)): the Transpose must not cross segments."""
    model = ir.load(str(tp2 / "rank0.onnx"))
    graph = model.graph
    matmul = next(n for n in graph if n.outputs[0].name == "logits")
    weight = matmul.inputs[1]
    tied = ir.Value(name="tied_embedding", const_value=ir.tensor(weight.const_value.numpy().T.copy()))
    graph.register_initializer(tied)
    transpose = ir.Node("", "Transpose", [tied], [ir.AttrInt64s("perm", [1, 0])], name="lm_head_T")
    transpose.outputs[0].name, transpose.outputs[0].dtype = "lm_head_T", weight.dtype
    transpose.outputs[0].shape = weight.shape
    graph.insert_before(next(iter(graph)), transpose)
    matmul.replace_input_with(1, transpose.outputs[0])
    p = partition(model)
    assert p.counts["cross_tensors"] == 4 * L
    assert [s.index for s in p.segments if any(n.name == "lm_head_T" for n in s.model.graph)] == [2 * L]


def test_external_data_stays_external(tp2: Path, tmp_path: Path) -> None:
    model = ir.load(str(tp2 / "rank1.onnx"))
    ir.save(model, str(tmp_path / "rank1.onnx"), external_data="rank1.onnx.data", size_threshold_bytes=0)
    p = partition(ir.load(str(tmp_path / "rank1.onnx")))
    blob = segment_bytes(p.segments[1])
    weights = [t for t in onnx.load_from_string(blob).graph.initializer if len(t.dims) == 2]
    assert len(weights) == 3  # gate, up, down: references into rank1.onnx.data, not copies
    assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in weights)
    _session(blob, tmp_path)


def test_refuses_a_collective_it_cannot_cut(tp2: Path) -> None:
    model = ir.load(str(tp2 / "rank0.onnx"))
    node = next(n for n in model.graph if n.op_type == "DistCollective")
    node.attributes["reduce_op"] = ir.AttrString("reduce_op", "max")
    with pytest.raises(PartitionError, match="all_reduce/sum"):
        partition(model)


def test_a_graph_without_collectives_is_one_segment(tp1: Path) -> None:
    p = partition(ir.load(str(tp1 / "rank0.onnx")))
    assert p.counts["segments"] == 1 and not p.aliases and p.segments[0].outputs[0] == "logits"


def test_row_parallel_biases_cross_the_cut_once(hf_checkpoint, exported) -> None:
    """o_proj / down_proj biases (llama attention_bias + mlp_bias): each is one Add after its DistCollective, so the
    segments of both ranks with a manual sum still reproduce the tp=1 logits (a per-rank bias would add it twice)."""
    src = str(hf_checkpoint("llama", attention_bias=True, mlp_bias=True, hidden_act="gelu"))
    tp1, tp2 = (exported(src, tp=tp, max_seq=16, max_batch=2) for tp in (1, 2))
    graph = ir.load(str(tp2 / "rank0.onnx")).graph
    biased = [u.node for n in graph if n.op_type == "DistCollective" for u in n.outputs[0].uses()
              if u.node.op_type == "Add" and any(v.const_value is not None for v in u.node.inputs)]
    assert len(biased) == 2 * L  # all-reduce -> Add(bias initializer)
    assert {n.inputs[0].producer().op_type for n in graph if n.op_type == "DistCollective"} == {"MatMul"}
    assert _segments_error(tp1, tp2) <= 1e-4


def _segments_error(tp1: Path, tp2: Path) -> float:
    """Max error (relative to the logit scale) of tp2's segments of both ranks, summed by hand, against tp1."""
    parts = [partition(ir.load(str(tp2 / f"rank{r}.onnx"))) for r in range(2)]
    sessions = [[_session(segment_bytes(s)) for s in p.segments] for p in parts]
    steps = _steps(vocab=256)
    return _max_rel(_run_whole(tp1 / "rank0.onnx", steps), _run_segments(parts, sessions, steps), steps)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_gemma_post_norms_windows_and_soft_caps_cross_the_cut(hf_checkpoint, exported, family) -> None:
    """Gemma's post-norm after each all-reduce, sliding-window masks (window 3, shorter than the 8 positions run)
    shared by the segments, soft caps: both ranks' segments reproduce the tp=1 logits."""
    src = str(hf_checkpoint(family, sliding_window=3))
    assert _segments_error(*(exported(src, tp=tp, max_seq=16, max_batch=2) for tp in (1, 2))) <= 1e-4
