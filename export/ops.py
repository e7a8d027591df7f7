"""The decoder's primitive ops, each with an eager PyTorch form and an ONNX form.

Under ``torch.onnx.export`` each op is emitted as exactly one ONNX node of the "std" dialect
(opset 23/24 RMSNormalization, RotaryEmbedding, TensorScatter, Attention and trt::DistCollective);
eagerly it is plain PyTorch math, so the same module tree is both the reference and the traced graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .names import COLLECTIVE_DOMAIN, COLLECTIVE_OP

ONNX_OPSET = 24


def exporting() -> bool:
    return torch.onnx.is_in_onnx_export()


def rms_norm(x_BSH: torch.Tensor, weight_H: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in fp32, result in the input dtype (as transformers does)."""
    if exporting():
        return torch.onnx.ops.symbolic(
            "RMSNormalization", [x_BSH, weight_H], {"axis": -1, "epsilon": float(eps), "stash_type": 1},
            dtype=x_BSH.dtype, shape=x_BSH.shape, version=23)
    xf = x_BSH.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight_H * xf.to(x_BSH.dtype)


def rotary(x_BHSD: torch.Tensor, cos_PR2: torch.Tensor, sin_PR2: torch.Tensor, pos_BS: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (rotate-half) rotary embedding at explicit positions, on the first R = 2 * cos_PR2.shape[-1]
    dimensions of each head (R < D: partial rotary; the other D - R dimensions pass through)."""
    R, D = 2 * cos_PR2.shape[-1], x_BHSD.shape[-1]
    if exporting():
        return torch.onnx.ops.symbolic(
            "RotaryEmbedding", [x_BHSD, cos_PR2, sin_PR2, pos_BS],
            {"interleaved": 0, **({"rotary_embedding_dim": R} if R < D else {})},
            dtype=x_BHSD.dtype, shape=x_BHSD.shape, version=23)
    cos = cos_PR2[pos_BS].unsqueeze(1)  # B,1,S,R/2
    sin = sin_PR2[pos_BS].unsqueeze(1)
    x1, x2 = x_BHSD[..., :R].float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_BHSD[..., R:].float()), dim=-1)
    return out.to(x_BHSD.dtype)


def cache_update(cache_BHTD: torch.Tensor, new_BHSD: torch.Tensor, write_B: torch.Tensor) -> torch.Tensor:
    """Write new_BHSD into rows [write_B[b], write_B[b]+S) of each sequence's cache, in place."""
    if exporting():
        return torch.onnx.ops.symbolic(
            "TensorScatter", [cache_BHTD, new_BHSD, write_B], {"axis": -2, "mode": "linear"},
            dtype=cache_BHTD.dtype, shape=cache_BHTD.shape, version=24)
    B, H, S, D = new_BHSD.shape
    rows_BS = write_B[:, None] + torch.arange(S, device=write_B.device)
    # scatter_ along the sequence axis: one simple kernel (advanced-index assignment sorts its indices on CUDA)
    cache_BHTD.scatter_(2, rows_BS[:, None, :, None].expand(B, H, S, D), new_BHSD.to(cache_BHTD.dtype))
    return cache_BHTD


def attention(q_BHSD: torch.Tensor, k_BKTD: torch.Tensor, v_BKTD: torch.Tensor, mask_B1ST: torch.Tensor,
              nonpad_B: torch.Tensor, scale: float, softcap: float = 0.0) -> torch.Tensor:
    """Grouped-query attention of S queries over the cache, masked by position (mask_B1ST, True = attend).

    softcap > 0: scores -> softcap * tanh(scores / softcap) before the mask (Gemma 2; the ONNX op's attribute)."""
    if exporting():
        attrs = {"is_causal": 0, "scale": float(scale), **({"softcap": float(softcap)} if softcap else {})}
        return torch.onnx.ops.symbolic(
            "Attention", [q_BHSD, k_BKTD, v_BKTD, mask_B1ST, None, None, nonpad_B],
            attrs, dtype=q_BHSD.dtype, shape=q_BHSD.shape, version=24)
    T = mask_B1ST.shape[-1]  # the eager caller may pass a mask over a prefix of the cache only
    k_BKTD, v_BKTD = k_BKTD[:, :, :T], v_BKTD[:, :, :T]
    if not softcap:
        return F.scaled_dot_product_attention(q_BHSD, k_BKTD, v_BKTD, attn_mask=mask_B1ST, scale=scale,
                                              enable_gqa=True)
    group = q_BHSD.shape[1] // k_BKTD.shape[1]
    k_BHTD, v_BHTD = (t.repeat_interleave(group, dim=1) for t in (k_BKTD, v_BKTD))
    scores_BHST = soft_cap(torch.matmul(q_BHSD, k_BHTD.transpose(2, 3)) * scale, softcap)
    scores_BHST = scores_BHST.masked_fill(~mask_B1ST, torch.finfo(scores_BHST.dtype).min)
    probs_BHST = torch.softmax(scores_BHST.float(), dim=-1).to(q_BHSD.dtype)
    return torch.matmul(probs_BHST, v_BHTD)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap), in x's dtype (Gemma's soft-capping; traced as Div, Tanh, Mul)."""
    return torch.tanh(x / cap) * cap


# ModelConfig.hidden_act -> the gate activation; under export F.gelu traces to one ONNX Gelu (opset 20) node.
ACTIVATIONS = {
    "silu": lambda x: x * torch.sigmoid(x),  # traced as Sigmoid + Mul (the SwiGLU form the passes expect)
    "gelu": F.gelu,  # erf form: transformers' "gelu"
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),  # transformers' "gelu_new", "gelu_pytorch_tanh", ...
}


def all_reduce(x: torch.Tensor, group: "ReduceGroup | None") -> torch.Tensor:
    """Sum over tensor-parallel ranks; the identity at world size 1."""
    if group is None or group.world_size == 1:
        return x
    if exporting():
        return torch.onnx.ops.symbolic(
            f"{COLLECTIVE_DOMAIN}::{COLLECTIVE_OP}", [x],
            {"collective_operation": "all_reduce", "reduce_op": "sum", "nb_rank": group.world_size, "root": -1},
            dtype=x.dtype, shape=x.shape, version=1)
    return group.all_reduce(x)


class ReduceGroup:
    """What an all-reduce needs: the world size and a sum. Subclasses: in-process threads, torch.distributed."""

    world_size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
