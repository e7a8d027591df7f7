"""Config accounting: every config.json field is mapped, checked, ignored on purpose, or refused by name.

No weights are loaded here except in the CLI and tensor-parallel bias tests (tiny checkpoints): these are fast.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from decodekit.export.config import FAMILIES as REGISTRY, ConfigError, account
from decodekit.export.config_fields import HIDDEN_ACT
from helpers import FAMILIES, hf_classes, hf_config


def config_json(family: str, **overrides: Any) -> dict[str, Any]:
    """The config.json transformers writes for the test checkpoints of ``family`` (plus ``overrides``)."""
    return {**hf_config(family).to_dict(), **overrides}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_transformers_config_field_is_declared(family):
    """The oracle's own config class: each field it defines is declared by the family (mapped/checked/ignored)."""
    config_cls, _ = hf_classes(family)
    declared = {k for rule in REGISTRY[family].fields for k in rule.keys}
    fields = set(config_cls().to_dict()) | set(hf_config(family).to_dict())
    assert sorted(fields - declared) == []
    assert account(config_json(family)).unknown == ()


def test_activation_tables_agree():
    from decodekit.export import ops
    from decodekit.export.config import ACTIVATIONS

    assert set(ACTIVATIONS) == set(ops.ACTIVATIONS) and set(HIDDEN_ACT.values()) <= set(ACTIVATIONS)


@pytest.mark.parametrize("name", sorted(HIDDEN_ACT))
def test_hidden_act_names_are_transformers_activations(name):
    from transformers.activations import ACT2FN

    assert name in ACT2FN
    assert account(config_json("llama", hidden_act=name)).config.hidden_act == HIDDEN_ACT[name]


def _qwen_window(**kw: Any) -> dict[str, Any]:
    return config_json("qwen2", use_sliding_window=True, sliding_window=64, layer_types=None, **kw)


# (family, config.json edits, fragments the one-line message must contain)
REFUSED = [
    ("llama", {"hidden_act": "relu"}, ["hidden_act='relu'", "supported", "'gelu'"]),
    ("mistral", {"hidden_act": "quick_gelu"}, ["hidden_act='quick_gelu'", "supported"]),
    ("qwen3", {"hidden_act": "xielu"}, ["hidden_act='xielu'"]),
    ("llama", {"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}},
     ["rope_parameters.rope_type='proportional'", "'yarn'", "'longrope'"]),
    ("phi3", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
     ["rope_type='dynamic'", "supported: 'default', 'longrope', 'su', 'yarn'"]),
    ("mistral", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "low_freq_factor": 1.0}},
     ["rope_parameters.low_freq_factor=1.0 is not supported with rope_type 'yarn'", "beta_fast"]),
    ("phi3", {"rope_scaling": {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4},
              "rope_parameters": None}, ["rope_type 'su' needs original_max_position_embeddings"]),
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [1.0] * 4}},
     ["rope_parameters.short_factor has 3 values; the rotary dimension 8 needs 4"]),
    ("qwen2", {"rope_parameters": {"rope_type": "longrope", "short_factor": "1,2", "long_factor": [1.0]}},
     ["short_factor='1,2' is not a list of numbers"]),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     ["rope_parameters.partial_rotary_factor=0.5 is not supported", "rotates whole heads"]),
    ("phi3", {"partial_rotary_factor": 0.1, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     ["partial_rotary_factor=0.1 gives a rotary dimension of 1 (head_dim 16)"]),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, ["rope_parameters", "lacks factor"]),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2]}},
     ["rope_parameters.mrope_section=[2, 2]"]),
    ("qwen2", {"partial_rotary_factor": 0.5}, ["partial_rotary_factor=0.5"]),
    ("llama", {"quantization_config": {"quant_method": "gptq"}}, ["quantization_config=", "pre-quantized"]),
    ("llama", {"attention_bias": "yes"}, ["attention_bias='yes'"]),
    ("mistral", {"sliding_window": 0}, ["sliding_window=0"]),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "layer_types": ["banana", "full_attention"]},
     ["layer_types=['banana', 'full_attention']", "'sliding_attention'"]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 64, "layer_types": ["full_attention"]},
     ["layer_types=['full_attention']", "2 entries"]),
    ("llama", {"hidden_size": "wide"}, ["hidden_size='wide'"]),
    ("llama", {"eos_token_id": ["end"]}, ["eos_token_id=['end']"]),
    ("gemma2", {"hidden_activation": "relu"}, ["hidden_activation='relu'", "'gelu_pytorch_tanh'"]),
    ("gemma2", {"use_bidirectional_attention": True}, ["use_bidirectional_attention=True", "bidirectional"]),
    ("gemma2", {"attn_logit_softcapping": -1.0}, ["attn_logit_softcapping=-1.0", "positive number or null"]),
    ("gemma3_text", {"sliding_window": None}, ["sliding_window=None", "'sliding_attention' layers"]),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "linear", "factor": 2.0,
                                                               "rope_theta": 1e4}}},
     ["rope_parameters.sliding_attention.rope_type='linear'", "full-attention layers only"]),
    ("gemma3_text", {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6,
                                                            "mrope_section": [2, 2]},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     ["rope_parameters.full_attention.mrope_section=[2, 2]"]),
    ("gemma3_text", {"layer_types": ["sliding_attention"]}, ["layer_types=['sliding_attention']", "4 entries"]),
]


