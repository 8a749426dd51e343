"""CPU: examples/_precompile.fake_hopper lets resa_tl.ops compile sm_90a kernels on meta tensors
without a GPU (how the benchmarks fill TileLang's cache for a GPU run), and undoes itself."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
from _precompile import fake_hopper  # noqa: E402

from resa_tl import heuristics, ops  # noqa: E402
from resa_tl.kernels import selection as sel  # noqa: E402
from resa_tl.kernels import summaries as summ  # noqa: E402

pytestmark = pytest.mark.compile


def test_fake_hopper_compiles_what_the_ops_would_launch():
    real_props = heuristics.device_props
    before = (summ.build_summaries_kernel.cache_info().misses,
              sel.build_select_blocks_kernel.cache_info().misses)
    with fake_hopper():
        assert heuristics.arch_of(torch.device("cuda")) == "sm_90a"
        meta = dict(device="meta", dtype=torch.bfloat16)
        k = torch.empty(2, 520, 2, 64, **meta)
        lens = torch.empty(2, device="meta", dtype=torch.int32)
        kmin, kmax = ops.block_summaries(k, lens, 16)
        assert kmin.shape == (2, 33, 2, 64) and kmin.device.type == "meta"
        idx = ops.select_blocks(torch.empty(2, 6, 64, **meta), kmin, kmax, lens)
        assert idx.shape[:2] == (2, 2)
    after = (summ.build_summaries_kernel.cache_info().misses,
             sel.build_select_blocks_kernel.cache_info().misses)
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1, "one compile per op"
    assert heuristics.device_props is real_props
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"
