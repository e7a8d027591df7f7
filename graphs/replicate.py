"""Build an L-layer step graph from a traced graph of a few layers: trace the block once, not L times.

The decoder's layers share one structure ("L x [attention -> all-reduce + RMSNorm -> FFN -> all-reduce + RMSNorm]"),
so tracing all L of them through torch.onnx repeats the same work L times. The exporter traces a model of
TEMPLATE_LAYERS layers instead and this module appends layers TEMPLATE_LAYERS..L-1 as copies of the last traced
one. Three layers are traced because the exporter shares (CSE) some values across layers: shape arithmetic is
computed once in layer 0 and reused by every later layer. In a 3-layer trace the last layer is a "middle" layer,
so what it reads falls into exactly three kinds:

- values produced by the previous layer's nodes: the chain (normed and residual hidden states); copy i reads
  the same outputs of copy i-1 (the previous layer's nodes correspond one to one, same order and op types);
- its own cache input ``past_key_values.{k}.key/.value`` and weights (values named ``...layers.{k}...``): copy i
  reads new ``past_key_values.{i}.*`` inputs and weights renamed ``...layers.{i}...``;
- anything else (graph inputs, the mask, the rotary tables, shared shape arithmetic): read as it is.

Its ``present.{k}.*`` outputs become copy i's ``present.{i}.*``; the nodes after the layers (final norm's use, the
LM head) are rewired to the last copy's chain outputs. The result equals a full trace node by node (op types,
attributes, topology); only value names of copied intermediate results differ.

Layers of different kinds (``ModelConfig.layer_kind``: a sliding window or not, Gemma 3's local or global RoPE)
have the same nodes and differ only in shared values they read (the mask, the RoPE tables). ``template_layers``
picks the traced layers so that the two traced middle layers show every kind of the later layers; the positions
where their shared inputs differ are the kind-specific ones, and each copy (and traced layer 2, when it was traced
as another layer's kind) reads there the values of its own kind.
"""

from __future__ import annotations

import re
from typing import Hashable

import onnx_ir as ir

from ..errors import LayerStructureError  # noqa: F401 - re-exported

TEMPLATE_LAYERS = 3
_LAYER = re.compile(r"\blayers\.(\d+)\b")


def node_layer(node: ir.Node) -> int | None:
    """The decoder layer a traced node belongs to, from torch.onnx's module-scope metadata (None: outside layers)."""
    m = _LAYER.search(node.metadata_props.get("namespace", ""))
    return int(m.group(1)) if m else None


def rename_layer(name: str, src: int, dst: int) -> str:
    """``...layers.{src}...`` -> ``...layers.{dst}...``; ``past_key_values.{src}.`` / ``present.{src}.`` likewise."""
    name = re.sub(rf"\blayers\.{src}\b", f"layers.{dst}", name)
    return re.sub(rf"^(past_key_values|present)\.{src}\.", rf"\g<1>.{dst}.", name)


Kind = Hashable


def template_layers(kinds: list[Kind]) -> list[int] | None:
    """Which layers to trace for a model whose layer i is of kind kinds[i] (None: trace them all).

    Layers 0 and 1, then the first later layer of a kind other than layer 1's (else layer 2): traced layers 1 and
    2 then hold every kind of layers >= 1 when there are at most two. The third traced layer is named layer 2."""
    L = len(kinds)
    if L <= TEMPLATE_LAYERS:
        return list(range(L))
    if len(set(kinds[1:])) > 2:
        return None
    return [0, 1, next((i for i in range(2, L) if kinds[i] != kinds[1]), 2)]


def replicate_layers(model: ir.Model, num_layers: int, kinds: list[Kind] | None = None,
                     traced_kinds: list[Kind] | None = None) -> ir.Model:
    """Extend `model` (a trace of TEMPLATE_LAYERS layers) in place to `num_layers` layers and return it.

    kinds: every layer's kind; traced_kinds: the kinds the traced layers were traced as (default: all one kind)."""
    graph = model.graph
    nodes = list(graph)
    layers = [node_layer(n) for n in nodes]
    last = TEMPLATE_LAYERS - 1
    if num_layers <= TEMPLATE_LAYERS or max((k for k in layers if k is not None), default=-1) != last:
        raise LayerStructureError(f"expected a trace of {TEMPLATE_LAYERS} layers to extend to {num_layers}")
    prev = [n for n, k in zip(nodes, layers) if k == last - 1]
    block = [n for n, k in zip(nodes, layers) if k == last]
    _check_same_block(prev, block)
    kinds = kinds or [None] * num_layers
    by_kind = _kind_inputs(prev, block, *(traced_kinds or [None] * TEMPLATE_LAYERS)[last - 1:last + 1])
    end = max(i for i, k in enumerate(layers) if k == last)
    if any(k is not None for k in layers[end + 1:]):
        raise LayerStructureError("layer nodes after the last layer's block; cannot find the block boundary")
    chain_of = {out: (j, o) for j, n in enumerate(prev) for o, out in enumerate(n.outputs)}
    inputs = {v.name: v for v in graph.inputs}
    outputs = list(graph.outputs)
    tail_anchor = block[-1]
    source = block  # copy i reads the chain from the copy before it
    for i in range(TEMPLATE_LAYERS, num_layers):
        copy = _copy_block(block, source, chain_of, inputs, graph, last, i, _of_kind(by_kind, kinds[i]))
        graph.insert_after(tail_anchor, copy)
        tail_anchor = copy[-1]
        for template_out in [v for v in outputs if v.producer() in block]:
            new = copy[block.index(template_out.producer())].outputs[template_out.producer().outputs.index(template_out)]
            new.name = rename_layer(template_out.name, last, i)
            graph.outputs.append(new)
        source = copy
    for (j, k), value in _of_kind(by_kind, kinds[last]).items():  # traced layer 2 as its own kind
        if block[j].inputs[k] is not value:
            block[j].replace_input_with(k, value)
    _rewire_tail(graph, block, source)
    return model


