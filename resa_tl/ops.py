"""The public ReSA ops. Layout NHD: caches are [B, S_max, Hkv, D]; q has H = g * Hkv heads.

Every op takes ``backend="auto" | "tilelang" | "torch"``. "auto" picks TileLang for CUDA tensors
in fp16/bf16 and the torch reference otherwise (CPU, or fp32, which the kernels do not take).
Both backends compute the same function; the torch one is the reference the kernels are tested
against. No op synchronises the host on CUDA (see ``resa_tl._checks`` for the value checks).
"""
from __future__ import annotations

import torch

from . import _checks as chk
from . import plan
from .kernels.block_summaries import (block_summaries_reference,
                                      update_block_summaries_reference, warn_if_saturated)
from .kernels.common import aligned16
from .kernels.dense_decode import dense_decode_reference
from .kernels.rectify_attention import rectify_attention_reference
from .kernels.select_blocks import default_max_selected, select_blocks_reference
from .kernels.sparse_decode import sparse_decode_reference

BACKENDS = ("auto", "tilelang", "torch")
TILELANG_DTYPES = (torch.float16, torch.bfloat16)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend an op will run: "tilelang" or "torch"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "tilelang" if device.type == "cuda" and dtype in TILELANG_DTYPES else "torch"
    if backend == "tilelang":
        if device.type != "cuda":
            raise ValueError(f"backend='tilelang' needs CUDA tensors, got tensors on {device}; "
                             "use backend='torch' (or 'auto') on the CPU")
        if dtype not in TILELANG_DTYPES:
            raise TypeError(f"backend='tilelang' supports float16 and bfloat16, got "
                            f"{str(dtype).replace('torch.', '')}; use backend='torch' for float32")
    return backend


def _contiguous_caches(k_cache, v_cache, op: str) -> None:
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError(f"k_cache and v_cache must be contiguous [B, S_max, Hkv, D] tensors for "
                         f"the TileLang {op} (copying a cache per step would cost more than the "
                         f"attention)")


