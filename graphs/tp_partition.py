"""Cut one tensor-parallel rank graph at its collectives into segments a runtime without collectives can run.

    rank graph:  ... -> MatMul(o_proj) -> DistCollective(all_reduce) -> Add(residual) -> ...
    segment k:   ... -> MatMul(o_proj) => output `partial` (the collective's input)
    runtime:     all_reduce(partial) in place, with torch.distributed
    segment k+1: input `reduced` (the collective's output, bound to the same buffer) -> Add -> ...

A node lands in the earliest segment its inputs allow (the DistCollective's output is available one segment
after its input), so each layer's TensorScatter and Attention stay together with the past/present cache
they update in place. Cheap nodes computed from graph inputs only (masks, shape arithmetic: no initializer
over ``REPLICATE_MAX_ELEMENTS``) and constant subgraphs (folded at load) are replicated into every segment that
needs them instead of being passed between segments. What crosses a boundary is then the partial sum and the
residual stream.

Weights are held once per rank: a tied LM head ``MatMul(h, Transpose(E))`` becomes ``FusedMatMul(h, E, transB=1)``
(graphs/passes/tied_lm_head.py; ONNX Runtime would fold the Transpose into a second copy of the embedding at
load), and an initializer over ``REPLICATE_MAX_ELEMENTS`` that several nodes read (the tied embedding: the Gather in
the first segment, the head in the last; RoPE tables read by every layer) becomes an input of the segments,
listed in ``Partition.shared_weights``: the runtime binds one tensor per rank to all of them instead of every
session loading its own copy.

Segments are built in memory at load time (``partition(ir.load(rank_file))``), not written into the artifact:
the rank file stays the one checksummed source (passes that rewrite it cannot leave stale segment files),
TensorRT consumes the DistCollective natively and never needs segments, and cutting takes milliseconds per
layer. Initializers keep their tensors (external data stays external: see ``segment_bytes``).

This is one model in, N models out, so it is a function with the pass contract spelled out rather than an
``onnx_ir.passes`` pass (whose result is one model): requires a topologically sortable graph whose
collectives are single-input all_reduce/sum nodes; ensures every segment is a self-contained model with
the original value names, and ``Partition.counts`` reports what was done.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable

import onnx_ir as ir

from ..errors import PartitionError  # noqa: F401 - re-exported
from ..export.names import COLLECTIVE_DOMAIN, COLLECTIVE_OP

REPLICATE_MAX_ELEMENTS = 4096  # a graph-input-only node reading a larger initializer (an embedding) is not copied

Dim = int | str


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: int  # onnx TensorProto element type
    shape: tuple[Dim | None, ...] | None  # str = symbolic dimension, None = unknown


@dataclass(frozen=True)
class Segment:
    index: int
    model: ir.Model | None  # None in a partition ``without_weights`` (its sessions were built)
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    reduce: tuple[str, ...]  # outputs to all-reduce (sum over ranks) right after this segment runs


@dataclass(frozen=True)
class Partition:
    segments: tuple[Segment, ...]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str, ...]
    aliases: dict[str, str]  # collective output -> its input: the same buffer after the in-place all-reduce
    tensors: dict[str, TensorInfo]  # every segment input and output
    counts: dict[str, int] = field(default_factory=dict)
    shared_weights: dict[str, ir.TensorProtocol] = field(default_factory=dict)  # segment inputs bound once per rank

    def without_weights(self) -> "Partition":
        """The same cut without the segment models and weight data: what a runtime keeps once its sessions were
        built, so the host copies of the weights are freed (the sessions and the bound tensors hold them)."""
        return replace(self, segments=tuple(replace(s, model=None) for s in self.segments), shared_weights={})

    def consumers(self, name: str) -> list[int]:
        return [s.index for s in self.segments if name in s.inputs]

    def producer(self, name: str) -> int | None:
        return next((s.index for s in self.segments if name in s.outputs), None)


def is_collective(node: ir.Node) -> bool:
    return node.domain == COLLECTIVE_DOMAIN and node.op_type == COLLECTIVE_OP


def _check_collective(node: ir.Node) -> None:
    attrs = {k: a.value for k, a in node.attributes.items()}
    if attrs.get("collective_operation") != "all_reduce" or attrs.get("reduce_op", "sum") != "sum":
        raise PartitionError(f"{node.name or node.op_type}: only all_reduce/sum collectives can be cut, got {attrs}")
    if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
        raise PartitionError(f"{node.name or node.op_type}: a DistCollective needs exactly one input and one output")
    if node.inputs[0].producer() is None:
        raise PartitionError(f"{node.name or node.op_type}: its input {node.inputs[0].name} is not computed by the "
                             f"graph; nothing to cut")


def _small_initializer(v: ir.Value) -> bool:
    return v.const_value is not None and v.const_value.size <= REPLICATE_MAX_ELEMENTS


def _replicable_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes recomputed wherever they are needed instead of passed between segments.

    Constant subgraphs (initializers only, e.g. the Transpose of a tied embedding for the lm_head): ONNX Runtime
    folds them at load, so a copy in each consumer costs nothing per step. And cheap nodes computed from graph
    inputs and small constants only (masks, shape arithmetic).
    """
    graph_inputs = set(graph.inputs)
    constant: dict[ir.Node, bool] = {}  # constant node -> built from small tensors only
    dynamic: set[ir.Node] = set()
    for node in graph:
        if is_collective(node):
            continue
        ins = [v for v in node.inputs if v is not None]
        if all(v.is_initializer() or v.producer() in constant for v in ins):
            attrs_small = all(getattr(a.value, "size", 0) <= REPLICATE_MAX_ELEMENTS for a in node.attributes.values())
            constant[node] = attrs_small and all(
                _small_initializer(v) if v.is_initializer() else constant[v.producer()] for v in ins)
        elif all(v in graph_inputs or _small_initializer(v) or constant.get(v.producer(), False)
                 or v.producer() in dynamic for v in ins):
            dynamic.add(node)
    return set(constant) | dynamic


