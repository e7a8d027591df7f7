"""The decode loop: greedy parity with transformers' generate(), stopping, request checks, streaming.

Verification ladder step 3: ORT CPU greedy generation of 128 tokens equals transformers' generate() on the
random checkpoints of every family, alone and inside a right-padded batch of 3 prompts of different lengths.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from decodekit.export.config import ConfigError
from decodekit.runtime.backend import load_backend
from decodekit.runtime.generate import GenerationError, GenerationResult, generate, generate_ids, generate_result
from decodekit.runtime.pipeline import generate_text
from decodekit.runtime.sampler import SamplingConfig
from decodekit.runtime.tokenizer import Tokenizer
from helpers import FAMILIES

MAX_SEQ = 192
NEW_TOKENS = 128
PROMPTS = [
    [5, 17, 99, 3, 200, 42, 7, 8, 150, 33, 71],  # 11 tokens
    [12, 250, 64, 9, 130],  # 5
    [1, 201, 45, 88, 160, 31, 222, 6, 99, 140, 18, 240, 57, 3, 77, 19, 2],  # 17
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(exported):
    """ORT backend on a preset:tiny artifact (vocab 512, has a tokenizer; max_seq 64, max_batch 4)."""
    art = exported("preset:tiny", max_seq=64, max_batch=4)
    with load_backend("ort", art, intra_op_threads=1) as backend:
        yield backend


# ------------------------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(hf_checkpoint, exported, family):
    from transformers import AutoModelForCausalLM, GenerationConfig

    src = hf_checkpoint(family)
    art = exported(str(src), max_seq=MAX_SEQ, max_batch=4)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    # an EOS id outside the vocabulary: transformers must not stop early
    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=hf.config.vocab_size + 7,
                              pad_token_id=0)
    expected = []
    for p in PROMPTS:  # transformers generates each prompt alone
        ids = torch.tensor([p])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)[0, len(p):].tolist()
        assert len(out) == NEW_TOKENS
        expected.append(out)
    with load_backend("ort", art, intra_op_threads=1) as backend:
        single = generate_result(backend, PROMPTS[:1], NEW_TOKENS, eos_ids=())
        batch = generate_ids(backend, PROMPTS, NEW_TOKENS, eos_ids=())
    assert single.output_ids[0] == expected[0]
    assert single.finish_reasons == ["length"]
    for b in range(len(PROMPTS)):
        first_diff = next((i for i, (x, y) in enumerate(zip(batch[b], expected[b])) if x != y), None)
        assert batch[b] == expected[b], f"{family} batch row {b} differs from transformers at token {first_diff}"


# ----------------------------------------------------------------------------------------------- stopping


def first_new(tokens: list[int], start: int) -> int:
    """First index >= start whose token does not occur earlier in the list."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def test_stops_on_eos_stop_sequence_and_length(tiny):
    prompt = [1, 318, 422, 425, 14]
    ref = generate_ids(tiny, [prompt], 30, eos_ids=())[0]
    assert len(ref) == 30
    k = first_new(ref, 4)
    r = generate_result(tiny, [prompt], 30, eos_ids=[ref[k]])
    assert r.output_ids == [ref[:k + 1]] and r.finish_reasons == ["eos"] and r.steps == k + 1
    # a two-token stop sequence: the output ends at its first occurrence
    j = first_new(ref, 6)
    stop = ref[j - 1:j + 1]
    r = generate_result(tiny, [prompt], 30, eos_ids=(), stop_sequences=[[499, 498, 497], stop])
    assert r.output_ids == [ref[:j + 1]] and r.finish_reasons == ["stop"]
    r = generate_result(tiny, [prompt], 9, eos_ids=())
    assert r.output_ids == [ref[:9]] and r.finish_reasons == ["length"]
    assert len(r.logprobs[0]) == 9 and all(lp <= 0.0 for lp in r.logprobs[0])


