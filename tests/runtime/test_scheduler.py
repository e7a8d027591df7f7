"""Continuous batching (runtime/scheduler.py) against independent single-request generation on the ORT CPU backend."""

from __future__ import annotations

import numpy as np
import pytest

from decodekit.errors import GenerationError, QueueFullError
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.request import Request
from decodekit.runtime.sampler import SamplingConfig
from decodekit.runtime.scheduler import Scheduler, SchedulerConfig

GREEDY = SamplingConfig(logprobs=False)


@pytest.fixture(scope="module")
def backend(exported, one_thread):
    from decodekit.runtime.ort_backend import OrtBackend

    with OrtBackend(exported("preset:tiny"), intra_op_threads=1) as b:
        yield b


@pytest.fixture(scope="module")
def optimized(exported, tmp_path_factory, one_thread):
    """Factory: the ORT CPU backend of preset:tiny optimized into a dialect (one per dialect per module)."""
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.ort_backend import OrtBackend

    backends: dict[str, OrtBackend] = {}

    def make(dialect: str) -> OrtBackend:
        if dialect not in backends:
            out = tmp_path_factory.mktemp(dialect) / "artifact"
            optimize(exported("preset:tiny"), out, dialect)
            backends[dialect] = OrtBackend(out, intra_op_threads=1)
        return backends[dialect]

    yield make
    for b in backends.values():
        b.close()


@pytest.mark.parametrize("dialect", ["ort-gqa", "ort-gqa-static"])
def test_side_prefill_on_the_gqa_dialects(optimized, dialect) -> None:
    """GroupQueryAttention decodes rows of different lengths in one step. ort-gqa-static (the CUDA-graph dialect:
    no mixed-length prefill, no cache append) prefills only equal-length prompts together, each into an empty
    side cache: 10 prompts, some of equal length, queued at once."""
    b = optimized(dialect)
    prompts = _prompts(6, seed=5) + [[9, 8, 7], [4, 5, 6], [1, 2, 3, 4]] + [list(range(10, 50))]
    with Scheduler(b, SchedulerConfig(slots=4, prefill_chunk=16)) as sched:
        with sched._cond:
            streams = [sched.submit(Request(tuple(p), 9, GREEDY, eos_ids=())) for p in prompts]
        results = [s.result() for s in streams]
    assert [r.token_ids for r in results] == [_alone(b, p, 9) for p in prompts]


def test_new_prompts_gather_while_rows_decode(backend) -> None:
    """While rows decode, prompts that free rows admit wait to be prefilled together (one waiting prompt per
    ``rows_per_prefill`` decoding rows, or ``max_prefill_wait`` steps): fewer prefill runs than prefilling each at
    once, and every answer still as if alone. Queued at once, so both runs see the same schedule of arrivals."""
    prompts = _prompts(12, seed=3)
    budgets = [4 + (i * 5) % 13 for i in range(12)]

    def serve(rows_per_prefill: int) -> tuple[list[list[int]], int]:
        cfg = SchedulerConfig(slots=4, rows_per_prefill=rows_per_prefill, max_prefill_wait=4)
        with Scheduler(backend, cfg) as sched:
            with sched._cond:
                streams = [sched.submit(Request(tuple(p), n, GREEDY, eos_ids=())) for p, n in zip(prompts, budgets)]
            return [s.result().token_ids for s in streams], sched.side.runs

    eager, eager_runs = serve(0)
    gathered, gathered_runs = serve(1)
    assert gathered == eager == [_alone(backend, p, n) for p, n in zip(prompts, budgets)]
    assert gathered_runs < eager_runs, (gathered_runs, eager_runs)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def _alone(backend, prompt, max_tokens, sampling=GREEDY):
    return generate_ids(backend, [prompt], max_tokens, sampling, eos_ids=())[0]


@pytest.mark.parametrize("chunk", [256, 7])
def test_continuous_batching_matches_single_requests(backend, chunk) -> None:
    """12 requests on 8 slots, submitted while others decode (chunk 7: prompts over 7 tokens are prefilled 7 tokens
    per engine step in the side lane, beside the decoding rows): every greedy output equals generating that prompt
    alone."""
    prompts = _prompts(12)
    budgets = [3 + (i * 5) % 17 for i in range(12)]
    with Scheduler(backend, SchedulerConfig(prefill_chunk=chunk)) as sched:
        first = [sched.submit(Request(tuple(p), n, GREEDY, eos_ids=())) for p, n in zip(prompts[:5], budgets)]
        done = first[0].result()  # the later ones arrive while the others are mid-generation
        rest = [sched.submit(Request(tuple(p), n, GREEDY, eos_ids=())) for p, n in zip(prompts[5:], budgets[5:])]
        results = [done] + [s.result() for s in first[1:] + rest]
        assert sched.active == 0 and sched.queue_length == 0
    for p, n, r in zip(prompts, budgets, results):
        assert r.finish_reason == "length"
        assert r.token_ids == _alone(backend, p, n)


