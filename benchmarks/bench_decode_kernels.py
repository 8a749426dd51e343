"""Time the TileLang sparse_decode / dense_decode kernels at Qwen2.5-7B attention shapes
(28 query heads, 4 KV heads, head_dim 128, bf16, 16-token blocks, keep 10%) beside torch SDPA
on the same data and a device-to-device copy measured in the same run.

    python benchmarks/bench_decode_kernels.py               # the table
    python benchmarks/bench_decode_kernels.py --sweep       # + tile configs / split counts
    python benchmarks/bench_decode_kernels.py --precompile  # fill TileLang's disk cache (no GPU)

Method: random (not zero) data; every row at the full context; the sparse kernel reads
n = max(ceil(NB * 0.1), min(NB, 16)) blocks per KV head (the selection formula; always the
last block, the rest random, ascending). Times are triton.testing.do_bench medians
(_timing.cold_l2_ms), which flush the L2 (256 MB write) before every timed call, so inputs
never start in L2; the sparse
kernel is also timed as CUDA-graph replays of 8 back-to-back calls, each with a different
index set over a cache larger than L2 (steady state, no launch gaps). GB/s counts the bytes
the op must read: the selected K+V blocks (sparse) or the whole K+V cache (dense); "% copy"
divides it by the copy bandwidth (bytes read + written per second) measured in the same run.
Kernels launch through resa_tl.plan (a plan per problem, config and split count), as the ops do
after their checks; "default" is the heuristic config, the reference outputs use the config the
library picks (the tuned schedule's, else the heuristic).
"""
import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

H, HKV, D, BS = 28, 4, 128, 16
CONTEXTS = (16384, 65536, 131072, 262144)
BATCHES = (1, 4, 8)
SWEEP_SHAPES = ((65536, 1), (262144, 1), (65536, 8), (262144, 8), (16384, 1))


def kept(nb: int) -> int:
    from resa_tl.kernels.select_blocks import blocks_to_keep
    return blocks_to_keep(nb, 0.1, 16)


def sparse_plan(B, n, dev, config=None, num_splits=None):
    """The plan of sparse_decode over n selected blocks per KV head (bf16, int32 indices and
    lengths); config / num_splits None: the library's choice."""
    from resa_tl import plan
    from resa_tl.kernels.sparse_decode import SparseDecodeShape
    shape = SparseDecodeShape(H, HKV, D, D, BS, "bfloat16", "int32", "int32")
    return plan.sparse_decode(shape, B, n, dev, config=config, num_splits=num_splits)


def dense_plan(B, S, dev, config=None):
    """The plan of dense_decode over a cache of S positions per row."""
    from resa_tl import plan
    from resa_tl.kernels.dense_decode import DenseDecodeShape
    shape = DenseDecodeShape(H, HKV, D, D, "bfloat16", "int32")
    return plan.dense_decode(shape, B, S, dev, config=config)