def test_finished_sequence_does_not_disturb_the_batch(tiny):
    prompts = [[1, 318, 422], [1, 20, 30, 40, 50, 60, 70], [1, 99]]
    ref = generate_ids(tiny, prompts, 25, eos_ids=())
    others = set(ref[1]) | set(ref[2])
    k = next(i for i in range(2, 25) if ref[0][i] not in ref[0][:i] and ref[0][i] not in others)
    r = generate_result(tiny, prompts, 25, eos_ids=[ref[0][k]])
    assert r.output_ids == [ref[0][:k + 1], ref[1], ref[2]]
    assert r.finish_reasons == ["eos", "length", "length"]


# ------------------------------------------------------------------------------------------ request checks


def test_request_errors_are_raised_before_any_work(tiny):
    with pytest.raises(GenerationError, match=r"prompt of 60 tokens \+ 10 new tokens exceeds the artifact's "
                                              r"max_seq 64; re-export with --max-seq 70"):
        generate(tiny, [[1] * 60], 10)  # not iterated: the check runs at the call
    with pytest.raises(GenerationError, match="max_batch 4"):
        generate(tiny, [[1]] * 5, 4)
    with pytest.raises(GenerationError, match="prompt 1 is empty"):
        generate(tiny, [[1, 2], []], 4)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(tiny, [[1, 512]], 4)
    with pytest.raises(GenerationError, match="stop sequence is empty"):
        generate(tiny, [[1, 2]], 4, stop_sequences=[[]])
    assert issubclass(GenerationError, ConfigError) and issubclass(GenerationError, ValueError)


# --------------------------------------------------------------------------------------------- streaming


def test_streaming_yields_one_event_per_step_before_the_next_step_runs(tiny):
    prompt = [1, 318, 422, 425, 14]
    n = len(prompt)
    state = tiny.allocate(1)
    view = tiny.caches(state)[0].numpy()  # layer 0 keys, aliasing the device buffer
    view[:] = 0.0
    events = generate(tiny, [prompt], 6, eos_ids=(), state=state)
    assert not view.any(), "nothing runs before iteration"
    first = next(events)
    assert first.step == 0 and first.emitted.tolist() == [True] and first.tokens.shape == (1,)
    assert view[0, :, n - 1].any() and not view[0, :, n].any(), "only the prefill ran for the first token"
    second = next(events)
    assert second.step == 1 and view[0, :, n].any() and not view[0, :, n + 1].any()
    rest = list(events)
    streamed = [int(e.tokens[0]) for e in (first, second, *rest)]
    assert streamed == generate_ids(tiny, [prompt], 6, eos_ids=())[0]
    assert rest[-1].finished.tolist() == [True] and rest[-1].finish_reasons == ("length",)


def test_generate_text_streams_decoded_pieces(tiny):
    pieces: list[str] = []
    r = generate_text(tiny, "Hello world", max_new_tokens=12, eos_ids=(), on_text=lambda b, s: pieces.append(s))
    tok = Tokenizer.from_artifact(tiny.artifact)
    assert r.prompt_ids == [tok.encode("Hello world")] and r.prompt_ids[0][0] == 1  # BOS from tokenizer_config
    assert r.text == [tok.decode(r.output_ids[0])] and "".join(pieces) == r.text[0]
    assert r.output_ids == generate_ids(tiny, r.prompt_ids, 12, eos_ids=())


# ----------------------------------------------------------------------------------- backends and sampling


def test_torch_backend_generates_the_same_tokens(tiny):
    prompts = [[1, 318, 422, 425, 14], [1, 7]]
    with load_backend("torch", tiny.artifact) as ref:
        assert generate_ids(ref, prompts, 20, eos_ids=()) == generate_ids(tiny, prompts, 20, eos_ids=())


def test_seeded_sampling_is_reproducible(tiny):
    prompts = [[1, 318, 422], [1, 99, 98, 97]]
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    a = generate_result(tiny, prompts, 20, cfg, eos_ids=())
    b = generate_result(tiny, prompts, 20, cfg, eos_ids=())
    assert a == b and isinstance(a, GenerationResult)
    greedy = generate_ids(tiny, prompts, 20, eos_ids=())
    assert a.output_ids != greedy
    assert np.all(np.array(a.logprobs) <= 0.0)
