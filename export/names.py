"""The names of the ONNX contract's graph inputs and outputs and of its collective op (DESIGN.md, "The ONNX
contract").

Torch-free, so runtimes, passes and tools share one definition without importing the exporter.
"""

from __future__ import annotations

STEP_INPUTS = ("input_ids", "position_ids", "write_indices", "nonpad_kv_seqlen")
LOGITS = "logits"
# the tensor-parallel all-reduce: trt::DistCollective(collective_operation="all_reduce", reduce_op="sum", nb_rank, root=-1)
COLLECTIVE_DOMAIN = "trt"
COLLECTIVE_OP = "DistCollective"


def past_names(num_layers: int) -> list[str]:
    """past_key_values.{i}.key / .value in graph order."""
    return [f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """present.{i}.key / .value in graph order (each bound to the same buffer as its past)."""
    return [f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