@pytest.mark.parametrize("family,edits,fragments", REFUSED, ids=[f"{f}-{next(iter(e))}" for f, e, _ in REFUSED])
def test_unsupported_config_value_is_refused_by_name(family, edits, fragments):
    with pytest.raises(ConfigError) as info:
        account(config_json(family, **edits))
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# (family, config.json edits, the window of each layer: None = full attention)
WINDOWS = [
    ("mistral", {"sliding_window": None}, [None, None]),
    ("mistral", {"sliding_window": 4}, [4, 4]),
    ("qwen2", {"use_sliding_window": False, "sliding_window": 4}, [None, None]),  # the flag is off: full attention
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "layer_types": None, "max_window_layers": 2},
     [None, None]),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "layer_types": None, "max_window_layers": 1},
     [None, 64]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32,
               "layer_types": ["full_attention", "sliding_attention"]}, [None, 32]),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 32,
               "layer_types": ["full_attention", "full_attention"]}, [None, None]),
    ("gemma2", {"sliding_window": 16, "layer_types": None}, [16, None, 16, None]),  # Gemma 2's default pattern
    ("gemma3_text", {"sliding_window": 16, "layer_types": None, "num_hidden_layers": 7},
     [16] * 5 + [None, 16]),  # Gemma 3's default sliding_window_pattern 6
    ("gemma3_text", {"sliding_window": 16, "layer_types": None, "num_hidden_layers": 4, "sliding_window_pattern": 2},
     [16, None, 16, None]),  # a config.json of transformers 4 (its pattern key)
]


@pytest.mark.parametrize("family,edits,windows", WINDOWS)
def test_sliding_window_is_read_as_transformers_does(family, edits, windows):
    config_cls, _ = hf_classes(family)
    theirs = config_cls(**{k: v for k, v in config_json(family, **edits).items() if k != "transformers_version"})
    if family == "mistral":  # MistralModel windows every layer
        expected = [theirs.sliding_window] * theirs.num_hidden_layers
    else:
        expected = [theirs.sliding_window if t == "sliding_attention" else None for t in theirs.layer_types]
    assert expected == windows  # the table agrees with transformers' own reading
    config = account(config_json(family, **edits)).config
    assert [config.window(i) for i in range(config.num_layers)] == windows
    config.check_max_seq(config.max_position_embeddings)  # any --max-seq up to the model's is exact now


