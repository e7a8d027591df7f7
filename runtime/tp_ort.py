"""Tensor-parallel ONNX Runtime backend: one process per rank runs its graph's segments, all-reducing between them.

    rank r:  seg0 -> all_reduce(partial0) -> seg1 -> all_reduce(partial1) -> ... -> seg2L (final norm + lm_head)

ONNX Runtime has no collective ops, so ``graphs.tp_partition`` cuts each rank graph at its DistCollective
nodes (in memory, at load) and the all-reduce is done here with torch.distributed (gloo on the CPU, NCCL on
GPUs). Every buffer a segment reads or writes is a torch tensor on the device, bound to IOBinding by address:
step inputs, the KV caches (bound as past AND present, updated in place), the cross-segment slots planned by
``plan_storage`` (the partial sum is all-reduced in place in its slot, which the next segment reads as the
collective's output), and the logits. On CUDA, ONNX Runtime runs on PyTorch's current stream and does not
synchronize after each run, so segments, NCCL all-reduces and the sampler are ordered on the device without
host round trips; the host waits only when it reads the sampled tokens.

Leader / followers: rank 0 runs the decode loop (``runtime.generate``) with this backend and streams the tokens;
every ``allocate``/``step`` first broadcasts a small int64 control message (op, batch, seq, the step's inputs:
for a decode step these are rank 0's sampled tokens), which the other ranks execute in ``serve()``. So every
rank feeds the model rank 0's token by construction, whatever the numerics; ``close()`` on rank 0 stops them.
Followers skip the trailing segment that only computes logits (the replicated lm_head).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes
from ..errors import TpError  # noqa: F401 - re-exported
from ..export.manifest import Manifest
from .backend import Backend, BackendError, StepState, register
from .iobinding import bind_tensor
from .ort_backend import STEP_INPUTS, OrtOptions, create_session

OP_ALLOCATE, OP_STEP, OP_STOP = 1, 2, 3
HEADER = 4  # op, batch, seq, reserved


# ------------------------------------------------------------------------------------------------------ group


@dataclass
class TpStats:
    """All-reduce accounting of one rank (CUDA times come from events, read by ``allreduce_ms``)."""

    steps: int = 0
    allreduce_calls: int = 0
    allreduce_s: float = 0.0  # host wall time (CPU: the all-reduce itself; CUDA: only the enqueue)
    events: list[tuple[Any, Any]] = field(default_factory=list)

    def allreduce_ms(self) -> float:
        """Total all-reduce time in ms (device time between events on CUDA when profiled)."""
        if self.events:
            return sum(a.elapsed_time(b) for a, b in self.events)
        return self.allreduce_s * 1e3

    def reset(self) -> None:
        self.steps, self.allreduce_calls, self.allreduce_s, self.events = 0, 0, 0.0, []


class Group:
    """The tensor-parallel group as this backend uses it: in-place sum, and broadcast from rank 0."""

    def __init__(self, rank: int = 0, world: int = 1, device: str = "cpu", profile: bool = False) -> None:
        self.rank, self.world, self.device, self.profile = rank, world, device, profile
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
        if self.world == 1:
            return
        import torch.distributed as dist

        self.stats.allreduce_calls += 1
        start = time.perf_counter()
        if self.profile and self.device != "cpu":
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
        if self.world > 1:
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


def _gist(e: BaseException) -> str:
    """The useful part of a gloo/NCCL error: no source location, no boilerplate."""
    import re

    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    text = re.sub(r"^\[[^\]]*\]\s*", "", text).split(" This is typically")[0]
    return text[:200]


# --------------------------------------------------------------------------------------------------- bindings


@dataclass
class _Bound:
    """IOBindings of every segment for one (batch, seq) shape, and the tensors they point at."""

    seq: int
    bindings: list[Any]
    inputs: dict[str, Any]  # step input name -> torch tensor
    logits: Any  # torch tensor; what step() returns is `result`
    result: Any  # CPU: np.ndarray view of the logits tensor; CUDA: the tensor
    reduce: list[list[Any]]  # per segment: slot tensors to all-reduce after it
    keep: list[Any]  # slot tensors (alive as long as the bindings)


@dataclass
class TpHandles:
    caches: dict[str, Any]  # past name -> torch tensor (present names map to the same tensors)
    decode: _Bound
    prefill: _Bound | None = None


def _on_torch_stream(options: OrtOptions) -> OrtOptions:
    """CUDA: run ONNX Runtime on torch's current stream (a dedicated one if that is the legacy default stream),
    so NCCL all-reduces and torch sampling are ordered with the segments without host synchronization."""
    import torch

    torch.cuda.set_device(options.device_id)
    stream = torch.cuda.current_stream()
    if stream.cuda_stream == 0:
        stream = torch.cuda.Stream()
        torch.cuda.set_stream(stream)
    provider = {"user_compute_stream": str(stream.cuda_stream), "has_user_compute_stream": "1",
                **options.provider_options}
    return replace(options, provider_options=provider)


def _weight_tensor(tensor: Any, device: str) -> Any:
    """An initializer's data as one torch tensor on `device` (a copy: the rank's only one)."""
    import torch

    a = np.asarray(tensor.numpy())
    if a.dtype.name == "bfloat16":  # ml_dtypes: torch reads the bits
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16).to(device)
    return torch.from_numpy(np.array(a, copy=True)).to(device)


def _session(model: bytes, folder: Path, options: OrtOptions) -> Any:
    """An InferenceSession of one segment (bytes; external initializers resolved in the artifact folder).

    2L+1 sessions, one running at a time: idle pools must not spin and steal the cores (CPU), and on CUDA the
    host side only runs shape arithmetic, so one thread per session (not one pool of all cores per session).
    """
    if options.device == "cuda" and not options.intra_op_threads:
        options = replace(options, intra_op_threads=1)
    config = {"session.model_external_initializers_file_folder_path": str(folder),
              "session.intra_op.allow_spinning": "0"}
    return create_session(model, options, config, what="a tensor-parallel segment")


# ---------------------------------------------------------------------------------------------------- backend


@register("ort-tp")
class TpOrtBackend(Backend):
    """One rank of a tp=N artifact (N = the group's world size); rank 0 leads, the others ``serve()``."""

    options_type = OrtOptions
    options: OrtOptions

    def __init__(self, artifact: str | Path, options: OrtOptions | None = None, *, manifest: Manifest | None = None,
                 group: Group | None = None, partition: Any = None, **overrides: Any) -> None:
        self.group = group or Group()
        self.partition = partition  # None: cut the rank graph at its collectives (in _setup)
        super().__init__(artifact, options, manifest=manifest, rank=self.group.rank, **overrides)

    def _setup(self) -> None:
        import onnx_ir as ir

        from ..graphs.tp_partition import initializer_bytes, partition as cut, plan_storage, segment_bytes

        if self.partition is None and self.manifest.tp != self.group.world:
            raise TpError(f"{self.artifact} has tp={self.manifest.tp} but the process group has {self.group.world} "
                          f"rank(s); run it with `decodekit launch {self.artifact} --nproc {self.manifest.tp}`")
        if self.options.cuda_graph:
            raise BackendError(f"{self.artifact}: the ort-tp backend does not capture CUDA graphs yet; run without "
                               f"--cuda-graph (cuda_graph=True)")
        if self.options.device == "cuda":
            self.options = _on_torch_stream(self.options)
            self.group.device = f"cuda:{self.options.device_id}"
            self.device = self._torch().device(self.group.device)
        if self.partition is None:
            self.partition = cut(ir.load(str(self.manifest.rank_file(self.artifact, self.rank))))
        self.plan = plan_storage(self.partition)
        self._active = self._follower_segments() if self.rank else len(self.partition.segments)
        used = {n for seg in self.partition.segments[:self._active] for n in seg.inputs}
        self.weights = {n: _weight_tensor(t, self.group.device)  # one tensor per rank, bound to every segment
                        for n, t in self.partition.shared_weights.items() if n in used}
        self.run_options = self._run_options()
        self.sessions = [_session(segment_bytes(s), self.artifact, self.options)
                         for s in self.partition.segments[:self._active]]
        # (name, bytes) of every weight copy this rank holds: each session's initializers, then the shared tensors
        self.held_weights = [*((n, b) for s in self.partition.segments[:self._active]
                               for n, b in initializer_bytes(s).items()),
                             *((n, t.numel() * t.element_size()) for n, t in self.weights.items())]
        self.partition = self.partition.without_weights()
        batch_dim, seq_dim = self.partition.tensors["input_ids"].shape
        self._dims = (batch_dim, seq_dim)
        self._ctrl = self._torch().zeros(HEADER + 4 * self.max_batch, dtype=self._torch().int64,
                                         device=self.group.device)
        self._stopped = False

    # ------------------------------------------------------------------------------------------- helpers

    @staticmethod
    def _torch() -> Any:
        import torch

        return torch

    @property
    def stats(self) -> TpStats:
        return self.group.stats

    def _run_options(self) -> Any:
        if self.options.device != "cuda":
            return None  # onnxruntime 1.32's Python wrapper spends ~0.2 ms per run probing unset run options
        import onnxruntime as ort

        ro = ort.RunOptions()
        ro.add_run_config_entry("disable_synchronize_execution_providers", "1")  # ordered on torch's stream
        ro.add_run_config_entry("gpu_graph_id", "-1")  # no graph capture; also keeps the wrapper's probe cheap
        return ro

    def _follower_segments(self) -> int:
        """Followers stop after the last segment that writes a cache, a cross tensor or a partial sum."""
        segments = self.partition.segments
        n = len(segments)
        while n > 1 and not segments[n - 1].reduce and set(segments[n - 1].outputs) <= {"logits"}:
            n -= 1
        return n

    def _empty(self, info: Any, batch: int, seq: int) -> Any:
        torch = self._torch()
        sizes = {self._dims[0]: batch, self._dims[1]: seq}
        try:
            shape = [d if isinstance(d, int) else sizes[d] for d in info.shape]
        except KeyError as e:
            raise TpError(f"{info.name}: dimension {e.args[0]!r} is neither batch nor seq; "
                          f"cannot size its buffer") from None
        return torch.empty(shape, dtype=dtypes.dtype(info.dtype).torch, device=self.group.device)

    # ---------------------------------------------------------------------------------------- allocation

    def _allocate(self, batch: int) -> StepState:
        if self.rank == 0 and self.group.world > 1:
            self._send(OP_ALLOCATE, batch, 0, None)
        return self._local_allocate(batch)

    def _local_allocate(self, batch: int) -> StepState:
        caches = {}
        for name in self.partition.graph_inputs:
            if name.startswith("past_key_values."):
                caches[name] = self._empty(self.partition.tensors[name], batch, 0).zero_()
        return StepState(batch, self.max_seq, TpHandles(caches, self._bound(caches, batch, 1)))

    def _tensor_for(self, caches: dict[str, Any], name: str, inputs: dict[str, Any], slots: list[Any],
                    logits: Any) -> Any:
        if name in inputs:
            return inputs[name]
        if name in self.weights:
            return self.weights[name]
        if name.startswith("present."):
            name = "past_key_values." + name[len("present."):]
        if name in caches:
            return caches[name]
        if name == "logits":
            return logits
        return slots[self.plan.slot_of[name]]

    def _bound(self, caches: dict[str, Any], batch: int, seq: int) -> _Bound:
        t = self.partition.tensors
        inputs = {n: self._empty(t[n], batch, seq).zero_() for n in STEP_INPUTS}
        slots = [self._empty(s, batch, seq) for s in self.plan.slots]
        computes_logits = self._active == len(self.partition.segments)
        logits = self._empty(t["logits"], batch, seq) if computes_logits else None
        bindings, reduce = [], []
        for seg, session in zip(self.partition.segments[:self._active], self.sessions):
            b = session.io_binding()
            for name in seg.inputs:
                bind_tensor(b, name, self._tensor_for(caches, name, inputs, slots, logits), output=False)
            for name in seg.outputs:
                bind_tensor(b, name, self._tensor_for(caches, name, inputs, slots, logits), output=True)
            bindings.append(b)
            reduce.append([slots[self.plan.slot_of[n]] for n in seg.reduce])
        result = logits.numpy() if self.options.device == "cpu" and logits is not None else logits
        return _Bound(seq, bindings, inputs, logits, result, reduce, slots)

    # ---------------------------------------------------------------------------------------------- step

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        B, S = input_ids.shape
        arrays = (input_ids, position_ids, write_indices, nonpad_kv_seqlen)
        if self.rank == 0 and self.group.world > 1:
            self._send(OP_STEP, B, S, arrays)
        return self._run(state, arrays)

    def _run(self, state: StepState, arrays: tuple[np.ndarray, ...]) -> Any:
        h: TpHandles = state.handles
        B, S = arrays[0].shape
        if S == 1:
            bound = h.decode
        else:
            if h.prefill is None or h.prefill.seq != S:
                h.prefill = self._bound(h.caches, B, S)
            bound = h.prefill
        self._load(bound, arrays)
        for k, (session, binding) in enumerate(zip(self.sessions, bound.bindings)):
            session.run_with_iobinding(binding, self.run_options)
            for t in bound.reduce[k]:
                self.group.all_reduce(t, f"after segment {k}")
        self.group.stats.steps += 1
        return bound.result  # None on followers, which skip the logits segment

    def _load(self, bound: _Bound, arrays: tuple[np.ndarray, ...]) -> None:
        """Write the step's int64 inputs into the bound input tensors (views on the CPU, one copy each on CUDA)."""
        for name, a in zip(STEP_INPUTS, arrays):
            t = bound.inputs[name]
            if self.options.device == "cpu":
                np.copyto(t.numpy(), np.reshape(a, t.shape), casting="same_kind")
            else:
                t.copy_(self._torch().from_numpy(np.ascontiguousarray(np.reshape(a, t.shape), dtype=np.int64)))

    # ----------------------------------------------------------------------------------- control channel

    def _send(self, op: int, batch: int, seq: int, arrays: tuple[np.ndarray, ...] | None) -> None:
        torch = self._torch()
        msg = np.zeros(self._ctrl.numel(), dtype=np.int64)
        msg[:HEADER] = (op, batch, seq, 0)
        extra = None
        if arrays is not None:
            flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
            if seq == 1:
                msg[HEADER:HEADER + flat.size] = flat
            else:
                extra = torch.from_numpy(flat).to(self.group.device)
        self._ctrl.copy_(torch.from_numpy(msg))
        self.group.broadcast(self._ctrl, "control")
        if extra is not None:
            self.group.broadcast(extra, "prefill inputs")

    def _receive(self) -> tuple[int, int, int, tuple[np.ndarray, ...] | None]:
        torch = self._torch()
        self.group.broadcast(self._ctrl, "waiting for rank 0")
        msg = self._ctrl.cpu().numpy()
        op, batch, seq = (int(x) for x in msg[:3])
        if op != OP_STEP:
            return op, batch, seq, None
        n = batch * seq
        if seq == 1:
            flat = msg[HEADER:HEADER + 4 * batch]
        else:
            buf = torch.empty(2 * n + 2 * batch, dtype=torch.int64, device=self.group.device)
            self.group.broadcast(buf, "prefill inputs")
            flat = buf.cpu().numpy()
        ids, pos = flat[:n].reshape(batch, seq), flat[n:2 * n].reshape(batch, seq)
        return op, batch, seq, (ids, pos, flat[2 * n:2 * n + batch], flat[2 * n + batch:2 * n + 2 * batch])

    def serve(self) -> int:
        """Follower loop: execute rank 0's allocate/step commands until it stops; returns the steps run."""
        if self.rank == 0:
            raise TpError("rank 0 leads the decode loop; only ranks > 0 serve")
        state, steps = None, 0
        while True:
            op, batch, seq, arrays = self._receive()
            if op == OP_STOP:
                return steps
            if op == OP_ALLOCATE:
                state = self._local_allocate(batch)
            elif op == OP_STEP and state is not None and arrays is not None:
                self._run(state, arrays)
                steps += 1
            else:
                raise TpError(f"rank {self.rank}: unexpected control message {op} (batch {batch}, seq {seq})")

    def close(self) -> None:
        """Rank 0: tell the followers to stop (best effort: a dead group is not an error while closing)."""
        if self.rank == 0 and self.group.world > 1 and not self._stopped and not self.group.broken:
            self._stopped = True
            try:
                self._send(OP_STOP, 0, 0, None)
            except TpError:
                pass
        self.sessions = []
