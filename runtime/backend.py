"""The backend interface (Polygraphy-style runner): load an artifact, then run steps on caller-owned state.

A backend owns its device buffers. ``allocate(batch)`` creates the KV caches once for (batch, max_seq)
and binds each layer's past and present to the SAME buffer; ``step`` runs one forward (prefill when
seq > 1, decode when seq == 1) and returns logits. Nothing is allocated per step beyond what the
underlying engine does internally; inputs are written into preallocated buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

from ..export.manifest import Manifest, read_manifest


from ..errors import BackendError  # noqa: F401 - re-exported: runtime users import it from here


@dataclass
class StepState:
    """Per-generation buffers of one backend: caches plus whatever the backend binds (IOBinding, addresses).

    ``inputs``: the decode step's inputs as one int64 [4, batch] torch tensor on the backend's device (rows:
    input_ids, position_ids, write_indices, nonpad_kv_seqlen), which ``run_decode`` reads and the decode loop
    advances in place. ``steps``: captured decode steps of this state, kept by the loop (runtime/decode_step.py).
    """

    batch: int
    max_seq: int
    handles: Any = None
    inputs: Any = None
    steps: dict[Any, Any] = field(default_factory=dict)


class Backend(ABC):
    """One artifact rank loaded for execution. Subclasses: torch (reference), ort, tensorrt, ort-tp.

    Construction is here too: ``Backend(artifact, options, manifest=, rank=, **overrides)`` reads the manifest,
    resolves ``options`` (an ``options_type`` instance) with keyword ``overrides``, then calls ``_setup`` (sessions,
    engine, model). Public methods check their arguments once, here; subclasses implement ``_setup``, ``_allocate``
    and ``_step`` and may override ``run_decode`` (a decode step reading ``state.inputs`` where they live, no host
    round trip) and ``capturable`` (the decode step can be captured in a CUDA graph on ``stream``).
    """

    name: str = "?"
    options_type: type | None = None  # the backend's frozen options dataclass (OrtOptions, TorchOptions, ...)
    tp1_only: str | None = None  # a backend of one rank: what to do with a tp > 1 artifact ({artifact} filled in)
    stream: Any = None  # CUDA: the torch stream the backend's work is ordered on

    def __init__(self, artifact: str | Path, options: Any = None, *, manifest: Manifest | None = None, rank: int = 0,
                 **overrides: Any) -> None:
        import torch

        self.artifact = Path(artifact)
        self.manifest = manifest or read_manifest(self.artifact)
        self.rank = rank
        self.device = torch.device("cpu")  # the torch.device holding the logits and the decode inputs
        self.captured_steps = 0  # decode steps captured as CUDA graphs on this backend (runtime/decode_step.py)
        if self.tp1_only and self.manifest.tp > 1:
            raise BackendError(f"{self.artifact} has tp={self.manifest.tp} ranks; the {self.name} backend runs tp=1 "
                               f"artifacts only: {self.tp1_only.format(artifact=self.artifact)}")
        if self.options_type is not None:
            self.options = resolve_options(self.options_type, options, overrides, self.name)
        self._setup()

    @property
    def max_seq(self) -> int:
        return self.manifest.max_seq

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    # ------------------------------------------------------------------------------------------- checked API

    def allocate(self, batch: int) -> StepState:
        """Zeroed KV caches for `batch` sequences of up to max_seq tokens, and the decode inputs."""
        if not 1 <= batch <= self.max_batch:
            raise BackendError(f"batch {batch} is outside the artifact's range [1, {self.max_batch}]")
        state = self._allocate(batch)
        if state.inputs is None:
            import torch

            state.inputs = torch.zeros(4, batch, dtype=torch.int64, device=self.device)
        return state

    def step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
             nonpad_kv_seqlen: np.ndarray) -> Any:
        """Run one step from host arrays; returns logits [batch, seq or 1, vocab] (np.ndarray on CPU, a
        torch.Tensor on a GPU). Prefill (seq > 1), or a decode step outside the decode loop."""
        B, S = np.shape(input_ids)
        if B != state.batch:
            raise BackendError(f"step got batch {B} but the state was allocated for batch {state.batch}")
        for name, a, shape in (("position_ids", position_ids, (B, S)), ("write_indices", write_indices, (B,)),
                               ("nonpad_kv_seqlen", nonpad_kv_seqlen, (B,))):
            if np.shape(a) != shape:
                raise BackendError(f"{name} has shape {np.shape(a)}, expected {shape}")
        return self._step(state, input_ids, position_ids, write_indices, nonpad_kv_seqlen)

    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raise GenerationError (a user error) for a request this artifact cannot serve."""
        from .stopping import GenerationError

        check_prompts(self.manifest, prompts, max_new_tokens, GenerationError)

    # ------------------------------------------------------------------------------------------- device step

    def run_decode(self, state: StepState) -> Any:
        """One decode step reading ``state.inputs``; returns logits [batch, 1, vocab] as a torch tensor on
        ``device``. The default goes through the host (``_step``); backends that bind device buffers override it."""
        import torch

        ids, pos, write, nonpad = state.inputs.cpu().numpy()
        logits = self._step(state, ids[:, None], pos[:, None], write, nonpad)
        return logits if isinstance(logits, torch.Tensor) else torch.from_numpy(np.asarray(logits))

    def capturable(self, state: StepState) -> bool:
        """True when ``run_decode`` may be captured in a CUDA graph on ``stream`` (fixed buffers, no host reads)."""
        return False

    # ------------------------------------------------------------------------------------------- subclasses

    @abstractmethod
    def _setup(self) -> None:
        """Load what runs the artifact (manifest and options are set); BackendError when it cannot run here."""

    @abstractmethod
    def _allocate(self, batch: int) -> StepState:
        """Allocate zeroed KV caches (batch already checked)."""

    @abstractmethod
    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        """Run one step (shapes already checked)."""

    def close(self) -> None:
        """Release sessions / engines / device memory."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_prompts(manifest: Manifest, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  error: type[Exception]) -> None:
    """The one check of a request's prompts against an artifact (the decode loop and validate): raises `error`."""
    m = manifest
    if len(prompts) == 0:
        raise error("no prompts given; pass at least one prompt")
    if len(prompts) > m.max_batch:
        raise error(f"{len(prompts)} prompts exceed the artifact's max_batch {m.max_batch}; "
                    f"re-export with --max-batch {len(prompts)} or pass fewer prompts")
    if max_new_tokens < 1:
        raise error(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not m.allows("mixed_lengths") and len({len(p) for p in prompts}) > 1:
        raise error(f"this {m.dialect} artifact needs prompts of equal length in one batch; "
                    "re-optimize with --dialect ort-gqa (onnxruntime >= 1.32) or std")
    vocab = m.config.vocab_size
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise error(f"prompt {b} is empty; every prompt needs at least one token")
        if len(p) + max_new_tokens > m.max_seq:
            raise error(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceeds the artifact's max_seq "
                        f"{m.max_seq}; re-export with --max-seq {len(p) + max_new_tokens} or generate fewer "
                        f"tokens / shorten the prompt")
        bad = [int(t) for t in p if not 0 <= int(t) < vocab]
        if bad:
            raise error(f"prompt {b} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")


OptionsT = TypeVar("OptionsT")


def resolve_options(kind: type[OptionsT], options: OptionsT | None, overrides: dict[str, Any], backend: str) -> OptionsT:
    """A backend's frozen options: `options` (or the defaults) with keyword `overrides`; unknown names refused."""
    known = {f.name for f in fields(kind)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise BackendError(f"unknown {backend} backend option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return replace(options or kind(), **overrides)


BACKENDS: dict[str, Callable[..., Backend]] = {}


def register(name: str) -> Callable[[type[Backend]], type[Backend]]:
    def deco(cls: type[Backend]) -> type[Backend]:
        BACKENDS[name] = cls
        cls.name = name
        return cls
    return deco


def load_backend(name: str, artifact: str | Path, **options: Any) -> Backend:
    """Lazy registry: importing a backend module registers it; heavy packages load only when used."""
    import importlib

    modules = {"torch": "torch_backend", "ort": "ort_backend", "tensorrt": "trt_backend", "ort-tp": "tp_ort"}
    if name not in modules:
        raise BackendError(f"unknown backend {name!r}; choose one of {', '.join(modules)}")
    importlib.import_module(f"{__package__}.{modules[name]}")
    return BACKENDS[name](artifact, **options)
