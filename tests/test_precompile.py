"""CPU: resa_tl.precompile.fake_hopper lets the library compile the sm_90a kernels that its ops
(through resa_tl.plan) would launch, on meta tensors without a GPU (how the benchmarks fill
TileLang's cache for a GPU run), and undoes itself."""
import pytest
import torch

pytest.importorskip("tilelang")

from tilelang.jit.kernel import JITKernel  # noqa: E402

from resa_tl import _checks, heuristics, ops, plan  # noqa: E402
from resa_tl.kernels import block_summaries as bsum  # noqa: E402
from resa_tl.kernels import select_blocks as sel  # noqa: E402
from resa_tl.precompile import fake_hopper  # noqa: E402


def test_fake_hopper_patches_and_restores():
    saved = (heuristics.device_props, ops.resolve_backend, _checks.value_checks_enabled,
             JITKernel.__call__)
    with fake_hopper(sm_count=100, l2_bytes=1 << 20):
        assert heuristics.arch_of(torch.device("cuda")) == "sm_90a"
        assert heuristics.arch_of(torch.device("meta")) == "sm_90a"
        assert heuristics.sm_count(torch.device("meta")) == 100
        assert ops.resolve_backend("auto", torch.device("meta"), torch.bfloat16) == "tilelang"
        assert not _checks.value_checks_enabled(torch.zeros(2))
    assert (heuristics.device_props, ops.resolve_backend, _checks.value_checks_enabled,
            JITKernel.__call__) == saved
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32) == "torch"


def test_fake_hopper_restores_after_an_error():
    saved = heuristics.device_props
    with pytest.raises(RuntimeError, match="boom"):
        with fake_hopper():
            raise RuntimeError("boom")
    assert heuristics.device_props is saved


@pytest.mark.compile
def test_fake_hopper_compiles_what_the_ops_would_launch():
    """The ops compile, for sm_90a, the kernel of the plan they resolve (config from the sm90
    schedule or the heuristic), once per op, and skip the launch."""
    before = (bsum.compile_kernel.cache_info().misses, sel.compile_kernel.cache_info().misses)
    with fake_hopper():
        meta = dict(device="meta", dtype=torch.bfloat16)
        k = torch.empty(2, 520, 2, 64, **meta)
        lens = torch.empty(2, device="meta", dtype=torch.int32)
        kmin, kmax = ops.block_summaries(k, lens, 16)
        assert kmin.shape == (2, 33, 2, 64) and kmin.device.type == "meta"
        q = torch.empty(2, 6, 64, **meta)
        idx = ops.select_blocks(q, kmin, kmax, lens)
        assert idx.shape[:2] == (2, 2) and idx.device.type == "meta"
        # the plans the ops went through (memoised: asking again returns them)
        p_sum = plan.summaries_like(k, lens, 16, torch.bfloat16)
        p_sel = plan.select_blocks_like(q, kmin, lens, block_size=16, sparse_ratio=0.1,
                                        min_blocks=16, local_blocks=1,
                                        max_selected=idx.shape[-1])
    after = (bsum.compile_kernel.cache_info().misses, sel.compile_kernel.cache_info().misses)
    assert after[0] == before[0] + 1 and after[1] == before[1] + 1, "one compile per op"
    pdl = heuristics.use_pdl("sm_90a")
    assert p_sum.kernel is bsum.compile_kernel(p_sum.shape, p_sum.config, "sm_90a", pdl)
    assert p_sel.kernel is sel.compile_kernel(p_sel.shape, p_sel.config, "sm_90a", pdl)
    assert isinstance(p_sum.kernel, JITKernel) and isinstance(p_sel.kernel, JITKernel)
    assert bsum.compile_kernel.cache_info().misses == after[0]       # (memory-cache hits)
