"""The ReSA decode cycle, in one place: which step is sparse, when to rectify, what to rewind,
and the attention each kind of step runs over a :class:`resa_tl.ReSACache`.

A cycle: after a dense pass (the prompt, or a rectification), decode steps feed one token per
row and attend sparsely (select_blocks + sparse_decode). Once ``rectify_every = f`` tokens were
decoded that way, the next forward rewinds them and feeds them again, together with the new
token, in one dense pass (rectify_attention over f + 1 tokens): rectification fused into
decoding, so it costs no extra forward, and the K/V of those tokens become what dense decoding
would have written. f = 0 decodes sparsely forever.

Users of the cycle: the transformers integration (resa_tl.integration), the reference decoder
over plain tensors (resa_tl.reference_cycle), the teacher-forced fidelity harness
(resa_tl.fidelity, through :func:`cycle_spans`) and the end-to-end benchmark.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops, plan
from .cache import ReSACache
from .kernels.block_summaries import fp8_name
from .kernels.common import int_dtype, tl_dtype
from .kernels.dense_decode import DenseDecodeShape
from .kernels.rectify_attention import RECTIFY_MAX_T
from .kernels.select_blocks import SelectShape, default_max_selected
from .kernels.sparse_decode import SparseDecodeShape


@dataclass
class DecodeCycle:
    """Host-side state of the cycle: how many tokens were decoded sparsely since the last
    dense pass, and what the next forward must rewind."""
    rectify_every: int
    pending: int = 0

    def rewind_before(self, new_tokens: int, can_refeed: bool = True) -> int:
        """Positions per row the next forward, which feeds ``new_tokens`` new tokens, must
        rewind and feed again densely with them: every pending sparse token when a
        rectification is due (pending >= f > 0), or when the forward is a dense
        multi-token chunk anyway (folding them in costs no extra pass); else 0.
        ``can_refeed`` False: the caller cannot supply those tokens again (0)."""
        if not self.pending or not can_refeed:
            return 0
        f = self.rectify_every
        if new_tokens > 1 or (f and self.pending >= f):
            return self.pending
        return 0

    def advance(self, fed: int) -> None:
        """After a forward that fed ``fed`` tokens per row (re-fed ones included): one token
        is a sparse step, more is a dense pass."""
        self.pending = self.pending + 1 if fed == 1 else 0

    def reset(self) -> None:
        self.pending = 0


def cycle_spans(num_steps: int, rectify_every: int):
    """The cycles of ``num_steps`` decode steps after a dense prefill, as (first step, end
    step, sparse steps): steps [first, first + sparse) decode sparsely, and when
    sparse < end - first the cycle's last step is the fused dense pass that rewrites the K/V
    of the whole cycle. f = 0: one cycle, all sparse."""
    f = rectify_every
    length = f + 1 if f else max(num_steps, 1)
    spans = []
    for c0 in range(0, num_steps, length):
        c1 = min(c0 + length, num_steps)
        spans.append((c0, c1, min(f, c1 - c0) if f else c1 - c0))
    return spans


def per_token_time(t_sparse: float, t_dense: float, rectify_every: int) -> float:
    """Mean time per decoded token over a whole cycle: f sparse steps and one fused dense
    step of f + 1 tokens per f + 1 tokens (sparse only when f = 0)."""
    f = rectify_every
    return (f * t_sparse + t_dense) / (f + 1) if f else t_sparse


def sparse_step(q, k_cache, v_cache, kmin, kmax, cache_seqlens, config, softmax_scale: float,
                backend: str = "auto", refresh: bool = False):
    """One sparse decode step through :mod:`resa_tl.ops` (arguments checked): select blocks
    from the summaries (with ``refresh``, also rewrite each row's newest block summary from
    k_cache), attend to them. q [B, H, D] -> [B, H, Dv].

    ``config.sparse_ratio >= 1`` keeps every block, which is dense attention: dense_decode runs
    instead (no selection to pay, and the dense kernel rather than a gather of every block), so
    a full-density configuration is a dense baseline in the same loop. It refreshes no summary:
    the caller updates them at the write."""
    if config.sparse_ratio >= 1:
        if refresh:
            raise ValueError("sparse_ratio >= 1 runs dense_decode, which does not refresh the "
                             "summaries; update them at the write instead")
        return ops.dense_decode(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale,
                                backend=backend)
    idx = ops.select_blocks(q, kmin, kmax, cache_seqlens, block_size=config.block_size,
                            sparse_ratio=config.sparse_ratio, min_blocks=config.min_blocks,
                            local_blocks=config.local_blocks, sink_blocks=config.sink_blocks,
                            k_cache=k_cache if refresh else None, backend=backend)
    return ops.sparse_decode(q, k_cache, v_cache, idx, cache_seqlens,
                             block_size=config.block_size, softmax_scale=softmax_scale,
                             backend=backend)


class StepAttention:
    """The attention of ReSA steps over one :class:`ReSACache`, for ``num_heads`` query heads.

    On the TileLang backend every plan (config, kernel, workspaces, output buffers) is
    resolved here, once per cache, so a step only launches: :meth:`sparse` runs
    select_blocks + sparse_decode (dense_decode when sparse_ratio >= 1, which keeps every
    block), :meth:`dense` rectify_attention for a chunk of T <= RECTIFY_MAX_T queries. The
    torch backend calls the reference ops. Arguments are not re-checked per step: the cache's
    storage is contiguous and fixed, and the query shapes follow from it.

    ``refresh``: the sparse step's selection also rewrites each row's newest block summary
    (what the cache write skipped: ReSACache.write(update_summaries=False)).
    ``reuse_outputs``: sparse steps write into one buffer per plan that every call returns
    (no allocation per step), for an eager caller that consumes the result before the next
    step (a model's layers, one after another); a captured or compiled caller must not.
    """

    def __init__(self, cache: ReSACache, num_heads: int, *, refresh: bool = True,
                 reuse_outputs: bool = False):
        cfg = cache.config
        self.cache, self.config = cache, cfg
        self.refresh = bool(refresh) and cfg.sparse_ratio < 1
        if self.refresh and cfg.local_blocks < 1:
            raise ValueError("the summary refresh inside select_blocks needs local_blocks >= 1")
        self.full_density = cfg.sparse_ratio >= 1
        self.reuse_outputs = reuse_outputs
        self.num_heads = num_heads
        self.backend = cache.backend
        dtype = cache.k[0].dtype
        self.tilelang = ops.resolve_backend(cache.backend, cache.device, dtype) == "tilelang"
        self._rectify = {}
        if not self.tilelang:
            return
        B, Hkv, D, Dv = cache.batch_size, cache.num_kv_heads, cache.head_dim, cache.v_head_dim
        dt, lens_dt = tl_dtype(dtype), int_dtype(cache.seqlens.dtype)
        dev = cache.device
        if self.full_density:
            self._dense = plan.dense_decode(DenseDecodeShape(num_heads, Hkv, D, Dv, dt, lens_dt),
                                            B, cache.max_seq_len, dev)
            return
        K = default_max_selected(cache.num_blocks, cfg.sparse_ratio, cfg.min_blocks)
        self._select = plan.select_blocks(
            SelectShape(cache.num_blocks, Hkv, num_heads // Hkv, D, cfg.block_size,
                        float(cfg.sparse_ratio), cfg.min_blocks, cfg.local_blocks, K, dt,
                        lens_dt, self.refresh, cfg.sink_blocks, fp8_name(cache.kmin[0].dtype)),
            B, dev)
        self._sparse = plan.sparse_decode(
            SparseDecodeShape(num_heads, Hkv, D, Dv, cfg.block_size, dt, "int32", lens_dt),
            B, K, dev)

    def sparse(self, layer: int, q: torch.Tensor, softmax_scale: float) -> torch.Tensor:
        """One decode step of ``layer`` after its token was written: q [B, H, D] contiguous
        -> [B, H, Dv]."""
        c = self.cache
        k, v, lens = c.k[layer], c.v[layer], c.seqlens[layer]
        if not self.tilelang:
            return sparse_step(q, k, v, c.kmin[layer], c.kmax[layer], lens, self.config,
                               softmax_scale, self.backend, self.refresh)
        if self.full_density:                  # every block kept: see sparse_step
            p = self._dense
            return p.run(q, k, v, lens, softmax_scale, p.out if self.reuse_outputs else None)
        s = self._select
        idx = s.run(q, c.kmin[layer], c.kmax[layer], lens, k if self.refresh else None,
                    s.out if self.reuse_outputs else None)
        p = self._sparse
        return p.run(q, k, v, idx, lens, softmax_scale, p.out if self.reuse_outputs else None)

    def has_chunk_kernel(self, num_q: int) -> bool:
        """Whether :meth:`dense` of ``num_q`` queries runs the rectify kernel."""
        return self.tilelang and 1 <= num_q <= RECTIFY_MAX_T

    def dense(self, layer: int, q: torch.Tensor, softmax_scale: float) -> torch.Tensor:
        """Dense causal attention of the last T positions of every row (their K/V written):
        q [B, T, H, D] contiguous -> [B, T, H, Dv]; T <= RECTIFY_MAX_T on the TileLang
        backend (see :meth:`has_chunk_kernel`)."""
        c = self.cache
        k, v, lens = c.k[layer], c.v[layer], c.seqlens[layer]
        if not self.tilelang:
            return ops.rectify_attention(q, k, v, lens, softmax_scale=softmax_scale,
                                         backend=self.backend)
        key = (q.shape[1], softmax_scale)
        p = self._rectify.get(key)
        if p is None:
            p = self._rectify[key] = plan.rectify_attention_like(q, k, v, softmax_scale)
        return p.run(q, k, v, lens)
