"""Fixtures of the graphs/ tests: artifacts exported once per session, and an ONNX Runtime CPU step loop.

``OrtLoop`` runs one ONNX file through IOBinding with each past_key_values.{i} and present.{i} bound to the
SAME OrtValue, so the cache is carried in place from step to step exactly as the runtime does it.
``PLAN`` is a fixed, mixed-length schedule: a right-padded prefill of three prompts (6, 2 and 4 tokens),
four ragged one-token decode steps, and one two-token chunk on top of the cache (one row right-padded).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from decodekit.export.artifact import ExportOptions, export_artifact

MAX_SEQ = 96  # room for a 6-token prompt + 64 greedy steps


@pytest.fixture(scope="session")
def llama_std(hf_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs") / "llama-std"
    export_artifact(str(hf_checkpoint("llama")), out, ExportOptions(max_seq=MAX_SEQ, max_batch=4))
    return out


@pytest.fixture(scope="session")
def qwen3_std(hf_checkpoint, tmp_path_factory) -> Path:
    """q/k RMSNorm, head_dim 32, q_size != hidden_size."""
    out = tmp_path_factory.mktemp("graphs") / "qwen3-std"
    export_artifact(str(hf_checkpoint("qwen3")), out, ExportOptions(max_seq=MAX_SEQ, max_batch=4))
    return out


@pytest.fixture(scope="session")
def tiny_tp2(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("graphs") / "tiny-tp2"
    export_artifact("preset:tiny", out, ExportOptions(tp=2, max_seq=MAX_SEQ, max_batch=2))
    return out


@dataclass(frozen=True)
class Step:
    """One step of the contract: ids [B,S], positions = cache rows, K/V written at write, valid cache nonpad."""

    ids: np.ndarray
    write: np.ndarray
    nonpad: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        return self.write[:, None] + np.arange(self.ids.shape[1])[None, :]

    @property
    def valid(self) -> np.ndarray:
        """[B] valid (non-padding) rows of this step."""
        return np.minimum(self.nonpad - self.write, self.ids.shape[1])


def make_plan(vocab: int, seed: int = 0) -> list[Step]:
    rng = np.random.default_rng(seed)
    lens = np.array([6, 2, 4])
    ids = rng.integers(3, vocab, (3, 6))
    ids[np.arange(6)[None, :] >= lens[:, None]] = 0  # right padding
    steps = [Step(ids, np.zeros(3, np.int64), lens)]
    n = lens.copy()
    for _ in range(4):
        steps.append(Step(rng.integers(3, vocab, (3, 1)), n.copy(), n + 1))
        n = n + 1
    steps.append(Step(rng.integers(3, vocab, (3, 2)), n.copy(), n + np.array([2, 1, 2])))  # 2nd row padded
    return steps


class OrtLoop:
    """ONNX Runtime CPU session over one rank file with past/present bound to one buffer per cache tensor."""

    def __init__(self, path: str | Path, batch: int) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        numpy_types = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
        self.caches = {}
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                shape = [batch if isinstance(d, str) else d for d in i.shape]
                self.caches[i.name] = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, numpy_types[i.type]))

    def step(self, ids: np.ndarray, positions: np.ndarray, write: np.ndarray, nonpad: np.ndarray) -> np.ndarray:
        binding = self.session.io_binding()
        feeds = dict(input_ids=ids, position_ids=positions, write_indices=write, nonpad_kv_seqlen=nonpad)
        for name, a in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(a, dtype=np.int64))
        binding.bind_output("logits")
        for name, value in self.caches.items():
            binding.bind_ortvalue_input(name, value)
            binding.bind_ortvalue_output(name.replace("past_key_values.", "present.", 1), value)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    def run(self, plan: list[Step]) -> list[np.ndarray]:
        return [self.step(s.ids, s.positions, s.write, s.nonpad) for s in plan]

    def cache(self, name: str) -> np.ndarray:
        return self.caches[name].numpy().astype(np.float32)


def compare(plan: list[Step], ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Max abs logit difference over the valid rows of every step, relative to the reference logit scale."""
    scale = max(float(np.abs(r).max()) for r in ref)
    worst = 0.0
    for step, r, g in zip(plan, ref, got):
        assert r.shape == g.shape
        for b, n in enumerate(step.valid):
            rows = slice(0, n) if r.shape[1] > 1 else slice(0, 1)  # logits "last" give one row
            worst = max(worst, float(np.abs(r[b, rows] - g[b, rows]).max()))
    return worst / scale


def compare_caches(plan: list[Step], a: OrtLoop, b: OrtLoop) -> float:
    """Max abs difference of the valid cache rows [0, nonpad[b]) after the plan."""
    nonpad = plan[-1].nonpad
    worst = 0.0
    for name in a.caches:
        x, y = a.cache(name), b.cache(name)
        for s, n in enumerate(nonpad):
            worst = max(worst, float(np.abs(x[s, :, :n] - y[s, :, :n]).max()))
    return worst


@pytest.fixture(scope="session")
def ortkit() -> SimpleNamespace:
    """The step-loop helpers above: OrtLoop, make_plan, compare, compare_caches."""
    return SimpleNamespace(OrtLoop=OrtLoop, make_plan=make_plan, compare=compare, compare_caches=compare_caches)


@pytest.fixture(scope="session")
def optimized(tmp_path_factory):
    """Factory: optimized(src_artifact, dialect, dtype=None) -> (folder, report), each made once per session."""
    from decodekit.graphs.pipeline import optimize

    made: dict[tuple, tuple[Path, dict]] = {}

    def make(src: Path, dialect: str, dtype: str | None = None) -> tuple[Path, dict]:
        key = (str(src), dialect, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp("opt") / f"{Path(src).name}-{dialect}-{dtype or 'same'}"
            _, report = optimize(src, out, dialect, dtype)
            made[key] = (out, report)
        return made[key]

    return make
