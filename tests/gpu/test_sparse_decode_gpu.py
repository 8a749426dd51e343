"""GPU correctness of the TileLang sparse_decode kernel (resa_tl/kernels/sparse_decode.py)
against the fp32 torch reference.

Every case: fresh random inputs (keys/values past each row's length are set to large values,
so a masking bug shows), the output buffer poisoned with NaN before the call, tolerance from
tests/tolerance.py (kernel error vs fp32 <= 2 x the error of the same torch math in q.dtype).

Before this file's first test, the trip-count hang probe (gpu_helpers.trip_count_probe: the
sparse and dense loops with 0, 1 and 2 iterations per split, in a subprocess with a timeout;
warp-specialised loops with one iteration hung on Hopper in tile-ai/tilelang#2566) runs, once per
test process (test_dense_decode_gpu.py shares it); test_trip_counts_0_1_2_no_hang reports its
result, and if it hung, the other tests are skipped instead of hanging the session.

Tests here that also run dense_decode: test_sparse_full_density_equals_dense (full density ==
dense) and test_cuda_graph_replay (both kernels in one CUDA graph).

``KERNEL_SPECS`` lists the static kernels this file's tests use (the sparse ones, plus the one
dense kernel of the two tests above; test_dense_decode_gpu.py lists the dense ones), so a script
can pre-compile them into the TileLang disk cache (benchmarks/bench_decode_kernels.py
--precompile)."""
import pytest
import torch

from gpu_helpers import (BF16, F16, I32, I64, _check, _gen, _inputs, _lengths, _poisoned,
                         probe_hung, trip_count_probe)

from resa_tl import ops
from kernel_calls import dense_decode as dense_decode_tilelang
from kernel_calls import sparse_decode as sparse_decode_tilelang
from resa_tl.kernels.dense_decode import dense_decode_reference
from resa_tl.kernels.select_blocks import blocks_to_keep
from resa_tl.kernels.sparse_decode import sparse_decode_reference

pytestmark = pytest.mark.gpu

# sparse: (g, Hkv, D, dtype, block_size, index dtype, lengths dtype, [(lengths, K or None), ...])
# K None: the selection formula's n for the cache capacity (select_blocks' default width)
SPARSE_CASES = [
    (7, 4, 128, BF16, 16, I32, I32, [([1], None), ([15], None), ([16], None), ([17], None),
                                     ([1000], None), ([4103], None), ([65536], None),
                                     ([17, 4103, 1000], None), ("rand8", None)]),
    (1, 8, 64, F16, 16, I32, I32, [([1, 15, 16], None), ([17, 1000, 4103], None)]),
    (2, 2, 128, F16, 32, I32, I32, [([1, 4103, 1000], None), ("rand8", None)]),
    (4, 2, 64, BF16, 64, I32, I32, [([1, 65, 4103], None), ([65536], None)]),
    (6, 2, 128, BF16, 16, I32, I32, [([15, 17, 4103], None), ("rand8", None)]),
    (8, 1, 64, F16, 128, I32, I32, [([1, 129, 4103], None)]),
    (7, 4, 128, F16, 16, I64, I64, [([17, 4103, 1000], None)]),
]

# cases also run with the other sm_90a schedule (see SparseDecodeConfig.schedule)
OTHER_SCHEDULE_CASES = (0, 2, 3, 5, 6)


def KERNEL_SPECS():
    """(op, H, Hkv, D, Dv, block_size, dtype name, index dtype name, lengths dtype name,
    schedule: None = the heuristic's, "other" = the other sm_90a schedule)."""
    name = {F16: "float16", BF16: "bfloat16", I32: "int32", I64: "int64"}
    out = [("sparse", g * h, h, d, d, bs, name[dt], name[it], name[lt], None)
           for g, h, d, dt, bs, it, lt, _ in SPARSE_CASES]
    out += [("sparse", g * h, h, d, d, bs, name[dt], name[it], name[lt], "other")
            for ci, (g, h, d, dt, bs, it, lt, _) in enumerate(SPARSE_CASES)
            if ci in OTHER_SCHEDULE_CASES]
    out.append(("sparse", 28, 4, 128, 128, 64, "bfloat16", "int32", "int32", None))  # full density
    # the dense kernel of test_sparse_full_density_equals_dense / test_cuda_graph_replay (also
    # among test_dense_decode_gpu.py's)
    out.append(("dense", 28, 4, 128, 128, None, "bfloat16", None, "int32", None))
    return out


def _kept(nb):
    """Blocks kept by the selection formula (ratio 0.1, at least min(NB, 16))."""
    return blocks_to_keep(nb, 0.1, 16)


