"""Lower and compile (nvcc, no GPU) the TileLang kernels of block_summaries /
update_block_summaries / select_blocks for sm_80 and sm_90a at representative shapes."""
import re

import pytest
from source_checks import assert_pdl

from resa_tl import heuristics
from resa_tl.kernels import block_summaries as summ
from resa_tl.kernels import select_blocks as sel


def summaries_kernel(hkv, d, bs, dt, it, mode, cfg, arch, summary_dtype=None):
    shape = summ.SummariesShape(hkv, d, bs, dt, it, mode, summary_dtype)
    return summ.compile_kernel(shape, cfg, arch, heuristics.use_pdl(arch))


def select_shape(nb, hkv, g, d, bs, ratio, minb, local, K, dt="bfloat16", it="int32",
                 refresh=False, sink_blocks=0, summary_dtype=None):
    return sel.SelectShape(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, refresh,
                           sink_blocks, summary_dtype)


def select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, cfg, arch, refresh=False,
                  sink_blocks=0, summary_dtype=None):
    shape = select_shape(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, refresh, sink_blocks,
                         summary_dtype)
    return sel.compile_kernel(shape, cfg, arch, heuristics.use_pdl(arch))

pytestmark = pytest.mark.compile

ARCHS = ["sm_80", "sm_90a"]

# (Hkv, D, block_size, dtype, index dtype)
SUMMARY_SHAPES = [
    (4, 128, 16, "bfloat16", "int32"),
    (2, 64, 128, "float16", "int64"),
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SUMMARY_SHAPES, ids=str)
@pytest.mark.parametrize("mode", ["build", "update"])
def test_compile_summaries(arch, shape, mode):
    hkv, d, bs, dt, it = shape
    cfg = heuristics.summaries_config(hkv, d)
    kern = summaries_kernel(hkv, d, bs, dt, it, mode, cfg, arch)
    src = kern.get_kernel_source()
    assert "uint4" in src, "expected 16-byte vector loads of K"
    assert_pdl(src, arch)
    # S_max and NB stay symbolic (kernel arguments), so other caches and lengths reuse it
    assert "int S" in src and "int NB" in src
    if mode == "update":
        assert "int length" in src, "length must be a runtime argument"
    # memoised: same static config -> the same compiled object
    assert summaries_kernel(hkv, d, bs, dt, it, mode, cfg, arch) is kern


# (NB, Hkv, g, D, dtype, index dtype, block_size, ratio, min_blocks, local_blocks)
SELECT_SHAPES = [
    (8192, 4, 7, 128, "bfloat16", "int32", 16, 0.1, 16, 1),     # Qwen2.5-7B at 128K
    (300, 8, 1, 64, "float16", "int64", 16, 0.2, 8, 2),         # MHA-like, d 64, few blocks
    (32768, 2, 6, 128, "float16", "int32", 16, 0.1, 16, 1),     # keys in shared memory
]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SELECT_SHAPES, ids=str)
def test_compile_select_blocks(arch, shape):
    nb, hkv, g, d, dt, it, bs, ratio, minb, local = shape
    if arch == "sm_80" and nb == 32768:
        pytest.skip("one arch is enough for the shared-memory variant (CI time)")
    K = sel.default_max_selected(nb, ratio, minb)
    cfg = heuristics.selection_config(nb, hkv, d)
    kern = select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, cfg,
                                          arch)
    src = kern.get_kernel_source()
    assert "__match_any_sync" in src, "warp-aggregated histogram expected"
    assert "uint4" in src, "16-byte loads of kmin/kmax expected"
    assert src.count("__global__ void __launch_bounds__") == 2, "scoring + select kernels"
    assert_pdl(src, arch)
    # the exact-integer ratio: ceil(NB * num / 1e6) appears as int64 arithmetic on the lengths
    assert "int64_t" in src
    assert select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, cfg,
                                          arch) is kern


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("shape", SELECT_SHAPES[:2], ids=str)
def test_compile_select_blocks_refresh(arch, shape):
    """The variant that also rewrites the newest block's summary: K cache as a 7th argument
    (S_max symbolic), kmin/kmax stored to, and refresh=False still compiles the plain kernel."""
    nb, hkv, g, d, dt, it, bs, ratio, minb, local = shape
    K = sel.default_max_selected(nb, ratio, minb)
    cfg = heuristics.selection_config(nb, hkv, d)
    kern = select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, cfg,
                                          arch, True)
    src = kern.get_kernel_source()
    assert src.count("__global__ void __launch_bounds__") == 2
    assert "int S" in src, "S_max of the K cache must stay symbolic"
    writable = re.compile(r"(?<!const )(half_t|bfloat16_t)\* (__restrict__ )?Km(in|ax)\b")
    assert len(writable.findall(src)) >= 2, "the select kernel must store kmin and kmax"
    assert_pdl(src, arch)
    plain = select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it, cfg,
                                           arch, False)
    assert plain is not kern and "int S" not in plain.get_kernel_source()
    assert not writable.findall(plain.get_kernel_source()), "plain select writes no summaries"


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_select_blocks_sink(arch):
    """sink_blocks > 0 compiles (plain and refresh), and sink_blocks = 0 builds exactly the
    program without sinks, so existing compiled kernels and tuned entries stay valid."""
    nb, hkv, g, d, dt, it, bs, ratio, minb, local = SELECT_SHAPES[0]
    K = sel.default_max_selected(nb, ratio, minb)
    cfg = heuristics.selection_config(nb, hkv, d)
    for refresh in (False, True):
        kern = select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it,
                                              cfg, arch, refresh, 2)
        assert kern.get_kernel_source().count("__global__ void __launch_bounds__") == 2
    args = (nb, hkv, g, d, bs, ratio, minb, local, K, dt, it)
    plain = sel.program(select_shape(*args), cfg).script()
    assert sel.program(select_shape(*args, sink_blocks=0), cfg).script() == plain
    assert sel.program(select_shape(*args, sink_blocks=2), cfg).script() != plain


