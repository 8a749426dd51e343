"""TileLang launches for the GPU tests, through the planning layer (resa_tl.plan) with an
optional config / split override and a preallocated (NaN-poisoned) output: what resa_tl.ops
does after its argument checks, with the knobs the tests turn."""
from __future__ import annotations

import torch

from resa_tl import plan
from resa_tl.kernels.common import aligned16


def sparse_decode(q, k_cache, v_cache, block_indices, cache_seqlens, *, block_size,
                  softmax_scale, out=None, config=None, num_splits=None):
    p = plan.sparse_decode_like(q, k_cache, v_cache, block_indices, cache_seqlens, block_size,
                                config=config, num_splits=num_splits)
    return p.run(q.contiguous(), k_cache, v_cache, block_indices.contiguous(), cache_seqlens,
                 softmax_scale, out)


def dense_decode(q, k_cache, v_cache, cache_seqlens, *, softmax_scale, out=None, config=None,
                 num_splits=None):
    p = plan.dense_decode_like(q, k_cache, v_cache, cache_seqlens, config=config,
                               num_splits=num_splits)
    return p.run(q.contiguous(), k_cache, v_cache, cache_seqlens, softmax_scale, out)


def rectify_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale, out=None,
                      config=None, num_splits=None):
    p = plan.rectify_attention_like(q, k_cache, v_cache, softmax_scale, config=config,
                                    num_splits=num_splits)
    lens = cache_seqlens.to(torch.int32)
    return p.run(q.contiguous(), k_cache, v_cache, lens, out)


def select_blocks(q, kmin, kmax, cache_seqlens, *, block_size, sparse_ratio, min_blocks,
                  local_blocks, max_selected, k_cache=None, out=None, config=None,
                  sink_blocks=0):
    p = plan.select_blocks_like(q, kmin, cache_seqlens, block_size=block_size,
                                sparse_ratio=sparse_ratio, min_blocks=min_blocks,
                                local_blocks=local_blocks, max_selected=max_selected,
                                refresh=k_cache is not None, sink_blocks=sink_blocks,
                                config=config)
    return p.run(aligned16(q), kmin, kmax, cache_seqlens.contiguous(), k_cache, out)


def block_summaries(k_cache, cache_seqlens, block_size, *, out=None, summary_dtype=None,
                    config=None):
    B, S, Hkv, D = k_cache.shape
    sdt = summary_dtype or k_cache.dtype
    if out is None:
        nb = -(-S // block_size)
        out = (torch.empty((B, nb, Hkv, D), dtype=sdt, device=k_cache.device),
               torch.empty((B, nb, Hkv, D), dtype=sdt, device=k_cache.device))
    p = plan.summaries_like(k_cache, cache_seqlens, block_size, sdt, config=config)
    return p.run(k_cache, cache_seqlens.contiguous(), *out)


def update_block_summaries(kmin, kmax, k_cache, start, length, block_size, *, config=None):
    p = plan.summaries_like(k_cache, start, block_size, kmin.dtype, "update", length,
                            config=config)
    return p.run(k_cache, start.contiguous(), kmin, kmax, length)
