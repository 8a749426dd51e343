"""Time the TileLang sparse_decode / dense_decode kernels at Qwen2.5-7B attention shapes
(28 query heads, 4 KV heads, head_dim 128, bf16, 16-token blocks, keep 10%) beside torch SDPA
on the same data and a device-to-device copy measured in the same run.

    python examples/bench_decode_kernels.py                 # the table
    python examples/bench_decode_kernels.py --sweep         # + tile configs / split counts
    python examples/bench_decode_kernels.py --precompile    # fill the TileLang disk cache (no GPU)

Method: random (not zero) data; every row at the full context; the sparse kernel reads
n = max(ceil(NB * 0.1), min(NB, 16)) blocks per KV head (the selection formula; always the
last block, the rest random, ascending). Times are triton.testing.do_bench medians, which
flush the L2 (256 MB write) before every timed call, so inputs never start in L2; the sparse
kernel is also timed as CUDA-graph replays of 8 back-to-back calls, each with a different
index set over a cache larger than L2 (steady state, no launch gaps). GB/s counts the bytes
the op must read: the selected K+V blocks (sparse) or the whole K+V cache (dense); "% copy"
divides it by the copy bandwidth (bytes read + written per second) measured in the same run.
"""
import argparse
import dataclasses
import datetime
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


def kept(nb: int) -> int:
    from resa_tl.kernels.selection import blocks_to_keep
    return blocks_to_keep(nb, 0.1, 16)