def split_options(B, n, scfg, label, sweeping, dev):
    """Split counts timed for a sparse config: the heuristic's (the plan's), and for the
    default config in a sweep also half, twice, and two waves of the device."""
    from resa_tl import heuristics
    ns0 = sparse_plan(B, n, dev, scfg).num_splits
    if not (label == "default" and sweeping):
        return [ns0]
    tiles = -(-n // (max(scfg.block_N, BS) // BS))
    sms = heuristics.sm_count(dev)
    return [ns0] + sorted({max(1, ns0 // 2), min(tiles, ns0 * 2),
                           min(tiles, -(-sms * 2 // (B * HKV)))} - {ns0})


def shape_plans(S, B, variants, dev):
    """Every plan one_shape launches at (S, B): the references (the library's configs), and
    per variant its dense plan and its sparse plans at each split count."""
    n = kept(-(-S // BS))
    plans = [sparse_plan(B, n, dev), dense_plan(B, S, dev)]
    for label, scfg, dcfg in variants:
        if dcfg is not None:
            plans.append(dense_plan(B, S, dev, dcfg))
        if scfg is not None:
            for ns in split_options(B, n, scfg, label, len(variants) > 1, dev):
                plans.append(sparse_plan(B, n, dev, scfg, ns))
    return plans


def sweep_configs(arch):
    """(label, sparse config or None, dense config or None) variants timed with --sweep."""
    from resa_tl import heuristics
    s0 = heuristics.sparse_decode_config(BS, arch)
    d0 = heuristics.dense_decode_config(arch)
    out = [("default", s0, d0)]
    if arch.startswith("sm_9"):
        rep = dataclasses.replace
        out += [("auto", rep(s0, schedule="auto", ctas_per_sm=1), None),
                ("ws-st3", rep(s0, schedule="ws", num_stages=3), rep(d0, num_stages=3)),
                ("ws-cta2", rep(s0, schedule="ws", ctas_per_sm=2), None),
                ("ws-N32st4", rep(s0, schedule="ws", block_N=32, num_stages=4), None),
                ("ws-N128", rep(s0, schedule="ws", block_N=128), rep(d0, block_N=128))]
    return out


def precompile(arch: str, workers: int, contexts, batches):
    """Compile the kernels of the GPU tests (KERNEL_SPECS of tests/gpu/test_sparse_decode_gpu.py
    and test_dense_decode_gpu.py, with the heuristic configs of ``arch``) and of this benchmark
    (every plan of every shape; on sm_90a only, resolved under resa_tl.precompile.fake_hopper)
    into the TileLang cache."""
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from resa_tl import heuristics
    from resa_tl.kernels import dense_decode as dd
    from resa_tl.kernels import sparse_decode as sd
    from resa_tl.precompile import fake_hopper
    import test_dense_decode_gpu
    import test_sparse_decode_gpu
    pdl = heuristics.use_pdl(arch)
    jobs = []                                  # (label, thunk)
    specs = dict.fromkeys(test_sparse_decode_gpu.KERNEL_SPECS()         # no duplicates
                          + test_dense_decode_gpu.KERNEL_SPECS())
    for op, h, hkv, d, dv, bs, dt, it, lt, sched in specs:
        if op == "sparse":
            cfg = heuristics.sparse_decode_config(bs, arch)
            if sched == "other":
                if not arch.startswith("sm_9"):
                    continue
                cfg = dataclasses.replace(cfg, schedule="auto" if cfg.schedule == "ws" else "ws")
            shape = sd.SparseDecodeShape(h, hkv, d, dv, bs, dt, it, lt)
            jobs.append((f"sparse {shape} {cfg}", functools.partial(sd.compile_kernel, shape,
                                                                     cfg, arch, pdl)))
        else:
            cfg = heuristics.dense_decode_config(arch)
            shape = dd.DenseDecodeShape(h, hkv, d, dv, dt, lt)
            jobs.append((f"dense {shape} {cfg}", functools.partial(dd.compile_kernel, shape,
                                                                    cfg, arch, pdl)))
    if arch == "sm_90a":
        for S in contexts:
            for B in batches:
                variants = sweep_configs(arch) if (S, B) in SWEEP_SHAPES else \
                    sweep_configs(arch)[:1]
                jobs.append((f"bench {S} x {B}", functools.partial(
                    shape_plans, S, B, variants, "meta")))
    else:
        print(f"# {arch}: the benchmark's own plans are resolved for sm_90a only; compiling "
              "the GPU tests' kernels", flush=True)
    t0 = time.time()

    def run(job):
        label, fn = job
        s = time.time()
        try:
            fn()
            return f"ok   {time.time() - s:5.1f}s {label}"
        except Exception as e:                                 # noqa: BLE001
            return f"FAIL {label}: {type(e).__name__}: {str(e)[:300]}"

    with fake_hopper(), ThreadPoolExecutor(max(1, workers)) as ex:
        for line in ex.map(run, jobs):
            print(line, flush=True)
    print(f"{len(jobs)} jobs in {time.time() - t0:.0f}s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precompile", action="store_true")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--contexts", type=int, nargs="*", default=list(CONTEXTS))
    ap.add_argument("--batches", type=int, nargs="*", default=list(BATCHES))
    ap.add_argument("--json", default=None)
    ap.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    args = ap.parse_args()
    if args.precompile:
        precompile(args.arch, args.workers, args.contexts, args.batches)
        return

    import torch
    import torch.nn.functional as F
    import triton
    from resa_tl import heuristics
    from _timing import capture_graph, cold_l2_ms, copy_gbs

    dev = torch.device("cuda")
    arch = heuristics.arch_of(dev)
    props = torch.cuda.get_device_properties(dev)
    import tilelang
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}, tilelang {tilelang.__version__}, triton "
          f"{triton.__version__}; {datetime.datetime.now().isoformat(timespec='seconds')}")

    def bench(fn):
        return cold_l2_ms(fn, warmup=25, rep=args.rep)

    # copy roofline: bytes read + written per second, 1 GiB buffers, timed like the kernels
    copy_bw = copy_gbs(1 << 29, torch.float16, cold_l2=True)
    print(f"# device-to-device copy: {copy_bw:.0f} GB/s (read + write)")

    scale = D ** -0.5
    rows, lines = [], []
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    header = (f"{'ctx':>7} {'B':>2} {'n':>5} | {'sparse ms':>9} {'GB/s':>6} {'%copy':>5} "
              f"{'graph ms':>8} {'%copy':>5} | {'dense ms':>8} {'GB/s':>6} {'%copy':>5} | "
              f"{'SDPA ms':>8} {'dense/SDPA':>10} | {'dense/sparse':>12}")
    sweep = sweep_configs(arch)

    def one_shape(S, B, variants):
        try:
            k = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
            v = torch.randn(B, S, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
        except torch.OutOfMemoryError:
            print(f"skip ctx {S} B {B}: out of memory")
            return
        q = torch.randn(B, H, D, device=dev, dtype=torch.bfloat16, generator=gen)
        L = torch.full((B,), S, dtype=torch.int32, device=dev)
        nb = -(-S // BS)
        n = kept(nb)

        def make_idx():
            sc = torch.rand(B, HKV, nb, device=dev, generator=gen)
            sc[..., nb - 1] = 2.0                                # the local block
            return sc.topk(n, dim=-1).indices.sort(dim=-1).values.to(torch.int32)
        idxs = [make_idx() for _ in range(8)]
        sparse_bytes = B * HKV * n * BS * D * 2 * 2
        dense_bytes = B * S * HKV * D * 2 * 2
        t_sdpa = float("nan")
        if variants[0][0] == "default":
            qh = q[:, :, None, :]
            kh = k.permute(0, 2, 1, 3).contiguous()
            vh = v.permute(0, 2, 1, 3).contiguous()
            try:
                t_sdpa = bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale,
                                                                      enable_gqa=True))
            except Exception as e:                               # noqa: BLE001
                print(f"SDPA failed: {e}")
            del kh, vh
        ref_sparse = sparse_plan(B, n, dev).run(q, k, v, idxs[0], L, scale)
        ref_dense = dense_plan(B, S, dev).run(q, k, v, L, scale)
        for label, scfg, dcfg in variants:
            t_de = float("nan")
            if dcfg is not None:
                pd = dense_plan(B, S, dev, dcfg)
                od = pd.run(q, k, v, L, scale)
                err = (od.float() - ref_dense.float()).abs().max().item()
                if err > 1e-2:
                    print(f"!! dense {label} differs from the default by {err:.3g}")
                t_de = bench(lambda: pd.run(q, k, v, L, scale))
            split_opts = [None]
            if scfg is not None:
                split_opts = split_options(B, n, scfg, label, len(variants) > 1, dev)
            for ns in split_opts:
                t_sp = t_gr = float("nan")
                if scfg is not None:
                    ps = sparse_plan(B, n, dev, scfg, ns)
                    out = ps.run(q, k, v, idxs[0], L, scale)
                    err = (out.float() - ref_sparse.float()).abs().max().item()
                    if not err <= 1e-2:
                        print(f"!! sparse {label} ns={ns} differs from the default by {err:.3g}")
                    t_sp = bench(lambda: ps.run(q, k, v, idxs[0], L, scale))
                    try:                                 # 8 calls, rotated index sets
                        g = capture_graph([lambda ix=ix: ps.run(q, k, v, ix, L, scale)
                                           for ix in idxs])
                        g.replay()
                        t_gr = bench(g.replay) / len(idxs)
                        del g
                    except Exception as e:                       # noqa: BLE001
                        print(f"graph failed: {e}")
                r = dict(context=S, batch=B, kept=n, config=label, num_splits=ns,
                         sparse_ms=t_sp, sparse_graph_ms=t_gr, dense_ms=t_de, sdpa_ms=t_sdpa,
                         sparse_GBps=sparse_bytes / (t_sp * 1e-3) / 1e9,
                         sparse_graph_GBps=sparse_bytes / (t_gr * 1e-3) / 1e9,
                         dense_GBps=dense_bytes / (t_de * 1e-3) / 1e9, copy_GBps=copy_bw,
                         sparse_config=str(scfg), dense_config=str(dcfg))
                rows.append(r)
                tag = "" if (label == "default" and ns == split_opts[0]) else \
                    f"  [{label} ns={ns}]"
                lines.append(
                    f"{S:>7} {B:>2} {n:>5} | {t_sp:9.4f} {r['sparse_GBps']:6.0f} "
                    f"{100 * r['sparse_GBps'] / copy_bw:5.1f} {t_gr:8.4f} "
                    f"{100 * r['sparse_graph_GBps'] / copy_bw:5.1f} | {t_de:8.4f} "
                    f"{r['dense_GBps']:6.0f} {100 * r['dense_GBps'] / copy_bw:5.1f} | "
                    f"{t_sdpa:8.4f} {t_de / t_sdpa:10.3f} | {t_de / t_sp:12.2f}{tag}")
                print(lines[-1], flush=True)
        del k, v, q, idxs
        torch.cuda.empty_cache()

    # pass 1: the heuristic defaults at every shape (64K and 256K first); pass 2: variants
    print(header, flush=True)
    order = sorted(args.contexts, key=lambda c: (c not in (65536, 262144), c))
    for S in order:
        for B in args.batches:
            one_shape(S, B, sweep[:1])
    if args.sweep:
        print("# sweep (variants of the default; split counts of the default)", flush=True)
        for S, B in SWEEP_SHAPES:
            if S in args.contexts and B in args.batches:
                one_shape(S, B, sweep)
    print()
    print(f"# {props.name}; copy {copy_bw:.0f} GB/s; bf16, H={H}, Hkv={HKV}, D={D}, "
          f"block {BS}, n = max(ceil(NB/10), min(NB, 16)); do_bench medians (L2 flushed); "
          f"graph = 8 rotated index sets per replay")
    print(header)
    for line in lines:
        print(line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=props.name, copy_GBps=copy_bw, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
