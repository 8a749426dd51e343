"""Helpers shared by the GPU test files (not a test file itself).

- selection (test_block_summaries_gpu.py, test_select_blocks_gpu.py, test_fp8_summaries_gpu.py,
  test_pdl_gpu.py): ``_dev``, ``_lens``, ``LENGTHS``, ``check_selection``;
- decoding (test_sparse_decode_gpu.py, test_dense_decode_gpu.py): random inputs with poisoned
  tails (``_gen``, ``_lengths``, ``_inputs``, ``_poisoned``), the tolerance check ``_check``,
  and the trip-count hang probe ``trip_count_probe`` / ``probe_hung``: the sparse and dense
  decode kernels with 0, 1 and 2 pipelined iterations per split (warp-specialised loops with one
  iteration hung on Hopper in tile-ai/tilelang#2566), run once per test process in a subprocess
  with a timeout, before the first test of either decode file; if it hangs, their other tests
  are skipped instead of hanging the session.

Test files import it as ``gpu_helpers`` (pytest puts tests/gpu on sys.path; the benchmarks that
pre-compile the tests' kernels do so themselves)."""
import os
import subprocess
import sys
import textwrap
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tolerance import assert_close_to_reference  # noqa: E402

from resa_tl.kernels import select_blocks as sel  # noqa: E402

F16, BF16 = torch.float16, torch.bfloat16
I32, I64 = torch.int32, torch.int64

# ------------------------------------------------------------------------------------------
# selection: block_summaries / update_block_summaries / select_blocks
# ------------------------------------------------------------------------------------------
LENGTHS = [1, 15, 16, 17, 1000, 4103, 65536]


def _dev():
    return torch.device("cuda")


def _lens(values, dtype=I32):
    return torch.tensor(values, dtype=dtype, device=_dev())


def check_selection(out, q, kmin, kmax, lens, *, block_size, sparse_ratio, min_blocks,
                    local_blocks, max_selected, ref=None, sink_blocks=0):
    """Asserts that ``out`` is a valid selection; returns the number of rows that differ from
    ``ref`` (only allowed within the fp32 tolerance).

    The reference uses torch.topk, which is arbitrary among equal scores, and the kernel's fp32
    sums run in another order, so this checks the SET: count == n, ascending, -1 padding, in
    range, locals (and sinks) kept, and every kept block's reference score >= every dropped
    valid block's score minus a tiny tolerance; and a row may differ from ``ref`` only in blocks
    whose score is within that tolerance of the threshold (none on random data, in practice)."""
    B, NB, Hkv, D = kmin.shape
    K = max_selected
    assert out.dtype == torch.int32 and tuple(out.shape) == (B, Hkv, K)
    s = sel.block_scores_reference(q, kmin, kmax, lens, block_size, local_blocks,
                                   sink_blocks).cpu()
    # tolerance: a few fp32 ulps of the sum of |terms| of the score
    qm = q.float().view(B, Hkv, -1, D).mean(2) * D ** -0.5
    mag = torch.maximum(kmin.float().abs(), kmax.float().abs()).permute(0, 2, 1, 3)
    tol = ((qm.abs()[:, :, None] * mag).sum(-1).amax(-1) * 1e-5 + 1e-6).cpu()   # [B, Hkv]
    out_c = out.cpu().long()
    nvalid = (lens.cpu().long() + block_size - 1) // block_size
    n = sel.blocks_to_keep(nvalid, sparse_ratio, min_blocks).clamp(max=K)
    ref_c = None if ref is None else ref.cpu().long()
    differing = 0
    for b in range(B):
        nv, nn = int(nvalid[b]), int(n[b])
        for h in range(Hkv):
            row = out_c[b, h]
            where = f"row b={b} h={h} (nvalid={nv}, n={nn})"
            assert (row[nn:] == -1).all(), f"{where}: tail must be -1 padding, got {row[nn:][:8]}"
            kept = row[:nn]
            assert ((kept >= 0) & (kept < nv)).all(), f"{where}: ids out of [0, nvalid)"
            assert (kept[1:] > kept[:-1]).all(), f"{where}: ids not strictly ascending"
            if nn == 0:
                continue
            sc = s[b, h]
            is_kept = torch.zeros(NB, dtype=torch.bool)
            is_kept[kept] = True
            valid = torch.arange(NB) < nv
            nloc = min(local_blocks, nv)
            if nloc <= nn:
                assert is_kept[nv - nloc:nv].all(), f"{where}: local blocks not kept"
            assert is_kept[:min(sink_blocks, nv)].all(), f"{where}: sink blocks not kept"
            dropped = valid & ~is_kept
            if dropped.any():
                lo_kept = sc[is_kept].min()
                hi_drop = sc[dropped].max()
                assert lo_kept >= hi_drop - tol[b, h], \
                    f"{where}: kept score {lo_kept} < dropped score {hi_drop} - tol {tol[b, h]}"
            if ref_c is not None and not torch.equal(row, ref_c[b, h]):
                differing += 1
                ref_kept = torch.zeros(NB, dtype=torch.bool)
                ref_kept[ref_c[b, h][:nn]] = True
                thr = sc[ref_kept].min()
                diff = is_kept ^ ref_kept
                assert ((sc[diff] - thr).abs() <= 2 * tol[b, h]).all(), \
                    f"{where}: differs from the reference away from the threshold"
    return differing


# ------------------------------------------------------------------------------------------
# decoding: sparse_decode / dense_decode
# ------------------------------------------------------------------------------------------

