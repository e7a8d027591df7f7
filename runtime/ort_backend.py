"""The ONNX Runtime backend (CPU or CUDA EP), driven through IOBinding so the KV cache is never copied.

Per ``allocate(batch)``: one OrtValue per cache tensor [batch, kv_heads_local, max_seq, head_dim], zero-filled
on the device and bound as BOTH ``past_key_values.{i}.key`` and ``present.{i}.key``: TensorScatter then
writes the step's rows into the buffer in place. Decode-shaped ([B, 1]) step inputs and the [B, 1, V] logits
are preallocated once too, so a decode step allocates nothing; prefill binds fresh buffers of its own shape.

On CUDA, logits come back as a torch.Tensor on the device (torch-owned buffer bound by pointer); on the CPU
as an np.ndarray. The decode logits buffer is reused: its contents are valid until the next step.

CUDA decode steps: the four [B] step inputs live in one torch buffer [4, B] on the device, filled by one
non-blocking copy from pinned host memory on PyTorch's current stream, which ONNX Runtime is given as its
compute stream. Where the dialect keeps every decode shape fixed and reads no length on the host
(``GRAPH_SAFE_DIALECTS``), the decode step is captured as a CUDA graph, one per allocated state (run option
gpu_graph_id), and replayed; prefill runs uncaptured (gpu_graph_id -1).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..export.manifest import Manifest
from .backend import Backend, BackendError, StepState, register, resolve_options

from ..export.names import STEP_INPUTS, past_names, present_names  # noqa: F401 - re-exported

ONNX_TYPES = {"fp32": 1, "fp16": 10, "bf16": 16}  # TensorProto element types of the cache / logits
NUMPY_TYPES = {"fp32": np.float32, "fp16": np.float16}
OPT_LEVELS = ("disable", "basic", "extended", "all")
# Dialects whose decode step reads no length on the host and has fixed shapes: a captured CUDA graph stays valid
# as the sequences grow (std's Attention and ort-gqa's GroupQueryAttention read lengths on the host each step).
GRAPH_SAFE_DIALECTS = ("ort-gqa-static", "std+std-nononpad")
MAX_CUDA_GRAPHS = 16  # captured decode graphs per backend (one per allocated state)


@dataclass(frozen=True)
class OrtOptions:
    device: Literal["cpu", "cuda"] = "cpu"
    device_id: int = 0
    intra_op_threads: int = 0  # 0 = onnxruntime's default
    graph_optimization_level: str = "all"  # disable | basic | extended | all
    provider_options: dict[str, Any] = field(default_factory=dict)  # passed to the execution provider (wins)
    # CUDA: ORT itself places shape-computation nodes on the CPU EP, so a session with CPU fallback disabled
    # ("session.disable_cpu_ep_fallback") refuses every exported graph (measured, onnxruntime-gpu 1.31.1, H100).
    # False = that strict mode: use it to prove a graph runs on the GPU only.
    allow_cpu_fallback: bool = True
    tf32: bool = False  # CUDA: TF32 matmuls; off keeps fp32 artifacts at fp32 accuracy (5e-4 -> 3e-7 rel. error)
    # CUDA: capture the decode step as a CUDA graph. None = where the dialect allows it (GRAPH_SAFE_DIALECTS).
    cuda_graph: bool | None = None

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise BackendError(f"unknown ort device {self.device!r}; use cpu or cuda")
        if self.graph_optimization_level not in OPT_LEVELS:
            raise BackendError(f"graph_optimization_level must be one of {', '.join(OPT_LEVELS)}, "
                               f"got {self.graph_optimization_level!r}")
        if self.cuda_graph and self.device != "cuda":
            raise BackendError("cuda_graph applies to device cuda only")
        if self.intra_op_threads < 0:
            raise BackendError(f"intra_op_threads must be >= 0, got {self.intra_op_threads}")


@dataclass
class OrtHandles:
    """What one allocate() binds: the IOBinding, the cache OrtValues, and the preallocated decode buffers."""

    binding: Any  # onnxruntime.IOBinding
    caches: list[Any]  # OrtValue per past name, contract order
    decode_inputs: dict[str, Any]  # name -> OrtValue of shape [B, 1] / [B]
    decode_host: dict[str, np.ndarray]  # name -> host array: a view of the OrtValue on CPU, a staging copy on CUDA
    decode_logits: Any  # np.ndarray view of the bound OrtValue (CPU) or torch.Tensor (CUDA), [B, 1, V]
    decode_logits_value: Any = None  # CPU: the bound OrtValue itself
    bound: str = ""  # "decode" when the decode buffers are the bound step inputs
    keep: list[Any] = field(default_factory=list)  # prefill buffers the binding points at, kept alive
    decode_device: Any = None  # CUDA: torch int64 [4, B] on the device the decode inputs are bound to ...
    decode_pinned: Any = None  # ... and its pinned host staging copy
    run_options: Any = None  # CUDA graph: RunOptions naming this state's graph


@register("ort")
class OrtBackend(Backend):
    def __init__(self, artifact: str | Path, options: OrtOptions | None = None, *, manifest: Manifest | None = None,
                 rank: int = 0, **overrides: Any) -> None:
        super().__init__(artifact, manifest, rank)
        self.options = resolve_options(OrtOptions, options, overrides, "ort")
        m = self.manifest
        if m.tp > 1:
            raise BackendError(f"{self.artifact} has tp={m.tp} ranks; one process runs tp=1 artifacts only: "
                               f"run it with `decodekit launch {self.artifact}` (one process per rank)")
        if m.dtype not in ONNX_TYPES:
            raise BackendError(f"{self.artifact}: unsupported dtype {m.dtype!r} for the ort backend")
        self.num_layers = m.config.num_layers
        self.kv_shape = (int(m.kv_layout["kv_heads_local"]), m.max_seq, int(m.kv_layout["head_dim"]))
        self.vocab = m.config.vocab_size
        self.cuda_graph = self._wants_cuda_graph()
        self._graphs = 0
        self._prefill_run = _uncaptured_run() if self.cuda_graph else None
        self.session = create_session(m.rank_file(self.artifact, rank), self.options, cuda=self._cuda_setup())
        self._check_io()

    def _wants_cuda_graph(self) -> bool:
        safe = self.manifest.dialect in GRAPH_SAFE_DIALECTS
        if self.options.device != "cuda" or self.options.cuda_graph is False:
            return False
        if self.options.cuda_graph and not safe:
            raise BackendError(f"{self.artifact}: the {self.manifest.dialect} dialect reads lengths on the host "
                               f"every decode step, so a captured CUDA graph would replay stale lengths; "
                               f"re-optimize with --dialect ort-gqa-static or run without cuda_graph")
        return safe

    def _cuda_setup(self) -> dict[str, str]:
        """CUDA provider options: PyTorch's current stream as ORT's compute stream, and CUDA graphs when used."""
        if self.options.device != "cuda":
            return {}
        _require_cuda_ep()
        try:
            import torch
        except ImportError:
            raise BackendError("the ort backend on cuda needs PyTorch with CUDA for its device buffers; "
                               "pip install torch") from None
        if not torch.cuda.is_available():
            raise BackendError("--device cuda: PyTorch sees no CUDA GPU (torch.cuda.is_available() is False); "
                               "use --device cpu or a CUDA build of torch")
        self._stream = torch.cuda.current_stream(self.options.device_id)
        return {"user_compute_stream": str(self._stream.cuda_stream), "has_user_compute_stream": "1",
                "enable_cuda_graph": "1" if self.cuda_graph else "0"}

    # ------------------------------------------------------------------------------------------- setup

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        want_in = [*STEP_INPUTS, *past_names(self.num_layers)]
        want_out = ["logits", *present_names(self.num_layers)]
        if sorted(inputs) != sorted(want_in) or sorted(outputs) != sorted(want_out):
            raise BackendError(f"{self.artifact}: graph I/O {inputs} -> {outputs} does not follow the decodekit "
                               f"contract ({STEP_INPUTS} + past_key_values.* -> logits + present.*); re-export it")

    @property
    def _dev(self) -> tuple[str, int]:
        return self.options.device, self.options.device_id

    def _empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """An uninitialized OrtValue on the device."""
        import onnxruntime as ort

        element = NUMPY_TYPES.get(dtype, ONNX_TYPES[dtype])  # bfloat16 has no numpy type: its onnx type id
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), element, *self._dev)

    def _zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A zero-filled OrtValue on the device (one host->device copy on CUDA)."""
        import onnxruntime as ort

        value = self._empty(shape, dtype)
        host = np.zeros(shape, dtype=NUMPY_TYPES.get(dtype, np.uint16))
        if dtype not in NUMPY_TYPES:  # same bits through uint16
            host = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, ONNX_TYPES[dtype])
        value.update_inplace(host)
        return value

    def allocate(self, batch: int) -> StepState:
        if not 1 <= batch <= self.max_batch:
            raise BackendError(f"batch {batch} is outside the artifact's range [1, {self.max_batch}]")
        binding = self.session.io_binding()
        caches = [self._zeros((batch, *self.kv_shape), self.manifest.dtype) for _ in range(2 * self.num_layers)]
        logits, logits_value = self._decode_logits(batch)
        if logits_value is not None:
            binding.bind_ortvalue_output("logits", logits_value)  # logits is output 0 of every binding
        else:
            self._bind_torch_output(binding, logits)
        for past, present, value in zip(past_names(self.num_layers), present_names(self.num_layers), caches):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        if self.options.device == "cpu":
            inputs, host = self._decode_inputs(batch)
            return StepState(batch, self.max_seq, OrtHandles(binding, caches, inputs, host, logits, logits_value))
        h = OrtHandles(binding, caches, {}, {}, logits, logits_value)
        self._cuda_decode_inputs(h, batch)
        return StepState(batch, self.max_seq, h)

    def _decode_inputs(self, batch: int) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """CPU: an OrtValue per step input sharing the memory of a numpy array the step writes into."""
        import onnxruntime as ort

        values, host = {}, {}
        for name, shape in _decode_shapes(batch).items():
            host[name] = np.zeros(shape, dtype=np.int64)
            values[name] = ort.OrtValue.ortvalue_from_numpy(host[name])  # shares the array's memory
        return values, host

    def _cuda_decode_inputs(self, h: OrtHandles, batch: int) -> None:
        """CUDA: the step inputs are rows of one [4, B] device buffer, staged through pinned host memory."""
        import onnxruntime as ort
        import torch

        h.decode_device = torch.zeros(4, batch, dtype=torch.int64, device=f"cuda:{self.options.device_id}")
        h.decode_pinned = torch.zeros(4, batch, dtype=torch.int64, pin_memory=True)
        for row, (name, shape) in enumerate(_decode_shapes(batch).items()):
            h.decode_host[name] = h.decode_pinned[row].numpy().reshape(shape)  # views of the pinned rows
            h.decode_inputs[name] = h.decode_device[row]
        if self.cuda_graph:
            # a graph per state: it replays this state's buffer addresses, and ORT keeps every graph (and the memory
            # it captured) for the session's life; past MAX_CUDA_GRAPHS states decode uncaptured: reuse states
            h.run_options = ort.RunOptions()
            if self._graphs < MAX_CUDA_GRAPHS:
                self._graphs += 1
                h.run_options.add_run_config_entry("gpu_graph_id", str(self._graphs))
            else:
                h.run_options.add_run_config_entry("gpu_graph_id", "-1")
                if self._graphs == MAX_CUDA_GRAPHS:
                    self._graphs += 1
                    warnings.warn(f"{self.artifact}: more than {MAX_CUDA_GRAPHS} states allocated on one ort backend; "
                                  f"new ones decode without a CUDA graph (pass state= to generate to reuse one)",
                                  stacklevel=3)

    def _decode_logits(self, batch: int) -> tuple[Any, Any]:
        shape = (batch, 1, self.vocab)
        if self.options.device == "cpu":
            value = self._zeros(shape, self.manifest.dtype)
            return (value.numpy() if self.manifest.dtype in NUMPY_TYPES else None), value
        return self._torch_empty(shape), None

    def _torch_empty(self, shape: tuple[int, ...]) -> Any:
        import torch

        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[self.manifest.dtype]
        return torch.empty(shape, dtype=dtype, device=f"cuda:{self.options.device_id}")

    def _bind_torch_output(self, binding: Any, tensor: Any) -> None:
        binding.bind_output("logits", "cuda", self.options.device_id, ONNX_TYPES[self.manifest.dtype],
                            list(tensor.shape), tensor.data_ptr())

    # -------------------------------------------------------------------------------------------- step

    def step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
             nonpad_kv_seqlen: np.ndarray) -> Any:
        h: OrtHandles = state.handles
        arrays = dict(zip(STEP_INPUTS, (input_ids, position_ids, write_indices, nonpad_kv_seqlen)))
        B, S = input_ids.shape
        if B != state.batch:
            raise BackendError(f"step got batch {B} but the state was allocated for batch {state.batch}")
        if S == 1:
            logits = self._bind_decode(h, arrays)
            run = h.run_options
        else:
            logits = self._bind_prefill(h, arrays, B, S)
            run = self._prefill_run
        if self.options.device == "cuda":
            # torch's copies (and the caller's sampling) are done before ORT reads; ORT syncs the stream at its end
            self._stream.synchronize()
        self.session.run_with_iobinding(h.binding, run)
        return logits

    def _bind_decode(self, h: OrtHandles, arrays: dict[str, np.ndarray]) -> Any:
        for name, a in arrays.items():
            np.copyto(h.decode_host[name], a.reshape(h.decode_host[name].shape), casting="same_kind")
        if h.decode_device is not None:
            import torch

            with torch.cuda.stream(self._stream):
                h.decode_device.copy_(h.decode_pinned, non_blocking=True)
        if h.bound != "decode":
            for name, value in h.decode_inputs.items():
                if h.decode_device is None:
                    h.binding.bind_ortvalue_input(name, value)
                else:
                    h.binding.bind_input(name, "cuda", self.options.device_id, 7,  # TensorProto INT64
                                         list(h.decode_host[name].shape), value.data_ptr())
            self._rebind_decode_logits(h)
            h.bound = "decode"
        return h.decode_logits

    def _rebind_decode_logits(self, h: OrtHandles) -> None:
        if h.decode_logits_value is not None:
            h.binding.bind_ortvalue_output("logits", h.decode_logits_value)
        else:
            self._bind_torch_output(h.binding, h.decode_logits)

    def _bind_prefill(self, h: OrtHandles, arrays: dict[str, np.ndarray], B: int, S: int) -> Any:
        import onnxruntime as ort

        h.keep.clear()
        for name, a in arrays.items():
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.int64), *self._dev)
            h.binding.bind_ortvalue_input(name, value)
            h.keep.append(value)  # on the CPU the OrtValue holds the array the binding reads
        h.bound = "prefill"
        if self.manifest.logits == "last":  # [B, 1, V] whatever S is: the decode buffer serves
            self._rebind_decode_logits(h)
            return h.decode_logits
        if self.options.device != "cpu":
            logits = self._torch_empty((B, S, self.vocab))
            self._bind_torch_output(h.binding, logits)
            return logits
        value = self._empty((B, S, self.vocab), self.manifest.dtype)
        h.binding.bind_ortvalue_output("logits", value)
        h.keep.append(value)
        return value.numpy() if self.manifest.dtype in NUMPY_TYPES else value

    # ------------------------------------------------------------------------------------ introspection

    def caches(self, state: StepState) -> list[Any]:
        """The cache OrtValues in contract order (past_key_values.0.key, .0.value, 1.key, ...)."""
        return list(state.handles.caches)

    def bound_outputs(self, state: StepState) -> dict[str, Any]:
        """name -> OrtValue the last run wrote (the present.* entries are the cache buffers themselves)."""
        names = ["logits", *present_names(self.num_layers)]
        return dict(zip(names, state.handles.binding.get_outputs()))

    def close(self) -> None:
        self.session = None


