"""Per-block key summaries: element-wise min and max of the valid keys of each block.

ReSA bounds q·k over a block by sum_d max(q_d*kmin_d, q_d*kmax_d), so selection reads only these
two tensors (2/block_size of K) instead of the keys themselves.
"""
# (no `from __future__ import annotations`: TileLang evaluates the prim_func annotations)

import torch


# ---------------------------------------------------------------------------------------------
# fp8 summaries (opt-in: ReSAConfig.summary_dtype). Selection reads kmin+kmax, 2/block_size of
# K, every step; in fp8 they are half that. The bound must stay a bound, so kmin is rounded
# toward -inf and kmax toward +inf on the fp8 grid (never to nearest). Values past the largest
# finite fp8 number cannot be rounded outward, so that number itself means "unbounded": a kmin
# of -max / a kmax of +max decodes to -/+SUMMARY_UNBOUNDED (finite, so 0 * it stays 0; scores
# of such blocks are huge and the block is kept). fp16/bf16 summaries are exact min/max.
# ---------------------------------------------------------------------------------------------
FP8_SUMMARY_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# name -> (mantissa bits, smallest normal, subnormal spacing, largest finite)
FP8_FORMATS = {"float8_e4m3fn": (3, 2.0 ** -6, 2.0 ** -9, 448.0),
               "float8_e5m2": (2, 2.0 ** -14, 2.0 ** -16, 57344.0)}
SUMMARY_UNBOUNDED = 2.0 ** 64


def fp8_name(dtype) -> str | None:
    """"float8_e4m3fn" / "float8_e5m2" for an fp8 summary dtype (torch dtype or name), else None."""
    name = str(dtype).replace("torch.", "")
    return name if name in FP8_FORMATS else None


def round_outward_reference(x: torch.Tensor, dtype, up: bool) -> torch.Tensor:
    """fp32 ``x`` rounded to the fp8 grid of ``dtype`` toward +inf (``up``) or -inf, clamped to
    the finite range (the clamp at the far end is the "unbounded" sentinel). Exact: the result
    is an fp8 value, so the cast that follows does not round again."""
    m, smallest, sub, fmax = FP8_FORMATS[fp8_name(dtype)]
    x = x.float()
    drop = 23 - m
    bits = x.view(torch.int32)
    kept = bits & ~((1 << drop) - 1)                       # the fp32 bits fp8 can hold
    trunc = kept.view(torch.float32)                       # rounded toward zero
    away = (kept + (1 << drop)).view(torch.float32)        # one fp8 step away from zero
    exact = (bits & ((1 << drop) - 1)) == 0
    if up:
        normal = torch.where(x > 0, torch.where(exact, x, away), trunc)
        tiny = torch.ceil(x / sub) * sub
    else:
        normal = torch.where(x < 0, torch.where(exact, x, away), trunc)
        tiny = torch.floor(x / sub) * sub
    y = torch.where(x.abs() < smallest, tiny, normal).clamp(-fmax, fmax)
    return y.to(dtype)


def encode_summaries_reference(kmin: torch.Tensor, kmax: torch.Tensor, dtype):
    """Exact per-block min/max (any float dtype) -> summaries stored in ``dtype``: fp8 rounded
    outward (see above), other dtypes cast."""
    if fp8_name(dtype) is None:
        return kmin.to(dtype), kmax.to(dtype)
    return round_outward_reference(kmin, dtype, False), round_outward_reference(kmax, dtype, True)


def summary_values(kmin: torch.Tensor, kmax: torch.Tensor):
    """Stored summaries -> fp32 bounds; for fp8, the sentinel -max / +max becomes
    -/+SUMMARY_UNBOUNDED (what the scoring kernel does)."""
    lo, hi = kmin.float(), kmax.float()
    name = fp8_name(kmin.dtype)
    if name is not None:
        fmax = FP8_FORMATS[name][3]
        lo = torch.where(lo <= -fmax, -SUMMARY_UNBOUNDED, lo)
        hi = torch.where(hi >= fmax, SUMMARY_UNBOUNDED, hi)
    return lo, hi


