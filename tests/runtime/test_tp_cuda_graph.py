"""Tensor parallel with the decode step captured as a CUDA graph per rank (``OrtOptions(cuda_graph=True)``).

What is refused runs everywhere. The captured runs need onnxruntime-gpu, a CUDA GPU and NCCL (marker ``gpu``),
in real processes (runtime.launch, torchrun):

- one GPU: a group of one over NCCL (collectives issued anyway) runs the tp=1 ort-gqa-static fp16 artifact whole
  and cut where the tp=2 graph has its all-reduces, captured and not: 64 greedy tokens = the single-GPU ort
  backend's; the cut run's graph holds the NCCL broadcast and all-reduces of every segment;
- two GPUs: tp=2 captured and not = tp=1 (single-GPU ort backend), 64 greedy tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from decodekit.runtime.backend import BackendError
from decodekit.runtime.tp_ort import TpOrtBackend

PROMPT = [1, 17, 42, 99, 7]
STEPS = 64

WORKER = textwrap.dedent("""
    import json, os, sys
    import onnx_ir as ir
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.launch import close_group, init_group
    from decodekit.runtime.ort_backend import OrtOptions
    from decodekit.runtime.tp_ort import TpOrtBackend

    artifact, out, graph, cuts_from, prompt, steps, device = sys.argv[1:8]
    prompt, steps, graph = [int(t) for t in prompt.split(",")], int(steps), graph == "1"
    group = init_group(device, timeout_s=120, collectives=True)
    partition = None
    if cuts_from != "-":  # the tp=1 graph cut where the tp=2 graph all-reduces (a group of one)
        from decodekit.export.manifest import read_manifest
        from decodekit.graphs.tp_partition import collective_inputs, insert_cuts, partition as cut

        model = ir.load(str(read_manifest(artifact).rank_file(artifact)))
        insert_cuts(model, collective_inputs(ir.load(str(read_manifest(cuts_from).rank_file(cuts_from)))))
        partition = cut(model)
    options = OrtOptions(device=device, device_id=int(os.environ["LOCAL_RANK"]), cuda_graph=graph or None,
                         intra_op_threads=1 if device == "cpu" else 0)
    backend = TpOrtBackend(artifact, options, group=group, partition=partition)
    doc = {"rank": group.rank, "segments": len(backend.partition.segments)}
    if group.rank:
        backend.serve()
    else:
        state = backend.allocate(1)
        doc["tokens"] = generate_ids(backend, [prompt], steps, eos_ids=(), state=state)[0]
        doc["again"] = generate_ids(backend, [prompt], steps, eos_ids=(), state=state)[0]  # replayed
        doc["step_captured"] = next(iter(state.steps.values())).captured
        backend.close()
    doc["captured_steps"] = backend.captured_steps
    doc["allreduce_calls"] = group.stats.allreduce_calls
    with open(f"{out}.{group.rank}.json", "w") as f:
        json.dump(doc, f)
    close_group()
