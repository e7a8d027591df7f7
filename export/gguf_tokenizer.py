"""tokenizer.json + tokenizer_config.json (with the chat template) built from a GGUF's tokenizer metadata.

Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are rebuilt with the `tokenizers` library the
way transformers' GGUF loader does: the vocabulary spelled in the byte alphabet, the file's merges, GPT-2's
split regex unless ``tokenizer.ggml.pre`` names another (``PRE_TOKENIZER_SPLITS``), control tokens (type 3)
as special added tokens and user-defined ones (type 4) as plain added tokens. Other tokenizer models
(sentencepiece) are not rebuilt: the artifact then has no tokenizer and takes token ids.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from .gguf import GgufFile, open_gguf

CONTROL, USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# tokenizer.ggml.pre -> split regex; any other value keeps GPT-2's ByteLevel regex (e.g. "smollm", "gpt2")
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}

SPECIAL_TOKEN_KEYS = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
                      "pad_token": "padding_token_id"}


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable unicode map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _spelled(token: str) -> str:
    alphabet = _byte_alphabet()
    if set(token) <= set(alphabet.values()):
        return token
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def build_tokenizer(gguf: GgufFile):
    """A `tokenizers.Tokenizer` for a byte-level BPE GGUF, or None for other tokenizer models."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    if gguf.get("tokenizer.ggml.model") != "gpt2":
        return None
    tokens = gguf.get("tokenizer.ggml.tokens")
    types = gguf.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ")) for m in gguf.get("tokenizer.ggml.merges") or []]
    vocab = {_spelled(t): i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                               end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(gguf.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    alphabet = set(_byte_alphabet().values())
    # a "control" token outside the byte alphabet is a llama.cpp mislabel; adding it would grow the vocabulary
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types)
                            if k == CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types)
                    if k == USER_DEFINED and t in vocab])
    return tok


def tokenizer_config(gguf: GgufFile) -> dict:
    """tokenizer_config.json: special tokens as text, add_bos_token, and the chat template when the file has one."""
    tokens = gguf.get("tokenizer.ggml.tokens") or []
    config: dict = {}
    for name, key in SPECIAL_TOKEN_KEYS.items():
        i = gguf.get(f"tokenizer.ggml.{key}")
        config[name] = tokens[int(i)] if i is not None and int(i) < len(tokens) else None
    config["add_bos_token"] = bool(gguf.get("tokenizer.ggml.add_bos_token", False))
    config["add_eos_token"] = bool(gguf.get("tokenizer.ggml.add_eos_token", False))
    if (template := gguf.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def write_gguf_tokenizer(path: str | Path, out: Path) -> list[str]:
    """Write tokenizer.json and tokenizer_config.json into ``out``; [] when the tokenizer model is not rebuilt."""
    gguf = open_gguf(path)
    tok = build_tokenizer(gguf)
    if tok is None:
        return []
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(gguf), indent=2, ensure_ascii=False))
    return ["tokenizer.json", "tokenizer_config.json"]
