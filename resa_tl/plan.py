"""Host-side planning: everything an op decides before it launches, decided once per problem.

A *plan* is one op applied to one problem: the kernel's static shape (heads, head dims,
dtypes, block size, ...) plus the host-known run-time extents that policy depends on (batch,
cache capacity S_max, index width K, update length) and the device. Planning resolves, once:

* the launch config: the tuned schedule's entry for the shape (resa_tl.schedules), else the
  heuristic (resa_tl.heuristics);
* programmatic dependent launch (heuristics.use_pdl) and the compiled kernel;
* split counts (heuristics) and the workspaces they need (split partials, selection scores),
  plus an output buffer for callers that reuse one (see ``Plan.out``).

``run(...)`` then only launches: no config lookup, no argument validation, no allocation (when
given ``out``), no host synchronisation, so a decode step can call it eagerly at little host
cost and CUDA graphs capture it. Arguments are *not* checked here: resa_tl.ops checks them at
the API boundary, and resa_tl.integration checks its cache once when it is built.

Plans are memoised per (op, problem, device, config override, split override, PDL): asking
again returns the same object with the same buffers. The buffers live until the process exits
or :func:`clear` runs. Two launches of one plan must not run concurrently on different CUDA
streams (they share the workspaces).
"""
from __future__ import annotations

import threading

import torch

from . import heuristics, schedules
from .kernels import block_summaries as bsum
from .kernels import common
from .kernels import dense_decode as dd
from .kernels import rectify_attention as ra
from .kernels import select_blocks as sel
from .kernels import sparse_decode as sd

_PLANS: dict = {}
_lock = threading.Lock()


def clear() -> None:
    """Forget every plan (and its buffers). Tests, or after changing RESA_TL_SCHEDULE /
    RESA_TL_PDL at run time together with schedules.reset()."""
    with _lock:
        _PLANS.clear()


def _memo(key, build):
    p = _PLANS.get(key)
    if p is None:
        p = build()
        with _lock:
            p = _PLANS.setdefault(key, p)
    return p


def _arch_pdl(device: torch.device):
    arch = heuristics.arch_of(device)
    return arch, heuristics.use_pdl(arch)


# ------------------------------------------------------------------------------------------
# Decode attention (split-KV)
# ------------------------------------------------------------------------------------------

class DenseDecodePlan:
    """dense_decode for one problem. ``run(q, k_cache, v_cache, cache_seqlens, softmax_scale,
    out=None)`` -> out [B, H, Dv] (a new tensor unless ``out`` is given)."""

    def __init__(self, shape: dd.DenseDecodeShape, batch: int, s_max: int,
                 device: torch.device, config=None, num_splits=None):
        arch, pdl = _arch_pdl(device)
        g = shape.group
        if config is None:
            default = heuristics.dense_decode_config(arch)
            config = schedules.config_for("dense_decode", default, arch=arch, dtype=shape.dtype,
                                          head_dim=shape.dim, g=g, hkv=shape.heads_kv,
                                          context=max(s_max, 1), batch=max(batch, 1))
        dd.check_config(shape, config)
        tiles = dd.num_tiles(s_max, config)
        if num_splits is None:
            num_splits = heuristics.decode_num_splits(batch, shape.heads_kv, tiles, device)
        self.shape, self.config, self.pdl = shape, config, pdl
        self.kernel = dd.compile_kernel(shape, config, arch, pdl)
        self.num_splits, self.o_part, self.lse_part, self.out = _split_buffers(
            shape, batch, num_splits, tiles, device)

    def run(self, q, k_cache, v_cache, cache_seqlens, softmax_scale: float, out=None):
        if out is None:
            out = torch.empty_like(self.out)
        return dd.launch(self.kernel, q, k_cache, v_cache, cache_seqlens, self.o_part,
                         self.lse_part, out, softmax_scale * common.LOG2E)


