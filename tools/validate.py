"""Engine validation: the same prompts through several backends, compared step by step against the first one.

    validate(artifact, ["torch", "ort"], steps=8) -> ValidationReport

With ``reference="transformers"`` the reference is transformers' own model on the artifact's source
(``tools.hf_reference``: an oracle nobody here wrote, so a config field decodekit maps wrongly fails) and
every listed backend is a candidate.

Every backend runs a prefill and then ``steps`` decode steps with its own KV cache carried, all of them fed
the SAME tokens: the reference's (first backend's) greedy tokens (teacher forcing), so the logits stay
comparable after a first disagreement. Per step and backend: max |logit error|, that error relative to the
logit scale (max |reference logit|), the smallest per-position cosine similarity and the top-1 agreement.
Each candidate also decodes free-running (greedy, its own tokens) and its token sequences are compared with
the reference's. A failed ONNX-backed candidate is bisected (``tools.bisect``) to the first diverging layer.

Modes (``MODES``), what decides pass or fail:
    tolerance  the dtype's tolerance (``TOLERANCES``; the looser dtype of a pair applies):
        fp32  max |logit error| <= 1e-4 x max(1, logit scale) at every step, and identical greedy tokens
        fp16  top-1 agreement >= 0.99 and per-position cosine similarity >= 0.999 (greedy agreement reported)
        bf16  top-1 agreement >= 0.98 and per-position cosine similarity >= 0.995 (greedy agreement reported)
    parity     identical free-running greedy tokens for every step, whatever the dtype (the metrics reported)
    judge      every backend also against an fp32 judge (the reference's weights upcast), teacher-forced: a
               candidate passes when its logit error is within 2x the reference's own (``tools.validate_judge``);
               tells a near-tie that rounding decides from a kernel error

Raw results are kept as a Polygraphy ``RunResults`` (one runner per backend, one iteration per step, outputs
``logits`` [positions, vocab] and ``tokens``) and saved with ``save_results`` for ``polygraphy inspect data``.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import ValidationError  # noqa: F401 - re-exported
from ..runtime.backend import check_prompts
from .run_results import load_run_results, save_run_results  # noqa: F401 - load_run_results re-exported
from .validate_judge import JUDGE_LABEL, JUDGE_RULE, JudgeReport, judge_steps

Progress = Callable[[str], None]
DTYPE_ORDER = ("fp32", "fp16", "bf16")  # tighter -> looser


@dataclass(frozen=True)
class Tolerance:
    dtype: str
    logit_atol: float | None = None  # x max(1, logit scale), checked at every step
    min_top1: float | None = None  # over every compared position
    min_cosine: float | None = None  # smallest per-position cosine similarity
    greedy_must_match: bool = False
    tap_rtol: float = 1e-4  # bisect: a tap diverges when max |err| > tap_rtol x max |reference tap|
    rule: str | None = None  # a rule decided outside these numbers (--mode judge)

    def describe(self) -> str:
        parts = [self.rule] if self.rule else []
        if self.logit_atol is not None:
            parts.append(f"max |logit error| <= {self.logit_atol:g} x max(1, logit scale) at every step")
        if self.min_top1 is not None:
            parts.append(f"top-1 agreement >= {self.min_top1:g}")
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine:g}")
        if self.greedy_must_match:
            parts.append("identical greedy tokens")
        return f"{self.dtype}: " + ", ".join(parts)


TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance("fp32", logit_atol=1e-4, greedy_must_match=True, tap_rtol=1e-4),
    "fp16": Tolerance("fp16", min_top1=0.99, min_cosine=0.999, tap_rtol=2e-2),
    "bf16": Tolerance("bf16", min_top1=0.98, min_cosine=0.995, tap_rtol=5e-2),
}


def tolerance_for(*dtypes: str) -> Tolerance:
    """The tolerance of the loosest dtype among ``dtypes``."""
    return TOLERANCES[max(dtypes, key=DTYPE_ORDER.index)]


def mode_tolerance(mode: str, *dtypes: str) -> Tolerance:
    """What decides pass or fail in ``mode`` for a pair of dtypes (bisect keeps the dtype's tap tolerance)."""
    base = tolerance_for(*dtypes)
    if mode == "parity":
        return Tolerance("parity", greedy_must_match=True, tap_rtol=base.tap_rtol)
    if mode == "judge":
        return Tolerance("judge", tap_rtol=base.tap_rtol, rule=JUDGE_RULE)
    return base


MODES = ("tolerance", "parity", "judge")


@dataclass(frozen=True)
class BackendSpec:
    """One backend to run: a registered backend name on ``artifact`` (None: the validated artifact)."""

    name: str
    artifact: str | None = None
    options: tuple[tuple[str, Any], ...] = ()
    alias: str | None = None  # the label, where name@artifact would not tell two specs apart

    @property
    def label(self) -> str:
        if self.alias:
            return self.alias
        return self.name if self.artifact is None else f"{self.name}@{Path(self.artifact).name}"

    @classmethod
    def parse(cls, text: str) -> "BackendSpec":
        """``NAME`` or ``NAME@ARTIFACT`` (another artifact of the same model, e.g. an optimized one)."""
        name, _, artifact = text.strip().partition("@")
        if not name:
            raise ValidationError(f"empty backend in {text!r}; use NAME or NAME@ARTIFACT (e.g. ort@./tiny-gqa)")
        return cls(name, artifact or None)


@dataclass(frozen=True)
class StepMetrics:
    step: int  # 0 = prefill
    positions: int
    max_abs: float
    logit_scale: float  # max |reference logit|
    max_rel: float  # max_abs / logit_scale
    cosine_min: float
    top1_agreement: float
    passed: bool


@dataclass(frozen=True)
class GreedyComparison:
    match: bool
    agreement: float  # matching tokens / tokens, position by position
    first_divergence: tuple[int, int] | None  # (prompt, token index)
    tokens: list[list[int]]


@dataclass(frozen=True)
class Comparison:
    backend: str
    reference: str
    tolerance: Tolerance
    steps: list[StepMetrics]
    greedy: GreedyComparison
    passed: bool
    reasons: list[str]
    bisect: dict[str, Any] | None = None
    judge: JudgeReport | None = None  # --mode judge

    def summary(self) -> dict[str, float]:
        s = self.steps
        return {"max_abs": max(m.max_abs for m in s), "max_rel": max(m.max_rel for m in s),
                "cosine_min": min(m.cosine_min for m in s),
                "top1_agreement": float(np.average([m.top1_agreement for m in s], weights=[m.positions for m in s]))}


@dataclass(frozen=True)
class ValidationReport:
    artifact: str
    dtype: str
    reference: str
    backends: list[str]
    prompts: list[list[int]]
    steps: int
    reference_tokens: list[list[int]]
    comparisons: list[Comparison]
    seconds: float
    saved_results: str | None = None
    notes: list[str] = field(default_factory=list)
    mode: str = "tolerance"

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["passed"] = self.passed
        for c, out in zip(self.comparisons, d["comparisons"]):
            out["summary"] = c.summary()
            out["tolerance"]["description"] = c.tolerance.describe()
        return _jsonable(d)


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return str(x)  # NaN / inf are not JSON
    return x


# ------------------------------------------------------------------------------------------------ prompts

def default_prompts(vocab: int, max_seq: int, steps: int, max_batch: int, seed: int = 0,
                    equal_lengths: bool = False) -> list[list[int]]:
    """Seeded random id prompts of a few different lengths (one length with ``equal_lengths``, for artifacts without
    the mixed_lengths capability) that fit max_seq with ``steps`` decode steps."""
    room = max(1, max_seq - steps - 1)
    lengths = sorted({max(1, min(n, room)) for n in (7, 13, 4)}, reverse=True)[:max(1, max_batch)]
    lengths = [lengths[-1]] * len(lengths) if equal_lengths else lengths
    rng = np.random.default_rng(seed)
    low = 3 if vocab > 3 else 0  # skip the usual pad/bos/eos ids
    return [rng.integers(low, vocab, size=n).tolist() for n in lengths]


def encode_texts(artifact: str | Path, texts: Sequence[str]) -> list[list[int]]:
    from ..runtime.stopping import GenerationError
    from ..runtime.tokenizer import Tokenizer

    tok = Tokenizer.from_artifact(artifact)
    if tok is None:
        raise GenerationError("this artifact has no tokenizer, so text prompts cannot be encoded; "
                              "pass token ids instead (--ids 1,2,3)")
    return [tok.encode(t) for t in texts]


# ------------------------------------------------------------------------------------------------ running

@dataclass
class _Runner:
    spec: BackendSpec
    backend: Any

    @property
    def label(self) -> str:
        return self.spec.label


def _open_transformers(artifact: Path, reference_source: str | None) -> Any:
    from ..export.manifest import read_manifest
    from .hf_reference import TransformersReference

    return TransformersReference(artifact, manifest=read_manifest(artifact, verify=False), source=reference_source)


# --reference NAME -> opener(artifact, reference_source): a reference model that is not one of the artifact's backends
REFERENCES: dict[str, Callable[[Path, str | None], Any]] = {"transformers": _open_transformers}


def _open(spec: BackendSpec, artifact: Path, device: str, reference_source: str | None) -> Any:
    from ..runtime.pipeline import open_backend

    if spec.name in REFERENCES and spec.artifact is None:
        return REFERENCES[spec.name](artifact, reference_source)
    options = dict(spec.options)
    if spec.name in ("torch", "ort"):
        options.setdefault("device", device)
    if spec.name == "torch" and reference_source:
        options.setdefault("torch_source", reference_source)
    return open_backend(Path(spec.artifact) if spec.artifact else artifact, spec.name, **options)


def _host_f32(x: Any) -> np.ndarray:
    """float32 host copy of logits: np.ndarray, torch.Tensor (any device) or a bf16 OrtValue."""
    if isinstance(x, np.ndarray):
        return x.astype(np.float32)
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    if hasattr(x, "data_ptr") and hasattr(x, "shape"):  # onnxruntime OrtValue (bfloat16 has no numpy type)
        import ctypes

        shape = tuple(x.shape())
        raw = np.ctypeslib.as_array(ctypes.cast(x.data_ptr(), ctypes.POINTER(ctypes.c_uint16)), shape=shape)
        return (raw.astype(np.uint32) << 16).view(np.float32).copy()
    raise TypeError(f"unsupported logits type {type(x).__name__}")


def _prefill_inputs(prompts: list[list[int]]) -> tuple[np.ndarray, ...]:
    lens = np.array([len(p) for p in prompts], dtype=np.int64)
    ids = np.zeros((len(prompts), int(lens.max())), dtype=np.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int64), ids.shape).copy()
    return ids, pos, np.zeros(len(prompts), dtype=np.int64), lens.copy()


