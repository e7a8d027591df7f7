"""ort-gqa-uniform and ort-gqa-static: the 16-input GroupQueryAttention form onnxruntime < 1.32 (e.g.
onnxruntime-gpu 1.31) reads; -static computes total_sequence_length from shapes alone (CUDA graph capture)."""

from __future__ import annotations

import onnx
import pytest

from decodekit.graphs.pipeline import optimize
from decodekit.runtime.generate import GenerationError, generate_ids
from decodekit.runtime.ort_backend import OrtBackend

pytestmark = pytest.mark.usefixtures("one_thread")
DIALECTS = ["ort-gqa-uniform", "ort-gqa-static"]


@pytest.fixture(scope="module")
def artifacts(exported, hf_checkpoint, tmp_path_factory):
    std = exported(str(hf_checkpoint("llama")), max_seq=96, max_batch=4)
    out = {"std": std}
    for d in DIALECTS:
        out[d] = tmp_path_factory.mktemp(d) / "a"
        optimize(std, out[d], d)
    return out


def _ancestors(graph: onnx.GraphProto, name: str) -> set[str]:
    producer = {o: n for n in graph.node for o in n.output}
    seen, todo = set(), [name]
    while todo:
        v = todo.pop()
        if v in seen or not v:
            continue
        seen.add(v)
        if v in producer:
            todo.extend(producer[v].input)
    return seen


@pytest.mark.parametrize("dialect", DIALECTS)
def test_gqa_has_16_inputs_and_no_std_attention(dialect, artifacts):
    graph = onnx.load(str(artifacts[dialect] / "rank0.onnx")).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) <= 16 for n in gqa)
    assert not [n for n in graph.node if n.op_type in ("Attention", "TensorScatter")]
    # total_sequence_length (input 6): from the cache lengths, or (static) from shapes and constants only
    from_lengths = "nonpad_kv_seqlen" in _ancestors(graph, gqa[0].input[6])
    assert from_lengths == (dialect == "ort-gqa-uniform")


@pytest.mark.parametrize("dialect", DIALECTS)
def test_uniform_batch_generates_the_std_tokens(dialect, artifacts):
    prompts = [[5, 17, 99, 3, 200, 42], [12, 250, 64, 9, 130, 7]]
    with OrtBackend(artifacts["std"], intra_op_threads=1) as a, \
            OrtBackend(artifacts[dialect], intra_op_threads=1) as b:
        assert generate_ids(b, prompts, 48, eos_ids=()) == generate_ids(a, prompts, 48, eos_ids=())
        assert generate_ids(b, [[9]], 8, eos_ids=()) == generate_ids(a, [[9]], 8, eos_ids=())  # one-token prompt


@pytest.mark.parametrize("dialect", DIALECTS)
def test_mixed_lengths_are_refused_with_the_fix(dialect, artifacts):
    with OrtBackend(artifacts[dialect], intra_op_threads=1) as b, pytest.raises(GenerationError, match="equal length"):
        generate_ids(b, [[5, 6, 7], [8, 9]], 4)
