"""Dense split-KV decoding: one query token per row attends to all of its cached keys."""
from __future__ import annotations

import torch

from ._reference import group_queries, heads_major, masked_attention


def dense_decode_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale,
                           compute_dtype=torch.float32):
    """Torch reference of :func:`resa_tl.ops.dense_decode` (fp32 math, output in q.dtype)."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    mask = torch.arange(S, device=q.device)[None] < cache_seqlens.view(B, 1).long()   # [B, S]
    o = masked_attention(group_queries(q, Hkv), heads_major(k_cache), heads_major(v_cache),
                         mask[:, None, None, :], softmax_scale, compute_dtype)
    return o.reshape(B, H, -1).to(q.dtype)
