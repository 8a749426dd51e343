"""GPU tests of the TileLang block_summaries / update_block_summaries kernels
(resa_tl/kernels/block_summaries.py) against their torch references.

Summaries are min/max of the input values, so they must match the reference EXACTLY (including
zeros for blocks with no valid key); outputs are poisoned before every call.

``summary_specs`` lists the static kernels these tests build, so a script can pre-compile them
into the TileLang disk cache (benchmarks/bench_selection_kernels.py --precompile).

select_blocks' refresh of the newest summary (select_blocks(k_cache=...)) is tested in
test_select_blocks_gpu.py, fp8 summaries in test_fp8_summaries_gpu.py."""
import pytest
import torch

import kernel_calls as kc
from gpu_helpers import BF16, F16, I32, I64, LENGTHS, _dev, _lens

from resa_tl import ops
from resa_tl.kernels import block_summaries as summ

pytestmark = pytest.mark.gpu

POISON_F = 1234.0           # finite sentinel (fp16-representable) for "not written" checks


# ------------------------------------------------------------------------------------------
# block_summaries
# ------------------------------------------------------------------------------------------
# (B, lengths, S_max, Hkv, D, block_size, dtype, index dtype)
SUMMARY_CASES = [
    (8, LENGTHS + [0], 65536, 4, 128, 16, BF16, I32),
    (3, [4103, 17, 1000], 4103, 2, 64, 16, F16, I64),
    (1, [999], 1000, 1, 128, 64, F16, I32),
    (3, [4200, 129, 1], 4200, 8, 64, 128, BF16, I32),
    (2, [77, 33], 100, 3, 128, 32, BF16, I64),       # Hkv*D/8 does not divide the CTA
]


def summary_specs():
    """(Hkv, D, bs, dtype, index dtype, mode) of every summaries kernel these tests build."""
    out = set()
    for _, _, _, hkv, d, bs, dt, it in SUMMARY_CASES:
        out.add((hkv, d, bs, dt, it, "build"))
    for _, _, hkv, d, bs, dt, it in UPDATE_CASES:
        out.add((hkv, d, bs, dt, it, "build"))
        out.add((hkv, d, bs, dt, it, "update"))
    return sorted(out, key=str)


@pytest.mark.parametrize("case", SUMMARY_CASES, ids=lambda c: f"B{c[0]}-S{c[2]}-h{c[3]}-d{c[4]}"
                         f"-bs{c[5]}-{str(c[6])[6:]}-{str(c[7])[6:]}")
def test_block_summaries_exact(case):
    B, lens, S, Hkv, D, bs, dt, it = case
    torch.manual_seed(0)
    k = torch.randn(B, S, Hkv, D, device=_dev()).to(dt)
    sl = _lens(lens, it)
    nb = -(-S // bs)
    kmin = torch.full((B, nb, Hkv, D), float("nan"), dtype=dt, device=_dev())
    kmax = torch.full_like(kmin, float("nan"))
    kc.block_summaries(k, sl, bs, out=(kmin, kmax))
    rmin, rmax = summ.block_summaries_reference(k, sl, bs)
    assert torch.equal(kmin, rmin), "kmin differs from the reference"
    assert torch.equal(kmax, rmax), "kmax differs from the reference"
    # the public op dispatches to the same kernel
    omin, omax = ops.block_summaries(k, sl, bs, backend="tilelang")
    assert torch.equal(omin, rmin) and torch.equal(omax, rmax)


# ------------------------------------------------------------------------------------------
# update_block_summaries: random appends and rewinds == rebuilt summaries
# ------------------------------------------------------------------------------------------
# (B, S_max, Hkv, D, block_size, dtype, index dtype)
UPDATE_CASES = [
    (3, 4200, 4, 128, 16, BF16, I32),
    (8, 1100, 2, 64, 32, F16, I64),
    (1, 70000, 4, 128, 16, BF16, I32),
]


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-h{c[2]}-d{c[3]}"
                         f"-bs{c[4]}-{str(c[5])[6:]}-{str(c[6])[6:]}")
