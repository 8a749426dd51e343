"""Benchmark the TileLang rectify_attention kernel against one dense decode step.

Rectification attends the last T tokens of each row (T = rectify_every + 1 = 33 by default)
to the whole cache. It must read the cache once, like a decode step, so its yardstick is one
dense decode step on the same cache: torch SDPA with a single query per row (timed both as
GQA SDPA and as "g queries per KV head" SDPA; the faster one is the yardstick).

Timing: every op is captured in a CUDA graph that calls it on ``rot`` different copies of the
cache in turn (so L2, 50 MB on an H100, never holds the next call's data), replayed after a
warm-up; the median over replays divided by the calls per graph is reported. No host overhead
is counted (decode steps run under CUDA graphs).

    python benchmarks/bench_rectify_kernel.py                    # Qwen2.5-7B shapes, bf16
    python benchmarks/bench_rectify_kernel.py --sweep            # + tile/split variants
    python benchmarks/bench_rectify_kernel.py --precompile-tests --precompile-only

The kernels launch through resa_tl.plan (one plan per shape, config and split count), as
resa_tl.ops.rectify_attention does after its checks. Without a GPU (--precompile-only) the
kernels are compiled for sm_90a.
"""
import argparse
import dataclasses
import importlib.util
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _timing import graph_ms  # noqa: E402
from resa_tl import heuristics, plan  # noqa: E402
from resa_tl.kernels import rectify_attention as ra  # noqa: E402
from resa_tl.kernels.rectify_attention import (RectifyConfig,  # noqa: E402
                                               rectify_attention_reference)


def compile_rectify_kernel(T, g, Hkv, D, Dv, dtype, scale, config, arch):
    """The (split, combine) kernels of one spec, as tests/gpu/test_rectify_attention_gpu.py
    KERNEL_SPECS lists them (programmatic dependent launch as resa_tl.plan decides for
    ``arch``)."""
    return ra.compile_kernel(ra.RectifyShape(T, g, Hkv, D, Dv, dtype, float(scale)), config,
                             arch, heuristics.use_pdl(arch))


# ------------------------------------------------------------------------------ pre-compiling

def _compile_one(spec):
    t = time.time()
    try:
        compile_rectify_kernel(*spec)
        return spec, time.time() - t, None
    except Exception as e:  # noqa: BLE001 - reported, not fatal: the run goes on
        return spec, time.time() - t, repr(e)[:400]


