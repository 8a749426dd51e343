"""Block-sparse split-KV decoding: one query token per row attends to the keys of its selected
blocks; the query heads of a KV group share each K/V block read."""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import functools
from dataclasses import dataclass

import torch

from ._reference import group_queries, heads_major, masked_attention
from . import common as skv


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


# ------------------------------------------------------------------------------------------
# TileLang kernel
# ------------------------------------------------------------------------------------------
#
# Design (split-KV flash decoding over gathered blocks, then a combine kernel):
#
# * GQA packing. The g query heads of KV head hk are the rows of one CTA tile (padded to
#   block_H = 64, one wgmma M), so each selected K/V block is read once per KV group.
# * Gathered tiles. A pipeline stage holds block_N = bpt * block_size key rows assembled from
#   bpt selected blocks (block_N = 64: 4 blocks of 16, 2 of 32, 1 of 64). Each block is one
#   T.copy whose source row is a run-time block id; on sm_90a these are TMA loads issued by
#   the warp-specialised producer (a copy is split into 128-byte column pieces: TileLang
#   lowers a row-slice of a swizzled tile to TMA only per swizzle atom), so one stage moves
#   block_N * (D + Dv) * 2 bytes with bpt * (D + Dv) / 64 bulk copies instead of one 16-row
#   block per loop iteration.
# * Split-KV. The K index entries of (row, KV head) are cut into num_splits ranges of `per`
#   tiles (a run-time kernel argument read from the workspace shape; resa_tl.heuristics picks
#   it from the SM count so that B * Hkv * num_splits CTAs fill the device at batch 1).
# * -1 padding. Every warp of a CTA scans its range of block_indices (lanes stride it, then a
#   warp shuffle max) for the last entry >= 0, and the pipelined loop runs only up to it, so
#   trailing -1 padding (what select_blocks emits) costs no loads and no loop iterations;
#   a split with nothing left writes LSE = -inf. No CTA barrier: the TMA producer warps and
#   the MMA warps compute the same trip count independently. A -1 in the middle of a tile
#   (correct, not fast) loads block 0 and masks it out.
# * Masking. Score (i, j) of tile t is kept iff its entry lies in the split, its block id is
#   >= 0 and its position block * block_size + j % block_size < cache_seqlens[b] (the last
#   selected block may be partial). Rows whose running max is still -inf are guarded (no
#   NaN); a row with no valid key ends with O = 0, LSE = -inf and the combine returns 0.
# * Trip count 1 (warp-specialised loops with one iteration hung on Hopper in TileLang
#   tile-ai/tilelang#2566) is exercised by the GPU tests.


@dataclass(frozen=True)
class SparseDecodeConfig:
    """Static tile configuration of the sparse decode kernel (part of the compile key).

    block_N: key rows per pipeline stage, a multiple of block_size (raised to block_size when
        smaller): block_N // block_size selected blocks are gathered per stage.
    block_H: padded query rows per CTA (>= g; 64 = one wgmma M); threads must be 2 * block_H
        (each warp owns 16 full rows: the flash "P in registers" pattern).
    threads: consumer threads (sm_90a adds a 128-thread TMA producer warpgroup).
    num_stages: pipeline depth (1 on sm_80: a run-time trip count with cp.async >= 2 stages
        does not compile in TileLang 0.1.15).
    combine_chunk: split partials the combine kernel loads per step.
    schedule: "auto" = T.Pipelined with TileLang's automatic warp specialisation on sm_90a
        (one mbarrier pair per gathered copy) or cp.async on sm_80; "ws" = sm_90a only, a
        hand-written producer warp (all gathered TMA copies of a stage complete on one
        mbarrier: 4 barriers per stage instead of one pair per copy) and one MMA warpgroup.
    ctas_per_sm: 1, or 2 ("ws" only) to cap registers (launch bounds; 224 registers for the
        MMA warpgroup instead of 240) so that two CTAs share an SM (smem permitting).
    """
    block_N: int = 64
    block_H: int = 64
    threads: int = 128
    num_stages: int = 2
    combine_chunk: int = 16
    schedule: str = "auto"
    ctas_per_sm: int = 1


SPARSE_BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class SparseDecodeShape(skv.DecodeHeads):
    """The compile-time problem: one kernel per shape and config. Batch, cache capacity S_max,
    the index width K, the lengths and the split count are run-time values."""
    block_size: int = 16
    dtype: str = "bfloat16"
    index_dtype: str = "int32"
    seqlen_dtype: str = "int32"


