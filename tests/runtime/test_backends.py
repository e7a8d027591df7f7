"""ONNX Runtime (CPU) against the PyTorch reference backend on exported artifacts of every family.

Verification ladder step 2: logits AND present caches within 1e-4 of the logit / cache scale (fp32),
for a right-padded batch prefill and 20 decode steps, with past and present bound to one buffer
(checked: same data pointer every step, and the buffer itself holds the reference's present).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from decodekit.runtime.backend import BackendError, load_backend
from decodekit.runtime.ort_backend import OrtBackend, OrtOptions
from helpers import FAMILIES, edit_manifest

RTOL = 1e-4
MAX_SEQ = 192
PROMPTS = [[5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71], [12, 250, 64, 9, 130, 77]]  # 11 and 6 tokens
DECODE_STEPS = 20


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backends(hf_checkpoint, exported):
    """(family, logits) -> (ort backend, torch backend) on one artifact."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(family: str, logits: str = "all"):
        if (family, logits) not in cache:
            src = hf_checkpoint(family)
            art = exported(str(src), max_seq=MAX_SEQ, max_batch=4, logits=logits)
            cache[family, logits] = (load_backend("ort", art, intra_op_threads=1), load_backend("torch", art))
        return cache[family, logits]

    return get


def assert_close(ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    err = float(np.abs(ours - ref).max())
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL:g} x scale {scale:.3f}"


def prefill_inputs(prompts: list[list[int]]):
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((len(prompts), lens.max()), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    pos = np.broadcast_to(np.arange(lens.max()), ids.shape).copy()
    return ids, pos, np.zeros(len(prompts), dtype=np.int64), lens


def check_caches(ort_caches, ref_caches, lens: np.ndarray, what: str) -> None:
    """Each cache buffer (read through its numpy view: no copy) equals the reference on every valid row."""
    for i, (value, ref) in enumerate(zip(ort_caches, ref_caches)):
        view = value.numpy()
        assert view.ctypes.data == value.data_ptr(), "the numpy view must alias the OrtValue"
        for b, n in enumerate(lens):  # rows past a sequence's length hold padding garbage that differs by design
            assert_close(view[b, :, :n], ref[b, :, :n], f"{what} cache {i} seq {b}")


def run_and_compare(ort_b: OrtBackend, torch_b, logits_mode: str) -> None:
    B = len(PROMPTS)
    so, st = ort_b.allocate(B), torch_b.allocate(B)
    ptrs = [v.data_ptr() for v in ort_b.caches(so)]
    ids, pos, write, lens = prefill_inputs(PROMPTS)
    lo, lt = ort_b.step(so, ids, pos, write, lens), torch_b.step(st, ids, pos, write, lens)
    assert isinstance(lo, np.ndarray) and isinstance(lt, np.ndarray)
    for b, n in enumerate(lens):
        if logits_mode == "all":
            assert_close(lo[b, :n], lt[b, :n], f"prefill logits seq {b}")
        else:
            assert lo.shape == (B, 1, ort_b.vocab)
            assert_close(lo[b], lt[b], f"prefill logits seq {b}")
    check_caches(ort_b.caches(so), torch_b.caches(st), lens, "prefill")
    last = lt[np.arange(B), lens - 1] if logits_mode == "all" else lt[:, 0]
    decode_ptr = None
    for step in range(DECODE_STEPS):
        tok = last.argmax(-1)[:, None].astype(np.int64)  # teacher-force the reference's greedy tokens
        write = lens.copy()
        lens = lens + 1
        lo = ort_b.step(so, tok, write[:, None], write, lens)
        lt = torch_b.step(st, tok, write[:, None], write, lens)
        assert lo.shape == (B, 1, ort_b.vocab)
        assert_close(lo, lt, f"decode step {step} logits")
        decode_ptr = decode_ptr or lo.ctypes.data
        assert lo.ctypes.data == decode_ptr, "decode logits must land in the preallocated buffer"
        last = lt[:, 0].copy()
        # in place: the cache buffers never move, and they are what the graph bound as present.*
        assert [v.data_ptr() for v in ort_b.caches(so)] == ptrs
        presents = [v for k, v in ort_b.bound_outputs(so).items() if k.startswith("present.")]
        assert [v.data_ptr() for v in presents] == ptrs
    check_caches(ort_b.caches(so), torch_b.caches(st), lens, f"after {DECODE_STEPS} decode steps")


@pytest.mark.parametrize("family", FAMILIES)
def test_ort_matches_torch_reference(backends, family):
    ort_b, torch_b = backends(family)
    run_and_compare(ort_b, torch_b, "all")


def test_ort_matches_torch_reference_logits_last(backends):
    ort_b, torch_b = backends("qwen3", "last")
    assert ort_b.manifest.logits == "last"
    run_and_compare(ort_b, torch_b, "last")


def test_cache_update_in_place_is_visible_through_numpy_view(backends):
    ort_b, torch_b = backends("llama")
    state = ort_b.allocate(1)
    views = [v.numpy() for v in ort_b.caches(state)]  # taken once, before any step
    assert all(not v.any() for v in views), "caches start zero-filled"
    ids, pos, write, lens = prefill_inputs(PROMPTS[:1])
    ort_b.step(state, ids, pos, write, lens)
    n = int(lens[0])
    assert all(v[0, :, :n].any() and not v[0, :, n:].any() for v in views)
    ort_b.step(state, np.array([[3]]), np.array([[n]]), np.array([n]), np.array([n + 1]))
    assert all(v[0, :, n].any() and not v[0, :, n + 1:].any() for v in views)


def test_state_reuse_gives_the_same_logits(backends):
    """Stale rows of an earlier, longer generation are masked: a reused state needs no zeroing."""
    ort_b, _ = backends("mistral")
    state = ort_b.allocate(1)
    ids, pos, write, lens = prefill_inputs(PROMPTS[:1])
    first = ort_b.step(state, ids, pos, write, lens).copy()
    ids2, pos2, write2, lens2 = prefill_inputs([PROMPTS[1]])
    ort_b.step(state, ids2, pos2, write2, lens2)
    again = ort_b.step(state, ids, pos, write, lens)
    np.testing.assert_array_equal(again, first)


# ------------------------------------------------------------------------------------------ refusals


def test_unknown_option_and_cuda_without_gpu_package(backends):
    ort_b, _ = backends("llama")
    with pytest.raises(BackendError, match="unknown ort backend option"):
        OrtBackend(ort_b.artifact, manifest=ort_b.manifest, threads=2)
    with pytest.raises(BackendError, match="graph_optimization_level"):
        OrtOptions(graph_optimization_level="max")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA EP")
    with pytest.raises(BackendError, match="install onnxruntime-gpu"):
        OrtBackend(ort_b.artifact, manifest=ort_b.manifest, device="cuda")


def test_tp_artifact_is_refused_with_launch_hint(backends, tmp_path):
    ort_b, _ = backends("llama")
    art = tmp_path / "tp2"
    shutil.copytree(ort_b.artifact, art)
    edit_manifest(art, lambda m: m.update(tp=2))
    with pytest.raises(BackendError, match="decodekit launch"):
        load_backend("ort", art, intra_op_threads=1)
    with pytest.raises(BackendError, match="tp=2"):
        load_backend("torch", art)


def test_torch_backend_refuses_a_source_of_another_model(backends):
    ort_b, _ = backends("llama")
    with pytest.raises(BackendError, match="not the model"):
        load_backend("torch", ort_b.artifact, torch_source="preset:tiny")
    with pytest.raises(BackendError, match="torch_source"):
        load_backend("torch", ort_b.artifact, torch_source="/nonexistent/folder")
