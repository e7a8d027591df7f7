"""Sampler tests: every kernel is checked against an independent plain-Python reference, in both backends."""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest
import torch

from decodekit.runtime.sampler import (
    SampleResult,
    Sampler,
    SamplingConfig,
    apply_penalties,
    min_p_mask,
    top_k_mask,
    top_p_mask,
)

BACKENDS = ("numpy", "torch")

# Upper 0.1% points of the chi-square distribution (scipy is not a dependency), keyed by degrees of freedom.
CHI2_CRIT_P001 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


# ------------------------------------------------------------------------------------------------ helpers


def to_backend(a: np.ndarray, backend: str):
    return torch.from_numpy(np.ascontiguousarray(a)) if backend == "torch" else a


def to_np(a) -> np.ndarray:
    return a.numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def ref_order(row: list[float]) -> list[int]:
    """Token ids by descending logit, lower id first on ties."""
    return sorted(range(len(row)), key=lambda i: (-row[i], i))


def ref_exp(row: list[float]) -> list[float]:
    m = max(row)
    return [math.exp(v - m) for v in row]


def ref_softmax(row: list[float]) -> list[float]:
    e = ref_exp(row)
    s = sum(e)
    return [v / s for v in e]


def ref_top_k(row: list[float], k: int) -> list[bool]:
    keep = set(ref_order(row)[:k]) if k > 0 else set(range(len(row)))
    return [i in keep for i in range(len(row))]


def ref_top_p(row: list[float], p: float) -> list[bool]:
    """Shortest sorted prefix whose mass reaches p, with exact rational cumulative sums; p == 1 is "off"."""
    if p >= 1.0:
        return [True] * len(row)
    e = [Fraction(v) for v in ref_exp(row)]
    total = sum(e)
    keep, cum = set(), Fraction(0)
    for i in ref_order(row):
        keep.add(i)
        cum += e[i]
        if cum / total >= Fraction(p):
            break
    return [i in keep for i in range(len(row))]


def ref_min_p(row: list[float], p: float) -> list[bool]:
    probs = ref_softmax(row)
    return [q >= p * max(probs) for q in probs]


def ref_penalties(logits, prompts, outputs, rep, presence, frequency) -> list[list[float]]:
    out = [[float(v) for v in row] for row in logits]
    for b, row in enumerate(out):
        for t in set(prompts[b]) | set(outputs[b]):
            row[t] = row[t] / rep if row[t] > 0 else row[t] * rep
        for t, c in Counter(outputs[b]).items():
            row[t] -= presence * 1.0 + frequency * c
    return out


def ref_processed(row: list[float], cfg: SamplingConfig) -> list[float]:
    """Temperature then top-k, top-p, min-p on an already penalized row; dropped tokens are -inf."""
    x = [v / cfg.temperature for v in row]
    for fn, p, on in (
        (ref_top_k, cfg.top_k, cfg.top_k > 0),
        (ref_top_p, cfg.top_p, cfg.top_p < 1),
        (ref_min_p, cfg.min_p, cfg.min_p > 0),
    ):
        if on:
            x = [v if k else -math.inf for v, k in zip(x, fn(x, p))]
    return x


def ref_log_softmax(row: list[float]) -> list[float]:
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return [v - lse for v in row]


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# ------------------------------------------------------------------------------------------------ masks

TIE_ROWS = [
    [2.0, 1.0, 2.0, 0.0, 1.0, 2.0],
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
    [0.0, -math.inf, 1.0, -math.inf, 0.5, 0.0],
    [3.0, -1.0, 0.25, 0.25, -2.0, 3.0],
]


