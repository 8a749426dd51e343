"""The torch backend of every op against the naive float64 loops in tests/naive.py."""
import math

import pytest
import torch

import naive
from resa_tl import ops

TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make(B, S, Hkv, g, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv * g, D, generator=gen).to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen).to(dtype)
    return q, k, v


def close(out, ref, dtype):
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs().max().item()
    assert err <= TOL[dtype] * max(1.0, ref.abs().max().item()), err


LENGTH_SETS = [[1], [15], [16], [17], [15, 16, 17], [200, 1, 33], [100, 64, 7, 199]]


@pytest.mark.parametrize("lens", LENGTH_SETS)
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("dtype", DTYPES)
def test_block_summaries(lens, bs, dtype):
    B, S = len(lens), 200
    _, k, _ = make(B, S, 2, 1, 64, dtype, seed=sum(lens) + bs)
    L = torch.tensor(lens)
    kmin, kmax = ops.block_summaries(k, L, bs)
    nmin, nmax = naive.summaries(k, L, bs)
    assert kmin.dtype == dtype and kmin.shape == (B, math.ceil(S / bs), 2, 64)
    assert torch.equal(kmin.double(), nmin) and torch.equal(kmax.double(), nmax)


@pytest.mark.parametrize("g", [1, 2, 4, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[300, 1, 17], [16], [250, 255]])
def test_select_blocks(g, D, dtype, lens):
    B, S, Hkv, bs = len(lens), 320, 2, 16
    q, k, _ = make(B, S, Hkv, g, D, dtype, seed=g * D + len(lens))
    L = torch.tensor(lens)
    kmin, kmax = ops.block_summaries(k, L, bs)
    cfg = dict(block_size=bs, sparse_ratio=0.3, min_blocks=3, local_blocks=2)
    idx = ops.select_blocks(q, kmin, kmax, L, **cfg)
    NB = math.ceil(S / bs)
    assert idx.dtype == torch.int32
    assert idx.shape == (B, Hkv, max(math.ceil(NB * 0.3), 3))
    scores = naive.block_scores(q, kmin, kmax, L, bs, local=2)
    for b in range(B):
        nv = math.ceil(lens[b] / bs)
        n = naive.keep_count(nv, 0.3, 3)
        for h in range(Hkv):
            row = idx[b, h].tolist()
            kept = [j for j in row if j >= 0]
            assert row == kept + [-1] * (len(row) - len(kept)), "ids first, then -1 padding"
            assert kept == sorted(kept) and len(set(kept)) == len(kept) == n
            assert all(0 <= j < nv for j in kept)
            assert set(range(max(0, nv - 2), nv)) <= set(kept), "local blocks are kept"
            dropped = [j for j in range(nv) if j not in kept]
            if dropped:   # the kept blocks are the top-n by score (fp32 vs fp64 slack)
                worst_kept = min(scores[b, h, j].item() for j in kept)
                best_dropped = max(scores[b, h, j].item() for j in dropped)
                assert worst_kept >= best_dropped - 1e-4 * (1 + abs(best_dropped))


@pytest.mark.parametrize("sink", [1, 3])
@pytest.mark.parametrize("lens", [[300, 1, 17, 40], [250, 255]])
def test_select_blocks_sink_blocks(sink, lens):
    """sink_blocks: the first blocks are kept like the local ones, inside the same budget; the
    rest are the top of the others by score."""
    B, S, Hkv, g, D, bs = len(lens), 320, 2, 7, 64, 16
    q, k, _ = make(B, S, Hkv, g, D, torch.float32, seed=40 + sink)
    L = torch.tensor(lens)
    kmin, kmax = ops.block_summaries(k, L, bs)
    cfg = dict(block_size=bs, sparse_ratio=0.2, min_blocks=4, local_blocks=1)
    idx = ops.select_blocks(q, kmin, kmax, L, sink_blocks=sink, **cfg)
    plain = ops.select_blocks(q, kmin, kmax, L, **cfg)
    assert idx.shape == plain.shape and torch.equal(idx >= 0, plain >= 0)   # same budget
    assert not torch.equal(idx, plain), "the inputs must make the sinks matter"
    scores = naive.block_scores(q, kmin, kmax, L, bs, local=1, sink=sink)
    for b in range(B):
        nv = math.ceil(lens[b] / bs)
        for h in range(Hkv):
            kept = [j for j in idx[b, h].tolist() if j >= 0]
            assert kept == sorted(kept) and len(kept) == naive.keep_count(nv, 0.2, 4)
            assert set(range(min(sink, nv))) | {nv - 1} <= set(kept), "sink and local kept"
            dropped = [j for j in range(nv) if j not in kept]
            if dropped:
                worst_kept = min(scores[b, h, j].item() for j in kept)
                assert worst_kept >= max(scores[b, h, j].item() for j in dropped) - 1e-9
    with pytest.raises(ValueError, match="sink_blocks"):
        ops.select_blocks(q, kmin, kmax, L, sink_blocks=4, **cfg)           # 4 + 1 > 4
    with pytest.raises(ValueError, match="max_selected"):
        ops.select_blocks(q, kmin, kmax, L, sink_blocks=sink, max_selected=sink, **cfg)


