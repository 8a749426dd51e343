"""Rectification attention: the last T tokens of each row (their K/V already in the cache)
attend densely to the cache, causally within the chunk. Prefill uses it too.

Longer than ~450 lines because it holds two schedules of the split kernel (TileLang's
automatic pipeline, and the hand-written sm_90a ping-pong that is faster for 128-row tiles at
head_dim 128) plus their combine kernel; both must stay in step with the same reference."""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import torch

from ._reference import heads_major, masked_attention


def rectify_attention_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale,
                                compute_dtype=torch.float32):
    """Torch reference of :func:`resa_tl.ops.rectify_attention` (fp32 math, output in q.dtype).

    q [B, T, H, D]; query t of row b attends to keys [0, cache_seqlens[b] - T + t].
    """
    B, T, H, D = q.shape
    S, Hkv = k_cache.shape[1], k_cache.shape[2]
    g = H // Hkv
    qg = q.permute(0, 2, 1, 3).reshape(B, Hkv, g * T, D)                  # rows ordered (head, t)
    last = cache_seqlens.view(B, 1).long() - T + torch.arange(T, device=q.device)   # [B, T]
    mask = torch.arange(S, device=q.device)[None, None] <= last[..., None]          # [B, T, S]
    mask = mask[:, None].expand(B, g, T, S).reshape(B, 1, g * T, S)
    o = masked_attention(qg, heads_major(k_cache), heads_major(v_cache), mask, softmax_scale,
                         compute_dtype)
    return o.view(B, H, T, -1).permute(0, 2, 1, 3).to(q.dtype)


# ------------------------------------------------------------------------------------------
# TileLang kernel
# ------------------------------------------------------------------------------------------
#
# Design (one pass over the cache for all T queries of a row):
#
# * GQA packing. The g query heads of a KV head and the T positions of the chunk form
#   R = T * g query rows that all read the same keys. Row r is (t, j) = (r // g, r % g), i.e.
#   query head hkv * g + j at chunk position t; rows of one t are contiguous in q's head dim.
#   A CTA holds ``block_M`` of these rows (64 per consumer warpgroup, so wgmma on sm_90a) and
#   streams K/V tiles of ``block_N`` keys through shared memory (TMA + warp specialisation on
#   sm_90a, cp.async on sm_80). When R > block_M the ceil(R / block_M) row tiles of one
#   (row, KV head, split) are adjacent in blockIdx.x, so they run together and the second
#   one's K/V reads hit L2: DRAM sees the cache once.
# * Split-KV. The ceil(len / block_N) key blocks of a row are cut into ``num_splits`` ranges
#   (a run-time kernel argument read from the workspace shape, chosen from the SM count by
#   resa_tl.heuristics.rectify_num_splits); each split writes a normalised partial O and its
#   log2-sum-exp (-inf for an empty split / a row with no key in the split), and a second
#   kernel combines them. With one split the first kernel writes the output directly.
# * Causal masking. Query t of row b sees keys [0, len - T + t]. Only key blocks that reach
#   past len - T (at most ceil(T / block_N) + 1 blocks) need a mask; a block-uniform branch
#   skips the per-element compare everywhere else. The running max is guarded (a row whose
#   keys in a split are all masked keeps max -inf and weight 0, never NaN).
# * Arithmetic intensity. Per key and KV head the kernel reads 2 * D * 2 bytes and does
#   4 * D * R flops: R = 224 (T = 32, g = 7) is ~224 flop/byte, above what an H100 sustains
#   at its ~3 TB/s (~800 TFLOP/s wgmma peak / 3 TB/s ~ 266 flop/byte only at peak), so for
#   T * g >~ 150 rectification is compute-bound, not memory-bound like decode; tiles are
#   sized for the tensor cores (two 64-row warpgroups, 128-key steps) and the rows are
#   padded to 64 per warpgroup (224 -> 256 at T = 32, g = 7).
# * Two schedules for the split kernel (RectifyConfig.schedule): "auto" (T.Pipelined,
#   TileLang's own warp specialisation; the only one on sm_80) and "pingpong" (sm_90a,
#   hand-written producer/consumer warpgroups whose GEMMs alternate so that one
#   warpgroup's softmax overlaps the other's tensor-core work; see _split_pingpong).
# * Static vs symbolic. Batch, cache capacity S_max, the lengths and the split count are
#   symbolic (no recompile as lengths grow or the batch changes); T, g, Hkv, D, Dv, dtype,
#   the tile config and the softmax scale are compile-time constants, so one kernel is
#   compiled (and memoised) per T.

