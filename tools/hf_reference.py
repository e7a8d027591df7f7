"""transformers' own model as the reference of ``decodekit validate --reference transformers``.

An oracle nobody here wrote: ``AutoModelForCausalLM`` on the artifact's source, fp32, eager attention. A family
mismatch (a config field decodekit maps wrongly, a missing feature) then fails validation instead of passing
against decodekit's own PyTorch model.

Loading is a registry keyed by source kind (``SOURCE_KINDS``): each kind says which sources it recognizes and how
transformers loads them. A Hugging Face folder is one entry, a GGUF file
another (``AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)``).

``TransformersReference`` speaks the backend step protocol ``validate`` drives (allocate / step / manifest): each
sequence runs alone (batch 1, no padding) through transformers' own KV cache (``DynamicCache``), fed exactly the
tokens and positions of the step; the logits come back as [batch, seq or 1, vocab] like any backend's.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import BackendError
from ..runtime.backend import Backend, StepState


@dataclass(frozen=True)
class SourceKind:
    name: str
    matches: Callable[[Path], bool]
    load: Callable[[Path], Any]  # path -> transformers PreTrainedModel (fp32, eager attention, eval mode)


def _load_gguf(path: Path) -> Any:
    from ..export.gguf import transformers_model

    model = transformers_model(path)
    model.config._attn_implementation = "eager"
    return model


def _load_hf_folder(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # validate's stderr carries its own progress and the one-line verdict
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()


SOURCE_KINDS: dict[str, SourceKind] = {
    k.name: k
    for k in (
        SourceKind("hf-folder", lambda p: p.is_dir() and (p / "config.json").is_file(), _load_hf_folder),
        SourceKind("gguf", lambda p: p.is_file() and p.suffix == ".gguf", _load_gguf),
    )
}


def load_reference_model(source: str) -> Any:
    """transformers' model of ``source`` (a path of one of ``SOURCE_KINDS``); one-line BackendError otherwise."""
    if source.startswith("preset:"):
        raise BackendError(f"the artifact was exported from {source} (random weights made by decodekit, no "
                           f"transformers checkpoint); --reference transformers needs an artifact exported from a "
                           f"Hugging Face folder, or pass that folder with --reference-source FOLDER")
    path = Path(source)
    kind = next((k for k in SOURCE_KINDS.values() if k.matches(path)), None)
    if kind is None:
        raise BackendError(f"{source}: not a source transformers can load here (known kinds: "
                           f"{', '.join(SOURCE_KINDS)}); pass the artifact's source with --reference-source PATH")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise BackendError("--reference transformers needs the transformers package: "
                           "pip install transformers") from None
    return kind.load(path)


@dataclass(frozen=True)
class TransformersOptions:
    source: str | None = None  # the checkpoint transformers loads; None = the manifest's source


class TransformersReference(Backend):
    """transformers' model on the artifact's source, driven with the artifact's step inputs (CPU, fp32): a backend
    (allocate / step) outside the registry, built as ``TransformersReference(artifact, manifest=, source=)``."""

    name = "transformers"
    options_type = TransformersOptions
    options: TransformersOptions

    def _setup(self) -> None:
        self.model = load_reference_model(self.options.source or self.manifest.source)
        self.manifest = dataclasses.replace(self.manifest, dtype="fp32")
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    def _allocate(self, batch: int) -> StepState:
        from transformers import DynamicCache

        return StepState(batch, self.max_seq, [DynamicCache(config=self.model.config) for _ in range(batch)])

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> np.ndarray:
        import torch

        B, S = input_ids.shape
        out = np.zeros((B, S, self.model.config.vocab_size), dtype=np.float32)
        for b in range(B):
            cache = state.handles[b]
            n = int(nonpad_kv_seqlen[b] - write_indices[b])  # this row's valid tokens in the step
            if cache.get_seq_length() != int(write_indices[b]):
                raise BackendError(f"the transformers reference appends to its cache; row {b} writes at "
                                   f"{int(write_indices[b])} after {cache.get_seq_length()} tokens")
            ids = torch.from_numpy(np.ascontiguousarray(input_ids[b:b + 1, :n], dtype=np.int64))
            pos = torch.from_numpy(np.ascontiguousarray(position_ids[b:b + 1, :n], dtype=np.int64))
            with torch.inference_mode():
                logits = self.model(input_ids=ids, position_ids=pos, use_cache=True, **{self._cache_arg: cache}).logits
            out[b, :n] = logits[0].float().numpy()
        if self.manifest.logits == "last":
            last = (nonpad_kv_seqlen - write_indices - 1).clip(min=0)
            return out[np.arange(B), last][:, None]
        return out

    def close(self) -> None:
        self.model = None
