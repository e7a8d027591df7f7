"""A function of torch (and ONNX Runtime) work on one CUDA stream, captured once as a CUDA graph and replayed.

``CapturedStep(fn, stream, restore, generators)`` runs ``fn`` ``warmup`` times on ``stream`` (lazy handles,
workspaces, ONNX Runtime's arena), puts back the tensors in ``restore`` and the generators' states (warm-up
must not count as steps), captures one ``fn`` on the same stream and replays it there. The stream must be
the one every kernel of ``fn`` is launched on: ONNX Runtime's session is given it as its compute stream
(runtime/ort_backend.py), so its kernels land in the capture too. Seeded sampling inside a replay draws what
the eager sampler draws, because the generators are registered with the graph
(``CUDAGraph.register_generator_state``). ``fn``'s outputs are static tensors, overwritten by each replay.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence


def can_capture_generators() -> bool:
    """True when this torch lets a CUDA graph advance a generator (seeded sampling inside a replay)."""
    import torch

    return hasattr(torch.cuda.CUDAGraph, "register_generator_state")


def _capture_mode() -> str:
    """"thread_local" when a torch.distributed process group exists: its watchdog thread polls the events of
    earlier collectives, which a "global" capture would forbid (a captured tensor-parallel step); else torch's
    default, "global"."""
    import torch.distributed as dist

    return "thread_local" if dist.is_available() and dist.is_initialized() else "global"


class CapturedStep:
    def __init__(self, fn: Callable[[], Any], stream: Any, restore: Sequence[Any] = (),
                 generators: Sequence[Any] = (), warmup: int = 2) -> None:
        import torch

        self._stream = stream
        with torch.cuda.stream(stream):
            saved = [t.clone() for t in restore]
            states = [g.get_state() for g in generators]
            for _ in range(warmup):
                fn()
            for t, s in zip(restore, saved):
                t.copy_(s)
            for g, s in zip(generators, states):
                g.set_state(s)
        self.graph = torch.cuda.CUDAGraph()
        for g in generators:
            self.graph.register_generator_state(g)
        with torch.cuda.graph(self.graph, stream=stream, capture_error_mode=_capture_mode()):
            self.out = fn()

    def replay(self) -> Any:
        import torch

        with torch.cuda.stream(self._stream):
            self.graph.replay()
        return self.out