def random_rows(seed: int, n: int = 16, vocab: int = 6) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=(n, vocab)).astype(np.float32)
    x[::3, 5] = x[::3, 2]  # some exact ties
    return x


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 6, 7, 100])
def test_top_k_mask_matches_reference(backend: str, k: int) -> None:
    x = np.concatenate([np.array(TIE_ROWS, dtype=np.float32), random_rows(k)])
    got = to_np(top_k_mask(to_backend(x, backend), k))
    want = np.array([ref_top_k(row.tolist(), k) for row in x])
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.bool_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.6, 0.9, 0.999, 1.0])
def test_top_p_mask_matches_reference(backend: str, p: float) -> None:
    x = np.concatenate([np.array(TIE_ROWS, dtype=np.float32), random_rows(int(p * 1000))])
    got = to_np(top_p_mask(to_backend(x, backend), p))
    for row, g in zip(x, got):
        probs = ref_softmax(row.tolist())
        cums = np.cumsum([probs[i] for i in ref_order(row.tolist())])
        if p < 1.0 and np.min(np.abs(cums - p)) < 1e-5 and np.min(np.abs(cums - p)) > 0:
            continue  # within fp32 rounding of the boundary: either answer is right
        np.testing.assert_array_equal(g, ref_top_p(row.tolist(), p), err_msg=f"row={row.tolist()} p={p}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_mask_hand_made(backend: str) -> None:
    flat = np.zeros((1, 4), dtype=np.float32)
    cases = [(0.5, [True, True, False, False]), (0.6, [True, True, True, False]), (1e-9, [True, False, False, False])]
    for p, want in cases:
        np.testing.assert_array_equal(to_np(top_p_mask(to_backend(flat, backend), p))[0], want)
    # One dominant token: always kept alone for any p below its mass; p=1 keeps even -inf tokens.
    x = np.array([[0.0, 10.0, -math.inf, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_np(top_p_mask(to_backend(x, backend), 0.99))[0], [False, True, False, False])
    assert to_np(top_p_mask(to_backend(x, backend), 1.0)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.37, 0.8, 1.0])
def test_min_p_mask_matches_reference(backend: str, p: float) -> None:
    x = np.concatenate([np.array(TIE_ROWS, dtype=np.float32), random_rows(int(p * 100) + 7)])
    got = to_np(min_p_mask(to_backend(x, backend), p))
    want = np.array([ref_min_p(row.tolist(), p) for row in x])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_accept_low_precision_and_1d(backend: str) -> None:
    x = random_rows(3, n=1)[0]
    for dtype in (np.float16, np.float64):
        xd = x.astype(dtype)
        row = xd.astype(np.float32).tolist()
        np.testing.assert_array_equal(to_np(top_k_mask(to_backend(xd, backend), 3)), ref_top_k(row, 3))
        np.testing.assert_array_equal(to_np(min_p_mask(to_backend(xd, backend), 0.2)), ref_min_p(row, 0.2))


def test_mask_arguments_are_validated() -> None:
    x = np.zeros((1, 3), dtype=np.float32)
    for backend in BACKENDS:
        xb = to_backend(x, backend)
        with pytest.raises(ValueError):
            top_k_mask(xb, -1)
        with pytest.raises(ValueError):
            top_p_mask(xb, 0.0)
        with pytest.raises(ValueError):
            min_p_mask(xb, 1.5)


# ------------------------------------------------------------------------------------------------ penalties

PROMPTS = [[1, 2, 2, 7], [], [0, 9]]
OUTPUTS = [[3, 3, 1, 5, 3], [4, 4, 9], []]
PENALTIES = [(1.0, 0.0, 0.0), (1.3, 0.0, 0.0), (0.7, 0.0, 0.0), (1.0, 0.5, 0.0), (1.0, 0.0, 0.25), (1.2, -0.4, 1.5)]


def primed_sampler(backend: str, cfg: SamplingConfig, vocab: int = 10) -> Sampler:
    s = Sampler(cfg, len(PROMPTS), vocab, backend=backend)
    s.reset(PROMPTS)
    for step in range(max(map(len, OUTPUTS))):
        tokens = [out[step] if step < len(out) else 0 for out in OUTPUTS]
        active = [step < len(out) for out in OUTPUTS]
        s.observe(np.array(tokens), active=np.array(active))
    return s


@pytest.mark.parametrize("rep,presence,frequency", PENALTIES)
def test_penalties_match_reference_in_both_backends(rep: float, presence: float, frequency: float) -> None:
    logits = np.random.default_rng(0).normal(scale=3.0, size=(3, 10)).astype(np.float32)
    want = np.array(ref_penalties(logits, PROMPTS, OUTPUTS, rep, presence, frequency))
    results = []
    for backend in BACKENDS:
        s = primed_sampler(backend, SamplingConfig())
        got = apply_penalties(
            to_backend(logits, backend),
            s.output_counts,
            s.prompt_mask,
            repetition_penalty=rep,
            presence_penalty=presence,
            frequency_penalty=frequency,
        )
        results.append(to_np(got))
        assert results[-1].dtype == np.float32
        np.testing.assert_allclose(results[-1], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_separates_prompt_and_generated_tokens(backend: str) -> None:
    s = primed_sampler(backend, SamplingConfig())
    counts, prompt = to_np(s.output_counts), to_np(s.prompt_mask)
    assert counts.dtype == np.int32 and prompt.dtype == np.bool_
    for b in range(3):
        assert {t: int(counts[b, t]) for t in np.flatnonzero(counts[b])} == dict(Counter(OUTPUTS[b]))
        assert set(np.flatnonzero(prompt[b]).tolist()) == set(PROMPTS[b])
    s.reset([[4], [], []])
    assert to_np(s.output_counts).sum() == 0 and to_np(s.prompt_mask).sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_applies_penalties_before_greedy(backend: str) -> None:
    cfg = SamplingConfig(repetition_penalty=1.5, presence_penalty=0.3, frequency_penalty=0.6)
    s = primed_sampler(backend, cfg)
    logits = np.array([[0, 1, 0, 3.1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 2.0, 0, 0, 0, 0, 1.9], [3.0] + [0] * 8 + [2.5]])
    logits = logits.astype(np.float32)
    pen = ref_penalties(logits, PROMPTS, OUTPUTS, 1.5, 0.3, 0.6)
    res = s.sample(to_backend(logits, backend))
    assert np.argmax(logits, axis=-1).tolist() == [3, 4, 0]
    assert to_np(res.tokens).tolist() == [int(np.argmax(r)) for r in pen] == [0, 9, 0]
    want_lp = [ref_log_softmax(r)[int(np.argmax(r))] for r in pen]
    np.testing.assert_allclose(to_np(res.logprobs), want_lp, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ greedy


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_argmax_first_index_on_ties(backend: str) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 50)).astype(np.float32)
    x[0, [3, 17]] = 9.0  # tie: index 3 wins
    x[1, :] = 0.5  # all tied: index 0 wins
    s = Sampler(SamplingConfig(top_k=2, top_p=0.1, min_p=0.5), 8, 50, backend=backend)
    res = s.sample(to_backend(x, backend))
    assert isinstance(res, SampleResult)
    tokens, logprobs = (to_np(v) for v in res)
    assert tokens.dtype == np.int64 and logprobs.dtype == np.float32
    np.testing.assert_array_equal(tokens, np.argmax(x, axis=-1))
    assert tokens[0] == 3 and tokens[1] == 0
    want = [ref_log_softmax(row.tolist())[t] for row, t in zip(x, tokens)]  # filters do not touch greedy logprobs
    np.testing.assert_allclose(logprobs, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_greedy_low_precision_inputs_agree_across_backends(dtype: str) -> None:
    x32 = np.random.default_rng(2).normal(size=(4, 33)).astype(np.float32)
    xt = torch.from_numpy(x32).to(getattr(torch, dtype))
    exact = xt.float().numpy()
    t_res = Sampler(SamplingConfig(), 4, 33, backend="torch").sample(xt)
    n_res = Sampler(SamplingConfig(), 4, 33, backend="numpy").sample(exact.astype(np.float64))
    np.testing.assert_array_equal(t_res.tokens.numpy(), np.argmax(exact, axis=-1))
    np.testing.assert_array_equal(n_res.tokens, np.argmax(exact, axis=-1))
    np.testing.assert_allclose(t_res.logprobs.numpy(), n_res.logprobs, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ sampling

FULL_CFG = dict(
    temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3
)


def run_steps(backend: str, cfg: SamplingConfig, steps: int = 25, batch: int = 4, vocab: int = 64) -> list[list[int]]:
    rng = np.random.default_rng(123)
    s = Sampler(cfg, batch, vocab, backend=backend)
    s.reset([[1, 2, 3]] * batch)
    seq = []
    for _ in range(steps):
        res = s.sample(to_backend(rng.normal(size=(batch, vocab)).astype(np.float32), backend))
        s.observe(res.tokens)
        seq.append(to_np(res.tokens).tolist())
    return seq


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_reproducibility(backend: str) -> None:
    a = run_steps(backend, SamplingConfig(seed=7, **FULL_CFG))
    b = run_steps(backend, SamplingConfig(seed=7, **FULL_CFG))
    c = run_steps(backend, SamplingConfig(seed=8, **FULL_CFG))
    assert a == b
    assert a != c


@pytest.mark.parametrize("backend", BACKENDS)
def test_reset_reseeds(backend: str) -> None:
    x = to_backend(np.random.default_rng(5).normal(size=(2, 30)).astype(np.float32), backend)
    s = Sampler(SamplingConfig(temperature=1.5, seed=11), 2, 30, backend=backend)
    first = [to_np(s.sample(x).tokens).tolist() for _ in range(10)]
    s.reset([[], []])
    again = [to_np(s.sample(x).tokens).tolist() for _ in range(10)]
    assert first == again


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_and_tokens_follow_processed_distribution(backend: str) -> None:
    cfg = SamplingConfig(seed=3, **FULL_CFG)
    vocab, batch = 64, 4
    prompts = [[1, 2, 3], [5], [], [63, 0]]
    s = Sampler(cfg, batch, vocab, backend=backend)
    s.reset(prompts)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    rng = np.random.default_rng(9)
    for _ in range(12):
        logits = rng.normal(scale=2.0, size=(batch, vocab)).astype(np.float32)
        before = logits.copy()
        tokens, logprobs = (to_np(v) for v in s.sample(to_backend(logits, backend)))
        np.testing.assert_array_equal(logits, before)  # input untouched
        pen = ref_penalties(logits, prompts, outputs, cfg.repetition_penalty, cfg.presence_penalty, cfg.frequency_penalty)
        for b in range(batch):
            processed = ref_processed(pen[b], cfg)
            t = int(tokens[b])
            assert processed[t] > -math.inf, "sampled a filtered-out token"
            assert logprobs[b] == pytest.approx(ref_log_softmax(processed)[t], abs=1e-4)
            outputs[b].append(t)
        s.observe(tokens)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [{}, {"top_k": 4, "top_p": 0.85}, {"min_p": 0.1}])
def test_temperature_sampling_distribution_chi_square(backend: str, filters: dict) -> None:
    logits = np.array([1.0, 0.5, 0.0, -0.5, 2.0, -1.0], dtype=np.float32)
    n = 20000
    cfg = SamplingConfig(temperature=0.7, seed=2024, **filters)
    s = Sampler(cfg, n, logits.size, backend=backend)  # one step of n independent rows
    tokens = to_np(s.sample(to_backend(np.tile(logits, (n, 1)), backend)).tokens)
    processed = np.array(ref_processed(logits.tolist(), cfg))
    kept = np.isfinite(processed)
    counts = np.bincount(tokens, minlength=logits.size)
    assert counts[~kept].sum() == 0
    probs = np.exp(np.array(ref_log_softmax(processed.tolist()))[kept])
    dof = int(kept.sum()) - 1
    stat = chi_square(counts[kept].astype(np.float64), probs)
    assert stat < CHI2_CRIT_P001[dof], f"chi2={stat:.2f} dof={dof} counts={counts} expected={probs * n}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_torch_backend_stays_on_device() -> None:
    s = Sampler(SamplingConfig(seed=0, **FULL_CFG), 2, 100, backend="torch", device="cuda")
    s.reset([[1], [2]])
    logits = torch.randn(2, 100, device="cuda", dtype=torch.bfloat16)
    active = torch.tensor([True, False], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any device->host read of data raises
    try:
        res = s.sample(logits)
        s.observe(res.tokens, active=active)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert res.tokens.is_cuda and res.logprobs.is_cuda
    assert res.tokens.dtype == torch.int64 and res.logprobs.dtype == torch.float32
    assert s.output_counts.sum().item() == 1
    with pytest.raises(ValueError, match="device|on"):
        s.sample(torch.randn(2, 100))


# ------------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 1e-9}, "temperature"),
        ({"temperature": math.inf}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": math.nan}, "top_p"),
        ({"min_p": -0.01}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"seed": -1}, "seed"),
        ({"seed": 1.0}, "seed"),
    ],
)
def test_invalid_config_raises(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field} must") as err:
        SamplingConfig(**kwargs)
    assert "\n" not in str(err.value)


def test_top_p_message() -> None:
    with pytest.raises(ValueError, match=r"^top_p must be in \(0, 1\], got 1\.5$"):
        SamplingConfig(top_p=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_sampler_usage_raises(backend: str) -> None:
    with pytest.raises(ValueError, match="backend"):
        Sampler(SamplingConfig(), 2, 10, backend="jax")
    with pytest.raises(ValueError, match="batch_size"):
        Sampler(SamplingConfig(), 0, 10, backend=backend)
    s = Sampler(SamplingConfig(), 2, 10, backend=backend)
    with pytest.raises(ValueError, match="shape"):
        s.sample(to_backend(np.zeros((2, 11), dtype=np.float32), backend))
    with pytest.raises(ValueError, match="rows"):
        s.reset([[1]])
    with pytest.raises(ValueError, match="token ids"):
        s.reset([[1], [10]])
    with pytest.raises(ValueError, match="token ids"):
        s.observe(np.array([0, -1]))
    with pytest.raises(ValueError, match="float"):
        s.sample(to_backend(np.zeros((2, 10), dtype=np.int64), backend))
