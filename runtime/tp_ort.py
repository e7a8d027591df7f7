"""Tensor-parallel ONNX Runtime backend: one process per rank runs its graph's segments, all-reducing between them.

    rank r:  seg0 -> all_reduce(partial0) -> seg1 -> all_reduce(partial1) -> ... -> seg2L (final norm + lm_head)

ONNX Runtime has no collective ops, so ``graphs.tp_partition`` cuts each rank graph at its DistCollective
nodes (in memory, at load) and the all-reduce is done with torch.distributed (runtime/tp_group.py: gloo on the
CPU, NCCL on GPUs). Every buffer a segment reads or writes is a torch tensor on the device, bound to IOBinding
by address: step inputs, the KV caches (bound as past AND present, updated in place), the shared weights (one
tensor per rank: the tied embedding), the cross-segment slots planned by ``plan_storage`` (the partial sum is
all-reduced in place in its slot, which the next segment reads as the collective's output), and the logits. On
CUDA, ONNX Runtime runs on PyTorch's current stream and does not synchronize after each run, so segments, NCCL
all-reduces and the sampler are ordered on the device without host round trips.

Leader / followers. Rank 0 runs the decode loop (``runtime.generate``, its sampler included) and the others
follow, over two channels:

    host control message, once per request:  int64 [4] (op, batch, seq, 0): allocate, prefill (its inputs
                                               follow as one int64 tensor), decode (enter the decode loop), stop
    device step message, once per decode step: the state's int64 [5, B] tensor, broadcast from rank 0: rows
                                               0-3 are the step's inputs (rank 0's sampled tokens, positions,
                                               write indices, valid lengths: ``state.inputs`` is a view of it),
                                               row 4 says go (1) or leave the decode loop (0)

A decode step on rank 0 is broadcast(message) -> segments and all-reduces -> sampler -> input advance, all on
the device: the host never waits, so the whole step can be captured as one CUDA graph (``OrtOptions(
cuda_graph=True)``, ort-gqa-static at fp16/bf16) and replayed. A follower's step is its segments and
all-reduces, then the receive of rank 0's next message (captured as one CUDA graph after two eager decode
steps when cuda_graph is on); its host reads the go row between steps (it waits for the broadcast; rank 0's host
never does). Every rank feeds the model rank 0's tokens by construction. Followers skip the trailing segment
that only computes logits (the replicated lm_head) and never sample. One state at a time: followers decode
the state rank 0 allocated last.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .. import dtypes
from ..errors import TpError
from ..export.manifest import Manifest
from .backend import Backend, BackendError, StepState, register
from .iobinding import bind_tensor
from .ort_backend import STEP_INPUTS, OrtOptions, create_session
from .tp_group import Group, TpStats

__all__ = ["Group", "TpError", "TpOrtBackend", "TpStats"]

OP_ALLOCATE, OP_PREFILL, OP_STOP, OP_DECODE = 1, 2, 3, 4
HEADER = 4  # op, batch, seq, reserved
GO_ROW = 4  # row of the [5, B] step message: 1 = run this decode step, 0 = leave the decode loop


# --------------------------------------------------------------------------------------------------- bindings


@dataclass
class _Bound:
    """IOBindings of every segment for one (batch, seq) shape, and the tensors they point at."""

    seq: int
    bindings: list[Any]
    inputs: dict[str, Any]  # step input name -> torch tensor
    logits: Any  # torch tensor (None on followers); what step() returns is `result`
    result: Any  # CPU: np.ndarray view of the logits tensor; CUDA: the tensor
    reduce: list[list[Any]]  # per segment: slot tensors to all-reduce after it
    keep: list[Any]  # slot tensors (alive as long as the bindings)


@dataclass
class TpHandles:
    caches: dict[str, Any]  # past name -> torch tensor (present names map to the same tensors)
    message: Any  # int64 [5, B] on the device: the decode step message (rows 0-3 are state.inputs)
    decode: _Bound  # its step inputs are views of message's rows
    prefill: _Bound | None = None
    graph: Any = None  # followers with cuda_graph: the captured decode segments (runtime.cuda_graph.CapturedStep)


def _on_torch_stream(options: OrtOptions) -> tuple[OrtOptions, Any]:
    """CUDA: run ONNX Runtime on torch's current stream (a dedicated one if that is the legacy default stream),
    so NCCL collectives and torch sampling are ordered with the segments without host synchronization."""
    import torch

    torch.cuda.set_device(options.device_id)
    stream = torch.cuda.current_stream()
    if stream.cuda_stream == 0:
        stream = torch.cuda.Stream()
        torch.cuda.set_stream(stream)
    provider = {"user_compute_stream": str(stream.cuda_stream), "has_user_compute_stream": "1",
                **options.provider_options}
    return replace(options, provider_options=provider), stream


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
        self.cuda_graph = self._wants_cuda_graph()
        if self.options.device == "cuda":
            self.options, self.stream = _on_torch_stream(self.options)
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
        self._ctrl = self._torch().zeros(HEADER, dtype=self._torch().int64, device=self.group.device)
        self._decoding: StepState | None = None  # rank 0: the state whose decode messages the followers await
        self._stopped = False

    def _wants_cuda_graph(self) -> bool:
        """Opt-in (``cuda_graph=True``): capture needs a step that reads no value on the host and runs every node
        on the GPU: an ort-gqa-static artifact at fp16/bf16."""
        m = self.manifest
        if not self.options.cuda_graph:
            return False
        if not m.cuda_resident():
            raise BackendError(f"{self.artifact}: a {m.dtype} {m.dialect} step runs GroupQueryAttention on the CPU "
                               f"(onnxruntime-gpu has fp16/bf16 kernels only), so it cannot be captured as a CUDA "
                               f"graph; re-optimize with --dtype fp16 or run without --cuda-graph")
        if not m.allows("host_free_decode"):
            raise BackendError(f"{self.artifact}: the {m.dialect} dialect reads lengths on the host every decode "
                               f"step, so a captured CUDA graph would replay stale lengths; re-optimize with "
                               f"--dialect ort-gqa-static or run without --cuda-graph")
        return True

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
        ro.add_run_config_entry("gpu_graph_id", "-1")  # no ORT graph capture (torch captures); cheap probe
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
        self._leave()
        self._send(OP_ALLOCATE, batch, 0)
        return self._local_allocate(batch)

    def _local_allocate(self, batch: int) -> StepState:
        torch = self._torch()
        caches = {}
        for name in self.partition.graph_inputs:
            if name.startswith("past_key_values."):
                caches[name] = self._empty(self.partition.tensors[name], batch, 0).zero_()
        message = torch.zeros(GO_ROW + 1, batch, dtype=torch.int64, device=self.group.device)
        message[GO_ROW] = 1
        views = {"input_ids": message[0].view(batch, 1), "position_ids": message[1].view(batch, 1),
                 "write_indices": message[2], "nonpad_kv_seqlen": message[3]}
        state = StepState(batch, self.max_seq, TpHandles(caches, message, self._bound(caches, batch, 1, views)))
        state.inputs = message[:GO_ROW]  # the decode loop's [4, B] inputs are the message's first rows
        return state

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

    def _bound(self, caches: dict[str, Any], batch: int, seq: int, inputs: dict[str, Any] | None = None) -> _Bound:
        t = self.partition.tensors
        inputs = inputs or {n: self._empty(t[n], batch, seq).zero_() for n in STEP_INPUTS}
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

    # ---------------------------------------------------------------------------------------------- steps

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        """Rank 0 from host arrays: a prefill (one control message), or a decode step (its inputs written into
        the state's message, then run as the decode loop runs one)."""
        B, S = input_ids.shape
        arrays = (input_ids, position_ids, write_indices, nonpad_kv_seqlen)
        if S == 1:
            torch = self._torch()
            flat = np.stack([np.reshape(a, B) for a in arrays]).astype(np.int64)
            state.inputs.copy_(torch.from_numpy(flat))
            self._decode(state)
            return state.handles.decode.result
        self._leave()
        self._send(OP_PREFILL, B, S, arrays)
        h: TpHandles = state.handles
        if h.prefill is None or h.prefill.seq != S:
            h.prefill = self._bound(h.caches, B, S)
        self._load(h.prefill, arrays)
        self._segments(h.prefill)
        self._decoding = state  # the followers now wait for this state's decode messages
        return h.prefill.result

    def run_decode(self, state: StepState) -> Any:
        """Rank 0: one decode step reading ``state.inputs`` on the device (broadcast to the followers first);
        returns the [B, 1, V] logits buffer. No host synchronization: capturable as a CUDA graph."""
        if self.rank:
            raise TpError("rank 0 leads the decode loop; ranks > 0 serve()")
        self._decode(state)
        return state.handles.decode.logits

    def capturable(self, state: StepState) -> bool:
        return self.cuda_graph and self.rank == 0

    def _decode(self, state: StepState) -> None:
        h: TpHandles = state.handles
        if self._decoding is not state:
            self._leave()
            self._send(OP_DECODE, state.batch, 1)
            self._decoding = state
        if self.group.collectives:
            self.group.broadcast(h.message, "decode step")  # rank 0's tokens and inputs, device to device
            self.group.stats.step_broadcasts += 1
        self._segments(h.decode)

    def _segments(self, bound: _Bound) -> None:
        for k, (session, binding) in enumerate(zip(self.sessions, bound.bindings)):
            session.run_with_iobinding(binding, self.run_options)
            for t in bound.reduce[k]:
                self.group.all_reduce(t, f"after segment {k}")
        self.group.stats.steps += 1

    def _load(self, bound: _Bound, arrays: tuple[np.ndarray, ...]) -> None:
        """Write a prefill's int64 inputs into the bound input tensors (views on the CPU, one copy each on CUDA)."""
        for name, a in zip(STEP_INPUTS, arrays):
            t = bound.inputs[name]
            if self.options.device == "cpu":
                np.copyto(t.numpy(), np.reshape(a, t.shape), casting="same_kind")
            else:
                t.copy_(self._torch().from_numpy(np.ascontiguousarray(np.reshape(a, t.shape), dtype=np.int64)))

    # ----------------------------------------------------------------------------------- control channel

    def _leave(self) -> None:
        """Rank 0: end the followers' decode loop (a step message with go = 0) before the next control message."""
        if self._decoding is not None and self.group.collectives:
            message = self._torch().zeros_like(self._decoding.handles.message)
            self.group.broadcast(message, "end of decode")
            self.group.stats.step_broadcasts += 1
        self._decoding = None

    def _send(self, op: int, batch: int, seq: int, arrays: tuple[np.ndarray, ...] | None = None) -> None:
        if self.rank or not self.group.collectives:
            return
        torch = self._torch()
        self._ctrl.copy_(torch.tensor([op, batch, seq, 0], dtype=torch.int64))
        self.group.broadcast(self._ctrl, "control")
        self.group.stats.control_messages += 1
        if arrays is not None:
            flat = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
            self.group.broadcast(torch.from_numpy(flat).to(self.group.device), "prefill inputs")

    def _receive(self) -> tuple[int, int, int, tuple[np.ndarray, ...] | None]:
        torch = self._torch()
        self.group.broadcast(self._ctrl, "waiting for rank 0")
        op, batch, seq = (int(x) for x in self._ctrl.cpu().numpy()[:3])
        if op != OP_PREFILL:
            return op, batch, seq, None
        n = batch * seq
        buf = torch.empty(2 * n + 2 * batch, dtype=torch.int64, device=self.group.device)
        self.group.broadcast(buf, "prefill inputs")
        flat = buf.cpu().numpy()
        ids, pos = flat[:n].reshape(batch, seq), flat[n:2 * n].reshape(batch, seq)
        return op, batch, seq, (ids, pos, flat[2 * n:2 * n + batch], flat[2 * n + batch:2 * n + 2 * batch])

    def serve(self) -> int:
        """Follower loop: execute rank 0's requests until it stops; returns the steps run."""
        if self.rank == 0:
            raise TpError("rank 0 leads the decode loop; only ranks > 0 serve")
        state, steps = None, 0
        while True:
            op, batch, seq, arrays = self._receive()
            if op == OP_STOP:
                return steps
            if op == OP_ALLOCATE:
                state = self._local_allocate(batch)
                continue
            if state is None or op not in (OP_PREFILL, OP_DECODE) or batch != state.batch:
                raise TpError(f"rank {self.rank}: unexpected control message {op} (batch {batch}, seq {seq})")
            if op == OP_PREFILL:
                h: TpHandles = state.handles
                if h.prefill is None or h.prefill.seq != seq:
                    h.prefill = self._bound(h.caches, batch, seq)
                self._load(h.prefill, arrays)
                self._segments(h.prefill)
                steps += 1
            steps += self._follow(state)

    def _follow(self, state: StepState) -> int:
        """Decode steps until rank 0 leaves the decode loop. A step runs the segments, then receives rank 0's next
        [5, B] message on the device (the same order of collectives as rank 0's: message, segments, message, ...);
        the host reads its go row before the next step. With cuda_graph, the step (segments, all-reduces, the
        receive) is captured after two eager steps and replayed."""
        h: TpHandles = state.handles
        self._receive_step(h)
        steps = 0
        while int(h.message[GO_ROW, 0]):  # this rank's host waits for the message; rank 0's never does
            if self.cuda_graph and steps >= 2 and h.graph is None:  # two eager steps warmed ORT's arena up
                from .cuda_graph import CapturedStep

                h.graph = CapturedStep(lambda: self._follower_step(h), self.stream, warmup=0)
                self.captured_steps += 1
            if h.graph is not None:
                h.graph.replay()
            else:
                self._follower_step(h)
            steps += 1
        return steps

    def _follower_step(self, h: TpHandles) -> None:
        self._segments(h.decode)
        self._receive_step(h)

    def _receive_step(self, h: TpHandles) -> None:
        self.group.broadcast(h.message, "waiting for rank 0's decode step")
        self.group.stats.step_broadcasts += 1

    def close(self) -> None:
        """Rank 0: tell the followers to stop (best effort: a dead group is not an error while closing)."""
        if self.rank == 0 and self.group.collectives and not self._stopped and not self.group.broken:
            self._stopped = True
            try:
                self._leave()
                self._send(OP_STOP, 0, 0)
            except TpError:
                pass
        self.sessions = []