import dataclasses
import functools

from . import common

RECTIFY_MAX_T = 64            # largest chunk T the TileLang kernel takes (see check_shape)
RECTIFY_HEAD_DIMS = (64, 128)  # head_dim / head_dim_v the TileLang kernel takes


@dataclasses.dataclass(frozen=True)
class RectifyConfig:
    """Static tile configuration of the rectify kernel (see heuristics.rectify_config).

    block_M: query rows (of the T * g rows of a KV head) per CTA; 64 per consumer warpgroup.
    block_N: keys per pipeline step (multiple of 16).
    num_stages: K/V shared-memory buffers in flight (1 on sm_80: runtime trip count).
    threads: consumer threads, = 2 * block_M (each warp owns 16 full rows: the flash
        "P stays in registers" FullRow layout).
    schedule: "auto" = T.Pipelined, TileLang's automatic warp specialisation (sm_90a) or
        cp.async pipeline (sm_80); "pingpong" = sm_90a only, hand-written producer warpgroup
        (TMA) + two consumer warpgroups whose GEMMs alternate through named barriers while
        the other one does its softmax (FlashAttention-3's schedule), with the P @ V of block
        k - 1 issued together with Q @ K^T of block k.
    """
    block_M: int = 128
    block_N: int = 128
    num_stages: int = 2
    threads: int = 256
    schedule: str = "auto"

    def __post_init__(self):
        if self.schedule not in ("auto", "pingpong"):
            raise ValueError(f"schedule must be 'auto' or 'pingpong', got {self.schedule!r}")
        if self.schedule == "pingpong" and (self.block_M != 128 or self.num_stages < 1):
            raise ValueError("schedule='pingpong' needs block_M=128 (two consumer warpgroups) "
                             "and num_stages >= 1")
        if self.block_M % 64 or self.block_M < 64:
            raise ValueError(f"block_M must be a multiple of 64, got {self.block_M}")
        if self.block_N % 16 or self.block_N < 16:
            raise ValueError(f"block_N must be a multiple of 16, got {self.block_N}")
        if self.threads != 2 * self.block_M:
            raise ValueError(f"threads must be 2 * block_M = {2 * self.block_M}, "
                             f"got {self.threads}")
        if self.num_stages < 0:
            raise ValueError(f"num_stages must be >= 0, got {self.num_stages}")


@dataclasses.dataclass(frozen=True)
class RectifyShape:
    """The compile-time problem: T = num_q queries per row (the chunk), GQA group g, KV heads,
    head dims, dtype and the softmax scale (folded into the kernel). Batch, cache capacity
    S_max, the lengths and the split count are run-time values."""
    num_q: int
    group: int
    heads_kv: int
    dim: int
    dim_v: int
    dtype: str
    softmax_scale: float

    @property
    def rows(self) -> int:
        """Query rows per KV head: R = T * g."""
        return self.num_q * self.group


def check_shape(shape: RectifyShape) -> None:
    if not 1 <= shape.num_q <= RECTIFY_MAX_T:
        raise ValueError(f"rectify_attention (tilelang): q holds T={shape.num_q} queries per "
                         f"row; the kernel supports 1 <= T <= {RECTIFY_MAX_T} (use "
                         f"backend='torch' or smaller chunks)")
    if shape.dim not in RECTIFY_HEAD_DIMS or shape.dim_v not in RECTIFY_HEAD_DIMS:
        raise ValueError(f"rectify_attention (tilelang): head_dim={shape.dim}, "
                         f"head_dim_v={shape.dim_v}; supported: {RECTIFY_HEAD_DIMS}")


def check_config(config: RectifyConfig, arch: str) -> None:
    if config.schedule == "pingpong" and not arch.startswith("sm_9"):
        raise ValueError(f"schedule='pingpong' needs Hopper (sm_90a), got arch {arch}")


def num_row_tiles(shape: RectifyShape, config: RectifyConfig) -> int:
    return common.ceil_div(shape.rows, config.block_M)


