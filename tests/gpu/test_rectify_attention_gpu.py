"""GPU correctness of the TileLang rectify_attention kernel (resa_tl/kernels/rectify_attention.py)
against the fp32 torch reference.

Every case: fresh random inputs, keys/values past each row's length set to large values (so a
masking bug shows), the output buffer poisoned with NaN before the call, tolerance from
tests/tolerance.py (kernel error vs fp32 <= 2 x the error of the same torch math in q.dtype).

The kernels compile once per static spec (T, g, Hkv, D, Dv, dtype, scale, config);
``KERNEL_SPECS`` lists them so a script can pre-compile them in parallel into the TileLang
disk cache (benchmarks/bench_rectify_kernel.py --precompile-tests).

test_rectify_t1_equals_dense_decode compares T = 1 with the dense decode torch reference."""
import dataclasses
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tolerance import assert_close_to_reference  # noqa: E402

from resa_tl import ops  # noqa: E402
from resa_tl.kernels.dense_decode import dense_decode_reference  # noqa: E402
from kernel_calls import rectify_attention as rectify_attention_tilelang  # noqa: E402
from resa_tl.kernels.rectify_attention import (  # noqa: E402
    RectifyConfig, rectify_attention_reference)

pytestmark = pytest.mark.gpu

F16, BF16 = torch.float16, torch.bfloat16

# (T, g, Hkv, D, Dv, dtype, scale or None, [(lengths, num_splits or None), ...])
CASES = [
    (33, 7, 4, 128, 128, BF16, None, [([33], None), ([34], None), ([1000], None),
                                      ([4103], None), ([65536], None),
                                      ([33, 4103, 1000], None), ([33, 4103, 1000], 1),
                                      ([33, 4103, 1000], 3), ([34, 40, 1000], 16),
                                      ([33, 4103], 19), ("rand8", None)]),
    (1, 1, 2, 64, 64, F16, None, [([1], None), ([2], None), ([1, 17, 1000], None),
                                  ([1, 16, 15], 4)]),
    (2, 8, 1, 128, 128, F16, None, [([2, 3, 4103], None), ([2], 7)]),
    (17, 6, 2, 64, 64, BF16, None, [([17, 18, 1000], None), ([4103], None)]),
    (64, 8, 2, 128, 128, BF16, None, [([64], None), ([65], None), ([64, 4103, 1000], None),
                                      ([65536], None), ([64, 65, 200], 5)]),
    (64, 1, 2, 64, 64, F16, None, [([64, 65, 1000], None)]),
    (17, 2, 4, 128, 128, F16, None, [("rand8", None)]),
    (33, 4, 2, 64, 64, F16, 0.3, [([33, 34, 4103], None)]),
    (32, 7, 4, 128, 128, F16, None, [([32, 33, 4103], None), ([65536], None)]),
    (1, 7, 4, 128, 128, BF16, None, [("rand8", None)]),
    (17, 4, 2, 128, 64, BF16, None, [([17, 1000, 4103], None)]),
    (2, 6, 2, 128, 128, BF16, None, [([2], None), ([3], None)]),
]
# Cases run with both sm_90a schedules ("auto" and "pingpong"; > 64 rows per KV head): the
# heuristic default plus the other one.
BOTH_SCHEDULE_CASES = [CASES[0], CASES[4], CASES[8], CASES[10]]


def _arch():
    from resa_tl import heuristics
    return heuristics.arch_of(torch.device("cuda"))


def _pingpong_ok(T, g, arch):
    return arch.startswith("sm_9") and T * g > 64


def _other_schedule(T, g, D, Dv, arch):
    from resa_tl import heuristics
    return "auto" if heuristics.rectify_config(T, g, D, arch).schedule == "pingpong" \
        else "pingpong"


def _config(T, g, D, Dv, arch, schedule):
    from resa_tl import heuristics
    cfg = heuristics.rectify_config(T, g, D, arch)
    if schedule is not None and schedule != cfg.schedule:
        cfg = dataclasses.replace(cfg, schedule=schedule, block_M=128, threads=256,
                                  num_stages=max(cfg.num_stages, 2))
    return cfg


