"""The one place that knows full TensorRT (``tensorrt``) from TensorRT-RTX (``tensorrt_rtx``).

Both share the Python API this project uses (Builder, OnnxParser, strongly typed networks, execute_async_v3);
what differs is kept here:

| what                      | full TensorRT                      | TensorRT-RTX                                    |
|---------------------------|------------------------------------|-------------------------------------------------|
| builds on a CPU-only host | no (needs the target GPU)          | yes (kernels are finished by JIT on the GPU)    |
| timing cache              | used; saved across builds          | no-op (deprecated since 1.2): not attached      |
| CUDA graphs               | we capture execute_async_v3        | IRuntimeConfig.cuda_graph_strategy (built in)   |
| engine validity           | deserialize and see                | Runtime.get_engine_validity(bytes), diagnostics |
| GPUs                      | any the release supports           | compute capability 8.0/8.6/8.9/12.x             |

Everything is imported lazily: ``load()`` imports whichever is installed, preferring full TensorRT.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BackendError

INSTALL_HINT = ("install TensorRT-RTX (`pip install tensorrt-rtx`) or full TensorRT "
                "(`pip install tensorrt --extra-index-url https://pypi.nvidia.com`, NVIDIA's index)")
GPU_REQUIREMENT = ("the tensorrt backend needs an NVIDIA GPU with compute capability 8.0/8.6/8.9/12.x for "
                   "TensorRT-RTX (or full TensorRT)")
REBUILD_HINT = "rebuild with `decodekit build` on this machine"
RTX_COMPUTE_CAPABILITIES = ((8, 0), (8, 6), (8, 9), (12, 0), (12, 1))
_CANDIDATES = (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt-rtx"))  # preference order


@dataclass(frozen=True)
class TRT:
    """The imported TensorRT flavour."""

    module: Any
    flavour: str  # "tensorrt" | "tensorrt-rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.flavour == "tensorrt-rtx"

    @property
    def label(self) -> str:
        return f"{'TensorRT-RTX' if self.is_rtx else 'TensorRT'} {self.version}"


@functools.cache
def load() -> TRT:
    """Import TensorRT (preferred) or TensorRT-RTX; BackendError naming the packages when neither imports."""
    problems = []
    for name, flavour in _CANDIDATES:
        try:
            module = importlib.import_module(name)
        except (ImportError, OSError, RuntimeError) as e:  # OSError/RuntimeError: a wheel whose libraries are missing
            problems.append(f"{name}: {e}".splitlines()[0])
            continue
        if hasattr(module, "Builder"):  # the bare `tensorrt` meta-package without its libraries has no Builder
            return TRT(module, flavour, str(getattr(module, "__version__", "?")))
        problems.append(f"{name}: incomplete install (no Builder)")
    raise BackendError(f"TensorRT is not installed; {INSTALL_HINT} ({'; '.join(problems)})")


# ---------------------------------------------------------------- logging

_TAGS = {"INTERNAL_ERROR": "F", "ERROR": "E", "WARNING": "W", "INFO": "I", "VERBOSE": "V"}


@dataclass
class BuildLog:
    """Everything a TensorRT logger said. Verbose lines are kept only when asked (they are many);
    the builder's verbose "Layers:" report (the engine's layer list) is always kept."""

    keep_verbose: bool = False
    lines: list[str] = field(default_factory=list)
    layer_report: str | None = None
    counts: Counter = field(default_factory=Counter)

    def add(self, severity: str, message: str) -> None:
        self.counts[severity] += 1
        if severity == "VERBOSE":
            if message.startswith(("Layers:", "Engine Layer Information:")):
                self.layer_report = message
            if not self.keep_verbose:
                return
        self.lines.append(f"[{_TAGS.get(severity, '?')}] {message}")

    def errors(self) -> list[str]:
        return [line[4:] for line in self.lines if line.startswith(("[E]", "[F]"))]


def make_logger(t: TRT, sink: BuildLog) -> Any:
    """A trt.ILogger that forwards every message (verbose included) to ``sink``."""
    trt = t.module

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            sink.add(getattr(severity, "name", str(severity)).split(".")[-1], msg)

    return _Logger()


# ---------------------------------------------------------------- building

@dataclass(frozen=True)
class ParserIssue:
    node_index: int
    node_name: str
    op: str
    message: str
    code: str


def create_builder(t: TRT, logger: Any) -> Any:
    """A Builder; full TensorRT cannot create one without a CUDA GPU (TensorRT-RTX can)."""
    try:
        builder = t.module.Builder(logger)
    except (TypeError, RuntimeError) as e:  # pybind11: "factory function returned nullptr"
        builder, reason = None, str(e).splitlines()[0]
    else:
        reason = "no builder"
    if builder is None:
        raise BackendError(f"{t.label} could not create a builder ({reason}); full TensorRT builds on the GPU the "
                           f"engine is for: run this on that machine, or install TensorRT-RTX (`pip install "
                           f"tensorrt-rtx`), which builds on a CPU")
    return builder


def create_network(t: TRT, builder: Any) -> Any:
    """A strongly typed network: every tensor's precision comes from the ONNX types (no FP16/BF16 builder flags)."""
    trt = t.module
    return builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))


