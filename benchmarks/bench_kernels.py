"""Time every resa_tl op through its public API on the GPU, beside dense baselines.

Shapes: Qwen2.5-7B attention (28 query / 4 KV heads, head_dim 128), bf16, ReSA paper defaults
(block 16, keep 10%, at least 16 blocks, 1 local block). Random (never zero) inputs.

Every time is a CUDA-graph replay of R calls on R rotated copies of the inputs, so the bytes one
replay touches exceed the L2 cache several times (L2 size read from the device); the median over
replays divided by R. A device-to-device copy is timed in the same run and each kernel's bytes
per second is given as a fraction of it ("% copy").

Columns
  sdpa        torch SDPA decode (one query, GQA) over the same cache: the dense yardstick
  flex        FlexAttention decode (torch.compile'd), where --flex lists the context
  dense       resa_tl dense_decode
  select      select_blocks (reads kmin + kmax of the valid blocks)
  sparse      sparse_decode over the selected blocks (reads their K and V)
  step        select + sparse captured together: one ReSA attention step; "x sdpa" = sdpa / step
  rect32      rectify_attention with T = 32 queries; "/dense" = its time over one dense step

    python benchmarks/bench_kernels.py [--contexts ...] [--batches ...] [--flex 65536 262144]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math

import torch
import torch.nn.functional as F

from resa_tl import ops
from resa_tl.kernels.select_blocks import blocks_to_keep

from _timing import copy_gbs, git_commit, graph_ms

H, HKV, D, BS, RATIO, MINB, LOCAL = 28, 4, 128, 16, 0.1, 16, 1
DT = torch.bfloat16


class Inputs:
    """One rotated copy: q, K/V cache, lengths, summaries, indices."""

    def __init__(self, B, S, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.q = torch.randn(B, H, D, device="cuda", dtype=DT, generator=g)
        self.k = torch.randn(B, S, HKV, D, device="cuda", dtype=DT, generator=g)
        self.v = torch.randn(B, S, HKV, D, device="cuda", dtype=DT, generator=g)
        self.lens = torch.full((B,), S, device="cuda", dtype=torch.int32)
        self.kmin, self.kmax = ops.block_summaries(self.k, self.lens, BS)
        self.idx = self.select()
        self.q32 = torch.randn(B, 32, H, D, device="cuda", dtype=DT, generator=g)
        self.qt = self.q[:, :, None]                                    # [B, H, 1, D] for SDPA
        self.kt, self.vt = self.k.transpose(1, 2), self.v.transpose(1, 2)

    def select(self):
        return ops.select_blocks(self.q, self.kmin, self.kmax, self.lens, block_size=BS,
                                 sparse_ratio=RATIO, min_blocks=MINB, local_blocks=LOCAL)

    def sparse(self):
        return ops.sparse_decode(self.q, self.k, self.v, self.idx, self.lens, block_size=BS)

    def step(self):
        idx = self.select()
        return ops.sparse_decode(self.q, self.k, self.v, idx, self.lens, block_size=BS)

    def dense(self):
        return ops.dense_decode(self.q, self.k, self.v, self.lens)

    def sdpa(self):
        return F.scaled_dot_product_attention(self.qt, self.kt, self.vt, enable_gqa=True)

    def rect(self):
        return ops.rectify_attention(self.q32, self.k, self.v, self.lens)


def check(inp):
    """Each op against its torch reference once (so a fast wrong kernel cannot be reported)."""
    errs = {}
    ref = ops.dense_decode(inp.q, inp.k, inp.v, inp.lens, backend="torch").float()
    errs["dense"] = (inp.dense().float() - ref).abs().max().item()
    errs["sdpa"] = (inp.sdpa()[:, :, 0].float() - ref).abs().max().item()
    sref = ops.sparse_decode(inp.q, inp.k, inp.v, inp.idx, inp.lens, block_size=BS,
                             backend="torch").float()
    errs["sparse"] = (inp.sparse().float() - sref).abs().max().item()
    return errs


def bench_shape(S, B, l2_bytes, flex):
    kv_bytes = 2 * B * S * HKV * D * 2
    R = max(1, min(16, math.ceil(4 * l2_bytes / kv_bytes)))
    ins = [Inputs(B, S, seed=i) for i in range(R)]
    nb = math.ceil(S / BS)
    n = blocks_to_keep(nb, RATIO, MINB)
    sparse_bytes = 2 * B * HKV * n * BS * D * 2
    summ_bytes = 2 * B * nb * HKV * D * 2
    row = dict(context=S, batch=B, rotations=R, kept_blocks=n, **check(ins[0]))
    for name in ("sdpa", "dense", "select", "sparse", "step", "rect"):
        row[name] = graph_ms([getattr(i, name) for i in ins])
    if S in flex:
        row["flex"] = flex_ms(ins)
    row["dense_gbs"] = kv_bytes / row["dense"] / 1e6
    row["sdpa_gbs"] = kv_bytes / row["sdpa"] / 1e6
    row["sparse_gbs"] = sparse_bytes / row["sparse"] / 1e6
    row["select_gbs"] = summ_bytes / row["select"] / 1e6
    row["step_vs_sdpa"] = row["sdpa"] / row["step"]
    row["rect_vs_dense"] = row["rect"] / min(row["dense"], row["sdpa"])
    row["select_vs_sparse"] = row["select"] / row["sparse"]
    del ins
    torch.cuda.empty_cache()
    return row


def flex_ms(ins):
    try:
        from torch.nn.attention.flex_attention import flex_attention
        fa = torch.compile(flex_attention, dynamic=False)
        calls = [lambda i=i: fa(i.qt, i.kt, i.vt, enable_gqa=True) for i in ins]
        return graph_ms(calls)
    except Exception as e:                                     # reported, not fatal
        print(f"flex attention unavailable: {e!r}"[:300])
        return float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536, 131072, 262144])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--flex", type=int, nargs="*", default=[65536])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    props = torch.cuda.get_device_properties(0)
    bw = copy_gbs()
    head = dict(gpu=props.name, sms=props.multi_processor_count, date=datetime.date.today().isoformat(),
                commit=git_commit(),
                torch=torch.__version__, copy_gbs=round(bw))
    print(json.dumps(head), flush=True)
    rows = []
    for S in args.contexts:
        for B in args.batches:
            rows.append(bench_shape(S, B, props.L2_cache_size, set(args.flex)))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=head, rows=rows), fh, indent=1)
    pct = lambda gbs: 100 * gbs / bw                                       # noqa: E731
    print(f"\n{head['gpu']} ({head['sms']} SMs), {head['date']}, commit {head['commit']}, "
          f"copy {bw:.0f} GB/s; times in us; (% of copy bandwidth)")
    print(f"{'ctx':>6} {'B':>2} {'sdpa':>12} {'dense':>12} {'select':>12} {'sparse':>12} "
          f"{'step':>7} {'x sdpa':>6} {'rect32':>7} {'/dense':>6} {'flex':>7}")
    for r in rows:
        print(f"{r['context']:>6} {r['batch']:>2} "
              f"{r['sdpa'] * 1e3:6.1f} ({pct(r['sdpa_gbs']):3.0f}%) "
              f"{r['dense'] * 1e3:6.1f} ({pct(r['dense_gbs']):3.0f}%) "
              f"{r['select'] * 1e3:6.1f} ({pct(r['select_gbs']):3.0f}%) "
              f"{r['sparse'] * 1e3:6.1f} ({pct(r['sparse_gbs']):3.0f}%) "
              f"{r['step'] * 1e3:7.1f} {r['step_vs_sdpa']:5.2f}x {r['rect'] * 1e3:7.1f} "
              f"{r['rect_vs_dense']:5.2f}x {r.get('flex', float('nan')) * 1e3:7.1f}")


if __name__ == "__main__":
    main()
