"""GGUF sources on small synthetic files written with gguf.GGUFWriter.

Oracles: gguf's own reference dequantization (gguf.quants.dequantize of the bytes written) and transformers'
GGUF loader (its own dequantization code and q/k un-permutation) on the same file.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install 'decodekit[gguf]')")

from decodekit.errors import CheckpointError  # noqa: E402
from decodekit.export.checkpoint import hf_name_map, source_config  # noqa: E402
from decodekit.export.gguf import GgufFile, dequantize, load_gguf  # noqa: E402

Q = gguf.GGMLQuantizationType
TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K")
# fp16 fields of K-quant blocks (byte offsets in the block): random bytes there could be inf/nan
_K_HALVES = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}
H, I, HEADS, KV = 256, 256, 4, 2  # K-quants need rows of 256


def _encode(w: np.ndarray, qtype: str, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or typed array) GGUF stores for float weights w [rows, cols]."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype == "F16":
        return w.astype(np.float16)
    if qtype in _K_HALVES:  # no Python quantizer: random blocks with small, finite scales
        rows, cols = w.shape
        block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
        raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
        for off in _K_HALVES[qtype]:
            raw[..., off:off + 2] = np.frombuffer(np.float16(0.002).tobytes(), np.uint8)
        return raw.reshape(rows, -1)
    return gguf.quants.quantize(w, Q[qtype])


def write_gguf(path: Path, qtype: str = "Q8_0", arch: str = "llama", layers: int = 1, seed: int = 0,
               extra: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """A tiny llama-shaped GGUF; 2-D weights in ``qtype``, norms in F32. Returns name -> stored array."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(256)
    w.add_file_type(1)
    shapes = {"token_embd.weight": (256, H), "output.weight": (256, H), "output_norm.weight": (H,)}
    for i in range(layers):
        d = H // HEADS
        shapes.update({f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.ffn_norm.weight": (H,),
                       f"blk.{i}.attn_q.weight": (H, H), f"blk.{i}.attn_k.weight": (KV * d, H),
                       f"blk.{i}.attn_v.weight": (KV * d, H), f"blk.{i}.attn_output.weight": (H, H),
                       f"blk.{i}.ffn_gate.weight": (I, H), f"blk.{i}.ffn_up.weight": (I, H),
                       f"blk.{i}.ffn_down.weight": (H, I)})
    stored = {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * (0.1 if len(shape) == 2 else 0.05) + (len(shape) == 1)
        data = _encode(x, qtype, rng) if len(shape) == 2 else x
        raw_dtype = Q[qtype] if len(shape) == 2 and data.dtype == np.uint8 else None
        w.add_tensor(name, data, raw_dtype=raw_dtype)
        stored[name] = (data, raw_dtype)
    for name, data in (extra or {}).items():
        w.add_tensor(name, data[0], raw_dtype=data[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_matches_gguf_reference(tmp_path: Path, qtype: str) -> None:
    path = tmp_path / f"tiny-{qtype}.gguf"
    stored = write_gguf(path, qtype)
    f = GgufFile(path)
    for name, (data, raw_dtype) in stored.items():
        t = f.tensors[name]
        assert t.tensor_type.name == (qtype if t.name.endswith("norm.weight") is False else "F32"), name
        ref = gguf.quants.dequantize(data, raw_dtype or t.tensor_type).astype(np.float32)
        got = dequantize(t)
        assert got.shape == ref.shape, name
        np.testing.assert_array_equal(got, ref, err_msg=name)


@pytest.mark.parametrize("qtype", TYPES)
def test_gguf_weights_match_transformers_loader(tmp_path: Path, qtype: str) -> None:
    """Weights, config and the llama q/k un-permutation against transformers' own GGUF loader."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoModelForCausalLM

    path = tmp_path / f"tiny-{qtype}.gguf"
    write_gguf(path, qtype, layers=2)
    ours = load_gguf(path)
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype="float32")
    params = dict(ours.named_parameters(remove_duplicate=False))
    ref_state = ref.state_dict()
    for hf, me in hf_name_map(ours.config).items():
        torch.testing.assert_close(params[me], ref_state[hf], rtol=0, atol=0, msg=hf)
    c = ours.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.tie_word_embeddings) == (2, H, HEADS, KV, False)
    assert source_config(str(path)) == c


def test_other_architecture_refused(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "F16", arch="falcon")
    with pytest.raises(CheckpointError, match="GGUF architecture 'falcon' is not supported"):
        source_config(str(path))


def test_unsupported_quant_type_refused(tmp_path: Path) -> None:
    path = tmp_path / "iq4.gguf"
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    write_gguf(path, "F16", extra={"blk.0.extra.weight": (np.zeros((4, H // block * size), np.uint8), Q.IQ4_NL)})
    with pytest.raises(CheckpointError, match="GGUF weight type\\(s\\) IQ4_NL not supported"):
        load_gguf(path)


def test_cli_refuses_unsupported_gguf_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    write_gguf(path, "F16", arch="falcon")
    r = subprocess.run([sys.executable, "-m", "decodekit", "export", str(path), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "falcon" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
