"""Multi-rank launch: N worker processes with torch.distributed's env:// conventions, and a watchdog.

    launcher:  launch(argv, nproc) -> one subprocess per rank with RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
               MASTER_ADDR, MASTER_PORT set; when a rank exits non-zero (or is killed), the others get SIGTERM,
               then SIGKILL after a grace period, and the launcher names the failed rank and exits non-zero.
    worker:    init_group(device, timeout_s) -> Group (gloo on the CPU, NCCL on CUDA with LOCAL_RANK's GPU);
               every collective has the process-group timeout, so a rank blocked on a hung peer fails in bounded time.

Workers are plain programs reading that env, so torchrun starts them as well as ``launch`` does
(``torchrun --nproc-per-node 2 --no-python decodekit launch ARTIFACT ...``); ``generate_worker`` is the role
`decodekit launch ARTIFACT` runs in each process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world: int
    local_rank: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "RankEnv | None":
        """The rank's place in the group from torch.distributed's env variables; None when not launched."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return None
        return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])),
                   env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))


def launched() -> bool:
    return RankEnv.from_env() is not None


def init_group(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S, profile: bool = False,
               collectives: bool | None = None) -> Any:
    """Join the process group described by the env (gloo / NCCL); returns the backend's ``Group``.
    ``collectives=True`` issues the collectives even in a group of one (one GPU running the NCCL path)."""
    import torch
    import torch.distributed as dist

    from .tp_group import Group, TpError

    env = RankEnv.from_env()
    if env is None:
        raise TpError("no RANK/WORLD_SIZE in the environment; start the ranks with `decodekit launch` or torchrun")
    if device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= env.local_rank:
            raise TpError(f"rank {env.rank}: LOCAL_RANK {env.local_rank} has no CUDA GPU "
                          f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} visible)")
        torch.cuda.set_device(env.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method="env://", rank=env.rank,
                                world_size=env.world, timeout=timedelta(seconds=timeout_s))
    return Group(env.rank, env.world, f"cuda:{env.local_rank}" if device == "cuda" else "cpu", profile, collectives)


def close_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class LaunchResult:
    returncode: int
    failed_rank: int | None
    message: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def launch(argv: Sequence[str], nproc: int, *, env: dict[str, str] | None = None, master_port: int | None = None,
           grace_s: float = 5.0, linger_s: float = 60.0, log: Callable[[str], None] | None = None,
           on_start: Callable[[list[subprocess.Popen]], None] | None = None) -> LaunchResult:
    """Run `argv` once per rank and watch them; returns when all exit or the group is torn down.

    A rank that exits non-zero or dies stops the others (SIGTERM, then SIGKILL after `grace_s`). After rank 0
    exits 0, the others get `linger_s` to exit before they are killed as hung.
    """
    log = log or (lambda m: print(f"[launch] {m}", file=sys.stderr, flush=True))
    port = master_port or free_port()
    base = dict(os.environ if env is None else env)
    procs = []
    for r in range(nproc):
        e = {**base, "RANK": str(r), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(nproc),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        procs.append(subprocess.Popen(list(argv), env=e))
        log(f"rank {r} pid {procs[-1].pid}")
    if on_start is not None:
        on_start(procs)
    try:
        return _watch(procs, grace_s, linger_s, log)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        return LaunchResult(130, None, "interrupted; stopped every rank")


def _watch(procs: list[subprocess.Popen], grace_s: float, linger_s: float, log: Callable[[str], None]) -> LaunchResult:
    leader_done: float | None = None
    while True:
        codes = [p.poll() for p in procs]
        for r, code in enumerate(codes):
            if code not in (None, 0):
                running = [q for q, c in enumerate(codes) if c is None]
                still = f"; rank(s) {running} still running (hung?)" if running and r == 0 else ""
                msg = f"rank {r} (pid {procs[r].pid}) {_describe(code)}{still}; stopping the other ranks"
                log(msg)
                _stop(procs, grace_s)
                return LaunchResult(code if code > 0 else 128 - code, r, msg)
        if all(c == 0 for c in codes):
            return LaunchResult(0, None, "")
        if codes[0] == 0:
            leader_done = leader_done or time.monotonic()
            if time.monotonic() - leader_done > linger_s:
                hung = [r for r, c in enumerate(codes) if c is None]
                msg = f"rank(s) {hung} did not exit within {linger_s:.0f} s after rank 0 finished; killed them"
                log(msg)
                _stop(procs, grace_s)
                return LaunchResult(1, hung[0], msg)
        time.sleep(0.05)


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.send_signal(signal.SIGCONT)  # a stopped rank cannot act on SIGTERM until it runs again
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------ the generate role


@dataclass(frozen=True)
class GenerateRequest:
    prompts: tuple[str, ...] = ()
    prompt_ids: tuple[tuple[int, ...], ...] | None = None
    max_new_tokens: int = 64
    sampling: Any = None  # runtime.sampler.SamplingConfig; None = greedy
    stop: tuple[str, ...] = ()
    as_json: bool = False
    device: str = "cpu"
    threads: int = 0  # ORT intra-op threads per rank; 0 = cores / ranks on the CPU
    timeout_s: float = DEFAULT_TIMEOUT_S
    cuda_graph: bool | None = None  # OrtOptions.cuda_graph of every rank (None: the backend's default)
    logprobs: bool = False  # print each token's log-probability in --json (rank 0's sampler computes them)


def generate_worker(artifact: str | Path, request: GenerateRequest) -> int:
    """One rank of `decodekit launch ARTIFACT`: rank 0 streams tokens (or prints JSON), the others serve."""
    from .ort_backend import OrtOptions
    from .pipeline import generate_text
    from .sampler import SamplingConfig
    from .tp_ort import TpOrtBackend

    env = RankEnv.from_env()
    assert env is not None
    threads = request.threads or (max(1, (os.cpu_count() or 1) // env.world) if request.device == "cpu" else 0)
    group = init_group(request.device, request.timeout_s)
    try:
        options = OrtOptions(device=request.device, device_id=env.local_rank, intra_op_threads=threads,
                             cuda_graph=request.cuda_graph)
        backend = TpOrtBackend(artifact, options, group=group)
        if env.rank:
            backend.serve()
            return 0
        text = any(f.file == "tokenizer.json" for f in backend.manifest.tokenizer)
        batch = len(request.prompts) or len(request.prompt_ids or ())
        stream = batch == 1 and not request.as_json  # as `decodekit generate` streams
        try:
            result = generate_text(
                backend, list(request.prompts), prompt_ids=request.prompt_ids, max_new_tokens=request.max_new_tokens,
                sampling=request.sampling or SamplingConfig(), stop=list(request.stop),
                on_text=(lambda b, piece: print(piece, end="", flush=True)) if stream and text else None,
                on_token=(lambda b, t: print(t, end=" ", flush=True)) if stream and not text else None)
        finally:
            backend.close()
        _print_result(result, request.as_json, stream, env.world, request.logprobs)
        return 0
    finally:
        close_group()


def _print_result(result: Any, as_json: bool, streamed: bool, world: int, logprobs: bool = False) -> None:
    if as_json:
        texts = result.text or [None] * len(result.output_ids)
        doc = {"tokens": result.output_ids, "text": texts, "finish_reasons": result.finish_reasons, "tp": world}
        if logprobs:
            doc["logprobs"] = result.logprobs
        print(json.dumps(doc))
    elif streamed:
        print(flush=True)
    else:
        for b, out in enumerate(result.output_ids):
            print(f"[{b}] " + (result.text[b] if result.text else " ".join(map(str, out))), flush=True)