def _gen(*key):
    g = torch.Generator(device="cuda")
    g.manual_seed(zlib.crc32(repr(key).encode()))
    return g


def _lengths(spec, gen):
    if spec == "rand8":
        return torch.randint(1, 5000, (8,), generator=gen, device="cuda").tolist()
    return list(spec)


def _inputs(B, S, H, Hkv, D, dtype, lens, len_dtype, gen):
    q = torch.randn(B, H, D, generator=gen, device="cuda").to(dtype)
    k = torch.randn(B, S, Hkv, D, generator=gen, device="cuda").to(dtype)
    v = torch.randn(B, S, Hkv, D, generator=gen, device="cuda").to(dtype)
    L = torch.tensor(lens, dtype=len_dtype, device="cuda")
    pos = torch.arange(S, device="cuda")[None, :, None, None]
    past = pos >= L.long()[:, None, None, None]
    k = torch.where(past, torch.full_like(k, 30.0), k)          # masking bugs show
    v = torch.where(past, torch.full_like(v, 1000.0), v)
    return q, k, v, L


def _check(out, q, ref_fn, name):
    ref32 = ref_fn(torch.float32)
    reflp = ref_fn(q.dtype)
    assert_close_to_reference(out, ref32, reflp, name=name)


def _poisoned(B, H, D, dtype):
    return torch.full((B, H, D), float("nan"), dtype=dtype, device="cuda")


# Hang probe: 0 / 1 / 2 pipeline iterations per split, in a subprocess with a timeout

# {"failed": None (passed) / "timeout" / "error", "message": str} once the probe has run
_HANG = {}

_PROBE = textwrap.dedent("""
    import dataclasses, torch
    from resa_tl import heuristics
    from kernel_calls import sparse_decode as sparse_decode_tilelang
    from kernel_calls import dense_decode as dense_decode_tilelang
    from resa_tl.kernels.sparse_decode import sparse_decode_reference
    from resa_tl.kernels.dense_decode import dense_decode_reference
    torch.manual_seed(0)
    H, Hkv, D, bs = 28, 4, 128, 16
    dt = torch.bfloat16
    arch = heuristics.arch_of(torch.device("cuda"))
    base = heuristics.sparse_decode_config(bs, arch)
    cfgs = [dataclasses.replace(base, schedule=s) for s in
            (("auto", "ws") if arch.startswith("sm_9") else ("auto",))]
    for S, lens in [(64, [64]), (512, [1, 64, 65, 128, 129, 512])]:
        B = len(lens)
        q = torch.randn(B, H, D, device="cuda", dtype=dt)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=dt)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=dt)
        L = torch.tensor(lens, dtype=torch.int32, device="cuda")
        for ns in (1, 2, 3, 8):          # tiles of 64 keys: 0, 1, 2 ... per split
            o = dense_decode_tilelang(q, k, v, L, softmax_scale=D ** -0.5, num_splits=ns)
            r = dense_decode_reference(q, k, v, L, softmax_scale=D ** -0.5)
            torch.cuda.synchronize()
            assert (o.float() - r.float()).abs().max().item() < 3e-2, ("dense", S, ns)
        nb = S // bs
        for K in (4, 8, 12, 32):         # 4 blocks per tile: 1, 2, 3, 8 tiles
            idx = torch.arange(K, device="cuda", dtype=torch.int32) % nb
            idx = torch.where(idx < nb, idx, -1)[None, None].expand(B, Hkv, K).contiguous()
            if K > nb:
                idx = torch.where(torch.arange(K, device="cuda") < nb, idx, -1)
            for ns in (1, 2, 4, 8):
                r = sparse_decode_reference(q, k, v, idx, L, block_size=bs,
                                            softmax_scale=D ** -0.5)
                for cfg in cfgs:
                    o = sparse_decode_tilelang(q, k, v, idx, L, block_size=bs,
                                               softmax_scale=D ** -0.5, num_splits=ns,
                                               config=cfg)
                    torch.cuda.synchronize()
                    assert (o.float() - r.float()).abs().max().item() < 3e-2, \
                        ("sparse", cfg.schedule, S, K, ns)
    print("PROBE-OK")
""")


def _run_probe():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"),
                                         env.get("PYTHONPATH", "")])
    try:
        res = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                             text=True, timeout=float(os.environ.get("RESA_TL_PROBE_TIMEOUT",
                                                                     "240")))
    except subprocess.TimeoutExpired:
        return {"failed": "timeout",
                "message": "sparse/dense decode with 0/1/2 iterations per split did not finish "
                           "(warp-specialised loop hang, tile-ai/tilelang#2566?)"}
    except Exception as e:  # noqa: BLE001 - reported by test_trip_counts_0_1_2_no_hang
        return {"failed": "error", "message": f"probe could not run: {e!r}"}
    if "PROBE-OK" not in res.stdout:
        return {"failed": "error",
                "message": f"probe failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"}
    return {"failed": None, "message": ""}


def trip_count_probe():
    """Runs the hang probe the first time it is called in this process (later calls return the
    same result): (failed, message), failed None when it passed, "timeout" when it hung,
    "error" when it failed otherwise."""
    if not _HANG:
        _HANG.update(_run_probe())
    return _HANG["failed"], _HANG["message"]


def probe_hung():
    """True once the probe has run and timed out: the decode tests skip."""
    return _HANG.get("failed") == "timeout"