class SparseDecodePlan:
    """sparse_decode for one problem (index width K >= 1). ``run(q, k_cache, v_cache,
    block_indices, cache_seqlens, softmax_scale, out=None)`` -> out [B, H, Dv]."""

    def __init__(self, shape: sd.SparseDecodeShape, batch: int, k_width: int,
                 device: torch.device, config=None, num_splits=None):
        arch, pdl = _arch_pdl(device)
        g = shape.group
        if config is None:
            default = heuristics.sparse_decode_config(shape.block_size, arch)
            config = schedules.config_for("sparse_decode", default, arch=arch,
                                          dtype=shape.dtype, head_dim=shape.dim, g=g,
                                          hkv=shape.heads_kv, block_size=shape.block_size,
                                          k_blocks=max(k_width, 1), batch=max(batch, 1))
        sd.check_config(shape, config, arch)
        tiles = sd.num_tiles(shape, config, k_width)
        if num_splits is None:
            num_splits = heuristics.decode_num_splits(batch, shape.heads_kv, tiles, device,
                                                      ctas_per_sm=config.ctas_per_sm)
        self.shape, self.config, self.pdl = shape, config, pdl
        self.kernel = sd.compile_kernel(shape, config, arch, pdl)
        self.num_splits, self.o_part, self.lse_part, self.out = _split_buffers(
            shape, batch, num_splits, tiles, device)

    def run(self, q, k_cache, v_cache, block_indices, cache_seqlens, softmax_scale: float,
            out=None):
        if out is None:
            out = torch.empty_like(self.out)
        return sd.launch(self.kernel, q, k_cache, v_cache, block_indices, cache_seqlens,
                         self.o_part, self.lse_part, out, softmax_scale * common.LOG2E)


def _split_buffers(shape, batch: int, num_splits: int, tiles: int, device: torch.device):
    """(split count clamped to [1, tiles], O_part [B, H, NS, Dv] f32, LSE_part [B, H, NS] f32,
    out [B, H, Dv]) of a split-KV decode plan: every split gets at least one tile."""
    ns = max(1, min(int(num_splits), tiles))
    return (ns,
            torch.empty(batch, shape.heads, ns, shape.dim_v, dtype=torch.float32, device=device),
            torch.empty(batch, shape.heads, ns, dtype=torch.float32, device=device),
            torch.empty(batch, shape.heads, shape.dim_v, dtype=_torch_dtype(shape.dtype),
                        device=device))


def dense_decode(shape: dd.DenseDecodeShape, batch: int, s_max: int, device: torch.device, *,
                 config=None, num_splits=None) -> DenseDecodePlan:
    """The (memoised) plan of dense_decode for this problem; ``config`` / ``num_splits``
    override the schedule/heuristic (tests, tuning)."""
    device = torch.device(device)
    key = ("dense_decode", shape, batch, s_max, device, config, num_splits, _arch_pdl(device))
    return _memo(key, lambda: DenseDecodePlan(shape, batch, s_max, device, config, num_splits))


def sparse_decode(shape: sd.SparseDecodeShape, batch: int, k_width: int, device: torch.device,
                  *, config=None, num_splits=None) -> SparseDecodePlan:
    """The (memoised) plan of sparse_decode for this problem (see :func:`dense_decode`)."""
    device = torch.device(device)
    key = ("sparse_decode", shape, batch, k_width, device, config, num_splits,
           _arch_pdl(device))
    return _memo(key, lambda: SparseDecodePlan(shape, batch, k_width, device, config,
                                               num_splits))


# ------------------------------------------------------------------------------------------
# Rectification (a chunk of T queries against the cache)
# ------------------------------------------------------------------------------------------

class RectifyPlan:
    """rectify_attention for one problem. ``run(q, k_cache, v_cache, cache_seqlens, out=None)``
    -> out [B, T, H, Dv]; cache_seqlens int32 (the softmax scale is part of the shape)."""

    def __init__(self, shape: ra.RectifyShape, batch: int, s_max: int, device: torch.device,
                 config=None, num_splits=None):
        arch, pdl = _arch_pdl(device)
        ra.check_shape(shape)
        if config is None:   # the tuned schedule's entry for this shape, else the heuristic
            default = heuristics.rectify_config(shape.num_q, shape.group, shape.dim, arch)
            config = schedules.config_for(
                "rectify_attention", default, arch=arch, dtype=shape.dtype, head_dim=shape.dim,
                g=shape.group, hkv=shape.heads_kv, T=shape.num_q, context=max(s_max, 1),
                batch=max(batch, 1))
        ra.check_config(config, arch)
        if num_splits is None:
            num_splits = heuristics.rectify_num_splits(
                batch, shape.heads_kv, ra.num_row_tiles(shape, config), s_max, config, device)
        self.shape, self.config, self.pdl = shape, config, pdl
        self.num_splits = int(num_splits)
        self.kernels = ra.compile_kernel(shape, config, arch, pdl)
        R = shape.rows
        self.o_part = torch.empty(batch, shape.heads_kv, self.num_splits, R, shape.dim_v,
                                  dtype=torch.float32, device=device)
        self.lse_part = torch.empty(batch, shape.heads_kv, self.num_splits, R,
                                    dtype=torch.float32, device=device)
        self.out = torch.empty(batch, shape.num_q, shape.heads_kv * shape.group, shape.dim_v,
                               dtype=_torch_dtype(shape.dtype), device=device)

    def run(self, q, k_cache, v_cache, cache_seqlens, out=None):
        if out is None:
            out = torch.empty_like(self.out)
        return ra.launch(self.kernels, q, k_cache, v_cache, cache_seqlens, self.o_part,
                         self.lse_part, out)


