"""Rectification attention: the last T tokens of each row (their K/V already in the cache)
attend densely to the cache, causally within the chunk. Prefill uses it too."""
from __future__ import annotations

import torch

from ._reference import heads_major, masked_attention


def rectify_attention_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale,
                                compute_dtype=torch.float32):
    """Torch reference of :func:`resa_tl.ops.rectify_attention` (fp32 math, output in q.dtype).

    q [B, T, H, D]; query t of row b attends to keys [0, cache_seqlens[b] - T + t].
    """
    B, T, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    g = H // Hkv
    qg = q.permute(0, 2, 1, 3).reshape(B, Hkv, g * T, D)                  # rows ordered (head, t)
    last = cache_seqlens.view(B, 1).long() - T + torch.arange(T, device=q.device)   # [B, T]
    mask = torch.arange(S, device=q.device)[None, None] <= last[..., None]          # [B, T, S]
    mask = mask[:, None].expand(B, g, T, S).reshape(B, 1, g * T, S)
    o = masked_attention(qg, heads_major(k_cache), heads_major(v_cache), mask, softmax_scale,
                         compute_dtype)
    return o.view(B, H, T, -1).permute(0, 2, 1, 3).to(q.dtype)
