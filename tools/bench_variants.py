"""A graph variant the GPU benchmark compares for CUDA-graph replay on onnxruntime-gpu (measurement harness):

    std-nononpad   std without Attention's nonpad_kv_seqlen input (the boolean mask alone bounds the keys), so the
                   CUDA kernel reads no lengths on the host and a captured graph stays valid as lengths grow

(The GroupQueryAttention form for CUDA graphs is a real dialect: ort-gqa-static, graphs/dialects.py.)
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import onnx

from ..export.manifest import file_entry, read_manifest, write_manifest


def prune(m: onnx.ModelProto) -> onnx.ModelProto:
    need = {o.name for o in m.graph.output}
    keep = []
    for n in reversed(m.graph.node):
        if any(o in need for o in n.output):
            keep.append(n)
            need.update(i for i in n.input if i)
    del m.graph.node[:]
    m.graph.node.extend(reversed(keep))
    inits = [i for i in m.graph.initializer if i.name in need]
    del m.graph.initializer[:]
    m.graph.initializer.extend(inits)
    return m


def make_variant(src: Path, dst: Path, kind: str) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    man = read_manifest(dst, verify=False)
    m = onnx.load(str(dst / "rank0.onnx"), load_external_data=False)  # weights stay in their .data file
    if kind == "std-nononpad":
        for n in m.graph.node:
            if n.op_type == "Attention" and len(n.input) > 6:
                del n.input[6:]
    else:
        raise ValueError(kind)
    onnx.save(prune(m), str(dst / "rank0.onnx"))
    rank = dataclasses.replace(man.ranks[0], onnx=file_entry(dst, "rank0.onnx"))
    write_manifest(dst, dataclasses.replace(man, ranks=[rank], dialect=f"{man.dialect}+{kind}",
                                                    capabilities={**man.capabilities, "host_free_decode": True}))
    return dst
