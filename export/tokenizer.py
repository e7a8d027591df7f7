"""Tokenizer files: copied from a Hugging Face folder, or a small byte-level BPE for the tiny preset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")

_CORPUS = (
    "The decoder reads a prompt, fills its key and value cache, and then writes one token at a time. "
    "Each step feeds the sampled token back as the next input. Tensor parallel ranks split the heads and "
    "the feed forward rows, and an all reduce joins their partial sums before the residual add and the norm. "
    "ONNX Runtime sessions and TensorRT engines run the same graph; the runtime binds past and present caches "
    "to one buffer so the cache is updated in place. Hello world, once upon a time there was a small model. "
)


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
            copied.append(name)
    return copied


def write_tiny_tokenizer(out: Path, vocab_size: int, bos_id: int | None, eos_ids: tuple[int, ...]) -> list[str]:
    """Train a deterministic byte-level BPE of exactly `vocab_size` ids on an embedded corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<pad>", "<s>", "</s>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    config = {"bos_token": specials[bos_id] if bos_id is not None and bos_id < 3 else None,
              "eos_token": specials[eos_ids[0]] if eos_ids and eos_ids[0] < 3 else None, "add_bos_token": True}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ["tokenizer.json", "tokenizer_config.json"]
