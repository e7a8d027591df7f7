"""A tied LM head in the ONNX Runtime dialects reads the embedding table itself (graphs/passes/tied_lm_head.py):
one [vocab, hidden] tensor in the artifact, no Transpose for ONNX Runtime to fold into a second copy at load,
and the same tokens as the export."""

from __future__ import annotations

import dataclasses

import onnx
import pytest

from decodekit.export import config as C
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.graphs.pipeline import optimize
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.ort_backend import OrtBackend

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = [[5, 17, 99, 3], [12, 250, 64, 9]]


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    cfg = dataclasses.replace(C.preset("tiny"), tie_word_embeddings=True)
    C.PRESETS["test-tied-tiny"] = cfg
    try:
        out = tmp_path_factory.mktemp("tied") / "export"
        export_artifact("preset:test-tied-tiny", out, ExportOptions(max_seq=48, max_batch=2))
    finally:
        del C.PRESETS["test-tied-tiny"]
    return out, cfg


@pytest.mark.parametrize("dialect,dtype", [("ort-gqa-static", None), ("ort-gqa", None), ("ort-gqa-static", "fp16")])
def test_head_reads_the_embedding_table(tied, tmp_path, dialect, dtype):
    import onnxruntime as ort

    if dialect == "ort-gqa" and tuple(int(x) for x in ort.__version__.split(".")[:2]) < (1, 32):
        pytest.skip(f"the ort-gqa dialect needs onnxruntime >= 1.32 (this is {ort.__version__})")
    src, cfg = tied
    out = tmp_path / "a"
    _, report = optimize(src, out, dialect, dtype=dtype)
    assert report["counts"]["tied-lm-head"] == {"FusedMatMul": 1}
    graph = onnx.load(str(out / "rank0.onnx")).graph
    tables = [i for i in graph.initializer if cfg.vocab_size in i.dims]
    assert len(tables) == 1 and list(tables[0].dims) == [cfg.vocab_size, cfg.hidden_size]
    assert not [n for n in graph.node if n.op_type == "Transpose"]
    head = [n for n in graph.node if n.op_type == "FusedMatMul"]
    assert len(head) == 1 and head[0].input[1] == tables[0].name
    assert any(n.op_type == "Gather" and n.input[0] == tables[0].name for n in graph.node)
    with OrtBackend(src) as a, OrtBackend(out) as b:
        want = generate_ids(a, PROMPTS, 12, eos_ids=())
        assert generate_ids(b, PROMPTS, 12, eos_ids=()) == want


def test_std_keeps_the_standard_ops(tied, tmp_path):
    src, _ = tied
    optimize(src, tmp_path / "std", "std")
    graph = onnx.load(str(tmp_path / "std" / "rank0.onnx")).graph
    assert not [n for n in graph.node if n.domain == "com.microsoft"]