def program(shape: RectifyShape, config: RectifyConfig, pdl: bool = False):
    """TileLang programs of rectify attention for a static shape and tile config. Returns
    ``(split_prog, combine_prog)``, two PrimFuncs:

    split_prog(Q [B, T, H, D], K [B, S, Hkv, D], V [B, S, Hkv, Dv], Lens [B] int32,
               O_part [B, Hkv, NS, T*g, Dv] f32, LSE_part [B, Hkv, NS, T*g] f32,
               Out [B, T, H, Dv])
        B, S and NS are symbolic. NS == 1: writes Out directly (O_part/LSE_part untouched);
        NS > 1: writes the per-split partials, and combine_prog(O_part, LSE_part, Out) must
        follow.
    ``pdl``: programmatic dependent launch for both (sm_90+; see common.grid_dependency).
    """
    import tilelang.language as T
    wait = common.grid_dependency(pdl)

    dt = common.tl_dtype(shape.dtype)
    acc_t = "float32"
    TQ, G, HKV = int(shape.num_q), int(shape.group), int(shape.heads_kv)
    D, DV = int(shape.dim), int(shape.dim_v)
    H = HKV * G
    R = TQ * G                                   # query rows per KV head
    BM, BN = config.block_M, config.block_N
    NRT = -(-R // BM)                            # row tiles per KV head
    c = float(shape.softmax_scale) * common.LOG2E   # scores -> log2 domain, one FMA
    neg_inf = -T.infinity(acc_t)

    B, S, NS = T.dynamic("B S NS")
    update = common.make_softmax_update(BM, BN, DV, dt, scale=c)

    @T.prim_func
    def split_prog(
            Q: T.Tensor((B, TQ, H, D), dt),
            K: T.Tensor((B, S, HKV, D), dt),
            V: T.Tensor((B, S, HKV, DV), dt),
            Lens: T.Tensor((B,), "int32"),
            O_part: T.Tensor((B, HKV, NS, R, DV), acc_t),
            LSE_part: T.Tensor((B, HKV, NS, R), acc_t),
            Out: T.Tensor((B, TQ, H, DV), dt),
    ):
        with T.Kernel(NRT, NS, B * HKV, threads=config.threads) as (rt, sid, bh):
            wait()
            Q_s, K_s, V_s, Sc, P, acc, m, m_prev, mc, alpha, rsum, l = \
                common.alloc_flash_tiles(BM, BN, D, DV, dt)

            b = bh // HKV
            hkv = bh % HKV
            L = Lens[b]
            first_masked = L - TQ + 1            # keys >= this are hidden from some row
            nblk = T.ceildiv(L, BN)
            per = T.ceildiv(nblk, NS)
            lo = sid * per
            hi = T.min(lo + per, nblk)

            for i, d in T.Parallel(BM, D):
                Q_s[i, d] = T.if_then_else(
                    rt * BM + i < R,
                    Q[b, (rt * BM + i) // G, hkv * G + (rt * BM + i) % G, d],
                    T.cast(0, dt))
            T.fill(acc, 0)
            T.fill(l, 0)
            T.fill(m, neg_inf)

            for it in T.Pipelined(T.max(hi - lo, 0), num_stages=config.num_stages):
                kb = lo + it
                T.copy(K[b, kb * BN:(kb + 1) * BN, hkv, :], K_s)
                T.clear(Sc)
                T.gemm(Q_s, K_s, Sc, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                if (kb + 1) * BN > first_masked:
                    # key kb*BN+j is visible to row i iff kb*BN+j <= L - T + t(i); padded rows
                    # (r >= R) get t = T-1 so they stay finite
                    for i, j in T.Parallel(BM, BN):
                        Sc[i, j] = T.if_then_else(
                            kb * BN + j < first_masked + T.min((rt * BM + i) // G, TQ - 1),
                            Sc[i, j], neg_inf)
                update(Sc, P, acc, m, m_prev, mc, alpha, rsum, l)
                T.copy(V[b, kb * BN:(kb + 1) * BN, hkv, :], V_s)
                T.gemm(P, V_s, acc, policy=T.GemmWarpPolicy.FullRow)

            for i in T.Parallel(BM):
                rsum[i] = T.if_then_else(l[i] > 0, 1.0 / l[i], 0.0)
            if NS == 1:
                for i, d in T.Parallel(BM, DV):
                    if rt * BM + i < R:
                        Out[b, (rt * BM + i) // G, hkv * G + (rt * BM + i) % G, d] = \
                            T.cast(acc[i, d] * rsum[i], dt)
            else:
                for i, d in T.Parallel(BM, DV):
                    if rt * BM + i < R:
                        O_part[b, hkv, sid, rt * BM + i, d] = acc[i, d] * rsum[i]
                for i in T.Parallel(BM):
                    if rt * BM + i < R:
                        LSE_part[b, hkv, sid, rt * BM + i] = T.if_then_else(
                            l[i] > 0, T.log2(l[i]) + m[i] * c, neg_inf)

    if config.schedule == "pingpong":
        split_prog = _split_pingpong(TQ, G, HKV, D, DV, dt, c, config, B, S, NS, wait)

    @T.prim_func
    def combine_prog(
            O_part: T.Tensor((B, HKV, NS, R, DV), acc_t),
            LSE_part: T.Tensor((B, HKV, NS, R), acc_t),
            Out: T.Tensor((B, TQ, H, DV), dt),
    ):
        with T.Kernel(R, HKV, B, threads=DV) as (r, hkv, b):
            wait()
            o = T.alloc_fragment((DV,), acc_t)
            mx = T.alloc_var(acc_t)
            tot = T.alloc_var(acc_t)
            w = T.alloc_var(acc_t)
            mx = neg_inf
            for s in T.serial(NS):
                mx = T.max(mx, LSE_part[b, hkv, s, r])
            tot = 0.0
            T.clear(o)
            # every row has at least key 0 in split 0, so mx is finite
            for s in T.serial(NS):
                w = T.exp2(LSE_part[b, hkv, s, r] - mx)
                tot += w
                for d in T.Parallel(DV):
                    o[d] += O_part[b, hkv, s, r, d] * w
            for d in T.Parallel(DV):
                Out[b, r // G, hkv * G + r % G, d] = T.cast(o[d] / tot, dt)

    return split_prog, combine_prog


_PP_BAR = (8, 9)   # named-barrier ids of the ping-pong (ids 0-2 are used by TileLang itself)


def _split_pingpong(TQ, G, HKV, D, DV, dt, c, config, B, S, NS, wait):
    """Split kernel with a hand-written sm_90a schedule (see RectifyConfig.schedule).

    Threads 0-255: consumer warpgroups w = 0, 1, each owning 64 query rows; threads 256-383:
    producer warpgroup, one warp of which streams K and V tiles with TMA into ``num_stages``
    buffers (mbarriers kready/vready: loaded; kfree/vfree: released by both consumers).
    Per key block k a consumer does, between bar.sync(own) and bar.arrive(other):
    S = Q K_k^T and O = O * alpha_{k-1} + P_{k-1} V_{k-1} (both async wgmma), then, while the
    other warpgroup's GEMMs run, the masked online softmax of S (after wait(1): S done),
    then wait(0) (P_{k-1} V_{k-1} done, so P may be overwritten)."""
    import tilelang.language as T
    from tilelang.layout import make_swizzled_layout

    acc_t = "float32"
    R = TQ * G
    H = HKV * G
    BN, NST = config.block_N, config.num_stages
    HM = 64                                      # rows per consumer warpgroup
    NRT = -(-R // (2 * HM))
    NMMA = 256                                   # consumer threads
    handoff = common.producer_handoff(NMMA)
    neg_inf = -T.infinity(acc_t)

    @T.macro
    def softmax_step(Sc, m, m_prev, mc, alpha, rsum, kb, r0, fm):
        """Key block kb of rows r0..r0+63: mask (only blocks reaching past fm = len - T + 1),
        running max m, alpha = rescale of the old sums, Sc <- exp2(scaled score - max),
        rsum = row sums of the new block."""
        if (kb + 1) * BN > fm:
            for i, j in T.Parallel(HM, BN):
                Sc[i, j] = T.if_then_else(
                    kb * BN + j < fm + T.min((r0 + i) // G, TQ - 1),
                    Sc[i, j], neg_inf)
        T.copy(m, m_prev)
        T.reduce_max(Sc, m, dim=1, clear=False)
        for i in T.Parallel(HM):
            mc[i] = T.if_then_else(m[i] == neg_inf, 0.0, m[i] * c)
            alpha[i] = T.exp2(m_prev[i] * c - mc[i])
        for i, j in T.Parallel(HM, BN):
            Sc[i, j] = T.exp2(Sc[i, j] * c - mc[i])
        T.reduce_sum(Sc, rsum, dim=1)

    @T.prim_func
    def split_prog(
            Q: T.Tensor((B, TQ, H, D), dt),
            K: T.Tensor((B, S, HKV, D), dt),
            V: T.Tensor((B, S, HKV, DV), dt),
            Lens: T.Tensor((B,), "int32"),
            O_part: T.Tensor((B, HKV, NS, R, DV), acc_t),
            LSE_part: T.Tensor((B, HKV, NS, R), acc_t),
            Out: T.Tensor((B, TQ, H, DV), dt),
    ):
        with T.Kernel(NRT, NS, B * HKV, threads=NMMA + 128) as (rt, sid, bh):
            wait()
            Q_s = T.alloc_shared((2, HM, D), dt)
            K_s = T.alloc_shared((NST, BN, D), dt)
            V_s = T.alloc_shared((NST, BN, DV), dt)
            T.annotate_layout({Q_s: make_swizzled_layout(Q_s), K_s: make_swizzled_layout(K_s),
                               V_s: make_swizzled_layout(V_s)})
            kready, vready, kfree, vfree = common.alloc_stage_barriers(NST, NMMA)

            tx = T.get_thread_binding()
            b = bh // HKV
            hkv = bh % HKV
            L = Lens[b]
            first_masked = L - TQ + 1
            nblk = T.ceildiv(L, BN)
            per = T.ceildiv(nblk, NS)
            lo = sid * per
            n = T.max(T.min(lo + per, nblk) - lo, 0)

            for w, i, d in T.Parallel(2, HM, D):
                Q_s[w, i, d] = T.if_then_else(
                    rt * 2 * HM + w * HM + i < R,
                    Q[b, (rt * 2 * HM + w * HM + i) // G,
                      hkv * G + (rt * 2 * HM + w * HM + i) % G, d],
                    T.cast(0, dt))
            handoff(tx)
            if tx >= NMMA and tx < NMMA + 32:
                for it in T.serial(n):
                    st = it % NST
                    kb = lo + it
                    T.mbarrier_wait_parity(kfree[st], ((it // NST) & 1) ^ 1)
                    T.tma_copy(K[b, kb * BN:(kb + 1) * BN, hkv, :], K_s[st, :, :],
                               barrier=kready[st], leader_scope_threads=32)
                    T.mbarrier_arrive(kready[st])
                    T.mbarrier_wait_parity(vfree[st], ((it // NST) & 1) ^ 1)
                    T.tma_copy(V[b, kb * BN:(kb + 1) * BN, hkv, :], V_s[st, :, :],
                               barrier=vready[st], leader_scope_threads=32)
                    T.mbarrier_arrive(vready[st])

            for w in (0, 1):                      # Python loop: unrolled at trace time
                with T.ws(w):
                    T.set_max_nreg(240, 1)
                    my_bar = _PP_BAR[w]
                    other_bar = _PP_BAR[1 - w]
                    r0 = rt * 2 * HM + w * HM
                    Sc, P, acc, m, m_prev, mc, alpha, rsum, l = \
                        common.alloc_flash_state(HM, BN, DV, dt)
                    T.fill(acc, 0)
                    T.fill(l, 0)
                    T.fill(alpha, 1.0)
                    T.fill(m, neg_inf)
                    T.clear(P)                      # read (by P V) only from block 1 on
                    if w == 1:
                        T.named_barrier_arrive(_PP_BAR[0], NMMA)      # warpgroup 0 goes first

                    # block 0 (peeled: only S = Q K^T is in flight), then the steady loop
                    # with S_k and P_{k-1} V_{k-1} in flight together (no branch around the
                    # wgmma issue/wait, so ptxas keeps them asynchronous), then P_{n-1} V_{n-1}
                    if n > 0:
                        T.sync_threads(my_bar, NMMA)
                        T.mbarrier_wait_parity(kready[0], 0)
                        T.wgmma_gemm(Q_s[w, :, :], K_s[0, :, :], Sc, transpose_B=True,
                                     policy=T.GemmWarpPolicy.FullRow, clear_accum=True)
                        T.named_barrier_arrive(other_bar, NMMA)
                        T.wait_wgmma(0)
                        T.mbarrier_arrive(kfree[0])
                        softmax_step(Sc, m, m_prev, mc, alpha, rsum, lo, r0, first_masked)
                        for i in T.Parallel(HM):
                            l[i] = rsum[i]
                        T.copy(Sc, P)

                    for it in T.serial(1, T.max(n, 1)):
                        st = it % NST
                        sp = (it + NST - 1) % NST
                        T.sync_threads(my_bar, NMMA)
                        T.mbarrier_wait_parity(kready[st], (it // NST) & 1)
                        T.wgmma_gemm(Q_s[w, :, :], K_s[st, :, :], Sc, transpose_B=True,
                                     policy=T.GemmWarpPolicy.FullRow, clear_accum=True)
                        for i, d in T.Parallel(HM, DV):
                            acc[i, d] *= alpha[i]
                        T.mbarrier_wait_parity(vready[sp], ((it - 1) // NST) & 1)
                        T.wgmma_gemm(P, V_s[sp, :, :], acc, policy=T.GemmWarpPolicy.FullRow)
                        T.named_barrier_arrive(other_bar, NMMA)
                        T.wait_wgmma(1)                     # S done; P V may still run
                        T.mbarrier_arrive(kfree[st])
                        softmax_step(Sc, m, m_prev, mc, alpha, rsum, lo + it, r0, first_masked)
                        T.wait_wgmma(0)                     # P V done: P may be rewritten
                        T.mbarrier_arrive(vfree[sp])
                        for i in T.Parallel(HM):
                            l[i] = l[i] * alpha[i] + rsum[i]
                        T.copy(Sc, P)

                    if n > 0:
                        for i, d in T.Parallel(HM, DV):
                            acc[i, d] *= alpha[i]
                        T.mbarrier_wait_parity(vready[(n - 1) % NST], ((n - 1) // NST) & 1)
                        T.wgmma_gemm(P, V_s[(n - 1) % NST, :, :], acc,
                                     policy=T.GemmWarpPolicy.FullRow)
                        T.wait_wgmma(0)
                        T.mbarrier_arrive(vfree[(n - 1) % NST])

                    for i in T.Parallel(HM):
                        rsum[i] = T.if_then_else(l[i] > 0, 1.0 / l[i], 0.0)
                    if NS == 1:
                        for i, d in T.Parallel(HM, DV):
                            if r0 + i < R:
                                Out[b, (r0 + i) // G, hkv * G + (r0 + i) % G, d] = \
                                    T.cast(acc[i, d] * rsum[i], dt)
                    else:
                        for i, d in T.Parallel(HM, DV):
                            if r0 + i < R:
                                O_part[b, hkv, sid, r0 + i, d] = acc[i, d] * rsum[i]
                        for i in T.Parallel(HM):
                            if r0 + i < R:
                                LSE_part[b, hkv, sid, r0 + i] = T.if_then_else(
                                    l[i] > 0, T.log2(l[i]) + m[i] * c, neg_inf)

    return split_prog


@functools.lru_cache(maxsize=None)
def compile_kernel(shape: RectifyShape, config: RectifyConfig, arch: str, pdl: bool):
    """Compiled (split, combine) kernels, memoised per static configuration (one per T)."""
    check_shape(shape)
    check_config(config, arch)
    split_prog, combine_prog = program(shape, config, pdl)
    # the hand-written schedule places its own barriers; TileLang's automatic
    # __syncthreads would deadlock inside warp-specialised branches
    return (common.compile_program(split_prog, arch, auto_sync=config.schedule != "pingpong"),
            common.compile_program(combine_prog, arch))


def launch(kernels, q, k_cache, v_cache, cache_seqlens, o_part, lse_part, out):
    """One call: q [B, T, H, D], k_cache [B, S_max, Hkv, D], v_cache [B, S_max, Hkv, Dv]
    (contiguous), cache_seqlens [B] int32 (each >= T), the split workspaces o_part
    [B, Hkv, NS, T*g, Dv] / lse_part [B, Hkv, NS, T*g] fp32, out [B, T, H, Dv]. The split
    count NS is the workspaces'; with NS == 1 the split kernel writes ``out`` itself."""
    split_k, combine_k = kernels
    split_k(q, k_cache, v_cache, cache_seqlens, o_part, lse_part, out)
    if o_part.shape[2] > 1:
        combine_k(o_part, lse_part, out)
    return out
