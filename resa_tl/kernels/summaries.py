"""Per-block key summaries: element-wise min and max of the valid keys of each block.

ReSA bounds q·k over a block by sum_d max(q_d*kmin_d, q_d*kmax_d), so selection reads only these
two tensors (2/block_size of K) instead of the keys themselves.
"""
from __future__ import annotations

import torch


def block_summaries_reference(k_cache: torch.Tensor, cache_seqlens: torch.Tensor, block_size: int):
    """Torch reference of :func:`resa_tl.ops.block_summaries`.

    Blocks with no valid key are zero in both outputs.
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
    return torch.where(any_valid, kmin, zero), torch.where(any_valid, kmax, zero)


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
    kmin[rows[:, None], blk] = torch.where(valid, keys, inf).amin(dim=2)
    kmax[rows[:, None], blk] = torch.where(valid, keys, -inf).amax(dim=2)
    return kmin, kmax
