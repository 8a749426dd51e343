"""fp8 block summaries (ReSAConfig.summary_dtype), CPU side: the outward rounding against a
brute-force search over every fp8 value, the bound it keeps, the references' update/rebuild
agreement, the API checks, and the plumbing through ReSAConfig / ReSACache."""
import warnings

import pytest
import torch

from resa_tl import ReSAConfig, ops
from resa_tl.cache import ReSACache
from resa_tl.kernels import select_blocks as sel
from resa_tl.kernels import block_summaries as summ

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _finite_values(dtype):
    """Every finite value of an fp8 dtype, ascending (fp32)."""
    v = torch.arange(256, dtype=torch.int16).to(torch.uint8).view(dtype).float()
    return torch.unique(v[torch.isfinite(v)])


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_round_outward_is_the_nearest_fp8_value_on_the_right_side(dtype):
    grid = _finite_values(dtype)
    fmax = float(grid[-1])
    g = torch.Generator().manual_seed(0)
    x = torch.cat([grid,                                            # exact values
                   (grid[1:] + grid[:-1]) / 2,                      # midpoints
                   grid[:-1] + (grid[1:] - grid[:-1]) * torch.rand(len(grid) - 1, generator=g),
                   torch.randn(20000, generator=g) * 10 ** torch.empty(20000).uniform_(
                       -7, 5, generator=g)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.4e-45, -1.4e-45, 1e-38])])
    x = x[x.abs() <= fmax]                                          # + signed zeros, fp32 subnormals
    up = summ.round_outward_reference(x, dtype, True).float()
    down = summ.round_outward_reference(x, dtype, False).float()
    i_up = torch.searchsorted(grid, x, side="left")                 # smallest grid value >= x
    i_dn = torch.searchsorted(grid, x, side="right") - 1            # largest grid value <= x
    assert torch.equal(up, grid[i_up]), "rounding up must give the smallest fp8 value >= x"
    assert torch.equal(down, grid[i_dn]), "rounding down must give the largest fp8 value <= x"


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_out_of_range_saturates_to_the_unbounded_sentinel(dtype):
    fmax = summ.FP8_FORMATS[str(dtype)[6:]][3]
    x = torch.tensor([fmax * 1.01, 1e30, -fmax * 1.01, -1e30])
    up = summ.round_outward_reference(x, dtype, True).float()
    down = summ.round_outward_reference(x, dtype, False).float()
    assert up.tolist() == [fmax, fmax, -fmax, -fmax]
    assert down.tolist() == [fmax, fmax, -fmax, -fmax]
    lo, hi = summ.summary_values(down.to(dtype), up.to(dtype))
    # kmax +max and kmin -max decode to unbounded; the other side stays a finite valid bound
    assert hi.tolist() == [summ.SUMMARY_UNBOUNDED] * 2 + [-fmax] * 2
    assert lo.tolist() == [fmax] * 2 + [-summ.SUMMARY_UNBOUNDED] * 2


