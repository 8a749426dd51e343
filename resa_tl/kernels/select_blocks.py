"""Block selection: score every valid block against the group-mean query with the min/max upper
bound, always keep the newest ``local_blocks``, keep the top n overall, emit them sorted.

Longer than the other kernel modules because one program holds two kernels (a memory-bound
scoring kernel and a one-CTA-per-row radix select with ordered compaction and the optional
summary refresh), launched by one host call, and the torch references of both live beside it."""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import torch

# sparse_ratio is applied in exact integer arithmetic, ceil(NB * num / RATIO_DENOM): a float
# product such as 30 * 0.1 = 3.0000000000000004 would otherwise keep one block too many, and the
# kernels (fp32) and the reference (fp64) would disagree.
RATIO_DENOM = 1_000_000


def ratio_numerator(sparse_ratio: float) -> int:
    return int(round(sparse_ratio * RATIO_DENOM))


def blocks_to_keep(num_valid_blocks, sparse_ratio: float, min_blocks: int):
    """n = max(ceil(NB * ratio), min(NB, min_blocks)); works on ints and on int tensors."""
    num = ratio_numerator(sparse_ratio)
    by_ratio = (num_valid_blocks * num + RATIO_DENOM - 1) // RATIO_DENOM
    if isinstance(num_valid_blocks, torch.Tensor):
        return torch.maximum(by_ratio, num_valid_blocks.clamp(max=min_blocks))
    return max(by_ratio, min(num_valid_blocks, min_blocks))


def default_max_selected(num_blocks: int, sparse_ratio: float, min_blocks: int) -> int:
    """Static width K of the index tensor: n for a full cache (n grows with NB)."""
    return max(1, blocks_to_keep(num_blocks, sparse_ratio, min_blocks))


