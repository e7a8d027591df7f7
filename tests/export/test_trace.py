"""export/trace.py: the step traced with a registry built once per process equals torch.onnx.export's own
trace byte for byte."""

from __future__ import annotations

import warnings

import torch

from decodekit.export.config import preset
from decodekit.export.ops import ONNX_OPSET
from decodekit.export.template import template_model
from decodekit.export.trace import IR_VERSION, onnx_registry, step_export_args, trace


def test_trace_equals_torch_onnx_export_and_builds_the_registry_once():
    model = template_model(preset("tiny"), 2, "fp32", 32, 1)
    ours = [trace(model, 4, 32, "last").model_proto.SerializeToString() for _ in range(2)]
    assert ours[0] == ours[1]
    assert onnx_registry.cache_info().currsize == 1 and onnx_registry.cache_info().hits >= 1
    step, example, shapes_and_names = step_export_args(model, 4, 32, "last")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        reference = torch.onnx.export(step, example, dynamo=True, opset_version=ONNX_OPSET, optimize=True,
                                      verbose=False, **shapes_and_names)
    reference.model.ir_version = IR_VERSION
    assert reference.model_proto.SerializeToString() == ours[0]


def test_registry_has_torch_onnx_entries_in_its_order():
    from torch.onnx._internal.exporter import _registration

    def entries(registry):
        return {k: [(m.onnx_function, m.fx_target, m.is_complex, m.is_custom, m.signature) for m in v]
                for k, v in registry.functions.items()}

    reference = _registration.ONNXRegistry.from_torchlib(opset_version=ONNX_OPSET)
    ours = onnx_registry(ONNX_OPSET)
    assert ours.opset_version == reference.opset_version
    assert list(ours.functions) == list(reference.functions)
    assert entries(ours) == entries(reference)
