"""Pipeline edge cases found on the GPU machines: an fp16 export with an unfolded Cast (head_dim 128), and a
quantized artifact small enough to go inline whose source kept its weights in external data."""

from __future__ import annotations

import dataclasses

import onnx
import onnx_ir as ir
import pytest

from decodekit.export import config as C
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.manifest import read_manifest
from decodekit.graphs.passes.precision import float_dtypes
from decodekit.graphs.passes.quantize import QuantOptions
from decodekit.graphs.pipeline import optimize


def test_fp16_export_with_an_unfolded_cast_optimizes(tmp_path, monkeypatch):
    # head_dim 128 at max_seq 192 (the llama-3.1-8b head): the rope cache is over onnxscript's default folding
    # size, so the export keeps Cast(fp32 cache) -> fp16 and the graph holds two float dtypes
    cfg = dataclasses.replace(C.preset("tiny"), head_dim=128, tie_word_embeddings=False)
    monkeypatch.setitem(C.PRESETS, "tiny-hd128", cfg)
    src = tmp_path / "src"
    export_artifact("preset:tiny-hd128", src, ExportOptions(dtype="fp16", max_seq=192))
    assert float_dtypes(ir.load(str(src / "rank0.onnx"))) == {ir.DataType.FLOAT, ir.DataType.FLOAT16}
    optimize(src, tmp_path / "gqa", "ort-gqa-static")
    assert float_dtypes(ir.load(str(tmp_path / "gqa" / "rank0.onnx"))) == {ir.DataType.FLOAT16}


def test_inline_artifact_from_an_external_data_source(llama_std, tmp_path, monkeypatch, ortkit):
    from decodekit.graphs import pipeline

    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 0)
    optimize(llama_std, tmp_path / "ext", "std")  # the source of the next step keeps its weights in .data
    assert (tmp_path / "ext" / "rank0.onnx.data").exists()
    monkeypatch.setattr(pipeline, "EXTERNAL_DATA_THRESHOLD", 2**40)
    man, _ = optimize(tmp_path / "ext", tmp_path / "q", "std", quantize=QuantOptions(8, 32))
    assert man.ranks[0].external_data == [] and not (tmp_path / "q" / "rank0.onnx.data").exists()
    model = onnx.load(str(tmp_path / "q" / "rank0.onnx"), load_external_data=False)
    assert not [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    read_manifest(tmp_path / "q", verify=True)
    plan = ortkit.make_plan(man.config.vocab_size)
    ref = ortkit.OrtLoop(llama_std / "rank0.onnx", 3).run(plan)
    got = ortkit.OrtLoop(tmp_path / "q" / "rank0.onnx", 3).run(plan)
    assert ortkit.compare(plan, ref, got) < 0.05  # int8: runs, and stays close (bounds in test_quantize.py)
