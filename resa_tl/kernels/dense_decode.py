"""Dense split-KV decoding: one query token per row attends to all of its cached keys."""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import functools
from dataclasses import dataclass

import torch

from ._reference import group_queries, heads_major, masked_attention
from . import common as skv


def dense_decode_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale,
                           compute_dtype=torch.float32):
    """Torch reference of :func:`resa_tl.ops.dense_decode` (fp32 math, output in q.dtype)."""
    B, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    mask = torch.arange(S, device=q.device)[None] < cache_seqlens.view(B, 1).long()   # [B, S]
    o = masked_attention(group_queries(q, Hkv), heads_major(k_cache), heads_major(v_cache),
                         mask[:, None, None, :], softmax_scale, compute_dtype)
    return o.reshape(B, H, -1).to(q.dtype)


# ------------------------------------------------------------------------------------------
# TileLang kernel
# ------------------------------------------------------------------------------------------
#
# The machinery of sparse_decode (resa_tl/kernels/common.py) over contiguous keys: the g
# query heads of a KV group share one 64-row tile; the ceil(len / block_N) key tiles of a row
# are cut into num_splits ranges from the row's run-time length (every split gets the same
# number of tiles, whatever the length; the trip count is a run-time value, no recompile as
# the cache grows); each split CTA streams its tiles (TMA + warp specialisation on sm_90a,
# cp.async on sm_80), writes an fp32 partial output and its log2-sum-exp (-inf when empty),
# and the combine kernel of the same program merges them.


@dataclass(frozen=True)
class DenseDecodeConfig:
    """Static tile configuration of the dense decode kernel (fields as in
    :class:`resa_tl.kernels.sparse_decode.SparseDecodeConfig`)."""
    block_N: int = 64
    block_H: int = 64
    threads: int = 128
    num_stages: int = 2
    combine_chunk: int = 16


@dataclass(frozen=True)
class DenseDecodeShape(skv.DecodeHeads):
    """The compile-time problem: one kernel per shape and config. Batch, cache capacity S_max,
    the lengths and the split count are run-time values."""
    dtype: str = "bfloat16"
    seqlen_dtype: str = "int32"


def check_shape(shape: DenseDecodeShape) -> None:
    shape.check_heads()


def check_config(shape: DenseDecodeShape, cfg: DenseDecodeConfig) -> None:
    group = shape.group
    if cfg.block_N % 16 or cfg.block_N < 16:
        raise ValueError(f"DenseDecodeConfig.block_N={cfg.block_N} must be a multiple of 16")
    skv.check_decode_tile(cfg, group)


def num_tiles(s_max: int, cfg: DenseDecodeConfig) -> int:
    """Pipeline tiles of a full row: what the split count is sized from (host-known)."""
    return skv.ceil_div(max(s_max, 1), cfg.block_N)


def program(shape: DenseDecodeShape, config: DenseDecodeConfig, pdl: bool = False):
    """The TileLang program (split kernel + combine kernel) for one static configuration.

    Arguments of the compiled kernel, in order: q [B, H, D], k_cache [B, S, Hkv, D],
    v_cache [B, S, Hkv, Dv], cache_seqlens [B] (seqlen_dtype), O_part [B, H, NS, Dv] f32,
    LSE_part [B, H, NS] f32, out [B, H, Dv], scale_log2 (softmax_scale * log2(e)).
    B, S and NS are run-time dimensions. ``pdl``: see common.grid_dependency (sm_90+).
    """
    check_shape(shape)
    check_config(shape, config)
    heads, heads_kv, dim, dim_v = shape.heads, shape.heads_kv, shape.dim, shape.dim_v
    dtype, seqlen_dtype, cfg = shape.dtype, shape.seqlen_dtype, config
    import tilelang.language as T
    G = heads // heads_kv
    BH, BN = cfg.block_H, cfg.block_N
    ACC = skv.ACC
    B, S, NS = T.dynamic("B S NS")
    update = skv.make_softmax_update(BH, BN, dim_v, dtype)
    write = skv.make_write_partials(BH, G, dim_v)
    combine = skv.make_combine(heads, dim_v, dtype, cfg.combine_chunk, pdl)
    wait = skv.grid_dependency(pdl)

    @T.prim_func
    def dense_decode(Q: T.Tensor((B, heads, dim), dtype),
                     Kc: T.Tensor((B, S, heads_kv, dim), dtype),
                     Vc: T.Tensor((B, S, heads_kv, dim_v), dtype),
                     Lens: T.Tensor((B,), seqlen_dtype),
                     O_part: T.Tensor((B, heads, NS, dim_v), ACC),
                     LSE_part: T.Tensor((B, heads, NS), ACC),
                     Out: T.Tensor((B, heads, dim_v), dtype),
                     scale_log2: T.float32):
        with T.Kernel(NS, heads_kv, B, threads=cfg.threads) as (sid, hk, b):
            wait()
            Q_s, K_s, V_s, Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum = \
                skv.alloc_flash_tiles(BH, BN, dim, dim_v, dtype)

            L = T.min(T.cast(Lens[b], "int32"), S)
            ntiles = T.ceildiv(L, BN)
            per = T.ceildiv(ntiles, NS)
            t0 = sid * per
            trip = T.max(T.min(t0 + per, ntiles) - t0, 0)

            for i, d in T.Parallel(BH, dim):
                Q_s[i, d] = T.if_then_else(i < G, Q[b, hk * G + i, d], T.cast(0, dtype))
            T.fill(acc, 0)
            T.fill(lsum, 0)
            T.fill(m, -T.infinity(ACC))
            for t in T.Pipelined(trip, num_stages=cfg.num_stages):
                T.copy(Kc[b, (t0 + t) * BN:(t0 + t + 1) * BN, hk, :], K_s)
                T.clear(Sc)
                T.gemm(Q_s, K_s, Sc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, j in T.Parallel(BH, BN):
                    Sc[i, j] = T.if_then_else((t0 + t) * BN + j < L, Sc[i, j] * scale_log2,
                                              -T.infinity(ACC))
                update(Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum)
                T.copy(Vc[b, (t0 + t) * BN:(t0 + t + 1) * BN, hk, :], V_s)
                T.gemm(P, V_s, acc, policy=T.GemmWarpPolicy.FullRow)
            write(acc, m, lsum, O_part, LSE_part, b, hk, sid)
        combine(O_part, LSE_part, Out, B, NS)

    return dense_decode


@functools.lru_cache(maxsize=None)
def compile_kernel(shape: DenseDecodeShape, config: DenseDecodeConfig, arch: str, pdl: bool):
    """Compiled kernel, memoised per static configuration (and in TileLang's disk cache)."""
    return skv.compile_program(program(shape, config, pdl), arch)


def launch(kernel, q, k_cache, v_cache, cache_seqlens, o_part, lse_part, out,
           scale_log2: float):
    """One call of a compiled kernel: q [B, H, D], k_cache [B, S_max, Hkv, D] and v_cache
    [B, S_max, Hkv, Dv] contiguous, cache_seqlens [B], the split workspaces
    o_part [B, H, NS, Dv] / lse_part [B, H, NS] fp32 (NS >= 1, at most num_tiles), out
    [B, H, Dv]. No checks: the caller (resa_tl.plan) sized everything."""
    kernel(q, k_cache, v_cache, cache_seqlens, o_part, lse_part, out, scale_log2)
    return out
