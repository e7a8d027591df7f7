"""Continuous batching (runtime/scheduler.py) against independent single-request generation on the ORT CPU backend."""

from __future__ import annotations

import numpy as np
import pytest

from decodekit.errors import GenerationError, QueueFullError
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.request import Request
from decodekit.runtime.sampler import SamplingConfig
from decodekit.runtime.scheduler import Scheduler, SchedulerConfig, plan_step

GREEDY = SamplingConfig(logprobs=False)


@pytest.fixture(scope="module")
def backend(exported, one_thread):
    from decodekit.runtime.ort_backend import OrtBackend

    with OrtBackend(exported("preset:tiny"), intra_op_threads=1) as b:
        yield b


@pytest.fixture(scope="module")
def gqa_backend(exported, tmp_path_factory, one_thread):
    from decodekit.graphs.pipeline import optimize
    from decodekit.runtime.ort_backend import OrtBackend

    out = tmp_path_factory.mktemp("gqa") / "artifact"
    optimize(exported("preset:tiny"), out, "ort-gqa")
    with OrtBackend(out, intra_op_threads=1) as b:
        yield b


def test_side_prefill_on_the_ort_gqa_dialect(gqa_backend) -> None:
    """GroupQueryAttention decodes rows of different lengths in one step: the side prefill serves ort-gqa."""
    prompts = _prompts(10, seed=5)
    with Scheduler(gqa_backend, SchedulerConfig(slots=4)) as sched:
        results = [s.result() for s in [sched.submit(Request(tuple(p), 9, GREEDY, eos_ids=())) for p in prompts]]
    assert [r.token_ids for r in results] == [_alone(gqa_backend, p, 9) for p in prompts]


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(1, 40))).tolist() for _ in range(n)]


def _alone(backend, prompt, max_tokens, sampling=GREEDY):
    return generate_ids(backend, [prompt], max_tokens, sampling, eos_ids=())[0]


@pytest.mark.parametrize("prefill", ["mixed", "side"])
def test_continuous_batching_matches_single_requests(backend, prefill) -> None:
    """12 requests on 8 slots, submitted while others decode (mixed: prompts are chunked by 7 tokens, so prefills
    span several [B, S] steps beside decoding rows; side: prefilled alone and copied into their rows): every
    greedy output equals generating that prompt alone."""
    prompts = _prompts(12)
    budgets = [3 + (i * 5) % 17 for i in range(12)]
    with Scheduler(backend, SchedulerConfig(prefill_chunk=7, prefill=prefill)) as sched:
        first = [sched.submit(Request(tuple(p), n, GREEDY, eos_ids=())) for p, n in zip(prompts[:5], budgets)]
        done = first[0].result()  # the later ones arrive while the others are mid-generation
        rest = [sched.submit(Request(tuple(p), n, GREEDY, eos_ids=())) for p, n in zip(prompts[5:], budgets[5:])]
        results = [done] + [s.result() for s in first[1:] + rest]
        assert sched.active == 0 and sched.queue_length == 0
    for p, n, r in zip(prompts, budgets, results):
        assert r.finish_reason == "length"
        assert r.token_ids == _alone(backend, p, n)


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


def test_plan_keeps_every_write_inside_the_cache() -> None:
    """A decode row near max_seq caps the prefill chunk of a new row, so no padding column writes past max_seq."""
    from decodekit.runtime.slot import Slot
    from decodekit.runtime.request import Stream

    old = Slot(0, Stream(Request(tuple(range(3, 60)), 4)), 512, (), "cpu", None)
    old.prefilled, old.output = 57, [5]
    new = Slot(1, Stream(Request(tuple(range(3, 40)), 4)), 512, (), "cpu", None)
    plan = plan_step([old, new, None], max_seq=64, prefill_chunk=256)
    assert plan.ids_BS.shape == (3, 7) and plan.chunks == {1: 7}
    assert (plan.write_B + plan.ids_BS.shape[1] <= 64).all()
    assert plan.sample_col == {0: 0} and plan.nonpad_B.tolist() == [58, 7, 1]