def test_select_blocks_ratio_is_exact_and_max_selected():
    # 30 blocks at ratio 0.1: 30 * 0.1 = 3.0000000000000004 in floating point; 3 must be kept.
    B, S, bs = 1, 480, 16
    q, k, _ = make(B, S, 1, 2, 64, torch.float32, seed=3)
    L = torch.tensor([480])
    kmin, kmax = ops.block_summaries(k, L, bs)
    idx = ops.select_blocks(q, kmin, kmax, L, sparse_ratio=0.1, min_blocks=1, local_blocks=1)
    assert idx.shape[-1] == 3 and (idx >= 0).sum() == 3
    capped = ops.select_blocks(q, kmin, kmax, L, sparse_ratio=0.5, min_blocks=1,
                               local_blocks=1, max_selected=4)
    assert capped.shape[-1] == 4 and 29 in capped[0, 0].tolist()    # local block survives the cap
    wide = ops.select_blocks(q, kmin, kmax, L, sparse_ratio=1.0, min_blocks=1, max_selected=40)
    assert wide[0, 0, :30].tolist() == list(range(30)) and (wide[0, 0, 30:] == -1).all()


@pytest.mark.parametrize("g", [1, 2, 4, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_decode(g, D, dtype):
    lens = [1, 15, 16, 17, 190]
    B, S, Hkv, bs = len(lens), 200, 2, 16
    q, k, v = make(B, S, Hkv, g, D, dtype, seed=g + D)
    L = torch.tensor(lens)
    gen = torch.Generator().manual_seed(g)
    idx = torch.full((B, Hkv, 6), -1, dtype=torch.int32)
    for b in range(B):
        nv = math.ceil(lens[b] / bs)
        for h in range(Hkv):
            pick = torch.randperm(nv, generator=gen)[:4]
            idx[b, h, : len(pick)] = pick.int()
    idx[0, 1] = -1                              # a head with no block at all -> zeros
    idx[4, 0, [0, 5]] = idx[4, 0, [5, 0]]       # -1 padding need not be trailing
    out = ops.sparse_decode(q, k, v, idx, L, block_size=bs)
    ref = naive.sparse_decode(q, k, v, idx, L, bs, D ** -0.5)
    assert out.dtype == dtype and out.shape == (B, Hkv * g, D)
    close(out, ref, dtype)
    assert (out[0, g:2 * g] == 0).all()


@pytest.mark.parametrize("g", [1, 2, 4, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_decode_and_full_density(g, D, dtype):
    lens = [1, 15, 16, 17, 200]
    B, S, Hkv, bs = len(lens), 200, 2, 16
    q, k, v = make(B, S, Hkv, g, D, dtype, seed=2 * g + D)
    L = torch.tensor(lens)
    out = ops.dense_decode(q, k, v, L, softmax_scale=0.3)
    close(out, naive.dense_decode(q, k, v, L, 0.3), dtype)
    kmin, kmax = ops.block_summaries(k, L, bs)
    idx = ops.select_blocks(q, kmin, kmax, L, block_size=bs, sparse_ratio=1.0)
    sparse = ops.sparse_decode(q, k, v, idx, L, block_size=bs, softmax_scale=0.3)
    close(sparse, naive.dense_decode(q, k, v, L, 0.3), dtype)
    assert (sparse.float() - out.float()).abs().max() <= 2 * TOL[dtype]


@pytest.mark.parametrize("g", [1, 2, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5, 17])
def test_rectify_attention(g, D, dtype, T):
    lens = [T, 17, 100]
    B, S, Hkv = len(lens), 120, 2
    gen = torch.Generator().manual_seed(g * T + D)
    q = torch.randn(B, T, Hkv * g, D, generator=gen).to(dtype)
    _, k, v = make(B, S, Hkv, g, D, dtype, seed=T)
    L = torch.tensor(lens)
    out = ops.rectify_attention(q, k, v, L)
    assert out.shape == (B, T, Hkv * g, D)
    close(out, naive.rectify(q, k, v, L, D ** -0.5), dtype)
    # the last query of each row is an ordinary decode step
    close(out[:, -1], naive.dense_decode(q[:, -1], k, v, L, D ** -0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_update_block_summaries_touches_only_written_blocks(dtype):
    B, S, bs = 3, 160, 16
    _, k, _ = make(B, S, 2, 1, 64, dtype, seed=9)
    start = torch.tensor([0, 37, 120])
    kmin = torch.full((B, 10, 2, 64), 7.0, dtype=dtype)
    kmax = kmin.clone()
    ops.update_block_summaries(kmin, kmax, k, start, 20, bs)
    nmin, nmax = naive.summaries(k, start + 20, bs)
    for b, s in enumerate(start.tolist()):
        touched = set(range(s // bs, (s + 19) // bs + 1))
        for j in range(10):
            if j in touched:
                assert torch.equal(kmin[b, j].double(), nmin[b, j])
                assert torch.equal(kmax[b, j].double(), nmax[b, j])
            else:
                assert (kmin[b, j] == 7).all() and (kmax[b, j] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens", [[300, 0, 17], [16], [33, 1, 250]])
def test_select_blocks_refreshes_newest_summary(dtype, lens):
    """select_blocks(k_cache=...): same selection; the newest block of every non-empty row is
    recomputed from the cache (what update_block_summaries(start=len-1, length=1) does), every
    other summary is untouched."""
    B, S, Hkv, g, D, bs = len(lens), 300, 2, 7, 64, 16
    q, k, _ = make(B, S, Hkv, g, D, dtype, seed=len(lens) + S)
    L = torch.tensor(lens)
    prev = L.clamp(min=1) - 1                       # the step appended position len - 1
    kmin, kmax = ops.block_summaries(k, prev, bs)   # summaries from before the append
    cfg = dict(block_size=bs, sparse_ratio=0.2, min_blocks=3, local_blocks=1)
    want_idx = ops.select_blocks(q, kmin.clone(), kmax.clone(), L, **cfg)
    want_min, want_max = kmin.clone(), kmax.clone()
    rows = [b for b in range(B) if lens[b] > 0]
    for b in rows:
        w0, w1 = want_min[b:b + 1], want_max[b:b + 1]
        ops.update_block_summaries(w0, w1, k[b:b + 1], L[b:b + 1] - 1, 1, bs)
    idx = ops.select_blocks(q, kmin, kmax, L, k_cache=k, **cfg)
    assert torch.equal(idx, want_idx)
    assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max)
    full_min, full_max = ops.block_summaries(k, L, bs)   # == summaries built after the append
    for b in rows:
        assert torch.equal(kmin[b], full_min[b]) and torch.equal(kmax[b], full_max[b])


def test_select_blocks_refresh_argument_errors():
    q, k, _ = make(2, 64, 2, 2, 64, torch.float32, seed=3)
    L = torch.tensor([30, 64])
    kmin, kmax = ops.block_summaries(k, L, 16)
    with pytest.raises(ValueError, match="local_blocks >= 1"):
        ops.select_blocks(q, kmin, kmax, L, local_blocks=0, k_cache=k)
    with pytest.raises(ValueError, match="k_cache must be"):
        ops.select_blocks(q, kmin, kmax, L, k_cache=k[:, :32])
    with pytest.raises(ValueError, match="k_cache must be"):
        ops.select_blocks(q, kmin, kmax, L, k_cache=k[:, :, :1])
    with pytest.raises(TypeError, match="dtype"):
        ops.select_blocks(q, kmin, kmax, L, k_cache=k.half())
    with pytest.raises(ValueError, match="contiguous"):
        ops.select_blocks(q, kmin, kmax, L, k_cache=k.transpose(0, 1).contiguous().transpose(0, 1))
