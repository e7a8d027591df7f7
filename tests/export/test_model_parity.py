"""decodekit's eager Decoder against transformers' own models, per family, in fp32.

Covers prefill/decode logit parity, greedy generation, right-padded batching, in-process tensor
parallelism (TP=2, and TP=4 with replicated KV heads), the in-place static cache, and loader errors.
"""

from __future__ import annotations

import copy
import json
import shutil
import threading

import pytest
import torch

from decodekit.export.checkpoint import CheckpointError, load_hf, load_source
from decodekit.export.config import ConfigError, preset
from decodekit.export.sharding import ThreadGroup, shard
from helpers import FAMILIES, greedy_reference

RTOL = 1e-4  # max |ours - ref| relative to the logit scale max |ref|
MAX_SEQ = 96
PROMPT = [5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71]  # 11 tokens
DECODE = [12, 250, 64, 9, 130, 77, 1, 201, 45, 88, 160, 31, 222, 6, 99, 140, 18, 240, 57, 3]  # 20 tokens


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    scale = ref.abs().max().item()
    err = (ours - ref).abs().max().item()
    assert err <= RTOL * scale, f"{what}: max abs error {err:.3e} > {RTOL:g} x logit scale {scale:.3f}"


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    """family -> (decodekit Decoder, transformers model); shared: tests must not modify them."""
    from transformers import AutoModelForCausalLM

    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            path = hf_checkpoint(family)
            hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[family] = (load_hf(path, rope_positions=MAX_SEQ), hf)  # the RoPE table of a --max-seq 96 export
        return cache[family]

    return get


def step(model, cache, ids: list[list[int]], write: list[int], nonpad: list[int], logits: str = "all"):
    """One Decoder call for a batch; ids[b] is that row's S tokens (right-padded by the caller)."""
    ids_BS = torch.tensor(ids, dtype=torch.long)
    write_B = torch.tensor(write, dtype=torch.long)
    pos_BS = write_B[:, None] + torch.arange(ids_BS.shape[1])[None]
    with torch.no_grad():
        return model(ids_BS, pos_BS, write_B, torch.tensor(nonpad, dtype=torch.long), cache, logits=logits)


def run_single(model, prompt: list[int], decode: list[int], max_seq: int = MAX_SEQ) -> list[torch.Tensor]:
    """Logits [S, V] of the prefill, then [V] of each decode step (teacher-forced tokens)."""
    cache = model.new_cache(1, max_seq)
    logits, cache = step(model, cache, [prompt], [0], [len(prompt)])
    out = [logits[0]]
    n = len(prompt)
    for tok in decode:
        logits, cache = step(model, cache, [[tok]], [n], [n + 1])
        out.append(logits[0, 0])
        n += 1
    return out


