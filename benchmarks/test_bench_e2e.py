"""CPU checks of bench_e2e.py: its decoder's attention, now the library's ReSA cache and decode
cycle (resa_tl.cycle.StepAttention), resolves exactly the plans (kernel shapes, configs, split
counts, PDL) that the public ops the decoder called before resolve, so timings of both compare;
and --precompile resolves them. Kernels are not compiled here (compile_kernel is stubbed)."""
import os
import sys
from contextlib import ExitStack
from unittest import mock

import pytest
import torch

# the benchmark modules import each other as top-level modules (as when run as scripts);
# no conftest.py here: a second module named "conftest" would shadow tests/conftest.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

pytest.importorskip("tilelang")

import bench_e2e  # noqa: E402
from resa_tl import ReSAConfig, ops, plan  # noqa: E402
from resa_tl.kernels import block_summaries, dense_decode, rectify_attention  # noqa: E402
from resa_tl.kernels import select_blocks, sparse_decode  # noqa: E402
from resa_tl.precompile import fake_hopper  # noqa: E402


def _stub_compiles():
    """compile_kernel of every kernel module replaced by a stub that records its arguments and
    returns callables that do nothing (no nvcc, no TileLang lowering)."""
    calls = []
    stack = ExitStack()
    for mod in (block_summaries, dense_decode, rectify_attention, select_blocks, sparse_decode):
        def stub(shape, config, arch, pdl, _mod=mod):
            calls.append((_mod.__name__, shape, config, arch, pdl))
            k = mock.Mock(return_value=None)
            return (k, k) if _mod is rectify_attention else k
        stack.enter_context(mock.patch.object(mod, "compile_kernel", stub))
    return stack, calls


def _snapshot():
    """Every memoised plan: its key (op, problem, device, overrides, arch/PDL) -> what it
    decided (config, split count)."""
    return {key: (type(p).__name__, p.config, getattr(p, "num_splits", None))
            for key, p in plan._PLANS.items()}


def _ops_decoder(s, cfg, context, B):
    """The attention calls of bench_e2e's decoder before it ran on resa_tl.cycle: the public
    ops on its per-layer tensors (summaries built once; a sparse step: select_blocks with the
    summary refresh + sparse_decode; dense-tl: dense_decode; a rectification: the summary
    update of the f + 1 re-fed tokens + rectify_attention)."""
    f = cfg.rectify_every
    meta = dict(device="meta", dtype=torch.bfloat16)
    k = torch.empty(B, bench_e2e.cache_capacity(context, cfg), s.kv_heads, s.head_dim, **meta)
    lens = torch.empty(B, device="meta", dtype=torch.int32)
    kmin, kmax = ops.block_summaries(k, lens, cfg.block_size, summary_dtype=cfg.summary_dtype)
    ops.update_block_summaries(kmin, kmax, k, lens, f + 1, cfg.block_size)
    q = torch.empty(B, s.heads, s.head_dim, **meta)
    idx = ops.select_blocks(q, kmin, kmax, lens, block_size=cfg.block_size,
                            sparse_ratio=cfg.sparse_ratio, min_blocks=cfg.min_blocks,
                            local_blocks=cfg.local_blocks, sink_blocks=cfg.sink_blocks,
                            k_cache=k)
    ops.sparse_decode(q, k, k, idx, lens, block_size=cfg.block_size)
    ops.dense_decode(q, k, k, lens)
    ops.rectify_attention(torch.empty(B, f + 1, s.heads, s.head_dim, **meta), k, k, lens)


@pytest.mark.parametrize("summary_dtype", [None, "float8_e4m3fn"])
@pytest.mark.parametrize("context,batch", [(4096, 1), (65536, 8)])
def test_decode_cycle_launches_what_the_ops_did(context, batch, summary_dtype, capsys):
    s = bench_e2e.Qwen7BShape(layers=2)
    cfg = ReSAConfig(summary_dtype=summary_dtype)
    stack, calls = _stub_compiles()
    plan.clear()
    try:
        with stack, fake_hopper():
            _ops_decoder(s, cfg, context, batch)
            before, compiled_before = _snapshot(), list(calls)
            plan.clear()
            calls.clear()
            bench_e2e.precompile(s, cfg, [context], [batch])
            after, compiled_after = _snapshot(), list(calls)
    finally:
        plan.clear()
    assert "compiled the kernels" in capsys.readouterr().out
    kinds = sorted(v[0] for v in before.values())
    assert kinds == ["DenseDecodePlan", "RectifyPlan", "SelectPlan", "SparseDecodePlan",
                     "SummariesPlan", "SummariesPlan"]
    assert after == before                   # the same problems, configs and split counts
    assert sorted(map(repr, compiled_after)) == sorted(map(repr, compiled_before))
    assert all(c[3] == "sm_90a" for c in compiled_after)


def test_cache_layout_and_lengths():
    """share_kv: one cache layer for every model layer; the lengths the summaries were built
    over are the context; the capacity is cache_capacity."""
    s = bench_e2e.Qwen7BShape(layers=3)
    cfg = ReSAConfig()
    stack, _ = _stub_compiles()
    try:
        with stack, fake_hopper():
            a = bench_e2e.DecoderAttention(s, 2, 1000, cfg, share_kv=True, device="meta",
                                           fill=False)
            b = bench_e2e.DecoderAttention(s, 2, 1000, cfg, share_kv=False, device="meta",
                                           fill=False)
    finally:
        plan.clear()
    assert a.cache.num_layers == 1 and a.kv(2)[0] is a.cache.k[0]
    assert b.cache.num_layers == 3 and b.kv(2)[0] is b.cache.k[2]
    assert a.capacity == bench_e2e.cache_capacity(1000, cfg) == a.cache.max_seq_len
    assert a.cache.max_length(0) == 1000