def _assign(graph: ir.Graph, replicable: set[ir.Node]) -> dict[ir.Node, int]:
    """Earliest segment per node (replicated nodes excluded); a collective's output is ready one segment later."""
    level: dict[ir.Value, int] = {}
    seg: dict[ir.Node, int] = {}
    for node in graph:
        if node in replicable:
            continue
        s = max((level.get(v, 0) for v in node.inputs if v is not None), default=0)
        seg[node] = s
        for out in node.outputs:
            level[out] = s + 1 if is_collective(node) else s
    return seg


def _closure(nodes: Iterable[ir.Node], replicable: set[ir.Node]) -> set[ir.Node]:
    """The replicated nodes that `nodes` need, transitively."""
    need: set[ir.Node] = set()
    stack = [v.producer() for n in nodes for v in n.inputs if v is not None]
    while stack:
        p = stack.pop()
        if p is not None and p in replicable and p not in need:
            need.add(p)
            stack.extend(v.producer() for v in p.inputs if v is not None)
    return need


def _info(v: ir.Value) -> TensorInfo:
    dtype = v.dtype.value if v.dtype is not None else 0
    shape = None if v.shape is None else tuple(d if isinstance(d, int) else d.value for d in v.shape.dims)
    return TensorInfo(v.name, dtype, shape)


def partition(model: ir.Model) -> Partition:
    """Cut `model` (one rank's graph) at its DistCollective nodes; with none, one segment: the whole graph."""
    graph = model.graph
    tied = _untie_head(model)
    graph.sort()
    collectives = [n for n in graph if is_collective(n)]
    for node in collectives:
        _check_collective(node)
    replicable = _replicable_nodes(graph)
    seg = _assign(graph, replicable)
    n_seg = max((s + 1 if is_collective(n) else s for n, s in seg.items()), default=0) + 1
    members: list[list[ir.Node]] = [[] for _ in range(n_seg)]
    for node, s in seg.items():
        if not is_collective(node):
            members[s].append(node)
    # graph outputs computed by replicated nodes only (unusual) come from segment 0
    members[0] += [v.producer() for v in graph.outputs if v.producer() in replicable]
    order = {n: i for i, n in enumerate(graph)}
    later_use: dict[ir.Value, int] = {}  # value -> last segment that reads it
    for s, nodes in enumerate(members):
        for node in nodes:
            for v in node.inputs:
                if v is not None:
                    later_use[v] = max(later_use.get(v, -1), s)
    aliases = {c.outputs[0].name: c.inputs[0].name for c in collectives}
    reduce_at: dict[int, list[ir.Value]] = {}
    for c in collectives:
        reduce_at.setdefault(seg[c], []).append(c.inputs[0])
        if later_use.get(c.inputs[0], -1) > seg[c]:
            raise PartitionError(f"{c.inputs[0].name} is all-reduced in place but also read after the collective; "
                                 f"the runtime cannot keep the unreduced value")
    seg_nodes = [sorted(set(members[s]) | _closure(members[s], replicable), key=order.__getitem__)
                 for s in range(n_seg)]
    weights = _shared_weights(seg_nodes)
    segments, tensors = [], {}
    for s, nodes in enumerate(seg_nodes):
        shared = {v for n in nodes if n not in replicable for v in n.outputs}  # replicated values never cross
        segment = _segment(model, s, nodes, graph, later_use, shared, reduce_at.get(s, []), weights)
        segments.append(segment)
        for v in _io_values(nodes, graph):
            tensors[v.name] = _info(v)
    for v in weights:
        tensors[v.name] = _info(v)
    counts = {"segments": n_seg, "collectives": len(collectives), "replicated_nodes": len(replicable),
              "cross_tensors": len({n for s in segments for n in s.outputs} - {v.name for v in graph.outputs}),
              "shared_weights": len(weights), "tied_head": tied}
    return Partition(tuple(segments), tuple(v.name for v in graph.inputs), tuple(v.name for v in graph.outputs),
                     aliases, tensors, counts, {v.name: v.const_value for v in weights})


