"""Tensor parallel across real processes (gloo on the CPU): tp=2 == tp=1, and failures end the run in bounded time.

Every multi-process test starts fresh interpreters (~4 s each on a 2-core machine, most of it importing torch).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from decodekit.runtime.generate import generate_ids
from decodekit.runtime.launch import launch
from decodekit.runtime.ort_backend import OrtBackend
from decodekit.runtime.tp_ort import TpError, TpOrtBackend

MAX_SEQ = 512  # = conftest TP_MAX_SEQ (tp1 / tp2 fixtures)
PROMPT = [1, 17, 42, 99, 7]
STEPS = 64
DECODEKIT = [sys.executable, "-m", "decodekit.tools.cli"]




def _tp1_tokens(tp1: Path, eos: tuple[int, ...] | None = None) -> list[int]:
    with OrtBackend(tp1, intra_op_threads=1) as b:
        return generate_ids(b, [PROMPT], STEPS, eos_ids=eos)[0]


# ------------------------------------------------------------------------------------------------ parity


def test_launch_cli_tp2_streams_the_tp1_tokens(tp1: Path, tp2: Path) -> None:
    ref = _tp1_tokens(tp1)
    assert len(ref) == STEPS  # the prompt was chosen so that no EOS cuts the 64 steps short
    out = subprocess.run([*DECODEKIT, "launch", str(tp2), "--ids", ",".join(map(str, PROMPT)),
                          "--max-new-tokens", str(STEPS), "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["tp"] == 2 and doc["tokens"] == [ref]


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from decodekit.runtime.launch import close_group, init_group
    from decodekit.runtime.tp_ort import TpOrtBackend

    artifact, out, prompt, steps = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")], int(sys.argv[4])
    group = init_group("cpu", timeout_s=60)
    backend = TpOrtBackend(artifact, group=group, intra_op_threads=1)
    if group.rank:
        backend.serve()
    else:
        state = backend.allocate(1)
        n = len(prompt)
        logits = backend.step(state, np.array([prompt]), np.arange(n)[None], np.zeros(1, np.int64), np.array([n]))
        rows, tokens = [logits[0, -1].copy()], []
        for i in range(steps):
            tokens.append(int(rows[-1].argmax()))
            logits = backend.step(state, np.array([[tokens[-1]]]), np.array([[n + i]]), np.array([n + i]),
                                  np.array([n + i + 1]))
            rows.append(logits[0, -1].copy())
        backend.close()
        np.savez(out, logits=np.stack(rows), tokens=np.array(tokens), allreduce_calls=group.stats.allreduce_calls)
    close_group()
""")


