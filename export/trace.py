"""Trace one rank's Decoder into an ONNX model of the "std" dialect (the contract in DESIGN.md).

Inputs:  input_ids [batch, seq] int64, position_ids [batch, seq] int64, write_indices [batch] int64,
         nonpad_kv_seqlen [batch] int64, past_key_values.{i}.key/.value [batch, kv_heads_local, max_seq, head_dim]
Outputs: logits [batch, seq|1, vocab], present.{i}.key/.value (same shape as past; bind both to one buffer)
"""

from __future__ import annotations

import logging
import warnings
from functools import lru_cache
from typing import Any, Literal

import torch
from torch import nn

from .model import Decoder
from .names import STEP_INPUTS, past_names, present_names  # noqa: F401 - re-exported
from .ops import ONNX_OPSET

IR_VERSION = 10  # onnxruntime-gpu 1.31 reads ir_version <= 10
class _Step(nn.Module):
    """Flat-signature wrapper: the graph's inputs and outputs in contract order."""

    def __init__(self, model: Decoder, logits: str) -> None:
        super().__init__()
        self.model, self.logits = model, logits

    def forward(self, input_ids, position_ids, write_indices, nonpad_kv_seqlen, past: list[torch.Tensor]):
        cache = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = self.model(input_ids, position_ids, write_indices, nonpad_kv_seqlen, cache, self.logits)
        return (logits, *[t for kv in present for t in kv])


def trace(model: Decoder, max_batch: int, max_seq: int, logits: Literal["all", "last"] = "all"):
    """Return the torch.onnx ONNXProgram of one step (prefill and decode share the graph)."""
    step, example, shapes_and_names = step_export_args(model, max_batch, max_seq, logits)
    with warnings.catch_warnings(), _quiet_torch_onnx(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            from torch.onnx._internal.exporter import _core

            registry = onnx_registry(ONNX_OPSET)
            rename = torch.onnx.ONNXProgram._rename_dynamic_axes
        except (ImportError, AttributeError):  # a torch whose exporter internals differ (the range is 2.9-2.13)
            program = torch.onnx.export(step, example, dynamo=True, opset_version=ONNX_OPSET, optimize=True,
                                        verbose=False, **shapes_and_names)
        else:
            # torch.onnx.export(..., dynamo=True) minus its per-call registry build (torchlib's ~600 functions:
            # about 1 s of CPU each call); for an nn.Module with torch.export Dims it does nothing else around this
            # call but name the dynamic axes after the Dims (tests/export/test_trace.py compares the bytes)
            program = _core.export(step, example, registry=registry, optimize=True, verbose=False,
                                   opset_version=ONNX_OPSET, **shapes_and_names)
            rename(program, shapes_and_names["dynamic_shapes"])
    program.model.ir_version = IR_VERSION
    return program


def step_export_args(model: Decoder, max_batch: int, max_seq: int, logits: Literal["all", "last"] = "all"
                     ) -> tuple[nn.Module, tuple, dict[str, Any]]:
    """What the step is exported with: the flat-signature module, example inputs, and the dynamic shapes and
    input/output names (keyword arguments of torch.onnx.export)."""
    L = len(model.layers)
    B, S = 2, min(3, max_seq)  # example sizes > 1 so neither dim is specialized (max_batch is the runtime's limit)
    cache = model.new_cache(B, max_seq)
    example = (torch.zeros(B, S, dtype=torch.long), torch.arange(S).repeat(B, 1), torch.zeros(B, dtype=torch.long),
               torch.full((B,), S, dtype=torch.long), [t for kv in cache for t in kv])
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    dynamic = ({0: batch, 1: seq}, {0: batch, 1: seq}, {0: batch}, {0: batch}, [{0: batch}] * (2 * L))
    return _Step(model, logits).eval(), example, {
        "dynamic_shapes": dynamic, "input_names": [*STEP_INPUTS, *past_names(L)],
        "output_names": ["logits", *present_names(L)]}


@lru_cache(maxsize=None)
def onnx_registry(opset: int):
    """torch.onnx's table of ATen -> ONNX functions, built once per process (the exporter only reads it).

    The same entries, in the same order, as ``ONNXRegistry.from_torchlib(opset_version=opset)`` (the test compares
    them), without the step of onnxscript's ``get_torchlib_ops`` that parses the source of every traced torchlib
    function (~500) only to read a ``domain`` that the registry never uses: about 1 s of CPU per process."""
    from onnxscript.function_libs.torch_lib import ops  # noqa: F401 - importing it registers torchlib's functions
    from onnxscript.function_libs.torch_lib.registration import default_registry
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    registry = _registration.ONNXRegistry()
    registry._opset_version = opset
    with _quiet_torch_onnx():
        for meta in _torchlib_registry.get_torchlib_ops():
            registry._register(meta.fx_target, meta)
        for name, functions in default_registry.items():
            if name.startswith("internal::"):
                continue
            for function, is_complex in [*((f, False) for f in functions.overloads),
                                         *((f, True) for f in functions.complex)]:
                try:  # as from_torchlib: a function that fails to register is skipped, not fatal
                    target = _registration._get_overload(name)
                    if target is not None:
                        registry._register(target, _registration.OnnxDecompMeta(
                            onnx_function=function, fx_target=target, signature=None, is_custom=False,
                            is_complex=is_complex))
                except Exception:  # noqa: BLE001
                    logging.getLogger(__name__).exception("torchlib function %s not registered", name)
    registry._cleanup_registry_based_on_opset_version()
    return registry


class _quiet_torch_onnx:
    """The exporter logs registry warnings (torchvision ops) at WARNING; keep the CLI readable."""

    def __enter__(self):
        self._logger = logging.getLogger("torch.onnx")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self._logger.setLevel(self._level)
