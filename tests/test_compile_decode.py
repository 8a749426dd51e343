"""CPU-only: the sparse_decode / dense_decode TileLang kernels lower and compile (nvcc) for
sm_90a and sm_80 with the instructions we expect (gathered TMA loads under warp
specialisation on sm_90a, cp.async on sm_80), and the wrappers / split heuristic reject or
size things without a GPU."""
import dataclasses

import pytest
import torch
from source_checks import assert_pdl

from resa_tl import heuristics, plan
from resa_tl.kernels import common
from resa_tl.kernels import dense_decode as dd
from resa_tl.kernels import sparse_decode as sd
from resa_tl.kernels.dense_decode import DenseDecodeConfig
from resa_tl.kernels.sparse_decode import SparseDecodeConfig

# (op, arch, g, Hkv, D, dtype, block_size): few but representative — both dtypes, d 64/128,
# g 2/6/7/8, gathers of 4 blocks (16), 2 blocks (32) and 1 block (64) per stage, both sm_90a
# schedules of the sparse kernel ("auto" and "ws"), both archs.
CASES = [
    ("sparse-auto", "sm_90a", 7, 4, 128, "bfloat16", 16),
    ("sparse-ws", "sm_90a", 2, 2, 64, "float16", 64),
    ("sparse", "sm_80", 6, 2, 64, "bfloat16", 32),
    ("dense", "sm_90a", 8, 1, 64, "float16", None),
    ("dense", "sm_80", 7, 4, 128, "bfloat16", None),
]


def _compile(op, arch, g, Hkv, D, dtype, bs):
    if op.startswith("sparse"):
        cfg = heuristics.sparse_decode_config(bs, arch)
        if op in ("sparse-ws", "sparse-auto"):
            cfg = dataclasses.replace(cfg, schedule=op.split("-")[1])
        shape = sd.SparseDecodeShape(g * Hkv, Hkv, D, D, bs, dtype)
        return cfg, sd.compile_kernel(shape, cfg, arch, heuristics.use_pdl(arch))
    cfg = heuristics.dense_decode_config(arch)
    shape = dd.DenseDecodeShape(g * Hkv, Hkv, D, D, dtype)
    return cfg, dd.compile_kernel(shape, cfg, arch, heuristics.use_pdl(arch))


