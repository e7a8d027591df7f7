"""Chat messages -> prompt text with the artifact's chat template (tokenizer_config.json ``chat_template``).

The template is Jinja, rendered in a sandbox as transformers renders it (``messages``, ``add_generation_prompt``,
``bos_token``, ``eos_token``, ``raise_exception``). An artifact without a template cannot serve chat: the
server answers 400.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ApiRequestError
from ..runtime.tokenizer import TOKENIZER_CONFIG, _token_text

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None, eos_token: str | None) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(source)
        self._specials = {"bos_token": bos_token or "", "eos_token": eos_token or ""}

    @classmethod
    def from_artifact(cls, folder: str | Path) -> "ChatTemplate | None":
        path = Path(folder) / TOKENIZER_CONFIG
        if not path.is_file():
            return None
        config = json.loads(path.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # [{"name": "default", "template": ...}, ...]
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        if not isinstance(source, str):
            return None
        return cls(source, _token_text(config.get("bos_token")), _token_text(config.get("eos_token")))

    def render(self, messages: list[dict[str, str]]) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._specials)
        except TemplateError as e:
            raise ApiRequestError(f"the chat template refused these messages: {e}", param="messages") from None


def check_messages(value: Any) -> list[dict[str, str]]:
    """[{"role": ..., "content": str}, ...], at least one; content given as text parts is joined."""
    if not isinstance(value, list) or not value:
        raise ApiRequestError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiRequestError(f"messages[{i}] needs a role, one of {', '.join(ROLES)}", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiRequestError(f"messages[{i}].content parts must be text parts", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiRequestError(f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)
