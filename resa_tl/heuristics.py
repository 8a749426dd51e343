"""Launch heuristics, in one place, each with its reason. Device properties are read from the
device (never hard-coded): SM count and L2 size differ between H100 SXM/PCIe, H200, A100, ...

Kernel modules add their own heuristic functions here (one per decision, with the reason)."""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def device_props(device_index: int | None = None):
    """(sm_count, l2_bytes, (major, minor)) of a CUDA device, cached: the query is not free and
    the answer never changes within a process."""
    idx = torch.cuda.current_device() if device_index is None else device_index
    p = torch.cuda.get_device_properties(idx)
    return p.multi_processor_count, int(getattr(p, "L2_cache_size", 0)), (p.major, p.minor)


def sm_count(device: torch.device | None = None) -> int:
    index = None if device is None or device.index is None else device.index
    return device_props(index)[0]


def arch_of(device: torch.device | None = None) -> str:
    """TileLang target arch of a CUDA device: "sm_90a" on Hopper (wgmma/TMA need the "a"
    variant), "sm_80"/"sm_86"/"sm_89" otherwise."""
    index = None if device is None or device.index is None else device.index
    major, minor = device_props(index)[2]
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")
