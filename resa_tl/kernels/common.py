"""TileLang pieces shared by the kernel modules: dtype and target names, programmatic
dependent launch, compilation, and the split-KV machinery of the decode kernels
(sparse_decode, dense_decode; rectify_attention uses the dtype/target/PDL/compile helpers).

Split-KV flash decoding: the keys of each (row, KV head) are cut into ``num_splits`` ranges;
one CTA per (split, KV head, row) runs flash attention over its range for the g query heads
of the KV group (padded to the MMA M granularity, so every K/V tile is read once per group)
and writes an fp32 partial output with its log2-sum-exp. A second kernel of the same
program merges the partials. An empty split writes O = 0 and LSE = -inf (the empty marker:
it gets weight exp2(-inf) = 0), so a row attending to no key at all ends as zeros, not NaN.

Everything that grows with the context (cache length S, index width K, batch B, split count)
is a runtime (T.dynamic) dimension: decoding never recompiles as lengths grow.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634
ACC = "float32"

_TL_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}


def tl_dtype(dtype) -> str:
    """TileLang dtype name of a torch float dtype (a name passes through)."""
    if isinstance(dtype, str):
        return dtype
    try:
        return _TL_DTYPES[dtype]
    except KeyError:
        raise TypeError(f"TileLang kernels take float16/bfloat16, got {dtype}") from None


_INT_DTYPES = {torch.int32: "int32", torch.int64: "int64"}


def int_dtype(dtype: torch.dtype) -> str:
    """"int32" / "int64" of an index or length tensor's dtype."""
    return _INT_DTYPES[dtype]


def target_of(arch: str) -> dict:
    return {"kind": "cuda", "arch": arch}


SUPPORTED_HEAD_DIMS = (64, 128)


def check_head_dims(head_dim: int, head_dim_v: int) -> None:
    for name, d in (("head_dim", head_dim), ("v_cache head_dim", head_dim_v)):
        if d not in SUPPORTED_HEAD_DIMS:
            raise ValueError(f"{name} must be one of {SUPPORTED_HEAD_DIMS} for the TileLang "
                             f"decode kernels, got {d}")


@dataclass(frozen=True)
class DecodeHeads:
    """The head layout the decode kernels' shapes share: H query heads in groups of
    g = H / Hkv per KV head, head dims D (q, k) and Dv (v)."""
    heads: int
    heads_kv: int
    dim: int
    dim_v: int

    @property
    def group(self) -> int:
        return self.heads // self.heads_kv

    def check_heads(self) -> None:
        if self.heads % self.heads_kv:
            raise ValueError(f"heads={self.heads} must be a multiple of "
                             f"heads_kv={self.heads_kv}")
        check_head_dims(self.dim, self.dim_v)


def alloc_stage_barriers(stages: int, consumers: int):
    """mbarriers of a hand-written producer/consumer pipeline with ``stages`` K and V buffers:
    (kready, vready) completed by the producer warp's TMA copies (32 arrivals), (kfree, vfree)
    by the ``consumers`` threads that read the buffer."""
    import tilelang.language as T
    return (T.alloc_barrier([32] * stages), T.alloc_barrier([32] * stages),
            T.alloc_barrier([consumers] * stages), T.alloc_barrier([consumers] * stages))


def producer_handoff(consumers: int):
    """Macro of the hand-written producer/consumer schedules: make the shared-memory stores
    done so far (the Q tile) visible to the async proxy (TMA, wgmma) and to every thread, then
    give the producer warpgroup (threads >= ``consumers``) its small register budget, so that
    the consumers' setmaxnreg can take the rest."""
    import tilelang.language as T

    @T.macro
    def handoff(tx):
        T.fence_proxy_async()
        T.sync_threads()

        if tx >= consumers:
            T.set_max_nreg(24, 0)

    return handoff


def check_decode_tile(cfg, group: int) -> None:
    """The tile rules both split-KV decode configs share (``cfg``: SparseDecodeConfig or
    DenseDecodeConfig): the g query heads of a KV group fit the padded row tile, each warp owns
    16 full rows (threads = 2 * block_H: the flash "P in registers" layout), a pipeline."""
    name = type(cfg).__name__
    if cfg.block_H not in (16, 32, 64) or cfg.threads != 2 * cfg.block_H:
        raise ValueError(f"{name} needs block_H in (16, 32, 64) and threads = 2 * block_H; "
                         f"got block_H={cfg.block_H}, threads={cfg.threads}")
    if group > cfg.block_H:
        raise ValueError(f"q heads per KV head (g={group}) must be <= block_H={cfg.block_H}")
    if cfg.num_stages < 1 or cfg.combine_chunk < 1:
        raise ValueError(f"{name} needs num_stages >= 1 and combine_chunk >= 1, got {cfg}")