def test_compile_select_blocks_refresh_without_prefetch():
    """Fewer select threads than head_dim: the refresh loads and reduces up front (a column
    loop) instead of prefetching one column per thread."""
    cfg = sel.SelectionConfig(select_threads=128)
    kern = select_kernel(300, 2, 2, 256, 16, 0.1, 16, 1, 30, "float16", "int32",
                                          cfg, "sm_90a", True)
    src = kern.get_kernel_source()
    assert src.count("__global__ void __launch_bounds__") == 2 and "int S" in src


def test_select_program_rejects_unsupported_shapes():
    cfg = sel.SelectionConfig()
    with pytest.raises(ValueError, match="head_dim"):
        sel.program(select_shape(64, 2, 2, 96, 16, 0.1, 16, 1, 16), cfg)
    with pytest.raises(ValueError, match="blocks"):
        sel.program(select_shape(200000, 2, 2, 128, 16, 0.1, 16, 1, 16), cfg)
    with pytest.raises(ValueError, match="blocks per row"):
        sel.check_config(select_shape(200000, 2, 2, 128, 16, 0.1, 16, 1, 16), cfg)
    with pytest.raises(ValueError, match="head_dim"):
        summ.program(summ.SummariesShape(2, 36, 16), summ.SummariesConfig())
    with pytest.raises(ValueError, match="local_blocks >= 1"):
        sel.program(select_shape(64, 2, 2, 64, 16, 0.1, 16, 0, 16, refresh=True), cfg)


def test_heuristics_are_sane():
    for nb in (1, 64, 1000, 8192, 16384, 65536):
        cfg = heuristics.selection_config(nb, 4, 128)
        assert 128 <= cfg.select_threads <= 1024 and cfg.select_threads % 32 == 0
        assert cfg.score_rows_per_cta >= 1
    assert heuristics.selection_config(16384, 4, 128).select_threads == 1024
    assert heuristics.summaries_config(4, 128).blocks_per_cta == 4
    assert heuristics.summaries_config(32, 128).blocks_per_cta == 1


