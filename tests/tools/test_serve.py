"""`decodekit serve` end to end: the official openai client against a real server subprocess on preset:tiny,
loopback only. Every good answer is compared with single-request generation (runtime.generate_ids)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the serve tests need the openai client (dev extra)")
pytest.importorskip("uvicorn", reason="decodekit serve needs uvicorn (serve extra)")

CLIENT_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen | None = None, limit_s: float = 90) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the server did not become healthy")


@pytest.fixture(scope="module")
def artifact(exported) -> Path:
    return exported("preset:tiny")


@pytest.fixture(scope="module")
def server(artifact):
    """`decodekit serve` as a subprocess: (base url, model id, Popen)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, "-m", "decodekit", "serve", str(artifact), "--port", str(port),
                             "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, proc)
        yield url, artifact.name, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def reference(artifact, one_thread):
    """Greedy ids of one prompt generated alone (the artifact's EOS ids, as the server uses)."""
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.ort_backend import OrtBackend
    from decodekit.runtime.tokenizer import generation_eos_ids

    backend = OrtBackend(artifact, intra_op_threads=1)
    eos = generation_eos_ids(artifact, backend.manifest)
    cache: dict[tuple, list[int]] = {}

    def ref(prompt: list[int], max_tokens: int) -> list[int]:
        key = (tuple(prompt), max_tokens)
        if key not in cache:
            cache[key] = generate_ids(backend, [prompt], max_tokens, eos_ids=eos)[0]
        return cache[key]

    yield ref
    backend.close()


def _client(url: str):
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=CLIENT_TIMEOUT_S)


def _ids(choice) -> list[int]:
    return list(choice.model_extra["token_ids"])


async def _stream_ids(client, model: str, prompt, max_tokens: int, **kw) -> tuple[list[int], str, str]:
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, **kw)
    ids, text, reason = [], [], None
    async for chunk in stream:
        ids += _ids(chunk.choices[0])
        text.append(chunk.choices[0].text)
        reason = chunk.choices[0].finish_reason or reason
    return ids, "".join(text), reason


def _prompts(rng: random.Random, n: int, longest: int = 60) -> list[list[int]]:
    return [[rng.randrange(3, 500) for _ in range(rng.randint(1, longest))] for _ in range(n)]


def _metrics(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _post(url: str, path: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=CLIENT_TIMEOUT_S) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _oversized(url: str) -> tuple[int, dict]:
    """A body declared at 3 MB (over the 1 MiB default limit): the server answers before reading it."""
    import http.client

    host, port = url.rsplit("/", 1)[-1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=CLIENT_TIMEOUT_S)
    conn.putrequest("POST", "/v1/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(3 << 20))
    conn.endheaders(b'{"prompt": "' + b"x" * 1000)
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


def test_16_staggered_streaming_clients_match_single_request_generation(server, reference, artifact) -> None:
    url, model, _ = server
    rng = random.Random(0)
    prompts = _prompts(rng, 16)
    budgets = [rng.randint(4, 40) for _ in prompts]

    async def one(i: int, client) -> tuple[list[int], str, str]:
        await asyncio.sleep(0.03 * i)  # arrivals while earlier requests are mid-generation
        return await _stream_ids(client, model, prompts[i], budgets[i])

    async def main():
        async with _client(url) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(i, client) for i in range(16))), 120)

    results = asyncio.run(main())
    for p, n, (ids, _, reason) in zip(prompts, budgets, results):
        assert ids == reference(p, n)
        assert reason == ("length" if len(ids) == n else "stop")


