"""The TensorRT backend: a rank's engine (built by `decodekit build`) run through the TensorRT Python API.

Works with full TensorRT or TensorRT-RTX; every difference between them lives in graphs/trt/api.py.

- One execution context per optimization profile (decode: seq=1; prefill: seq 1..max_seq; see graphs/trt/profiles.py),
  each on its own profile, all enqueued on one torch CUDA stream.
- Device buffers are torch CUDA tensors. ``allocate(batch)`` creates the zeroed KV caches and binds each layer's past
  input and present output to the SAME address (the engine's KV_CACHE_UPDATE layers write the new rows in place;
  ``ICudaEngine.get_aliased_input_tensor`` names the pairs where the API has it), plus flat int64 input buffers and the
  decode logits [B, 1, V], so a decode step allocates nothing.
- Decode steps (fixed shapes) run as a CUDA graph: TensorRT-RTX's built-in whole-graph capture, or a torch CUDA graph
  captured around execute_async_v3 with full TensorRT.
- tp > 1: one process per rank; each context gets the NCCL communicator of the launch (``set_communicator``).

step() returns logits as a torch.Tensor on the GPU; the buffer is reused: its contents are valid until the next step.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import from_trt
from ..export.manifest import Manifest
from ..export.names import STEP_INPUTS, past_names, present_names
from ..graphs.trt import api
from ..graphs.trt.profiles import profile_for
from .backend import Backend, BackendError, StepState, register



@dataclass(frozen=True)
class TensorRTOptions:
    device_id: int | None = None  # None: torch.cuda.current_device() (under a launcher: the local rank's GPU)
    cuda_graphs: bool = True  # replay decode steps as a CUDA graph
    communicator: Any = None  # tp > 1: an ncclComm_t address (int) or a torch.distributed NCCL group; None: WORLD


@dataclass
class TrtHandles:
    """What one allocate() owns: caches (past == present), flat step-input buffers, logits buffers, the decode graph."""

    caches: dict[str, Any]  # past name -> torch [B, kv_heads, max_seq, head_dim]
    inputs: dict[str, Any]  # step input name -> flat int64 torch buffer (B * max_seq, or B)
    decode_logits: Any  # torch [B, 1, V]
    prefill_logits: Any = None  # flat torch buffer, grown on demand
    graph: Any = None  # torch.cuda.CUDAGraph of the decode step (full TensorRT)
    token: int = field(default_factory=itertools.count().__next__)  # identifies the state in a context's binding


@register("tensorrt")
class TensorRTBackend(Backend):
    options_type = TensorRTOptions
    options: TensorRTOptions

    def _setup(self) -> None:
        entry = _engine_entry(self.artifact, self.manifest, self.rank)
        torch = _cuda_torch()
        self.t = api.load()
        self.device = torch.device("cuda", self.options.device_id if self.options.device_id is not None
                                   else torch.cuda.current_device())
        api.check_compute_capability(self.t, torch.cuda.get_device_capability(self.device),
                                     torch.cuda.get_device_name(self.device))
        _check_flavour(self.t, self.manifest)
        self.log = api.BuildLog()
        self.logger = api.make_logger(self.t, self.log)
        with torch.cuda.device(self.device):
            self.engine, self.runtime = api.deserialize(self.t, (self.artifact / entry).read_bytes(), self.logger,
                                                        self.log, f"{self.artifact / entry}")
            self.stream = torch.cuda.Stream(self.device)
            self.profiles = list(self.manifest.engines["profiles"])
            self.contexts, self.builtin_graphs = {}, {}
            for p in self.profiles:
                self.contexts[p["name"]], self.builtin_graphs[p["name"]] = self._context(p)
        self._io = _engine_io(self.engine, self.artifact, self.manifest.config.num_layers)
        self.aliases = _aliases(self.engine, self.manifest.config.num_layers)
        self._bound: dict[str, tuple[int, int, int]] = {}
        if self.manifest.tp > 1:
            self._set_communicator()

    # ------------------------------------------------------------------------------------------- setup

    def _context(self, profile: dict[str, Any]) -> tuple[Any, bool]:
        graphs = self.options.cuda_graphs and profile["name"] == "decode"
        context, builtin = api.create_context(self.t, self.engine, graphs)
        if context is None:
            raise BackendError(f"{self.artifact}: {self.t.label} could not create an execution context "
                               f"({'; '.join(self.log.errors()[-2:]) or 'out of GPU memory?'})")
        if not context.set_optimization_profile_async(int(profile["index"]), self.stream.cuda_stream):
            raise BackendError(f"{self.artifact}: the engine has no optimization profile {profile['index']}; "
                               f"{api.REBUILD_HINT}")
        return context, builtin

    def _set_communicator(self) -> None:
        comm = _nccl_comm(self.options.communicator, self.manifest.tp, self.rank, self.device)
        for context in self.contexts.values():
            api.set_communicator(self.t, context, comm)

    def _allocate(self, batch: int) -> StepState:
        import torch

        max_batch = min(self.max_batch, *(p["batch"][2] for p in self.profiles))
        if not 1 <= batch <= max_batch:
            raise BackendError(f"batch {batch} is outside the engine's range [1, {max_batch}]")
        with torch.cuda.device(self.device):
            caches = {name: torch.zeros((batch, *shape[1:]), dtype=dtype, device=self.device)
                      for name, (shape, dtype) in self._io.caches.items()}
            inputs = {name: torch.zeros(batch * (self.max_seq if name in ("input_ids", "position_ids") else 1),
                                        dtype=torch.int64, device=self.device) for name in STEP_INPUTS}
            logits = torch.empty((batch, 1, self.manifest.config.vocab_size), dtype=self._io.logits_dtype,
                                 device=self.device)
        torch.cuda.synchronize(self.device)  # zeros are ready before any context reads them on self.stream
        return StepState(batch, self.max_seq, TrtHandles(caches, inputs, logits))

    def caches(self, state: StepState) -> list[Any]:
        """The live cache tensors in contract order (past_key_values.0.key, .0.value, 1.key, ...)."""
        return list(state.handles.caches.values())

    # -------------------------------------------------------------------------------------------- step

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        import torch

        h: TrtHandles = state.handles
        B, S = input_ids.shape
        if B != state.batch or not 1 <= S <= self.max_seq:
            raise BackendError(f"step got [batch {B}, seq {S}] but the state holds batch {state.batch} and "
                               f"max_seq {self.max_seq}")
        profile = profile_for(self.profiles, B, S)
        name = profile["name"]
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the caller is done with the last logits
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for key, a in zip(STEP_INPUTS, (input_ids, position_ids, write_indices, nonpad_kv_seqlen)):
                host = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).reshape(-1)
                h.inputs[key][:host.numel()].copy_(host, non_blocking=True)  # pageable source: staged before return
            logits = self._bind(name, h, B, S)
            if name == "decode" and self.options.cuda_graphs and not self.builtin_graphs[name]:
                self._run_graph(h)
            else:
                self._execute(self.contexts[name])
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return logits

    def _bind(self, name: str, h: TrtHandles, B: int, S: int) -> Any:
        """Set shapes and addresses on the profile's context when state or shape changed; returns the logits view."""
        context = self.contexts[name]
        key = (h.token, B, S)
        shapes = {"input_ids": (B, S), "position_ids": (B, S), "write_indices": (B,), "nonpad_kv_seqlen": (B,)}
        if self._bound.get(name) != key:
            for tensor in self._io.inputs:
                if tensor in shapes:
                    context.set_input_shape(tensor, shapes[tensor])
                    context.set_tensor_address(tensor, h.inputs[tensor].data_ptr())
                else:
                    cache = h.caches[tensor]
                    context.set_input_shape(tensor, tuple(cache.shape))
                    context.set_tensor_address(tensor, cache.data_ptr())
            for present, past in self.aliases.items():
                context.set_tensor_address(present, h.caches[past].data_ptr())  # the SAME buffer: updated in place
        logits = self._logits(context, h, B, S)
        if self._bound.get(name) != key:
            context.set_tensor_address("logits", logits.data_ptr())
            self._bound[name] = key
            h.graph = None if name == "decode" else h.graph
        return logits

    def _logits(self, context: Any, h: TrtHandles, B: int, S: int) -> Any:
        import torch

        shape = tuple(context.get_tensor_shape("logits"))
        if shape == tuple(h.decode_logits.shape):
            return h.decode_logits
        numel = int(np.prod(shape))
        if h.prefill_logits is None or h.prefill_logits.numel() < numel:
            h.prefill_logits = torch.empty(numel, dtype=self._io.logits_dtype, device=self.device)
        return h.prefill_logits[:numel].view(shape)

    def _execute(self, context: Any) -> None:
        if not context.execute_async_v3(self.stream.cuda_stream):
            raise BackendError(f"{self.artifact}: TensorRT failed to run the step: "
                               f"{'; '.join(self.log.errors()[-2:]) or 'no message'}")

    def _run_graph(self, h: TrtHandles) -> None:
        """Full TensorRT: capture the decode enqueue into a torch CUDA graph once per state, then replay it."""
        import torch

        if h.graph is None:
            context = self.contexts["decode"]
            self._execute(context)  # a first enqueue after shape changes does work that must not be captured
            capturable = getattr(context, "is_stream_capturable", None)
            if capturable is not None and not capturable(self.stream.cuda_stream):
                return
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._execute(context)
            h.graph = graph
            return
        h.graph.replay()

    def close(self) -> None:
        self.contexts, self.engine, self.runtime = {}, None, None


