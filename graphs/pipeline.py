"""`decodekit optimize` as a library function: artifact -> new artifact in another dialect / precision.

    front:  fold constants -> shape inference -> fuse std ops back -> dead code -> precision -> fuse sibling
            projections (q/k/v, gate/up: one MatMul + Split; ``PassOptions(fuse_projections=False)`` keeps
            them apart)
    dialect lowering (graphs/dialects.py)
    back:   fold constants -> CSE -> dead code -> shape inference -> contract check (I/O, ir_version 10)

Every rank runs the same pipeline (tensor-parallel collectives are left as they are). The new artifact is
written under a temporary sibling folder and renamed into place, like an export.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Callable

import onnx_ir as ir

from ..dtypes import precision, tensor_name
from ..export.folders import EXTERNAL_DATA_THRESHOLD, atomic_folder
from ..export.config import ConfigError
from ..export.manifest import Manifest, RankEntry, TensorSpec, file_entry, read_manifest, write_manifest
from .dialects import READABLE, Dialect, get_dialect
from .passes.base import PassReport, ReportingPass, op_counts
from .passes.contract import ContractPass, io_signature
from .passes.cse import CsePass
from .passes.dead_code import DeadCodeEliminationPass
from .passes.fold_constants import FoldConstantsPass
from .passes.fuse_projections import FuseProjectionsPass
from .passes.fuse_std import FuseStdPass
from .passes.precision import ConvertPrecisionPass
from .passes.quantize import QuantizePass, QuantOptions
from .passes.shape_inference import ShapeInferencePass
from .passes.tied_lm_head import TiedLmHeadPass
from .passes.weights_nk import WeightsNkPass

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class PassOptions:
    """Optional rewrites of the pipeline (the defaults are what `decodekit optimize` does).

    fuse_projections: q/k/v and gate/up as one MatMul + Split each (graphs/passes/fuse_projections.py);
    fuse_min_members=3 fuses q/k/v only. tied_lm_head: ORT dialects multiply a tied head by the embedding
    table itself (graphs/passes/tied_lm_head.py). weights_nk: [N, K] weights through com.microsoft
    FusedMatMul(transB=1) (graphs/passes/weights_nk.py; an experiment, not with quantize).
    """

    fuse_projections: bool = True
    fuse_min_members: int = 2
    tied_lm_head: bool = True
    weights_nk: bool = False

    def __post_init__(self) -> None:
        if self.fuse_min_members < 2:
            raise ConfigError(f"fuse_min_members must be >= 2, got {self.fuse_min_members}")


def build_passes(dialect: Dialect, dtype: str | None, signature: tuple[list[str], list[str]],
                 debug: bool = False, quantize: QuantOptions | None = None,
                 options: PassOptions = PassOptions()) -> list[ReportingPass]:
    # quantize runs after the back end's folding, which would otherwise fold DequantizeLinear(constant) away
    o = options
    return [
        FoldConstantsPass(debug), ShapeInferencePass(debug), FuseStdPass(debug), DeadCodeEliminationPass(debug),
        ConvertPrecisionPass(dtype, debug, softmax_attr=dialect.fp32_softmax_attr),
        *([FuseProjectionsPass(debug, o.fuse_min_members)] if o.fuse_projections else []),
        *dialect.lowering(debug),
        *([TiedLmHeadPass(debug)] if o.tied_lm_head and dialect.name.startswith("ort-") else []),
        *([WeightsNkPass(debug)] if o.weights_nk else []),
        FoldConstantsPass(debug), CsePass(debug), DeadCodeEliminationPass(debug),
        *([QuantizePass(quantize, debug)] if quantize is not None else []),
        ShapeInferencePass(debug),
        ContractPass(signature, debug),
    ]


def optimize_model(model: ir.Model, dialect: str, dtype: str | None = None, debug: bool = False,
                   quantize: QuantOptions | None = None, options: PassOptions = PassOptions()) -> list[PassReport]:
    """Run the pipeline in place on one rank's model; returns one report per pass."""
    if options.weights_nk and quantize is not None:
        raise ConfigError("weights_nk rewrites the MatMuls quantize would replace; use one or the other")
    passes = build_passes(get_dialect(dialect), dtype, io_signature(model), debug, quantize, options)
    try:
        ir.passes.Sequential(*passes)(model)
    except Exception as e:  # onnx_ir wraps pass failures; surface a user-facing one as itself
        cause: BaseException | None = e
        while cause is not None:
            if isinstance(cause, ConfigError):
                raise cause from None
            cause = cause.__cause__
        raise
    return [p.report for p in passes if p.report is not None]