def _rows(logits: np.ndarray, lens: np.ndarray, step: int, all_positions: bool) -> np.ndarray:
    """[positions, vocab]: every valid prompt position (prefill, logits='all') or each sequence's last one."""
    if step == 0 and all_positions and logits.shape[1] > 1:
        return np.concatenate([logits[b, :n] for b, n in enumerate(lens)])
    return _last(logits, lens, step)


def _last(logits: np.ndarray, lens: np.ndarray, step: int) -> np.ndarray:
    if step > 0 or logits.shape[1] == 1:
        return logits[:, 0]
    return logits[np.arange(len(lens)), lens - 1]


def _teacher_forced(runners: list[_Runner], prompts: list[list[int]], steps: int, all_positions: bool):
    """Lockstep run of one batch: per label, per step, the compared logits rows; and the forced tokens [B, steps+1]."""
    inputs = _prefill_inputs(prompts)
    lens = inputs[3].copy()
    states = [r.backend.allocate(len(prompts)) for r in runners]
    rows: dict[str, list[np.ndarray]] = {r.label: [] for r in runners}
    forced = []
    for step in range(steps + 1):
        for r, state in zip(runners, states):
            logits = _host_f32(r.backend.step(state, *inputs))
            rows[r.label].append(_rows(logits, lens, step, all_positions))
            if r is runners[0]:
                tokens = _last(logits, lens, step).argmax(-1).astype(np.int64)
        forced.append(tokens)
        write = lens + step
        inputs = (tokens[:, None].copy(), write[:, None].copy(), write.copy(), write + 1)
    return rows, np.stack(forced, axis=1)