def test_text_completion_matches_decodekit_generate(server, artifact) -> None:
    """Text prompts, not streamed: the same ids and text as `decodekit generate --json` prints."""
    url, model, _ = server
    texts = ["hello world", "the quick brown fox"]
    out = subprocess.run([sys.executable, "-m", "decodekit", "generate", str(artifact), *sum((["--prompt", t]
                          for t in texts), []), "--max-new-tokens", "12", "--json"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert out.returncode == 0, out.stderr
    expected = json.loads(out.stdout)

    async def main():
        async with _client(url) as client:
            return [await client.completions.create(model=model, prompt=t, max_tokens=12, temperature=0)
                    for t in texts]

    for b, r in enumerate(asyncio.run(main())):
        assert _ids(r.choices[0]) == expected["tokens"][b]
        assert r.choices[0].text == expected["text"][b]
        assert r.usage.completion_tokens == len(expected["tokens"][b])


BAD_REQUESTS = [  # (openai kwargs, expected status, param)
    (dict(prompt=[5, 6], max_tokens=10, temperature=3.0), 400, "temperature"),
    (dict(prompt=[5, 6], max_tokens=255), 400, "max_tokens"),
    (dict(prompt="", max_tokens=4), 400, "prompt"),
    (dict(prompt=[5, 6], max_tokens=4, extra_body={"bogus": 1}), 400, "bogus"),
    (dict(prompt=[5, 6], max_tokens=4, extra_body={"top_k": "many"}), 400, "top_k"),
    (dict(prompt=[5, 6], max_tokens=4, top_p=1.5), 400, "top_p"),
    (dict(prompt=[5, 99999], max_tokens=4), 400, None),
    (dict(prompt=[5, 6], max_tokens=0), 400, "max_tokens"),
    (dict(prompt=[5, 6], max_tokens=4, n=2), 400, "n"),
    (dict(prompt=[5, 6], max_tokens=4, model="no-such-model"), 404, "model"),
]


async def _bad(client, model: str, kw: dict) -> tuple[int, dict]:
    kw = {"model": model, **kw}
    try:
        await client.completions.create(**kw)
    except openai.APIStatusError as e:
        return e.status_code, e.body
    raise AssertionError(f"accepted a bad request: {kw}")


def test_bad_requests_get_openai_errors(server) -> None:
    url, model, _ = server

    async def main():
        async with _client(url) as client:
            return [await _bad(client, model, kw) for kw, _, _ in BAD_REQUESTS]

    for (kw, status, param), (got, body) in zip(BAD_REQUESTS, asyncio.run(main())):
        assert got == status, (kw, body)
        assert set(body) >= {"message", "type", "param", "code"} and body["message"], body
        assert body["param"] == param, (kw, body)
    assert _post(url, "/v1/completions", b"{not json")[0] == 400
    assert _post(url, "/v1/completions", b"[1, 2]")[0] == 400
    status, body = _oversized(url)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    status, body = _post(url, "/v1/chat/completions",
                         json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert status == 400 and body["error"]["code"] == "no_chat_template"


def test_load_200_requests_32_clients_with_disconnects_and_bad_requests(server, reference) -> None:
    """Every good request gets its full greedy answer, every bad one its 4xx, disconnects free their slots, nothing
    hangs, memory stays flat and /metrics counts what was sent."""
    import psutil

    url, model, proc = server
    rng = random.Random(1)
    kinds = ["good"] * 160 + ["disconnect"] * 20 + ["bad"] * 20  # good ones alternate streamed / not
    rng.shuffle(kinds)
    prompts = _prompts(rng, len(kinds), longest=80)
    budgets = [rng.randint(1, 24) for _ in kinds]
    before = _metrics(url)
    rss_before = psutil.Process(proc.pid).memory_info().rss
    queue: asyncio.Queue[int] | None = None
    results: dict[int, object] = {}

    async def run(i: int, client) -> object:
        kind, p, n = kinds[i], prompts[i], budgets[i]
        if kind == "bad":
            return await _bad(client, model, BAD_REQUESTS[i % len(BAD_REQUESTS)][0])
        if kind == "disconnect":
            stream = await client.completions.create(model=model, prompt=p, max_tokens=150, temperature=0,
                                                     stream=True)
            async for chunk in stream:
                finished = chunk.choices[0].finish_reason is not None
                break
            await stream.close()
            return finished
        if i % 2:
            return (await _stream_ids(client, model, p, n))[0]
        r = await client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0)
        return _ids(r.choices[0])

    async def worker(client) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            results[i] = await run(i, client)

    async def main():
        nonlocal queue
        queue = asyncio.Queue()
        for i in range(len(kinds)):
            queue.put_nowait(i)
        async with _client(url) as client:
            await asyncio.wait_for(asyncio.gather(*(worker(client) for _ in range(32))), 240)

    asyncio.run(main())
    assert len(results) == len(kinds)
    bad_codes: dict[str, int] = {}
    for i, kind in enumerate(kinds):
        if kind == "good":
            assert results[i] == reference(prompts[i], budgets[i]), i
        elif kind == "bad":
            status = BAD_REQUESTS[i % len(BAD_REQUESTS)][1]
            assert results[i][0] == status
            bad_codes[str(status)] = bad_codes.get(str(status), 0) + 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_metrics(url)[("decodekit_active_slots", ())] or
                                           _metrics(url)[("decodekit_queue_length", ())]):
        time.sleep(0.1)
    after = _metrics(url)
    assert after[("decodekit_active_slots", ())] == 0 and after[("decodekit_queue_length", ())] == 0

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    n_disc = kinds.count("disconnect")
    early = sum(1 for i, k in enumerate(kinds) if k == "disconnect" and results[i])
    assert grew("decodekit_requests_total", endpoint="completions", code="200") == kinds.count("good") + n_disc
    for code, count in bad_codes.items():
        assert grew("decodekit_requests_total", endpoint="completions", code=code) == count
    # a disconnect is seen at the server's next write; a request that ends before that is simply complete
    assert (n_disc - early) // 2 <= grew("decodekit_client_disconnects_total") <= n_disc - early
    good_tokens = sum(len(results[i]) for i, k in enumerate(kinds) if k == "good")
    assert grew("decodekit_generated_tokens_total") >= good_tokens
    assert grew("decodekit_time_to_first_token_seconds_count") >= kinds.count("good")
    rss_after = psutil.Process(proc.pid).memory_info().rss
    assert rss_after - rss_before < 64 << 20, (rss_before, rss_after)


def test_queue_overflow_gets_429_and_chat_uses_the_template(artifact, tmp_path, one_thread) -> None:
    """An in-process server (uvicorn in a thread) with one slot and no queue, on a copy of the artifact whose
    tokenizer_config.json has a chat template."""
    import shutil
    from dataclasses import replace

    import uvicorn

    from decodekit.export.manifest import file_entry, read_manifest, write_manifest
    from decodekit.runtime.generate import generate_ids
    from decodekit.tools.serve_cmd import build_server

    folder = tmp_path / "chat-tiny"
    shutil.copytree(artifact, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    manifest = read_manifest(folder, verify=False)
    write_manifest(folder, replace(manifest, tokenizer=[file_entry(folder, f.file) for f in manifest.tokenizer]))

    srv, backend = build_server(folder, slots=1, max_queue=0, model_name="m", threads=1)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(srv.app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url)
        messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]

        async def main():
            async with _client(url) as client:
                long = await client.completions.create(model="m", prompt=[5, 6], max_tokens=250, temperature=0,
                                                       stream=True)
                first = await long.__anext__()
                refused = await _bad(client, "m", dict(prompt=[7], max_tokens=2))
                await long.close()
                await asyncio.sleep(0.5)  # the cancelled stream's slot is freed before the engine's next step
                chat = await client.chat.completions.create(model="m", messages=messages, max_tokens=8,
                                                            temperature=0)
                return first, refused, chat

        first, refused, chat = asyncio.run(asyncio.wait_for(main(), 60))
        assert refused[0] == 429 and refused[1]["type"] == "rate_limit_exceeded"
        if len(generate_ids(backend, [[5, 6]], 250, eos_ids=srv.scheduler.eos_ids)[0]) == 250:
            # the client left after its first chunk: the request was cancelled, its slot freed at once
            assert srv.metrics.disconnects._value.get() == 1
            assert srv.scheduler.tokens_generated < 250 + 8
        prompt = srv.tokenizer.encode("<system>be brief\n<user>hi there\n<assistant>", add_special_tokens=False)
        expected = generate_ids(backend, [prompt], 8, eos_ids=srv.scheduler.eos_ids)[0]
        assert _ids(chat.choices[0]) == expected
        assert chat.choices[0].message.role == "assistant"
        assert chat.choices[0].message.content == srv.tokenizer.decode(expected)
    finally:
        uv.should_exit = True
        thread.join(timeout=20)
        srv.scheduler.close()
        backend.close()