def _untie_head(model: ir.Model) -> int:
    """MatMul(h, Transpose(E)) -> FusedMatMul(h, E, transB=1) for a tied head (graphs/passes/tied_lm_head.py; the
    Transpose left unused is a constant node no segment needs). Returns the heads rewritten."""
    from .passes.tied_lm_head import TiedLmHeadPass

    rewrite = TiedLmHeadPass()
    rewrite(model)
    return rewrite.report.counts.get("FusedMatMul", 0) if rewrite.report else 0


def _shared_weights(seg_nodes: list[list[ir.Node]]) -> list[ir.Value]:
    """Initializers over REPLICATE_MAX_ELEMENTS that more than one node reads (in one segment or several), in
    first-use order. Within one session too: ONNX Runtime prepacks the head's copy of a tied table for its CPU
    GEMM and keeps the original for the Gather, two copies; bound as an input, the table is held once."""
    readers: dict[ir.Value, int] = {}
    for nodes in seg_nodes:
        for n in nodes:
            for v in n.inputs:
                if v is not None and v.is_initializer() and not _small_initializer(v):
                    readers[v] = readers.get(v, 0) + 1
    return [v for v, count in readers.items() if count > 1]


def _io_values(nodes: list[ir.Node], graph: ir.Graph) -> list[ir.Value]:
    vals = [v for n in nodes for v in (*n.inputs, *n.outputs) if v is not None and not v.is_initializer()]
    return vals + list(graph.inputs) + list(graph.outputs)


def _segment(model: ir.Model, index: int, nodes: list[ir.Node], graph: ir.Graph, later_use: dict[ir.Value, int],
             shared: set[ir.Value], reduce: list[ir.Value], weights: list[ir.Value]) -> Segment:
    inside = {v for n in nodes for v in n.outputs}
    graph_outputs = set(graph.outputs)
    inputs, initializers, seen = [], [], set()
    for n in nodes:
        for v in n.inputs:
            if v is None or v in inside or v in seen:
                continue
            seen.add(v)
            (initializers if v.is_initializer() and v not in weights else inputs).append(v)
    position = {v: i for i, v in enumerate(graph.inputs)}
    inputs.sort(key=lambda v: position.get(v, len(position)))  # graph inputs first, in contract order
    outputs = [v for n in nodes for v in n.outputs
               if v in graph_outputs or (v in shared and later_use.get(v, -1) > index) or v in reduce]
    outputs.sort(key=lambda v: (0, list(graph.outputs).index(v)) if v in graph_outputs else (1, 0))
    view = ir.GraphView(inputs, outputs, nodes=nodes, initializers=initializers,
                        opset_imports=_opsets(graph, nodes), name=f"{graph.name or 'rank'}_seg{index}")
    seg_model = ir.Model(view.clone(), ir_version=model.ir_version, producer_name="decodekit.tp_partition")
    for v in seg_model.graph.inputs:
        if v.const_value is not None:  # a shared weight: bound by the runtime, not stored in the segment
            v.const_value = None
    return Segment(index, seg_model, tuple(v.name for v in inputs), tuple(v.name for v in outputs),
                   tuple(v.name for v in reduce))