def _free_running(runner: _Runner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    from ..runtime.generate import generate_ids

    return generate_ids(runner.backend, prompts, steps + 1, eos_ids=())


# ------------------------------------------------------------------------------------------------ comparing

def step_metrics(step: int, ref: np.ndarray, cand: np.ndarray, tol: Tolerance) -> StepMetrics:
    """Metrics of one step's [positions, vocab] logits against the reference's."""
    r, c = ref.astype(np.float64), cand.astype(np.float64)
    diff = np.abs(c - r)
    max_abs = float(diff.max()) if diff.size else 0.0
    if np.isnan(diff).any():
        max_abs = float("nan")
    scale = float(np.abs(r).max()) if r.size else 0.0
    norms = np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1)
    cos = np.where(norms > 0, (r * c).sum(-1) / np.where(norms > 0, norms, 1.0), 1.0)
    cosine_min = float(np.nan_to_num(cos, nan=-1.0).min()) if cos.size else 1.0
    top1 = float((r.argmax(-1) == c.argmax(-1)).mean()) if r.size else 1.0
    passed = tol.logit_atol is None or max_abs <= tol.logit_atol * max(1.0, scale)
    return StepMetrics(step, int(r.shape[0]), max_abs, scale, max_abs / scale if scale > 0 else max_abs,
                       cosine_min, top1, bool(passed))


