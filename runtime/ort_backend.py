"""The ONNX Runtime backend (CPU or CUDA EP), driven through IOBinding so the KV cache is never copied.

Per ``allocate(batch)``: one buffer per cache tensor [batch, kv_heads_local, max_seq, head_dim], zero-filled
on the device and bound as BOTH ``past_key_values.{i}.key`` and ``present.{i}.key``: TensorScatter then
writes the step's rows into the buffer in place. The decode step's inputs are the rows of one torch int64
[4, B] tensor on the device (``StepState.inputs``) and its logits one torch [B, 1, V] tensor, both bound by
address once, so ``run_decode`` reads what the decode loop wrote on the device and allocates nothing.

CUDA: ONNX Runtime runs on a torch stream of its own (provider option user_compute_stream), on which the
decode loop also samples and advances the inputs; decode runs skip ORT's end-of-run host wait (run option
disable_synchronize_execution_providers), so the host never waits for a step it does not read. Where the
artifact's dialect reads no value on the host (capability ``host_free_decode``; not where onnxruntime-gpu runs a
node on the CPU, e.g. GroupQueryAttention in fp32: export/manifest.py CUDA_PRECISIONS), the decode loop captures the
whole step (this run, the sampler, the input advance) as one torch CUDA graph (runtime/decode_step.py);
ORT's own graph mode is not used.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..dtypes import PRECISIONS, precision
from ..export.manifest import Manifest, read_manifest
from .backend import Backend, BackendError, StepState, register, resolve_options
from .background import Background
from .iobinding import bind_tensor

from ..export.names import STEP_INPUTS, past_names, present_names  # noqa: F401 - re-exported

OPT_LEVELS = ("disable", "basic", "extended", "all")


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
    # CUDA: capture the decode step as a CUDA graph. None = where the artifact allows it (host_free_decode).
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
    """What one allocate() binds: the IOBinding, the cache buffers, and the decode logits buffer."""

    binding: Any  # onnxruntime.IOBinding
    caches: list[Any]  # torch tensor per past name, contract order
    decode_logits: Any  # torch tensor [B, 1, V] bound as the decode step's logits
    staging: Any = None  # CUDA: pinned int64 [4, B] host copy of the inputs for host-array steps
    bound: str = ""  # "decode" when the decode buffers are the bound step inputs
    keep: list[Any] = field(default_factory=list)  # prefill buffers the binding points at, kept alive


@register("ort")
class OrtBackend(Backend):
    options_type = OrtOptions
    options: OrtOptions
    tp1_only = "run it with `decodekit launch {artifact}` (one process per rank)"

    def __init__(self, artifact: str | Path, options: OrtOptions | None = None, *, manifest: Manifest | None = None,
                 rank: int = 0, **overrides: Any) -> None:
        # CPU: ONNX Runtime loads and optimizes the graph without the GIL while Backend.__init__ imports torch
        options = resolve_options(OrtOptions, options, overrides, "ort")
        manifest = manifest or read_manifest(artifact)
        self._pending: Background | None = None
        if options.device == "cpu" and manifest.tp == 1 and manifest.dtype in PRECISIONS:
            self._pending = Background(create_session, manifest.rank_file(artifact, rank), options)
        super().__init__(artifact, options, manifest=manifest, rank=rank)

    def _setup(self) -> None:
        m = self.manifest
        if m.dtype not in PRECISIONS:
            raise BackendError(f"{self.artifact}: unsupported dtype {m.dtype!r} for the ort backend")
        self.num_layers = m.config.num_layers
        self.kv_shape = (int(m.kv_layout["kv_heads_local"]), m.max_seq, int(m.kv_layout["head_dim"]))
        self.vocab = m.config.vocab_size
        self.cuda_graph = self._wants_cuda_graph()
        pending, self._pending = self._pending, None
        self.session = pending.result() if pending is not None else \
            create_session(m.rank_file(self.artifact, self.rank), self.options, cuda=self._cuda_setup())
        self._decode_run = self._run_options(sync=False)
        self._check_io()

    def _wants_cuda_graph(self) -> bool:
        m = self.manifest
        if self.options.device != "cuda":
            return False
        resident = m.cuda_resident()
        if not resident:
            warnings.warn(f"{self.artifact}: onnxruntime-gpu has no {m.dtype} CUDA kernel for GroupQueryAttention, so "
                          f"this {m.dialect} artifact runs it on the CPU and copies to the host every step; "
                          f"re-optimize with --dtype fp16 (or bf16) for a step that stays on the GPU", stacklevel=4)
        if self.options.cuda_graph is False:
            return False
        if self.options.cuda_graph and not resident:
            raise BackendError(f"{self.artifact}: a {m.dtype} {m.dialect} step runs GroupQueryAttention on the CPU "
                               f"(onnxruntime-gpu has fp16/bf16 kernels only), so it cannot be captured as a CUDA "
                               f"graph; re-optimize with --dtype fp16 or run without cuda_graph")
        safe = m.allows("host_free_decode") and resident
        if self.options.cuda_graph and not safe:
            raise BackendError(f"{self.artifact}: the {m.dialect} dialect reads lengths on the host "
                               f"every decode step, so a captured CUDA graph would replay stale lengths; "
                               f"re-optimize with --dialect ort-gqa-static or run without cuda_graph")
        return safe

    def _cuda_setup(self) -> dict[str, str]:
        """CUDA provider options: a torch stream of this backend's own as ORT's compute stream."""
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
        self.device = torch.device("cuda", self.options.device_id)
        self.stream = torch.cuda.Stream(self.device)  # not the legacy default stream: graphs capture on it
        return {"user_compute_stream": str(self.stream.cuda_stream), "has_user_compute_stream": "1",
                "enable_cuda_graph": "0"}

    def _run_options(self, sync: bool) -> Any:
        import onnxruntime as ort

        run = ort.RunOptions()
        # ORT's own CUDA graph is never used (the loop captures whole steps); onnxruntime >= 1.32's Python layer
        # looks this key up on every run and pays for an exception when it is missing (~150 us on a busy CPU)
        run.add_run_config_entry("gpu_graph_id", "-1")
        if self.options.device == "cuda" and not sync:
            # the host does not wait at the end of the run; the stream orders ORT's kernels and the loop's
            run.add_run_config_entry("disable_synchronize_execution_providers", "1")
        return run

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

        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), precision(dtype).onnx, *self._dev)

    def _zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A zero-filled OrtValue on the device (one host->device copy on CUDA)."""
        import onnxruntime as ort

        d = precision(dtype)
        value = self._empty(shape, dtype)
        host = np.zeros(shape, dtype=d.bits)
        if d.numpy is None:  # bfloat16: the same bits through an int of its size
            host = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(host, d.onnx)
        value.update_inplace(host)
        return value

    def _allocate(self, batch: int) -> StepState:
        import torch

        binding = self.session.io_binding()
        caches = [self._zeros((batch, *self.kv_shape), self.manifest.dtype) for _ in range(2 * self.num_layers)]
        logits = self._torch_empty((batch, 1, self.vocab))
        bind_tensor(binding, "logits", logits, output=True)  # logits is output 0 of every binding
        for past, present, value in zip(past_names(self.num_layers), present_names(self.num_layers), caches):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        inputs = torch.zeros(4, batch, dtype=torch.int64, device=self.device)
        staging = torch.zeros(4, batch, dtype=torch.int64, pin_memory=True) if self.device.type == "cuda" else None
        h = OrtHandles(binding, caches, logits, staging)
        return StepState(batch, self.max_seq, h, inputs)

    def _torch_empty(self, shape: tuple[int, ...]) -> Any:
        import torch

        return torch.zeros(shape, dtype=precision(self.manifest.dtype).torch, device=self.device)

    # -------------------------------------------------------------------------------------------- step

    def run_decode(self, state: StepState) -> Any:
        """One decode step reading ``state.inputs`` on the device; returns the [B, 1, V] logits buffer (the same
        tensor every step). On CUDA the host does not wait for it: work that reads it goes on ``stream``."""
        h: OrtHandles = state.handles
        if h.bound != "decode":
            self._bind_decode(h, state.inputs)
        self.session.run_with_iobinding(h.binding, self._decode_run)
        return h.decode_logits

    def capturable(self, state: StepState) -> bool:
        return self.cuda_graph

    def _bind_decode(self, h: OrtHandles, inputs: Any) -> None:
        B = inputs.shape[1]
        for row, name in enumerate(STEP_INPUTS):
            view = inputs[row].view(B, 1) if name in ("input_ids", "position_ids") else inputs[row]
            bind_tensor(h.binding, name, view, output=False)
        bind_tensor(h.binding, "logits", h.decode_logits, output=True)
        h.keep.clear()
        h.bound = "decode"

    def _step(self, state: StepState, input_ids: np.ndarray, position_ids: np.ndarray, write_indices: np.ndarray,
              nonpad_kv_seqlen: np.ndarray) -> Any:
        h: OrtHandles = state.handles
        arrays = (input_ids, position_ids, write_indices, nonpad_kv_seqlen)
        B, S = input_ids.shape
        if self.device.type == "cuda":
            import torch

            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the caller's work on the inputs
        if S == 1:
            self._stage_decode(state, arrays)
            logits = h.decode_logits
        else:
            logits = self._bind_prefill(h, arrays, B, S)
        self.session.run_with_iobinding(h.binding)  # ORT waits for its stream at the end: results are ready
        if self.device.type == "cuda":
            return logits
        return (logits.float() if self.manifest.dtype == "bf16" else logits).numpy()  # numpy has no bfloat16

    def _stage_decode(self, state: StepState, arrays: tuple[np.ndarray, ...]) -> None:
        """Host arrays into the decode inputs (CPU: in place; CUDA: through pinned memory on the stream)."""
        import torch

        h: OrtHandles = state.handles
        target = state.inputs if h.staging is None else h.staging
        for row, a in enumerate(arrays):
            target[row].copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64).reshape(-1)))
        if h.staging is not None:
            with torch.cuda.stream(self.stream):
                state.inputs.copy_(h.staging, non_blocking=True)
        if h.bound != "decode":
            self._bind_decode(h, state.inputs)

    def _bind_prefill(self, h: OrtHandles, arrays: tuple[np.ndarray, ...], B: int, S: int) -> Any:
        import onnxruntime as ort

        h.keep.clear()
        for name, a in zip(STEP_INPUTS, arrays):
            value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a, dtype=np.int64), *self._dev)
            h.binding.bind_ortvalue_input(name, value)
            h.keep.append(value)  # on the CPU the OrtValue holds the array the binding reads
        h.bound = "prefill"
        # [B, 1, V] whatever S is for logits "last": the decode buffer serves
        logits = h.decode_logits if self.manifest.logits == "last" else self._torch_empty((B, S, self.vocab))
        bind_tensor(h.binding, "logits", logits, output=True)
        h.keep.append(logits)
        return logits

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


def _require_cuda_ep() -> None:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("onnxruntime is not installed; pip install onnxruntime-gpu") from None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendError(f"onnxruntime {ort.__version__} has no CUDA execution provider "
                           f"(available: {', '.join(ort.get_available_providers())}); "
                           f"install onnxruntime-gpu (pip install onnxruntime-gpu) or use --device cpu")


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