def round_outward_tl(T, x, sdt: str, up: bool):
    """TileLang expression of :func:`round_outward_reference` (fp32 in, fp32 out; the cast to
    ``sdt`` that follows is then exact). ``x`` must be a variable (it is reinterpreted)."""
    m, smallest, sub, fmax = FP8_FORMATS[sdt]
    drop = 23 - m
    low = (1 << drop) - 1
    bits = T.reinterpret(x, "uint32")
    kept = bits & T.uint32(0xFFFFFFFF ^ low)
    trunc = T.reinterpret(kept, "float32")
    away = T.reinterpret(kept + T.uint32(1 << drop), "float32")
    exact = (bits & T.uint32(low)) == T.uint32(0)
    if up:
        normal = T.if_then_else(x > T.float32(0), T.if_then_else(exact, x, away), trunc)
        tiny = T.ceil(x * T.float32(1.0 / sub)) * T.float32(sub)
    else:
        normal = T.if_then_else(x < T.float32(0), T.if_then_else(exact, x, away), trunc)
        tiny = T.floor(x * T.float32(1.0 / sub)) * T.float32(sub)
    y = T.if_then_else(T.abs(x) < T.float32(smallest), tiny, normal)
    return T.max(T.min(y, T.float32(fmax)), T.float32(-fmax))


