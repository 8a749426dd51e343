"""Masked softmax attention in fp32, shared by the torch references of the attention kernels."""
from __future__ import annotations

import torch


def masked_attention(q, k, v, mask, scale: float, compute_dtype=torch.float32):
    """softmax(scale * q k^T) v over the keys where ``mask`` is true, in ``compute_dtype``
    (fp32 for the references; tests also run it in fp16/bf16 to size their tolerances).

    q [B, Hkv, R, D] (the R query rows of a KV group), k [B, Hkv, N, D], v [B, Hkv, N, Dv],
    mask broadcastable to [B, Hkv, R, N]. Rows without any allowed key give 0.
    """
    cd = compute_dtype
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(dim=-1, keepdim=True)
    o = torch.matmul(p, v.to(cd))
    return torch.where(l > 0, o / l.clamp(min=torch.finfo(cd).tiny), torch.zeros_like(o))


def group_queries(q: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[B, H, D] -> [B, Hkv, g, D]: query head h belongs to KV head h // g."""
    B, H, D = q.shape
    return q.view(B, num_kv_heads, H // num_kv_heads, D)


def heads_major(cache: torch.Tensor) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, Hkv, S, D] (a view)."""
    return cache.permute(0, 2, 1, 3)