FP8_NAMES = ["float8_e4m3fn", "float8_e5m2"]
# the fp32 bits an fp8 mantissa keeps (3 / 2 of 23): the outward rounding masks with these
_ROUND_MASK = {"float8_e4m3fn": 0xFFF00000, "float8_e5m2": 0xFFE00000}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sdt", FP8_NAMES)
def test_compile_fp8_summaries(arch, sdt):
    """fp8 summaries (ReSAConfig.summary_dtype): build/update store fp8 kmin/kmax, the select
    kernel (with the refresh) reads them 16 per 16-byte load and stores the refreshed block;
    the default (None) builds exactly the fp16/bf16 program, so compiled kernels stay valid."""
    hkv, d, bs, dt, it = SUMMARY_SHAPES[0]
    cfg = heuristics.summaries_config(hkv, d)
    fp8_ptr = re.compile(r"(?<!const )fp8_e[45]_t\* (__restrict__ )?Km(in|ax)\b")
    for mode in ("build", "update"):
        src = summaries_kernel(hkv, d, bs, dt, it, mode, cfg, arch, sdt).get_kernel_source()
        assert len(fp8_ptr.findall(src)) >= 2, "kmin and kmax must be fp8 outputs"
        assert str(_ROUND_MASK[sdt]) in src, "outward rounding (fp32 mantissa mask) expected"
        assert "uint4" in src, "16-byte loads of K expected"
        assert_pdl(src, arch)
    nb, hkv, g, d, dt, it, bs, ratio, minb, local = SELECT_SHAPES[0]
    K = sel.default_max_selected(nb, ratio, minb)
    scfg = heuristics.selection_config_for_summaries(heuristics.selection_config(nb, hkv, d),
                                                     getattr(__import__("torch"), sdt),
                                                     __import__("torch").bfloat16)
    kern = select_kernel(nb, hkv, g, d, bs, ratio, minb, local, K, dt, it,
                                          scfg, arch, True, 0, sdt)
    src = kern.get_kernel_source()
    assert src.count("__global__ void __launch_bounds__") == 2
    assert re.search(r"fp8_e[45]_16_t", src), "16 fp8 summaries per 16-byte load expected"
    assert len(fp8_ptr.findall(src)) >= 2, "the refresh must store fp8 kmin and kmax"
    assert str(_ROUND_MASK[sdt]) in src, "the refresh must round outward"
    assert_pdl(src, arch)


# sha256[:16] of the TIR of the bf16 programs as they were before fp8 summaries existed (commit
# 2062f1b): adding the option must not change them, or every compiled kernel in TileLang's cache
# and every tuned schedule entry would silently stop matching. Update only on purpose.
_TIR_BEFORE_FP8 = {"build": "77d9b828bd396b6f", "update": "18df92456525b43c",
                   "select": "510c0f131a9eeaec", "select+refresh": "bd0aa04e6ba2282c"}


def test_default_summary_dtype_keeps_the_programs():
    import hashlib
    h = lambda prog: hashlib.sha256(prog.script().encode()).hexdigest()[:16]   # noqa: E731
    hkv, d, bs, dt, it = SUMMARY_SHAPES[0]
    for mode in ("build", "update"):
        cfg = summ.SummariesConfig()
        assert h(summ.program(summ.SummariesShape(hkv, d, bs, dt, it, mode), cfg)) == \
            _TIR_BEFORE_FP8[mode]
        assert h(summ.program(summ.SummariesShape(hkv, d, bs, dt, it, mode, dt), cfg)) == \
            _TIR_BEFORE_FP8[mode]
    nb, hkv, g, d, dt, it, bs, ratio, minb, local = SELECT_SHAPES[0]
    args = (nb, hkv, g, d, bs, ratio, minb, local, sel.default_max_selected(nb, ratio, minb), dt,
            it)
    cfg = heuristics.selection_config(nb, hkv, d)
    assert h(sel.program(select_shape(*args), cfg)) == _TIR_BEFORE_FP8["select"]
    assert h(sel.program(select_shape(*args, refresh=True), cfg)) == \
        _TIR_BEFORE_FP8["select+refresh"]
    assert h(sel.program(select_shape(*args, refresh=True, summary_dtype=dt), cfg)) == \
        _TIR_BEFORE_FP8["select+refresh"]


def test_fp8_selection_config_keeps_bytes_per_thread():
    import torch
    base = heuristics.selection_config(2048, 4, 128)
    assert heuristics.selection_config_for_summaries(base, torch.bfloat16, torch.bfloat16) is base
    f8 = heuristics.selection_config_for_summaries(base, torch.float8_e4m3fn, torch.bfloat16)
    assert f8.score_rows_per_cta == 2 * base.score_rows_per_cta
    assert f8.select_threads == base.select_threads