def _indices(lens, Hkv, bs, K, gen, mode="sorted"):
    """[B, Hkv, K]: distinct valid blocks of each row (always its last one), ascending, then
    -1 padding (mode "sorted"); "scatter": the same ids with -1 anywhere, in random order."""
    B = len(lens)
    idx = torch.full((B, Hkv, K), -1, dtype=torch.int64)
    cg = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen,
                                                         device="cuda").item()))
    for b, L in enumerate(lens):
        nb = -(-L // bs)
        n = min(K, _kept(nb))
        for h in range(Hkv):
            if nb == 0:
                continue
            rest = torch.randperm(max(nb - 1, 0), generator=cg)[:max(n - 1, 0)]
            sel = torch.cat([rest, torch.tensor([nb - 1])]).sort().values
            row = torch.full((K,), -1, dtype=torch.int64)
            if mode == "scatter":
                slots = torch.randperm(K, generator=cg)[:sel.numel()]
                row[slots] = sel[torch.randperm(sel.numel(), generator=cg)]
            else:
                row[:sel.numel()] = sel
            idx[b, h] = row
    return idx.cuda()


# ------------------------------------------------------------------------------------------
# Hang probe (gpu_helpers): runs before this file's first test; reported by the test below
# ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _trip_count_probe_first():
    trip_count_probe()                     # runs once per process, then returns its result


@pytest.fixture(autouse=True)
def _skip_after_hang(request):
    if request.node.name != "test_trip_counts_0_1_2_no_hang" and probe_hung():
        pytest.skip("the decode kernels hung in the trip-count probe")


def test_trip_counts_0_1_2_no_hang():
    failed, message = trip_count_probe()
    if failed:
        pytest.fail(message)


# ------------------------------------------------------------------------------------------
# sparse_decode
# ------------------------------------------------------------------------------------------

def _arch():
    from resa_tl import heuristics
    return heuristics.arch_of(torch.device("cuda"))


def _sparse_config(g, Hkv, D, dtype, bs, schedule):
    import dataclasses
    from resa_tl import heuristics
    cfg = heuristics.sparse_decode_config(bs, _arch())
    if schedule == "other":
        cfg = dataclasses.replace(cfg, schedule="auto" if cfg.schedule == "ws" else "ws")
    return cfg


def _sparse_params():
    for ci, case in enumerate(SPARSE_CASES):
        g, Hkv, D, dt, bs, it, lt, runs = case
        for sched in ("default", "other") if ci in OTHER_SCHEDULE_CASES else ("default",):
            for lens, K in runs:
                yield pytest.param(
                    g, Hkv, D, dt, bs, it, lt, lens, K, sched,
                    id=f"g{g}-hkv{Hkv}-d{D}-{str(dt)[6:]}-bs{bs}-{str(it)[6:]}-{sched}-"
                       f"{lens if isinstance(lens, str) else '_'.join(map(str, lens))}")


@pytest.mark.parametrize("g,Hkv,D,dtype,bs,idx_dtype,len_dtype,lens,K,schedule",
                         list(_sparse_params()))
def test_sparse_decode(g, Hkv, D, dtype, bs, idx_dtype, len_dtype, lens, K, schedule):
    if schedule == "other" and not _arch().startswith("sm_9"):
        pytest.skip("the 'ws' schedule is sm_90a only")
    cfg = _sparse_config(g, Hkv, D, dtype, bs, schedule)
    gen = _gen("sparse", g, Hkv, D, dtype, bs, lens)
    lens = _lengths(lens, gen)
    B, H = len(lens), g * Hkv
    S = max(lens) + 37                                       # capacity > lengths, not aligned
    q, k, v, L = _inputs(B, S, H, Hkv, D, dtype, lens, len_dtype, gen)
    nb_cap = -(-S // bs)
    K = K or _kept(nb_cap)
    modes = ["sorted", "scatter"] if B > 1 or lens[0] > 1000 else ["sorted"]
    for mode in modes:
        idx = _indices(lens, Hkv, bs, K, gen, mode).to(idx_dtype)
        out = _poisoned(B, H, D, dtype)
        sparse_decode_tilelang(q, k, v, idx, L, block_size=bs, softmax_scale=D ** -0.5, out=out,
                               config=cfg)
        _check(out, q, lambda cd: sparse_decode_reference(
            q, k, v, idx, L, block_size=bs, softmax_scale=D ** -0.5, compute_dtype=cd),
            f"sparse {cfg.schedule} {mode}")


def test_sparse_padding_and_empty_rows():
    """Trailing -1 padding much wider than the selection, rows with no block at all (zeros,
    not NaN), a row of length 0, and a custom softmax scale through resa_tl.ops."""
    gen = _gen("sparse-pad")
    H, Hkv, D, bs, dt = 28, 4, 128, 16, BF16
    lens = [4103, 1000, 0, 33]
    S = 8192
    q, k, v, L = _inputs(4, S, H, Hkv, D, dt, lens, I32, gen)
    idx = _indices(lens, Hkv, bs, 400, gen)
    idx[1, 2] = -1                                           # one KV head with no block
    for ns in (None, 1, 7, 100):
        out = _poisoned(4, H, D, dt)
        sparse_decode_tilelang(q, k, v, idx, L, block_size=bs, softmax_scale=0.05, out=out,
                               num_splits=ns)
        _check(out, q, lambda cd: sparse_decode_reference(
            q, k, v, idx, L, block_size=bs, softmax_scale=0.05, compute_dtype=cd), "padded")
        assert out[2].abs().max().item() == 0 and out[1, 14:21].abs().max().item() == 0
    out = ops.sparse_decode(q, k, v, idx, L, block_size=bs, softmax_scale=0.05)
    torch.testing.assert_close(out.float(), sparse_decode_tilelang(
        q, k, v, idx, L, block_size=bs, softmax_scale=0.05).float(), rtol=0, atol=0)


@pytest.mark.parametrize("bs", [16, 64])
def test_sparse_full_density_equals_dense(bs):
    gen = _gen("full", bs)
    H, Hkv, D, dt = 28, 4, 128, BF16
    lens = [17, 4103, 1000]
    S = 4200
    q, k, v, L = _inputs(3, S, H, Hkv, D, dt, lens, I32, gen)
    nb = -(-S // bs)
    idx = torch.arange(nb, device="cuda", dtype=torch.int32)
    idx = idx[None, None].expand(3, Hkv, nb).contiguous()
    idx = torch.where(idx * bs < L[:, None, None], idx, -1)
    out = _poisoned(3, H, D, dt)
    sparse_decode_tilelang(q, k, v, idx, L, block_size=bs, softmax_scale=D ** -0.5, out=out)
    _check(out, q, lambda cd: dense_decode_reference(q, k, v, L, softmax_scale=D ** -0.5,
                                                     compute_dtype=cd), "full density")
    dense = dense_decode_tilelang(q, k, v, L, softmax_scale=D ** -0.5)
    assert (out.float() - dense.float()).abs().max().item() < 2e-2


# ------------------------------------------------------------------------------------------
# CUDA graphs: capture after one warm-up call, replay with new inputs in the same buffers
# ------------------------------------------------------------------------------------------

def test_cuda_graph_replay():
    gen = _gen("graph")
    H, Hkv, D, bs, dt = 28, 4, 128, 16, BF16
    B, S, K = 3, 8192, 52
    lens = [5000, 8192, 77]
    q, k, v, L = _inputs(B, S, H, Hkv, D, dt, lens, I32, gen)
    idx = _indices(lens, Hkv, bs, K, gen).to(I32)
    scale = D ** -0.5
    # warm-up (compiles, allocates the cached workspaces)
    sparse_decode_tilelang(q, k, v, idx, L, block_size=bs, softmax_scale=scale)
    dense_decode_tilelang(q, k, v, L, softmax_scale=scale)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        o_sparse = sparse_decode_tilelang(q, k, v, idx, L, block_size=bs, softmax_scale=scale)
        o_dense = dense_decode_tilelang(q, k, v, L, softmax_scale=scale)
    for rep in range(2):
        lens2 = [int(x) for x in torch.randint(1, S + 1, (B,), generator=gen,
                                               device="cuda").tolist()]
        q2, k2, v2, L2 = _inputs(B, S, H, Hkv, D, dt, lens2, I32, gen)
        idx2 = _indices(lens2, Hkv, bs, K, gen).to(I32)
        for dst, src in ((q, q2), (k, k2), (v, v2), (L, L2), (idx, idx2)):
            dst.copy_(src)
        o_sparse.fill_(float("nan"))
        o_dense.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(o_sparse, q, lambda cd: sparse_decode_reference(
            q, k, v, idx, L, block_size=bs, softmax_scale=scale, compute_dtype=cd),
            f"graph sparse {rep}")
        _check(o_dense, q, lambda cd: dense_decode_reference(
            q, k, v, L, softmax_scale=scale, compute_dtype=cd), f"graph dense {rep}")