def _opsets(graph: ir.Graph, nodes: list[ir.Node]) -> dict[str, int]:
    used = {n.domain for n in nodes} | {""}
    return {d: v for d, v in graph.opset_imports.items() if d in used}


def initializer_bytes(segment: Segment) -> dict[str, int]:
    """Bytes of each initializer the segment's model stores (what its session loads)."""
    if segment.model is None:
        raise PartitionError(f"segment {segment.index} was dropped (Partition.without_weights)")
    return {v.name: v.const_value.nbytes for v in segment.model.graph.initializers.values()
            if v.const_value is not None}


def segment_bytes(segment: Segment) -> bytes:
    """The serialized segment; external initializers stay references to the rank's data file (load the
    bytes with ONNX Runtime's ``session.model_external_initializers_file_folder_path`` = the artifact folder)."""
    return ir.to_proto(segment.model).SerializeToString()


# ------------------------------------------------------------------------------------------ storage planning


@dataclass(frozen=True)
class StoragePlan:
    """Buffers for the tensors that cross segment boundaries: value name -> slot; slots are reused once dead."""

    slot_of: dict[str, int]
    slots: tuple[TensorInfo, ...]  # dtype and (symbolic) shape of each slot


def plan_storage(p: Partition) -> StoragePlan:
    """Give each cross-segment tensor a slot; a collective's output shares its input's slot (in-place sum).

    Lifetime of a value = [producing segment, last reading segment] (of it or its alias); two values share a
    slot when their lifetimes do not overlap and dtype/shape agree. Graph inputs and outputs are not planned:
    the runtime binds them (step inputs, caches, logits).
    """
    graph_io = set(p.graph_inputs) | set(p.graph_outputs)
    alias_of = {src: dst for dst, src in p.aliases.items()}  # partial -> reduced
    lives: list[tuple[int, int, str]] = []
    for seg in p.segments:
        for name in seg.outputs:
            if name in graph_io:
                continue
            last = max([*p.consumers(name), *p.consumers(alias_of.get(name, "")), seg.index])
            lives.append((seg.index, last, name))
    slot_of: dict[str, int] = {}
    slots: list[TensorInfo] = []
    busy_until: list[int] = []
    for first, last, name in sorted(lives):
        info = p.tensors[name]
        if info.shape is None or any(d is None for d in info.shape):
            raise PartitionError(f"{name} crosses a segment boundary but its shape is unknown; "
                                 f"run shape inference on the graph before partitioning")
        key = (info.dtype, info.shape)
        free = [i for i, s in enumerate(slots) if (s.dtype, s.shape) == key and busy_until[i] < first]
        if free:
            slot_of[name], busy_until[free[0]] = free[0], last
        else:
            slot_of[name] = len(slots)
            slots.append(TensorInfo(f"slot{len(slots)}", info.dtype, info.shape))
            busy_until.append(last)
    for dst, src in p.aliases.items():
        slot_of[dst] = slot_of[src]
    return StoragePlan(slot_of, tuple(slots))


# ------------------------------------------------------------------------------------- cuts for a tp=1 graph


def insert_cuts(model: ir.Model, values: Iterable[str]) -> int:
    """Insert a 1-rank DistCollective after each named value (in place): a tp=1 graph segmented where the
    tp=N graph is cut, to measure what segmentation costs. Returns the number of cuts inserted."""
    graph = model.graph
    by_name = {v.name: v for n in graph for v in n.outputs}
    count = 0
    for name in values:
        v = by_name.get(name)
        if v is None:
            raise PartitionError(f"no value named {name!r} in the graph; cannot cut there")
        uses = list(v.uses())
        out = ir.Value(name=f"{name}__reduced", shape=v.shape, type=v.type)
        node = ir.Node(COLLECTIVE_DOMAIN, COLLECTIVE_OP, [v], [
            ir.AttrString("collective_operation", "all_reduce"), ir.AttrString("reduce_op", "sum"),
            ir.AttrInt64("nb_rank", 1), ir.AttrInt64("root", -1)], outputs=[out], version=1)
        for use_node, index in uses:
            use_node.replace_input_with(index, out)
        graph.insert_after(v.producer(), node)
        count += 1
    graph.opset_imports.setdefault(COLLECTIVE_DOMAIN, 1)
    return count


def collective_inputs(model: ir.Model) -> list[str]:
    """Names of the values the DistCollective nodes reduce, in graph order (the tp=N cut points)."""
    return [n.inputs[0].name for n in model.graph if is_collective(n)]