def compare_greedy(reference: list[list[int]], tokens: list[list[int]]) -> GreedyComparison:
    same = total = 0
    first = None
    for p, (a, b) in enumerate(zip(reference, tokens)):
        for i, (x, y) in enumerate(zip(a, b)):
            total += 1
            same += x == y
            if x != y and first is None:
                first = (p, i)
    return GreedyComparison(first is None, same / total if total else 1.0, first, tokens)


def _verdict(metrics: list[StepMetrics], greedy: GreedyComparison, tol: Tolerance) -> list[str]:
    reasons = []
    bad = [m for m in metrics if not m.passed]
    if bad:
        m = bad[0]
        reasons.append(f"step {m.step}: max |logit error| {m.max_abs:.3g} > {tol.logit_atol:g} x "
                       f"max(1, {m.logit_scale:.3g}) ({len(bad)} of {len(metrics)} steps over)")
    top1 = float(np.average([m.top1_agreement for m in metrics], weights=[m.positions for m in metrics]))
    if tol.min_top1 is not None and not top1 >= tol.min_top1:
        reasons.append(f"top-1 agreement {top1:.4f} < {tol.min_top1:g}")
    cos = min(m.cosine_min for m in metrics)
    if tol.min_cosine is not None and not cos >= tol.min_cosine:
        reasons.append(f"cosine similarity {cos:.6f} < {tol.min_cosine:g}")
    if tol.greedy_must_match and not greedy.match:
        p, i = greedy.first_divergence
        reasons.append(f"greedy tokens differ (prompt {p}, token {i}; agreement {greedy.agreement:.3f})")
    return reasons


# ------------------------------------------------------------------------------------------------ validate

