"""GPU correctness of the TileLang dense_decode kernel (resa_tl/kernels/dense_decode.py)
against the fp32 torch reference.

Every case: fresh random inputs (keys/values past each row's length are set to large values,
so a masking bug shows), the output buffer poisoned with NaN before the call, tolerance from
tests/tolerance.py (kernel error vs fp32 <= 2 x the error of the same torch math in q.dtype).

Before this file's first test, the trip-count hang probe (gpu_helpers.trip_count_probe, shared
with test_sparse_decode_gpu.py, which reports its result in test_trip_counts_0_1_2_no_hang)
runs once per test process; if it hung, the tests here are skipped instead of hanging the
session. Dense decoding is also checked against sparse decoding at full density and in one CUDA
graph with it, in test_sparse_decode_gpu.py.

``KERNEL_SPECS`` lists the static kernels this file's tests use, so a script can pre-compile
them into the TileLang disk cache (benchmarks/bench_decode_kernels.py --precompile)."""
import pytest

from gpu_helpers import (BF16, F16, I32, I64, _check, _gen, _inputs, _lengths, _poisoned,
                         probe_hung, trip_count_probe)

from kernel_calls import dense_decode as dense_decode_tilelang
from resa_tl.kernels.dense_decode import dense_decode_reference

pytestmark = pytest.mark.gpu

# (g, Hkv, D, dtype, lengths dtype, [lengths, ...])
DENSE_CASES = [
    (7, 4, 128, BF16, I32, [[1], [15], [16], [17], [1000], [4103], [65536], [17, 4103, 1000],
                            "rand8"]),
    (1, 8, 64, F16, I32, [[1, 15, 16], [17, 1000, 4103]]),
    (6, 2, 128, F16, I32, [[63, 64, 65], "rand8"]),
    (8, 1, 64, BF16, I32, [[1, 4103, 65536]]),
    (2, 4, 128, BF16, I64, [[1, 17, 1000]]),
    (4, 2, 64, F16, I32, ["rand8"]),
]


def KERNEL_SPECS():
    """(op, H, Hkv, D, Dv, block_size, dtype name, index dtype name, lengths dtype name,
    schedule), as in test_sparse_decode_gpu.py's."""
    name = {F16: "float16", BF16: "bfloat16", I32: "int32", I64: "int64"}
    return [("dense", g * h, h, d, d, None, name[dt], None, name[lt], None)
            for g, h, d, dt, lt, _ in DENSE_CASES]


# ------------------------------------------------------------------------------------------
# Hang probe (gpu_helpers): runs before this file's first test
# ------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _trip_count_probe_first():
    trip_count_probe()                     # runs once per process, then returns its result


@pytest.fixture(autouse=True)
def _skip_after_hang():
    if probe_hung():
        pytest.skip("the decode kernels hung in the trip-count probe")


# ------------------------------------------------------------------------------------------
# dense_decode
# ------------------------------------------------------------------------------------------

def _dense_params():
    for case in DENSE_CASES:
        g, Hkv, D, dt, lt, runs = case
        for lens in runs:
            yield pytest.param(g, Hkv, D, dt, lt, lens,
                               id=f"g{g}-hkv{Hkv}-d{D}-{str(dt)[6:]}-{str(lt)[6:]}-"
                                  f"{lens if isinstance(lens, str) else '_'.join(map(str, lens))}")


@pytest.mark.parametrize("g,Hkv,D,dtype,len_dtype,lens", list(_dense_params()))
def test_dense_decode(g, Hkv, D, dtype, len_dtype, lens):
    gen = _gen("dense", g, Hkv, D, dtype, lens)
    lens = _lengths(lens, gen)
    B, H = len(lens), g * Hkv
    S = max(lens) + 5
    q, k, v, L = _inputs(B, S, H, Hkv, D, dtype, lens, len_dtype, gen)
    for ns in (None, 3):
        out = _poisoned(B, H, D, dtype)
        dense_decode_tilelang(q, k, v, L, softmax_scale=D ** -0.5, out=out, num_splits=ns)
        _check(out, q, lambda cd: dense_decode_reference(q, k, v, L, softmax_scale=D ** -0.5,
                                                         compute_dtype=cd), f"dense ns={ns}")


def test_dense_zero_length_row():
    gen = _gen("dense-zero")
    q, k, v, L = _inputs(2, 300, 8, 2, 64, F16, [0, 300], I32, gen)
    out = _poisoned(2, 8, 64, F16)
    dense_decode_tilelang(q, k, v, L, softmax_scale=0.125, out=out)
    assert out[0].abs().max().item() == 0
    _check(out, q, lambda cd: dense_decode_reference(q, k, v, L, softmax_scale=0.125,
                                                     compute_dtype=cd), "dense len 0")
