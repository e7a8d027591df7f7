"""`decodekit bench` runs the harness's decode loop (tools/benchmarking.py) and reports against the roofline."""

from __future__ import annotations

import json
import subprocess
import sys

from decodekit.tools.bench import bench_artifact
from decodekit.tools.benchmarking import DecodekitRunner, first_divergence, random_prompts


def test_bench_reports_speed_and_roofline(exported):
    art = exported("preset:tiny")
    r = bench_artifact(art, "torch", prompt_len=8, new_tokens=16)
    assert r.backend == "torch" and r.decode_ms_per_token > 0 and r.prefill_tokens_per_s > 0
    assert r.bytes_per_step > 0 and r.bandwidth_Bps > 0 and r.roofline_fraction > 0
    p = subprocess.run([sys.executable, "-m", "decodekit", "bench", str(art), "--new-tokens", "16", "--threads", "1",
                        "--json"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["backend"] == "ort" and doc["new_tokens"] == 16 and doc["decode_ms_per_token"] > 0


def test_the_runner_generates_what_generate_does(exported):
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.ort_backend import OrtBackend

    art = exported("preset:tiny")
    prompts = random_prompts(2, 5, 512)
    assert prompts == random_prompts(2, 5, 512) and all(3 <= t < 512 for p in prompts for t in p)
    runner = DecodekitRunner(art, 2)
    run = runner.run(prompts, 6)
    runner.close()
    assert len(run.step_ms) == 5 and run.prefill_ms > 0
    with OrtBackend(art) as backend:
        assert run.tokens == generate_ids(backend, prompts, 6, eos_ids=())
    assert first_divergence(run.tokens, [run.tokens[0][:3] + [-1], run.tokens[1]]) == 3
