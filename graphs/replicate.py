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
"""

from __future__ import annotations

import re

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


def replicate_layers(model: ir.Model, num_layers: int) -> ir.Model:
    """Extend `model` (a trace of TEMPLATE_LAYERS layers) in place to `num_layers` layers and return it."""
    graph = model.graph
    nodes = list(graph)
    layers = [node_layer(n) for n in nodes]
    last = TEMPLATE_LAYERS - 1
    if num_layers <= TEMPLATE_LAYERS or max((k for k in layers if k is not None), default=-1) != last:
        raise LayerStructureError(f"expected a trace of {TEMPLATE_LAYERS} layers to extend to {num_layers}")
    prev = [n for n, k in zip(nodes, layers) if k == last - 1]
    block = [n for n, k in zip(nodes, layers) if k == last]
    _check_same_block(prev, block)
    end = max(i for i, k in enumerate(layers) if k == last)
    if any(k is not None for k in layers[end + 1:]):
        raise LayerStructureError("layer nodes after the last layer's block; cannot find the block boundary")
    chain_of = {out: (j, o) for j, n in enumerate(prev) for o, out in enumerate(n.outputs)}
    inputs = {v.name: v for v in graph.inputs}
    outputs = list(graph.outputs)
    tail_anchor = block[-1]
    source = block  # copy i reads the chain from the copy before it
    for i in range(TEMPLATE_LAYERS, num_layers):
        copy = _copy_block(block, source, chain_of, inputs, graph, last, i)
        graph.insert_after(tail_anchor, copy)
        tail_anchor = copy[-1]
        for template_out in [v for v in outputs if v.producer() in block]:
            new = copy[block.index(template_out.producer())].outputs[template_out.producer().outputs.index(template_out)]
            new.name = rename_layer(template_out.name, last, i)
            graph.outputs.append(new)
        source = copy
    _rewire_tail(graph, block, source)
    return model


def _check_same_block(prev: list[ir.Node], block: list[ir.Node]) -> None:
    ops_prev = [(n.domain, n.op_type, len(n.outputs)) for n in prev]
    ops_block = [(n.domain, n.op_type, len(n.outputs)) for n in block]
    if not block or ops_prev != ops_block:
        raise LayerStructureError(f"layers {TEMPLATE_LAYERS - 2} and {TEMPLATE_LAYERS - 1} differ in structure "
                                  f"({len(prev)} vs {len(block)} nodes)")


def _copy_block(block: list[ir.Node], source: list[ir.Node], chain_of: dict, inputs: dict[str, ir.Value],
                graph: ir.Graph, last: int, i: int) -> list[ir.Node]:
    """Copy i of the template block: chain inputs from `source`, own cache inputs and weights."""
    mapped: dict[ir.Value, ir.Value] = {}
    copies: list[ir.Node] = []
    for node in block:
        new_inputs = [_input(v, mapped, source, chain_of, inputs, graph, last, i) for v in node.inputs]
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