@pytest.mark.filterwarnings("ignore:resa_tl")                   # saturates on purpose
@pytest.mark.parametrize("dtype", FP8, ids=str)
@pytest.mark.parametrize("kdt", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_fp8_scores_bound_every_key_of_the_block(dtype, kdt):
    """The upper-bound score from fp8 summaries is >= the bf16/fp16 one, which is >= q·k of
    every valid key of the block (the property that makes selection by it sound)."""
    B, S, Hkv, g, D, bs = 2, 203, 2, 3, 64, 16
    gen = torch.Generator().manual_seed(1)
    scale = 10 ** torch.empty(1, 1, Hkv, D).uniform_(-6, 4.5, generator=gen)
    fin = torch.finfo(kdt).max / 2                                  # finite keys in fp16 too
    k = (torch.randn(B, S, Hkv, D, generator=gen) * scale).clamp(-fin, fin).to(kdt)
    q = torch.randn(B, Hkv * g, D, generator=gen).to(kdt)
    lens = torch.tensor([203, 50])
    exact = ops.block_summaries(k, lens, bs)
    fp8 = ops.block_summaries(k, lens, bs, summary_dtype=dtype)
    assert fp8[0].dtype == dtype and fp8[1].dtype == dtype
    s_exact = sel.block_scores_reference(q, *exact, lens, bs, 0)
    s_fp8 = sel.block_scores_reference(q, *fp8, lens, bs, 0)
    valid = torch.isfinite(s_exact)
    assert torch.equal(valid, torch.isfinite(s_fp8))
    assert (s_fp8[valid] >= s_exact[valid] * (1 - 1e-6) - 1e-6).all()
    qm = q.double().view(B, Hkv, g, D).mean(2) * D ** -0.5
    nb = -(-S // bs)
    for b in range(B):
        for j in range(-(-int(lens[b]) // bs)):
            keys = k[b, j * bs:min((j + 1) * bs, int(lens[b]))].double()   # [n, Hkv, D]
            best = torch.einsum("nhd,hd->hn", keys, qm[b]).amax(-1)
            assert (s_fp8[b, :, j].double() >= best * (1 - 1e-5) - 1e-6).all(), (b, j, nb)


@pytest.mark.parametrize("dtype", FP8, ids=str)
def test_update_equals_rebuild(dtype):
    B, S, Hkv, D, bs = 3, 300, 2, 64, 16
    gen = torch.Generator().manual_seed(2)
    k = (torch.randn(B, S, Hkv, D, generator=gen) * 30).to(torch.bfloat16)
    lens = torch.tensor([100, 7, 250])
    mn, mx = ops.block_summaries(k, lens, bs, summary_dtype=dtype)
    ops.update_block_summaries(mn, mx, k, lens, 33, bs)
    rmn, rmx = ops.block_summaries(k, lens + 33, bs, summary_dtype=dtype)
    for b in range(B):
        nv = -(-(int(lens[b]) + 33) // bs)
        assert torch.equal(mn[b, :nv].view(torch.uint8), rmn[b, :nv].view(torch.uint8))
        assert torch.equal(mx[b, :nv].view(torch.uint8), rmx[b, :nv].view(torch.uint8))


def test_saturation_warns(monkeypatch):
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    lens = torch.tensor([64])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # in range: silent
        ops.block_summaries(k, lens, 16, summary_dtype=torch.float8_e4m3fn)
    k[0, 3, 1, 5] = 500.0
    with pytest.warns(RuntimeWarning, match="float8_e5m2"):
        mn, mx = ops.block_summaries(k, lens, 16, summary_dtype=torch.float8_e4m3fn)
    assert int(summ.saturation_count(mn, mx)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")                              # e5m2 holds 500
        ops.block_summaries(k, lens, 16, summary_dtype=torch.float8_e5m2)
    cache = ReSACache(1, 1, 64, 2, 64, config=ReSAConfig(summary_dtype="float8_e4m3fn"),
                      dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="float8_e5m2"):       # once, from block_summaries
        cache.prefill(0, k, k)
    # CUDA tensors skip value checks (no host sync in ops): the prefill itself warns then
    import resa_tl._checks
    monkeypatch.setattr(resa_tl._checks, "value_checks_enabled", lambda t: False)
    with pytest.warns(RuntimeWarning, match="ReSACache.prefill"):
        cache.prefill(0, k, k)


def test_api_checks():
    k = torch.randn(1, 64, 2, 64, dtype=torch.bfloat16)
    lens = torch.tensor([64])
    with pytest.raises(TypeError, match="summary_dtype"):
        ops.block_summaries(k, lens, 16, summary_dtype=torch.float16)
    with pytest.raises(TypeError, match="summary_dtype"):
        ops.block_summaries(k, lens, 16, summary_dtype="int8")
    mn, mx = ops.block_summaries(k, lens, 16, summary_dtype="float8_e4m3fn")
    assert mn.dtype == torch.float8_e4m3fn
    q = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.select_blocks(q, mn, mx.to(torch.float8_e5m2), lens)
    with pytest.raises(TypeError, match="kmin/kmax dtype"):
        ops.select_blocks(q.half(), mn.float().bfloat16(), mx.float().bfloat16(), lens)
    with pytest.raises(TypeError, match="kmin/kmax dtype"):
        ops.update_block_summaries(mn.float(), mx.float(), k, lens - 1, 1, 16)
    idx = ops.select_blocks(q, mn, mx, lens, min_blocks=2)
    assert idx.shape == (1, 2, 2)


def test_config_and_cache():
    with pytest.raises(ValueError, match="summary_dtype"):
        ReSAConfig(summary_dtype="float16")
    cfg = ReSAConfig(summary_dtype=torch.float8_e5m2)
    assert cfg.summary_dtype == "float8_e5m2"                  # normalised to a name
    assert ReSAConfig().summary_dtype is None
    cache = ReSACache(2, 2, 100, 2, 64, config=ReSAConfig(summary_dtype="float8_e4m3fn"),
                      dtype=torch.bfloat16)
    assert cache.kmin[0].dtype == torch.float8_e4m3fn and cache.k[0].dtype == torch.bfloat16
    k = torch.randn(2, 40, 2, 64, dtype=torch.bfloat16) * 100
    cache.prefill(0, k, k)
    want = ops.block_summaries(cache.k[0], cache.lengths(0), 16, summary_dtype=torch.float8_e4m3fn)
    assert torch.equal(cache.kmin[0].view(torch.uint8), want[0].view(torch.uint8))
    cache.append(0, k[:, :3], k[:, :3])
    cache.rewind(2, layers=[0])
    want = ops.block_summaries(cache.k[0], cache.lengths(0), 16, summary_dtype=torch.float8_e4m3fn)
    assert torch.equal(cache.kmax[0].view(torch.uint8), want[1].view(torch.uint8))
