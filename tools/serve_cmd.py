"""decodekit serve ARTIFACT [--host 127.0.0.1] [--port 8000] [--device cpu|cuda] [--max-queue N]

The backend is opened as `decodekit generate` opens it (ort, same options), and the scheduler's decode step is
the decode loop's (runtime/decode_step.py): on CUDA with an artifact that allows it (ort-gqa-static) one captured
CUDA graph, replayed every step whoever joins or leaves.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import UserError

if TYPE_CHECKING:
    from ..runtime.backend import Backend
    from .serve_app import Server


@click.command("serve")
@click.argument("artifact")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to bind (loopback by default)")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda"]))
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(0),
              help="requests waiting for a slot; more are answered 429")
@click.option("--slots", default=None, type=click.IntRange(1), help="cache rows to serve (default: max_batch)")
@click.option("--prefill-chunk", default=256, show_default=True, type=click.IntRange(1),
              help="most prompt tokens of one request per engine step")
@click.option("--rows-per-prefill", default=0, show_default=True, type=click.IntRange(0),
              help="while many rows decode, gather one new prompt per N decoding rows before a prefill run "
                   "(more tokens/s on GPUs, later first tokens; 0 = prefill each at once)")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1),
              help="larger request bodies are answered 413")
@click.option("--model-name", default=None, help="the model id clients send (default: the artifact folder's name)")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0),
              help="onnxruntime intra-op threads (0 = its default)")
def command(artifact: str, host: str, port: int, device: str, max_queue: int,
            slots: int | None, prefill_chunk: int, rows_per_prefill: int, max_body_bytes: int,
            model_name: str | None, threads: int) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API with continuous batching (Ctrl-C stops)."""
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
        import prometheus_client  # noqa: F401
    except ModuleNotFoundError as e:
        raise UserError(f"decodekit serve needs the {e.name} package: pip install 'decodekit[serve]'") from None
    _check_address(host, port)
    server, backend = build_server(artifact, device=device, max_queue=max_queue, slots=slots,
                                   prefill_chunk=prefill_chunk, rows_per_prefill=rows_per_prefill,
                                   max_body_bytes=max_body_bytes,
                                   model_name=model_name, threads=threads)
    try:
        _run(server.app(), host, port)
    finally:
        server.scheduler.close()
        backend.close()


def build_server(artifact: str | Path, device: str = "cpu", max_queue: int = 64, slots: int | None = None,
                 prefill_chunk: int = 256, rows_per_prefill: int = 0, max_body_bytes: int = 1 << 20, model_name: str | None = None,
                 threads: int = 0) -> tuple["Server", "Backend"]:
    """The Server (tools/serve_app.py) of an artifact on the ORT backend, and that backend (caller closes both)."""
    import torch

    from ..runtime.pipeline import open_backend
    from ..runtime.scheduler import Scheduler, SchedulerConfig
    from ..runtime.tokenizer import Tokenizer
    from .serve_app import Server, ServeOptions
    from .serve_chat import ChatTemplate

    if device == "cpu":
        torch.set_num_threads(1)  # per-row sampling on [1, V] rows: one thread (see runtime/decode_step.py)
    # cuda: the shared step is one captured CUDA graph where the artifact allows it (fp16/bf16 ort-gqa-static)
    backend = open_backend(artifact, "ort", device=device, intra_op_threads=threads)
    try:
        scheduler = Scheduler(backend, SchedulerConfig(max_queue=max_queue, prefill_chunk=prefill_chunk, slots=slots,
                                                               rows_per_prefill=rows_per_prefill),
                              Tokenizer.from_artifact(backend.artifact, backend.manifest))
    except BaseException:
        backend.close()
        raise
    name = model_name or Path(artifact).resolve().name
    server = Server(scheduler, scheduler.tokenizer, ChatTemplate.from_artifact(artifact),
                    ServeOptions(model=name, max_body_bytes=max_body_bytes))
    return server, backend


def _check_address(host: str, port: int) -> None:
    """Refuse an address this process cannot listen on, in one line, before loading the model."""
    import socket

    try:
        socket.create_server((host, port)).close()
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --host / --port") from None


def _run(app, host: str, port: int) -> None:
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    click.echo(f"[serve] listening on http://{host}:{port} (OpenAI API under /v1; /health, /metrics)", err=True)
    server.run()
