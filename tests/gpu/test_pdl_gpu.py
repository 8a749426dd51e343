"""Programmatic dependent launch (PDL) changes when a kernel starts, never what it computes:
a chain of every kernel family, each layer's output feeding the next layer's query (so every
kernel boundary carries a read-after-write), must give bit-identical results with PDL on and
off, eagerly and replayed as one CUDA graph, and match the torch references.

``chain`` also runs on meta tensors, so ``precompile()`` below can fill the kernel cache for it
on a machine without a GPU (under resa_tl.precompile.fake_hopper)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tolerance import assert_close_to_reference  # noqa: E402
from gpu_helpers import check_selection  # noqa: E402

from resa_tl import ops  # noqa: E402
from resa_tl.kernels.dense_decode import dense_decode_reference  # noqa: E402
from resa_tl.kernels.block_summaries import block_summaries_reference  # noqa: E402
from resa_tl.kernels.rectify_attention import rectify_attention_reference  # noqa: E402
from resa_tl.kernels.select_blocks import select_blocks_reference  # noqa: E402
from resa_tl.kernels.sparse_decode import sparse_decode_reference  # noqa: E402

pytestmark = pytest.mark.gpu

# Qwen2.5-7B attention shapes; rows of different lengths, none a multiple of the block size
B, H, HKV, D, BS, CAP, T_RECT, LAYERS = 3, 28, 4, 128, 16, 4608, 33, 3
LENS = [4103, 1001, 2500 + 7]
SEL = dict(block_size=BS, sparse_ratio=0.1, min_blocks=16, local_blocks=1)


def make_inputs(device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rnd(*shape):
        t = torch.randn(*shape, generator=gen, dtype=torch.float32).to(torch.bfloat16)
        return t.to(device)

    k = [rnd(B, CAP, HKV, D) for _ in range(LAYERS)]
    v = [rnd(B, CAP, HKV, D) for _ in range(LAYERS)]
    lens = torch.tensor(LENS, dtype=torch.int32, device=device)
    summaries = [ops.block_summaries(kk, lens, BS) for kk in k]
    rows = torch.arange(B, device=device)
    for kmin, kmax in summaries:             # the newest blocks: the chain must rewrite them
        kmin[rows, (lens.long() - 1) // BS] = float("nan")
        kmax[rows, (lens.long() - 1) // BS] = float("nan")
    return dict(q=rnd(B, H, D), q_rect=rnd(B, T_RECT, H, D), k=k, v=v, lens=lens,
                start=(lens - 1).contiguous(), summaries=summaries)


def chain(x, out):
    """LAYERS x (summary update, select, sparse decode, dense decode, rectify), the sparse
    output becoming the next layer's query; results written into ``out`` (graph-safe). Odd
    layers refresh the summary inside select_blocks instead of a separate update."""
    q = x["q"]
    for layer in range(LAYERS):
        kmin, kmax = x["summaries"][layer]
        k, v = x["k"][layer], x["v"][layer]
        if layer % 2:
            idx = ops.select_blocks(q, kmin, kmax, x["lens"], k_cache=k, **SEL)
        else:
            ops.update_block_summaries(kmin, kmax, k, x["start"], 1, BS)
            idx = ops.select_blocks(q, kmin, kmax, x["lens"], **SEL)
        o = ops.sparse_decode(q, k, v, idx, x["lens"], block_size=BS)
        d = ops.dense_decode(o, k, v, x["lens"])
        r = ops.rectify_attention(x["q_rect"], k, v, x["lens"])
        out["idx"][layer].copy_(idx)
        out["sparse"][layer].copy_(o)
        out["dense"][layer].copy_(d)
        out["rect"][layer].copy_(r)
        out["q"][layer].copy_(q)
        q = o


def empty_out(x):
    q, qr = x["q"], x["q_rect"]
    K = ops.select_blocks(q, *x["summaries"][0], x["lens"], **SEL).shape[-1]
    return dict(idx=[torch.full((B, HKV, K), -7, dtype=torch.int32, device=q.device)
                     for _ in range(LAYERS)],
                **{name: [torch.full_like(t, float("nan")) for _ in range(LAYERS)]
                   for name, t in (("sparse", q), ("dense", q), ("rect", qr), ("q", q))})


def precompile():
    """CPU: compile the kernels of this file with and without PDL (see resa_tl.precompile)."""
    from resa_tl.precompile import fake_hopper
    saved = os.environ.get("RESA_TL_PDL")
    try:
        for pdl in ("0", "1"):
            os.environ["RESA_TL_PDL"] = pdl
            with fake_hopper():
                x = make_inputs("meta")
                chain(x, empty_out(x))
    finally:
        if saved is None:
            os.environ.pop("RESA_TL_PDL", None)
        else:
            os.environ["RESA_TL_PDL"] = saved


@pytest.fixture(scope="module")
def hopper():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90 or newer")


def run(monkeypatch, pdl: str, graph: bool):
    monkeypatch.setenv("RESA_TL_PDL", pdl)
    x = make_inputs("cuda")
    out = empty_out(x)
    if not graph:
        chain(x, out)
        torch.cuda.synchronize()
        return x, out
    chain(x, empty_out(x))                  # warm-up: compile, allocate workspaces
    x = make_inputs("cuda")                 # pristine inputs: capture runs nothing, replay does
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        chain(x, out)
    g.replay()
    torch.cuda.synchronize()
    return x, out


def test_pdl_bit_identical_to_plain_launches(hopper, monkeypatch):
    _, plain = run(monkeypatch, "0", graph=False)
    _, eager = run(monkeypatch, "1", graph=False)
    _, graphed = run(monkeypatch, "1", graph=True)
    for name in ("idx", "sparse", "dense", "rect", "q"):
        for layer in range(LAYERS):
            a = plain[name][layer]
            assert not a.isnan().any() if a.is_floating_point() else (a != -7).all()
            for other, how in ((eager, "eager"), (graphed, "graph")):
                assert torch.equal(other[name][layer], a), (name, layer, how)


def test_pdl_chain_matches_references(hopper, monkeypatch):
    x, out = run(monkeypatch, "1", graph=True)
    scale = D ** -0.5
    for layer in range(LAYERS):
        k, v = x["k"][layer], x["v"][layer]
        kmin, kmax = x["summaries"][layer]
        want_min, want_max = block_summaries_reference(k, x["lens"], BS)
        assert torch.equal(kmin, want_min) and torch.equal(kmax, want_max), \
            f"layer {layer}: the {'refresh' if layer % 2 else 'update'} left a summary unwritten"
        q = out["q"][layer]
        idx = out["idx"][layer]
        K = idx.shape[-1]
        ref_idx = select_blocks_reference(q, kmin, kmax, x["lens"], max_selected=K, **SEL)
        check_selection(idx, q, kmin, kmax, x["lens"], max_selected=K, ref=ref_idx, **SEL)
        o = out["sparse"][layer]
        check(o, lambda dt: sparse_decode_reference(q, k, v, idx, x["lens"], block_size=BS,
                                                    softmax_scale=scale, compute_dtype=dt),
              f"sparse layer {layer}")
        check(out["dense"][layer], lambda dt: dense_decode_reference(
            o, k, v, x["lens"], softmax_scale=scale, compute_dtype=dt), f"dense layer {layer}")
        check(out["rect"][layer], lambda dt: rectify_attention_reference(
            x["q_rect"], k, v, x["lens"], softmax_scale=scale, compute_dtype=dt),
            f"rectify layer {layer}")


def check(out, ref_fn, name):
    assert_close_to_reference(out, ref_fn(torch.float32), ref_fn(torch.bfloat16), name=name)