def saturation_count(kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Elements stored as the "unbounded" sentinel (a 0-dim int64 tensor, no host sync; 0 for
    fp16/bf16 summaries). Such a channel adds ~2^64 * |q_d| to every block it saturates, which
    hides the rest of the score, so those blocks tie: selection by the bound stops telling them
    apart. e4m3 saturates at |k| > 448, e5m2 only past 57,344."""
    name = fp8_name(kmin.dtype)
    if name is None:
        return torch.zeros((), dtype=torch.int64, device=kmin.device)
    fmax = FP8_FORMATS[name][3]
    return (kmin.float() <= -fmax).sum() + (kmax.float() >= fmax).sum()


def warn_if_saturated(kmin: torch.Tensor, kmax: torch.Tensor, where: str) -> None:
    """Warn (once per call site) when fp8 summaries hold the "unbounded" sentinel. Reads a count
    back to the host: for prefill and other eager paths, never the decode step."""
    n = int(saturation_count(kmin, kmax))
    if n:
        import warnings
        warnings.warn(f"resa_tl: {where}: {n} key summary element(s) exceed the range of "
                      f"{fp8_name(kmin.dtype)} and are stored as 'unbounded'; blocks that share "
                      f"such a channel score alike and selection cannot rank them. Use "
                      f"summary_dtype='float8_e5m2' (range 57,344) or None (exact) for these "
                      f"keys.", RuntimeWarning, stacklevel=3)


def summary_value_tl(T, v, sdt: str, is_max: bool):
    """TileLang: a summary element of dtype ``sdt`` (or already converted to fp32) -> fp32
    bound, the fp8 sentinel decoded."""
    f = T.Cast("float32", v)
    if fp8_name(sdt) is None:
        return f
    fmax = FP8_FORMATS[sdt][3]
    if is_max:
        return T.if_then_else(f >= T.float32(fmax), T.float32(SUMMARY_UNBOUNDED), f)
    return T.if_then_else(f <= T.float32(-fmax), T.float32(-SUMMARY_UNBOUNDED), f)


def block_summaries_reference(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int,
                              summary_dtype=None):
    """Torch reference of :func:`resa_tl.ops.block_summaries`.

    Blocks with no valid key are zero in both outputs. ``summary_dtype``: None (that of
    ``k_cache``) or an fp8 dtype (rounded outward, see FP8_SUMMARY_DTYPES).
    """
    B, S, H, D = k_cache.shape
    nb = -(-S // block_size)
    k = k_cache
    if nb * block_size != S:
        k = torch.nn.functional.pad(k, (0, 0, 0, 0, 0, nb * block_size - S))
    k = k.view(B, nb, block_size, H, D)
    pos = torch.arange(nb * block_size, device=k.device).view(1, nb, block_size)
    valid = (pos < cache_seqlens.view(B, 1, 1).to(pos.dtype))[..., None, None]
    inf = torch.tensor(float("inf"), dtype=k.dtype, device=k.device)
    kmin = torch.where(valid, k, inf).amin(dim=2)
    kmax = torch.where(valid, k, -inf).amax(dim=2)
    any_valid = valid.any(dim=2)
    zero = torch.zeros((), dtype=k.dtype, device=k.device)
    return encode_summaries_reference(torch.where(any_valid, kmin, zero),
                                      torch.where(any_valid, kmax, zero),
                                      summary_dtype or k_cache.dtype)


def touched_blocks_bound(length: int, block_size: int) -> int:
    """Most blocks that ``length`` consecutive positions can touch (they may start mid-block)."""
    return 0 if length <= 0 else -(-length // block_size) + 1


def update_block_summaries_reference(kmin, kmax, k_cache, start, length: int, block_size: int):
    """Torch reference of :func:`resa_tl.ops.update_block_summaries` (in place).

    Recomputes every block that positions [start, start + length) of each row touch, over the
    positions of that block below ``start + length`` (the row's new end).
    """
    nt = touched_blocks_bound(length, block_size)
    if nt == 0:
        return kmin, kmax
    B, S, H, D = k_cache.shape
    dev = k_cache.device
    start = start.to(device=dev, dtype=torch.long)
    end = start + length
    last = (end - 1) // block_size                                          # [B]
    blk = torch.minimum(start[:, None] // block_size + torch.arange(nt, device=dev), last[:, None])
    pos = blk[..., None] * block_size + torch.arange(block_size, device=dev)  # [B, nt, bs]
    valid = (pos < end[:, None, None])[..., None, None]
    rows = torch.arange(B, device=dev)
    keys = k_cache[rows[:, None, None], pos.clamp(max=S - 1)]                # [B, nt, bs, H, D]
    inf = torch.tensor(float("inf"), dtype=k_cache.dtype, device=dev)
    # Repeated block ids (rows touching fewer than nt blocks) write identical values.
    lo, hi = encode_summaries_reference(torch.where(valid, keys, inf).amin(dim=2),
                                        torch.where(valid, keys, -inf).amax(dim=2), kmin.dtype)
    kmin[rows[:, None], blk] = lo
    kmax[rows[:, None], blk] = hi
    return kmin, kmax


def refresh_newest_summaries_reference(kmin, kmax, k_cache, cache_seqlens, block_size: int):
    """Recompute, in place, each row's newest block (the one holding position len - 1) over its
    positions below len; rows of length 0 are left alone. That is
    update_block_summaries(start=len - 1, length=1); select_blocks(k_cache=...) does it fused."""
    lens = cache_seqlens.to(device=k_cache.device, dtype=torch.long)
    empty = (lens == 0)[:, None, None]
    first = kmin[:, 0].clone(), kmax[:, 0].clone()   # an empty row's update touches block 0 only
    update_block_summaries_reference(kmin, kmax, k_cache, (lens - 1).clamp(min=0), 1, block_size)
    kmin[:, 0] = torch.where(empty, first[0], kmin[:, 0])
    kmax[:, 0] = torch.where(empty, first[1], kmax[:, 0])
    return kmin, kmax


# ---------------------------------------------------------------------------------------------
# TileLang backend
#
# One program serves both ops. A CTA owns ``blocks_per_cta`` KV blocks of one batch row; its
# threads are laid over (block, 16-byte vector of the Hkv*D row) items, and each thread walks the
# ``block_size`` tokens of its block with 16-byte loads (all independent, so they are in flight
# together), keeping an fp32 running min/max of its 8 elements (exact: fp16/bf16 -> fp32 is
# lossless). The op is a pure streaming read of K (build) or of O(length / bs) blocks (update).
#
# - build  ("summaries"): grid over every block of the cache; a block with no valid key is
#   written as zeros (the contract), so the output needs no prior fill.
# - update: grid over the ceil(length / bs) + 1 block slots that positions [start, start+length)
#   can touch, per row; slot i is block start//bs + i, skipped once past the row's last touched
#   block. ``length`` is a runtime scalar argument: one compiled kernel serves every length.
# Sequence length, S_max, NB and B are symbolic, so nothing recompiles as lengths change.
# ---------------------------------------------------------------------------------------------
import functools  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from .common import compile_program  # noqa: E402

_VEC = 8  # fp16/bf16 elements per 16-byte vector load


@dataclass(frozen=True)
class SummariesConfig:
    """Launch shape of the summaries kernels (see resa_tl.heuristics.summaries_config)."""
    threads: int = 256          # threads per CTA
    blocks_per_cta: int = 4     # KV blocks per CTA (threads are spread over block x vector items)


@dataclass(frozen=True)
class SummariesShape:
    """The compile-time problem of block_summaries (mode "build") and update_block_summaries
    (mode "update"): one kernel per shape and config. Batch, cache capacity, the number of
    blocks, the lengths and (update) the number of new positions are run-time values.
    ``summary_dtype``: dtype of kmin/kmax, None = ``dtype``; an fp8 one is rounded outward."""
    heads_kv: int
    head_dim: int
    block_size: int
    dtype: str = "bfloat16"
    index_dtype: str = "int32"
    mode: str = "build"
    summary_dtype: str = None


def check_shape(shape: SummariesShape) -> None:
    if shape.mode not in ("build", "update"):
        raise ValueError(f"mode must be 'build' or 'update', got {shape.mode!r}")
    if shape.head_dim % _VEC:
        raise ValueError(f"head_dim must be a multiple of {_VEC} for the tilelang backend of "
                         f"the block summaries, got {shape.head_dim}")


def program(shape: SummariesShape, config: SummariesConfig, pdl: bool = False):
    """The TileLang PrimFunc of block_summaries (mode="build") or update_block_summaries
    (mode="update"). Static: Hkv, D, block size, dtypes, config; symbolic: B, S_max, NB.
    ``pdl``: programmatic dependent launch (sm_90+; see common.grid_dependency).

    Arguments: build (K [B, S, Hkv, D], Lens [B], Kmin, Kmax [B, NB, Hkv, D]); update
    (K, Start [B], Kmin, Kmax, length: int32)."""
    check_shape(shape)
    heads_kv, head_dim, block_size = shape.heads_kv, shape.head_dim, shape.block_size
    dtype, index_dtype, mode = shape.dtype, shape.index_dtype, shape.mode
    summary_dtype = shape.summary_dtype
    import tilelang.language as T
    from .common import grid_dependency
    wait = grid_dependency(pdl)

    cfg = config
    HKV, D, BS, TH, BPC = heads_kv, head_dim, block_size, cfg.threads, cfg.blocks_per_cta
    RV = HKV * D // _VEC                     # 16-byte vectors per token row (all KV heads)
    ITEMS = BPC * RV                         # (block, vector) items per CTA
    PER_THREAD = -(-ITEMS // TH)
    UNROLL = min(BS, 16)                     # tokens whose loads are issued together
    dt, it, f32 = dtype, index_dtype, "float32"
    sdt = summary_dtype or dtype
    fp8 = fp8_name(sdt) is not None
    B, S, NB = T.dynamic("B S NB")
    update = mode == "update"

    @T.macro
    def body(K, Idx, Kmin, Kmax, length):
        with T.Kernel(T.ceildiv(T.ceildiv(length, BS) + 1, BPC) if update else T.ceildiv(NB, BPC),
                      B, threads=TH) as (bx, b):
            wait()
            tx = T.get_thread_binding()
            x = T.alloc_local((_VEC,), dt)
            mn = T.alloc_local((_VEC,), f32)
            mx = T.alloc_local((_VEC,), f32)
            end = T.alloc_var("int32")
            first = T.alloc_var("int32")
            last = T.alloc_var("int32")
            if update:
                end = T.Cast("int32", Idx[b]) + length
                first = T.Cast("int32", Idx[b]) // BS
                last = (end - 1) // BS
            else:
                end = T.Cast("int32", Idx[b])
                first = 0
                last = NB - 1
            for i in T.serial(PER_THREAD):
                item = tx + i * TH
                blk = first + bx * BPC + item // RV
                e0 = (item % RV) * _VEC
                h = e0 // D
                d0 = e0 % D
                if item < ITEMS and blk <= last:
                    cnt = end - blk * BS                 # valid tokens of this block (may be <= 0)
                    for v in T.serial(_VEC):
                        mn[v] = T.infinity(f32)
                        mx[v] = -T.infinity(f32)
                    for t0 in T.serial(BS // UNROLL):
                        for t1 in T.unroll(UNROLL):
                            t = t0 * UNROLL + t1
                            if t < cnt:
                                for v in T.vectorized(_VEC):
                                    x[v] = K[b, blk * BS + t, h, d0 + v]
                                for v in T.serial(_VEC):
                                    mn[v] = T.min(mn[v], T.Cast(f32, x[v]))
                                    mx[v] = T.max(mx[v], T.Cast(f32, x[v]))
                    for v in T.serial(_VEC):                 # empty block -> zeros
                        mn[v] = T.if_then_else(cnt > 0, mn[v], T.float32(0))
                        mx[v] = T.if_then_else(cnt > 0, mx[v], T.float32(0))
                    if fp8:                                  # outward: the bound stays a bound
                        for v in T.serial(_VEC):
                            mn[v] = round_outward_tl(T, mn[v], sdt, False)
                            mx[v] = round_outward_tl(T, mx[v], sdt, True)
                    for v in T.vectorized(_VEC):
                        Kmin[b, blk, h, d0 + v] = T.Cast(sdt, mn[v])
                    for v in T.vectorized(_VEC):
                        Kmax[b, blk, h, d0 + v] = T.Cast(sdt, mx[v])

    if update:
        @T.prim_func
        def update_block_summaries_kernel(
                K: T.Tensor((B, S, HKV, D), dt), Start: T.Tensor((B,), it),
                Kmin: T.Tensor((B, NB, HKV, D), sdt), Kmax: T.Tensor((B, NB, HKV, D), sdt),
                length: T.int32):
            body(K, Start, Kmin, Kmax, length)
        return update_block_summaries_kernel

    @T.prim_func
    def block_summaries_kernel(
            K: T.Tensor((B, S, HKV, D), dt), Lens: T.Tensor((B,), it),
            Kmin: T.Tensor((B, NB, HKV, D), sdt), Kmax: T.Tensor((B, NB, HKV, D), sdt)):
        body(K, Lens, Kmin, Kmax, 0)
    return block_summaries_kernel


@functools.lru_cache(maxsize=None)
def compile_kernel(shape: SummariesShape, config: SummariesConfig, arch: str, pdl: bool):
    """Compiled kernel, memoised per static configuration (and in TileLang's disk cache)."""
    return compile_program(program(shape, config, pdl), arch, fast_math=False)


def launch(kernel, k_cache, index, kmin, kmax, length: int = None):
    """One call: k_cache [B, S_max, Hkv, D], index [B] (build: lengths; update: start),
    kmin / kmax [B, NB, Hkv, D] (written), all contiguous and 16-byte aligned; ``length``
    (update only, >= 1) the positions written per row."""
    if length is None:
        kernel(k_cache, index, kmin, kmax)
    else:
        kernel(k_cache, index, kmin, kmax, length)
    return kmin, kmax
