"""The benchmark studies in benchmarks/ stay runnable: the CPU ones run small, the GPU ones re-plot their results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_host_overhead_runs_small(tmp_path):
    out = tmp_path / "host.json"
    r = _run("benchmarks/host_overhead.py", "--steps", "16", "--rounds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"greedy (generate default)", "greedy --logprobs", "sampled top-k/top-p seeded"}
    assert all(v["host_us"] > 0 and v["run_us"] > 0 for v in summary.values())


def test_gpu_decode_replots_its_results(tmp_path):
    png = tmp_path / "decode.png"
    r = _run("benchmarks/gpu_decode.py", "--out", "results/h200_llama-3.2-1b_decode_vs_genai.json",
             "--plot", str(png), "--replot")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.stat().st_size > 10_000


def test_serve_load_runs_small(tmp_path, exported):
    """benchmarks/serve_load.py: continuous batching and fixed batches produce every requested token, the same
    greedy tokens (fp32)."""
    out, png = tmp_path / "serve.json", tmp_path / "serve.png"
    r = _run("benchmarks/serve_load.py", "--artifact", str(exported("preset:tiny")), "--clients", "1,4",
             "--requests", "8", "--rounds", "1", "--threads", "1", "--out", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr[-2000:]
    levels = json.loads(out.read_text())["levels"]
    assert set(levels) == {"1", "4"}
    for level in levels.values():
        for mode in ("continuous", "fixed"):
            assert level[mode]["tokens_per_s"] > 0 and level[mode]["ttft_p99_ms"] >= level[mode]["ttft_p50_ms"]
        assert level["identical_requests"] == "8/8"
    assert png.stat().st_size > 10_000