def _shared(value: ir.Value | None, layer: int) -> bool:
    """Read by a layer but made outside every layer and not named after it (mask, RoPE tables, graph inputs)."""
    if value is None or rename_layer(value.name or "", layer, layer + 1) != value.name:
        return False
    producer = value.producer()
    return producer is None or node_layer(producer) is None


def _kind_inputs(prev: list[ir.Node], block: list[ir.Node], prev_kind: Kind, block_kind: Kind
                 ) -> dict[Kind, dict[tuple[int, int], ir.Value]]:
    """kind -> {(node index, input index): the shared value a layer of that kind reads there}, at the positions
    where the traced layers 1 and 2 read different shared values."""
    last = TEMPLATE_LAYERS - 1
    differ = {(j, k): (u, v) for j, (a, b) in enumerate(zip(prev, block))
              for k, (u, v) in enumerate(zip(a.inputs, b.inputs))
              if _shared(u, last - 1) and _shared(v, last) and u is not v}
    if differ and prev_kind == block_kind:
        raise LayerStructureError(f"layers {last - 1} and {last} of one kind read different shared values at "
                                  f"{len(differ)} input(s)")
    return {prev_kind: {p: u for p, (u, _) in differ.items()}, block_kind: {p: v for p, (_, v) in differ.items()}}


def _of_kind(by_kind: dict[Kind, dict[tuple[int, int], ir.Value]], kind: Kind) -> dict[tuple[int, int], ir.Value]:
    if kind not in by_kind:
        raise LayerStructureError(f"no traced layer of kind {kind!r} to copy")
    return by_kind[kind]


def _check_same_block(prev: list[ir.Node], block: list[ir.Node]) -> None:
    ops_prev = [(n.domain, n.op_type, len(n.outputs)) for n in prev]
    ops_block = [(n.domain, n.op_type, len(n.outputs)) for n in block]
    if not block or ops_prev != ops_block:
        raise LayerStructureError(f"layers {TEMPLATE_LAYERS - 2} and {TEMPLATE_LAYERS - 1} differ in structure "
                                  f"({len(prev)} vs {len(block)} nodes)")


def _copy_block(block: list[ir.Node], source: list[ir.Node], chain_of: dict, inputs: dict[str, ir.Value],
                graph: ir.Graph, last: int, i: int, own: dict[tuple[int, int], ir.Value]) -> list[ir.Node]:
    """Copy i of the template block: chain inputs from `source`, own cache inputs and weights, and at the
    kind-specific positions `own` the values of its kind."""
    mapped: dict[ir.Value, ir.Value] = {}
    copies: list[ir.Node] = []
    for j, node in enumerate(block):
        new_inputs = [own[j, k] if (j, k) in own else _input(v, mapped, source, chain_of, inputs, graph, last, i)
                      for k, v in enumerate(node.inputs)]
        new = ir.Node(node.domain, node.op_type, new_inputs, attributes=[a for a in node.attributes.values()],
                      overload=node.overload, num_outputs=len(node.outputs), version=node.version,
                      name=f"{node.name}.layer{i}" if node.name else None, doc_string=node.doc_string,
                      metadata_props={k: rename_layer(v, last, i) for k, v in node.metadata_props.items()})
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.type, out.shape = f"{old.name}.layer{i}", old.type, old.shape
            mapped[old] = out
        copies.append(new)
    return copies


def _input(v: ir.Value | None, mapped: dict, source: list[ir.Node], chain_of: dict, inputs: dict[str, ir.Value],
           graph: ir.Graph, last: int, i: int) -> ir.Value | None:
    if v is None:
        return None
    if v in mapped:  # produced inside this copy
        return mapped[v]
    if v in chain_of:  # produced by the previous layer: the chain
        j, o = chain_of[v]
        return source[j].outputs[o]
    renamed = rename_layer(v.name or "", last, i)
    if renamed == v.name:  # shared: graph inputs, mask, rotary tables, shape arithmetic
        return v
    if v.name in inputs:  # this layer's past_key_values
        if renamed not in inputs:
            new = ir.Value(name=renamed, type=v.type, shape=v.shape)
            graph.inputs.append(new)
            inputs[renamed] = new
        return inputs[renamed]
    if v.producer() is not None or v.is_initializer():
        raise LayerStructureError(f"layer {last} reads {v.name!r}, neither the chain, a cache input nor a weight")
    key = ("weight", renamed)  # a weight: a value without producer named after its layer (export/weights.py)
    if key not in inputs:
        inputs[key] = ir.Value(name=renamed, type=v.type, shape=v.shape)  # type: ignore[index]
    return inputs[key]  # type: ignore[index]


def _rewire_tail(graph: ir.Graph, block: list[ir.Node], last_copy: list[ir.Node]) -> None:
    """Nodes after the layers (and the logits output) read the last copy's chain instead of the template's."""
    members = set(block)
    for j, node in enumerate(block):
        for o, out in enumerate(node.outputs):
            for user, index in list(out.uses()):
                if node_layer(user) is None and user not in members:
                    user.replace_input_with(index, last_copy[j].outputs[o])