def rectify_attention(shape: ra.RectifyShape, batch: int, s_max: int, device: torch.device, *,
                      config=None, num_splits=None) -> RectifyPlan:
    """The (memoised) plan of rectify_attention for this problem (see :func:`dense_decode`)."""
    device = torch.device(device)
    key = ("rectify_attention", shape, batch, s_max, device, config, num_splits,
           _arch_pdl(device))
    return _memo(key, lambda: RectifyPlan(shape, batch, s_max, device, config, num_splits))


# ------------------------------------------------------------------------------------------
# Block summaries and selection
# ------------------------------------------------------------------------------------------

class SummariesPlan:
    """block_summaries (shape.mode "build": ``run(k_cache, cache_seqlens, kmin, kmax)``) or
    update_block_summaries ("update": ``run(k_cache, start, kmin, kmax, length)``), in place
    into kmin / kmax. Tensors contiguous and 16-byte aligned."""

    def __init__(self, shape: bsum.SummariesShape, batch: int, extent: int,
                 device: torch.device, config=None):
        arch, pdl = _arch_pdl(device)
        bsum.check_shape(shape)
        if config is None:   # the tuned schedule's entry for this shape, else the heuristic
            build = shape.mode == "build"
            config = schedules.config_for(
                "block_summaries" if build else "update_block_summaries",
                heuristics.summaries_config(shape.heads_kv, shape.head_dim),
                arch=arch, dtype=shape.dtype, head_dim=shape.head_dim, hkv=shape.heads_kv,
                block_size=shape.block_size, batch=max(batch, 1),
                **({"context": max(extent, 1)} if build else {"length": max(extent, 1)}))
        self.shape, self.config, self.pdl = shape, config, pdl
        self.kernel = bsum.compile_kernel(shape, config, arch, pdl)

    def run(self, k_cache, index, kmin, kmax, length: int = None):
        return bsum.launch(self.kernel, k_cache, index, kmin, kmax, length)


def block_summaries(shape: bsum.SummariesShape, batch: int, extent: int, device: torch.device,
                    *, config=None) -> SummariesPlan:
    """The (memoised) plan of the summaries kernels: ``extent`` is the cache capacity S_max
    (build) or the number of positions written per row (update), the schedule's key."""
    device = torch.device(device)
    key = ("summaries", shape, batch, extent, device, config, _arch_pdl(device))
    return _memo(key, lambda: SummariesPlan(shape, batch, extent, device, config))


class SelectPlan:
    """select_blocks for one problem. ``run(q, kmin, kmax, cache_seqlens, k_cache=None,
    out=None)`` -> out [B, Hkv, K] int32; ``k_cache`` exactly when shape.refresh. Tensors
    contiguous and 16-byte aligned."""

    def __init__(self, shape: sel.SelectShape, batch: int, device: torch.device, config=None):
        arch, pdl = _arch_pdl(device)
        sel.check_shape(shape)
        if config is None:   # the tuned schedule's entry, else the heuristic; fp8-adjusted
            config = schedules.config_for(
                "select_blocks",
                heuristics.selection_config(shape.num_blocks, shape.heads_kv, shape.head_dim),
                arch=arch, dtype=shape.dtype, head_dim=shape.head_dim, g=shape.group,
                hkv=shape.heads_kv, block_size=shape.block_size,
                num_blocks=max(shape.num_blocks, 1), batch=max(batch, 1))
            config = heuristics.selection_config_for_summaries(
                config, _torch_dtype(shape.summary_dtype or shape.dtype),
                _torch_dtype(shape.dtype))
        sel.check_config(shape, config)
        self.shape, self.config, self.pdl = shape, config, pdl
        self.kernel = sel.compile_kernel(shape, config, arch, pdl)
        self.scores = torch.empty(batch, shape.heads_kv, sel.scores_width(shape, config),
                                  dtype=torch.float32, device=device)
        self.out = torch.empty(batch, shape.heads_kv, shape.max_selected, dtype=torch.int32,
                               device=device)

    def run(self, q, kmin, kmax, cache_seqlens, k_cache=None, out=None):
        if out is None:
            out = torch.empty_like(self.out)
        return sel.launch(self.kernel, q, kmin, kmax, cache_seqlens, self.scores, out, k_cache)