def parse_file(t: TRT, network: Any, logger: Any, path: Path) -> list[ParserIssue]:
    """Parse an ONNX file (external data resolved next to it); [] on success, else the parser's errors."""
    parser = t.module.OnnxParser(network, logger)
    if parser.parse_from_file(str(path)):
        return []
    issues = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        issues.append(ParserIssue(node_index=int(_call(e, "node", -1)), node_name=str(_call(e, "node_name", "")),
                                  op=str(_call(e, "node_operator", "")), message=str(e.desc()),
                                  code=getattr(e.code(), "name", str(e.code()))))
    return issues


def create_config(t: TRT, builder: Any, workspace_bytes: int | None = None) -> Any:
    trt = t.module
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # layer names, types and ONNX node metadata
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    return config


def timing_cache_supported(t: TRT) -> bool:
    return not t.is_rtx  # TensorRT-RTX: "Timing cache operations are no-ops" (deprecated since 1.2)


def attach_timing_cache(t: TRT, config: Any, path: Path) -> Any | None:
    """Load (or start) the timing cache at ``path`` into ``config``; None where the flavour has none."""
    if not timing_cache_supported(t):
        return None
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, False):  # mismatch (another GPU / version): start a fresh one
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache


def save_timing_cache(t: TRT, config: Any, path: Path) -> int:
    """Write the config's timing cache atomically; returns its size in bytes (0 where unsupported)."""
    if not timing_cache_supported(t):
        return 0
    data = bytes(config.get_timing_cache().serialize())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return len(data)


def allow_decomposed_attention(t: TRT, network: Any) -> int:
    """Mark every IAttention decomposable (a fused kernel is still used where one exists); returns how many."""
    trt = t.module
    kind = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if kind is None:
        return 0
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == kind:
            layer.__class__ = trt.IAttentionInputLayer  # the bindings hand out ILayer; downcast as Polygraphy does
            layer.attention.decomposable = True
            count += 1
    return count


def network_layer_types(network: Any) -> dict[str, int]:
    """{TensorRT LayerType name: count} of a parsed network (KV_CACHE_UPDATE, ATTENTION_INPUT, DIST_COLLECTIVE, ...)."""
    counts = Counter(network.get_layer(i).type.name for i in range(network.num_layers))
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------- engine inspection

def engine_layers(t: TRT, serialized: bytes | memoryview, log: BuildLog) -> tuple[list[dict[str, Any]], str]:
    """The engine's layers as the engine inspector reports them (JSON: Name, LayerType, Metadata, ...), and the source.

    The inspector needs the engine deserialized, which needs a GPU that can run it; without one (TensorRT-RTX builds
    on a CPU) the same report is read from the builder's verbose "Layers:" log message.
    """
    if cuda_device_count() > 0:
        try:
            runtime = t.module.Runtime(make_logger(t, BuildLog()))
            engine = runtime.deserialize_cuda_engine(serialized)
            if engine is not None:
                inspector = engine.create_engine_inspector()
                info = json.loads(inspector.get_engine_information(t.module.LayerInformationFormat.JSON))
                return [_layer_dict(x) for x in info.get("Layers", [])], "engine inspector"
        except Exception:  # noqa: BLE001 - fall back to the build log's copy of the same report
            pass
    if log.layer_report is None:
        return [], "unavailable"
    return parse_layer_report(log.layer_report), "builder log (engine inspector report; no GPU here to load the engine)"


_LINE = re.compile(r"^Name: (?P<name>.*?), LayerType: (?P<type>[^,]+), ")
_META = re.compile(r"Metadata: (?P<meta>.*)$")
_TACTIC = re.compile(r", TacticName: (?P<tactic>[^,]*), ")


def parse_layer_report(text: str) -> list[dict[str, Any]]:
    """Parse the ONELINE layer report ("Name: ..., LayerType: ..., ..., Metadata: ...") into inspector-JSON dicts."""
    layers = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        meta, tactic = _META.search(line), _TACTIC.search(line)
        layers.append({"Name": m["name"], "LayerType": m["type"], "TacticName": tactic["tactic"] if tactic else "",
                       "Metadata": meta["meta"].strip() if meta else ""})
    return layers