# ---------------------------------------------------------------------------------------------- helpers

def _engine_entry(artifact: Path, m: Manifest, rank: int) -> str:
    if not 0 <= rank < m.tp:
        raise BackendError(f"{artifact} has ranks 0..{m.tp - 1}; got rank {rank}")
    entry = m.ranks[rank].engine
    if entry is None or not m.engines.get("profiles"):
        raise BackendError(f"{artifact} has no TensorRT engine for rank {rank}; build one with "
                           f"`decodekit build {artifact} -o OUT` and load OUT")
    return entry.file


def _cuda_torch() -> Any:
    import torch

    if not torch.cuda.is_available():
        raise BackendError(f"{api.GPU_REQUIREMENT}; torch sees no CUDA GPU here (torch {torch.__version__})")
    return torch


def _check_flavour(t: api.TRT, m: Manifest) -> None:
    flavour, version = m.engines.get("flavour"), m.engines.get("version")
    if flavour != t.flavour or version != t.version:
        raise BackendError(f"the engines were built with {flavour} {version} but {t.label} ({t.flavour}) is "
                           f"installed here; {api.REBUILD_HINT}")


@dataclass
class _IO:
    inputs: list[str]
    caches: dict[str, tuple[tuple[int, ...], Any]]  # past name -> (engine shape, torch dtype)
    logits_dtype: Any
    outputs: list[str] = field(default_factory=list)