def column_chunks(dim: int, dtype: str):
    """(start, width) pieces of a head-dim row of 128 bytes each: a TMA box under the 128-byte
    swizzle of a wgmma operand covers at most 128 bytes of a row, and TileLang only lowers a
    copy into a row-slice of a swizzled shared tile to TMA when it stays inside one such
    piece (a 16-row block of a 64-row tile is otherwise not contiguous in shared memory)."""
    width = 128 // (2 if dtype in ("float16", "bfloat16") else 4)
    width = min(width, dim)
    return tuple((c, width) for c in range(0, dim, width))


# ---------------------------------------------------------------------------------------------
# TileLang macros shared by both kernels. Imported lazily (tilelang import costs seconds).
# ---------------------------------------------------------------------------------------------

def grid_dependency(pdl: bool):
    """Macro opening every kernel body: with ``pdl`` (programmatic dependent launch, sm_90+),
    let the next kernel in the stream launch now (griddepcontrol.launch_dependents), then wait
    until the previous grid has completed and its writes are visible (griddepcontrol.wait).
    The wait comes before the kernel's first global-memory access, so every read-after-write
    and write-after-read across kernels stays ordered, transitively along the chain; what PDL
    overlaps is the next grid's launch and prologue with this grid's tail, the gap that a
    chain of short decode kernels otherwise pays at every boundary. Without ``pdl`` the macro
    emits nothing (and TileLang launches the kernel normally)."""
    import tilelang.language as T

    @T.macro
    def wait():
        if pdl:
            T.pdl_trigger()
            T.pdl_sync()

    return wait


def alloc_flash_state(block_h: int, block_n: int, dim_v: int, dtype: str):
    """The register tiles of one flash-attention consumer, allocated where it is called (inside
    ``T.Kernel``, or a warp-specialised branch of it): the score tile, P, the output
    accumulator and the per-row softmax state (max, previous max, guarded max, rescale, row
    sum, running sum), in that order."""
    import tilelang.language as T
    return (T.alloc_fragment((block_h, block_n), ACC), T.alloc_fragment((block_h, block_n), dtype),
            T.alloc_fragment((block_h, dim_v), ACC),
            *(T.alloc_fragment((block_h,), ACC) for _ in range(6)))


def alloc_flash_tiles(block_h: int, block_n: int, dim: int, dim_v: int, dtype: str):
    """Q, K and V tiles in shared memory, then :func:`alloc_flash_state`'s register tiles."""
    import tilelang.language as T
    return (T.alloc_shared((block_h, dim), dtype), T.alloc_shared((block_n, dim), dtype),
            T.alloc_shared((block_n, dim_v), dtype),
            *alloc_flash_state(block_h, block_n, dim_v, dtype))


def make_softmax_update(block_h: int, block_n: int, dim_v: int, dtype: str,
                        scale: float = None):
    """One online-softmax step over a [block_h, block_n] score tile masked with -inf: scores
    already in log2 units (``scale`` None, the decode kernels), or raw ones that the step scales
    by ``scale`` = softmax_scale * log2(e) inside its exponentials (rectify_attention: one FMA
    per score, the running max kept unscaled). Rows whose running max is still -inf (nothing
    valid yet) are guarded so that no NaN appears (exp2(-inf - -inf))."""
    import tilelang.language as T

    @T.macro
    def update(Sc, P, acc, m, m_prev, m_use, alpha, rsum, lsum):
        T.copy(m, m_prev)
        T.reduce_max(Sc, m, dim=1, clear=False)
        if scale is None:
            for i in T.Parallel(block_h):
                m_use[i] = T.if_then_else(m[i] == -T.infinity(ACC), 0.0, m[i])
                alpha[i] = T.exp2(m_prev[i] - m_use[i])
            for i, j in T.Parallel(block_h, block_n):
                Sc[i, j] = T.exp2(Sc[i, j] - m_use[i])
        else:
            for i in T.Parallel(block_h):
                m_use[i] = T.if_then_else(m[i] == -T.infinity(ACC), 0.0, m[i] * scale)
                alpha[i] = T.exp2(m_prev[i] * scale - m_use[i])
            for i, j in T.Parallel(block_h, block_n):
                Sc[i, j] = T.exp2(Sc[i, j] * scale - m_use[i])
        T.reduce_sum(Sc, rsum, dim=1)
        for i in T.Parallel(block_h):
            lsum[i] = lsum[i] * alpha[i] + rsum[i]
        T.copy(Sc, P)
        for i, d in T.Parallel(block_h, dim_v):
            acc[i, d] *= alpha[i]

    return update


