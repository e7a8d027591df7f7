"""The artifact's chat template, rendered the way transformers' ``apply_chat_template`` renders it.

The template comes from tokenizer_config.json (``chat_template``: a string, or a list of named templates of
which "default" is used) or a ``chat_template.jinja`` file. Rendering uses jinja2's ImmutableSandboxedEnvironment
with transformers' settings (trim_blocks, lstrip_blocks, loopcontrols) and globals (raise_exception,
strftime_now, a tojson that does not escape HTML); the special tokens of tokenizer_config.json are template
variables. The rendered text is tokenized without adding special tokens (the template writes them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from ..export.manifest import Manifest, read_manifest
from .stopping import GenerationError
from .tokenizer import TOKENIZER_CONFIG, Tokenizer, _token_text, generation_eos_ids

CHAT_TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
# end-of-turn markers of the common templates: a chat stops at whichever of these its template writes
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")

Message = dict[str, str]


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    variables: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, ... as text

    @classmethod
    def from_artifact(cls, folder: str | Path, manifest: Manifest | None = None) -> "ChatTemplate":
        folder = Path(folder)
        manifest = manifest or read_manifest(folder, verify=False)
        names = {f.file for f in manifest.tokenizer}
        config = json.loads((folder / TOKENIZER_CONFIG).read_text()) if TOKENIZER_CONFIG in names else {}
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if source is None and CHAT_TEMPLATE_FILE in names:
            source = (folder / CHAT_TEMPLATE_FILE).read_text()
        if not source:
            raise GenerationError(f"{folder}: the artifact has no chat template (tokenizer_config.json chat_template "
                                  "or chat_template.jinja); use --prompt for plain completion")
        variables = {k: t for k in SPECIAL_TOKENS if (t := _token_text(config.get(k))) is not None}
        return cls(source, variables)

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        template = _compile(self.source)
        import jinja2

        try:
            return template.render(messages=[dict(m) for m in messages],
                                                add_generation_prompt=add_generation_prompt, **self.variables)
        except jinja2.TemplateError as e:
            raise GenerationError(f"the chat template failed: {e}") from None

    def end_of_turn_ids(self, tokenizer: Tokenizer, eos_ids: Sequence[int]) -> tuple[int, ...]:
        """EOS ids plus the end-of-turn tokens this template writes (e.g. <|im_end|>)."""
        ids = list(eos_ids)
        for text in END_OF_TURN:
            i = tokenizer.token_id(text)
            if text in self.source and i is not None and i not in ids:
                ids.append(i)
        return tuple(ids)


def _compile(source: str):
    try:
        import jinja2
    except ModuleNotFoundError:
        raise GenerationError("chat templates need the jinja2 package: pip install 'jinja2>=3.1.6'") from None
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def chat_messages(message: str, system: str | None = None) -> list[Message]:
    return ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": message}]


def chat_prompt(folder: str | Path, manifest: Manifest | None, message: str,
                system: str | None = None) -> tuple[list[int], tuple[int, ...]]:
    """(prompt ids of a one-message chat, the ids that end the answer) for `generate --chat`."""
    manifest = manifest or read_manifest(folder, verify=False)
    tok = Tokenizer.from_artifact(folder, manifest)
    if tok is None:
        raise GenerationError(f"{folder}: the artifact has no tokenizer, so --chat cannot encode a message")
    template = ChatTemplate.from_artifact(folder, manifest)
    ids = tok.encode(template.render(chat_messages(message, system)), add_special_tokens=False)
    return ids, template.end_of_turn_ids(tok, generation_eos_ids(folder, manifest))