@pytest.mark.compile
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_decode_compiles(case):
    op, arch, g, Hkv, D, dtype, bs = case
    cfg, kern = _compile(op, arch, g, Hkv, D, dtype, bs)
    src = kern.get_kernel_source()
    assert src.count("__global__") >= 2, "expected a split kernel and a combine kernel"
    assert_pdl(src, arch)
    if arch == "sm_90a":
        assert "wgmma" in src, "expected wgmma on sm_90a"
        assert "__launch_bounds__(256" in src and (
            "arrive_and_expect_tx" in src or "expect_transaction" in src), \
            "expected a warp-specialised kernel (128-thread TMA producer + 128 MMA threads)"
        if op == "sparse-ws":
            assert "warpgroup_reg_alloc" in src and src.count(".expect_transaction(") >= 2
        if op.startswith("sparse"):
            # every gathered block is its own bulk copy, per 128-byte column piece, K and V
            bn = max(cfg.block_N, bs)
            pieces = len(common.column_chunks(D, dtype))
            assert src.count("tma_load(") >= 2 * (bn // bs) * pieces, \
                "expected one TMA load per gathered block and column piece"
            assert "warp_reduce_max" in src, "expected the per-warp -1 padding scan"
        else:
            assert "tma_load(" in src
    else:
        assert cfg.num_stages == 1
        assert "cp_async" in src, "expected cp.async loads on sm_80"
        assert "wgmma" not in src and "tma_load" not in src


def test_split_heuristic():
    f = heuristics.decode_num_splits
    # Qwen2.5-7B at 64K, keep 10% of 16-token blocks: K = 410 -> 103 tiles of 4 blocks
    ns = f(1, 4, 103, num_sms=132)
    per = -(-103 // ns)
    assert 4 * ns <= 132 and per <= 4, (ns, per)            # one wave on 132 SMs
    assert -(-103 // per) == ns                               # no empty split
    ns8 = f(8, 4, 103, num_sms=132)
    assert 32 * ns8 <= 132 and ns8 >= 2
    assert f(1, 4, 103, num_sms=66) < ns                      # follows the SM count
    assert f(1, 4, 1, num_sms=132) == 1
    for rows, tiles, sms in [(1, 1, 8), (3, 7, 132), (64, 4096, 132), (4, 4096, 114)]:
        ns = f(rows, 1, tiles, num_sms=sms)
        assert 1 <= ns <= min(tiles, 256)
        assert -(-tiles // -(-tiles // ns)) == ns


def test_default_configs():
    for arch in ("sm_90a", "sm_80"):
        for bs in (16, 32, 64, 128):
            c = heuristics.sparse_decode_config(bs, arch)
            assert isinstance(c, SparseDecodeConfig)
            assert c.block_N % bs == 0 and c.threads == 2 * c.block_H and c.block_H >= 7
            assert c.num_stages == (2 if arch == "sm_90a" else 1)
            assert c.schedule == ("ws" if arch == "sm_90a" else "auto")
        d = heuristics.dense_decode_config(arch)
        assert isinstance(d, DenseDecodeConfig) and d.block_N % 16 == 0


def test_planning_rejects_unsupported_shapes():
    # CPU tensors: the shape checks fire before any device query, compile or launch
    q = torch.zeros(1, 8, 96, dtype=torch.bfloat16)
    k = torch.zeros(1, 32, 2, 96, dtype=torch.bfloat16)
    L = torch.ones(1, dtype=torch.int32)
    idx = torch.zeros(1, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="head_dim"):
        plan.dense_decode_like(q, k, k, L)
    with pytest.raises(ValueError, match="head_dim"):
        plan.sparse_decode_like(q, k, k, idx, L, 16)
    q, k = q[..., :64], k[..., :64]
    with pytest.raises(ValueError, match="block_size"):
        plan.sparse_decode_like(q, k, k, idx, L, 256)


def test_ops_reject_non_contiguous_caches(monkeypatch):
    from resa_tl import ops
    monkeypatch.setattr(ops, "resolve_backend", lambda *a, **k: "tilelang")
    q = torch.zeros(1, 8, 64, dtype=torch.bfloat16)
    k = torch.zeros(1, 32, 2, 64, dtype=torch.bfloat16)
    L = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous"):
        ops.dense_decode(q, k.transpose(1, 2).contiguous().transpose(1, 2), k, L)


def test_config_checks():
    def shape(heads=8, bs=16):
        return sd.SparseDecodeShape(heads, 1, 128, 128, bs, "bfloat16")
    with pytest.raises(ValueError, match="block_H"):
        sd.program(shape(72), SparseDecodeConfig())
    with pytest.raises(ValueError, match="threads"):
        sd.program(shape(), SparseDecodeConfig(block_H=32, threads=128))
    with pytest.raises(ValueError, match="block_N"):
        sd.program(shape(bs=32), SparseDecodeConfig(block_N=48))
    with pytest.raises(ValueError, match="schedule"):
        sd.program(shape(), SparseDecodeConfig(schedule="pingpong"))
    with pytest.raises(ValueError, match="ctas_per_sm"):
        sd.program(shape(), SparseDecodeConfig(ctas_per_sm=2, schedule="auto"))
    with pytest.raises(ValueError, match="Hopper"):
        sd.compile_kernel(shape(), SparseDecodeConfig(num_stages=1, schedule="ws"), "sm_80",
                          False)
    with pytest.raises(ValueError, match="block_H"):
        dd.program(dd.DenseDecodeShape(72, 1, 128, 128), DenseDecodeConfig())


def test_use_pdl(monkeypatch):
    monkeypatch.delenv("RESA_TL_PDL", raising=False)
    assert heuristics.use_pdl("sm_90a") and heuristics.use_pdl("sm_100a")
    assert not heuristics.use_pdl("sm_80") and not heuristics.use_pdl("sm_89")
    assert heuristics.use_pdl("sm_100f") and heuristics.use_pdl("sm_120")
    with pytest.raises(ValueError, match="arch must look like"):
        heuristics.use_pdl("hopper")
    monkeypatch.setenv("RESA_TL_PDL", "0")
    assert not heuristics.use_pdl("sm_90a")
