"""decodekit launch: tensor-parallel generation, one process per rank. Two spellings of one command:

    decodekit launch ARTIFACT [--nproc N] [launch options] [generate options]
    decodekit launch [--nproc N] [launch options] -- generate ARTIFACT [generate options]

(the second is torchrun's shape: the launcher's options, then the command each rank runs). With
``--device cuda --cuda-graph`` (ort-gqa-static at fp16/bf16 only) every rank captures its decode step as a CUDA
graph; without --cuda-graph the tensor-parallel step is not captured (opt-in, unlike `decodekit generate`).

Run as a plain command it is the launcher: it starts N copies of itself (N = the artifact's tp by default)
with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set and watches them (runtime.launch). Run with
those variables already set (by the launcher, or by torchrun:
``torchrun --nproc-per-node 2 --no-python decodekit launch ARTIFACT --ids 1,2,3``) it is one rank: rank 0
streams the tokens, the others follow. The generate options are `decodekit generate`'s (except --backend).
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ..errors import UserError
from .generate_cmd import _parse_ids, _sampling
from .generate_cmd import command as _generate

LAUNCH_ONLY = ("nproc", "timeout", "threads")


class _LaunchCommand(click.Command):
    """Accepts ``[launch options] -- generate ARTIFACT [generate options]`` by reordering it into
    ``ARTIFACT [launch options] [generate options]`` before click parses it."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, launch_argv(args))


def launch_argv(args: list[str]) -> list[str]:
    """The `-- generate ARTIFACT ...` form in the ARTIFACT-first form (other argument lists unchanged)."""
    if "--" not in args:
        return args
    cut = args.index("--")
    head, tail = args[:cut], args[cut + 1:]
    if not tail or tail[0] != "generate":
        raise UserError(f"after `--`, decodekit launch runs `generate ARTIFACT [options]`; got "
                        f"{' '.join(tail[:2]) or 'nothing'}")
    if len(tail) < 2 or tail[1].startswith("-"):
        raise UserError("`decodekit launch [options] -- generate` needs the ARTIFACT right after `generate`")
    if "--backend" in tail or any(a.startswith("--backend=") for a in tail):
        raise UserError("decodekit launch runs the ort backend on every rank; drop --backend")
    return [tail[1], *head, *tail[2:]]


@click.command("launch", cls=_LaunchCommand, context_settings={"show_default": True})
@click.argument("artifact")
@click.option("--nproc", default=0, help="ranks to start (0 = the artifact's tp)")
@click.option("--timeout", default=120.0, help="seconds a rank waits in a collective before failing")
@click.option("--threads", default=0, help="ONNX Runtime intra-op threads per rank (0 = CPU cores / ranks)")
def command(artifact: str, nproc: int, timeout: float, threads: int, **kw: Any) -> None:
    """Generate with a tensor-parallel ARTIFACT (ONNX Runtime, one process per rank, torch.distributed)."""
    from ..runtime.launch import generate_worker, launched

    request = _request(timeout, threads, **kw)  # a bad request fails here once, not in every rank
    if launched():
        generate_worker(artifact, request)
    else:
        _launcher(artifact, nproc, click.get_current_context())


# the generate options, shared with `decodekit generate` so the two never drift apart
command.params.extend(p for p in _generate.params if p.name not in ("artifact", "backend"))


def _launcher(artifact: str, nproc: int, ctx: click.Context) -> None:
    from ..export.manifest import read_manifest
    from ..runtime.launch import launch

    tp = read_manifest(artifact, verify=False).tp
    if nproc and nproc != tp:
        raise UserError(f"{artifact} has tp={tp} ranks; pass --nproc {tp} (or leave it out)")
    n = nproc or tp
    argv = [sys.executable, "-m", "decodekit.tools.cli", "launch", artifact, *_options_argv(ctx)]
    result = launch(argv, n)
    if result.returncode:
        sys.exit(result.returncode)


def _options_argv(ctx: click.Context) -> list[str]:
    """The parsed options back as command-line arguments, for the workers."""
    out: list[str] = []
    for p in ctx.command.params:
        value = ctx.params.get(p.name)
        if not isinstance(p, click.Option) or p.name == "nproc" or value is None:
            continue
        flag = p.opts[0]
        if p.is_flag:
            out += [flag] if value else p.secondary_opts[:1]  # --no-cuda-graph must reach the workers too
        elif p.multiple:
            for v in value:
                out += [flag, str(v)]
        else:
            out += [flag, str(value)]
    return out


def _request(timeout: float, threads: int, **kw: Any) -> Any:
    """The request every rank runs, from `decodekit generate`'s options (launch's and torchrun generate's)."""
    from ..runtime.launch import GenerateRequest

    prompts, ids = kw.pop("prompts"), kw.pop("ids")
    if kw.pop("chat", None) is not None or kw.pop("system", None) is not None:
        raise UserError("tensor-parallel generate takes --prompt TEXT or --ids 1,2,3; --chat / --system run "
                        "with `decodekit generate` on a tp=1 artifact")
    if bool(prompts) == bool(ids):
        raise UserError("pass --prompt TEXT or --ids 1,2,3 (repeatable for a batch), not both or neither")
    device, cuda_graph = kw.pop("device"), kw.pop("cuda_graph", None)
    if cuda_graph is not None and device != "cuda":
        raise UserError("--cuda-graph / --no-cuda-graph apply to --device cuda only")
    logprobs = kw.pop("logprobs", False)
    sampling = _sampling(logprobs=logprobs, **{k: kw.pop(k) for k in (
        "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
        "seed")})
    request = GenerateRequest(prompts=tuple(prompts), prompt_ids=tuple(map(tuple, _parse_ids(ids))) if ids else None,
                              max_new_tokens=kw.pop("max_new_tokens"), sampling=sampling, stop=tuple(kw.pop("stop")),
                              as_json=kw.pop("as_json"), device=device, threads=threads, timeout_s=timeout,
                              cuda_graph=cuda_graph, logprobs=logprobs)
    if kw:
        raise TypeError(f"options not handled by the tensor-parallel request: {sorted(kw)}")  # a bug, not a user error
    return request