def test_requests_that_arrive_together_are_prefilled_together(backend) -> None:
    """7 prompts of different lengths queued at once: one right-padded prefill per power-of-two piece (4 + 2 + 1),
    and every answer as if alone."""
    prompts = _prompts(7, seed=11)
    with Scheduler(backend, SchedulerConfig(prefills_per_step=8)) as sched:
        with sched._cond:  # the engine admits nothing until all are queued
            streams = [sched.submit(Request(tuple(p), 6, GREEDY, eos_ids=())) for p in prompts]
        results = [s.result() for s in streams]
        assert sched.side.runs == 3
    assert [r.token_ids for r in results] == [_alone(backend, p, 6) for p in prompts]


def test_free_rows_are_rewound_before_they_pass_max_seq(backend) -> None:
    """Row 1 stays free while row 0 serves two long requests one after the other (more steps than max_seq): the free
    row is rewound, no input passes max_seq, and the answers are right."""
    max_seq = backend.max_seq
    prompt, n = [5, 6, 7], max_seq - 4
    with Scheduler(backend, SchedulerConfig(slots=2)) as sched:
        got = [sched.submit(Request(tuple(prompt), n, GREEDY, eos_ids=())).result() for _ in range(2)]
        assert sched.steps > max_seq
        assert int(sched.state.inputs[1:3].max()) < max_seq and int(sched.length.max()) < max_seq
    assert got[0].token_ids == got[1].token_ids == _alone(backend, prompt, n)


def test_seeded_sampling_is_independent_of_the_batch(backend) -> None:
    """A seeded request draws the same tokens alone, beside other requests, and as `generate` with that seed."""
    cfg = SamplingConfig(temperature=0.9, top_k=50, top_p=0.95, seed=1234, logprobs=False)
    prompt = _prompts(1, seed=7)[0]
    expected = _alone(backend, prompt, 12, cfg)
    with Scheduler(backend) as sched:
        noise = [sched.submit(Request(tuple(p), 20, SamplingConfig(temperature=1.0, logprobs=False), eos_ids=()))
                 for p in _prompts(5, seed=3)]
        got = sched.submit(Request(tuple(prompt), 12, cfg, eos_ids=())).result()
        for s in noise:
            s.result()
    assert got.token_ids == expected


def test_cancellation_frees_the_slot_and_queue_overflow_is_refused(backend) -> None:
    with Scheduler(backend, SchedulerConfig(slots=1, max_queue=1)) as sched:
        long = sched.submit(Request((5, 6, 7), 200, GREEDY, eos_ids=()))
        waiting = sched.submit(Request((8, 9), 4, GREEDY, eos_ids=()))
        with pytest.raises(QueueFullError):
            sched.submit(Request((8, 9), 4, GREEDY, eos_ids=()))
        deltas = iter(long)
        next(deltas)  # generating
        long.cancel()
        rest = list(deltas)
        assert rest[-1].finish_reason == "cancelled"
        assert sum(len(d.token_ids) for d in rest) < 199
        assert waiting.result().token_ids == _alone(backend, [8, 9], 4)  # took the freed slot
        assert sched.active == 0


def test_stop_sequences_and_eos_end_a_request_without_the_stop_tokens(backend) -> None:
    prompt = [11, 12, 13]
    full = _alone(backend, prompt, 10)
    stop = tuple(full[3:5])
    with Scheduler(backend) as sched:
        r = sched.submit(Request(tuple(prompt), 10, GREEDY, stop_ids=(stop,), eos_ids=())).result()
        e = sched.submit(Request(tuple(prompt), 10, GREEDY, eos_ids=(full[2],))).result()
    first = next(i for i in range(len(full) - 1) if tuple(full[i:i + 2]) == stop)
    assert r.finish_reason == "stop" and r.token_ids == full[:first]
    assert e.finish_reason == "eos" and e.token_ids == full[:full.index(full[2]) + 1]


def test_bad_requests_are_refused_at_submit(backend) -> None:
    with Scheduler(backend) as sched:
        for bad in (Request((), 4), Request((1, 2), 0), Request((1,) * 250, 10), Request((1, 99999), 4)):
            with pytest.raises(GenerationError):
                sched.submit(bad)


