"""export/external_data.py reads every external-data location of an ONNX file from its wire format: checked
against onnx's own descriptors (field numbers) and its own tensor walk (the oracle), on a model holding tensors
in every place ONNX allows them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from decodekit.export import external_data as ed


def test_field_numbers_are_onnx_proto():
    expected = {
        ed._MODEL: (onnx.ModelProto, {"graph": ed._GRAPH, "functions": ed._FUNCTION}),
        ed._FUNCTION: (onnx.FunctionProto, {"node": ed._NODE}),
        ed._GRAPH: (onnx.GraphProto, {"node": ed._NODE, "initializer": ed._TENSOR,
                                      "sparse_initializer": ed._SPARSE}),
        ed._NODE: (onnx.NodeProto, {"attribute": ed._ATTRIBUTE}),
        ed._ATTRIBUTE: (onnx.AttributeProto, {"t": ed._TENSOR, "g": ed._GRAPH, "tensors": ed._TENSOR,
                                              "graphs": ed._GRAPH, "sparse_tensor": ed._SPARSE,
                                              "sparse_tensors": ed._SPARSE}),
        ed._SPARSE: (onnx.SparseTensorProto, {"values": ed._TENSOR, "indices": ed._TENSOR}),
        ed._TENSOR: (onnx.TensorProto, {"external_data": ed._ENTRY}),
    }
    for kind, (proto, fields) in expected.items():
        numbers = {proto.DESCRIPTOR.fields_by_name[name].number: child for name, child in fields.items()}
        assert ed.SCHEMA[kind] == numbers, proto.DESCRIPTOR.name
    entry = onnx.StringStringEntryProto.DESCRIPTOR.fields_by_name
    assert (entry["key"].number, entry["value"].number) == (1, 2)


def _tensor(name: str, location: str) -> TensorProto:
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), name)
    external_data_helper.set_external_data(t, location, offset=0, length=24)
    t.ClearField("raw_data")
    return t


def _model_with_tensors_everywhere() -> onnx.ModelProto:
    branch = helper.make_graph([helper.make_node("Constant", [], ["b"], value=_tensor("bt", "in_subgraph.bin"))],
                               "branch", [], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 3])])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_tensor("ct", "in_constant.bin")),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        helper.make_node("Add", ["w", "c"], ["z"]),
    ]
    sparse = helper.make_sparse_tensor(_tensor("sv", "sparse_values.bin"),
                                       numpy_helper.from_array(np.arange(6, dtype=np.int64), "si"), [2, 3])
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
                              initializer=[_tensor("w", "weights.bin"), numpy_helper.from_array(
                                  np.ones(4, np.float32), "inline")], sparse_initializer=[sparse])
    return helper.make_model(graph)


def test_locations_match_onnx_walk(tmp_path: Path):
    model = _model_with_tensors_everywhere()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    oracle = [external_data_helper.ExternalDataInfo(t).location
              for t in external_data_helper._get_all_tensors(model) if external_data_helper.uses_external_data(t)]
    found = ed.external_data_locations(path)
    assert sorted(found) == sorted(oracle + ["sparse_values.bin"])  # onnx's walk skips sparse initializers
    assert set(found) == {"weights.bin", "in_constant.bin", "in_subgraph.bin", "sparse_values.bin"}


def test_exported_artifact(exported):
    art = exported("preset:tiny", max_seq=32, max_batch=2)
    assert ed.external_data_locations(art / "rank0.onnx") == []


@pytest.mark.parametrize("data", [b"", b"\xff" * 16, b"\x3a\x10abc"], ids=["empty", "bad-varint", "truncated"])
def test_not_a_message(tmp_path: Path, data: bytes):
    (tmp_path / "x.onnx").write_bytes(data)
    with pytest.raises(ed.WireFormatError):
        ed.external_data_locations(tmp_path / "x.onnx")