def precompile(specs, workers=None):
    """Compile specs (compile_rectify_kernel argument tuples) in parallel processes into the
    TileLang disk cache, so later in-process compiles are cache hits."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing as mp
    specs = list(dict.fromkeys(specs))
    if not specs:
        return []
    workers = workers or max(1, min(len(specs), (os.cpu_count() or 2) - 1))
    t = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        res = list(ex.map(_compile_one, specs))
    bad = [r for r in res if r[2]]
    print(f"precompiled {len(specs)} kernel specs with {workers} workers in "
          f"{time.time() - t:.1f} s; {len(bad)} failed", flush=True)
    for spec, _, err in bad:
        print("  FAILED", spec[:7], spec[7], err, flush=True)
    return res


def test_specs(arch):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "tests", "gpu", "test_rectify_attention_gpu.py")
    spec = importlib.util.spec_from_file_location("_rectify_gpu_tests", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.KERNEL_SPECS(arch)


# ------------------------------------------------------------------------------ timing

def _sdpa_gqa(q1, kt, vt):
    return torch.nn.functional.scaled_dot_product_attention(q1, kt, vt, enable_gqa=True)


def _sdpa_grouped(qg, kt, vt):
    return torch.nn.functional.scaled_dot_product_attention(qg, kt, vt)


# ------------------------------------------------------------------------------ main bench

def build_variants(args, arch):
    """[(name, T, config, None)] timed at every shape, and the sweep variants."""
    g, D = args.hq // args.hkv, args.d
    variants = []
    for T in args.T:
        base = heuristics.rectify_config(T, g, D, arch)
        if "auto" in args.schedules:
            variants.append((f"T{T}", T, dataclasses.replace(base, schedule="auto"), None))
        if arch.startswith("sm_9") and T * g > 64 and "pingpong" in args.schedules:
            variants.append((f"T{T}-pp", T, dataclasses.replace(
                base, schedule="pingpong", block_M=128, threads=256), None))
    if args.t1 and "auto" in args.schedules:
        variants.append(("T1", 1, heuristics.rectify_config(1, g, D, arch), None))
    sweep = []
    if args.sweep:
        T = args.T[0]
        for name, cfg in [("BM128-BN64-s2", RectifyConfig(128, 64, 2, 256)),
                          ("BM128-BN64-s3", RectifyConfig(128, 64, 3, 256)),
                          ("BM64-BN64-s2", RectifyConfig(64, 64, 2, 128)),
                          ("BM64-BN128-s2", RectifyConfig(64, 128, 2, 128)),
                          ("pp-BN64-s3", RectifyConfig(128, 64, 3, 256, "pingpong")),
                          # wider key steps: fewer softmax/barrier rounds per wgmma flop
                          # (FlashAttention-3 uses 176 for head_dim 128); 192 x 2 stages is
                          # 224 KB of shared memory, the most that fits with 32 KB of Q
                          ("pp-BN160-s2", RectifyConfig(128, 160, 2, 256, "pingpong")),
                          ("pp-BN176-s2", RectifyConfig(128, 176, 2, 256, "pingpong")),
                          ("pp-BN192-s2", RectifyConfig(128, 192, 2, 256, "pingpong"))]:
            if cfg.schedule in args.schedules:
                sweep.append((f"T{T}-{name}", T, cfg, None))
    return variants, sweep


def bench_specs(args, arch):
    variants, sweep = build_variants(args, arch)
    dts = {"bf16": "bfloat16", "fp16": "float16"}[args.dtype]
    D = args.d
    return [(T, args.hq // args.hkv, args.hkv, D, D, dts, D ** -0.5, cfg, arch)
            for _, T, cfg, _ in variants + sweep]


def bench(args):
    dev = torch.device("cuda")
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    arch = heuristics.arch_of(dev)
    Hq, Hkv, D = args.hq, args.hkv, args.d
    g = Hq // Hkv
    sc = D ** -0.5
    free = torch.cuda.mem_get_info()[0]
    rows = []
    variants, sweep = build_variants(args, arch)

    for ctx in args.contexts:
        for B in args.batches:
            cache_bytes = B * ctx * Hkv * D * 2 * 2
            rot = max(2, math.ceil(args.rotate_bytes / cache_bytes))
            if rot * cache_bytes > 0.7 * free:
                rot = int(0.7 * free // cache_bytes)
            if rot < 1:
                print(f"skip ctx={ctx} B={B}: {cache_bytes / 2**30:.1f} GiB cache does not fit",
                      flush=True)
                continue
            ks = [torch.randn(B, ctx, Hkv, D, device=dev, dtype=dt) for _ in range(rot)]
            vs = [torch.randn(B, ctx, Hkv, D, device=dev, dtype=dt) for _ in range(rot)]
            lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
            calls = rot * max(1, (16 if cache_bytes < (1 << 30) else 2) // rot)
            idx = [i % rot for i in range(calls)]
            row = dict(ctx=ctx, B=B, cache_GB=cache_bytes / 1e9, rot=rot, calls=calls)
            # dense decode yardstick: SDPA, one query per row
            q1 = [torch.randn(B, Hq, 1, D, device=dev, dtype=dt) for _ in range(rot)]
            kts = [k.transpose(1, 2) for k in ks]
            vts = [v.transpose(1, 2) for v in vs]
            try:
                row["sdpa_gqa_ms"] = graph_ms(
                    [lambda i=i: _sdpa_gqa(q1[i], kts[i], vts[i]) for i in idx])
            except Exception as e:  # noqa: BLE001
                row["sdpa_gqa_err"] = repr(e)[:200]
                torch.cuda.empty_cache()
            qg = [x.view(B, Hkv, g, D) for x in q1]
            row["sdpa_grp_ms"] = graph_ms(
                [lambda i=i: _sdpa_grouped(qg[i], kts[i], vts[i]) for i in idx])
            dense = min(v for k_, v in row.items() if k_.startswith("sdpa_") and k_.endswith("_ms"))
            row["dense_ms"] = dense
            row["dense_GBps"] = cache_bytes / dense / 1e6
            for name, T, cfg, ns in variants + (sweep if (ctx, B) in args.sweep_shapes else []):
                qs = [torch.randn(B, T, Hq, D, device=dev, dtype=dt) for _ in range(rot)]
                outs = [torch.empty(B, T, Hq, D, device=dev, dtype=dt) for _ in range(rot)]
                R = T * g
                try:
                    p = plan.rectify_attention_like(qs[0], ks[0], vs[0], sc, config=cfg)
                    nsplit = p.num_splits
                    ms = graph_ms([lambda i=i: p.run(qs[i], ks[i], vs[i], lens, outs[i])
                                   for i in idx])
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_err"] = repr(e)[:300]
                    print(f"  {name} ctx={ctx} B={B}: ERROR {row[f'{name}_err']}", flush=True)
                    continue
                row[f"{name}_ms"] = ms
                row[f"{name}_splits"] = nsplit
                row[f"{name}_GBps"] = cache_bytes / ms / 1e6
                row[f"{name}_TFLOPs"] = 4.0 * B * Hkv * R * ctx * D / ms / 1e9
                row[f"{name}_ratio"] = ms / dense
                if args.check and ctx <= 65536 and B == 1:
                    ref = rectify_attention_reference(qs[0], ks[0], vs[0], lens,
                                                      softmax_scale=sc)
                    err = (outs[0].float() - ref.float()).abs().max().item()
                    row[f"{name}_maxerr"] = err
                if args.split_sweep and (ctx, B) in args.sweep_shapes:
                    # the split kernel alone (no combine launch): what the combine costs
                    split_k = p.kernels[0]
                    row[f"{name}_splitonly_ms"] = graph_ms([lambda i=i: split_k(
                        qs[i], ks[i], vs[i], lens, p.o_part, p.lse_part, outs[i])
                        for i in idx])
                if args.split_sweep and (ctx, B) in args.sweep_shapes and ns is None:
                    for mult in (0.5, 2.0):
                        ns2 = max(1, int(nsplit * mult))
                        p2 = plan.rectify_attention_like(qs[0], ks[0], vs[0], sc, config=cfg,
                                                         num_splits=ns2)
                        ms2 = graph_ms([lambda i=i: p2.run(qs[i], ks[i], vs[i], lens, outs[i])
                                        for i in idx])
                        row[f"{name}_ns{ns2}_ms"] = ms2
                del qs, outs
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:                      # rewritten per shape: a timeout keeps the rows
                with open(args.json, "w") as f:
                    json.dump(dict(card=torch.cuda.get_device_name(),
                                   date=time.strftime("%Y-%m-%d %H:%M"), argv=sys.argv,
                                   torch=torch.__version__, rows=rows), f, indent=1)
            del ks, vs, q1, qg, kts, vts
            torch.cuda.empty_cache()
    return rows, variants


def table(rows, variants, card):
    names = [v[0] for v in variants]
    print(f"\n== rectify_attention (TileLang) vs one dense decode step (SDPA), {card}, "
          f"{time.strftime('%Y-%m-%d')} ==")
    hdr = f"{'ctx':>7} {'B':>2} {'dense ms':>9} {'GB/s':>6} |"
    for n in names:
        hdr += f" {n + ' ms':>12} {'GB/s':>6} {'x':>5} |"
    print(hdr)
    for r in rows:
        line = f"{r['ctx']:>7} {r['B']:>2} {r['dense_ms']:>9.4f} {r['dense_GBps']:>6.0f} |"
        for n in names:
            if f"{n}_ms" in r:
                line += f" {r[f'{n}_ms']:>12.4f} {r[f'{n}_GBps']:>6.0f} {r[f'{n}_ratio']:>5.2f} |"
            else:
                line += f" {'err':>12} {'':>6} {'':>5} |"
        print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=lambda s: [int(x) for x in s.split(",")],
                   default=[16384, 65536, 131072, 262144])
    p.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    p.add_argument("--T", type=lambda s: [int(x) for x in s.split(",")], default=[32, 33, 64])
    p.add_argument("--schedules", type=lambda s: s.split(","), default=["auto", "pingpong"])
    p.add_argument("--hq", type=int, default=28)
    p.add_argument("--hkv", type=int, default=4)
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--t1", action="store_true", help="also time T=1 (a TileLang decode step)")
    p.add_argument("--sweep", action="store_true", help="tile variants at --sweep-shapes")
    p.add_argument("--split-sweep", action="store_true", help="x0.5 / x2 split counts")
    p.add_argument("--sweep-shapes", type=lambda s: [tuple(int(y) for y in x.split(":"))
                                                      for x in s.split(",")],
                   default=[(65536, 1), (262144, 8)])
    p.add_argument("--check", action="store_true", help="max |err| vs fp32 torch (B=1, <=64K)")
    p.add_argument("--rotate-bytes", type=float, default=256e6)
    p.add_argument("--no-precompile", dest="precompile", action="store_false")
    p.add_argument("--precompile-tests", action="store_true",
                   help="also pre-compile the kernels of tests/gpu/test_rectify_attention_gpu.py")
    p.add_argument("--precompile-only", action="store_true")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()

    # no GPU (pre-compiling on a CPU machine): the Hopper kernels
    arch = heuristics.arch_of(torch.device("cuda")) if torch.cuda.is_available() else "sm_90a"
    specs = test_specs(arch) if args.precompile_tests else []
    if args.precompile:
        specs += bench_specs(args, arch)
    precompile(specs)                 # one process pool for everything
    if args.precompile_only:
        return
    card = torch.cuda.get_device_name()
    rows, variants = bench(args)
    table(rows, variants, card)


if __name__ == "__main__":
    main()