def test_reading_tokens_one_step_behind_as_on_cuda(backend) -> None:
    """On CUDA the host reads step k's tokens after launching step k+1 (TokenChannel.lookahead = 1): rows that end
    at step k step once more, rows that join after a launch must not take its tokens. The same bookkeeping on the
    CPU, with seeded sampling and stop sequences in the mix: every answer as if alone."""
    prompts = _prompts(10, seed=21)
    budgets = [2 + (i * 7) % 19 for i in range(10)]
    seeded = SamplingConfig(temperature=0.8, top_k=20, seed=7, logprobs=False)
    with Scheduler(backend, SchedulerConfig(slots=3)) as sched:
        sched.step.channel.lookahead = 1
        streams = [sched.submit(Request(tuple(p), n, seeded if i % 3 == 0 else GREEDY, eos_ids=()))
                   for i, (p, n) in enumerate(zip(prompts, budgets))]
        results = [s.result() for s in streams]
    for i, (p, n, r) in enumerate(zip(prompts, budgets, results)):
        assert r.token_ids == _alone(backend, p, n, seeded if i % 3 == 0 else GREEDY), i


def _need_cuda() -> None:
    import onnxruntime as ort
    import torch

    if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")


@pytest.fixture(scope="module")
def cuda_fp16(exported, tmp_path_factory):
    """preset:tiny as fp16 ort-gqa-static: the precision at which onnxruntime-gpu runs GroupQueryAttention on the
    GPU, so the scheduler's step can be captured (fp32 runs it on the CPU: export/manifest.py CUDA_PRECISIONS)."""
    from decodekit.graphs.pipeline import optimize

    _need_cuda()
    out = tmp_path_factory.mktemp("fp16-static") / "artifact"
    optimize(exported("preset:tiny"), out, "ort-gqa-static", dtype="fp16")
    return out


@pytest.mark.gpu
def test_cuda_scheduler_answers_as_each_request_alone(optimized) -> None:
    """fp32 ort-gqa-static on CUDA (GroupQueryAttention on the CPU: the step is not captured, with a warning),
    10 requests (one seeded) joining and leaving 3 slots; each answer equals generating that request alone on the
    same GPU."""
    from decodekit.runtime.ort_backend import OrtBackend

    _need_cuda()
    art = optimized("ort-gqa-static").artifact
    prompts = _prompts(10, seed=21)
    seeded = SamplingConfig(temperature=0.8, top_k=20, seed=7, logprobs=False)
    sampling = [seeded if i == 4 else GREEDY for i in range(10)]
    with pytest.warns(UserWarning, match="GroupQueryAttention"):
        b = OrtBackend(art, device="cuda")
    with b, Scheduler(b, SchedulerConfig(slots=3)) as sched:
        assert not b.cuda_graph
        streams = [sched.submit(Request(tuple(p), 5 + i, sampling[i], eos_ids=())) for i, p in enumerate(prompts)]
        results = [s.result() for s in streams]
        assert sched.failure is None and not sched.step.captured
        alone = [_alone(b, p, 5 + i, sampling[i]) for i, p in enumerate(prompts)]
    assert [r.token_ids for r in results] == alone


@pytest.mark.gpu
def test_cuda_scheduler_replays_one_captured_step_as_requests_come_and_go(cuda_fp16) -> None:
    """What `decodekit serve --device cuda` runs on an fp16 ort-gqa-static artifact: the shared step captured once
    and replayed while 10 requests (one seeded) join and leave 3 slots; the tokens equal the same schedule run
    uncaptured (the requests are queued at once, so both runs batch them alike)."""
    from decodekit.runtime.ort_backend import OrtBackend

    prompts = _prompts(10, seed=21)
    seeded = SamplingConfig(temperature=0.8, top_k=20, seed=7, logprobs=False)
    sampling = [seeded if i == 4 else GREEDY for i in range(10)]

    def serve(graph: bool) -> tuple[list[list[int]], bool, int, Exception | None]:
        with OrtBackend(cuda_fp16, device="cuda", cuda_graph=graph) as b, \
                Scheduler(b, SchedulerConfig(slots=3)) as sched:
            with sched._cond:
                streams = [sched.submit(Request(tuple(p), 5 + i, sampling[i], eos_ids=()))
                           for i, p in enumerate(prompts)]
            return [s.result().token_ids for s in streams], sched.step.captured, b.captured_steps, sched.failure

    want, captured, _, failure = serve(False)
    assert failure is None and not captured
    got, captured, count, failure = serve(True)
    assert failure is None and captured and count == 1
    assert got == want


@pytest.mark.gpu
def test_fp32_gqa_step_is_refused_a_cuda_graph(optimized) -> None:
    from decodekit.runtime.backend import BackendError
    from decodekit.runtime.ort_backend import OrtBackend

    _need_cuda()
    with pytest.warns(UserWarning), pytest.raises(BackendError, match="GroupQueryAttention on the CPU.*--dtype fp16"):
        OrtBackend(optimized("ort-gqa-static").artifact, device="cuda", cuda_graph=True)
