"""The artifact's tokenizer: ``tokenizer.json`` through the `tokenizers` library, BOS from tokenizer_config.json.

Encoding applies the tokenizer.json post-processor (which adds BOS for e.g. Llama 3), then prepends
BOS when tokenizer_config.json says ``add_bos_token: true`` and it is not there yet. Decoding skips
special tokens. ``TextStream`` turns a growing id list into text pieces without splitting a UTF-8
character or a multi-token grapheme (the prefix/read-offset scheme of transformers' TextStreamer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..export.manifest import Manifest, read_manifest

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Text <-> ids for one artifact."""

    def __init__(self, tokenizer_json: str | Path, config: dict[str, Any] | None = None) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_file(str(tokenizer_json))
        config = config or {}
        self.bos_id = self._id(_token_text(config.get("bos_token")))
        self.eos_id = self._id(_token_text(config.get("eos_token")))
        self.add_bos = bool(config.get("add_bos_token", False)) and self.bos_id is not None

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @classmethod
    def from_artifact(cls, folder: str | Path, manifest: Manifest | None = None) -> "Tokenizer | None":
        """The artifact's tokenizer, or None when it was exported without one."""
        folder = Path(folder)
        manifest = manifest or read_manifest(folder, verify=False)
        names = {f.file for f in manifest.tokenizer}
        if TOKENIZER_JSON not in names:
            return None
        config = json.loads((folder / TOKENIZER_CONFIG).read_text()) if TOKENIZER_CONFIG in names else {}
        return cls(folder / TOKENIZER_JSON, config)

    def token_id(self, token: str) -> int | None:
        """The id of one vocabulary token (e.g. "<|im_end|>"), or None."""
        return self._id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with add_special_tokens, the post-processor's specials and BOS when configured."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Incremental detokenizer of one sequence: ``push(id)`` returns the text that became final ("" if none)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] were already printed; decoding from prefix keeps word boundaries
        self._read = 0

    def push(self, token: int) -> str:
        self._ids.append(int(token))
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return text[len(done):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        done = self._tok.decode(self._ids[self._prefix:self._read])
        text = self._tok.decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return text[len(done):]


def generation_eos_ids(folder: str | Path, manifest: Manifest) -> tuple[int, ...]:
    """EOS ids of config.json plus those of generation_config.json (instruct models list several there)."""
    ids = list(manifest.config.eos_token_ids)
    if GENERATION_CONFIG in {f.file for f in manifest.tokenizer}:
        eos = json.loads((Path(folder) / GENERATION_CONFIG).read_text()).get("eos_token_id")
        extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        ids += [int(i) for i in extra if int(i) not in ids]
    return tuple(ids)
