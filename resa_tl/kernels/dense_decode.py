"""Dense split-KV decoding: one query token per row attends to all of its cached keys."""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import functools
from dataclasses import dataclass

import torch

from ._reference import group_queries, heads_major, masked_attention
from . import _splitkv as skv


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
# The machinery of sparse_decode (resa_tl/kernels/_splitkv.py) over contiguous keys: the g
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
    ctas_per_sm: int = 1


def _check_config(cfg: DenseDecodeConfig, group: int):
    if cfg.block_N % 16 or cfg.block_N < 16:
        raise ValueError(f"DenseDecodeConfig.block_N={cfg.block_N} must be a multiple of 16")
    if cfg.block_H not in (16, 32, 64) or cfg.threads != 2 * cfg.block_H:
        raise ValueError(f"DenseDecodeConfig needs block_H in (16, 32, 64) and threads = "
                         f"2 * block_H; got block_H={cfg.block_H}, threads={cfg.threads}")
    if group > cfg.block_H:
        raise ValueError(f"q heads per KV head (g={group}) must be <= block_H={cfg.block_H}")
    if cfg.num_stages < 1 or cfg.combine_chunk < 1:
        raise ValueError(f"DenseDecodeConfig needs num_stages >= 1 and combine_chunk >= 1, "
                         f"got {cfg}")
    if cfg.ctas_per_sm != 1:
        # TileLang's automatic warp specialisation inserts setmaxnreg(240) for the MMA
        # warpgroup, which cannot be granted to two resident CTAs: with launch bounds for two
        # CTAs per SM the kernel deadlocked on the H100
        raise ValueError(f"DenseDecodeConfig.ctas_per_sm must be 1, got {cfg.ctas_per_sm}")


def build_dense_decode_kernel(heads: int, heads_kv: int, dim: int, dim_v: int,
                              dtype: str = "bfloat16", config: DenseDecodeConfig = None,
                              arch: str = "sm_90a", seqlen_dtype: str = "int32",
                              pdl: bool = False):
    """The TileLang program (split kernel + combine kernel) for one static configuration.

    Arguments of the compiled kernel, in order: q [B, H, D], k_cache [B, S, Hkv, D],
    v_cache [B, S, Hkv, Dv], cache_seqlens [B] (seqlen_dtype), O_part [B, H, NS, Dv] f32,
    LSE_part [B, H, NS] f32, out [B, H, Dv], scale_log2 (softmax_scale * log2(e)).
    B, S and NS are run-time dimensions. ``pdl``: see _splitkv.grid_dependency (sm_90+).
    """
    import tilelang.language as T
    cfg = config or DenseDecodeConfig()
    if heads % heads_kv:
        raise ValueError(f"heads={heads} must be a multiple of heads_kv={heads_kv}")
    G = heads // heads_kv
    skv.check_head_dims(dim, dim_v)
    _check_config(cfg, G)
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
            Q_s = T.alloc_shared((BH, dim), dtype)
            K_s = T.alloc_shared((BN, dim), dtype)
            V_s = T.alloc_shared((BN, dim_v), dtype)
            Sc = T.alloc_fragment((BH, BN), ACC)
            P = T.alloc_fragment((BH, BN), dtype)
            acc = T.alloc_fragment((BH, dim_v), ACC)
            m = T.alloc_fragment((BH,), ACC)
            m_prev = T.alloc_fragment((BH,), ACC)
            m_use = T.alloc_fragment((BH,), ACC)
            alpha = T.alloc_fragment((BH,), ACC)
            rsum = T.alloc_fragment((BH,), ACC)
            lsum = T.alloc_fragment((BH,), ACC)

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
def compile_dense_decode_kernel(heads: int, heads_kv: int, dim: int, dim_v: int, dtype: str,
                                config: DenseDecodeConfig, arch: str,
                                seqlen_dtype: str = "int32", pdl: bool = None):
    """Compiled kernel, memoised per static configuration (and in TileLang's disk cache).
    ``pdl`` None: :func:`resa_tl.heuristics.use_pdl` decides."""
    from .. import heuristics
    pdl = heuristics.use_pdl(arch) if pdl is None else pdl
    prog = build_dense_decode_kernel(heads, heads_kv, dim, dim_v, dtype, config, arch,
                                     seqlen_dtype, pdl)
    return skv.compile_program(prog, arch)


_LEN_DTYPES = {torch.int32: "int32", torch.int64: "int64"}


def dense_decode_tilelang(q, k_cache, v_cache, cache_seqlens, *, softmax_scale, out=None,
                          config: DenseDecodeConfig = None, num_splits: int = None):
    """TileLang backend of :func:`resa_tl.ops.dense_decode` (arguments validated there).

    q [B, H, D]; k_cache [B, S_max, Hkv, D] and v_cache [B, S_max, Hkv, Dv] contiguous;
    cache_seqlens [B] int32/int64. Returns [B, H, Dv] in q.dtype (written into ``out`` when
    given). One kernel per static shape (H, Hkv, D, Dv, dtype, length dtype, tile config,
    arch); B, S_max and the lengths are run-time values. No host synchronisation; the split
    count comes from the SM count and S_max; workspaces are cached per shape.
    """
    from .. import heuristics, schedules
    B, H, D = q.shape
    S, Hkv, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    skv.check_head_dims(D, Dv)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("k_cache and v_cache must be contiguous [B, S_max, Hkv, D] tensors "
                         "for the TileLang dense_decode")
    g = H // Hkv
    arch = heuristics.arch_of(q.device)
    dt = skv.tl_dtype(q.dtype)
    if config is None:
        default = heuristics.dense_decode_config(Hkv, g, D, dt, arch)
        config = schedules.config_for("dense_decode", default, arch=arch, dtype=dt, head_dim=D,
                                      g=g, hkv=Hkv, context=max(S, 1), batch=max(B, 1))
    _check_config(config, g)
    if out is None:
        out = torch.empty((B, H, Dv), dtype=q.dtype, device=q.device)
    elif (tuple(out.shape) != (B, H, Dv) or out.dtype != q.dtype or out.device != q.device
          or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {[B, H, Dv]} on "
                         f"{q.device}; got {out.dtype} {list(out.shape)} on {out.device}")
    if B == 0:
        return out
    kern = compile_dense_decode_kernel(H, Hkv, D, Dv, dt, config, arch,
                                       _LEN_DTYPES[cache_seqlens.dtype],
                                       heuristics.use_pdl(arch))
    tiles = -(-S // config.block_N)
    if num_splits is None:
        num_splits = heuristics.decode_num_splits(B, Hkv, tiles, q.device,
                                                  ctas_per_sm=config.ctas_per_sm)
    num_splits = max(1, min(int(num_splits), tiles))
    o_part, lse_part = skv.workspace(B, H, num_splits, Dv, q.device)
    kern(q.contiguous(), k_cache, v_cache, cache_seqlens, o_part, lse_part, out,
         float(softmax_scale) * skv.LOG2E)
    return out
