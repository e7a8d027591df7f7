"""ort-gqa-uniform: the 16-input GroupQueryAttention form onnxruntime < 1.32 (e.g. onnxruntime-gpu 1.31) reads."""

from __future__ import annotations

import onnx
import pytest

from decodekit.graphs.pipeline import optimize
from decodekit.runtime.generate import GenerationError, generate_ids
from decodekit.runtime.ort_backend import OrtBackend

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair(exported, hf_checkpoint, tmp_path_factory):
    std = exported(str(hf_checkpoint("llama")), max_seq=96, max_batch=4)
    uniform = tmp_path_factory.mktemp("gqa-u") / "a"
    optimize(std, uniform, "ort-gqa-uniform")
    return std, uniform


def test_gqa_has_16_inputs_and_no_std_attention(pair):
    _, uniform = pair
    nodes = onnx.load(str(uniform / "rank0.onnx")).graph.node
    gqa = [n for n in nodes if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(len(n.input) <= 16 for n in gqa)
    assert not [n for n in nodes if n.op_type in ("Attention", "TensorScatter")]


def test_uniform_batch_generates_the_std_tokens(pair):
    std, uniform = pair
    prompts = [[5, 17, 99, 3, 200, 42], [12, 250, 64, 9, 130, 7]]
    with OrtBackend(std, intra_op_threads=1) as a, OrtBackend(uniform, intra_op_threads=1) as b:
        assert generate_ids(b, prompts, 48, eos_ids=()) == generate_ids(a, prompts, 48, eos_ids=())


def test_mixed_lengths_are_refused_with_the_fix(pair):
    _, uniform = pair
    with OrtBackend(uniform, intra_op_threads=1) as b, pytest.raises(GenerationError, match="equal length"):
        generate_ids(b, [[5, 6, 7], [8, 9]], 4)
