"""Tensor parallelism (transformers ``tp_plan``): how many attention heads this rank holds.

Under transformers' tensor parallelism (``from_pretrained(..., tp_plan="auto")`` under
``torchrun``) the q/k/v projections are split by output columns and o_proj by input rows, so
each rank computes attention for a contiguous slice of the query heads and the KV heads they
read: rank r holds KV heads [r·Hkv/W, (r+1)·Hkv/W) and their query heads. ReSA selects per KV
head, so a rank's cache, selection, sparse steps and rectification cover its own heads only,
with no communication beyond what the dense model already does (the all-reduces after o_proj
and the MLP). This module reads the split from the loaded weights, so a hand-written plan is
followed as long as it splits attention that way; anything else is refused with the reason.
"""
from __future__ import annotations

import torch

from .cache_layer import head_dim_of, text_config


def _local_rows(weight) -> int:
    """Output rows of a projection as this rank holds them (a DTensor's local shard)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return local.shape[0]


def _attention_modules(model):
    return [m for m in model.modules()
            if all(hasattr(m, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))]


def local_heads(model) -> tuple[int, int]:
    """(query heads, KV heads) of this rank's attention: the model's own counts without tensor
    parallelism. Raises ValueError where the heads are split in a way ReSA cannot follow."""
    cfg = text_config(model.config)
    H, Hkv, D = cfg.num_attention_heads, cfg.num_key_value_heads, head_dim_of(cfg)
    world = getattr(model, "tp_size", None) or 1
    if world == 1:
        return H, Hkv
    if Hkv % world:
        raise ValueError(f"resa_tl under tensor parallelism needs the KV heads to divide by the "
                         f"world size: num_key_value_heads={Hkv}, tp_size={world}")
    seen = set()
    for m in _attention_modules(model):
        q, k, v = (_local_rows(getattr(m, p).weight) for p in ("q_proj", "k_proj", "v_proj"))
        if q % D or k % D or v % D:
            raise ValueError(f"resa_tl: this rank's attention projections hold {q}, {k}, {v} "
                             f"rows, not whole heads of {D}: the tensor-parallel plan splits "
                             "attention in a way resa_tl cannot follow")
        seen.add((q // D, k // D, v // D))
    expected = (H // world, Hkv // world, Hkv // world)
    if seen != {expected}:
        raise ValueError(f"resa_tl: the tensor-parallel plan leaves this rank (query, key, value) "
                         f"heads {sorted(seen)} per layer; resa_tl follows plans that split q/k/v "
                         f"by output columns and o_proj by input rows, i.e. {expected} of "
                         f"({H}, {Hkv}, {Hkv}) on each of {world} ranks")
    return expected[:2]


def world_info() -> str:
    """"rank r of W" under torch.distributed, for messages; "" otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}"
    return ""