""")


def _gpus_ready(n: int) -> str | None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return "needs onnxruntime-gpu (this onnxruntime has no CUDA execution provider) and a CUDA GPU"
    if not torch.cuda.is_available() or torch.cuda.device_count() < n:
        return f"needs {n} CUDA GPU(s) that PyTorch sees and NCCL (found {torch.cuda.device_count()})"
    import torch.distributed as dist

    if not dist.is_nccl_available():
        return "needs a torch built with NCCL"
    return None


def _need(n: int) -> None:
    reason = _gpus_ready(n)
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def gqa(exported, tmp_path_factory) -> dict[int, Path]:
    """preset:tiny tp=1 and tp=2, ort-gqa-static fp16 (the dialect and precisions a CUDA graph may capture)."""
    from decodekit.graphs.pipeline import optimize

    out = {}
    for tp in (1, 2):
        std = exported("preset:tiny", tp=tp, max_seq=256, max_batch=1)
        out[tp] = tmp_path_factory.mktemp(f"gqa-tp{tp}") / "a"
        optimize(std, out[tp], "ort-gqa-static", dtype="fp16")
    return out


def _single_gpu_tokens(artifact: Path) -> list[int]:
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.ort_backend import OrtBackend

    with OrtBackend(artifact, device="cuda", cuda_graph=False) as b:
        return generate_ids(b, [PROMPT], STEPS, eos_ids=())[0]


def _run(artifact: Path, nproc: int, graph: bool, tmp_path: Path, cuts_from: Path | None = None,
         device: str = "cuda") -> list[dict]:
    from decodekit.runtime.launch import launch

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / f"run-{nproc}-{int(graph)}-{cuts_from is not None}"
    argv = [sys.executable, str(script), str(artifact), str(out), "1" if graph else "0",
            str(cuts_from) if cuts_from else "-", ",".join(map(str, PROMPT)), str(STEPS), device]
    result = launch(argv, nproc, log=lambda m: None)
    assert result.returncode == 0, result.message
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(nproc)]


# ------------------------------------------------------------------------------------------- refusals (CPU)


def test_graph_refused_where_lengths_are_read_on_the_host(tp1: Path) -> None:
    with pytest.raises(BackendError, match="stale lengths.*ort-gqa-static"):
        TpOrtBackend(tp1, device="cuda", cuda_graph=True)


def test_graph_refused_for_fp32_gqa(tp1: Path, tmp_path: Path) -> None:
    from decodekit.graphs.pipeline import optimize

    optimize(tp1, tmp_path / "fp32", "ort-gqa-static")
    with pytest.raises(BackendError, match="GroupQueryAttention on the CPU.*--dtype fp16"):
        TpOrtBackend(tmp_path / "fp32", device="cuda", cuda_graph=True)


def test_cuda_graph_needs_cuda(tp1: Path) -> None:
    with pytest.raises(BackendError, match="cuda_graph applies to device cuda"):
        TpOrtBackend(tp1, cuda_graph=True)


def test_world_of_one_issuing_collectives_equals_ort_on_cpu(tp1: Path, tp2: Path, tmp_path: Path) -> None:
    """The one-GPU test's path on the CPU (gloo): a group of one that still broadcasts and all-reduces."""
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.ort_backend import OrtBackend

    with OrtBackend(tp1, intra_op_threads=1) as b:
        want = generate_ids(b, [PROMPT], STEPS, eos_ids=())[0]
    (got,) = _run(tp1, 1, False, tmp_path, tp2, device="cpu")
    assert got["tokens"] == got["again"] == want
    assert got["segments"] == 5 and got["allreduce_calls"] == 2 * STEPS * 4  # 2 runs, 4 all-reduces per step


# ------------------------------------------------------------------------------------------------ one GPU


@pytest.mark.gpu
def test_world_of_one_nccl_captured_equals_single_gpu_ort(gqa: dict[int, Path], tmp_path: Path) -> None:
    _need(1)
    want = _single_gpu_tokens(gqa[1])
    for cuts in (None, gqa[2]):  # whole graph; cut at tp=2's all-reduces (NCCL calls inside the graph)
        eager = _run(gqa[1], 1, False, tmp_path, cuts)[0]
        graphed = _run(gqa[1], 1, True, tmp_path, cuts)[0]
        what = "cut" if cuts else "whole"
        assert eager["tokens"] == eager["again"] == want, what
        assert graphed["tokens"] == graphed["again"] == want, what
        assert graphed["step_captured"] and graphed["captured_steps"] == 1, what
        assert not eager["step_captured"] and eager["captured_steps"] == 0, what
        if cuts:
            assert graphed["segments"] > 1 and graphed["allreduce_calls"] > 0


@pytest.mark.gpu
def test_torchrun_generate_cuda_graph_on_one_gpu(gqa: dict[int, Path]) -> None:
    """`torchrun --nproc-per-node 1 -m decodekit generate --device cuda --cuda-graph` (the ort-tp backend)."""
    _need(1)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "decodekit",
                          "generate", str(gqa[1]), "--device", "cuda", "--cuda-graph", "--ids",
                          ",".join(map(str, PROMPT)), "--max-new-tokens", str(STEPS), "--json"],
                         capture_output=True, text=True, timeout=300, env={**os.environ})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["tokens"] == [_single_gpu_tokens(gqa[1])]


# ----------------------------------------------------------------------------------------------- two GPUs


@pytest.mark.gpu
def test_tp2_captured_equals_tp1(gqa: dict[int, Path], tmp_path: Path) -> None:
    _need(2)
    want = _single_gpu_tokens(gqa[1])
    eager = _run(gqa[2], 2, False, tmp_path)
    graphed = _run(gqa[2], 2, True, tmp_path)
    assert eager[0]["tokens"] == eager[0]["again"] == want
    assert graphed[0]["tokens"] == graphed[0]["again"] == want
    assert [r["captured_steps"] for r in graphed] == [1, 1]  # rank 0's whole step and rank 1's segments
    assert [r["captured_steps"] for r in eager] == [0, 0]