# ---------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_decode_logits_match_transformers(models, family):
    model, hf = models(family)
    seq = PROMPT + DECODE
    with torch.no_grad():
        ref = hf(torch.tensor([seq])).logits[0]  # [31, V], full-sequence causal forward
    ours = run_single(model, PROMPT, DECODE)
    assert_close(ours[0], ref[: len(PROMPT)], f"{family} prefill")
    for i, logits in enumerate(ours[1:]):
        assert_close(logits, ref[len(PROMPT) + i], f"{family} decode step {i}")


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_matches_transformers_dynamic_cache(models, family):
    """The same comparison through HF's own incremental path (DynamicCache), a few steps."""
    from transformers import DynamicCache

    model, hf = models(family)
    ours = run_single(model, PROMPT, DECODE[:5])
    past = DynamicCache(config=hf.config)
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT]), past_key_values=past, use_cache=True)
        assert_close(ours[0], out.logits[0], f"{family} prefill (DynamicCache)")
        for i, tok in enumerate(DECODE[:5]):
            out = hf(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            assert_close(ours[1 + i], out.logits[0, 0], f"{family} decode step {i} (DynamicCache)")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(models, family):
    model, hf = models(family)
    new = 64
    ours = greedy_reference(model, PROMPT, new, MAX_SEQ)
    with torch.no_grad():
        out = hf.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                          max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    ref = out[0, len(PROMPT):].tolist()
    assert len(ref) == new, f"transformers stopped early after {len(ref)} tokens"
    assert len(ours) == new
    assert len(set(ref)) > 8, f"degenerate greedy output {ref}: the random checkpoint is too uniform"
    assert ours == ref


# -------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("family", FAMILIES)
def test_right_padded_batch_matches_single_sequences(models, family):
    model, _ = models(family)
    prompts = [PROMPT, PROMPT[3:8], [9, 8, 7, 250, 6, 5, 4, 3]]  # lengths 11, 5, 8
    decodes = [DECODE[:10], DECODE[5:15], DECODE[10:20]]
    singles = [run_single(model, p, d) for p, d in zip(prompts, decodes)]

    S = max(map(len, prompts))
    cache = model.new_cache(len(prompts), MAX_SEQ)
    padded = [p + [0] * (S - len(p)) for p in prompts]
    lens = [len(p) for p in prompts]
    logits, cache = step(model, cache, padded, [0, 0, 0], lens)
    for b, n in enumerate(lens):
        assert_close(logits[b, :n], singles[b][0], f"{family} batched prefill, sequence {b}")

    # logits="last" picks each sequence's last valid row.
    cache_last = model.new_cache(len(prompts), MAX_SEQ)
    last, _ = step(model, cache_last, padded, [0, 0, 0], lens, logits="last")
    assert last.shape[:2] == (len(prompts), 1)
    for b, n in enumerate(lens):
        assert_close(last[b, 0], singles[b][0][n - 1], f"{family} batched prefill logits='last', sequence {b}")

    for i in range(len(decodes[0])):
        toks = [[d[i]] for d in decodes]
        logits, cache = step(model, cache, toks, lens, [n + 1 for n in lens])
        for b in range(len(prompts)):
            assert_close(logits[b, 0], singles[b][1 + i], f"{family} batched decode step {i}, sequence {b}")
        lens = [n + 1 for n in lens]


# ------------------------------------------------------------------------------ tensor parallel


def run_tp(model, world: int, prompt: list[int], decode: list[int]) -> list[list[torch.Tensor]]:
    """Each rank (a sharded deep copy, own cache) in its own thread; returns per-rank logits lists."""
    group = ThreadGroup(world)
    ranks = [shard(copy.deepcopy(model), r, world, group.rank(r)) for r in range(world)]
    results: list[list[torch.Tensor] | None] = [None] * world
    errors: list[BaseException] = []

    def work(r: int) -> None:
        try:
            results[r] = run_single(ranks[r], prompt, decode)
        except BaseException as e:  # unblock the other ranks' all-reduce barriers
            errors.append(e)
            group._barrier.abort()

    threads = [threading.Thread(target=work, args=(r,), daemon=True) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a tensor-parallel rank hung"
    if errors:
        raise errors[0]
    return results  # type: ignore[return-value]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_parallel_matches_single_rank(models, family, world):
    model, _ = models(family)
    assert model.config.num_kv_heads == 2  # world=4 exercises KV-head replication
    ref = run_single(model, PROMPT, DECODE[:10])
    per_rank = run_tp(model, world, PROMPT, DECODE[:10])
    for r, logits in enumerate(per_rank):
        assert len(logits) == len(ref)
        for i, (ours, expect) in enumerate(zip(logits, ref)):
            assert_close(ours, expect, f"{family} tp={world} rank {r} step {i}")
    # the shard kept its slice of the KV heads: cache is [B, max(kv/world, 1), T, D]
    shard0 = shard(copy.deepcopy(model), 0, world, ThreadGroup(world).rank(0))
    assert shard0.new_cache(1, 8)[0][0].shape[1] == max(model.config.num_kv_heads // world, 1)


# --------------------------------------------------------------------------------------- caching


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_updates_cache_in_place(models, family):
    model, _ = models(family)
    cache = model.new_cache(1, 32)
    ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in cache]
    tensors = [(k, v) for k, v in cache]
    _, present = step(model, cache, [PROMPT], [0], [len(PROMPT)])
    n = len(PROMPT)
    for tok in DECODE[:3]:
        _, present = step(model, present, [[tok]], [n], [n + 1])
        n += 1
    assert len(present) == len(cache) == model.config.num_layers
    for (k, v), (k0, v0), (pk, pv) in zip(present, tensors, ptrs):
        assert k is k0 and v is v0, "present tensors must be the cache tensors"
        assert k.data_ptr() == pk and v.data_ptr() == pv
        assert k[:, :, :n].abs().amax(dim=-1).gt(0).all(), "valid rows were not written"
        assert k[:, :, n:].eq(0).all() and v[:, :, n:].eq(0).all(), "rows past the valid length were written"


# ------------------------------------------------------------------------------------ bad input


def test_unsupported_architecture_names_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 256, "n_embd": 64}))
    with pytest.raises(ConfigError) as e:
        load_hf(tmp_path)
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM"):
        assert arch in msg


def _rewrite_weights(src, dst, edit) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _rewrite_weights(hf_checkpoint("llama"), tmp_path / "ck", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_hf(tmp_path / "ck")
    assert name in str(e.value)


def test_wrong_shape_is_named(hf_checkpoint, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"  # expected (32, 64)

    def edit(t):
        t[name] = torch.zeros(16, 64)

    _rewrite_weights(hf_checkpoint("qwen2"), tmp_path / "ck", edit)
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path / "ck")
    msg = str(e.value)
    assert name in msg and "(32, 64)" in msg and "(16, 64)" in msg


def test_fused_tensor_of_wrong_shape_is_named(hf_checkpoint, tmp_path):
    """Phi-3 stores gate and up as one gate_up_proj [2 * intermediate, hidden]: its shape is checked whole."""
    name = "model.layers.0.mlp.gate_up_proj.weight"  # expected (256, 64)

    def edit(t):
        t[name] = t[name][:200]

    _rewrite_weights(hf_checkpoint("phi3"), tmp_path / "ck", edit)
    with pytest.raises(CheckpointError) as e:
        load_hf(tmp_path / "ck")
    assert name in str(e.value) and "(256, 64)" in str(e.value) and "(200, 64)" in str(e.value)


def test_pickle_only_checkpoint_is_refused(hf_checkpoint, tmp_path):
    from safetensors.torch import load_file

    src = hf_checkpoint("llama")
    shutil.copy(src / "config.json", tmp_path / "config.json")
    torch.save(load_file(str(src / "model.safetensors")), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="safetensors") as e:
        load_hf(tmp_path)
    assert "pytorch_model.bin" in str(e.value)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no-such-model") as e:
        preset("no-such-model")
    assert "tiny" in str(e.value)  # lists the known presets
    with pytest.raises(ConfigError):
        load_source("preset:no-such-model")


def test_tp_must_divide_heads(models):
    model, _ = models("llama")
    with pytest.raises(ConfigError, match="tp=3") as e:
        shard(copy.deepcopy(model), 0, 3, ThreadGroup(3).rank(0))
    assert "num_heads=4" in str(e.value)