def validate(artifact: str | Path, backends: Sequence[str | BackendSpec] = ("torch", "ort"),
             prompts: Sequence[Sequence[int]] | None = None, steps: int = 8, *, texts: Sequence[str] = (),
             device: str = "cpu", reference_source: str | None = None, tolerance: Tolerance | None = None,
             bisect: bool = True, save_results: str | Path | None = None, seed: int = 0,
             reference: str = "decodekit", mode: str = "tolerance",
             progress: Progress = lambda msg: None) -> ValidationReport:
    """Compare ``backends[1:]`` against ``backends[0]`` on ``artifact`` (see the module docstring).

    reference: "decodekit" (the first backend is the reference) or one of ``REFERENCES`` ("transformers":
    transformers' own model on the artifact's source is the reference and every backend is compared with it).
    mode: one of ``MODES`` (what decides pass or fail); ``tolerance`` overrides the dtype's in mode "tolerance".
    """
    started = time.perf_counter()
    artifact = Path(artifact)
    specs, manifest, prompts = _request(artifact, backends, prompts, steps, texts, seed, reference, mode)
    with ExitStack() as stack:
        loading = time.perf_counter()
        runners = [_Runner(s, stack.enter_context(_open(s, artifact, device, reference_source))) for s in specs]
        progress(f"loaded {', '.join(r.label for r in runners)} in {time.perf_counter() - loading:.1f} s")
        all_positions = all(r.backend.manifest.logits == "all" for r in runners)
        batch = min(r.backend.max_batch for r in runners)
        rows: dict[str, list[np.ndarray]] = {r.label: [] for r in runners}
        forced: list[np.ndarray] = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start:start + batch]
            progress(f"teacher-forced run: prompts {start + 1}..{start + len(chunk)} of {len(prompts)}, "
                     f"prefill + {steps} steps on {', '.join(r.label for r in runners)}")
            part, tokens = _teacher_forced(runners, chunk, steps, all_positions)
            for label, per_step in part.items():
                rows[label] = [np.concatenate([a, b]) for a, b in zip(rows[label], per_step)] if rows[label] \
                    else per_step
            forced.append(tokens)
        reference_tokens = np.concatenate(forced).tolist()
        comparisons = []
        ref = runners[0]
        for r in (r for r in runners[1:] if r.label != JUDGE_LABEL):
            progress(f"free-running greedy decode on {r.label}")
            tokens = [t for s in range(0, len(prompts), batch) for t in _free_running(r, prompts[s:s + batch], steps)]
            dtypes = (ref.backend.manifest.dtype, r.backend.manifest.dtype)
            tol = tolerance if tolerance and mode == "tolerance" else mode_tolerance(mode, *dtypes)
            metrics = [step_metrics(k, a, b, tol) for k, (a, b) in enumerate(zip(rows[ref.label], rows[r.label]))]
            greedy = compare_greedy(reference_tokens, tokens)
            judged = judge_steps(rows[ref.label], rows[r.label], rows[JUDGE_LABEL]) if mode == "judge" else None
            reasons = judged.reasons(ref.label) if judged else _verdict(metrics, greedy, tol)
            found = None
            if reasons and bisect and reference == "decodekit":
                errors = (rows[ref.label], rows[r.label])
                found = _bisect(ref, r, prompts, reference_tokens, metrics, errors, all_positions, tol, progress)
            comparisons.append(Comparison(r.label, ref.label, tol, metrics, greedy, not reasons, reasons, found,
                                          judged))
        saved = None
        if save_results is not None:
            saved = str(save_run_results(save_results, rows, reference_tokens))
    notes = [f"reference: {reference}'s model of {reference_source or manifest.source} (fp32); not bisected (the "
             f"reference has no per-layer taps: bisect with --reference decodekit)"] if reference != "decodekit" else []
    if reference != "decodekit":
        from ..export.rope import static_table_note

        notes += [n for n in [static_table_note(manifest.config, manifest.max_seq)] if n]  # why it may differ
    return ValidationReport(str(artifact), manifest.dtype, ref.label, [s.label for s in specs], prompts, steps,
                            reference_tokens, comparisons, time.perf_counter() - started, saved, notes, mode)


