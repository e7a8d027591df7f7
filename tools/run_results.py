"""Validation runs saved as Polygraphy RunResults (``decodekit validate --save-results PATH``): one runner per backend,
one iteration per step, outputs ``logits`` [positions, vocab], ``tokens`` and ``forced_tokens``; ``polygraphy inspect
data PATH`` and ``polygraphy run --load-outputs PATH`` read them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ValidationError


def save_run_results(path: str | Path, rows: dict[str, list[np.ndarray]], tokens: list[list[int]]) -> Path:
    """Save the per-step logits as a Polygraphy RunResults JSON (``polygraphy inspect data PATH`` reads it)."""
    try:
        from polygraphy.comparator import RunResults
        from polygraphy.logger import G_LOGGER
    except ImportError:
        raise ValidationError("--save-results writes Polygraphy RunResults: pip install polygraphy") from None
    results = RunResults()
    forced = np.asarray(tokens, dtype=np.int64)
    for label, per_step in rows.items():
        results.add([{"logits": a, "tokens": a.argmax(-1).astype(np.int64), "forced_tokens": forced[:, k]}
                     for k, a in enumerate(per_step)], runner_name=label)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):  # Polygraphy logs to stdout; keep --json output clean
        results.save(str(path))
    return path


def load_run_results(path: str | Path) -> Any:
    from polygraphy.comparator import RunResults
    from polygraphy.logger import G_LOGGER

    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        return RunResults.load(str(path))
