"""The tensor-parallel group as the ort-tp backend uses it: in-place sum, broadcast from rank 0, and accounting.

Collectives go through torch.distributed (gloo on the CPU, NCCL on GPUs). A failed collective marks the group
broken and raises TpError naming the rank and the call; the launcher names the rank that died.
``Group(world=1)`` skips every call unless ``collectives=True`` (a one-GPU run that still issues the NCCL
calls, e.g. to test them inside a captured CUDA graph).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import TpError


@dataclass
class TpStats:
    """Accounting of one rank (CUDA times come from events, read by ``allreduce_ms``). Calls made while a CUDA
    graph is captured count once; its replays are not counted."""

    steps: int = 0
    allreduce_calls: int = 0
    allreduce_s: float = 0.0  # host wall time (CPU: the all-reduce itself; CUDA: only the enqueue)
    events: list[tuple[Any, Any]] = field(default_factory=list)
    control_messages: int = 0  # host-built control messages rank 0 broadcast (allocate / prefill / decode / stop)
    step_broadcasts: int = 0  # device [5, B] decode-step messages broadcast (rank 0) or received (followers)

    def allreduce_ms(self) -> float:
        """Total all-reduce time in ms (device time between events on CUDA when profiled)."""
        if self.events:
            return sum(a.elapsed_time(b) for a, b in self.events)
        return self.allreduce_s * 1e3

    def reset(self) -> None:
        self.steps, self.allreduce_calls, self.allreduce_s, self.events = 0, 0, 0.0, []
        self.control_messages = self.step_broadcasts = 0


class Group:
    """In-place sum and broadcast from rank 0 over the default torch.distributed process group."""

    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu", profile: bool = False,
                 collectives: bool | None = None) -> None:
        self.rank, self.world, self.device, self.profile = rank, world, device, profile
        self.collectives = world > 1 if collectives is None else collectives
        self.stats = TpStats()
        self.broken = False  # a collective failed: the group cannot be used again

    @classmethod
    def from_torch(cls, device: str = "cpu", profile: bool = False) -> "Group":
        """The initialized default torch.distributed process group (see ``runtime.launch.init_group``)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise TpError("torch.distributed is not initialized; start the ranks with `decodekit launch` or torchrun")
        return cls(dist.get_rank(), dist.get_world_size(), device, profile)

    def all_reduce(self, t: Any, where: str) -> None:
        if not self.collectives:
            return
        import torch.distributed as dist

        self.stats.allreduce_calls += 1
        start = time.perf_counter()
        if self.profile and self.device != "cpu" and not _capturing():
            import torch

            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            self._call(dist.all_reduce, t, where)
            b.record()
            self.stats.events.append((a, b))
        else:
            self._call(dist.all_reduce, t, where)
        self.stats.allreduce_s += time.perf_counter() - start

    def broadcast(self, t: Any, where: str) -> None:
        if self.collectives:
            import torch.distributed as dist

            self._call(dist.broadcast, t, where, src=0)

    def _call(self, fn: Any, t: Any, where: str, **kw: Any) -> None:
        if self.broken:
            raise TpError(f"rank {self.rank}/{self.world}: the process group failed earlier; cannot {fn.__name__}")
        try:
            fn(t, **kw)
        except RuntimeError as e:  # gloo: peer closed the connection / timed out; NCCL: communicator aborted
            self.broken = True
            raise TpError(f"rank {self.rank}/{self.world}: {fn.__name__} ({where}) failed: {_gist(e)}; another rank "
                          f"died or hung (the launcher names it)") from None


def _capturing() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _gist(e: BaseException) -> str:
    """The useful part of a gloo/NCCL error: no source location, no boilerplate."""
    import re

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(" This is typically")[0]
    return text[:200]
