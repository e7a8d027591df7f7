"""The benchmark harness and its studies (benchmarks/) stay runnable: the harness runs its systems small on the CPU,
the CPU studies run small, the GPU studies re-plot and merge their results (and their parity check runs on the CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_harness_runs_its_cpu_systems_on_one_checkpoint(tmp_path):
    """decodekit (two dialects), transformers and decodekit's torch loop on one transformers-made checkpoint: every
    system timed, the same greedy tokens, roofline fractions from the bandwidth measured each round."""
    systems = ["decodekit", "decodekit-std", "transformers", "torch-eager"]
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        systems.append("genai")
    out = tmp_path / "cpu.json"
    r = _run("benchmarks/cpu_decode.py", "--model", "tiny", "--systems", ",".join(systems), "--steps", "12",
             "--prompt-len", "8", "--rounds", "1", "--roofline", "--work", str(tmp_path / "work"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert list(doc["systems"]) == systems and len(doc["read_bw_GBps_rounds"]) == 1
    for name, row in doc["systems"].items():
        assert row["ms"] > 0 and row["roofline_fraction"] > 0 and row["bytes_per_step"] > 0, (name, row)
        if name != "decodekit":
            assert row["first_divergence_from_decodekit"] == 12, (name, row)


def test_an_unknown_system_names_the_registry(tmp_path):
    r = _run("benchmarks/cpu_decode.py", "--systems", "decodekit,ort:std:int4", "--work", str(tmp_path))
    assert r.returncode == 1 and "unknown system(s) ort:std:int4; known: decodekit," in r.stderr


def test_host_overhead_runs_small(tmp_path):
    out = tmp_path / "host.json"
    r = _run("benchmarks/host_overhead.py", "--steps", "16", "--rounds", "1", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"greedy (generate default)", "greedy --logprobs", "sampled top-k/top-p seeded"}
    assert all(v["host_us"] > 0 and v["run_us"] > 0 for v in summary.values())


def test_tp_decode_runs_small(tmp_path):
    out = tmp_path / "tp.json"
    r = _run("benchmarks/tp_decode.py", "--steps", "6", "--prompt-len", "4", "--max-seq", "16", "--repeats", "1",
             "--variants", "tp1-whole,tpN", "--work", str(tmp_path / "work"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert results["tpN"]["processes"] == 2 and results["tpN"]["allreduce_calls_per_step"] > 0
    assert results["tpN"]["first_divergence_from_tp1_whole"] == 6


def test_gpu_parity_check_runs_on_the_cpu(tmp_path):
    """The study behind `validate --mode parity` on small models: every dialect's tokens equal the torch backend's."""
    out = tmp_path / "parity.json"
    r = _run("benchmarks/gpu_parity.py", "--device", "cpu", "--head-dims", "32", "--batches", "1,2", "--steps", "4",
             "--layers", "2", "--hidden", "64", "--vocab", "256", "--work", str(tmp_path / "work"), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {(x["batch"], x["system"]) for x in rows} == {
        (1, "ort-gqa-static"), (1, "ort-gqa-static nograph"), (1, "ort-gqa-uniform"), (1, "std"),
        (2, "ort-gqa-static"), (2, "ort-gqa-static nograph"), (2, "std")}
    assert all(x["identical"] for x in rows)


@pytest.mark.parametrize("study, result", [("gpu_decode.py", "h200_llama-3.2-1b_decode_vs_genai.json"),
                                           ("gpu_roofline.py", "h100_llama-3.2-1b.json")])
def test_gpu_studies_replot_their_results(tmp_path, study, result):
    png = tmp_path / "plot.png"
    r = _run(f"benchmarks/{study}", "--out", f"results/{result}", "--plot", str(png), "--replot")
    assert r.returncode == 0, r.stderr[-2000:]
    assert png.stat().st_size > 10_000


def test_gpu_roofline_merges_runs_of_one_device(tmp_path):
    merged = tmp_path / "merged.json"
    r = _run("benchmarks/gpu_roofline.py", "--merge", "results/h100_llama-3.2-1b.json",
             "results/h100_llama-3.2-1b_knobs.json", "--out", str(merged))
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(merged.read_text())["rows"]
    b1 = next(x for x in rows if (x["model"], x["dtype"], x["batch"]) == ("llama-3.2-1b", "fp16", 1))
    assert {"ort:ort-gqa-static:nofuse", "ort:ort-gqa-static:qkvonly"} <= set(b1["systems"])  # both files' systems
    other = _run("benchmarks/gpu_roofline.py", "--merge", "results/h100_llama-3.2-1b.json",
                 "results/h200_llama-3.2-1b.json", "--out", str(tmp_path / "x.json"))
    assert other.returncode != 0 and "refusing to merge results of different devices" in other.stderr


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


def test_gpu_roofline_study_runs_on_the_cpu(tmp_path):
    """The roofline study's path (systems one at a time, bytes per system, the bound, the table) with the CPU's read
    bandwidth: a graph edit, a quantized artifact and transformers' static cache among the systems."""
    out, png = tmp_path / "roof.json", tmp_path / "roof.png"
    systems = "decodekit-std-no-nonpad,decodekit-int4-sym,transformers-static,torch-eager"
    r = _run("benchmarks/gpu_roofline.py", "--device", "cpu", "--models", "tiny", "--dtypes", "fp32", "--batches", "1",
             "--systems", systems, "--steps", "10", "--prompt-len", "8", "--work", str(tmp_path / "work"),
             "--out", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert list(row["systems"]) == systems.split(",") and row["roofline_ms"] > 0 and png.stat().st_size > 10_000
    for name, v in row["systems"].items():
        assert v["ms"] > 0 and v["roofline_fraction"] > 0, (name, v)
    quant, dense = row["systems"]["decodekit-int4-sym"], row["systems"]["torch-eager"]
    assert quant["bytes_per_step"] < dense["bytes_per_step"]  # the packed int4 weights are counted
    assert row["systems"]["decodekit-std-no-nonpad"]["first_divergence_from_torch-eager"] == 10
