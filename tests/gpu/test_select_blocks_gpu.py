"""GPU tests of the TileLang select_blocks kernel (resa_tl/kernels/select_blocks.py) against
the torch reference, including its refresh of the newest block summary (k_cache=...), sink
blocks, every histogram mode and CUDA graphs.

The reference uses torch.topk, which is arbitrary among equal scores, and the kernel's fp32 sums
run in another order, so the tests check the SET (gpu_helpers.check_selection): count == n,
ascending, -1 padding, in range, locals kept, and every kept block's reference score >= every
dropped valid block's score minus a tiny tolerance; and it must equal the reference exactly
except for blocks whose score is within that tolerance of the threshold (none on random data,
in practice). Exact ties resolve to the lower block ids (tested on constructed ties).

``select_specs`` / ``sink_specs`` (with ``variant_config``) list the static kernels these tests
build, so a script can pre-compile them into the TileLang disk cache
(benchmarks/bench_selection_kernels.py --precompile).

Tests here that also run block_summaries: test_select_blocks_end_to_end_from_keys (summaries
built by the kernel, then selection; its summaries kernel is among test_block_summaries_gpu.py's
``summary_specs``) and test_unsupported_shapes_raise_before_launch (both ops reject an
unsupported head_dim before launching)."""
import pytest
import torch

import kernel_calls as kc
from gpu_helpers import BF16, F16, I32, I64, LENGTHS, _dev, _lens, check_selection

from resa_tl import ops
from resa_tl.kernels import select_blocks as sel
from resa_tl.kernels import block_summaries as summ

pytestmark = pytest.mark.gpu


# (B, lengths or None = random ragged, S_max, Hkv, g, D, dtype, index dtype, block_size,
#  sparse_ratio, min_blocks, local_blocks, max_selected or None = default)
SELECT_CASES = [
    (8, LENGTHS + [70], 65536, 4, 7, 128, BF16, I32, 16, 0.1, 16, 1, None),
    (3, [65536, 1000, 17], 65536, 4, 7, 128, F16, I64, 16, 0.1, 16, 1, None),
    (1, [4103], 4103, 8, 1, 64, F16, I32, 16, 0.1, 16, 1, None),
    (3, [15, 16, 4103], 4103, 2, 2, 128, BF16, I32, 16, 0.1, 16, 1, None),
    (3, None, 5000, 4, 4, 64, BF16, I64, 16, 0.1, 16, 2, None),
    (8, None, 3000, 2, 6, 128, F16, I32, 32, 0.2, 8, 1, None),
    (3, [2000, 1, 1999], 2000, 1, 8, 128, BF16, I32, 16, 0.1, 16, 1, None),
    (3, [1000, 4103, 17], 4103, 4, 7, 64, BF16, I32, 16, 1.0, 16, 1, None),     # full density
    (3, [4103, 1000, 50], 4103, 4, 7, 128, BF16, I32, 16, 0.1, 16, 0, 20),      # K caps n
    (3, [4103, 65, 3000], 4103, 2, 7, 128, F16, I32, 64, 0.05, 4, 4, None),     # bs 64, 4 local
    (1, [262144], 262144, 4, 7, 128, BF16, I32, 16, 0.1, 16, 1, None),          # NB 16384
    (2, [524288, 300001], 524288, 4, 7, 128, BF16, I32, 16, 0.1, 16, 1, None),  # keys in smem
]


