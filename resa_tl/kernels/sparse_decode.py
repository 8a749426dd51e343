"""Block-sparse split-KV decoding: one query token per row attends to the keys of its selected
blocks; the query heads of a KV group share each K/V block read."""
from __future__ import annotations

import torch

from ._reference import group_queries, heads_major, masked_attention


def sparse_decode_reference(q, k_cache, v_cache, block_indices, cache_seqlens, *, block_size,
                            softmax_scale, compute_dtype=torch.float32):
    """Torch reference of :func:`resa_tl.ops.sparse_decode` (fp32 math, output in q.dtype)."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    idx = block_indices.long()                                            # [B, Hkv, K]
    pos = (idx[..., None] * block_size + torch.arange(block_size, device=q.device)).flatten(2)
    blk_ok = (idx >= 0)[..., None].expand(*idx.shape, block_size).flatten(2)
    mask = blk_ok & (pos < cache_seqlens.view(B, 1, 1).long()) & (pos >= 0)   # [B, Hkv, K*bs]
    gather = pos.clamp(0, S - 1)[..., None]
    keys = heads_major(k_cache).gather(2, gather.expand(-1, -1, -1, k_cache.shape[-1]))
    vals = heads_major(v_cache).gather(2, gather.expand(-1, -1, -1, v_cache.shape[-1]))
    o = masked_attention(group_queries(q, Hkv), keys, vals, mask[:, :, None, :], softmax_scale,
                         compute_dtype)
    return o.reshape(B, H, -1).to(q.dtype)