def _request(artifact: Path, backends: Sequence[str | BackendSpec], prompts: Sequence[Sequence[int]] | None,
             steps: int, texts: Sequence[str], seed: int, reference: str, mode: str) -> tuple[list[BackendSpec], Any,
                                                                                              list[list[int]]]:
    """The checked request: backend specs (the judge added last in mode judge), the manifest, the prompts;
    refused in one line before any backend loads."""
    from ..export.manifest import read_manifest

    specs = [b if isinstance(b, BackendSpec) else BackendSpec.parse(b) for b in backends]
    if reference != "decodekit" and reference not in REFERENCES:
        raise ValidationError(f"unknown reference {reference!r}; choose decodekit or {', '.join(REFERENCES)}")
    if mode not in MODES:
        raise ValidationError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "judge" and reference != "decodekit":
        raise ValidationError("--mode judge compares backends with the fp32 judge of decodekit's reference; "
                              "use --reference decodekit (transformers' fp32 model is a judge already)")
    if reference != "decodekit":
        specs = [BackendSpec(reference), *specs]
    if len(specs) < 2:
        raise ValidationError("validate needs at least two backends, the reference first (e.g. --backends torch,ort)")
    if mode == "judge":
        specs.append(BackendSpec("torch", None, (("compute_dtype", "fp32"),), alias=JUDGE_LABEL))
    if len({s.label for s in specs}) != len(specs):
        raise ValidationError(f"backend listed twice in {', '.join(s.label for s in specs)}")
    if steps < 0:
        raise ValidationError(f"--steps must be >= 0, got {steps}")
    manifest = read_manifest(artifact)
    others = [read_manifest(s.artifact) for s in specs if s.artifact is not None]  # refused before any work
    if texts:
        if prompts is not None:
            raise ValidationError("pass either text prompts or prompt ids, not both")
        prompts = encode_texts(artifact, texts)
    mixed = all(m.allows("mixed_lengths") for m in [manifest, *others])
    prompts = [list(map(int, p)) for p in prompts] if prompts is not None else default_prompts(
        manifest.config.vocab_size, manifest.max_seq, steps, manifest.max_batch, seed, equal_lengths=not mixed)
    for spec, m in zip([s for s in specs if s.artifact is not None], others):
        if m.config != manifest.config:
            raise ValidationError(f"{spec.artifact} holds another model than {artifact} (their configs differ); "
                                  f"compare artifacts of the same model")
    for m in [manifest, *others]:
        check_prompts(m, prompts, steps + 1, ValidationError)  # the prefill's token + steps decode steps
    return specs, manifest, prompts


def _bisect(ref: _Runner, cand: _Runner, prompts: list[list[int]], forced: list[list[int]],
            metrics: list[StepMetrics], rows: tuple[list[np.ndarray], list[np.ndarray]], all_positions: bool,
            tol: Tolerance, progress: Progress) -> dict[str, Any]:
    """Bisect the prompt with the largest logit error at the first failing step, replayed alone (batch 1)."""
    from .bisect import bisect_backends

    failing = next((m.step for m in metrics if not m.passed), None)
    if failing is None:  # failed on top-1 / cosine / greedy: the step with the largest relative error
        failing = max(metrics, key=lambda m: (np.nan_to_num(m.max_rel, nan=np.inf))).step
    err = np.nan_to_num(np.abs(rows[0][failing] - rows[1][failing]).max(-1), nan=np.inf)  # per row
    if failing == 0 and all_positions:  # rows are every prompt position: reduce per prompt
        ends = np.cumsum([len(p) for p in prompts])
        err = np.array([seg.max() for seg in np.split(err, ends[:-1])])
    b = int(err.argmax())
    progress(f"bisecting {cand.label} against {ref.label}: prompt {b}, up to step {failing}")
    result = bisect_backends(ref.backend, cand.backend, prompts[b], forced[b], failing, tol.tap_rtol).to_dict()
    return {"prompt": b, **result}
