"""Layer bisection: which layer and tensor is the first to diverge between a candidate and a reference.

Tap points, in execution order (module paths of ``export.model.Decoder``):

    input_norm                      embedding + input RMSNorm
    layers.{i}.attn.o_proj          attention output (the o_proj MatMul, before the all-reduce and residual)
    layers.{i}.attn_norm            all-reduce + residual + RMSNorm output (the normalized residual)
    layers.{i}.ffn.down_proj        FFN output (the down_proj MatMul)
    layers.{i}.ffn_norm             all-reduce + residual + RMSNorm output
    lm_head                         logits

ONNX side: a COPY of the rank graph gets the tap tensors as extra graph outputs and runs on ONNX Runtime CPU with
plain feeds (past in, present out, carried step to step). A tap's tensor is found from the exporter's per-node
metadata (``pkg.torch.onnx.name_scopes`` / ``namespace`` hold module paths like model.layers.1.ffn.down_proj):
the last node, in graph order, of the tap's module. Torch side: forward hooks on the same modules.
Both replay the same prompt and forced tokens up to the failing step; the first tap (in execution order) whose
max |error| exceeds ``tap_rtol x max |reference tap|`` names the layer.
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..dtypes import from_ort

SCOPES_KEY = "pkg.torch.onnx.name_scopes"
NAMESPACE_KEY = "namespace"


@dataclass(frozen=True)
class Tap:
    module: str  # Decoder module path, e.g. "layers.1.ffn.down_proj"
    layer: int | None
    what: str

    def describe(self) -> str:
        return self.what if self.layer is None else f"layer {self.layer} {self.what}"


def decoder_taps(num_layers: int) -> list[Tap]:
    taps = [Tap("input_norm", None, "embedding + input RMSNorm output")]
    for i in range(num_layers):
        taps += [Tap(f"layers.{i}.attn.o_proj", i, "attention output (o_proj)"),
                 Tap(f"layers.{i}.attn_norm", i, "attention all-reduce + residual + RMSNorm output"),
                 Tap(f"layers.{i}.ffn.down_proj", i, "FFN output (down_proj)"),
                 Tap(f"layers.{i}.ffn_norm", i, "FFN all-reduce + residual + RMSNorm output")]
    return taps + [Tap("lm_head", None, "logits (lm_head)")]


@dataclass(frozen=True)
class TapError:
    module: str
    what: str
    onnx_tensor: str | None
    max_abs: float
    scale: float
    diverged: bool


@dataclass(frozen=True)
class BisectResult:
    found: bool
    message: str
    step: int | None = None
    layer: int | None = None
    module: str | None = None
    onnx_tensor: str | None = None
    max_abs: float | None = None
    scale: float | None = None
    taps: list[TapError] = field(default_factory=list)  # every compared tap at the reported step
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------------------ ONNX taps

def node_module(node: Any) -> str | None:
    """The deepest Decoder module path a node was traced from ("layers.1.ffn.down_proj"), None without metadata."""
    props = {p.key: p.value for p in node.metadata_props}
    if SCOPES_KEY in props:
        try:
            scopes = [s for s in ast.literal_eval(props[SCOPES_KEY]) if s == "model" or s.startswith("model.")]
        except (ValueError, SyntaxError):
            scopes = []
        if scopes:
            return scopes[-1].removeprefix("model").removeprefix(".")
    if NAMESPACE_KEY in props:
        found = re.findall(r"(?:^|/)(model(?:\.[\w]+)*):", props[NAMESPACE_KEY])
        if found:
            return found[-1].removeprefix("model").removeprefix(".")
    return None


def locate_taps(graph: Any, taps: Sequence[Tap]) -> dict[str, str]:
    """{tap module: ONNX tensor}: output 0 of the last node (graph order) inside the tap's module."""
    last: dict[str, str] = {}
    for node in graph.node:
        module = node_module(node)
        if module is None or not node.output:
            continue
        for tap in taps:
            if module == tap.module or module.startswith(tap.module + "."):
                last[tap.module] = node.output[0]
    return last


