"""The streaming exporter: weights read from the source once and written straight into the rank files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from decodekit.export import verify_cache
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.checkpoint import CheckpointError, load_hf, random_model
from decodekit.export.config import preset
from decodekit.export.onnx_writer import OnnxWriter
from decodekit.export.weights import parse_weight_name, prefetched


def _rewrite(src, dst, edit) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))


def _weights(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name.startswith("model.")}


def test_hf_export_holds_the_checkpoint_weights(hf_checkpoint, tmp_path):
    """bf16 export of a qwen2 checkpoint (tied, biases): every weight is the checkpoint's, cast and laid out."""
    hf = hf_checkpoint("qwen2")
    export_artifact(str(hf), tmp_path / "a", ExportOptions(max_seq=32, dtype="bf16"))
    want = dict(load_hf(hf, "bf16").named_parameters())
    got = _weights(tmp_path / "a" / "rank0.onnx")
    assert {parse_weight_name(n).param for n in got if "rope" not in n} == set(want)
    for name, arr in got.items():
        if "rope" in name:
            continue
        ref = parse_weight_name(name)
        p = want[ref.param].detach()
        p = p.t() if ref.transpose else p
        assert arr.tobytes() == p.contiguous().view(torch.uint8).numpy().tobytes(), name


def test_preset_export_holds_random_model_weights(exported):
    art = exported("preset:tiny", max_seq=32)
    want = dict(random_model(preset("tiny")).named_parameters())
    for name, arr in _weights(art / "rank0.onnx").items():
        if "rope" not in name:
            ref = parse_weight_name(name)
            p = want[ref.param].detach()
            np.testing.assert_array_equal(arr, (p.t() if ref.transpose else p).numpy(), err_msg=name)


@pytest.mark.parametrize("case", ["missing", "shape", "extra"])
def test_bad_checkpoint_is_refused_and_nothing_written(hf_checkpoint, tmp_path, case):
    name = "model.layers.1.mlp.up_proj.weight"
    edits = {"missing": lambda t: t.pop(name), "shape": lambda t: t.__setitem__(name, torch.zeros(3, 64)),
             "extra": lambda t: t.__setitem__("model.layers.9.mlp.up_proj.weight", torch.zeros(3, 64))}
    _rewrite(hf_checkpoint("llama"), tmp_path / "ck", edits[case])
    with pytest.raises(CheckpointError, match="missing|expected shape|unexpected") as e:
        export_artifact(str(tmp_path / "ck"), tmp_path / "out", ExportOptions(max_seq=32))
    assert ("layers.9" if case == "extra" else name) in str(e.value)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def _matmul_skeleton(m: int, k: int, n: int) -> onnx.ModelProto:
    """y = x @ W with x [m, k] an input and W [k, n] a weight the writer appends."""
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [m, k])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m, n])
    graph = onnx.helper.make_graph([onnx.helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [x], [y])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 24)])


def test_writer_output_is_valid_onnx_inline_and_external(tmp_path):
    """The graph followed by appended initializer records loads as one model; external data lands in NAME.data."""
    skeleton = _matmul_skeleton(2, 3, 4)
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    for external in (False, True):
        path = tmp_path / f"m{int(external)}.onnx"
        writer = OnnxWriter(path, skeleton, external)
        writer.add("W", w)
        onnx_entry, data = writer.close()
        assert onnx_entry.sha256 == verify_cache.known_sha256(path, use_disk=False)
        assert bool(data) == external and onnx_entry.bytes == path.stat().st_size
        model = onnx.load(str(path))
        onnx.checker.check_model(str(path), full_check=True)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(model.graph.initializer[0], base_dir=str(tmp_path)),
                                      w.numpy())
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = sess.run(None, {"x": np.ones((2, 3), np.float32)})[0]
        np.testing.assert_array_equal(out, np.ones((2, 3), np.float32) @ w.numpy())


def test_writer_hashes_large_tensors_while_writing_them(tmp_path):
    """Tensors over the overlap threshold are hashed on a second thread: the recorded sha256 is still the file's."""
    skeleton = _matmul_skeleton(1, 1024, 512)
    w = torch.randn(1024, 512, generator=torch.Generator().manual_seed(0))  # 2 MiB
    for external in (False, True):
        path = tmp_path / f"big{int(external)}.onnx"
        writer = OnnxWriter(path, skeleton, external)
        writer.add("W", w)
        onnx_entry, data = writer.close()
        assert onnx_entry.sha256 == verify_cache.known_sha256(path, use_disk=False)
        for entry in data:
            assert entry.sha256 == verify_cache.known_sha256(tmp_path / entry.file, use_disk=False)
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0],
                                                                 base_dir=str(tmp_path)), w.numpy())


def test_prefetched_keeps_order_raises_and_stops_early():
    """The weight reader thread: same items in order, the producer's error in the consumer, early exit stops it."""
    assert list(prefetched(iter(range(50)))) == list(range(50))

    def failing():
        yield 1
        raise ValueError("broken source")

    it = prefetched(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken source"):
        next(it)
    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    it = prefetched(endless(), depth=1)
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()  # the consumer stops: the producer thread ends within a step or two
    assert len(produced) <= 6


def test_export_fills_the_verify_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    export_artifact("preset:tiny", tmp_path / "a", ExportOptions(max_seq=32))
    doc = json.loads(verify_cache.cache_path().read_text())
    assert str((tmp_path / "a" / "rank0.onnx").resolve()) in doc["files"]