def KERNEL_SPECS(arch):
    """Static specs compiled by this file: (T, g, Hkv, D, Dv, dtype, scale, config, arch)."""
    specs = []
    for T, g, Hkv, D, Dv, dt, scale, _ in CASES:
        sc = D ** -0.5 if scale is None else scale
        specs.append((T, g, Hkv, D, Dv, _dts(dt), sc, _config(T, g, D, Dv, arch, None), arch))
    for T, g, Hkv, D, Dv, dt, scale, _ in BOTH_SCHEDULE_CASES:
        if _pingpong_ok(T, g, arch):
            sc = D ** -0.5 if scale is None else scale
            specs.append((T, g, Hkv, D, Dv, _dts(dt), sc,
                          _config(T, g, D, Dv, arch, _other_schedule(T, g, D, Dv, arch)), arch))
    return list(dict.fromkeys(specs))


def _dts(dt):
    return {F16: "float16", BF16: "bfloat16"}[dt]


def _inputs(B, T, g, Hkv, D, Dv, dtype, lens, seed, len_dtype=torch.int32, pad=37):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    S = max(lens) + pad
    H = g * Hkv
    q = torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(B, S, Hkv, Dv, device="cuda", dtype=dtype, generator=gen)
    for b, L in enumerate(lens):          # never attended: large values expose masking bugs
        k[b, L:] = 60.0
        v[b, L:] = 1000.0
    cl = torch.tensor(lens, device="cuda", dtype=len_dtype)
    return q, k, v, cl


def _lens(spec, T, seed):
    if spec == "rand8":
        g = torch.Generator().manual_seed(seed)
        return [int(x) for x in torch.randint(T, 3000, (8,), generator=g)]
    return list(spec)


def _check(T, g, Hkv, D, Dv, dtype, scale, lens_spec, num_splits, schedule, seed):
    arch = _arch()
    lens = _lens(lens_spec, T, seed)
    B = len(lens)
    sc = D ** -0.5 if scale is None else scale
    q, k, v, cl = _inputs(B, T, g, Hkv, D, Dv, dtype, lens, seed,
                          len_dtype=torch.int64 if seed % 2 else torch.int32)
    out = torch.full((B, T, g * Hkv, Dv), float("nan"), device="cuda", dtype=dtype)
    cfg = _config(T, g, D, Dv, arch, schedule)
    res = rectify_attention_tilelang(q, k, v, cl, softmax_scale=sc, out=out, config=cfg,
                                     num_splits=num_splits)
    assert res is out
    ref = rectify_attention_reference(q, k, v, cl, softmax_scale=sc)
    low = rectify_attention_reference(q, k, v, cl, softmax_scale=sc, compute_dtype=dtype)
    torch.cuda.synchronize()
    assert_close_to_reference(out, ref, low, name=f"rectify T={T} g={g} lens={lens[:4]} "
                                                  f"splits={num_splits} {schedule or 'default'}")
    return q, k, v, cl, out


def _ids(cases):
    out = []
    for T, g, Hkv, D, Dv, dt, scale, lens in cases:
        for lspec, ns in lens:
            name = lspec if isinstance(lspec, str) else "-".join(map(str, lspec))
            out.append((T, g, Hkv, D, Dv, dt, scale, lspec, ns,
                        f"T{T}-g{g}-h{Hkv}-d{D}x{Dv}-{_dts(dt)}-L{name}-ns{ns}"))
    return out


_FLAT = _ids(CASES)


@pytest.mark.parametrize("case", _FLAT, ids=[c[-1] for c in _FLAT])
def test_rectify_matches_reference(case):
    T, g, Hkv, D, Dv, dt, scale, lspec, ns, _ = case
    _check(T, g, Hkv, D, Dv, dt, scale, lspec, ns, None, seed=zlib.crc32(case[-1].encode()) % 1000)


_FLAT_2 = _ids(BOTH_SCHEDULE_CASES)


@pytest.mark.parametrize("case", _FLAT_2, ids=[c[-1] for c in _FLAT_2])
def test_rectify_other_schedule_matches_reference(case):
    T, g, Hkv, D, Dv, dt, scale, lspec, ns, _ = case
    arch = _arch()
    if not _pingpong_ok(T, g, arch):
        pytest.skip("the second (pingpong) schedule needs sm_90a and T*g > 64")
    _check(T, g, Hkv, D, Dv, dt, scale, lspec, ns, _other_schedule(T, g, D, Dv, arch),
           seed=zlib.crc32(case[-1].encode()) % 1000 + 1)