def _layer_dict(x: Any) -> dict[str, Any]:
    if isinstance(x, str):  # LAYER_NAMES_ONLY verbosity
        return {"Name": x, "LayerType": "", "TacticName": "", "Metadata": ""}
    return {"Name": x.get("Name", ""), "LayerType": x.get("LayerType", ""), "TacticName": x.get("TacticName", ""),
            "Metadata": x.get("Metadata", "")}


ONNX_NODE = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


def onnx_nodes(layer: dict[str, Any]) -> list[str]:
    """ONNX node names an engine layer was built from (its Metadata)."""
    return ONNX_NODE.findall(layer.get("Metadata", ""))


# ---------------------------------------------------------------- devices and runtime

def cuda_device_count() -> int:
    """CUDA devices visible through the driver (0 without a driver); no torch, no TensorRT."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def check_compute_capability(t: TRT, capability: tuple[int, int], gpu_name: str) -> None:
    if t.is_rtx and tuple(capability) not in RTX_COMPUTE_CAPABILITIES:
        major, minor = capability
        raise BackendError(f"{GPU_REQUIREMENT}; this GPU ({gpu_name}) has compute capability {major}.{minor}, which "
                           f"{t.label} cannot run (full TensorRT can: "
                           f"`pip install tensorrt --extra-index-url https://pypi.nvidia.com`)")


def deserialize(t: TRT, data: bytes, logger: Any, log: BuildLog, what: str) -> tuple[Any, Any]:
    """(ICudaEngine, IRuntime: keep it alive as long as the engine) from bytes; BackendError with the rebuild hint
    when it was built for another GPU or TensorRT version, or is damaged."""
    runtime = t.module.Runtime(logger)
    reason = ""
    if hasattr(runtime, "get_engine_validity"):  # TensorRT-RTX: diagnose before loading
        validity, diagnostics = runtime.get_engine_validity(data)
        if validity.name == "INVALID":
            reason = _diagnostics(t, int(diagnostics))
    engine = None if reason else runtime.deserialize_cuda_engine(data)
    if engine is None:
        reason = reason or "; ".join(log.errors()[-2:]) or "the runtime refused it"
        raise BackendError(f"{what}: {t.label} cannot load this engine ({reason}); {REBUILD_HINT}")
    return engine, runtime


def _diagnostics(t: TRT, bits: int) -> str:
    names = [name.lower().replace("_", " ") for name, v in t.module.EngineInvalidityDiagnostics.__members__.items()
             if bits & int(v)]
    return ", ".join(names) or "invalid engine"


def create_context(t: TRT, engine: Any, cuda_graphs: bool) -> tuple[Any, bool]:
    """An execution context; returns (context, graphs_built_in). TensorRT-RTX captures CUDA graphs itself when asked
    through its runtime config; with full TensorRT the caller captures execute_async_v3 into a graph."""
    if cuda_graphs and hasattr(engine, "create_runtime_config"):
        config = engine.create_runtime_config()
        strategy = getattr(t.module, "CudaGraphStrategy", None)
        if strategy is not None and hasattr(config, "cuda_graph_strategy"):
            config.cuda_graph_strategy = strategy.WHOLE_GRAPH_CAPTURE
            return engine.create_execution_context(config), True
    return engine.create_execution_context(), False


def has_communicator_hook(t: TRT) -> bool:
    return hasattr(t.module.IExecutionContext, "set_communicator")


def set_communicator(t: TRT, context: Any, nccl_comm: int) -> None:
    """Hand a context the ncclComm_t (an address) its DIST_COLLECTIVE layers use. A collective call: every rank
    sharing the communicator must make it."""
    if not has_communicator_hook(t):
        raise BackendError(f"{t.label} exposes no IExecutionContext.set_communicator, so its engines with "
                           f"DIST_COLLECTIVE layers cannot get an NCCL communicator; use TensorRT-RTX >= 1.7 or a "
                           f"TensorRT release with multi-device support, or export with --tp 1")
    new_capsule = ctypes.pythonapi.PyCapsule_New
    new_capsule.restype, new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    if not context.set_communicator(new_capsule(nccl_comm, None, None)):
        raise BackendError(f"{t.label} refused the NCCL communicator (does its size match the engine's tp?)")


def _call(obj: Any, name: str, default: Any) -> Any:
    fn = getattr(obj, name, None)
    return fn() if callable(fn) else default
