"""Config accounting as data: every config.json field a family understands, and what decodekit does with it.

Each family in ``config.FAMILIES`` lists its field rules; ``hf_config.account`` walks a config.json with them.
A rule is one of:

    Copy(key, to, kind)       exact math: the value goes to ModelConfig field ``to`` unchanged
    Choice(key, to, choices)  a value that changes the math: supported values map to ModelConfig, others refused
    Derived(keys, to, read)   several keys that together give ModelConfig fields (RoPE, EOS ids, sliding window)
    Refused(key, supported)   a field decodekit does not implement: refused unless absent or one of ``supported``
    Ignored(keys, why)        known not to change inference math (bookkeeping, training-only, generation defaults)

The rule for keys no rule declares ("unknown"): they are accepted, listed in the manifest's ``config_fields``
as unknown and printed by ``decodekit export``. transformers' own config class for the family does not define
them, so transformers' model does not read them either: they cannot change the oracle's math.
``tests/export/test_config_fields.py`` checks that every field of transformers' config class is declared here,
so a field transformers' model reads never falls into "unknown".

Rules never raise: ``problem`` returns a one-line reason naming the field, its value and what is supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .rope_fields import ROPE_TYPES, read_rope  # noqa: F401 - re-exported: RoPE fields live in rope_fields.py


def describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (list, dict)) or len(repr(value)) <= 60 else repr(value)[:57] + "..."


@dataclass(frozen=True)
class Copy:
    """Exact math: ``config.json[key]`` -> ``ModelConfig.<to>`` (through ``kind``), ``default`` when absent."""

    key: str
    to: str
    kind: Callable[[Any], Any] = int
    default: Any = None

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        value = hf.get(self.key)
        if value is None:
            return {} if self.default is None else {self.to: self.default}
        return {self.to: self.kind(value)}

    def problem(self, hf: Mapping[str, Any]) -> str | None:
        value = hf.get(self.key)
        try:
            None if value is None else self.kind(value)
        except (TypeError, ValueError):
            return f"config.json field {self.key}={describe(value)} is not a valid {self.kind.__name__}"
        return None


@dataclass(frozen=True)
class Choice:
    """A field whose value changes the math: ``choices`` maps each supported value to the ModelConfig value."""

    key: str
    to: str
    choices: Mapping[Any, Any]
    default: Any

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        value = hf.get(self.key)
        return {self.to: self.choices[self.default if value is None else value]}

    def problem(self, hf: Mapping[str, Any]) -> str | None:
        value = hf.get(self.key)
        if value is None or _hashable(value) and value in self.choices:
            return None
        return (f"config.json field {self.key}={describe(value)} is not supported; "
                f"supported: {', '.join(map(repr, self.choices))}")


@dataclass(frozen=True)
class Derived:
    """Several keys read together. ``read_fn(hf) -> (ModelConfig fields, problem or None)``."""

    names: tuple[str, ...]
    read_fn: Callable[[Mapping[str, Any]], tuple[dict[str, Any], str | None]]

    @property
    def keys(self) -> tuple[str, ...]:
        return self.names

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return self.read_fn(hf)[0]

    def problem(self, hf: Mapping[str, Any]) -> str | None:
        return self.read_fn(hf)[1]


@dataclass(frozen=True)
class Refused:
    """A field decodekit does not implement: accepted only when absent or one of ``supported``."""

    key: str
    supported: tuple[Any, ...] = ()
    what: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,)

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def problem(self, hf: Mapping[str, Any]) -> str | None:
        value = hf.get(self.key)
        if value is None or _hashable(value) and value in self.supported:
            return None
        allowed = f"supported: {', '.join(map(repr, self.supported))} or absent" if self.supported \
            else "supported: absent"
        return f"config.json field {self.key}={describe(value)} is not supported ({self.what}); {allowed}"


@dataclass(frozen=True)
class Ignored:
    """Fields known not to change inference math; listed as ignored in the manifest."""

    names: tuple[str, ...]
    why: str

    @property
    def keys(self) -> tuple[str, ...]:
        return self.names

    def read(self, hf: Mapping[str, Any]) -> dict[str, Any]:
        return {}

    def problem(self, hf: Mapping[str, Any]) -> str | None:
        return None


Rule = Copy | Choice | Derived | Refused | Ignored


def _hashable(value: Any) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


# transformers' ACT2FN name -> the function decodekit computes (export/ops.ACTIVATIONS). The tanh
# approximations differ from each other only in how the constant sqrt(2/pi) is rounded.
HIDDEN_ACT: dict[str, str] = {
    "silu": "silu", "swish": "silu",
    "gelu": "gelu", "gelu_python": "gelu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "gelu_accurate": "gelu_tanh",
}


# ------------------------------------------------------------------------------------------------ derived readers

Read = tuple[dict[str, Any], "str | None"]

def read_heads(hf: Mapping[str, Any]) -> Read:
    try:
        heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        return {"num_heads": heads, "num_kv_heads": int(hf.get("num_key_value_heads") or heads),
                "head_dim": int(hf.get("head_dim") or hidden // heads)}, None
    except KeyError as e:
        return {}, f"config.json lacks the field {e.args[0]}"
    except (TypeError, ValueError, ZeroDivisionError):
        return {}, (f"config.json fields num_attention_heads={describe(hf.get('num_attention_heads'))}, "
                    f"num_key_value_heads, head_dim must be positive integers")


def read_special_tokens(hf: Mapping[str, Any]) -> Read:
    eos = hf.get("eos_token_id")
    try:
        eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    except (TypeError, ValueError):
        return {}, f"config.json field eos_token_id={describe(eos)} is not a token id or a list of them"
    bos = hf.get("bos_token_id")
    return {"bos_token_id": bos if isinstance(bos, int) else None, "eos_token_ids": eos_ids}, None


def read_attention_bias_qkvo(hf: Mapping[str, Any]) -> Read:
    """Llama / Qwen3: attention_bias puts a bias on q, k, v and o_proj."""
    bias = hf.get("attention_bias")
    if bias is None:
        return {}, None
    if not isinstance(bias, bool):
        return {}, f"config.json field attention_bias={describe(bias)} is not a boolean"
    return {"attention_bias": bias, "o_bias": bias}, None


def read_mistral_window(hf: Mapping[str, Any]) -> Read:
    """Mistral: sliding_window=None is full attention, W: on every layer, query i sees keys i - W < j <= i."""
    return _window(hf.get("sliding_window"), "sliding_window")


def read_qwen_window(hf: Mapping[str, Any]) -> Read:
    """Qwen2 / Qwen3: the window applies only when use_sliding_window, and only on 'sliding_attention' layers
    (layer_types, or layers >= max_window_layers when layer_types is absent), as transformers' config does."""
    if not hf.get("use_sliding_window"):
        return {"sliding_window": None}, None
    layers = int(hf.get("num_hidden_layers") or 0)
    types = hf.get("layer_types")
    if types is None:
        first = int(hf.get("max_window_layers") if hf.get("max_window_layers") is not None else 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    problem = layer_types_problem(types, layers)
    if problem:
        return {}, problem
    if "sliding_attention" not in types:
        return {"sliding_window": None}, None
    window, problem = _window(hf.get("sliding_window"), "sliding_window")
    return ({**window, "layer_types": tuple(types)}, None) if problem is None else ({}, problem)


def layer_types_problem(types: Any, layers: int) -> str | None:
    """Why `types` is not a per-layer list of transformers' attention kinds for `layers` layers (None: it is)."""
    known = ("full_attention", "sliding_attention")
    if not isinstance(types, list) or len(types) != layers or any(t not in known for t in types):
        return (f"config.json field layer_types={describe(types)} is not supported; supported: a list of "
                f"{layers} entries, each one of {', '.join(map(repr, known))}")
    return None


def _window(value: Any, key: str) -> Read:
    if value is None:
        return {"sliding_window": None}, None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return {}, f"config.json field {key}={describe(value)} is not a positive integer or null"
    return {"sliding_window": value}, None


# ------------------------------------------------------------------------------------------------ family tables

ROPE = Derived(("rope_parameters", "rope_scaling", "rope_theta"), read_rope)
NO_PARTIAL_ROTARY = Refused("partial_rotary_factor", (1, 1.0), "rotary embedding on part of each head")

COMMON: tuple[Rule, ...] = (
    Copy("vocab_size", "vocab_size"),
    Copy("hidden_size", "hidden_size"),
    Copy("intermediate_size", "intermediate_size"),
    Copy("num_hidden_layers", "num_layers"),
    Derived(("num_attention_heads", "num_key_value_heads", "head_dim"), read_heads),
    Copy("rms_norm_eps", "rms_norm_eps", float, 1e-6),
    Copy("max_position_embeddings", "max_position_embeddings", int, 4096),
    Copy("tie_word_embeddings", "tie_word_embeddings", bool, False),
    Choice("hidden_act", "hidden_act", HIDDEN_ACT, "silu"),
    ROPE,
    Derived(("bos_token_id", "eos_token_id"), read_special_tokens),
    NO_PARTIAL_ROTARY,
    Refused("quantization_config", (), "pre-quantized weights; export the unquantized checkpoint"),
    Ignored(("architectures", "model_type"), "used to pick the family"),
    Ignored(("transformers_version", "_name_or_path", "torch_dtype", "dtype", "auto_map", "id2label", "label2id",
             "problem_type", "return_dict", "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
             "is_encoder_decoder", "tokenizer_class", "prefix", "task_specific_params", "use_return_dict"),
            "bookkeeping of transformers; the export's dtype is --dtype"),
    Ignored(("initializer_range", "attention_dropout", "use_cache"), "training-only or cache bookkeeping"),
    Ignored(("pad_token_id",), "generation default; prompts are padded by the runtime, not by this id"),
)

QWEN_WINDOW = Derived(("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"), read_qwen_window)

LLAMA: tuple[Rule, ...] = COMMON + (
    Derived(("attention_bias",), read_attention_bias_qkvo),
    Copy("mlp_bias", "mlp_bias", bool, False),
    Ignored(("pretraining_tp",), "transformers' Llama no longer reads it (the sliced matmuls were the same math)"),
)
MISTRAL: tuple[Rule, ...] = COMMON + (Derived(("sliding_window",), read_mistral_window),)
QWEN2: tuple[Rule, ...] = COMMON + (QWEN_WINDOW,)
QWEN3: tuple[Rule, ...] = COMMON + (Derived(("attention_bias",), read_attention_bias_qkvo), QWEN_WINDOW)
