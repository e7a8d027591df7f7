"""The contract of a decodekit graph pass: an onnx_ir InPlacePass whose call leaves a frozen PassReport.

Subclasses implement ``run(model) -> PassOutcome`` (and optionally ``requires`` / ``ensures``, which raise
when the model is not what the pass accepts or produces). A limitation a user can act on (a graph the
target dialect cannot express) is raised as ``DialectError`` with what to do; the pipeline surfaces it as
one line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from ...errors import DialectError  # noqa: F401 - re-exported


@dataclass(frozen=True)
class PassOutcome:
    modified: bool
    counts: dict[str, int]
    why_not: dict[str, list[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class PassReport:
    name: str
    modified: bool
    counts: dict[str, int]
    seconds: float
    why_not: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if not d["why_not"]:
            del d["why_not"]
        return d


class ReportingPass(ir.passes.InPlacePass):
    name: ClassVar[str] = "?"

    def __init__(self, debug: bool = False) -> None:
        super().__init__()
        self.debug = debug
        self.report: PassReport | None = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        start = time.perf_counter()
        outcome = self.run(model)
        self.report = PassReport(self.name, outcome.modified, dict(outcome.counts),
                                 round(time.perf_counter() - start, 4), dict(outcome.why_not))
        return ir.passes.PassResult(model, outcome.modified)

    @abstractmethod
    def run(self, model: ir.Model) -> PassOutcome:
        """Transform the model in place; say what changed."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType) -> ir.Value:
    """Register `array` (already of `dtype`'s numpy type) as a new initializer named `name`, or name_1, name_2, ...
    when that name is taken."""
    unique, i = name, 0
    while unique in graph.initializers:
        i += 1
        unique = f"{name}_{i}"
    value = ir.Value(name=unique, shape=ir.Shape(array.shape), type=ir.TensorType(dtype),
                     const_value=ir.Tensor(array, dtype=dtype, name=unique))
    graph.register_initializer(value)
    return value


def op_counts(model: ir.Model) -> Counter:
    """Node counts by op type (domain-qualified for non-default domains) in the main graph."""
    return Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph)


def node_total(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)