def sweep_configs(arch):
    """(label, sparse config or None, dense config or None) variants timed with --sweep."""
    from resa_tl import heuristics
    s0 = heuristics.sparse_decode_config(HKV, H // HKV, D, "bfloat16", BS, arch)
    d0 = heuristics.dense_decode_config(HKV, H // HKV, D, "bfloat16", arch)
    out = [("default", s0, d0)]
    if arch.startswith("sm_9"):
        rep = dataclasses.replace
        out += [("auto", rep(s0, schedule="auto", ctas_per_sm=1), None),
                ("ws-st3", rep(s0, schedule="ws", num_stages=3), rep(d0, num_stages=3)),
                ("ws-cta2", rep(s0, schedule="ws", ctas_per_sm=2), None),
                ("ws-N32st4", rep(s0, schedule="ws", block_N=32, num_stages=4), None),
                ("ws-N128", rep(s0, schedule="ws", block_N=128), rep(d0, block_N=128))]
    return out


def precompile(arch: str, workers: int):
    """Compile the kernels of the GPU tests and of this benchmark into the TileLang cache."""
    from concurrent.futures import ThreadPoolExecutor
    sys.path.insert(0, os.path.join(ROOT, "tests", "gpu"))
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from resa_tl import heuristics
    from resa_tl.kernels.dense_decode import compile_dense_decode_kernel
    from resa_tl.kernels.sparse_decode import compile_sparse_decode_kernel
    import test_decode_gpu as t
    jobs = []
    for op, h, hkv, d, dv, bs, dt, it, lt, sched in t.KERNEL_SPECS():
        g = h // hkv
        if op == "sparse":
            cfg = heuristics.sparse_decode_config(hkv, g, d, dt, bs, arch)
            if sched == "other":
                if not arch.startswith("sm_9"):
                    continue
                cfg = dataclasses.replace(cfg, schedule="auto" if cfg.schedule == "ws" else "ws")
            jobs.append((compile_sparse_decode_kernel, (h, hkv, d, dv, bs, dt, cfg, arch, it, lt)))
        else:
            cfg = heuristics.dense_decode_config(hkv, g, d, dt, arch)
            jobs.append((compile_dense_decode_kernel, (h, hkv, d, dv, dt, cfg, arch, lt)))
    for _, s, dcfg in sweep_configs(arch):
        if s is not None:
            jobs.append((compile_sparse_decode_kernel, (H, HKV, D, D, BS, "bfloat16", s, arch,
                                                        "int32", "int32")))
        if dcfg is not None:
            jobs.append((compile_dense_decode_kernel, (H, HKV, D, D, "bfloat16", dcfg, arch,
                                                       "int32")))
    seen, uniq = set(), []
    for fn, args in jobs:
        if (fn.__name__, args) not in seen:
            seen.add((fn.__name__, args))
            uniq.append((fn, args))
    t0 = time.time()

    def run(job):
        fn, args = job
        s = time.time()
        try:
            fn(*args)
            return f"ok   {time.time() - s:5.1f}s {fn.__name__}{args}"
        except Exception as e:                                 # noqa: BLE001
            return f"FAIL {fn.__name__}{args}: {type(e).__name__}: {str(e)[:300]}"

    with ThreadPoolExecutor(max(1, workers)) as ex:
        for line in ex.map(run, uniq):
            print(line, flush=True)
    print(f"{len(uniq)} kernels in {time.time() - t0:.0f}s")


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
        precompile(args.arch, args.workers)
        return

    import torch
    import torch.nn.functional as F
    import triton
    from resa_tl import heuristics
    from resa_tl.kernels.dense_decode import dense_decode_tilelang
    from resa_tl.kernels.sparse_decode import sparse_decode_tilelang

    dev = torch.device("cuda")
    arch = heuristics.arch_of(dev)
    props = torch.cuda.get_device_properties(dev)
    import tilelang
    print(f"# {props.name}, {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MB; "
          f"torch {torch.__version__}, tilelang {tilelang.__version__}, triton "
          f"{triton.__version__}; {datetime.datetime.now().isoformat(timespec='seconds')}")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=args.rep, return_mode="median")

    # copy roofline: bytes read + written per second, 1 GiB buffers
    src = torch.empty(1 << 29, dtype=torch.float16, device=dev).normal_()
    dst = torch.empty_like(src)
    t_copy = bench(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / (t_copy * 1e-3) / 1e9
    del src, dst
    print(f"# device-to-device copy: {copy_bw:.0f} GB/s (read + write)")

    scale = D ** -0.5
    rows, lines = [], []
    gen = torch.Generator(device=dev)
    gen.manual_seed(0)
    header = (f"{'ctx':>7} {'B':>2} {'n':>5} | {'sparse ms':>9} {'GB/s':>6} {'%copy':>5} "
              f"{'graph ms':>8} {'%copy':>5} | {'dense ms':>8} {'GB/s':>6} {'%copy':>5} | "
              f"{'SDPA ms':>8} {'dense/SDPA':>10} | {'dense/sparse':>12}")
    sms = props.multi_processor_count
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
        ref_sparse = sparse_decode_tilelang(q, k, v, idxs[0], L, block_size=BS,
                                            softmax_scale=scale)
        ref_dense = dense_decode_tilelang(q, k, v, L, softmax_scale=scale)
        for label, scfg, dcfg in variants:
            t_de = float("nan")
            if dcfg is not None:
                od = dense_decode_tilelang(q, k, v, L, softmax_scale=scale, config=dcfg)
                err = (od.float() - ref_dense.float()).abs().max().item()
                if err > 1e-2:
                    print(f"!! dense {label} differs from the default by {err:.3g}")
                t_de = bench(lambda: dense_decode_tilelang(q, k, v, L, softmax_scale=scale,
                                                           config=dcfg))
            split_opts = [None]
            if scfg is not None:
                tiles = -(-n // (max(scfg.block_N, BS) // BS))
                ns0 = heuristics.decode_num_splits(B, HKV, tiles, dev,
                                                   ctas_per_sm=scfg.ctas_per_sm)
                split_opts = [ns0]
                if label == "default" and len(variants) > 1:
                    split_opts += sorted({max(1, ns0 // 2), min(tiles, ns0 * 2),
                                          min(tiles, -(-sms * 2 // (B * HKV)))} - {ns0})
            for ns in split_opts:
                t_sp = t_gr = float("nan")
                if scfg is not None:
                    out = sparse_decode_tilelang(q, k, v, idxs[0], L, block_size=BS,
                                                 softmax_scale=scale, config=scfg,
                                                 num_splits=ns)
                    err = (out.float() - ref_sparse.float()).abs().max().item()
                    if not err <= 1e-2:
                        print(f"!! sparse {label} ns={ns} differs from the default by {err:.3g}")
                    t_sp = bench(lambda: sparse_decode_tilelang(
                        q, k, v, idxs[0], L, block_size=BS, softmax_scale=scale, config=scfg,
                        num_splits=ns))
                    try:                                 # 8 calls, rotated index sets
                        torch.cuda.synchronize()
                        g = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(g):
                            for ix in idxs:
                                sparse_decode_tilelang(q, k, v, ix, L, block_size=BS,
                                                       softmax_scale=scale, config=scfg,
                                                       num_splits=ns)
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
        for S, B in ((65536, 1), (262144, 1), (65536, 8), (262144, 8), (16384, 1)):
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
