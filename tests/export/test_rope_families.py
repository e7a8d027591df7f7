"""RoPE scaling types and the Phi-3 family end to end, against transformers' own models (tiny random checkpoints).

Each case is exported (fp32), run on ONNX Runtime CPU in the std and ort-gqa dialects, and compared with
transformers: prefill and teacher-forced decode logits within the fp32 tolerance, and 64 greedy tokens identical to
generate(). Each also builds as a TensorRT-RTX fp16 engine. Where a static table cannot equal transformers (longrope
and dynamic beyond their switch lengths, export/rope.py) the test pins both sides of the documented behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import ort_greedy, transformers_greedy

RTOL = 1e-4  # max |ours - ref| relative to the logit scale (the fp32 tolerance of tests/export/test_model_parity.py)
MAX_SEQ = 96
NEW = 64
PROMPT = [5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71]
LONG_PROMPT = PROMPT + [12, 250, 64, 9, 130, 77, 1, 201, 45]  # 20 tokens: beyond original_max_position_embeddings 16
DECODE = [12, 250, 64, 9, 130, 77, 1, 201, 45, 88]


def _factors(n: int, start: float, step: float) -> list[float]:
    return [start + step * i for i in range(n)]


def _longrope(n: int) -> dict[str, Any]:
    return {"rope_type": "longrope", "short_factor": _factors(n, 1.0, 0.125), "long_factor": _factors(n, 1.5, 0.5)}


# id -> (family, transformers config overrides, prompt); every case is exported at --max-seq 96
CASES: dict[str, tuple[str, dict[str, Any], list[int]]] = {
    # Phi-3.5-mini style: whole-head rotary, longrope; 96 <= original 256: short factors (attention factor of 512/256)
    "phi3-longrope-short": ("phi3", {"partial_rotary_factor": 1.0, "rope_scaling": _longrope(8)}, PROMPT),
    # 96 > original 16: long factors; exact because every step reaches beyond position 16 (a 20-token prompt)
    "phi3-longrope-long": ("phi3", {"partial_rotary_factor": 1.0, "rope_scaling": _longrope(8),
                                    "original_max_position_embeddings": 16}, LONG_PROMPT),
    # Phi-4-mini style: rotary on 48 of 64 dims per head (GQA rotates it: 24 is a multiple of 8), longrope, tied
    "phi4-mini-partial": ("phi3", {"hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
                                   "partial_rotary_factor": 0.75, "rope_scaling": _longrope(24),
                                   "tie_word_embeddings": True}, PROMPT),
    # positions up to 75 cross original_max_position_embeddings 64: all yarn bands are used; attention factor > 1
    "llama-yarn": ("llama", {"max_position_embeddings": 256, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}}, PROMPT),
    # 96 <= max_position_embeddings 512: transformers keeps the default frequencies, so does the table
    "llama-dynamic": ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, PROMPT),
}
DIALECTS = ("std", "ort-gqa")


@pytest.fixture(scope="module")
def artifact(hf_artifact):
    """(case, dialect) -> (checkpoint folder, artifact folder); one export and one optimize each per session."""

    def get(case: str, dialect: str) -> tuple[Path, Path]:
        family, overrides, _ = CASES[case]
        return hf_artifact(family, dialect, MAX_SEQ, 1, **overrides)

    return get


def ort_logits(artifact: Path, prompt: list[int], decode: list[int]) -> np.ndarray:
    """Logits [len(prompt) + len(decode), V]: one prefill step, then teacher-forced one-token steps (ORT CPU).
    Each step's logits are copied: the backend reuses its output buffer."""
    from decodekit.runtime.pipeline import open_backend

    n = len(prompt)
    with open_backend(artifact, "ort") as b:
        state = b.allocate(1)
        rows = [np.array(b.step(state, np.array([prompt]), np.arange(n)[None], np.zeros(1, np.int64),
                                  np.array([n])))[0]]
        for tok in decode:
            rows.append(np.array(b.step(state, np.array([[tok]]), np.array([[n]]), np.array([n]),
                                          np.array([n + 1])))[0])
            n += 1
    return np.concatenate(rows)


def transformers_logits(folder: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL:g} x logit scale {scale:.3f}"


@pytest.mark.parametrize("dialect", DIALECTS)
@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_greedy_match_transformers(artifact, one_thread, case, dialect):
    src, out = artifact(case, dialect)
    prompt = CASES[case][2]
    ours = ort_logits(out, prompt, DECODE)
    assert_close(ours, transformers_logits(src, prompt + DECODE), f"{case} {dialect} prefill + decode")
    tokens = ort_greedy(out, prompt, NEW)
    assert tokens == transformers_greedy(src, prompt, NEW)
    assert len(set(tokens)) > 8, f"degenerate greedy output {tokens}"


