"""The backend interface (Polygraphy-style runner): load an artifact, then run steps on caller-owned state.

A backend owns its device buffers. ``allocate(batch)`` creates the KV caches once for (batch, max_seq)
and binds each layer's past and present to the SAME buffer; ``step`` runs one forward (prefill when
seq > 1, decode when seq == 1) and returns logits. Nothing is allocated per step beyond what the
underlying engine does internally; inputs are written into preallocated buffers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from ..export.manifest import Manifest, read_manifest


from ..errors import BackendError  # noqa: F401 - re-exported: runtime users import it from here


@dataclass
class StepState:
    """Per-generation buffers of one backend: caches plus whatever the backend binds (IOBinding, addresses)."""

    batch: int
    max_seq: int
    handles: Any = None


class Backend(ABC):
    """One artifact rank loaded for execution. Subclasses: torch (reference), ort, tensorrt."""

    name: str = "?"

    def __init__(self, artifact: str | Path, manifest: Manifest | None = None, rank: int = 0) -> None:
        self.artifact = Path(artifact)
        self.manifest = manifest or read_manifest(self.artifact)
        self.rank = rank

    @property
    def max_seq(self) -> int:
        return self.manifest.max_seq

    @property
    def max_batch(self) -> int:
        return self.manifest.max_batch

    @abstractmethod
    def allocate(self, batch: int) -> StepState:
        """Allocate zeroed KV caches for `batch` sequences of up to max_seq tokens."""

    @abstractmethod
    def step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
             nonpad_kv_seqlen: np.ndarray) -> Any:
        """Run one step; returns logits [batch, seq or 1, vocab] (np.ndarray on CPU, torch.Tensor on a GPU)."""

    def close(self) -> None:
        """Release sessions / engines / device memory."""

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
