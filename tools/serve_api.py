"""The OpenAI wire format of `decodekit serve`: request bodies -> scheduler Requests, results -> response JSON.

Every field is checked (type, range); an unknown field, a wrong type, a value out of range, an empty prompt or a
prompt + max_tokens over the artifact's max_seq raise ApiRequestError, answered as
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status. Fields OpenAI defines but this server does
not implement are accepted only at their neutral value (n=1, echo=false, ...). Beside the standard fields a
choice carries ``token_ids`` (the generated ids), as vLLM does.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ApiRequestError
from ..runtime.request import Request
from ..runtime.sampler import MIN_TEMPERATURE, SamplingConfig

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "stop", "error": "error"}
MAX_STOPS = 4

# field -> checker(value) returning the value or raising ValueError with what is expected
Checker = Callable[[Any], Any]


def _num(lo: float, hi: float) -> Checker:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise ValueError(f"a number in [{lo}, {hi}]")
        return float(v)
    return check


def _int(lo: int, hi: int | None = None) -> Checker:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError(f"an integer >= {lo}" + (f" and <= {hi}" if hi is not None else ""))
        return v
    return check


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError("true or false")
    return v


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError("a string")
    return v


def _stop(v: Any) -> list[str]:
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise ValueError(f"a non-empty string or a list of at most {MAX_STOPS} non-empty strings")
    return stops


def _only(value: Any, what: str) -> Checker:
    def check(v: Any) -> Any:
        if v != value and v is not None:
            raise ValueError(f"{what} (other values are not supported by this server)")
        return v
    return check


def _stream_options(v: Any) -> dict:
    if not isinstance(v, dict) or set(v) - {"include_usage"} or not isinstance(v.get("include_usage", False), bool):
        raise ValueError('an object {"include_usage": true|false}')
    return v


COMMON: dict[str, Checker] = {
    "model": _str, "max_tokens": _int(1), "temperature": _num(0.0, 2.0), "top_p": _num(0.0, 1.0),
    "top_k": _int(0), "min_p": _num(0.0, 1.0), "repetition_penalty": _num(0.01, 10.0),
    "presence_penalty": _num(-2.0, 2.0), "frequency_penalty": _num(-2.0, 2.0), "seed": _int(0, 2**63 - 1),
    "stop": _stop, "stream": _bool, "stream_options": _stream_options, "user": _str,
    "n": _only(1, "1"), "logprobs": _only(None, "null"), "logit_bias": _only({}, "null or {}"),
}
COMPLETION_FIELDS = {**COMMON, "prompt": lambda v: v, "echo": _only(False, "false"), "best_of": _only(1, "1"),
                     "suffix": _only(None, "null")}
CHAT_FIELDS = {**COMMON, "messages": lambda v: v, "max_completion_tokens": _int(1),
               "top_logprobs": _only(None, "null")}


@dataclass(frozen=True)
class Parsed:
    """A checked request body: the scheduler request plus what the response needs."""

    request: Request
    model: str
    stream: bool
    include_usage: bool


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiRequestError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ApiRequestError("the request body must be a JSON object")
    return doc


def check_fields(doc: dict[str, Any], known: dict[str, Checker], required: tuple[str, ...]) -> dict[str, Any]:
    """The body's fields, each checked; unknown or missing ones refused."""
    unknown = sorted(set(doc) - set(known))
    if unknown:
        raise ApiRequestError(f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}",
                              param=unknown[0], code="unknown_field")
    for name in required:
        if name not in doc:
            raise ApiRequestError(f"the field {name!r} is required", param=name, code="missing_field")
    out = {}
    for name, value in doc.items():
        if value is None and name not in required:  # null = not given, as the OpenAI API reads it
            continue
        try:
            out[name] = known[name](value)
        except ValueError as e:
            raise ApiRequestError(f"{name} must be {e}; got {json.dumps(value)[:80]}", param=name,
                                  code="invalid_value") from None
    return out


def sampling(f: dict[str, Any]) -> SamplingConfig:
    t = f.get("temperature")
    t = 1.0 if t is None else t  # OpenAI's default
    if 0.0 < t < MIN_TEMPERATURE:
        raise ApiRequestError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}", param="temperature",
                              code="invalid_value")
    top_p = f.get("top_p")
    if top_p == 0.0:
        raise ApiRequestError("top_p must be in (0, 1]", param="top_p", code="invalid_value")
    return SamplingConfig(temperature=t, top_k=f.get("top_k") or 0, top_p=1.0 if top_p is None else top_p,
                          min_p=f.get("min_p") or 0.0, repetition_penalty=f.get("repetition_penalty") or 1.0,
                          presence_penalty=f.get("presence_penalty") or 0.0,
                          frequency_penalty=f.get("frequency_penalty") or 0.0, seed=f.get("seed"), logprobs=False)


def build_request(f: dict[str, Any], prompt_ids: list[int], max_seq: int, default_max_tokens: int | None,
                  stop_ids: list[list[int]], model: str) -> Parsed:
    """A scheduler Request of checked fields; the length check names max_seq."""
    if not prompt_ids:
        raise ApiRequestError("the prompt is empty; send at least one token", param="prompt", code="empty_prompt")
    max_tokens = f.get("max_tokens") or f.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens if default_max_tokens is not None else max_seq - len(prompt_ids)
    if len(prompt_ids) + max_tokens > max_seq:
        raise ApiRequestError(f"the prompt has {len(prompt_ids)} tokens and max_tokens is {max_tokens}: together "
                              f"over this model's context of {max_seq} tokens; shorten the prompt or lower max_tokens",
                              param="max_tokens", code="context_length_exceeded")
    req = Request(tuple(prompt_ids), max_tokens, sampling(f), tuple(tuple(s) for s in stop_ids))
    options = f.get("stream_options") or {}
    if options and not f.get("stream"):
        raise ApiRequestError("stream_options needs stream: true", param="stream_options")
    return Parsed(req, model, bool(f.get("stream")), bool(options.get("include_usage")))


# ------------------------------------------------------------------------------------------------ responses


def error_body(e: ApiRequestError | str, status: int = 400, kind: str | None = None) -> dict[str, Any]:
    if isinstance(e, ApiRequestError):
        message, param, code, status = str(e), e.param, e.code, e.status
    else:
        message, param, code = e, None, None
    kinds = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
             429: "rate_limit_exceeded", 500: "server_error", 503: "server_error"}
    return {"error": {"message": message, "type": kind or kinds.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion_body(chat: bool, rid: str, model: str, text: str, ids: list[int], reason: str | None,
                    prompt_tokens: int | None = None, chunk: bool = False, first: bool = False) -> dict[str, Any]:
    """A response (or, with ``chunk``, one streamed chunk) of /v1/completions or /v1/chat/completions."""
    finish = FINISH.get(reason) if reason is not None else None
    if chat:
        if chunk:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
        obj = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    choice["token_ids"] = ids
    body: dict[str, Any] = {"id": rid, "object": obj, "created": int(time.time()), "model": model,
                            "choices": [choice]}
    if prompt_tokens is not None:
        body["usage"] = usage(prompt_tokens, len(ids))
    return body
