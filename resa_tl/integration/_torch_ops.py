"""The ReSA steps the transformers integration runs inside a model's forward, registered as torch
custom ops (``torch.ops.resa_tl.hf_*``).

Each op wraps one or two public ops of :mod:`resa_tl.ops`, whose argument checks and TileLang
wrappers are plain Python that torch.compile cannot (and need not) trace. As custom ops with fake
implementations they stay single opaque nodes in a compiled graph: no graph break inside
attention, and a CUDA graph captures the TileLang launches they make.

The attention function (resa_tl.integration.hf) uses the registered ops only where
:func:`use_registered_op` says so (while torch.compile traces, or where autograd could record);
an eager step launches through its cache's resa_tl.cycle.StepAttention instead, whose plans are
resolved once per cache. :func:`sparse_attention`, :func:`dense_attention` and
:func:`update_summaries` make the same choice for the other callers (the cache's warm-up and
summary updates): the custom-op dispatcher (default filling, autograd and version-counter
layers) costs ~0.1 ms of host time per call, which an eager step would pay in every layer.
"""
from __future__ import annotations

import functools

import torch

from .. import ops
from .chunk_attention import chunk_attention

_NS = "resa_tl"


def _sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      kmin: torch.Tensor, kmax: torch.Tensor, cache_seqlens: torch.Tensor,
                      block_size: int, sparse_ratio: float, min_blocks: int, local_blocks: int,
                      sink_blocks: int, softmax_scale: float, backend: str,
                      refresh: bool) -> torch.Tensor:
    """:func:`resa_tl.cycle.sparse_step` as one opaque op (its configuration as scalars, which
    a custom op can take). q [B, H, D] -> [B, H, Dv], contiguous."""
    from ..config import ReSAConfig
    from ..cycle import sparse_step
    config = ReSAConfig(block_size=block_size, sparse_ratio=sparse_ratio, min_blocks=min_blocks,
                        local_blocks=local_blocks, sink_blocks=sink_blocks)
    out = sparse_step(q, k_cache, v_cache, kmin, kmax, cache_seqlens, config, softmax_scale,
                      backend, refresh)
    return out.contiguous()                      # the fake below promises a contiguous tensor


_sparse_op = torch.library.custom_op(f"{_NS}::hf_sparse_attention",
                                    mutates_args=("kmin", "kmax"))(_sparse_attention)


@_sparse_op.register_fake
def _(q, k_cache, v_cache, kmin, kmax, cache_seqlens, block_size, sparse_ratio, min_blocks,
      local_blocks, sink_blocks, softmax_scale, backend, refresh):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def dense(q, k_cache, v_cache, cache_seqlens, softmax_scale: float, backend: str,
          use_kernel: bool = True):
    """Causal dense attention of the last T cached tokens of every row (prefill, rectification),
    the function of :func:`resa_tl.ops.rectify_attention`. q [B, T, H, D] -> [B, T, H, Dv].

    The TileLang rectify kernel takes T <= RECTIFY_MAX_T (64) and compiles once per T, so it runs
    only where ``use_kernel`` (the caller passes it for the rectification length f + 1, the
    one dense shape inside the decode loop). Prompts and other chunks use torch's flash
    attention (:func:`sdpa_dense`), as does the torch backend."""
    from ..kernels.rectify_attention import RECTIFY_MAX_T
    T = q.shape[1]
    if use_kernel and T <= RECTIFY_MAX_T and \
            ops.resolve_backend(backend, q.device, q.dtype) == "tilelang":
        return ops.rectify_attention(q, k_cache, v_cache, cache_seqlens,
                                     softmax_scale=softmax_scale, backend=backend)
    return sdpa_dense(q, k_cache, v_cache, cache_seqlens, softmax_scale)


def sdpa_dense(q, k_cache, v_cache, cache_seqlens, softmax_scale: float, chunk: int = 256):
    """:func:`dense` with torch SDPA. Outside CUDA-graph capture: exact chunk attention
    (:mod:`resa_tl.integration.chunk_attention`: prefix and chunk as two flash calls merged,
    no mask, no copy of the cache), which reads the lengths on the host. While a CUDA graph is
    being captured (no host reads) it masks the whole cache instead, ``chunk`` queries at a
    time."""
    if not (q.is_cuda and torch.cuda.is_current_stream_capturing()):
        return chunk_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    B, T, H, D = q.shape
    qh = q.transpose(1, 2)                                              # [B, H, T, D]
    L = k_cache.shape[1]
    kh, vh = k_cache.transpose(1, 2), v_cache.transpose(1, 2)
    last = cache_seqlens.long()[:, None] - T + torch.arange(T, device=q.device)     # [B, T]
    keys = torch.arange(L, device=q.device)
    out = q.new_empty(B, T, H, v_cache.shape[-1])
    for s in range(0, T, chunk):                     # bounds the mask to [B, chunk, L]
        e = min(T, s + chunk)
        mask = keys[None, None] <= last[:, s:e, None]
        o = sdpa(qh[:, :, s:e], kh, vh, attn_mask=mask[:, None], scale=softmax_scale,
                 enable_gqa=True)
        out[:, s:e] = o.transpose(1, 2)
    return out


def _dense_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     cache_seqlens: torch.Tensor, softmax_scale: float, backend: str,
                     use_kernel: bool) -> torch.Tensor:
    """:func:`dense` as one opaque op. q [B, T, H, D] -> [B, T, H, Dv]."""
    return dense(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend,
                 use_kernel).contiguous()


_dense_op = torch.library.custom_op(f"{_NS}::hf_dense_attention",
                                   mutates_args=())(_dense_attention)


@_dense_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale, backend, use_kernel):
    return q.new_empty(*q.shape[:3], v_cache.shape[-1])


def _update_summaries(kmin: torch.Tensor, kmax: torch.Tensor, k_cache: torch.Tensor,
                      start: torch.Tensor, length: int, block_size: int, backend: str) -> None:
    """Refresh, in place, the block summaries touched by positions [start, start + length)."""
    ops.update_block_summaries(kmin, kmax, k_cache, start, length, block_size, backend=backend)


_update_op = torch.library.custom_op(f"{_NS}::hf_update_summaries",
                                    mutates_args=("kmin", "kmax"))(_update_summaries)


@_update_op.register_fake
def _(kmin, kmax, k_cache, start, length, block_size, backend):
    return None


def use_registered_op(*tensors) -> bool:
    """Whether a call must go through the registered custom op: while torch.compile traces
    (an opaque node in the graph), and where autograd could record (grad enabled and a tensor
    requires grad: the op then fails loudly at backward, having no autograd formula, where a
    plain call would silently cut the graph). Otherwise the plain function (or, in an
    attached model's eager step, the cache's plans) saves the dispatcher's ~0.1 ms of host
    time per call."""
    return torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors))


def _dispatch(op, plain):
    """``op`` (the registered custom op) where :func:`use_registered_op`, else ``plain``."""
    @functools.wraps(plain)
    def call(*args, **kwargs):
        if use_registered_op(*args, *kwargs.values()):
            return op(*args, **kwargs)
        return plain(*args, **kwargs)
    return call


hf_sparse_attention = torch.ops.resa_tl.hf_sparse_attention
hf_dense_attention = torch.ops.resa_tl.hf_dense_attention
sparse_attention = _dispatch(hf_sparse_attention, _sparse_attention)
dense_attention = _dispatch(hf_dense_attention, _dense_attention)
update_summaries = _dispatch(torch.ops.resa_tl.hf_update_summaries, _update_summaries)
