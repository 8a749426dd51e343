"""Argument checks at the API boundary: a clear error naming the parameter, never a crash inside
a kernel. Shape, dtype and device checks read only metadata. Value checks (lengths within the
cache) need the values: they run for CPU tensors, and for CUDA tensors only when
``RESA_TL_CHECK_VALUES=1`` (they synchronise the host, so they stay off the decode hot path)."""
from __future__ import annotations

import os

import torch

from .kernels.block_summaries import FP8_SUMMARY_DTYPES

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUMMARY_DTYPES = FLOAT_DTYPES + FP8_SUMMARY_DTYPES       # kmin/kmax: the keys' dtype or fp8
INDEX_DTYPES = (torch.int32, torch.int64)


def value_checks_enabled(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return True
    if torch.cuda.is_current_stream_capturing():
        return False
    return os.environ.get("RESA_TL_CHECK_VALUES", "0") == "1"


def tensor(name: str, t, ndim: int, dtypes=FLOAT_DTYPES, shape_doc: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims {shape_doc}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")
    return t


def same_device(**tensors) -> torch.device:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devs = {name: t.device for name, t in tensors.items()}
    first = next(iter(devs.values()))
    if any(d != first for d in devs.values()):
        listing = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on one device; got {listing}")
    return first


def same_dtype(**tensors) -> None:
    dts = {name: t.dtype for name, t in tensors.items()}
    if len(set(dts.values())) > 1:
        listing = ", ".join(f"{n}: {str(d).replace('torch.', '')}" for n, d in dts.items())
        raise TypeError(f"q and the caches must share one dtype; got {listing}")


def kv_caches(k_cache, v_cache, batch: int, num_heads: int, head_dim: int):
    """Checks the NHD caches against q's batch / heads / head_dim; returns (S_max, Hkv, Dv)."""
    tensor("k_cache", k_cache, 4, shape_doc="[B, S_max, Hkv, D]")
    tensor("v_cache", v_cache, 4, shape_doc="[B, S_max, Hkv, Dv]")
    B, S, Hkv, D = k_cache.shape
    if B != batch:
        raise ValueError(f"k_cache batch {B} != q batch {batch}")
    if D != head_dim:
        raise ValueError(f"k_cache head_dim {D} != q head_dim {head_dim}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} does not match k_cache "
                         f"{tuple(k_cache.shape)} in [B, S_max, Hkv]")
    if S < 1 or Hkv < 1:
        raise ValueError(f"k_cache must have S_max >= 1 and Hkv >= 1, got {tuple(k_cache.shape)}")
    if num_heads % Hkv:
        hint = ""
        if num_heads % S == 0:
            hint = (f"; caches are NHD [B, S_max, Hkv, D]: an HND cache [B, Hkv, S, D] "
                    f"(shape {tuple(k_cache.shape)} looks like one) must be passed as "
                    f"cache.transpose(1, 2).contiguous()")
        raise ValueError(f"query heads H={num_heads} must be a multiple of KV heads Hkv={Hkv} "
                         f"(dim 2 of k_cache){hint}")
    return S, Hkv, v_cache.shape[3]


def seqlens(cache_seqlens, batch: int, capacity: int, min_len: int = 0) -> torch.Tensor:
    tensor("cache_seqlens", cache_seqlens, 1, INDEX_DTYPES, "[B]")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens has {cache_seqlens.shape[0]} rows, batch is {batch}")
    if value_checks_enabled(cache_seqlens):
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < min_len or hi > capacity:
            why = (f"; each row must hold at least the T={min_len} queried positions, which "
                   f"are its last T" if min_len > 0 else "")
            raise ValueError(f"cache_seqlens must lie in [{min_len}, {capacity}] (cache capacity "
                             f"S_max={capacity}{why}); got values in [{lo}, {hi}]")
    return cache_seqlens


def block_size(bs) -> int:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 16 or bs > 128 or bs & (bs - 1):
        raise ValueError(f"block_size must be a power of two in [16, 128], got {bs!r}")
    return bs


def summary_dtype(dtype, base: torch.dtype, name: str = "summary_dtype") -> torch.dtype:
    """The dtype summaries are stored in: None -> ``base`` (that of the keys), else ``base`` or
    an fp8 type (rounded outward, see resa_tl.kernels.block_summaries)."""
    if dtype is None:
        return base
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if dtype.startswith("float") else None
    allowed = (base, *FP8_SUMMARY_DTYPES)
    if dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{name} must be None or one of {names} (keys are "
                        f"{str(base).replace('torch.', '')}), got {dtype!r}")
    return dtype


def summaries(kmin, kmax, batch: int, num_blocks: int, num_kv_heads: int, head_dim: int,
              key_dtype: torch.dtype | None = None):
    """Shape checks; with ``key_dtype``: kmin and kmax share one dtype, that of the keys
    (q / k_cache) or an fp8 one."""
    tensor("kmin", kmin, 4, SUMMARY_DTYPES, "[B, NB, Hkv, D]")
    tensor("kmax", kmax, 4, SUMMARY_DTYPES, "[B, NB, Hkv, D]")
    if key_dtype is not None:
        if kmin.dtype != kmax.dtype:
            raise TypeError(f"kmin and kmax must share one dtype; got "
                            f"{str(kmin.dtype).replace('torch.', '')} and "
                            f"{str(kmax.dtype).replace('torch.', '')}")
        summary_dtype(kmin.dtype, key_dtype, "kmin/kmax dtype")
    want = (batch, num_blocks, num_kv_heads, head_dim)
    for name, t in (("kmin", kmin), ("kmax", kmax)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape [B, NB, Hkv, D] = {list(want)}, "
                             f"got {list(t.shape)}")


def softmax_scale(scale, head_dim: int) -> float:
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"softmax_scale must be a positive float or None, got {scale!r}")
    return float(scale)
