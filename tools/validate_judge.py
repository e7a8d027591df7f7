"""``decodekit validate --mode judge``: is a disagreement between two backends an error or a near-tie?

Every backend runs teacher-forced along the reference's greedy tokens (validate's lockstep run), and so does a
judge: the PyTorch reference with the artifact's own weights upcast to fp32 (torch backend, ``compute_dtype``).
Per backend against the judge, over every compared position: argmax agreement, max / mean |logit error|, relative
L2 error. At each position where a candidate's argmax differs from the reference's: the judge's top-2 margin,
the token each of the three picks, and both systems' logit error there; a margin below the larger of those errors
is a near-tie that rounding decides either way (informational).

Verdict: a candidate passes when its max |logit error| against the judge is at most ``JUDGE_RATIO`` x the
reference's own (both err the same way, so a low-precision reference's error is the yardstick), or within the fp32
tolerance (1e-4 x max(1, logit scale)) where the reference is exact. A kernel error shows as a candidate far off
the judge where the reference is not; greedy tokens that part at a near-tie pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

JUDGE_RATIO = 2.0
JUDGE_LABEL = "torch-fp32-judge"
FP32_ATOL = 1e-4  # x max(1, logit scale): the fp32 tolerance of validate
JUDGE_RULE = f"max |logit error| against an fp32 judge <= {JUDGE_RATIO:g} x the reference's (or the fp32 tolerance)"


@dataclass(frozen=True)
class JudgeErrors:
    """One system against the fp32 judge, over every compared position."""

    argmax_agreement: float
    max_abs: float
    mean_abs: float
    rel_l2: float


@dataclass(frozen=True)
class Disagreement:
    step: int  # 0 = prefill
    row: int  # compared position within the step
    judge_margin: float  # the judge's top-1 minus top-2 logit
    judge_pick: int
    reference_pick: int
    candidate_pick: int
    reference_error: float  # max |logit error| against the judge at this position
    candidate_error: float
    near_tie: bool  # judge_margin below the larger of the two errors


@dataclass(frozen=True)
class JudgeReport:
    judge: str
    logit_scale: float  # max |judge logit|
    reference: JudgeErrors
    candidate: JudgeErrors
    allowed_max_abs: float
    median_judge_margin: float
    disagreements: list[Disagreement] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.candidate.max_abs <= self.allowed_max_abs)

    def reasons(self, reference: str) -> list[str]:
        if self.passed:
            return []
        return [f"max |logit error| against the fp32 judge {self.candidate.max_abs:.3g} > {self.allowed_max_abs:.3g} "
                f"({JUDGE_RATIO:g} x {reference}'s {self.reference.max_abs:.3g}): not explained by rounding"]


def versus(x: np.ndarray, judge: np.ndarray) -> JudgeErrors:
    err = np.abs(x - judge)
    return JudgeErrors(float((x.argmax(-1) == judge.argmax(-1)).mean()), float(err.max()), float(err.mean()),
                       float(np.linalg.norm(x - judge) / max(np.linalg.norm(judge), 1e-30)))


def judge_steps(reference: list[np.ndarray], candidate: list[np.ndarray], judge: list[np.ndarray]) -> JudgeReport:
    """Compare per-step [positions, vocab] logits of a reference and a candidate with the judge's (same positions)."""
    ref, cand, jud = (np.concatenate(x).astype(np.float64) for x in (reference, candidate, judge))
    where = [(step, row) for step, a in enumerate(judge) for row in range(len(a))]
    top2 = np.sort(jud, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    ref_err, cand_err = np.abs(ref - jud).max(-1), np.abs(cand - jud).max(-1)
    ties = []
    for i in np.flatnonzero(ref.argmax(-1) != cand.argmax(-1)):
        ties.append(Disagreement(*where[i], float(margins[i]), int(jud[i].argmax()), int(ref[i].argmax()),
                                 int(cand[i].argmax()), float(ref_err[i]), float(cand_err[i]),
                                 bool(margins[i] < max(ref_err[i], cand_err[i]))))
    scale = float(np.abs(jud).max())
    r = versus(ref, jud)
    allowed = max(JUDGE_RATIO * r.max_abs, FP32_ATOL * max(1.0, scale))
    return JudgeReport(JUDGE_LABEL, scale, r, versus(cand, jud), allowed, float(np.median(margins)), ties)


def describe(j: JudgeReport, reference: str, candidate: str) -> list[str]:
    """Report lines of one judged comparison."""
    lines = [f"  against the fp32 judge (logit scale {j.logit_scale:.3g}; median top-2 margin "
             f"{j.median_judge_margin:.3g}):"]
    for name, e in ((reference, j.reference), (candidate, j.candidate)):
        lines.append(f"    {name:>12}: argmax = fp32 at {e.argmax_agreement:.4f}, max abs {e.max_abs:.3g}, "
                     f"mean abs {e.mean_abs:.3g}, rel L2 {e.rel_l2:.3g}")
    lines.append(f"    {len(j.disagreements)} position(s) where {candidate} and {reference} pick different tokens "
                 f"({sum(d.near_tie for d in j.disagreements)} near-ties)")
    for d in j.disagreements[:8]:
        lines.append(f"      step {d.step} row {d.row}: fp32 margin {d.judge_margin:.3g} (errors {d.reference_error:.3g}"
                     f" / {d.candidate_error:.3g}); picks fp32 {d.judge_pick}, {reference} {d.reference_pick}, "
                     f"{candidate} {d.candidate_pick}{' (near-tie)' if d.near_tie else ''}")
    return lines
