"""The ReSA steps the transformers integration runs inside a model's forward, registered as torch
custom ops (``torch.ops.resa_tl.hf_*``).

Each op wraps one or two public ops of :mod:`resa_tl.ops`, whose argument checks and TileLang
wrappers are plain Python that torch.compile cannot (and need not) trace. As custom ops with fake
implementations they stay single opaque nodes in a compiled graph: no graph break inside
attention, and a CUDA graph captures the TileLang launches they make.
"""
from __future__ import annotations

import torch

from .. import ops

_NS = "resa_tl"


@torch.library.custom_op(f"{_NS}::hf_sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kmin: torch.Tensor, kmax: torch.Tensor, cache_seqlens: torch.Tensor,
                     block_size: int, sparse_ratio: float, min_blocks: int, local_blocks: int,
                     softmax_scale: float, backend: str) -> torch.Tensor:
    """One decode step: select blocks from the summaries, attend to them. q [B, H, D] ->
    [B, H, Dv]."""
    idx = ops.select_blocks(q, kmin, kmax, cache_seqlens, block_size=block_size,
                            sparse_ratio=sparse_ratio, min_blocks=min_blocks,
                            local_blocks=local_blocks, backend=backend)
    out = ops.sparse_decode(q, k_cache, v_cache, idx, cache_seqlens, block_size=block_size,
                            softmax_scale=softmax_scale, backend=backend)
    return out.contiguous()                      # the fake below promises a contiguous tensor


@sparse_attention.register_fake
def _(q, k_cache, v_cache, kmin, kmax, cache_seqlens, block_size, sparse_ratio, min_blocks,
      local_blocks, softmax_scale, backend):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def dense(q, k_cache, v_cache, cache_seqlens, softmax_scale: float, backend: str):
    """Causal dense attention of the last T cached tokens of every row (prefill, rectification):
    :func:`resa_tl.ops.rectify_attention`. q [B, T, H, D] -> [B, T, H, Dv].

    On the torch backend the same function is computed with torch's fused SDPA over the valid
    prefix of the cache instead of the unfused fp32 reference (a 2K-token prefill on the CPU is
    several times faster); TileLang runs the rectify kernel."""
    if ops.resolve_backend(backend, q.device, q.dtype) != "torch":
        return ops.rectify_attention(q, k_cache, v_cache, cache_seqlens,
                                     softmax_scale=softmax_scale, backend=backend)
    B, T = q.shape[:2]
    L = int(cache_seqlens.max())                         # CPU (or fp32): reading it is cheap
    last = cache_seqlens.long()[:, None] - T + torch.arange(T, device=q.device)      # [B, T]
    mask = torch.arange(L, device=q.device)[None, None] <= last[..., None]          # [B, T, L]
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k_cache[:, :L].transpose(1, 2), v_cache[:, :L].transpose(1, 2),
        attn_mask=mask[:, None], scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


@torch.library.custom_op(f"{_NS}::hf_dense_attention", mutates_args=())
def dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    cache_seqlens: torch.Tensor, softmax_scale: float,
                    backend: str) -> torch.Tensor:
    """:func:`dense` as one opaque op. q [B, T, H, D] -> [B, T, H, Dv]."""
    return dense(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend).contiguous()


@dense_attention.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend):
    return q.new_empty(*q.shape[:3], v_cache.shape[-1])


@torch.library.custom_op(f"{_NS}::hf_update_summaries", mutates_args=("kmin", "kmax"))
def update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k_cache: torch.Tensor,
                     start: torch.Tensor, length: int, block_size: int, backend: str) -> None:
    """Refresh, in place, the block summaries touched by positions [start, start + length)."""
    ops.update_block_summaries(kmin, kmax, k_cache, start, length, block_size, backend=backend)


@update_summaries.register_fake
def _(kmin, kmax, k_cache, start, length, block_size, backend):
    return None