def test_lowering_keeps_partial_rotary_in_gqa(artifact):
    """Phi-4-mini style: GQA does the partial rotation itself (cos/sin [96, 24]), no separate rotary node left."""
    import onnx

    _, out = artifact("phi4-mini-partial", "ort-gqa")
    graph = onnx.load(str(out / "rank0.onnx"), load_external_data=False).graph
    gqa = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and not [n for n in graph.node if n.op_type == "RotaryEmbedding"]
    assert all(a.i == 1 for n in gqa for a in n.attribute if a.name == "do_rotary")


# (case id, family, overrides, --max-seq, lengths where the table is exact, lengths where transformers differs)
STATIC = [
    ("dynamic-beyond-max_position_embeddings", "llama",
     {"max_position_embeddings": 64, "rope_scaling": {"rope_type": "dynamic", "factor": 3.0}}, 96, [96], [80]),
    ("longrope-beyond-original", "phi3", {"original_max_position_embeddings": 32}, 64, [40, 64], [24]),
]


@pytest.mark.parametrize("family,overrides,max_seq,exact,different", [s[1:] for s in STATIC],
                         ids=[s[0] for s in STATIC])
def test_static_table_beyond_the_switch_length(hf_checkpoint, one_thread, tmp_path, family, overrides, max_seq,
                                               exact, different):
    """export/rope.py: one table for the longest sequence served. A prefill whose last position is beyond the
    switch length equals transformers' forward; a shorter one does not (transformers uses other frequencies)."""
    from decodekit.export.artifact import ExportOptions, export_artifact

    src = hf_checkpoint(family, **overrides)
    notes: list[str] = []
    export_artifact(str(src), tmp_path / "a", ExportOptions(max_seq=max_seq, max_batch=1), notes.append)
    assert any(n.startswith("RoPE ") for n in notes), notes  # the export says so
    ids = list(np.random.default_rng(0).integers(3, 256, max_seq))
    for n in exact + different:
        ours, ref = ort_logits(tmp_path / "a", ids[:n], []), transformers_logits(src, ids[:n])
        err = float(np.abs(ours - ref).max()) / float(np.abs(ref).max())
        assert (err <= RTOL) == (n in exact), f"{n} positions: relative error {err:.2e}"
    from decodekit.tools.validate import validate

    report = validate(tmp_path / "a", ["ort"], steps=2, reference="transformers")  # short prompts: they differ
    assert not report.passed and any(n.startswith("RoPE ") for n in report.notes), report.notes


TRT_CASES = ["phi3-longrope-long", "phi4-mini-partial", "llama-yarn", "llama-dynamic"]


@pytest.mark.parametrize("case", TRT_CASES)
def test_builds_with_tensorrt_rtx_fp16(hf_checkpoint, exported, tmp_path, case):
    """The fp16 graph parses and builds; every RotaryEmbedding becomes a ROTARY_EMBEDDING layer rotating the
    config's rotary dimension."""
    pytest.importorskip("tensorrt_rtx", reason="needs TensorRT-RTX (pip install tensorrt-rtx) to build engines")
    from decodekit.export.manifest import read_manifest
    from decodekit.graphs.trt import api
    from decodekit.graphs.trt.build import BuildOptions, build_engines

    family, overrides, _ = CASES[case]
    src = exported(str(hf_checkpoint(family, **overrides)), dtype="fp16", max_seq=MAX_SEQ, max_batch=2)
    build_engines(src, tmp_path / "e", BuildOptions(opt_seq=16))
    m = read_manifest(tmp_path / "e")
    types = m.engines["layer_types"]
    assert types["KV_CACHE_UPDATE"] == 4 and types["ROTARY_EMBEDDING"] == 4, types
    t = api.load()
    network = api.create_network(t, api.create_builder(t, api.make_logger(t, api.BuildLog())))
    assert not api.parse_file(t, network, api.make_logger(t, api.BuildLog()), src / "rank0.onnx")
    dims = set()
    for layer in (network.get_layer(i) for i in range(network.num_layers)):
        if layer.type == t.module.LayerType.ROTARY_EMBEDDING:
            layer.__class__ = t.module.IRotaryEmbeddingLayer
            dims.add(layer.rotary_embedding_dim)
    c = m.config
    assert dims == ({c.rotary_dim} if c.rotary_dim < c.head_dim else {0}), dims  # 0: the whole head
