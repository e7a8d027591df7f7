"""The PyTorch reference backend: the eager Decoder rebuilt from the artifact's source, not from its ONNX file.

The manifest records the source (``preset:NAME`` or a Hugging Face folder) and the dtype; the model is
rebuilt from there (``torch_source`` overrides a moved or relative folder) and checked against the
manifest's model config. Caches come from ``Decoder.new_cache`` and are updated in place by the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dtypes import precision
from ..export.checkpoint import CheckpointError, load_source
from ..export.config import ConfigError
from ..export.manifest import Manifest
from .backend import Backend, BackendError, StepState, register


@dataclass(frozen=True)
class TorchOptions:
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:N"
    torch_source: str | None = None  # overrides manifest.source (preset:NAME or a Hugging Face folder)
    seed: int | None = None  # weight seed of a preset source; None = the manifest's (0 when it records none)
    # compute in this precision with the artifact's own weights upcast (the fp32 judge of `validate --mode judge`);
    # None = the artifact's dtype
    compute_dtype: str | None = None


@register("torch")
class TorchBackend(Backend):
    """Reference backend. step() returns np.ndarray logits on the CPU, a torch.Tensor on CUDA."""

    options_type = TorchOptions
    options: TorchOptions
    tp1_only = "export a tp=1 artifact for reference runs"

    def _setup(self) -> None:
        m = self.manifest
        self.device = _device(self.options.device)
        self.model = _rebuild(self.artifact, m, self.options).to(self.device)

    def _allocate(self, batch: int) -> StepState:
        with torch.inference_mode():
            cache = self.model.new_cache(batch, self.max_seq, self.device)
        return StepState(batch, self.max_seq, cache)

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        args = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(self.device)
                for a in (input_ids, position_ids, write_indices, nonpad_kv_seqlen)]
        with torch.inference_mode():
            logits, _ = self.model(*args, state.handles, self.manifest.logits)
        if self.device.type != "cpu":
            return logits
        return (logits.float() if logits.dtype == torch.bfloat16 else logits).numpy()  # numpy has no bfloat16

    def run_decode(self, state: StepState) -> Any:
        """A decode step straight from the device inputs (no host round trip); a new logits tensor each step."""
        ids, pos, write, nonpad = state.inputs
        with torch.inference_mode():
            logits, _ = self.model(ids[:, None], pos[:, None], write, nonpad, state.handles, self.manifest.logits)
        return logits

    def caches(self, state: StepState) -> list[Any]:
        """The live cache tensors in contract order (past_key_values.0.key, .0.value, 1.key, ...)."""
        return [t.numpy() if t.device.type == "cpu" and t.dtype != torch.bfloat16 else t
                for kv in state.handles for t in kv]

    def close(self) -> None:
        self.model = None


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BackendError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackendError("device cuda requested but this torch has no CUDA device; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise BackendError(f"unsupported device {name!r}; use cpu or cuda")
    return device


SOURCE_HINT = ("pass the artifact's source (a Hugging Face folder or preset:NAME) as `decodekit validate "
               "--reference-source SOURCE` (torch_source= in Python)")


def _rebuild(artifact: Path, m: Manifest, options: TorchOptions):
    source = options.torch_source or m.source
    if not source:
        raise BackendError(f"{artifact}: the manifest records no source model; {SOURCE_HINT}")
    seed = options.seed if options.seed is not None else int(getattr(m, "seed", 0) or 0)
    try:
        model = load_source(source, m.dtype, rope_positions=m.max_seq, seed=seed)
    except (ConfigError, CheckpointError, OSError) as e:
        raise BackendError(f"the torch backend rebuilds the model from {source!r} and could not: {e}; "
                           f"{SOURCE_HINT}") from None
    if options.compute_dtype is not None:
        model = model.to(precision(options.compute_dtype).torch)
    if model.config != m.config:
        raise BackendError(f"{source!r} is not the model of {artifact} (its config differs from the manifest's); "
                           f"{SOURCE_HINT}")
    return model.eval()