def test_rectify_t1_equals_dense_decode():
    """T = 1 is one decode step: same result as dense decoding over the whole cache."""
    lens = [1, 700, 4103]
    q, k, v, cl = _inputs(3, 1, 7, 4, 128, 128, BF16, lens, seed=5)
    out = rectify_attention_tilelang(q, k, v, cl, softmax_scale=128 ** -0.5)
    ref = dense_decode_reference(q[:, 0], k, v, cl, softmax_scale=128 ** -0.5)
    low = dense_decode_reference(q[:, 0], k, v, cl, softmax_scale=128 ** -0.5,
                                 compute_dtype=BF16)
    assert_close_to_reference(out[:, 0], ref, low, name="rectify T=1 vs dense decode")


def test_ops_dispatch_tilelang():
    lens = [40, 1000]
    q, k, v, cl = _inputs(2, 33, 7, 4, 128, 128, BF16, lens, seed=9)
    out = ops.rectify_attention(q, k, v, cl, backend="tilelang")
    ref = rectify_attention_reference(q, k, v, cl, softmax_scale=128 ** -0.5)
    low = rectify_attention_reference(q, k, v, cl, softmax_scale=128 ** -0.5,
                                      compute_dtype=BF16)
    assert out.dtype == BF16 and out.shape == q.shape
    assert_close_to_reference(out, ref, low, name="ops.rectify_attention(backend='tilelang')")


def test_non_contiguous_q():
    """q as a slice of a wider tensor (e.g. a fused qkv projection) is accepted."""
    lens = [100, 2000]
    q, k, v, cl = _inputs(2, 17, 2, 4, 128, 128, F16, lens, seed=11)
    wide = torch.randn(2, 17, 16, 128, device="cuda", dtype=F16)
    wide[:, :, 4:12] = q
    qv = wide[:, :, 4:12]
    assert not qv.is_contiguous()
    out = rectify_attention_tilelang(qv, k, v, cl, softmax_scale=128 ** -0.5)
    ref = rectify_attention_reference(q, k, v, cl, softmax_scale=128 ** -0.5)
    low = rectify_attention_reference(q, k, v, cl, softmax_scale=128 ** -0.5, compute_dtype=F16)
    assert_close_to_reference(out, ref, low, name="non-contiguous q")


@pytest.mark.parametrize("schedule", [None, "other"])
def test_cuda_graph_capture_replay(schedule):
    """Capture after one warm-up call, replay with new data and new lengths in the same buffers."""
    if schedule == "other":
        if not _pingpong_ok(33, 7, _arch()):
            pytest.skip("the second (pingpong) schedule needs sm_90a")
        schedule = _other_schedule(33, 7, 128, 128, _arch())
    T, g, Hkv, D = 33, 7, 4, 128
    cfg = _config(T, g, D, D, _arch(), schedule)
    q, k, v, cl = _inputs(2, T, g, Hkv, D, D, BF16, [4000, 300], seed=21, pad=300)
    out = torch.empty(2, T, g * Hkv, D, device="cuda", dtype=BF16)
    sc = D ** -0.5
    rectify_attention_tilelang(q, k, v, cl, softmax_scale=sc, out=out, config=cfg)   # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rectify_attention_tilelang(q, k, v, cl, softmax_scale=sc, out=out, config=cfg)
    q2, k2, v2, cl2 = _inputs(2, T, g, Hkv, D, D, BF16, [4100, 1000], seed=22, pad=200)
    q.copy_(q2)
    k.copy_(k2)
    v.copy_(v2)
    cl.copy_(cl2)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    ref = rectify_attention_reference(q, k, v, cl, softmax_scale=sc)
    low = rectify_attention_reference(q, k, v, cl, softmax_scale=sc, compute_dtype=BF16)
    assert_close_to_reference(out, ref, low, name=f"graph replay ({schedule or 'default'})")


def test_rejects_long_chunk_before_launch():
    q = torch.randn(1, 65, 8, 128, device="cuda", dtype=BF16)
    k = torch.randn(1, 100, 2, 128, device="cuda", dtype=BF16)
    with pytest.raises(ValueError, match="T <= 64"):
        rectify_attention_tilelang(q, k, k, torch.tensor([100], device="cuda"),
                                   softmax_scale=0.1)


def test_pingpong_config_validation():
    with pytest.raises(ValueError):
        RectifyConfig(block_M=64, block_N=64, num_stages=2, threads=128, schedule="pingpong")