def block_scores_reference(q, kmin, kmax, cache_seqlens, block_size: int, local_blocks: int,
                           sink_blocks: int = 0):
    """Scores [B, Hkv, NB] in fp32: -inf past a row's end, +inf for the local and sink blocks."""
    B, H, D = q.shape
    _, NB, Hkv, _ = kmin.shape
    from .block_summaries import summary_values
    qm = q.float().view(B, Hkv, H // Hkv, D).mean(dim=2) * D ** -0.5      # [B, Hkv, D]
    lo, hi = summary_values(kmin, kmax)                                  # fp8: sentinel decoded
    lo, hi = lo.permute(0, 2, 1, 3), hi.permute(0, 2, 1, 3)              # [B, Hkv, NB, D]
    s = torch.maximum(qm[:, :, None] * lo, qm[:, :, None] * hi).sum(-1)
    nvalid = (cache_seqlens.long() + block_size - 1) // block_size        # [B]
    j = torch.arange(NB, device=q.device)
    valid = j[None] < nvalid[:, None]                                    # [B, NB]
    local = valid & ((j[None] >= nvalid[:, None] - local_blocks) | (j[None] < sink_blocks))
    s = torch.where(valid[:, None], s, float("-inf"))
    return torch.where(local[:, None], float("inf"), s)


def select_blocks_reference(q, kmin, kmax, cache_seqlens, *, block_size, sparse_ratio,
                            min_blocks, local_blocks, max_selected, k_cache=None,
                            sink_blocks=0):
    """Torch reference of :func:`resa_tl.ops.select_blocks` (with ``k_cache``: the newest
    block's summary is refreshed in place after the selection, which does not depend on it)."""
    if k_cache is not None:
        from .block_summaries import refresh_newest_summaries_reference
        top = select_blocks_reference(q, kmin, kmax, cache_seqlens, block_size=block_size,
                                      sparse_ratio=sparse_ratio, min_blocks=min_blocks,
                                      local_blocks=local_blocks, max_selected=max_selected,
                                      sink_blocks=sink_blocks)
        refresh_newest_summaries_reference(kmin, kmax, k_cache, cache_seqlens, block_size)
        return top
    s = block_scores_reference(q, kmin, kmax, cache_seqlens, block_size, local_blocks,
                               sink_blocks)
    return select_from_scores_reference(s, cache_seqlens, block_size=block_size,
                                        sparse_ratio=sparse_ratio, min_blocks=min_blocks,
                                        max_selected=max_selected)


def select_from_scores_reference(s, cache_seqlens, *, block_size, sparse_ratio, min_blocks,
                                 max_selected):
    """The budget, top-k and output order of select_blocks applied to given block scores
    s [B, Hkv, NB] (fp32; -inf past a row's end, +inf for blocks that must be kept). Lets a
    diagnostic swap the scoring rule (resa_tl.fidelity) and keep everything else."""
    NB = s.shape[2]
    K = max_selected
    nvalid = (cache_seqlens.long() + block_size - 1) // block_size
    n = blocks_to_keep(nvalid, sparse_ratio, min_blocks).clamp(max=K)      # [B]
    kk = min(K, NB)
    top = s.topk(kk, dim=-1, sorted=True).indices                         # [B, Hkv, kk]
    keep = torch.arange(kk, device=s.device)[None, None] < n[:, None, None]
    top = torch.where(keep, top, NB).sort(dim=-1).values                  # NB sorts after ids
    top = torch.where(top == NB, -1, top).to(torch.int32)
    if kk < K:
        top = torch.nn.functional.pad(top, (0, K - kk), value=-1)
    return top


# ---------------------------------------------------------------------------------------------
# TileLang backend: two kernels in one program (one host call, launched back to back).
#
# 1. Scoring (memory-bound): grid (ceil(NB / rows_per_cta), B); a CTA scores rows_per_cta
#    blocks for all Hkv heads. Its threads lie over (block, 16-byte vector of the Hkv*D row)
#    items; every thread first issues all of its kmin/kmax vector loads (registers), then
#    computes the group-mean query qm (fp32, in shared memory, scaled by D^-0.5) from q, then
#    sum_d max(qm*lo, qm*hi) over its 8 elements and a shuffle reduction over the D/8 lanes of
#    one (block, head). fp32 scores go to a workspace [B, Hkv, NB] (stays in L2). CTAs whose
#    blocks all lie past the row's length exit at once, so short rows cost nothing.
# 2. Select (latency-bound): one CTA per (b, hkv). Thread t owns the contiguous block range
#    [t*C, (t+1)*C) and turns its scores into order-preserving uint32 keys (local and sink
#    blocks -> 0xFFFFFFFF, i.e. above any score). A 4-pass 8-bit radix select (shared-memory
#    histogram, SelectionConfig.hist: warp-aggregated atomics via __match_any_sync in the first pass, whose
#    top bits (sign, exponent) are shared by most keys, plain atomics after; one warp finds the
#    bucket by a suffix scan) finds the n-th largest key T and how many keys equal to T to keep;
#    it stops early once the threshold bucket is kept whole. Then an ordered compaction: two
#    block-wide exclusive scans over threads (keys == T before me; kept before me) give every thread its
#    output offset, so kept ids come out ascending with no sort, and -1 fills the tail.
#    Ties (equal fp32 scores at the threshold) keep the LOWER block ids: deterministic.
#    With ``refresh`` (decode loops that append one token per step), the select CTA of (b, hkv)
#    first rewrites kmin/kmax of that row's newest block from the K cache, over the block's
#    positions below the row's length, which is what update_block_summaries(start=len-1,
#    length=1) does. That block is a local block, always kept whatever its score, so the
#    scoring kernel may read it stale; the next step scores it fresh. This saves the separate
#    summary-update launch of every decode step and layer.
# Keys live in registers while C <= 16 (NB <= 16384 at 1024 threads: 256K tokens at block 16)
# and in shared memory (layout [c][thread], bank-conflict free) up to NB = 49152.
# ---------------------------------------------------------------------------------------------
import functools  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from .block_summaries import fp8_name, round_outward_tl, summary_value_tl  # noqa: E402
from .common import compile_program  # noqa: E402

_VEC = 8                     # fp16/bf16 elements per 16-byte load
_MAX_REG_KEYS = 16           # keys per thread kept in registers
_MAX_SMEM_KEYS = 49152       # keys kept in shared memory (192 KB)
_RADIX_BITS = 8


@dataclass(frozen=True)
class SelectionConfig:
    """Launch shape of select_blocks (see resa_tl.heuristics.selection_config).

    ``hist`` picks how the radix histogram is built (all give the same result):
    "match": warp-aggregated atomics (__match_any_sync) in every pass; "hybrid": aggregated in
    the first pass (the top bits: few distinct digits, heavy same-address contention), plain
    shared atomics in the others (mostly distinct digits); "priv": plain atomics into 8
    lane-private histogram copies (interleaved [bin][copy], summed when the bucket is found).
    """
    score_threads: int = 256
    score_rows_per_cta: int = 16
    select_threads: int = 1024
    hist: str = "hybrid"


def _orderable_key(T, s):
    """fp32 -> uint32 with the same order (negatives flipped); -0.0 and +0.0 map together."""
    bits = T.reinterpret(s, "uint32")
    return T.if_then_else(s < T.float32(0), ~bits,
                          T.if_then_else(s == T.float32(0), T.uint32(0x80000000),
                                         bits | T.uint32(0x80000000)))


@dataclass(frozen=True)
class SelectShape:
    """The compile-time problem of select_blocks: NB (kmin's block dim, fixed per cache), Hkv,
    g, D, the selection hyper-parameters, the output width K = max_selected and the dtypes.
    The batch and the row lengths are run-time values. ``refresh``: the program takes the K
    cache as a 7th argument and the select kernel also rewrites each row's newest block's
    kmin/kmax (needs local_blocks >= 1). ``sink_blocks``: blocks 0 .. sink_blocks - 1 are
    forced like the local ones (0 emits no test, so the program is the one without sinks).
    ``summary_dtype``: dtype of kmin/kmax, None = ``dtype``; an fp8 one (see
    block_summaries.FP8_SUMMARY_DTYPES) is read 16 elements per 16-byte load and its
    "unbounded" sentinel decoded."""
    num_blocks: int
    heads_kv: int
    group: int
    head_dim: int
    block_size: int
    sparse_ratio: float
    min_blocks: int
    local_blocks: int
    max_selected: int
    dtype: str = "bfloat16"
    index_dtype: str = "int32"
    refresh: bool = False
    sink_blocks: int = 0
    summary_dtype: str = None


def check_shape(shape: SelectShape) -> None:
    D = shape.head_dim
    if D % _VEC or (D // _VEC) & (D // _VEC - 1) or D // _VEC > 32:
        raise ValueError(f"head_dim must be one of 8, 16, 32, 64, 128, 256 for the tilelang "
                         f"select_blocks, got {D}")
    if shape.summary_dtype is not None and fp8_name(shape.summary_dtype) and D % 16:
        raise ValueError(f"fp8 summaries need head_dim a multiple of 16 for the tilelang "
                         f"select_blocks, got {D}")
    if shape.refresh and shape.local_blocks < 1:
        raise ValueError("refresh (the newest block's summary rewritten by the select kernel) "
                         f"needs local_blocks >= 1, got {shape.local_blocks}")


def check_config(shape: SelectShape, cfg: "SelectionConfig") -> None:
    c = -(-shape.num_blocks // cfg.select_threads)
    if c > _MAX_REG_KEYS and c * cfg.select_threads > _MAX_SMEM_KEYS:
        raise ValueError(f"kmin has NB={shape.num_blocks} blocks per row; the tilelang "
                         f"select_blocks supports at most {_MAX_SMEM_KEYS} (use a larger "
                         f"block_size)")


def scores_width(shape: SelectShape, cfg: "SelectionConfig") -> int:
    """Row width of the fp32 score workspace [B, Hkv, width]: NB padded to a multiple of the
    select kernel's threads (unmasked vector loads)."""
    return -(-shape.num_blocks // cfg.select_threads) * cfg.select_threads


def program(shape: SelectShape, config: "SelectionConfig", pdl: bool = False):
    """The TileLang PrimFunc of select_blocks (scoring kernel + select kernel) for a static
    shape and launch config. ``pdl``: programmatic dependent launch for both kernels (sm_90+;
    see common.grid_dependency).

    Arguments: q [B, H, D], kmin, kmax [B, NB, Hkv, D] (summary dtype), cache_seqlens [B],
    scores [B, Hkv, scores_width] fp32 (workspace), out [B, Hkv, K] int32, then, with
    ``refresh``, k_cache [B, S, Hkv, D]."""
    check_shape(shape)
    num_blocks, heads_kv, group, head_dim = (shape.num_blocks, shape.heads_kv, shape.group,
                                             shape.head_dim)
    block_size, sparse_ratio, min_blocks = shape.block_size, shape.sparse_ratio, shape.min_blocks
    local_blocks, max_selected, dtype = shape.local_blocks, shape.max_selected, shape.dtype
    index_dtype, refresh, sink_blocks = shape.index_dtype, shape.refresh, shape.sink_blocks
    summary_dtype = shape.summary_dtype
    import tilelang.language as T
    from .common import grid_dependency
    wait = grid_dependency(pdl)

    cfg = config
    NB, HKV, G, D, BS, K = num_blocks, heads_kv, group, head_dim, block_size, max_selected
    H = HKV * G
    NUM, DEN = ratio_numerator(sparse_ratio), RATIO_DENOM
    MINB, LOCAL, SINK = min_blocks, local_blocks, sink_blocks
    scale = float(D) ** -0.5
    f32, dt, it = "float32", dtype, index_dtype
    sdt = summary_dtype or dtype
    fp8 = fp8_name(sdt) is not None
    SV = 16 if fp8 else _VEC             # summary elements per 16-byte load
    if D % SV or (D // SV) & (D // SV - 1):
        raise ValueError(f"head_dim must be a power-of-two multiple of {SV} for {sdt} "
                         f"summaries in the tilelang select_blocks, got {D}")
    # scoring
    TS, RPC = cfg.score_threads, cfg.score_rows_per_cta
    RV = HKV * D // SV                   # 16-byte vectors per block row (all heads)
    DV = D // SV                         # lanes that share one (block, head) dot product
    ITEMS = RPC * RV
    U = -(-ITEMS // TS)
    QE = HKV * D
    QFIXED = TS % RV == 0                # a thread's vector column is the same for every item
    if TS % 32:
        raise ValueError(f"score_threads must be a multiple of 32, got {TS}")
    # select
    TT = cfg.select_threads
    if TT % 32 or TT > 1024:
        raise ValueError(f"select_threads must be a multiple of 32 and <= 1024, got {TT}")
    NW = TT // 32
    # refresh: thread d < D owns column d; its first RPF loads are issued before the radix
    # passes and consumed after them, so their DRAM latency overlaps the selection instead of
    # delaying its first barrier. (With fewer threads than D: loads and use up front.)
    prefetch = refresh and TT >= D
    RPF = min(BS, 16)
    C = -(-NB // TT)
    in_regs = C <= _MAX_REG_KEYS
    if not in_regs and C * TT > _MAX_SMEM_KEYS:
        raise ValueError(f"kmin has NB={NB} blocks; the tilelang select_blocks supports at most "
                         f"{_MAX_SMEM_KEYS} blocks per row")
    RADIX = 1 << _RADIX_BITS
    PASSES = 32 // _RADIX_BITS
    BPL = RADIX // 32                    # histogram bins per lane of the bucket-finding warp
    if cfg.hist not in ("match", "hybrid", "priv"):
        raise ValueError(f"hist must be 'match', 'hybrid' or 'priv', got {cfg.hist!r}")
    COPIES = 8 if cfg.hist == "priv" else 1
    NBP = C * TT                         # score workspace row, padded: unmasked vector loads
    VL = 4 if C % 4 == 0 else 1          # fp32 scores per load in the select kernel
    B = T.dynamic("B")
    FULL = T.uint32(0xFFFFFFFF)

    def forced(j, nvalid):
        """Block j is kept whatever its score: a local block (or a sink block)."""
        if SINK > 0:
            return T.Or(j >= nvalid - LOCAL, j < SINK)
        return j >= nvalid - LOCAL

    @T.macro
    def block_exclusive_scan(src, dst, buf, slot, lane, warp):
        """dst[0] = sum of src[0] over threads < me (thread order); buf: shared [2, 32]."""
        x = T.alloc_var("int32")
        y = T.alloc_var("int32")
        w = T.alloc_var("int32")
        x = src[0]
        for o in T.unroll(5):
            y = T.shfl_up(x, 1 << o)
            if lane >= (1 << o):
                x = x + y
        if lane == 31:
            buf[slot, warp] = x
        T.sync_threads()
        if warp == 0:
            w = 0
            if lane < NW:
                w = buf[slot, lane]
            for o in T.unroll(5):
                y = T.shfl_up(w, 1 << o)
                if lane >= (1 << o):
                    w = w + y
            if lane < NW:
                buf[slot, lane] = w
        T.sync_threads()
        dst[0] = x - src[0]
        if warp > 0:
            dst[0] = dst[0] + buf[slot, warp - 1]

    @T.macro
    def body(Q, Kmin, Kmax, Lens, Scores, Out, Kc):
        # ---- 1. scoring -------------------------------------------------------------------
        with T.Kernel(T.ceildiv(NB, RPC), B, threads=TS) as (bx, b):
            wait()
            tx = T.get_thread_binding()
            lo = T.alloc_local((U, SV), sdt)
            hi = T.alloc_local((U, SV), sdt)
            qm_s = T.alloc_shared((QE,), f32)
            qv = T.alloc_local((SV,), f32)
            if fp8:                              # converted pairwise (cvt of 2 fp8 at once)
                lof = T.alloc_local((U, SV), f32)
                hif = T.alloc_local((U, SV), f32)
            nvalid = T.alloc_var("int32")
            acc = T.alloc_var(f32)
            nvalid = T.Cast("int32", (T.Cast("int64", Lens[b]) + (BS - 1)) // BS)
            if bx * RPC < nvalid:
                for u in T.unroll(U):
                    item = tx + u * TS
                    row = bx * RPC + item // RV
                    e0 = (item % RV) * SV
                    if item < ITEMS and row < nvalid:
                        for v in T.vectorized(SV):
                            lo[u, v] = Kmin[b, row, e0 // D, e0 % D + v]
                        for v in T.vectorized(SV):
                            hi[u, v] = Kmax[b, row, e0 // D, e0 % D + v]
                    else:
                        for v in T.vectorized(SV):
                            lo[u, v] = T.Cast(sdt, 0)
                        for v in T.vectorized(SV):
                            hi[u, v] = T.Cast(sdt, 0)
                for i in T.serial(-(-QE // TS)):
                    e = tx + i * TS
                    if e < QE:
                        acc = T.float32(0)
                        for gg in T.serial(G):
                            acc = acc + T.Cast(f32, Q[b, (e // D) * G + gg, e % D])
                        qm_s[e] = acc / T.float32(G) * T.float32(scale)
                T.sync_threads()
                if QFIXED:                       # every item of this thread has the same lanes
                    for v in T.vectorized(SV):
                        qv[v] = qm_s[(tx % RV) * SV + v]
                if fp8:
                    for u in T.unroll(U):
                        for v in T.vectorized(SV):
                            lof[u, v] = T.Cast(f32, lo[u, v])
                        for v in T.vectorized(SV):
                            hif[u, v] = T.Cast(f32, hi[u, v])
                for u in T.unroll(U):
                    item = tx + u * TS
                    row = bx * RPC + item // RV
                    e0 = (item % RV) * SV
                    if not QFIXED:
                        for v in T.vectorized(SV):
                            qv[v] = qm_s[e0 + v]
                    acc = T.float32(0)
                    for v in T.unroll(SV):
                        if fp8:
                            acc = acc + T.max(
                                qv[v] * summary_value_tl(T, lof[u, v], sdt, False),
                                qv[v] * summary_value_tl(T, hif[u, v], sdt, True))
                        else:
                            acc = acc + T.max(qv[v] * T.Cast(f32, lo[u, v]),
                                              qv[v] * T.Cast(f32, hi[u, v]))
                    for o in T.unroll(DV.bit_length() - 1):
                        acc = acc + T.shfl_xor(acc, DV >> (o + 1))
                    if item < ITEMS and row < nvalid and item % DV == 0:
                        Scores[b, e0 // D, row] = acc

        # ---- 2. radix select + ordered compaction -------------------------------------------
        with T.Kernel(HKV, B, threads=TT) as (h, b):
            wait()
            tx = T.get_thread_binding()
            lane = tx % 32
            warp = tx // 32
            lanes_below = (T.uint32(1) << T.Cast("uint32", lane)) - T.uint32(1)
            if in_regs:
                keys = T.alloc_local((C,), "uint32")
            else:
                keys = T.alloc_shared((C * TT,), "uint32")
            hist = T.alloc_shared((RADIX * COPIES,), "int32")
            scv = T.alloc_local((C if in_regs else 1,), f32)
            bcast = T.alloc_shared((4,), "int32")
            sbuf = T.alloc_shared((2, 32), "int32")
            binv = T.alloc_local((BPL,), "int32")
            s_in = T.alloc_local((1,), "int32")
            s_out = T.alloc_local((1,), "int32")
            nv64 = T.alloc_var("int64")
            nvalid = T.alloc_var("int32")
            n = T.alloc_var("int32")
            kk = T.alloc_var("int32")
            prefix = T.alloc_var("uint32")
            mask = T.alloc_var("uint32")
            done = T.alloc_var("int32")
            d = T.alloc_var("uint32")
            peers = T.alloc_var("uint32")
            tot = T.alloc_var("int32")
            suf = T.alloc_var("int32")
            y = T.alloc_var("int32")
            run = T.alloc_var("int32")
            gt = T.alloc_var("int32")
            eq = T.alloc_var("int32")
            pos = T.alloc_var("int32")
            rank = T.alloc_var("int32")
            sc = T.alloc_var(f32)
            mk = T.alloc_var("uint32")
            if refresh:
                rmin = T.alloc_var(f32)
                rmax = T.alloc_var(f32)
                rx = T.alloc_var(f32)
            if prefetch:
                rk = T.alloc_local((RPF,), dt)

            nv64 = (T.Cast("int64", Lens[b]) + (BS - 1)) // BS
            nvalid = T.Cast("int32", nv64)
            n = T.Cast("int32", T.min(T.max((nv64 * NUM + (DEN - 1)) // DEN,
                                            T.min(nv64, T.int64(MINB))), T.int64(K)))
            if prefetch:                  # issue the newest block's loads now, use them last
                if nvalid > 0 and tx < D:
                    for r in T.unroll(RPF):
                        if (nvalid - 1) * BS + r < T.Cast("int32", Lens[b]):
                            rk[r] = Kc[b, (nvalid - 1) * BS + r, h, tx]
            if refresh and not prefetch:  # newest block's summary from the cache (see above)
                if nvalid > 0:
                    for i in T.serial(-(-D // TT)):
                        col = tx + i * TT
                        if col < D:
                            rmin = T.infinity(f32)
                            rmax = -T.infinity(f32)
                            for r in T.unroll(BS):
                                if (nvalid - 1) * BS + r < T.Cast("int32", Lens[b]):
                                    rx = T.Cast(f32, Kc[b, (nvalid - 1) * BS + r, h, col])
                                    rmin = T.min(rmin, rx)
                                    rmax = T.max(rmax, rx)
                            if fp8:
                                rmin = round_outward_tl(T, rmin, sdt, False)
                                rmax = round_outward_tl(T, rmax, sdt, True)
                            Kmin[b, nvalid - 1, h, col] = T.Cast(sdt, rmin)
                            Kmax[b, nvalid - 1, h, col] = T.Cast(sdt, rmax)
            j0 = tx * C
            if in_regs:
                for c0 in T.unroll(C // VL):              # in bounds: the row is padded to C*TT
                    for v in T.vectorized(VL):
                        scv[c0 * VL + v] = Scores[b, h, j0 + c0 * VL + v]
            for c in T.unroll(C):
                kidx = c if in_regs else c * TT + tx
                keys[kidx] = T.uint32(0)
                if j0 + c < nvalid:
                    if forced(j0 + c, nvalid):
                        keys[kidx] = FULL
                    else:
                        if in_regs:
                            sc = scv[c]
                        else:
                            sc = Scores[b, h, j0 + c]
                        keys[kidx] = _orderable_key(T, sc)
            kk = n
            prefix = T.uint32(0)
            mask = T.uint32(0)
            done = T.if_then_else(n == 0, 1, 0)
            for p in T.serial(PASSES):
                if done == 0:
                    for i in T.serial(-(-(RADIX * COPIES) // TT)):
                        if tx + i * TT < RADIX * COPIES:
                            hist[tx + i * TT] = 0
                    T.sync_threads()
                    shift = T.Cast("uint32", (PASSES - 1 - p) * _RADIX_BITS)
                    for c in T.unroll(C):
                        kidx = c if in_regs else c * TT + tx
                        d = T.uint32(RADIX)
                        if j0 + c < nvalid and (keys[kidx] & mask) == prefix:
                            d = (keys[kidx] >> shift) & T.uint32(RADIX - 1)
                        if cfg.hist == "priv":
                            if d < T.uint32(RADIX):
                                T.atomic_add(hist[T.Cast("int32", d) * COPIES + lane % COPIES], 1)
                        elif cfg.hist == "match":
                            peers = T.match_any_sync(d)          # lanes holding the same digit
                            if d < T.uint32(RADIX) and (peers & lanes_below) == T.uint32(0):
                                T.atomic_add(hist[d], T.Cast("int32", T.popcount(peers)))
                        else:
                            if p == 0:
                                peers = T.match_any_sync(d)          # lanes holding the same digit
                                if d < T.uint32(RADIX) and (peers & lanes_below) == T.uint32(0):
                                    T.atomic_add(hist[d], T.Cast("int32", T.popcount(peers)))
                            else:
                                if d < T.uint32(RADIX):
                                    T.atomic_add(hist[d], 1)
                    T.sync_threads()
                    if warp == 0:
                        tot = 0
                        for i in T.unroll(BPL):
                            binv[i] = 0
                            for cp in T.unroll(COPIES):
                                binv[i] = binv[i] + hist[(lane * BPL + i) * COPIES + cp]
                            tot = tot + binv[i]
                        suf = tot
                        for o in T.unroll(5):
                            y = T.shfl_down(suf, 1 << o)
                            if lane + (1 << o) < 32:
                                suf = suf + y
                        run = suf - tot                       # keys in the bins above mine
                        for i in T.unroll(BPL):
                            if run < kk and kk <= run + binv[BPL - 1 - i]:
                                bcast[0] = lane * BPL + BPL - 1 - i
                                bcast[1] = kk - run
                                bcast[2] = binv[BPL - 1 - i]
                            run = run + binv[BPL - 1 - i]
                    T.sync_threads()
                    prefix = prefix | (T.Cast("uint32", bcast[0]) << shift)
                    mask = mask | (T.uint32(RADIX - 1) << shift)
                    kk = bcast[1]
                    if bcast[2] == kk:
                        done = 1                              # threshold bucket kept whole
            # ordered compaction
            gt = 0
            eq = 0
            for c in T.unroll(C):
                kidx = c if in_regs else c * TT + tx
                mk = keys[kidx] & mask
                if j0 + c < nvalid:
                    if mk > prefix:
                        gt = gt + 1
                    if mk == prefix:
                        eq = eq + 1
            s_in[0] = eq
            block_exclusive_scan(s_in, s_out, sbuf, 0, lane, warp)
            rank = s_out[0]                                   # keys == T in blocks before mine
            s_in[0] = gt + T.max(T.min(kk - rank, eq), 0)
            block_exclusive_scan(s_in, s_out, sbuf, 1, lane, warp)
            pos = s_out[0]
            for c in T.unroll(C):
                kidx = c if in_regs else c * TT + tx
                mk = keys[kidx] & mask
                if j0 + c < nvalid:
                    if mk > prefix:
                        Out[b, h, pos] = j0 + c
                        pos = pos + 1
                    if mk == prefix:
                        if rank < kk:
                            Out[b, h, pos] = j0 + c
                            pos = pos + 1
                        rank = rank + 1
            for i in T.serial(-(-K // TT)):
                if tx + i * TT >= n and tx + i * TT < K:
                    Out[b, h, tx + i * TT] = -1
            if prefetch:                  # the refresh, its first RPF rows loaded at the start
                if nvalid > 0 and tx < D:
                    rmin = T.infinity(f32)
                    rmax = -T.infinity(f32)
                    for r in T.unroll(RPF):
                        if (nvalid - 1) * BS + r < T.Cast("int32", Lens[b]):
                            rmin = T.min(rmin, T.Cast(f32, rk[r]))
                            rmax = T.max(rmax, T.Cast(f32, rk[r]))
                    if BS > RPF:
                        for r in T.unroll(BS - RPF):
                            if (nvalid - 1) * BS + RPF + r < T.Cast("int32", Lens[b]):
                                rx = T.Cast(f32, Kc[b, (nvalid - 1) * BS + RPF + r, h, tx])
                                rmin = T.min(rmin, rx)
                                rmax = T.max(rmax, rx)
                    if fp8:
                        rmin = round_outward_tl(T, rmin, sdt, False)
                        rmax = round_outward_tl(T, rmax, sdt, True)
                    Kmin[b, nvalid - 1, h, tx] = T.Cast(sdt, rmin)
                    Kmax[b, nvalid - 1, h, tx] = T.Cast(sdt, rmax)

    # Two signatures rather than one with an unused K argument: the plain kernel's TIR, and so
    # its compile-cache key, stays what it was before the refresh existed.
    if refresh:
        S = T.dynamic("S")

        @T.prim_func
        def select_blocks_refresh_kernel(
                Q: T.Tensor((B, H, D), dt),
                Kmin: T.Tensor((B, NB, HKV, D), sdt),
                Kmax: T.Tensor((B, NB, HKV, D), sdt),
                Lens: T.Tensor((B,), it),
                Scores: T.Tensor((B, HKV, NBP), f32),
                Out: T.Tensor((B, HKV, K), "int32"),
                Kc: T.Tensor((B, S, HKV, D), dt)):
            body(Q, Kmin, Kmax, Lens, Scores, Out, Kc)
        return select_blocks_refresh_kernel

    @T.prim_func
    def select_blocks_kernel(
            Q: T.Tensor((B, H, D), dt),
            Kmin: T.Tensor((B, NB, HKV, D), sdt),
            Kmax: T.Tensor((B, NB, HKV, D), sdt),
            Lens: T.Tensor((B,), it),
            Scores: T.Tensor((B, HKV, NBP), f32),
            Out: T.Tensor((B, HKV, K), "int32")):
        body(Q, Kmin, Kmax, Lens, Scores, Out, None)
    return select_blocks_kernel


@functools.lru_cache(maxsize=None)
def compile_kernel(shape: SelectShape, config: SelectionConfig, arch: str, pdl: bool):
    """Compiled kernel, memoised per static configuration (and in TileLang's disk cache).
    Barriers are placed by hand (the select kernel's are inside uniform branches), so
    TileLang's automatic ones are off."""
    check_config(shape, config)
    return compile_program(program(shape, config, pdl), arch, fast_math=False,
                           auto_sync=False)


def launch(kernel, q, kmin, kmax, cache_seqlens, scores, out, k_cache=None):
    """One call: tensors as :func:`program` lists them, contiguous and 16-byte aligned;
    ``k_cache`` exactly when the kernel was built with ``refresh``."""
    if k_cache is None:
        kernel(q, kmin, kmax, cache_seqlens, scores, out)
    else:
        kernel(q, kmin, kmax, cache_seqlens, scores, out, k_cache)
    return out