def check_shape(shape: SparseDecodeShape) -> None:
    shape.check_heads()
    if shape.block_size not in SPARSE_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SPARSE_BLOCK_SIZES} for the TileLang "
                         f"sparse_decode, got {shape.block_size}")


def tile_keys(shape: SparseDecodeShape, cfg: SparseDecodeConfig) -> int:
    """Keys per pipeline stage: block_N, raised to the block size."""
    return max(cfg.block_N, shape.block_size)


def num_tiles(shape: SparseDecodeShape, cfg: SparseDecodeConfig, k_width: int) -> int:
    """Pipeline tiles of a full index row of width K: what the split count is sized from."""
    return skv.ceil_div(max(k_width, 1), tile_keys(shape, cfg) // shape.block_size)


def check_config(shape: SparseDecodeShape, cfg: SparseDecodeConfig, arch: str = None) -> None:
    bn = tile_keys(shape, cfg)
    block_size, group = shape.block_size, shape.group
    if bn % block_size or bn % 16:
        raise ValueError(f"SparseDecodeConfig.block_N={cfg.block_N} must be a multiple of "
                         f"block_size={block_size} and of 16")
    skv.check_decode_tile(cfg, group)
    if cfg.schedule not in ("auto", "ws"):
        raise ValueError(f"SparseDecodeConfig.schedule must be 'auto' or 'ws', "
                         f"got {cfg.schedule!r}")
    if cfg.ctas_per_sm not in (1, 2):
        raise ValueError(f"SparseDecodeConfig.ctas_per_sm must be 1 or 2, got {cfg.ctas_per_sm}")
    if cfg.ctas_per_sm == 2 and cfg.schedule != "ws":
        # TileLang's automatic warp specialisation may insert setmaxnreg(240) for the MMA
        # warpgroup, which cannot be granted to two resident CTAs: the kernel deadlocks
        # (seen on the H100 with the dense kernel)
        raise ValueError("SparseDecodeConfig.ctas_per_sm=2 needs schedule='ws'")
    if cfg.schedule == "ws" and (cfg.block_H != 64 or cfg.threads != 128):
        raise ValueError("SparseDecodeConfig(schedule='ws') needs block_H=64, threads=128 "
                         "(one MMA warpgroup)")
    if cfg.schedule == "ws" and arch is not None and not arch.startswith("sm_9"):
        raise ValueError(f"SparseDecodeConfig(schedule='ws') needs Hopper (sm_90a), got {arch}")


def program(shape: SparseDecodeShape, config: SparseDecodeConfig, pdl: bool = False):
    """The TileLang program (split kernel + combine kernel) for one static configuration.

    Arguments of the compiled kernel, in order: q [B, H, D], k_cache [B, S, Hkv, D],
    v_cache [B, S, Hkv, Dv], block_indices [B, Hkv, K] (index_dtype), cache_seqlens [B]
    (seqlen_dtype), O_part [B, H, NS, Dv] f32, LSE_part [B, H, NS] f32, out [B, H, Dv],
    scale_log2 (float: softmax_scale * log2(e)). B, S, K and NS are run-time dimensions.
    The program is target-independent except for ``pdl`` (programmatic dependent launch,
    sm_90+ only: see common.grid_dependency) and schedule "ws" (sm_90a only).
    """
    check_shape(shape)
    check_config(shape, config)
    if config.schedule == "ws":
        return _program_ws(shape, config, pdl)
    import tilelang.language as T
    heads, heads_kv, dim, dim_v = shape.heads, shape.heads_kv, shape.dim, shape.dim_v
    bs, dtype, cfg = shape.block_size, shape.dtype, config
    index_dtype, seqlen_dtype = shape.index_dtype, shape.seqlen_dtype
    G = shape.group
    BN = tile_keys(shape, cfg)
    BH = cfg.block_H
    bpt = BN // bs
    SU = 4                                                # index-scan loads in flight per lane
    ACC = skv.ACC
    B, S, K, NS = T.dynamic("B S K NS")
    update = skv.make_softmax_update(BH, BN, dim_v, dtype)
    write = skv.make_write_partials(BH, G, dim_v)
    combine = skv.make_combine(heads, dim_v, dtype, cfg.combine_chunk, pdl)
    wait = skv.grid_dependency(pdl)
    kchunks = skv.column_chunks(dim, dtype)
    vchunks = skv.column_chunks(dim_v, dtype)

    @T.prim_func
    def sparse_decode(Q: T.Tensor((B, heads, dim), dtype),
                      Kc: T.Tensor((B, S, heads_kv, dim), dtype),
                      Vc: T.Tensor((B, S, heads_kv, dim_v), dtype),
                      Idx: T.Tensor((B, heads_kv, K), index_dtype),
                      Lens: T.Tensor((B,), seqlen_dtype),
                      O_part: T.Tensor((B, heads, NS, dim_v), ACC),
                      LSE_part: T.Tensor((B, heads, NS), ACC),
                      Out: T.Tensor((B, heads, dim_v), dtype),
                      scale_log2: T.float32):
        with T.Kernel(NS, heads_kv, B, threads=cfg.threads) as (sid, hk, b):
            if cfg.ctas_per_sm > 1:
                T.annotate_min_blocks_per_sm(cfg.ctas_per_sm)
            wait()
            Q_s, K_s, V_s, Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum = \
                skv.alloc_flash_tiles(BH, BN, dim, dim_v, dtype)
            last = T.alloc_var("int32")

            L = T.cast(Lens[b], "int32")
            per = T.ceildiv(T.ceildiv(K, bpt), NS)           # tiles per split
            e0 = sid * per * bpt                              # first index entry of the split
            e1 = T.min(e0 + per * bpt, K)                     # end of the split's entries
            lane = T.get_thread_binding() % 32
            last = e0
            for c in T.serial(T.ceildiv(T.max(e1 - e0, 0), 32 * SU)):
                for u in T.unroll(SU):
                    last = T.max(last, T.if_then_else(
                        (e0 + c * (32 * SU) + u * 32 + lane < e1)
                        and (Idx[b, hk, T.min(e0 + c * (32 * SU) + u * 32 + lane, K - 1)] >= 0),
                        e0 + c * (32 * SU) + u * 32 + lane + 1, 0))
            last = T.warp_reduce_max(last)
            trip = T.ceildiv(last - e0, bpt)

            for i, d in T.Parallel(BH, dim):
                Q_s[i, d] = T.if_then_else(i < G, Q[b, hk * G + i, d], T.cast(0, dtype))
            T.fill(acc, 0)
            T.fill(lsum, 0)
            T.fill(m, -T.infinity(ACC))
            for t in T.Pipelined(trip, num_stages=cfg.num_stages):
                for j in tuple(range(bpt)):                  # Python-unrolled: one copy each
                    for c0, cw in kchunks:
                        T.copy(Kc[b, T.max(T.cast(Idx[b, hk, T.min(e0 + t * bpt + j, K - 1)],
                                                  "int32"), 0) * bs:
                                  T.max(T.cast(Idx[b, hk, T.min(e0 + t * bpt + j, K - 1)],
                                               "int32"), 0) * bs + bs,
                                  hk, c0:c0 + cw],
                               K_s[j * bs:(j + 1) * bs, c0:c0 + cw])
                T.clear(Sc)
                T.gemm(Q_s, K_s, Sc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, jj in T.Parallel(BH, BN):
                    Sc[i, jj] = T.if_then_else(
                        (e0 + t * bpt + jj // bs < e1)
                        and (Idx[b, hk, T.min(e0 + t * bpt + jj // bs, K - 1)] >= 0)
                        and (T.cast(Idx[b, hk, T.min(e0 + t * bpt + jj // bs, K - 1)], "int32")
                             * bs + jj % bs < L),
                        Sc[i, jj] * scale_log2, -T.infinity(ACC))
                update(Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum)
                for j in tuple(range(bpt)):
                    for c0, cw in vchunks:
                        T.copy(Vc[b, T.max(T.cast(Idx[b, hk, T.min(e0 + t * bpt + j, K - 1)],
                                                  "int32"), 0) * bs:
                                  T.max(T.cast(Idx[b, hk, T.min(e0 + t * bpt + j, K - 1)],
                                               "int32"), 0) * bs + bs,
                                  hk, c0:c0 + cw],
                               V_s[j * bs:(j + 1) * bs, c0:c0 + cw])
                T.gemm(P, V_s, acc, policy=T.GemmWarpPolicy.FullRow)
            write(acc, m, lsum, O_part, LSE_part, b, hk, sid)
        combine(O_part, LSE_part, Out, B, NS)

    return sparse_decode


def _program_ws(shape: SparseDecodeShape, cfg: SparseDecodeConfig, pdl: bool):
    """Split kernel with a hand-written sm_90a schedule (SparseDecodeConfig.schedule="ws").

    Threads 0-127: the MMA warpgroup (64 padded query rows); threads 128-255: the producer
    warpgroup, whose first warp streams the gathered blocks with TMA into ``num_stages``
    K and V buffers. All bulk copies of one stage arrive on one mbarrier (kready / vready, with
    the summed byte count); the MMA warpgroup releases a buffer through kfree / vfree as soon
    as its wgmma has read it. Same arguments, index scan, masking and combine as "auto"."""
    import tilelang.language as T
    from tilelang.layout import make_swizzled_layout
    heads, heads_kv, dim, dim_v = shape.heads, shape.heads_kv, shape.dim, shape.dim_v
    bs, dtype = shape.block_size, shape.dtype
    index_dtype, seqlen_dtype = shape.index_dtype, shape.seqlen_dtype
    G = shape.group
    BN = tile_keys(shape, cfg)
    BH, NST, NMMA = cfg.block_H, cfg.num_stages, 128
    handoff = skv.producer_handoff(NMMA)
    bpt = BN // bs
    SU = 4
    ACC = skv.ACC
    B, S, K, NS = T.dynamic("B S K NS")
    update = skv.make_softmax_update(BH, BN, dim_v, dtype)
    write = skv.make_write_partials(BH, G, dim_v)
    combine = skv.make_combine(heads, dim_v, dtype, cfg.combine_chunk, pdl)
    wait = skv.grid_dependency(pdl)
    kchunks = skv.column_chunks(dim, dtype)
    vchunks = skv.column_chunks(dim_v, dtype)

    @T.prim_func
    def sparse_decode(Q: T.Tensor((B, heads, dim), dtype),
                      Kc: T.Tensor((B, S, heads_kv, dim), dtype),
                      Vc: T.Tensor((B, S, heads_kv, dim_v), dtype),
                      Idx: T.Tensor((B, heads_kv, K), index_dtype),
                      Lens: T.Tensor((B,), seqlen_dtype),
                      O_part: T.Tensor((B, heads, NS, dim_v), ACC),
                      LSE_part: T.Tensor((B, heads, NS), ACC),
                      Out: T.Tensor((B, heads, dim_v), dtype),
                      scale_log2: T.float32):
        with T.Kernel(NS, heads_kv, B, threads=NMMA + 128) as (sid, hk, b):
            if cfg.ctas_per_sm > 1:
                T.annotate_min_blocks_per_sm(cfg.ctas_per_sm)
            wait()
            Q_s = T.alloc_shared((BH, dim), dtype)
            K_s = T.alloc_shared((NST, BN, dim), dtype)
            V_s = T.alloc_shared((NST, BN, dim_v), dtype)
            T.annotate_layout({Q_s: make_swizzled_layout(Q_s), K_s: make_swizzled_layout(K_s),
                               V_s: make_swizzled_layout(V_s)})
            kready, vready, kfree, vfree = skv.alloc_stage_barriers(NST, NMMA)
            last = T.alloc_var("int32")

            tx = T.get_thread_binding()
            L = T.cast(Lens[b], "int32")
            per = T.ceildiv(T.ceildiv(K, bpt), NS)
            e0 = sid * per * bpt
            e1 = T.min(e0 + per * bpt, K)
            last = e0
            for c in T.serial(T.ceildiv(T.max(e1 - e0, 0), 32 * SU)):
                for u in T.unroll(SU):
                    last = T.max(last, T.if_then_else(
                        (e0 + c * (32 * SU) + u * 32 + tx % 32 < e1)
                        and (Idx[b, hk, T.min(e0 + c * (32 * SU) + u * 32 + tx % 32, K - 1)]
                             >= 0),
                        e0 + c * (32 * SU) + u * 32 + tx % 32 + 1, 0))
            last = T.warp_reduce_max(last)
            n = T.ceildiv(last - e0, bpt)

            for i, d in T.Parallel(BH, dim):
                Q_s[i, d] = T.if_then_else(i < G, Q[b, hk * G + i, d], T.cast(0, dtype))
            handoff(tx)
            if tx >= NMMA and tx < NMMA + 32:
                for it in T.serial(n):
                    st = it % NST
                    T.mbarrier_wait_parity(kfree[st], ((it // NST) & 1) ^ 1)
                    for j in tuple(range(bpt)):
                        for c0, cw in kchunks:
                            T.tma_copy(
                                Kc[b, T.max(T.cast(Idx[b, hk, T.min(e0 + it * bpt + j, K - 1)],
                                                   "int32"), 0) * bs:
                                   T.max(T.cast(Idx[b, hk, T.min(e0 + it * bpt + j, K - 1)],
                                                "int32"), 0) * bs + bs, hk, c0:c0 + cw],
                                K_s[st, j * bs:(j + 1) * bs, c0:c0 + cw],
                                barrier=kready[st], leader_scope_threads=32)
                    T.mbarrier_arrive(kready[st])
                    T.mbarrier_wait_parity(vfree[st], ((it // NST) & 1) ^ 1)
                    for j in tuple(range(bpt)):
                        for c0, cw in vchunks:
                            T.tma_copy(
                                Vc[b, T.max(T.cast(Idx[b, hk, T.min(e0 + it * bpt + j, K - 1)],
                                                   "int32"), 0) * bs:
                                   T.max(T.cast(Idx[b, hk, T.min(e0 + it * bpt + j, K - 1)],
                                                "int32"), 0) * bs + bs, hk, c0:c0 + cw],
                                V_s[st, j * bs:(j + 1) * bs, c0:c0 + cw],
                                barrier=vready[st], leader_scope_threads=32)
                    T.mbarrier_arrive(vready[st])

            with T.ws(0):
                T.set_max_nreg(240 if cfg.ctas_per_sm == 1 else 224, 1)
                Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum = \
                    skv.alloc_flash_state(BH, BN, dim_v, dtype)
                T.fill(acc, 0)
                T.fill(lsum, 0)
                T.fill(m, -T.infinity(ACC))
                for it in T.serial(n):
                    st = it % NST
                    T.mbarrier_wait_parity(kready[st], (it // NST) & 1)
                    T.wgmma_gemm(Q_s, K_s[st, :, :], Sc, transpose_B=True,
                                 policy=T.GemmWarpPolicy.FullRow, clear_accum=True)
                    T.wait_wgmma(0)
                    T.mbarrier_arrive(kfree[st])
                    for i, jj in T.Parallel(BH, BN):
                        Sc[i, jj] = T.if_then_else(
                            (e0 + it * bpt + jj // bs < e1)
                            and (Idx[b, hk, T.min(e0 + it * bpt + jj // bs, K - 1)] >= 0)
                            and (T.cast(Idx[b, hk, T.min(e0 + it * bpt + jj // bs, K - 1)],
                                        "int32") * bs + jj % bs < L),
                            Sc[i, jj] * scale_log2, -T.infinity(ACC))
                    update(Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum)
                    T.mbarrier_wait_parity(vready[st], (it // NST) & 1)
                    T.wgmma_gemm(P, V_s[st, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
                    T.wait_wgmma(0)
                    T.mbarrier_arrive(vfree[st])
                write(acc, m, lsum, O_part, LSE_part, b, hk, sid)
        combine(O_part, LSE_part, Out, B, NS)

    return sparse_decode


@functools.lru_cache(maxsize=None)
def compile_kernel(shape: SparseDecodeShape, config: SparseDecodeConfig, arch: str, pdl: bool):
    """Compiled kernel, memoised per static configuration (and in TileLang's disk cache)."""
    check_config(shape, config, arch)
    # the hand-written schedule places its own barriers; TileLang's automatic __syncthreads
    # would deadlock inside the warp-specialised branches
    return skv.compile_program(program(shape, config, pdl), arch,
                               auto_sync=config.schedule != "ws")


def launch(kernel, q, k_cache, v_cache, block_indices, cache_seqlens, o_part, lse_part, out,
           scale_log2: float):
    """One call of a compiled kernel: q [B, H, D], k_cache [B, S_max, Hkv, D] and v_cache
    [B, S_max, Hkv, Dv] contiguous, block_indices [B, Hkv, K] (K >= 1; -1 = ignore),
    cache_seqlens [B], the split workspaces o_part [B, H, NS, Dv] / lse_part [B, H, NS] fp32
    (NS in [1, num_tiles]), out [B, H, Dv]. No checks: the caller (resa_tl.plan) sized
    everything."""
    kernel(q, k_cache, v_cache, block_indices, cache_seqlens, o_part, lse_part, out, scale_log2)
    return out