def make_write_partials(block_h: int, group: int, dim_v: int):
    """Epilogue of a split CTA: normalised partial output and its log2-sum-exp, -inf/0 for an
    empty split."""
    import tilelang.language as T

    @T.macro
    def write(acc, m, lsum, O_part, LSE_part, b, hk, sid):
        for i, d in T.Parallel(block_h, dim_v):
            if i < group:
                O_part[b, hk * group + i, sid, d] = T.if_then_else(
                    lsum[i] > 0, acc[i, d] / lsum[i], 0.0)
        for i in T.Parallel(block_h):
            if i < group:
                LSE_part[b, hk * group + i, sid] = T.if_then_else(
                    lsum[i] > 0, T.log2(lsum[i]) + m[i], -T.infinity(ACC))

    return write


def make_combine(heads: int, dim_v: int, dtype: str, chunk: int, pdl: bool = False):
    """Kernel (inside the caller's prim_func) merging the split partials of every (row, head):
    one CTA of dim_v threads per (head, row), ``chunk`` splits per step with independent loads
    and an online rescale, so latency is ceil(num_splits / chunk) round trips. ``pdl``: see
    :func:`grid_dependency`."""
    import tilelang.language as T
    wait = grid_dependency(pdl)

    @T.macro
    def combine(O_part, LSE_part, Out, batch, num_splits):
        with T.Kernel(heads, batch, threads=dim_v) as (h, b):
            wait()
            o = T.alloc_fragment((dim_v,), ACC)
            w = T.alloc_local((chunk,), ACC)
            m = T.alloc_var(ACC)
            cm = T.alloc_var(ACC)
            ms = T.alloc_var(ACC)
            r = T.alloc_var(ACC)
            tot = T.alloc_var(ACC)
            m = -T.infinity(ACC)
            tot = 0.0
            T.clear(o)
            for c in T.serial(T.ceildiv(num_splits, chunk)):
                for s in T.unroll(chunk):
                    w[s] = T.if_then_else(c * chunk + s < num_splits,
                                          LSE_part[b, h, T.min(c * chunk + s, num_splits - 1)],
                                          -T.infinity(ACC))
                cm = m
                for s in T.unroll(chunk):
                    cm = T.max(cm, w[s])
                ms = T.if_then_else(cm == -T.infinity(ACC), 0.0, cm)
                r = T.exp2(m - ms)
                tot = tot * r
                for d in T.Parallel(dim_v):
                    o[d] = o[d] * r
                for s in T.unroll(chunk):
                    w[s] = T.exp2(w[s] - ms)
                    tot = tot + w[s]
                for s in T.unroll(chunk):
                    for d in T.Parallel(dim_v):
                        o[d] += w[s] * O_part[b, h, T.min(c * chunk + s, num_splits - 1), d]
                m = cm
            for d in T.Parallel(dim_v):
                Out[b, h, d] = T.cast(T.if_then_else(tot > 0, o[d] / tot, 0.0), dtype)

    return combine


# ---------------------------------------------------------------------------------------------
# Host side: compilation and argument layout.
# ---------------------------------------------------------------------------------------------

def compile_program(prim_func, arch: str, *, fast_math: bool = True, auto_sync: bool = True):
    """Compile a PrimFunc for ``arch`` (TileLang's memory and disk caches make a repeat cheap).

    ``fast_math``: exp2/log2 as the fast intrinsics (the attention kernels). ``auto_sync``:
    TileLang inserts __syncthreads where shared memory is reused; off for kernels that place
    their own barriers (inside warp-specialised or uniform branches an inserted barrier would
    deadlock). The pass configs are part of TileLang's cache key."""
    import tilelang
    pc = {}
    if fast_math:
        pc[tilelang.PassConfigKey.TL_ENABLE_FAST_MATH] = True
    if not auto_sync:
        pc[tilelang.PassConfigKey.TL_DISABLE_THREAD_STORAGE_SYNC] = True
    return tilelang.compile(prim_func, target=target_of(arch), pass_configs=pc or None)


def aligned16(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if contiguous and 16-byte aligned (kernels that use 16-byte vector loads
    and stores need it), else a contiguous copy."""
    if t.is_contiguous() and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)