def _case_k(c):
    B, lens, S, Hkv, g, D, dt, it, bs, ratio, minb, local, K = c
    nb = -(-S // bs)
    return K if K is not None else sel.default_max_selected(nb, ratio, minb)


def select_specs():
    """Static parameters (+ config hist override or None) of every select kernel these tests
    build, for precompiling."""
    out = set()
    for c in SELECT_CASES:
        B, lens, S, Hkv, g, D, dt, it, bs, ratio, minb, local, K = c
        out.add((-(-S // bs), Hkv, g, D, bs, ratio, minb, local, _case_k(c), dt, it, None))
    for i in VARIANT_CASES:
        c = SELECT_CASES[i]
        B, lens, S, Hkv, g, D, dt, it, bs, ratio, minb, local, K = c
        for hist, threads in VARIANTS:
            out.add((-(-S // bs), Hkv, g, D, bs, ratio, minb, local, _case_k(c), dt, it,
                     (hist, threads)))
    tie = (TIE_NB, 2, 2, 64, 16, 0.1, 16, 1, sel.default_max_selected(TIE_NB, 0.1, 16), F16, I32)
    for hist in HISTS:
        out.add(tie + ((hist, None),))
    out.add((GRAPH_NB, 4, 7, 128, 16, 0.1, 16, 1, sel.default_max_selected(GRAPH_NB, 0.1, 16),
             BF16, I32, None))
    out.add((512, 4, 7, 128, 16, 0.1, 16, 1, sel.default_max_selected(512, 0.1, 16), BF16, I32,
             None))
    return sorted(out, key=str)


def variant_config(nb, hkv, d, variant):
    """The heuristic config with (hist, select_threads) overridden; None -> the heuristic."""
    import dataclasses

    from resa_tl import heuristics
    cfg = heuristics.selection_config(nb, hkv, d)
    if variant is None:
        return cfg
    hist, threads = variant
    return dataclasses.replace(cfg, hist=hist, select_threads=threads or cfg.select_threads)


def _random_summaries(B, nb, Hkv, D, dt, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kmin = torch.randn(B, nb, Hkv, D, device=_dev(), generator=g)
    kmax = kmin + torch.rand(B, nb, Hkv, D, device=_dev(), generator=g) * 2
    return kmin.to(dt), kmax.to(dt)


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: (
    f"B{c[0]}-S{c[2]}-h{c[3]}-g{c[4]}-d{c[5]}-{str(c[6])[6:]}-{str(c[7])[6:]}-bs{c[8]}"
    f"-r{c[9]}-min{c[10]}-loc{c[11]}-K{c[12]}"))
def test_select_blocks(case):
    B, lens, S, Hkv, g, D, dt, it, bs, ratio, minb, local, K = case
    nb = -(-S // bs)
    K = _case_k(case)
    gen = torch.Generator().manual_seed(3)
    if lens is None:
        lens = torch.randint(1, S + 1, (B,), generator=gen).tolist()
        lens[0] = 1
    sl = _lens(lens, it)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    kmin, kmax = _random_summaries(B, nb, Hkv, D, dt, seed=4)
    out = torch.full((B, Hkv, K), 0x7FFFFFFF, dtype=torch.int32, device=_dev())   # poisoned
    kw = dict(block_size=bs, sparse_ratio=ratio, min_blocks=minb, local_blocks=local,
              max_selected=K)
    kc.select_blocks(q, kmin, kmax, sl, out=out, **kw)
    ref = sel.select_blocks_reference(q, kmin, kmax, sl, **kw)
    differing = check_selection(out, q, kmin, kmax, sl, ref=ref, **kw)
    assert differing <= max(1, B * Hkv // 8), f"{differing} rows differ from torch.topk"
    if ratio == 1.0:                                     # full density: every valid block
        nvalid = (sl.long() + bs - 1) // bs
        for b in range(B):
            nv = min(int(nvalid[b]), K)
            want = torch.arange(nv, dtype=torch.int32, device=_dev())
            assert torch.equal(out[b, :, :nv], want.expand(Hkv, nv))
    # the public op gives the same ids
    via_op = ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)
    assert torch.equal(via_op, out)


# every histogram mode (and other thread counts) on a few representative cases
HISTS = ("match", "hybrid", "priv")
VARIANTS = [("match", None), ("priv", None), ("hybrid", 512), ("priv", 1024)]
VARIANT_CASES = [0, 4, 10, 11]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
@pytest.mark.parametrize("case_index", VARIANT_CASES)
def test_select_blocks_config_variants(case_index, variant):
    B, lens, S, Hkv, g, D, dt, it, bs, ratio, minb, local, K = SELECT_CASES[case_index]
    nb = -(-S // bs)
    K = _case_k(SELECT_CASES[case_index])
    cfg = variant_config(nb, Hkv, D, variant)
    gen = torch.Generator().manual_seed(13)
    if lens is None:
        lens = torch.randint(1, S + 1, (B,), generator=gen).tolist()
    sl = _lens(lens, it)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    kmin, kmax = _random_summaries(B, nb, Hkv, D, dt, seed=14)
    out = torch.full((B, Hkv, K), 0x7FFFFFFF, dtype=torch.int32, device=_dev())
    kw = dict(block_size=bs, sparse_ratio=ratio, min_blocks=minb, local_blocks=local,
              max_selected=K)
    kc.select_blocks(q, kmin, kmax, sl, out=out, config=cfg, **kw)
    ref = sel.select_blocks_reference(q, kmin, kmax, sl, **kw)
    differing = check_selection(out, q, kmin, kmax, sl, ref=ref, **kw)
    assert differing <= max(1, B * Hkv // 8)
    default = kc.select_blocks(q, kmin, kmax, sl, **kw)
    assert torch.equal(default, out), "histogram modes / thread counts must agree exactly"


TIE_NB = 100


@pytest.mark.parametrize("hist", HISTS)
def test_select_blocks_ties_prefer_lower_ids(hist):
    """Blocks drawn from 3 patterns tie exactly; the kernel keeps the lower ids of the threshold
    pattern (deterministic rule)."""
    B, Hkv, g, D, bs, dt = 2, 2, 2, 64, 16, F16
    torch.manual_seed(5)
    pats_lo = torch.randn(3, Hkv, D, device=_dev())
    pats_hi = pats_lo + torch.rand(3, Hkv, D, device=_dev())
    which = torch.randint(0, 3, (B, TIE_NB), generator=torch.Generator().manual_seed(6)).to(_dev())
    kmin, kmax = pats_lo[which].to(dt), pats_hi[which].to(dt)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    sl = _lens([TIE_NB * bs, 70 * bs - 3])
    K = sel.default_max_selected(TIE_NB, 0.1, 16)
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=1, max_selected=K)
    out = kc.select_blocks(q, kmin, kmax, sl, config=variant_config(TIE_NB, Hkv, D,
                                                                            (hist, None)), **kw)
    check_selection(out, q, kmin, kmax, sl, **kw)
    s = sel.block_scores_reference(q, kmin, kmax, sl, bs, 1).cpu()
    nvalid = (sl.cpu() + bs - 1) // bs
    n = sel.blocks_to_keep(nvalid, 0.1, 16).clamp(max=K)
    for b in range(B):
        for h in range(Hkv):
            nv = int(nvalid[b])
            order = sorted(range(nv), key=lambda j: (-float(s[b, h, j]), j))[: int(n[b])]
            want = sorted(order) + [-1] * (K - int(n[b]))
            assert out[b, h].cpu().tolist() == want, f"b={b} h={h}: tie rule (lower ids first)"


# (B, lengths or None = random, S_max, Hkv, g, D, dtype, index dtype, block_size, local_blocks,
#  select_threads or None = the schedule's / heuristic's)
REFRESH_CASES = [
    (4, [1, 17, 4103, 0], 4103, 2, 7, 64, F16, I64, 16, 1, None),
    (3, [8192, 33, 1000], 8192, 4, 6, 128, BF16, I32, 16, 2, None),
    (2, [129, 64], 200, 8, 1, 128, F16, I32, 64, 1, None),     # rows past the prefetched 16
    (8, None, 65536, 4, 7, 128, BF16, I32, 16, 1, None),
    (2, [100, 37], 128, 2, 2, 256, F16, I32, 16, 1, 128),      # fewer threads than D: no prefetch
]


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("case", REFRESH_CASES, ids=lambda c: (
    f"B{c[0]}-S{c[2]}-h{c[3]}-g{c[4]}-d{c[5]}-{str(c[6])[6:]}-bs{c[8]}-loc{c[9]}-t{c[10]}"))
def test_select_blocks_refreshes_newest_summary(case, graph):
    """select_blocks(k_cache=...) after a one-token append: the same ids as the plain kernel on
    the pre-append summaries, and afterwards kmin/kmax equal the summaries of the whole cache at
    the new lengths, bit for bit. The blocks to refresh are poisoned (NaN) first, so an
    unwritten one fails; rows of length 0 stay as they were."""
    B, lens, S, Hkv, g, D, dt, it, bs, local, threads = case
    nb = -(-S // bs)
    cfg = variant_config(nb, Hkv, D, ("hybrid", threads)) if threads else None
    if lens is None:
        lens = torch.randint(1, S + 1, (B,), generator=torch.Generator().manual_seed(21)).tolist()
    torch.manual_seed(22)
    k = torch.randn(B, S, Hkv, D, device=_dev()).to(dt)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    sl = _lens(lens, it)
    before = (sl.long() - 1).clamp(min=0)                       # lengths before the append
    kmin0, kmax0 = summ.block_summaries_reference(k, before, bs)
    K = sel.default_max_selected(nb, 0.1, 16)
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=local, max_selected=K)
    want_ids = kc.select_blocks(q, kmin0, kmax0, sl, config=cfg, **kw)
    want_min, want_max = summ.block_summaries_reference(k, sl, bs)
    empty = sl == 0
    want_min[empty], want_max[empty] = kmin0[empty], kmax0[empty]
    kmin, kmax = kmin0.clone(), kmax0.clone()
    rows = torch.nonzero(~empty).flatten()
    newest = (sl.long()[rows] - 1) // bs
    kmin[rows, newest] = float("nan")
    kmax[rows, newest] = float("nan")
    out = torch.full((B, Hkv, K), 0x7FFFFFFF, dtype=torch.int32, device=_dev())
    call = lambda: kc.select_blocks(q, kmin, kmax, sl, k_cache=k, out=out,  # noqa
                                              config=cfg, **kw)
    if graph:
        call()                                                  # warm-up (compiles)
        kmin[rows, newest] = float("nan")
        kmax[rows, newest] = float("nan")
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            call()
        out.fill_(0x7FFFFFFF)
        gr.replay()
    else:
        call()
    torch.cuda.synchronize()
    assert torch.equal(out, want_ids), "the refresh must not change the selection"
    assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max), \
        "summaries after the refresh differ from those of the whole cache"
    if cfg is None:
        via_op = ops.select_blocks(q, kmin0.clone(), kmax0.clone(), sl, k_cache=k,
                                   backend="tilelang", **kw)
        assert torch.equal(via_op, want_ids)


# (B, lengths, S_max, Hkv, g, D, dtype, block_size, local_blocks, sink_blocks, refresh)
SINK_CASES = [
    (8, [1, 15, 16, 17, 1000, 4103, 32768, 70], 32768, 4, 7, 128, BF16, 16, 1, 1, True),
    (3, [4103, 1000, 17], 4103, 2, 6, 64, F16, 16, 2, 3, False),
    (4, [1, 16, 33, 5000], 5000, 4, 7, 128, BF16, 32, 1, 2, False),
]


def sink_specs():
    """(batch, static parameters, refresh, sink_blocks) of the kernels below (the sink ones
    and the plain ones they are compared with), for precompiling."""
    out = set()
    for B, lens, S, Hkv, g, D, dt, bs, local, sink, refresh in SINK_CASES:
        nb = -(-S // bs)
        static = (nb, Hkv, g, D, bs, 0.1, 16, local, sel.default_max_selected(nb, 0.1, 16), dt,
                  I32)
        out |= {(B,) + static + (refresh, sink), (B,) + static + (False, 0)}
    return sorted(out, key=str)


@pytest.mark.parametrize("case", SINK_CASES, ids=lambda c: (
    f"B{c[0]}-S{c[2]}-h{c[3]}-g{c[4]}-d{c[5]}-bs{c[7]}-loc{c[8]}-sink{c[9]}-refresh{c[10]}"))
def test_select_blocks_sink_blocks(case):
    """sink_blocks: the first blocks are kept like the local ones, inside the budget; everything
    else as without sinks (checked against the torch reference), with and without the refresh."""
    B, lens, S, Hkv, g, D, dt, bs, local, sink, refresh = case
    nb = -(-S // bs)
    K = sel.default_max_selected(nb, 0.1, 16)
    torch.manual_seed(31)
    sl = _lens(lens)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    kmin, kmax = _random_summaries(B, nb, Hkv, D, dt, seed=32)
    k = torch.randn(B, S, Hkv, D, device=_dev()).to(dt) if refresh else None
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=local,
              max_selected=K, sink_blocks=sink)
    ref_min, ref_max = kmin.clone(), kmax.clone()
    ref = sel.select_blocks_reference(q, ref_min, ref_max, sl, k_cache=k, **kw)
    out = torch.full((B, Hkv, K), 0x7FFFFFFF, dtype=torch.int32, device=_dev())   # poisoned
    got_min, got_max = kmin.clone(), kmax.clone()
    kc.select_blocks(q, got_min, got_max, sl, k_cache=k, out=out, **kw)
    differing = check_selection(out, q, kmin, kmax, sl, ref=ref, **kw)
    assert differing <= max(1, B * Hkv // 8), f"{differing} rows differ from torch.topk"
    assert torch.equal(got_min, ref_min) and torch.equal(got_max, ref_max)
    plain = kc.select_blocks(q, kmin.clone(), kmax.clone(), sl,
                                       **{**kw, "sink_blocks": 0})
    assert not torch.equal(plain, out), "the cases must make the sink blocks matter"
    via_op = ops.select_blocks(q, kmin.clone(), kmax.clone(), sl, k_cache=k, backend="tilelang",
                               **kw)
    assert torch.equal(via_op, out)


GRAPH_NB = 2048


def test_select_blocks_cuda_graph_and_no_recompile():
    B, Hkv, g, D, bs, dt = 3, 4, 7, 128, 16, BF16
    S = GRAPH_NB * bs
    K = sel.default_max_selected(GRAPH_NB, 0.1, 16)
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=1, max_selected=K)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    kmin, kmax = _random_summaries(B, GRAPH_NB, Hkv, D, dt, seed=7)
    sl = _lens([S, 17, 1000])
    ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)          # warm-up
    misses = sel.compile_kernel.cache_info().misses
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)
    for step, lens in enumerate([[5000, 1, 32768], [16, 15, 4103], [32767, 2048, 9]]):
        q.copy_(torch.randn_like(q, dtype=torch.float32).to(dt))
        new_min, new_max = _random_summaries(B, GRAPH_NB, Hkv, D, dt, seed=10 + step)
        kmin.copy_(new_min)
        kmax.copy_(new_max)
        sl.copy_(_lens(lens))
        out.fill_(0x7FFFFFFF)
        graph.replay()
        ref = sel.select_blocks_reference(q, kmin, kmax, sl, **kw)
        check_selection(out, q, kmin, kmax, sl, ref=ref, **kw)
        # eager calls with other lengths: no recompilation
        ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)
    torch.cuda.synchronize()
    assert sel.compile_kernel.cache_info().misses == misses, "recompiled"


def test_select_blocks_end_to_end_from_keys():
    """Summaries built by the kernel from real keys, then selection: same as the reference
    chain."""
    B, S, Hkv, g, D, bs, dt = 3, 8192, 4, 7, 128, 16, BF16
    torch.manual_seed(8)
    k = torch.randn(B, S, Hkv, D, device=_dev()).to(dt)
    q = torch.randn(B, Hkv * g, D, device=_dev()).to(dt)
    sl = _lens([S, 4103, 17])
    kmin, kmax = ops.block_summaries(k, sl, bs, backend="tilelang")
    K = sel.default_max_selected(S // bs, 0.1, 16)
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=1, max_selected=K)
    out = ops.select_blocks(q, kmin, kmax, sl, backend="tilelang", **kw)
    rmin, rmax = summ.block_summaries_reference(k, sl, bs)
    ref = ops.select_blocks(q, rmin, rmax, sl, backend="torch", **kw)
    check_selection(out, q, kmin, kmax, sl, ref=ref, **kw)


def test_unsupported_shapes_raise_before_launch():
    dev = _dev()
    q = torch.randn(1, 4, 96, device=dev, dtype=BF16)
    kmin = torch.randn(1, 8, 2, 96, device=dev, dtype=BF16)
    with pytest.raises(ValueError, match="head_dim"):
        kc.select_blocks(q, kmin, kmin, _lens([100]), block_size=16, sparse_ratio=0.1,
                                   min_blocks=16, local_blocks=1, max_selected=16)
    k = torch.randn(1, 64, 2, 36, device=dev, dtype=BF16)
    with pytest.raises(ValueError, match="head_dim"):
        kc.block_summaries(k, _lens([10]), 16)