def _engine_io(engine: Any, artifact: Path, num_layers: int) -> _IO:
    import torch

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n).name == "INPUT"]
    outputs = [n for n in names if engine.get_tensor_mode(n).name == "OUTPUT"]
    allowed = set(STEP_INPUTS) | set(past_names(num_layers))
    if not set(inputs) <= allowed or sorted(outputs) != sorted(["logits", *present_names(num_layers)]):
        raise BackendError(f"{artifact}: engine I/O {inputs} -> {outputs} does not follow the decodekit contract; "
                           f"re-export and rebuild it")

    def dtype(n: str) -> Any:
        return from_trt(engine.get_tensor_dtype(n)).torch

    caches = {n: (tuple(engine.get_tensor_shape(n)), dtype(n)) for n in past_names(num_layers) if n in inputs}
    return _IO(inputs, caches, dtype("logits"), outputs)


def _aliases(engine: Any, num_layers: int) -> dict[str, str]:
    """present name -> past name bound to the same address: the engine's own alias table where the API has one."""
    pairs = dict(zip(present_names(num_layers), past_names(num_layers)))
    lookup = getattr(engine, "get_aliased_input_tensor", None)
    if lookup is not None:
        for present in pairs:
            alias = lookup(present)
            if alias:
                pairs[present] = alias
    return pairs


def _nccl_comm(option: Any, tp: int, rank: int, device: Any) -> int:
    """The ncclComm_t address for this rank: given as an int, or read from a torch.distributed NCCL process group."""
    if isinstance(option, int):
        return option
    import torch
    import torch.distributed as dist

    if option is None and not (dist.is_available() and dist.is_initialized()):
        raise BackendError(f"this tp={tp} engine needs an NCCL communicator: run it with `decodekit launch` "
                           f"(torch.distributed, nccl backend) or pass communicator=<ncclComm_t address>")
    group = option or dist.group.WORLD
    if dist.get_world_size(group) != tp or dist.get_rank(group) != rank:
        raise BackendError(f"the process group has {dist.get_world_size(group)} ranks (this is rank "
                           f"{dist.get_rank(group)}) but the engine is rank {rank} of tp={tp}")
    dist.all_reduce(torch.zeros(1, device=device), group=group)  # NCCL communicators are created lazily
    backend = group._get_backend(device)
    comm_ptr = getattr(backend, "_comm_ptr", None)
    if comm_ptr is None or not comm_ptr():
        raise BackendError("this torch exposes no NCCL communicator address (ProcessGroupNCCL._comm_ptr); "
                           "pass communicator=<ncclComm_t address> from your own NCCL setup")
    return int(comm_ptr())
