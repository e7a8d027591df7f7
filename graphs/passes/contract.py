"""Check the ONNX contract after the other passes: same graph I/O names in the same order, every present
output shaped and typed like its past input (so the runtime can bind both to one buffer), logits typed like
the cache, integer step inputs untouched, and the ir_version the ONNX Runtime builds here read.
"""

from __future__ import annotations

import onnx_ir as ir

from .base import PassOutcome, ReportingPass

IR_VERSION = 10  # onnxruntime-gpu 1.31 reads ir_version <= 10 (export/trace.py)
from ...export.names import STEP_INPUTS


def io_signature(model: ir.Model) -> tuple[list[str], list[str]]:
    return [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]


def _shape(v: ir.Value) -> tuple:
    return tuple(str(d) for d in v.shape) if v.shape is not None else ()


class ContractPass(ReportingPass):
    name = "contract"

    def __init__(self, signature: tuple[list[str], list[str]], debug: bool = False) -> None:
        super().__init__(debug)
        self.signature = signature

    def run(self, model: ir.Model) -> PassOutcome:
        modified = model.ir_version != IR_VERSION
        model.ir_version = IR_VERSION
        return PassOutcome(modified, {"inputs": len(model.graph.inputs), "outputs": len(model.graph.outputs)})

    def ensures(self, model: ir.Model) -> None:
        if io_signature(model) != self.signature:
            raise AssertionError(f"graph I/O changed: {io_signature(model)} != {self.signature}")
        inputs = {v.name: v for v in model.graph.inputs}
        outputs = {v.name: v for v in model.graph.outputs}
        for name in STEP_INPUTS:
            if name in inputs and inputs[name].dtype != ir.DataType.INT64:
                raise AssertionError(f"{name} is {inputs[name].dtype}, not int64")
        cache_dtypes = set()
        for name, present in outputs.items():
            if not name.startswith("present."):
                continue
            past = inputs[name.replace("present.", "past_key_values.", 1)]
            if (present.dtype, _shape(present)) != (past.dtype, _shape(past)):
                raise AssertionError(f"{name} {present.dtype}{_shape(present)} differs from its past input "
                                     f"{past.dtype}{_shape(past)}: they could not share one buffer")
            cache_dtypes.add(past.dtype)
        if "logits" in outputs and cache_dtypes and outputs["logits"].dtype not in cache_dtypes:
            raise AssertionError(f"logits are {outputs['logits'].dtype} but the cache is {cache_dtypes}")
