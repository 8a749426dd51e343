"""CPU-only: the rectify_attention TileLang kernels lower and compile (nvcc) for sm_90a and sm_80,
with the instructions we expect, and the wrapper/heuristics reject or size things without a GPU."""
import dataclasses

import pytest
import torch
from source_checks import assert_pdl

from resa_tl import heuristics, plan
from resa_tl.kernels import rectify_attention as ra
from resa_tl.kernels.rectify_attention import RECTIFY_MAX_T, RectifyConfig

pytestmark = pytest.mark.compile

# (arch, T, g, Hkv, D, Dv, dtype, schedule): few but representative — both tile shapes
# (64 rows: decode-like; 128 rows: 2 warpgroups, several row tiles), both dtypes, d 64/128,
# Dv != D, odd g (7, 6), the hand-scheduled sm_90a variant, and the sm_80 cp.async path.
CASES = [
    ("sm_90a", 33, 7, 4, 128, 128, "bfloat16", "auto"),
    ("sm_90a", 1, 4, 2, 64, 64, "float16", None),
    ("sm_90a", 32, 7, 4, 128, 128, "bfloat16", "pingpong"),
    ("sm_80", 17, 6, 2, 64, 64, "float16", None),
    ("sm_80", 2, 8, 2, 128, 64, "bfloat16", None),
]


def _cfg(arch, T, g, D, Dv, schedule):
    cfg = heuristics.rectify_config(T, g, D, arch)
    if schedule is not None:
        cfg = dataclasses.replace(cfg, schedule=schedule)
    return cfg


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_rectify_compiles(case):
    arch, T, g, Hkv, D, Dv, dtype, schedule = case
    cfg = _cfg(arch, T, g, D, Dv, schedule)
    shape = ra.RectifyShape(T, g, Hkv, D, Dv, dtype, D ** -0.5)
    split_k, combine_k = ra.compile_kernel(shape, cfg, arch, heuristics.use_pdl(arch))
    src = split_k.get_kernel_source()
    assert "__global__" in src and "__global__" in combine_k.get_kernel_source()
    assert_pdl(src, arch)
    assert_pdl(combine_k.get_kernel_source(), arch)
    if arch == "sm_90a":
        assert "wgmma" in src and "tma_load" in src, "expected wgmma + TMA on sm_90a"
        assert "warpgroup_reg_alloc" in src, "expected a warp-specialised kernel"
        if schedule == "pingpong":
            assert "__named_barrier_arrive" in src and "wait_wgmma<1>" in src
    else:
        assert "mma_sync" in src or "mma" in src
        assert "cp_async" in src, "expected cp.async pipelining on sm_80"
        assert "wgmma" not in src


def test_config_heuristic():
    # > 64 rows per KV head: two consumer warpgroups; <= 64: one; sm_80: one stage
    c = heuristics.rectify_config(32, 7, 128, "sm_90a")
    assert (c.block_M, c.threads) == (128, 256) and c.num_stages >= 2
    assert c.schedule == "pingpong"                 # measured faster on the H100 at d=128
    assert heuristics.rectify_config(32, 7, 64, "sm_90a").schedule == "auto"
    c = heuristics.rectify_config(8, 8, 128, "sm_90a")
    assert (c.block_M, c.threads, c.schedule) == (64, 128, "auto")
    c = heuristics.rectify_config(33, 7, 128, "sm_80")
    assert c.num_stages == 1 and c.block_N % 16 == 0 and c.schedule == "auto"


def test_split_heuristic_fills_device():
    cfg = heuristics.rectify_config(32, 7, 128, "sm_90a")
    for sms in (132, 114, 78):
        for B in (1, 4, 8):
            ns = heuristics.rectify_num_splits(B, 4, 2, 262144, cfg, num_sms=sms)
            ctas = B * 4 * 2 * ns
            assert ctas <= sms * heuristics.rectify_ctas_per_sm(cfg) or ns == 1
            assert ctas > sms * heuristics.rectify_ctas_per_sm(cfg) // 2
    # short caches: every split keeps >= 2 key blocks
    assert heuristics.rectify_num_splits(1, 4, 2, 512, cfg, num_sms=132) == 2
    # many CTAs already: no split
    assert heuristics.rectify_num_splits(64, 8, 4, 262144, cfg, num_sms=132) == 1


def test_planning_rejects_unsupported_shapes_before_launch():
    # runs on CPU tensors: the checks fire before any device query or launch
    k = torch.zeros(1, 100, 2, 128, dtype=torch.bfloat16)
    q = torch.zeros(1, RECTIFY_MAX_T + 1, 4, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=f"T <= {RECTIFY_MAX_T}"):
        plan.rectify_attention_like(q, k, k, 0.1)
    q = torch.zeros(1, 4, 4, 96, dtype=torch.bfloat16)
    k = torch.zeros(1, 100, 2, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="head_dim"):
        plan.rectify_attention_like(q, k, k, 0.1)
    with pytest.raises(ValueError, match="Hopper"):
        ra.compile_kernel(ra.RectifyShape(32, 7, 4, 128, 128, "bfloat16", 0.1),
                          RectifyConfig(schedule="pingpong"), "sm_80", False)


def test_config_validation():
    with pytest.raises(ValueError):
        RectifyConfig(block_M=96)
    with pytest.raises(ValueError):
        RectifyConfig(block_N=72)
    with pytest.raises(ValueError):
        RectifyConfig(block_M=64, block_N=64, threads=128, schedule="pingpong")