class OnnxTapRunner:
    """One sequence (batch 1) through a tapped copy of an ONNX rank graph on ONNX Runtime CPU."""

    def __init__(self, onnx_path: Path, taps: Sequence[Tap], max_seq: int, optimization: str = "all") -> None:
        import onnx
        import onnxruntime as ort

        model = onnx.load(str(onnx_path), load_external_data=False)
        self.tensors = locate_taps(model.graph, taps)
        outputs = {o.name for o in model.graph.output}
        for name in dict.fromkeys(self.tensors.values()):
            if name not in outputs:
                model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
        self._tmp = tempfile.TemporaryDirectory(prefix="decodekit-bisect-")
        folder = Path(self._tmp.name)
        for p in onnx_path.parent.iterdir():  # external data resolves next to the model: link it, never copy
            if p.name != onnx_path.name and p.is_file():
                os.symlink(p.resolve(), folder / p.name)
        onnx.save(model, str(folder / onnx_path.name))
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                                       "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                       "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                                       }.get(optimization, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        self.session = ort.InferenceSession(str(folder / onnx_path.name), so, providers=["CPUExecutionProvider"])
        self.past = {}
        for i in self.session.get_inputs():
            if i.name.startswith("past_key_values."):
                element = from_ort(i.type).numpy  # a ConfigError (a ValueError) for a type outside the table
                if element is None:
                    raise ValueError(f"bisect cannot feed {i.type} caches from numpy")
                shape = [1, *[d if isinstance(d, int) else max_seq for d in i.shape[1:]]]
                self.past[i.name] = np.zeros(shape, dtype=element)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, ids: np.ndarray, pos: np.ndarray, write: np.ndarray, nonpad: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": ids, "position_ids": pos, "write_indices": write, "nonpad_kv_seqlen": nonpad, **self.past}
        wanted = {i.name for i in self.session.get_inputs()}
        out = dict(zip(self.output_names, self.session.run(None, {k: v for k, v in feeds.items() if k in wanted})))
        for name in self.past:
            self.past[name] = out[name.replace("past_key_values.", "present.")]
        return {module: out[tensor].astype(np.float32) for module, tensor in self.tensors.items()}

    def close(self) -> None:
        self.session = None
        self._tmp.cleanup()


class TorchTapRunner:
    """One sequence through the torch reference Decoder with forward hooks on the tap modules."""

    def __init__(self, model: Any, taps: Sequence[Tap], max_seq: int) -> None:
        import torch

        self.model, self.torch = model, torch
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(1, max_seq, self.device)
        self.captured: dict[str, Any] = {}
        modules = dict(model.named_modules())
        self.hooks = [modules[t.module].register_forward_hook(self._hook(t.module))
                      for t in taps if t.module in modules]
        self.tensors = {t.module: None for t in taps if t.module in modules}

    def _hook(self, name: str):
        def hook(module: Any, args: Any, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.captured[name] = out.detach().float().cpu().numpy()
        return hook

    def run(self, ids: np.ndarray, pos: np.ndarray, write: np.ndarray, nonpad: np.ndarray) -> dict[str, np.ndarray]:
        t = self.torch
        args = [t.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in (ids, pos, write, nonpad)]
        self.captured.clear()
        with t.inference_mode():
            self.model(*args, self.cache, "all")
        return dict(self.captured)

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


# ------------------------------------------------------------------------------------------------ bisect

def _tap_runner(backend: Any, taps: Sequence[Tap], notes: list[str]) -> Any:
    if backend.name == "torch":
        return TorchTapRunner(backend.model, taps, backend.max_seq)
    if backend.name == "tensorrt":
        notes.append(f"TensorRT engine internals cannot be tapped; bisected the ONNX graph it was built from "
                     f"({backend.manifest.ranks[0].onnx.file}) on ONNX Runtime CPU instead")
    options = getattr(backend, "options", None)
    level = getattr(options, "graph_optimization_level", "all")
    return OnnxTapRunner(backend.manifest.rank_file(backend.artifact, backend.rank), taps, backend.max_seq, level)


def _compare(taps: Sequence[Tap], ref: dict[str, np.ndarray], cand: dict[str, np.ndarray],
             tensors: dict[str, str], rtol: float) -> list[TapError]:
    errors = []
    for tap in taps:
        if tap.module not in ref or tap.module not in cand:
            continue
        r, c = ref[tap.module], cand[tap.module]
        if r.size != c.size:
            continue
        diff = np.abs(r.reshape(-1).astype(np.float64) - c.reshape(-1))
        max_abs = float("nan") if np.isnan(diff).any() else float(diff.max(initial=0.0))
        scale = float(np.abs(r).max(initial=0.0))
        diverged = not max_abs <= rtol * scale
        errors.append(TapError(tap.module, tap.describe(), tensors.get(tap.module), max_abs, scale, diverged))
    return errors


def bisect_backends(reference: Any, candidate: Any, prompt: Sequence[int], forced: Sequence[int], last_step: int,
                    tap_rtol: float) -> BisectResult:
    """Replay ``prompt`` then ``forced`` tokens (batch 1) up to ``last_step`` on tapped copies of both backends."""
    if candidate.name == "torch":
        return BisectResult(False, "bisect needs an ONNX-backed candidate (ort or tensorrt); the candidate is torch")
    if candidate.manifest.tp > 1:
        return BisectResult(False, "bisect runs tp=1 artifacts only")
    taps = decoder_taps(candidate.manifest.config.num_layers)
    notes: list[str] = []
    runners = []
    try:
        try:
            runners = [_tap_runner(reference, taps, notes), _tap_runner(candidate, taps, notes)]
        except (ValueError, OSError) as e:
            return BisectResult(False, f"bisect could not run: {e}", notes=notes)
        return _replay(runners, taps, prompt, forced, last_step, tap_rtol, notes)
    finally:
        for r in runners:
            r.close()


def _replay(runners: list[Any], taps: Sequence[Tap], prompt: Sequence[int], forced: Sequence[int], last_step: int,
            rtol: float, notes: list[str]) -> BisectResult:
    ref, cand = runners
    tensors = getattr(cand, "tensors", {})
    missing = [t.module for t in taps if t.module not in tensors]
    if len(missing) == len(taps):
        return BisectResult(False, "the candidate graph carries no module metadata (pkg.torch.onnx.name_scopes), so "
                                   "no layer can be located; validate the unoptimized export to bisect", notes=notes)
    if missing:
        notes.append(f"{len(missing)} tap(s) not located in the candidate graph: {', '.join(missing[:6])}")
    n = len(prompt)
    inputs = (np.array([prompt], dtype=np.int64), np.arange(n, dtype=np.int64)[None], np.zeros(1, dtype=np.int64),
              np.array([n], dtype=np.int64))
    worst: tuple[float, int, list[TapError]] = (-1.0, 0, [])
    for step in range(last_step + 1):
        errors = _compare(taps, ref.run(*inputs), cand.run(*inputs), tensors, rtol)
        first = next((e for e in errors if e.diverged), None)
        if first is not None:
            tap = next(t for t in taps if t.module == first.module)
            where = f" (onnx tensor {first.onnx_tensor!r})" if first.onnx_tensor else ""
            msg = (f"first divergence at step {step}{' (prefill)' if step == 0 else ''}: {tap.describe()}{where}: "
                   f"max abs err {first.max_abs:.3g} (reference max |x| {first.scale:.3g}, tolerance "
                   f"{rtol * first.scale:.3g})")
            return BisectResult(True, msg, step, tap.layer, tap.module, first.onnx_tensor, first.max_abs, first.scale,
                                errors, notes)
        rel = max((e.max_abs / e.scale if e.scale > 0 else e.max_abs for e in errors), default=0.0)
        if rel > worst[0]:
            worst = (rel, step, errors)
        pos = n + step
        inputs = (np.array([[forced[step]]], dtype=np.int64), np.array([[pos]], dtype=np.int64),
                  np.array([pos], dtype=np.int64), np.array([pos + 1], dtype=np.int64))
    return BisectResult(False, f"no tapped tensor diverged beyond tolerance up to step {last_step} (largest relative "
                               f"error {worst[0]:.3g} at step {worst[1]}); the difference lies outside the "
                               f"tapped layer outputs or below the tap tolerance", taps=worst[2], notes=notes)
