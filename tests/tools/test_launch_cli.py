"""`decodekit launch` and torchrun `decodekit generate` spellings and options, run for real (gloo, 2 CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decodekit.runtime.generate import generate_result
from decodekit.runtime.ort_backend import OrtBackend
from decodekit.runtime.sampler import SamplingConfig
from decodekit.tools.launch_cmd import launch_argv
from decodekit.errors import UserError

PROMPT = "1,17,42,99,7"
DECODEKIT = [sys.executable, "-m", "decodekit.tools.cli"]


def _tp1(tp1: Path, steps: int, logprobs: bool = False):
    with OrtBackend(tp1, intra_op_threads=1) as b:
        return generate_result(b, [[int(t) for t in PROMPT.split(",")]], steps, SamplingConfig(logprobs=logprobs))


def test_readme_synopsis_launch_dashdash_generate(tp1: Path, tp2: Path) -> None:
    """The README's `decodekit launch --nproc 2 -- generate ARTIFACT ...` runs tp=2 and gives tp=1's tokens."""
    out = subprocess.run([*DECODEKIT, "launch", "--nproc", "2", "--timeout", "60", "--", "generate", str(tp2),
                          "--ids", PROMPT, "--max-new-tokens", "16", "--json"], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["tp"] == 2 and doc["tokens"] == _tp1(tp1, 16).output_ids


def test_launch_argv_reorders_and_refuses() -> None:
    assert launch_argv(["--nproc", "2", "--", "generate", "A", "--ids", "1"]) == ["A", "--nproc", "2", "--ids", "1"]
    assert launch_argv(["A", "--ids", "1"]) == ["A", "--ids", "1"]
    with pytest.raises(UserError, match="runs `generate ARTIFACT"):
        launch_argv(["--nproc", "2", "--", "validate", "A"])
    with pytest.raises(UserError, match="ARTIFACT right after"):
        launch_argv(["--", "generate", "--ids", "1"])


def test_launch_refuses_chat_in_one_line(tp2: Path) -> None:
    out = subprocess.run([*DECODEKIT, "launch", "--", "generate", str(tp2), "--chat", "hi"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "--chat" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_torchrun_generate_passes_logprobs(tp1: Path, tp2: Path) -> None:
    """torchrun generate --logprobs: rank 0's sampler computes them; they match the tp=1 ort backend's."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "decodekit",
                          "generate", str(tp2), "--ids", PROMPT, "--max-new-tokens", "8", "--logprobs", "--json"],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    ref = _tp1(tp1, 8, logprobs=True)
    assert doc["tokens"] == ref.output_ids
    np.testing.assert_allclose(doc["logprobs"], ref.logprobs, atol=1e-4)


@pytest.mark.parametrize("argv, message", [
    (["--cuda-graph"], "apply to --device cuda only"),
    (["--chat", "hi"], "--chat / --system"),
])
def test_torchrun_generate_refuses_by_name(tp2: Path, argv: list[str], message: str) -> None:
    """A rank of torchrun generate (RANK / WORLD_SIZE set) checks the request before joining the group."""
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}
    out = subprocess.run([*DECODEKIT, "generate", str(tp2), *(["--ids", PROMPT] if "--chat" not in argv else []),
                          *argv], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1 and message in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