def optimize(artifact: str | Path, out: str | Path, dialect: str, dtype: str | None = None, debug: bool = False,
             force: bool = False, progress: Progress = lambda msg: None,
             quantize: QuantOptions | None = None,
             options: PassOptions = PassOptions()) -> tuple[Manifest, dict[str, Any]]:
    """Write a new artifact at OUT in `dialect` (and `dtype`, weight-only `quantize`d); returns its manifest and
    the per-pass report. The quantization scheme ("int4-b32-sym") is the quantize pass entry's "scheme"."""
    src, out = Path(artifact), Path(out)
    target = get_dialect(dialect)
    if dtype is not None:
        precision(dtype)  # refused before any work
    manifest = read_manifest(src)
    if manifest.dialect not in READABLE:
        raise ConfigError(f"{src} is a {manifest.dialect!r} artifact; optimize reads {' or '.join(READABLE)} "
                          f"artifacts: optimize the std export instead")
    if out.resolve() == src.resolve():
        raise ConfigError(f"-o {out} is the input artifact; write the optimized artifact to another folder")
    with atomic_folder(out, force, keep=[src]) as tmp:
        ranks, reports, model = [], [], None
        for entry in manifest.ranks:
            progress(f"rank {entry.rank + 1}/{manifest.tp}: {manifest.dialect} -> {target.name}")
            model = ir.load(str(src / entry.onnx.file))
            passes = optimize_model(model, target.name, dtype, debug, quantize, options)
            ranks.append(_save_rank(model, tmp, entry.rank))
            reports.append({"rank": entry.rank, "passes": [_pass_dict(p, quantize) for p in passes],
                            "ops": dict(op_counts(model))})
        for f in manifest.tokenizer:
            shutil.copy2(src / f.file, tmp / f.file)
        new = _manifest(manifest, model, target, dtype, ranks, reports)
        write_manifest(tmp, new)
    progress(f"wrote {out}")
    return new, {"artifact": str(out), "source": str(src), "dialect": new.dialect, "dtype": new.dtype,
                 "quantization": quantize.scheme if quantize else None,
                 "counts": summary(reports[0]["passes"]), "ranks": reports}


def _pass_dict(p: PassReport, quantize: QuantOptions | None) -> dict[str, Any]:
    d = p.to_dict()
    if p.name == QuantizePass.name and quantize is not None:
        d["scheme"] = quantize.scheme
    return d


REWRITING = ("fuse-std", "fuse-projections", "weights-nk", "tied-lm-head", "lower-ort-gqa", "lower-decomposed",
             "lower-trt", "quantize")


def summary(passes: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Non-zero rule counts of the rewriting passes of one rank: {"lower-ort-gqa": {"GroupQueryAttention": L, ...}}."""
    return {p["name"]: {k: v for k, v in p["counts"].items() if v} for p in passes
            if p["name"] in REWRITING and any(p["counts"].values())}


def _save_rank(model: ir.Model, folder: Path, rank: int) -> RankEntry:
    name = f"rank{rank}.onnx"
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    data = f"{name}.data" if weights > EXTERNAL_DATA_THRESHOLD else None
    if data is None:  # tensors still backed by the source's .data file (e.g. quantized under the threshold) go inline
        ir.external_data.load_to_model(model)
    ir.save(model, str(folder / name), external_data=data)
    return RankEntry(rank, file_entry(folder, name), [file_entry(folder, data)] if data else [])


def _manifest(m: Manifest, model: ir.Model, dialect: Dialect, dtype: str | None, ranks: list[RankEntry],
              reports: list[dict[str, Any]]) -> Manifest:
    return dataclasses.replace(
        m, dialect=dialect.name, dtype=dtype or m.dtype, opset=model.opset_imports[""], ranks=ranks,
        inputs=_specs(model.graph.inputs), outputs=_specs(model.graph.outputs),
        kv_layout={**m.kv_layout, "write": dialect.kv_write}, capabilities=dialect.capabilities_at(dtype or m.dtype),
        passes=[{"rank": r["rank"], **p} for r in reports for p in r["passes"]])


def _specs(values) -> list[TensorSpec]:
    return [TensorSpec(v.name, tensor_name(v.dtype),
                       [d if isinstance(d, int) else str(d) for d in v.shape]) for v in values]