def test_gemma3_rope_is_read_as_transformers_does():
    """Per layer type (transformers 5's rope_parameters), and the transformers 4 keys (rope_theta, rope_scaling,
    rope_local_base_freq) of real Gemma 3 checkpoints: global scaling on full layers, local base on sliding ones."""
    import transformers

    old = {k: v for k, v in config_json("gemma3_text").items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=500000.0, rope_local_base_freq=2000.0, rope_scaling={"rope_type": "linear", "factor": 4.0},
               sliding_window_pattern=2)
    for hf in (config_json("gemma3_text"), old):
        theirs = transformers.Gemma3TextConfig(**{k: v for k, v in hf.items() if k != "transformers_version"})
        full, local = theirs.rope_parameters["full_attention"], theirs.rope_parameters["sliding_attention"]
        config = account(hf).config
        assert config.rope_theta == full["rope_theta"] and config.rope_local_theta == local["rope_theta"]
        assert config.rope_scaling.kind == full["rope_type"] and config.rope_scaling.factor == full.get("factor", 1.0)
        assert [config.local_rope(i) for i in range(config.num_layers)] == \
            [t == "sliding_attention" for t in theirs.layer_types]


def test_gemma_absent_fields_take_transformers_class_defaults():
    """A config.json without Gemma 2's soft caps, window or query scalar reads them as its config class does."""
    import transformers

    hf = {k: v for k, v in config_json("gemma2").items()
          if k not in ("attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "query_pre_attn_scalar")}
    theirs = transformers.Gemma2Config(**{k: v for k, v in hf.items() if k != "transformers_version"})
    config = account(hf).config
    assert (config.attn_softcap, config.final_softcap, config.sliding_window, config.query_pre_attn_scalar) == \
        (theirs.attn_logit_softcapping, theirs.final_logit_softcapping, theirs.sliding_window,
         theirs.query_pre_attn_scalar)
    nulls = account(config_json("gemma2", attn_logit_softcapping=None, final_logit_softcapping=None)).config
    assert nulls.attn_softcap is None and nulls.final_softcap is None


def test_ignored_and_unknown_fields_are_reported():
    acc = account(config_json("llama", rope_interleaved=False, my_custom_key=3))
    assert {"initializer_range", "use_cache", "attention_dropout", "pad_token_id", "transformers_version"} <= \
        set(acc.ignored)
    assert acc.unknown == ("my_custom_key", "rope_interleaved")
    assert acc.to_dict()["unknown"] == ["my_custom_key", "rope_interleaved"]


def test_export_manifest_lists_ignored_and_unknown_fields(hf_checkpoint, tmp_path):
    import json
    import shutil

    from decodekit.export.artifact import ExportOptions, export_artifact

    src = tmp_path / "hf"
    shutil.copytree(hf_checkpoint("llama"), src)
    hf = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**hf, "rope_interleaved": False}))
    messages: list[str] = []
    manifest = export_artifact(str(src), tmp_path / "a", ExportOptions(max_seq=16, max_batch=1), messages.append)
    assert manifest.config_fields["unknown"] == ["rope_interleaved"]
    assert "initializer_range" in manifest.config_fields["ignored"]
    assert any("rope_interleaved" in m and "initializer_range" in m for m in messages)


def test_row_parallel_biases_are_added_once_under_tensor_parallelism(hf_checkpoint):
    """o_proj / down_proj biases live after the all-reduce: tp=2 equals tp=1 (adding them per rank would not)."""
    from decodekit.export.checkpoint import load_hf
    from decodekit.export.sharding import ThreadGroup, shard

    model = load_hf(hf_checkpoint("llama", attention_bias=True, mlp_bias=True, hidden_act="gelu"))
    assert model.layers[0].ffn_norm.reduce_bias is not None and model.layers[0].attn_norm.reduce_bias is not None
    ids = torch.tensor([[5, 17, 99, 3, 200, 42, 7]])
    args = (ids, torch.arange(7)[None], torch.zeros(1, dtype=torch.long), torch.tensor([7]))
    with torch.no_grad():
        whole, _ = model(*args, model.new_cache(1, 16))
    group = ThreadGroup(2)
    ranks = [shard(copy.deepcopy(model), r, 2, group.rank(r)) for r in range(2)]
    out: list[torch.Tensor] = [None, None]  # type: ignore[list-item]

    def run(r: int) -> None:
        with torch.no_grad():
            out[r] = ranks[r](*args, ranks[r].new_cache(1, 16))[0]

    import threading

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    scale = whole.abs().max().item()
    for r in range(2):
        assert (out[r] - whole).abs().max().item() <= 1e-5 * scale