def block_summaries(k_cache, cache_seqlens, block_size: int = 16, *, summary_dtype=None,
                    backend: str = "auto"):
    """Per-block element-wise min and max of the valid keys.

    Parameters
    ----------
    k_cache : Tensor [B, S_max, Hkv, D], float16 / bfloat16 / float32
    cache_seqlens : Tensor [B], int32 / int64 — valid keys per row (<= S_max).
    block_size : int — power of two in [16, 128].
    summary_dtype : torch.dtype or str, optional — None (default): ``k_cache``'s dtype, exact.
        ``torch.float8_e4m3fn`` / ``torch.float8_e5m2``: half the bytes for selection to read;
        kmin is rounded toward -inf and kmax toward +inf, so the score stays an upper bound,
        and the largest finite fp8 value means "unbounded" (keys beyond the fp8 range: 448 for
        e4m3, 57,344 for e5m2). Blocks that share an unbounded channel score alike, so keys
        past e4m3's range call for e5m2: a RuntimeWarning says so where values are checked
        (CPU tensors, RESA_TL_CHECK_VALUES=1, ReSACache.prefill). NaN keys give unspecified
        summaries.

    Returns
    -------
    (kmin, kmax) : two Tensors [B, ceil(S_max / block_size), Hkv, D] of ``summary_dtype``.
        Blocks with no valid key are zero; selection never picks blocks past a row's length.
    """
    chk.tensor("k_cache", k_cache, 4, shape_doc="[B, S_max, Hkv, D]")
    chk.block_size(block_size)
    chk.same_device(k_cache=k_cache, cache_seqlens=cache_seqlens)
    B, S = k_cache.shape[:2]
    chk.seqlens(cache_seqlens, B, S)
    sdt = chk.summary_dtype(summary_dtype, k_cache.dtype)
    if resolve_backend(backend, k_cache.device, k_cache.dtype) == "torch":
        out = block_summaries_reference(k_cache, cache_seqlens, block_size, sdt)
    else:
        B, S, Hkv, D = k_cache.shape
        nb = -(-S // block_size)
        out = (torch.empty((B, nb, Hkv, D), dtype=sdt, device=k_cache.device),
               torch.empty((B, nb, Hkv, D), dtype=sdt, device=k_cache.device))
        if B and nb:
            k = aligned16(k_cache)
            plan.summaries_like(k, cache_seqlens, block_size, sdt).run(
                k, cache_seqlens.contiguous(), *out)
    if sdt != k_cache.dtype and chk.value_checks_enabled(k_cache):
        warn_if_saturated(*out, "block_summaries")
    return out


def update_block_summaries(kmin, kmax, k_cache, start, length: int, block_size: int = 16, *,
                           backend: str = "auto"):
    """Refresh, in place, the summaries of the blocks that positions [start, start + length)
    of each row touch, over each such block's positions below ``start + length`` (the row's new
    end). Costs O(length / block_size) blocks per row, never the whole cache.

    Parameters
    ----------
    kmin, kmax : Tensor [B, ceil(S_max / block_size), Hkv, D] (updated), dtype of ``k_cache``
        or an fp8 one (see :func:`block_summaries`; rounded outward the same way).
    k_cache : Tensor [B, S_max, Hkv, D], float16 / bfloat16 / float32.
    start : Tensor [B], int32 / int64 — first written position of each row.
    length : int — positions written per row (>= 0; 0 is a no-op).
    block_size : int — power of two in [16, 128].

    Returns
    -------
    (kmin, kmax), the same tensors.
    """
    chk.tensor("k_cache", k_cache, 4, shape_doc="[B, S_max, Hkv, D]")
    chk.block_size(block_size)
    B, S, Hkv, D = k_cache.shape
    chk.summaries(kmin, kmax, B, -(-S // block_size), Hkv, D, key_dtype=k_cache.dtype)
    chk.same_device(kmin=kmin, kmax=kmax, k_cache=k_cache, start=start)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int >= 0, got {length!r}")
    chk.tensor("start", start, 1, chk.INDEX_DTYPES, "[B]")
    if start.shape[0] != B:
        raise ValueError(f"start has {start.shape[0]} rows, batch is {B}")
    if chk.value_checks_enabled(start) and length > 0:
        lo, hi = int(start.min()), int(start.max())
        if lo < 0 or hi + length > S:
            raise ValueError(f"start + length must lie in [0, S_max={S}]; got start in "
                             f"[{lo}, {hi}] with length {length}")
    if length == 0:
        return kmin, kmax
    if resolve_backend(backend, k_cache.device, k_cache.dtype) == "torch":
        return update_block_summaries_reference(kmin, kmax, k_cache, start, length, block_size)
    if B == 0:
        return kmin, kmax
    if length >= 2 ** 31 - 2 * block_size:
        raise ValueError(f"length must be < 2**31 for the tilelang backend, got {length}")
    k, lo, hi = aligned16(k_cache), aligned16(kmin), aligned16(kmax)
    plan.summaries_like(k, start, block_size, kmin.dtype, "update", length).run(
        k, start.contiguous(), lo, hi, length)
    if lo is not kmin:                       # refreshed a copy: write it back
        kmin.copy_(lo)
    if hi is not kmax:
        kmax.copy_(hi)
    return kmin, kmax


def select_blocks(q, kmin, kmax, cache_seqlens, *, block_size: int = 16, sparse_ratio: float = 0.1,
                  min_blocks: int = 16, local_blocks: int = 1, max_selected: int | None = None,
                  k_cache=None, sink_blocks: int = 0, backend: str = "auto"):
    """Pick, per KV head, the blocks that a sparse decode step attends to.

    Each valid block j is scored with the group-mean query q̄ (mean over the g query heads of the
    KV head) as D^-0.5 * sum_d max(q̄_d * kmin_jd, q̄_d * kmax_jd). The last ``local_blocks``
    valid blocks and the first ``sink_blocks`` are always kept (inside the budget). A row with
    NB = ceil(len / block_size) valid blocks keeps n = max(ceil(NB * sparse_ratio),
    min(NB, min_blocks)) blocks, at most ``max_selected``.

    Parameters
    ----------
    q : Tensor [B, H, D], float16 / bfloat16 / float32 — the decode query (after RoPE).
    kmin, kmax : Tensor [B, NB_max, Hkv, D], dtype of q or an fp8 one — from
        :func:`block_summaries` with the same ``block_size``. Summaries of another block size
        cannot be told apart by shape alone: pass ``k_cache`` (NB_max is then checked against
        ceil(S_max / block_size)), and with value checks on (CPU tensors, or
        RESA_TL_CHECK_VALUES=1) lengths past NB_max * block_size are rejected.
    cache_seqlens : Tensor [B], int32 / int64.
    block_size, sparse_ratio, min_blocks, local_blocks, sink_blocks : as in
        :class:`resa_tl.ReSAConfig` (sink_blocks + local_blocks <= min_blocks).
    max_selected : int, optional — width K of the output, >= local_blocks + sink_blocks (the
        forced blocks must fit). Default: n for a full cache (NB = NB_max), so every row fits
        and sizing needs no host sync.
    k_cache : Tensor [B, S_max, Hkv, D], dtype of q, optional — the K cache the summaries
        describe (NB_max = ceil(S_max / block_size)). If given, each row's newest block (the
        one holding position len - 1) gets its kmin/kmax recomputed from it, in place, in the
        same launch: what ``update_block_summaries(kmin, kmax, k_cache, len - 1, 1)`` does, and
        all a decode step that appended one token needs. Needs ``local_blocks >= 1`` (the newest
        block is kept whatever its summary says, so the selection does not depend on it).

    Returns
    -------
    Tensor [B, Hkv, K], int32: kept block ids in ascending order, then -1 padding.
    """
    from .config import ReSAConfig
    ReSAConfig(block_size=block_size, sparse_ratio=sparse_ratio, min_blocks=min_blocks,
               local_blocks=local_blocks, sink_blocks=sink_blocks)   # field checks, one style
    chk.tensor("q", q, 3, shape_doc="[B, H, D]")
    B, H, D = q.shape
    chk.tensor("kmin", kmin, 4, chk.SUMMARY_DTYPES, "[B, NB, Hkv, D]")
    NB, Hkv = kmin.shape[1], kmin.shape[2]
    if H % max(Hkv, 1):
        raise ValueError(f"query heads H={H} must be a multiple of KV heads Hkv={Hkv}")
    chk.summaries(kmin, kmax, B, NB, Hkv, D, key_dtype=q.dtype)
    chk.same_device(q=q, kmin=kmin, kmax=kmax, cache_seqlens=cache_seqlens)
    chk.seqlens(cache_seqlens, B, NB * block_size)
    if max_selected is None:
        max_selected = default_max_selected(NB, sparse_ratio, min_blocks)
    elif isinstance(max_selected, bool) or not isinstance(max_selected, int) or \
            max_selected < max(1, local_blocks + sink_blocks):
        raise ValueError(f"max_selected must be None or an int >= max(1, local_blocks + "
                         f"sink_blocks = {local_blocks + sink_blocks}) (the blocks that are "
                         f"always kept must fit), got {max_selected!r}")
    kw = dict(block_size=block_size, sparse_ratio=sparse_ratio, min_blocks=min_blocks,
              local_blocks=local_blocks, max_selected=max_selected, sink_blocks=sink_blocks)
    if k_cache is not None:
        chk.tensor("k_cache", k_cache, 4, shape_doc="[B, S_max, Hkv, D]")
        if tuple(k_cache.shape[::2]) != (B, Hkv) or k_cache.shape[3] != D or \
                -(-k_cache.shape[1] // block_size) != NB:
            raise ValueError(f"k_cache must be [B, S_max, Hkv, D] = [{B}, S_max, {Hkv}, {D}] "
                             f"with ceil(S_max / block_size) = NB = {NB}; got "
                             f"{list(k_cache.shape)}")
        chk.same_device(q=q, k_cache=k_cache)
        chk.same_dtype(q=q, k_cache=k_cache)
        if not k_cache.is_contiguous():
            raise ValueError("k_cache must be contiguous (the refresh reads the cache in place; "
                             "a copy per step would cost the whole cache)")
        if local_blocks < 1:
            raise ValueError("k_cache (refresh of the newest block's summary) needs "
                             f"local_blocks >= 1, got {local_blocks}")
        kw["k_cache"] = k_cache
    if resolve_backend(backend, q.device, q.dtype) == "torch":
        return select_blocks_reference(q, kmin, kmax, cache_seqlens, **kw)
    kw.pop("k_cache", None)
    if B == 0:
        return torch.empty((0, Hkv, max_selected), dtype=torch.int32, device=q.device)
    p = plan.select_blocks_like(q, kmin, cache_seqlens, refresh=k_cache is not None, **kw)
    lo, hi = aligned16(kmin), aligned16(kmax)
    out = p.run(aligned16(q), lo, hi, cache_seqlens.contiguous(),
                None if k_cache is None else aligned16(k_cache))
    if lo is not kmin:                       # refreshed a copy: write it back
        kmin.copy_(lo)
    if hi is not kmax:
        kmax.copy_(hi)
    return out


def _decode_checks(q, k_cache, v_cache, cache_seqlens):
    chk.tensor("q", q, 3, shape_doc="[B, H, D]")
    B, H, D = q.shape
    S, Hkv, Dv = chk.kv_caches(k_cache, v_cache, B, H, D)
    chk.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    chk.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    chk.seqlens(cache_seqlens, B, S)
    return S, Hkv


def sparse_decode(q, k_cache, v_cache, block_indices, cache_seqlens, *, block_size: int = 16,
                  softmax_scale: float | None = None, backend: str = "auto"):
    """Exact softmax attention of one query token per row over the keys of the listed blocks.

    Parameters
    ----------
    q : Tensor [B, H, D], float16 / bfloat16 / float32.
    k_cache : Tensor [B, S_max, Hkv, D], dtype of q.
    v_cache : Tensor [B, S_max, Hkv, Dv], dtype of q.
    block_indices : Tensor [B, Hkv, K], int32 / int64 — distinct block ids per KV head
        (as :func:`select_blocks` returns them); -1 entries are ignored.
    cache_seqlens : Tensor [B], int32 / int64 — positions >= cache_seqlens[b] are excluded.
    block_size : int — power of two in [16, 128].
    softmax_scale : float, optional — default D^-0.5.

    Returns
    -------
    Tensor [B, H, Dv], dtype of q. A row that attends to no key gives zeros.
    """
    S, Hkv = _decode_checks(q, k_cache, v_cache, cache_seqlens)
    chk.block_size(block_size)
    chk.tensor("block_indices", block_indices, 3, chk.INDEX_DTYPES, "[B, Hkv, K]")
    chk.same_device(q=q, block_indices=block_indices)
    if tuple(block_indices.shape[:2]) != (q.shape[0], Hkv):
        raise ValueError(f"block_indices must be [B, Hkv, K] with B={q.shape[0]}, Hkv={Hkv}; "
                         f"got {list(block_indices.shape)}")
    if chk.value_checks_enabled(block_indices) and block_indices.numel():
        nb = -(-S // block_size)
        lo, hi = int(block_indices.min()), int(block_indices.max())
        if lo < -1 or hi >= nb:
            raise ValueError(f"block_indices must lie in [-1, {nb - 1}] (-1 = padding); "
                             f"got values in [{lo}, {hi}]")
    scale = chk.softmax_scale(softmax_scale, q.shape[-1])
    if resolve_backend(backend, q.device, q.dtype) == "torch":
        return sparse_decode_reference(q, k_cache, v_cache, block_indices, cache_seqlens,
                                       block_size=block_size, softmax_scale=scale)
    _contiguous_caches(k_cache, v_cache, "sparse_decode")
    B, H = q.shape[:2]
    if B == 0 or block_indices.shape[-1] == 0:      # no block selected anywhere: zeros
        return torch.zeros((B, H, v_cache.shape[3]), dtype=q.dtype, device=q.device)
    return plan.sparse_decode_like(q, k_cache, v_cache, block_indices, cache_seqlens,
                                   block_size).run(q.contiguous(), k_cache, v_cache,
                                                   block_indices.contiguous(), cache_seqlens,
                                                   scale)


def dense_decode(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float | None = None,
                 backend: str = "auto"):
    """Softmax attention of one query token per row over all of its cached keys.

    Parameters
    ----------
    q : Tensor [B, H, D], float16 / bfloat16 / float32.
    k_cache : Tensor [B, S_max, Hkv, D]; v_cache : Tensor [B, S_max, Hkv, Dv]; dtype of q.
    cache_seqlens : Tensor [B], int32 / int64 — keys [0, cache_seqlens[b]) are attended.
    softmax_scale : float, optional — default D^-0.5.

    Returns
    -------
    Tensor [B, H, Dv], dtype of q. A row of length 0 gives zeros.
    """
    _decode_checks(q, k_cache, v_cache, cache_seqlens)
    scale = chk.softmax_scale(softmax_scale, q.shape[-1])
    if resolve_backend(backend, q.device, q.dtype) == "torch":
        return dense_decode_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)
    _contiguous_caches(k_cache, v_cache, "dense_decode")
    B, H = q.shape[:2]
    if B == 0:
        return torch.empty((0, H, v_cache.shape[3]), dtype=q.dtype, device=q.device)
    return plan.dense_decode_like(q, k_cache, v_cache, cache_seqlens).run(
        q.contiguous(), k_cache, v_cache, cache_seqlens, scale)


def rectify_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale: float | None = None,
                      backend: str = "auto"):
    """Dense attention of the last T tokens of each row against the cache (rectification and
    prefill). Their K/V must already be in the cache.

    Parameters
    ----------
    q : Tensor [B, T, H, D], float16 / bfloat16 / float32 — queries of positions
        cache_seqlens[b] - T .. cache_seqlens[b] - 1.
    k_cache : Tensor [B, S_max, Hkv, D]; v_cache : Tensor [B, S_max, Hkv, Dv]; dtype of q.
    cache_seqlens : Tensor [B], int32 / int64 — each >= T.
    softmax_scale : float, optional — default D^-0.5.

    Returns
    -------
    Tensor [B, T, H, Dv], dtype of q: query t of row b attends to keys
    [0, cache_seqlens[b] - T + t].
    """
    chk.tensor("q", q, 4, shape_doc="[B, T, H, D]")
    B, T, H, D = q.shape
    if T < 1:
        raise ValueError(f"q must hold at least one query (T >= 1), got shape {list(q.shape)}")
    S, Hkv, Dv = chk.kv_caches(k_cache, v_cache, B, H, D)
    chk.same_device(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=cache_seqlens)
    chk.same_dtype(q=q, k_cache=k_cache, v_cache=v_cache)
    chk.seqlens(cache_seqlens, B, S, min_len=T)
    scale = chk.softmax_scale(softmax_scale, D)
    if resolve_backend(backend, q.device, q.dtype) == "torch":
        return rectify_attention_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale=scale)
    lens = cache_seqlens if cache_seqlens.dtype == torch.int32 else cache_seqlens.to(torch.int32)
    return plan.rectify_attention_like(q, k_cache, v_cache, scale).run(
        q.contiguous(), k_cache.contiguous(), v_cache.contiguous(), lens)