def test_update_block_summaries_random_appends_rewinds(case):
    B, S, Hkv, D, bs, dt, it = case
    g = torch.Generator().manual_seed(1)
    dev = _dev()
    k = torch.randn(B, S, Hkv, D, device=dev).to(dt)
    cur = torch.randint(1, min(S, 66000) // 2, (B,), generator=g)
    if S > 65536:
        cur[0] = 65530                                   # crosses 65536 while appending
    kmin, kmax = kc.block_summaries(k, cur.to(device=dev, dtype=it), bs)
    nb = kmin.shape[1]
    for step, length in enumerate([1, 33, 1, 5, 16, 17, 64, 1, 2, 33, 1, 100]):
        # rewind some rows (start < current length), append on the others
        rewind = torch.rand(B, generator=g) < 0.35
        back = torch.randint(0, 40, (B,), generator=g)
        start = torch.where(rewind, (cur - back).clamp(min=0), cur)
        start = start.clamp(max=S - length)
        end = start + length
        for b in range(B):                               # fresh keys at the written positions
            k[b, int(start[b]):int(end[b])] = torch.randn(length, Hkv, D, device=dev).to(dt)
        # poison every block past the last one any row touches: the kernel must not write there
        hi_blk = int(((end - 1) // bs).max()) + 1
        kmin[:, hi_blk:] = POISON_F
        kmax[:, hi_blk:] = POISON_F
        rmin, rmax = kmin.clone(), kmax.clone()
        st = start.to(device=dev, dtype=it)
        out = kc.update_block_summaries(kmin, kmax, k, st, length, bs)
        assert out[0] is kmin and out[1] is kmax, "update must be in place"
        summ.update_block_summaries_reference(rmin, rmax, k, st, length, bs)
        assert torch.equal(kmin, rmin), f"step {step}: kmin differs from the reference update"
        assert torch.equal(kmax, rmax), f"step {step}: kmax differs from the reference update"
        assert (kmin[:, hi_blk:] == POISON_F).all(), "update wrote past the touched blocks"
        # == summaries rebuilt from scratch over every row's valid blocks
        bmin, bmax = summ.block_summaries_reference(k, end.to(dev), bs)
        nvalid = (end + bs - 1) // bs
        for b in range(B):
            nv = int(nvalid[b])
            assert torch.equal(kmin[b, :nv], bmin[b, :nv]), f"step {step} row {b}: kmin != rebuilt"
            assert torch.equal(kmax[b, :nv], bmax[b, :nv]), f"step {step} row {b}: kmax != rebuilt"
        cur = end
    assert nb == -(-S // bs)


def test_update_block_summaries_cuda_graph():
    B, S, Hkv, D, bs, dt = 3, 3000, 4, 128, 16, BF16
    dev = _dev()
    torch.manual_seed(2)
    k = torch.randn(B, S, Hkv, D, device=dev).to(dt)
    lens = _lens([100, 1, 2047])
    kmin, kmax = kc.block_summaries(k, lens, bs)
    start = lens.clone()
    kc.update_block_summaries(kmin, kmax, k, start, 1, bs)       # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kc.update_block_summaries(kmin, kmax, k, start, 1, bs)
    cur = lens.clone() + 1
    for _ in range(40):                                  # decode steps: write a key, replay
        for b in range(B):
            k[b, int(cur[b])] = torch.randn(Hkv, D, device=dev).to(dt)
        start.copy_(cur)
        graph.replay()
        cur += 1
    torch.cuda.synchronize()
    bmin, bmax = summ.block_summaries_reference(k, cur, bs)
    for b in range(B):
        nv = int((cur[b] + bs - 1) // bs)
        assert torch.equal(kmin[b, :nv], bmin[b, :nv])
        assert torch.equal(kmax[b, :nv], bmax[b, :nv])
