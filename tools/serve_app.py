"""The HTTP side of `decodekit serve`: a Starlette app over a running Scheduler.

    POST /v1/completions, /v1/chat/completions   OpenAI-compatible, streamed (SSE) or not
    GET  /v1/models, /health, /metrics           model list, liveness, Prometheus metrics

The asyncio server never touches the backend: it submits requests to the scheduler (whose engine thread owns
the backend) and reads their deltas from thread-safe queues. A client that goes away mid-request cancels it,
which frees its slot before the engine's next step. Bad requests get a 4xx OpenAI-style error and nothing else
happens; a full queue gets 429, a body over the limit 413.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, AsyncIterator

from ..errors import ApiRequestError, GenerationError, QueueFullError
from ..runtime.request import Completion, Stream, collect
from ..runtime.scheduler import Scheduler
from ..runtime.tokenizer import Tokenizer
from . import serve_api as api
from .serve_chat import ChatTemplate, check_messages
from .serve_metrics import ServeMetrics

DISCONNECT_POLL_S = 0.2


@dataclass(frozen=True)
class ServeOptions:
    model: str  # the id clients name in "model"
    max_body_bytes: int = 1 << 20
    completion_max_tokens: int = 16  # /v1/completions' default max_tokens (OpenAI's); chat: up to the context


class Server:
    def __init__(self, scheduler: Scheduler, tokenizer: Tokenizer | None, chat: ChatTemplate | None,
                 options: ServeOptions) -> None:
        self.scheduler, self.tokenizer, self.chat, self.options = scheduler, tokenizer, chat, options
        self.metrics = ServeMetrics(scheduler)
        self.max_seq = scheduler.backend.max_seq

    def app(self) -> Any:
        from starlette.applications import Starlette
        from starlette.routing import Route

        return Starlette(routes=[
            Route("/v1/completions", self._completions, methods=["POST"]),
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models, methods=["GET"]),
            Route("/health", self._health, methods=["GET"]),
            Route("/metrics", self._metrics, methods=["GET"]),
        ])

    # ----------------------------------------------------------------------------------------- endpoints

    async def _health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", "active_slots": self.scheduler.active,
                             "queue_length": self.scheduler.queue_length})

    async def _models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [{"id": self.options.model, "object": "model", "created": 0,
                                                          "owned_by": "decodekit", "max_model_len": self.max_seq}]})

    async def _metrics(self, request: Any) -> Any:
        from starlette.responses import Response

        body, kind = self.metrics.render()
        return Response(body, media_type=kind)

    async def _completions(self, request: Any) -> Any:
        return await self._generate(request, chat=False)

    async def _chat(self, request: Any) -> Any:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Any, chat: bool) -> Any:
        endpoint = "chat" if chat else "completions"
        try:
            parsed = self._parse(await self._body(request), chat)
            stream = self.scheduler.submit(parsed.request, asyncio.get_running_loop())
        except ApiRequestError as e:
            return self._error(endpoint, api.error_body(e), e.status)
        except QueueFullError as e:
            return self._error(endpoint, api.error_body(str(e), 429), 429)
        except GenerationError as e:
            return self._error(endpoint, api.error_body(str(e), 400), 400)
        rid = api.new_id("chatcmpl" if chat else "cmpl")
        if parsed.stream:
            return self._sse(endpoint, request, stream, parsed, rid, chat)
        result = await self._collect(request, stream)
        if result.finish_reason == "error":
            return self._error(endpoint, api.error_body(f"generation failed: {result.error}", 500), 500)
        from starlette.responses import JSONResponse

        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse(api.completion_body(chat, rid, parsed.model, result.text, result.token_ids,
                                                result.finish_reason, len(parsed.request.prompt_ids)))

    # ----------------------------------------------------------------------------------------- parsing

    async def _body(self, request: Any) -> bytes:
        limit = self.options.max_body_bytes
        too_big = ApiRequestError(f"the request body is over {limit} bytes", status=413, code="body_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, body: bytes, chat: bool) -> api.Parsed:
        doc = api.parse_json(body)
        if chat:
            f = api.check_fields(doc, api.CHAT_FIELDS, ("model", "messages"))
            messages = check_messages(f["messages"])
            if self.chat is None or self.tokenizer is None:
                raise ApiRequestError("this model has no chat template (tokenizer_config.json chat_template); "
                                      "use /v1/completions", param="messages", code="no_chat_template")
            ids = self.tokenizer.encode(self.chat.render(messages), add_special_tokens=False)
        else:
            f = api.check_fields(doc, api.COMPLETION_FIELDS, ("model", "prompt"))
            ids = self._prompt_ids(f["prompt"])
        if f["model"] != self.options.model:
            raise ApiRequestError(f"the model {f['model']!r} does not exist; this server serves "
                                  f"{self.options.model!r}", param="model", status=404, code="model_not_found")
        stops = self._stop_ids(f.get("stop") or [])
        default = None if chat else self.options.completion_max_tokens
        return api.build_request(f, ids, self.max_seq, default, stops, self.options.model)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ApiRequestError("this model has no tokenizer: send the prompt as a list of token ids",
                                      param="prompt")
            return self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return list(prompt)
        raise ApiRequestError("prompt must be a string or a list of token ids (one prompt per request)",
                              param="prompt", code="invalid_value")

    def _stop_ids(self, stops: list[str]) -> list[list[int]]:
        if stops and self.tokenizer is None:
            raise ApiRequestError("stop strings need the model's tokenizer, which it lacks", param="stop")
        out = [self.tokenizer.encode(s, add_special_tokens=False) for s in stops] if stops else []
        if any(not ids for ids in out):
            raise ApiRequestError("a stop string encodes to no tokens", param="stop")
        return out

    # ----------------------------------------------------------------------------------------- responses

    def _error(self, endpoint: str, body: dict[str, Any], status: int) -> Any:
        from starlette.responses import JSONResponse

        self.metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status)

    async def _deltas(self, stream: Stream) -> AsyncIterator[Any]:
        last: dict[str, Any] = {}
        async for d in stream:
            self.metrics.observe(stream, d, last)
            yield d

    async def _collect(self, request: Any, stream: Stream) -> Completion:
        """The whole result; a client that disconnects meanwhile cancels the request."""
        async def drain() -> Completion:
            delta = await stream.finished()  # no wake-up per token
            self.metrics.observe(stream, delta, {})
            return collect(stream.submitted, iter([delta]))

        task = asyncio.ensure_future(drain())
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and not stream.cancelled and await request.is_disconnected():
                stream.cancel()
                self.metrics.disconnects.inc()
        return task.result()

    def _sse(self, endpoint: str, request: Any, stream: Stream, parsed: api.Parsed, rid: str, chat: bool) -> Any:
        from starlette.responses import StreamingResponse

        async def events() -> AsyncIterator[str]:
            completed, n = False, 0
            try:
                first = True
                async for d in self._deltas(stream):
                    if d.finish_reason == "error":
                        yield _sse(api.error_body(f"generation failed: {d.error}", 500))
                        break
                    n += len(d.token_ids)
                    if d.token_ids or d.text or d.finished or first:
                        yield _sse(api.completion_body(chat, rid, parsed.model, d.text, list(d.token_ids),
                                                       d.finish_reason, chunk=True, first=first))
                        first = False
                if parsed.include_usage:
                    body = api.completion_body(chat, rid, parsed.model, "", [], None, chunk=True)
                    body["choices"], body["usage"] = [], api.usage(len(parsed.request.prompt_ids), n)
                    yield _sse(body)
                yield "data: [DONE]\n\n"
                completed = True
            finally:
                if not completed:  # the client went away (or the server stops): free the slot now
                    stream.cancel()
                    self.metrics.disconnects.inc()

        self.metrics.requests.labels(endpoint, "200").inc()
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body)}\n\n"
