"""Block selection: score every valid block against the group-mean query with the min/max upper
bound, always keep the newest ``local_blocks``, keep the top n overall, emit them sorted."""
from __future__ import annotations

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


def block_scores_reference(q, kmin, kmax, cache_seqlens, block_size: int, local_blocks: int):
    """Scores [B, Hkv, NB] in fp32: -inf past a row's end, +inf for the local blocks."""
    B, H, D = q.shape
    _, NB, Hkv, _ = kmin.shape
    qm = q.float().view(B, Hkv, H // Hkv, D).mean(dim=2) * D ** -0.5      # [B, Hkv, D]
    lo = kmin.float().permute(0, 2, 1, 3)                                # [B, Hkv, NB, D]
    hi = kmax.float().permute(0, 2, 1, 3)
    s = torch.maximum(qm[:, :, None] * lo, qm[:, :, None] * hi).sum(-1)
    nvalid = (cache_seqlens.long() + block_size - 1) // block_size        # [B]
    j = torch.arange(NB, device=q.device)
    valid = j[None] < nvalid[:, None]                                    # [B, NB]
    local = valid & (j[None] >= nvalid[:, None] - local_blocks)
    s = torch.where(valid[:, None], s, float("-inf"))
    return torch.where(local[:, None], float("inf"), s)


def select_blocks_reference(q, kmin, kmax, cache_seqlens, *, block_size, sparse_ratio,
                            min_blocks, local_blocks, max_selected):
    """Torch reference of :func:`resa_tl.ops.select_blocks`."""
    B, NB = kmin.shape[0], kmin.shape[1]
    K = max_selected
    s = block_scores_reference(q, kmin, kmax, cache_seqlens, block_size, local_blocks)
    nvalid = (cache_seqlens.long() + block_size - 1) // block_size
    n = blocks_to_keep(nvalid, sparse_ratio, min_blocks).clamp(max=K)      # [B]
    kk = min(K, NB)
    top = s.topk(kk, dim=-1, sorted=True).indices                         # [B, Hkv, kk]
    keep = torch.arange(kk, device=q.device)[None, None] < n[:, None, None]
    top = torch.where(keep, top, NB).sort(dim=-1).values                  # NB sorts after ids
    top = torch.where(top == NB, -1, top).to(torch.int32)
    if kk < K:
        top = torch.nn.functional.pad(top, (0, K - kk), value=-1)
    return top