def select_blocks(shape: sel.SelectShape, batch: int, device: torch.device, *,
                  config=None) -> SelectPlan:
    """The (memoised) plan of select_blocks for this problem (see :func:`dense_decode`)."""
    device = torch.device(device)
    key = ("select_blocks", shape, batch, device, config, _arch_pdl(device))
    return _memo(key, lambda: SelectPlan(shape, batch, device, config))


def _torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


# ------------------------------------------------------------------------------------------
# Plans from tensors (shapes and dtypes read from metadata only: no sync)
# ------------------------------------------------------------------------------------------

def dense_decode_like(q, k_cache, v_cache, cache_seqlens, **overrides) -> DenseDecodePlan:
    """:func:`dense_decode` for these tensors (q [B, H, D], caches [B, S_max, Hkv, D/Dv])."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    shape = dd.DenseDecodeShape(H, Hkv, D, v_cache.shape[3], common.tl_dtype(q.dtype),
                                common.int_dtype(cache_seqlens.dtype))
    dd.check_shape(shape)
    return dense_decode(shape, B, S, q.device, **overrides)


def sparse_decode_like(q, k_cache, v_cache, block_indices, cache_seqlens, block_size: int,
                       **overrides) -> SparseDecodePlan:
    """:func:`sparse_decode` for these tensors (block_indices [B, Hkv, K], K >= 1)."""
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    shape = sd.SparseDecodeShape(H, Hkv, D, v_cache.shape[3], block_size,
                                 common.tl_dtype(q.dtype), common.int_dtype(block_indices.dtype),
                                 common.int_dtype(cache_seqlens.dtype))
    sd.check_shape(shape)
    return sparse_decode(shape, B, block_indices.shape[-1], q.device, **overrides)


def rectify_attention_like(q, k_cache, v_cache, softmax_scale: float,
                           **overrides) -> RectifyPlan:
    """:func:`rectify_attention` for these tensors (q [B, T, H, D])."""
    B, T, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    shape = ra.RectifyShape(T, H // Hkv, Hkv, D, v_cache.shape[3], common.tl_dtype(q.dtype),
                            float(softmax_scale))
    ra.check_shape(shape)
    return rectify_attention(shape, B, S, q.device, **overrides)


def summaries_like(k_cache, index, block_size: int, summary_dtype, mode: str = "build",
                   length: int = 0, **overrides) -> SummariesPlan:
    """:func:`block_summaries` for these tensors: k_cache [B, S_max, Hkv, D], index [B]
    (lengths or start), summaries stored in ``summary_dtype``."""
    B, S, Hkv, D = k_cache.shape
    shape = bsum.SummariesShape(Hkv, D, block_size, common.tl_dtype(k_cache.dtype),
                                common.int_dtype(index.dtype), mode,
                                bsum.fp8_name(summary_dtype))
    bsum.check_shape(shape)
    return block_summaries(shape, B, S if mode == "build" else int(length), k_cache.device,
                           **overrides)


def select_blocks_like(q, kmin, cache_seqlens, *, block_size: int, sparse_ratio: float,
                       min_blocks: int, local_blocks: int, max_selected: int,
                       refresh: bool = False, sink_blocks: int = 0,
                       **overrides) -> SelectPlan:
    """:func:`select_blocks` for these tensors (q [B, H, D], kmin [B, NB, Hkv, D])."""
    B, H, D = q.shape
    NB, Hkv = kmin.shape[1], kmin.shape[2]
    shape = sel.SelectShape(NB, Hkv, H // Hkv, D, block_size, float(sparse_ratio),
                            int(min_blocks), int(local_blocks), int(max_selected),
                            common.tl_dtype(q.dtype), common.int_dtype(cache_seqlens.dtype),
                            bool(refresh), int(sink_blocks), bsum.fp8_name(kmin.dtype))
    sel.check_shape(shape)
    return select_blocks(shape, B, q.device, **overrides)