def test_two_processes_give_tp1_logits_for_64_greedy_steps(tp1: Path, tp2: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "tp2.npz"
    result = launch([sys.executable, str(script), str(tp2), str(out), ",".join(map(str, PROMPT)), str(STEPS)], 2)
    assert result.returncode == 0, result.message
    got = np.load(out)
    # tp=1 reference, teacher-forced with the same tokens
    with OrtBackend(tp1, intra_op_threads=1) as b:
        state, n = b.allocate(1), len(PROMPT)
        prefill = b.step(state, np.array([PROMPT]), np.arange(n)[None], np.zeros(1, np.int64), np.array([n]))
        rows = [prefill[0, -1].copy()]
        for i, t in enumerate(got["tokens"]):
            rows.append(b.step(state, np.array([[t]]), np.array([[n + i]]), np.array([n + i]),
                               np.array([n + i + 1]))[0, -1].copy())
    ref = np.stack(rows)
    assert got["tokens"].tolist() == ref[:-1].argmax(-1).tolist()  # identical greedy tokens, 64 steps
    scale = float(np.abs(ref).max())
    assert float(np.abs(got["logits"] - ref).max()) <= 1e-4 * scale
    assert int(got["allreduce_calls"]) == (STEPS + 1) * 4  # 2 per layer, 2 layers, every step


# ------------------------------------------------------------------------------------------------ faults


class _Run:
    """`decodekit launch` in the background: rank pids from the launcher's log, stdout bytes as they stream."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pids: dict[int, int] = {}
        self.err: list[str] = []
        self.out = b""
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read_err(self) -> None:
        for line in self.proc.stderr:
            text = line.decode(errors="replace")
            self.err.append(text)
            if m := re.match(r"\[launch\] rank (\d+) pid (\d+)", text):
                self.pids[int(m.group(1))] = int(m.group(2))

    def wait_for_tokens(self, nbytes: int, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.out) < nbytes:
            assert time.monotonic() < deadline, f"no tokens streamed: {''.join(self.err)}"
            chunk = self.proc.stdout.read1(64)
            assert chunk, f"the run ended before streaming: {''.join(self.err)}"
            self.out += chunk

    def finish(self, timeout: float) -> tuple[int, float, str]:
        start = time.monotonic()
        self.proc.stdout.read()
        code = self.proc.wait(timeout)
        time.sleep(0.2)  # let the stderr reader catch the launcher's last line
        return code, time.monotonic() - start, "".join(self.err)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead
        return f.read().split(") ")[1][0] != "Z"


def _long_run(tp2: Path, *extra: str) -> _Run:
    return _Run([*DECODEKIT, "launch", str(tp2), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens",
                 str(MAX_SEQ - len(PROMPT)), *extra])


def test_killing_a_rank_mid_generation_fails_the_run_fast_and_names_it(tp2: Path) -> None:
    run = _long_run(tp2)
    run.wait_for_tokens(8)  # generation is under way
    os.kill(run.pids[1], signal.SIGSTOP)  # freeze rank 1 first, so rank 0 cannot finish before the kill lands
    time.sleep(0.5)
    assert run.proc.poll() is None, "the run ended before rank 1 was stopped"
    os.kill(run.pids[1], signal.SIGKILL)
    code, seconds, err = run.finish(timeout=60)
    assert code != 0 and seconds < 30, err
    assert "rank 1" in err and "SIGKILL" in err
    assert not _alive(run.pids[0])


def test_a_hung_rank_times_out_the_group(tp2: Path) -> None:
    run = _long_run(tp2, "--timeout", "5")
    run.wait_for_tokens(8)
    os.kill(run.pids[1], signal.SIGSTOP)  # hangs: never answers a collective again
    assert run.proc.poll() is None, "the run ended before rank 1 was stopped"
    code, seconds, err = run.finish(timeout=60)
    assert code != 0 and seconds < 30, err
    assert "Timed out" in err and "rank(s) [1] still running" in err
    assert not _alive(run.pids[1])  # the launcher killed the hung rank


def test_launcher_stops_the_others_when_one_rank_fails() -> None:
    code = "import os, sys, time; time.sleep(0.3) if os.environ['RANK'] == '1' else time.sleep(60); sys.exit(3)"
    start = time.monotonic()
    result = launch([sys.executable, "-c", code], 3, log=lambda m: None)
    assert result.failed_rank == 1 and result.returncode == 3 and "exited with code 3" in result.message
    assert time.monotonic() - start < 20


def test_torchrun_starts_the_same_workers(tp1: Path, tp2: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
                          *DECODEKIT[:1], "-m", "decodekit.tools.cli", "launch", str(tp2), "--ids",
                          ",".join(map(str, PROMPT)), "--max-new-tokens", "16", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1])["tokens"] == [_tp1_tokens(tp1)[:16]]


def test_torchrun_runs_decodekit_generate_as_ranks(tp1: Path, tp2: Path) -> None:
    """`torchrun --nproc-per-node 2 -m decodekit generate` (gloo): each process is a rank; 64 greedy tokens = tp=1."""
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "decodekit",
                          "generate", str(tp2), "--ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "64",
                          "--json"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    assert doc["tp"] == 2 and doc["tokens"] == [_tp1_tokens(tp1)[:64]]


def test_one_process_refuses_a_tp2_artifact(tp2: Path) -> None:
    with pytest.raises(TpError, match="decodekit launch"):
        TpOrtBackend(tp2)