def _uncaptured_run() -> Any:
    """RunOptions of a step ORT must run, not capture or replay (gpu_graph_id -1)."""
    import onnxruntime as ort

    run = ort.RunOptions()
    run.add_run_config_entry("gpu_graph_id", "-1")
    return run


def _require_cuda_ep() -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime-gpu") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(f"onnxruntime {ort.__version__} has no CUDA execution provider "
                           f"(available: {', '.join(ort.get_available_providers())}); "
                           f"install onnxruntime-gpu (pip install onnxruntime-gpu) or use --device cpu")


def _decode_shapes(batch: int) -> dict[str, tuple[int, ...]]:
    return {"input_ids": (batch, 1), "position_ids": (batch, 1), "write_indices": (batch,),
            "nonpad_kv_seqlen": (batch,)}


def create_session(model: Path | bytes, options: OrtOptions, config: dict[str, str] | None = None,
                   what: str | None = None, cuda: dict[str, str] | None = None) -> Any:
    """An InferenceSession for `model` (a path, or serialized bytes) with `options`; extra session config
    entries in `config`; `cuda`: CUDA provider options under options.provider_options. Load failures become
    one-line BackendErrors naming `what` (default: the path)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime (or onnxruntime-gpu)") from None
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[options.graph_optimization_level]
    if options.intra_op_threads:
        so.intra_op_num_threads = options.intra_op_threads
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    if options.device == "cuda":
        _require_cuda_ep()
        if not options.allow_cpu_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        base = {"device_id": str(options.device_id), "use_tf32": "1" if options.tf32 else "0", **(cuda or {})}
        providers = [("CUDAExecutionProvider", {**base, **{k: str(v) for k, v in options.provider_options.items()}})]
    else:
        providers = [("CPUExecutionProvider", dict(options.provider_options))]
    try:
        return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so, providers=providers)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph/... types
        hint = " (allow_cpu_fallback=False refuses the CPU nodes ORT itself assigns)" \
            if options.device == "cuda" and not options.allow_cpu_fallback else ""
        raise BackendError(f"onnxruntime could not load {what or model} on {options.device}{hint}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None



