"""GPU tests of fp8 block summaries (ReSAConfig.summary_dtype): the TileLang summaries kernels
(build, update, the refresh inside select_blocks) against the torch references bit for bit, and
select_blocks on fp8 summaries against the reference selection.

fp8 summaries are the exact min/max rounded outward (kmin down, kmax up) on the fp8 grid, and
the largest finite fp8 value is the "unbounded" sentinel; keys here span tiny (fp8 subnormal),
ordinary and out-of-range (> 448 / > 57344) magnitudes so every branch of the rounding runs.
Outputs are poisoned (fp8 NaN bytes) before the calls.
"""
import pytest
import torch

import kernel_calls as kc
from gpu_helpers import check_selection

from resa_tl import ops
from resa_tl.kernels import select_blocks as sel
from resa_tl.kernels import block_summaries as summ

pytestmark = pytest.mark.gpu

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
F16, BF16 = torch.float16, torch.bfloat16
I32, I64 = torch.int32, torch.int64
FP8 = [E4M3, E5M2]


def _dev():
    return torch.device("cuda")


def _keys(B, S, Hkv, D, dt, seed, top=None):
    """Random keys whose per-dimension scale spans 1e-6 .. 10**top (default 1e5, past both fp8
    ranges; fp16 keys stay below 6e4)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(B, S, Hkv, D, device=_dev(), generator=g)
    top = top if top is not None else (4.7 if dt == F16 else 5.0)
    scale = 10 ** (torch.rand(1, 1, Hkv, D, device=_dev(), generator=g) * (top + 6) - 6)
    fin = torch.finfo(dt).max / 2                   # finite keys (no fp16 overflow to inf)
    return (k * scale).clamp(-fin, fin).to(dt)


def _bytes(t):
    return t.view(torch.uint8)


def _poison(t):
    t.view(torch.uint8).fill_(0x7F)                  # NaN in both fp8 formats
    return t


def _nan_free(t):
    return not torch.isnan(t.float()).any()


# (B, lengths, S_max, Hkv, D, block_size, key dtype, index dtype)
SUMMARY_CASES = [
    (4, [1, 17, 4103, 0], 4103, 4, 128, 16, BF16, I32),
    (3, [1000, 15, 999], 1000, 2, 64, 16, F16, I64),
    (2, [4200, 129], 4200, 8, 64, 128, BF16, I32),
]


@pytest.mark.parametrize("sdt", FP8, ids=str)
@pytest.mark.parametrize("case", SUMMARY_CASES, ids=lambda c: f"B{c[0]}-S{c[2]}-h{c[3]}-d{c[4]}"
                         f"-bs{c[5]}-{str(c[6])[6:]}-{str(c[7])[6:]}")
def test_block_summaries_fp8_exact(case, sdt):
    B, lens, S, Hkv, D, bs, dt, it = case
    k = _keys(B, S, Hkv, D, dt, seed=1)
    sl = torch.tensor(lens, dtype=it, device=_dev())
    nb = -(-S // bs)
    kmin = _poison(torch.empty(B, nb, Hkv, D, dtype=sdt, device=_dev()))
    kmax = _poison(torch.empty_like(kmin))
    kc.block_summaries(k, sl, bs, out=(kmin, kmax), summary_dtype=sdt)
    rmin, rmax = summ.block_summaries_reference(k, sl, bs, sdt)
    assert torch.equal(_bytes(kmin), _bytes(rmin)), "kmin differs from the reference"
    assert torch.equal(_bytes(kmax), _bytes(rmax)), "kmax differs from the reference"
    assert _nan_free(kmin) and _nan_free(kmax)
    # a bound: decoded kmin <= the exact min, kmax >= the exact max
    emin, emax = summ.block_summaries_reference(k, sl, bs)
    lo, hi = summ.summary_values(kmin, kmax)
    assert (lo <= emin.float()).all() and (hi >= emax.float()).all()
    omin, omax = ops.block_summaries(k, sl, bs, summary_dtype=sdt, backend="tilelang")
    assert torch.equal(_bytes(omin), _bytes(rmin)) and torch.equal(_bytes(omax), _bytes(rmax))


# (B, S_max, Hkv, D, block_size, key dtype, index dtype)
UPDATE_CASES = [
    (3, 4200, 4, 128, 16, BF16, I32),
    (5, 1100, 2, 64, 32, F16, I64),
]


@pytest.mark.parametrize("sdt", FP8, ids=str)
@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: f"B{c[0]}-S{c[1]}-h{c[2]}-d{c[3]}"
                         f"-bs{c[4]}-{str(c[5])[6:]}-{str(c[6])[6:]}")
def test_update_block_summaries_fp8(case, sdt):
    """Random appends and rewinds: the update equals the reference update and a rebuild."""
    B, S, Hkv, D, bs, dt, it = case
    g = torch.Generator().manual_seed(2)
    k = _keys(B, S, Hkv, D, dt, seed=3)
    cur = torch.randint(1, S // 2, (B,), generator=g)
    kmin, kmax = kc.block_summaries(k, cur.to(device=_dev(), dtype=it), bs,
                                               summary_dtype=sdt)
    for step, length in enumerate([1, 33, 1, 5, 16, 17, 64, 1]):
        rewind = torch.rand(B, generator=g) < 0.35
        back = torch.randint(0, 40, (B,), generator=g)
        start = torch.where(rewind, (cur - back).clamp(min=0), cur).clamp(max=S - length)
        end = start + length
        fresh = _keys(B, S, Hkv, D, dt, seed=100 + step)
        for b in range(B):
            k[b, int(start[b]):int(end[b])] = fresh[b, int(start[b]):int(end[b])]
        hi_blk = int(((end - 1) // bs).max()) + 1
        _poison(kmin[:, hi_blk:])
        _poison(kmax[:, hi_blk:])
        rmin, rmax = kmin.clone(), kmax.clone()
        st = start.to(device=_dev(), dtype=it)
        kc.update_block_summaries(kmin, kmax, k, st, length, bs)
        summ.update_block_summaries_reference(rmin, rmax, k, st, length, bs)
        assert torch.equal(_bytes(kmin), _bytes(rmin)), f"step {step}: kmin != reference"
        assert torch.equal(_bytes(kmax), _bytes(rmax)), f"step {step}: kmax != reference"
        assert (_bytes(kmin[:, hi_blk:]) == 0x7F).all(), "update wrote past the touched blocks"
        bmin, bmax = summ.block_summaries_reference(k, end.to(_dev()), bs, sdt)
        for b in range(B):
            nv = int((end[b] + bs - 1) // bs)
            assert torch.equal(_bytes(kmin[b, :nv]), _bytes(bmin[b, :nv])), f"row {b} != rebuilt"
            assert torch.equal(_bytes(kmax[b, :nv]), _bytes(bmax[b, :nv])), f"row {b} != rebuilt"
        cur = end


# (B, lengths, S_max, Hkv, g, D, key dtype, summary dtype, block_size, ratio, local_blocks)
SELECT_CASES = [
    (8, [1, 15, 16, 17, 1000, 4103, 32768, 70], 32768, 4, 7, 128, BF16, E4M3, 16, 0.1, 1),
    (3, [4103, 1000, 17], 4103, 4, 6, 128, F16, E5M2, 16, 0.1, 1),
    (3, [4103, 65, 3000], 4103, 8, 1, 64, BF16, E4M3, 16, 0.1, 1),
    (2, [5000, 333], 5000, 2, 8, 64, F16, E4M3, 32, 0.2, 2),
    (2, [2000, 777], 2000, 3, 3, 64, BF16, E5M2, 16, 0.1, 1),
    (2, [2000, 1999], 2000, 4, 7, 128, BF16, E4M3, 16, 1.0, 1),          # full density
    (1, [262144], 262144, 4, 7, 128, BF16, E5M2, 16, 0.1, 1),             # NB 16384
]


def select_specs():
    """(NB, Hkv, g, D, bs, ratio, local, K, key dtype, summary dtype, batch) of the select
    kernels below (plain and refresh variants), for precompiling."""
    out = []
    for B, lens, S, Hkv, g, D, dt, sdt, bs, ratio, local in SELECT_CASES:
        nb = -(-S // bs)
        out.append((nb, Hkv, g, D, bs, ratio, local, sel.default_max_selected(nb, ratio, 16),
                    dt, sdt, B))
    return out


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: (
    f"B{c[0]}-S{c[2]}-h{c[3]}-g{c[4]}-d{c[5]}-{str(c[6])[6:]}-{str(c[7])[6:]}-bs{c[8]}"
    f"-r{c[9]}-loc{c[10]}"))
def test_select_blocks_fp8(case):
    """fp8 summaries built from keys: the kernel's selection is a valid top-n of the reference
    scores (same checker as the fp16/bf16 tests), ties aside equal to the reference's; the
    refresh variant (graph-captured) rewrites the newest block bit-exactly."""
    B, lens, S, Hkv, g, D, dt, sdt, bs, ratio, local = case
    nb = -(-S // bs)
    K = sel.default_max_selected(nb, ratio, 16)
    k = _keys(B, S, Hkv, D, dt, seed=5, top=1.5)  # |k| < ~210 < 448: no sentinel (see below)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    sl = torch.tensor(lens, dtype=I32, device=_dev())
    before = (sl.long() - 1).clamp(min=0)
    kmin, kmax = summ.block_summaries_reference(k, before, bs, sdt)
    kw = dict(block_size=bs, sparse_ratio=ratio, min_blocks=16, local_blocks=local,
              max_selected=K)
    out = torch.full((B, Hkv, K), 0x7FFFFFFF, dtype=torch.int32, device=_dev())
    kc.select_blocks(q, kmin, kmax, sl, out=out, **kw)
    ref = sel.select_blocks_reference(q, kmin, kmax, sl, **kw)
    lo, hi = summ.summary_values(kmin, kmax)
    differing = check_selection(out, q, lo, hi, sl, ref=ref, **kw)
    assert differing <= max(1, B * Hkv // 8), f"{differing} rows differ from torch.topk"
    if ratio == 1.0:
        nvalid = (sl.long() + bs - 1) // bs
        for b in range(B):
            nv = min(int(nvalid[b]), K)
            want = torch.arange(nv, dtype=torch.int32, device=_dev())
            assert torch.equal(out[b, :, :nv], want.expand(Hkv, nv))
    # refresh, captured in a CUDA graph: same ids, and the summaries of the whole cache after
    want_min, want_max = summ.block_summaries_reference(k, sl, bs, sdt)
    mn, mx = kmin.clone(), kmax.clone()
    out2 = torch.full_like(out, 0x7FFFFFFF)
    call = lambda: kc.select_blocks(q, mn, mx, sl, k_cache=k, out=out2, **kw)  # noqa
    call()                                                           # warm-up (compiles)
    mn.copy_(kmin)
    mx.copy_(kmax)
    rows = torch.arange(B, device=_dev())
    newest = (sl.long() - 1) // bs
    mn[rows, newest] = _poison(mn[rows, newest].clone())
    mx[rows, newest] = _poison(mx[rows, newest].clone())
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        call()
    out2.fill_(0x7FFFFFFF)
    gr.replay()
    torch.cuda.synchronize()
    assert torch.equal(out2, out), "the refresh must not change the selection"
    assert torch.equal(_bytes(mn), _bytes(want_min)) and torch.equal(_bytes(mx), _bytes(want_max))
    via_op = ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)
    assert torch.equal(via_op, out)


def test_fp8_sentinel_keeps_the_block():
    """A block whose keys exceed the fp8 range gets the "unbounded" kmax. With q > 0 on that
    dimension it must be kept, although 40 other blocks outscore it if its kmax were read as
    the plain 448 (checked below, so the test needs the sentinel decode to pass)."""
    B, S, Hkv, g, D, bs = 1, 4096, 4, 7, 128, 16
    k = (torch.randn(B, S, Hkv, D, device=_dev()) * 0.01).to(BF16)
    k[0, 5 * bs + 3, :, 0] = 1000.0                                # block 5, dim 0, > 448
    for j in range(100, 140):                                      # 40 strong in-range blocks
        k[0, j * bs, :, 1:] = 30.0
    q = torch.ones(B, Hkv * g, D, device=_dev(), dtype=BF16)
    sl = torch.tensor([S], dtype=I32, device=_dev())
    kmin, kmax = ops.block_summaries(k, sl, bs, summary_dtype=E4M3)
    assert (kmax[0, 5, :, 0].float() == 448).all()
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=1)
    n = int(sel.blocks_to_keep(S // bs, 0.1, 16))
    plain = sel.block_scores_reference(q, kmin.float(), kmax.float(), sl, bs, 1)   # 448 as is
    assert (plain[0, :, 100:140] > plain[0, :, 5:6]).all() and n < 40, "test premise"
    idx = ops.select_blocks(q, kmin, kmax, sl, **kw)
    assert (idx[0] == 5).any(dim=-1).all(), "the unbounded block must be kept by every head"
    ref = sel.select_blocks_reference(q, kmin, kmax, sl, max_selected=idx.shape[-1], **kw)
    assert (ref[0] == 5).any(dim=-1).all()
