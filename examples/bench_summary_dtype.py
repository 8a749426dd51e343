"""Time select_blocks (refresh variant, as the decode step launches it) with bf16 vs fp8
summaries and several scoring configs; L distinct summary sets per graph so they stream from
DRAM as in the e2e step. --precompile: compile the same kernels on the CPU."""
import sys, json, itertools, argparse
sys.path.insert(0, "examples")
import torch
from resa_tl.kernels import selection as sel, summaries as summ

ap = argparse.ArgumentParser()
ap.add_argument("--precompile", action="store_true")
ap.add_argument("--out", default=None)
args = ap.parse_args()
SHAPES = [(32768, 8, 28), (262144, 8, 8)]          # context, batch, distinct summary sets
CFGS = {torch.bfloat16: [(512, 16)],
        torch.float8_e4m3fn: [(512, 32), (512, 64), (256, 32), (256, 16), (1024, 64)],
        torch.float8_e5m2: [(512, 32)]}
VARIANTS = [(sdt, c) for sdt, cs in CFGS.items() for c in cs]
Hkv, g, D, bs = 4, 7, 128, 16

def cfg_for(nb, tc):
    base = sel.select_config(nb, Hkv, g, D, bs, 8, torch.bfloat16, torch.bfloat16, "sm_90a")
    import dataclasses
    return dataclasses.replace(base, score_threads=tc[0], score_rows_per_cta=tc[1])

def run(ctx, B, L, sdt, tc):
    S = ctx + 4 * 33 + 1024
    nb = -(-S // bs)
    K = sel.default_max_selected(nb, 0.1, 16)
    cfg = cfg_for(nb, tc)
    kw = dict(block_size=bs, sparse_ratio=0.1, min_blocks=16, local_blocks=1, max_selected=K)
    if args.precompile:
        m = dict(device="meta")
        q = torch.empty(B, Hkv * g, D, dtype=torch.bfloat16, **m)
        k = torch.empty(B, S, Hkv, D, dtype=torch.bfloat16, **m)
        mn = torch.empty(B, nb, Hkv, D, dtype=sdt, **m)
        sel.select_blocks_tilelang(q, mn, mn, torch.empty(B, dtype=torch.int32, **m), k_cache=k,
                                   config=cfg, **kw)
        return None
    dev = "cuda"
    k = torch.randn(B, S, Hkv, D, device=dev, dtype=torch.bfloat16)
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    sets = []
    for i in range(L):
        if i == 0:
            mn, mx = summ.block_summaries_tilelang(k, lens, bs, summary_dtype=sdt)
        else:
            mn, mx = sets[0][0].clone(), sets[0][1].clone()
        sets.append((mn, mx))
    qs = [torch.randn(B, Hkv * g, D, device=dev, dtype=torch.bfloat16) for _ in range(L)]
    out = torch.empty(B, Hkv, K, dtype=torch.int32, device=dev)
    def step():
        for i in range(L):
            sel.select_blocks_tilelang(qs[i], sets[i][0], sets[i][1], lens, k_cache=k, out=out,
                                       config=cfg, **kw)
    step(); torch.cuda.synchronize()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        step()
    for _ in range(3):
        gr.replay()
    ts = []
    for _ in range(15):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / L)
    ts.sort()
    return ts[len(ts) // 2]

if args.precompile:
    from _precompile import fake_hopper
    with fake_hopper():
        for (ctx, B, L), (sdt, tc) in itertools.product(SHAPES, VARIANTS):
            run(ctx, B, L, sdt, tc)
    print("precompiled")
    sys.exit()
rows = []
for rep in range(2):
    for (ctx, B, L), (sdt, tc) in itertools.product(SHAPES, VARIANTS):
        us = run(ctx, B, L, sdt, tc)
        rows.append(dict(context=ctx, batch=B, summary=str(sdt)[6:], threads=tc[0], rows_per_cta=tc[1],
                         rep=rep, us=round(us, 2)))
        print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
if args.out:
    json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), open(args.out, "w"), indent=1)
print(f"{'ctx':>7} {'summ':>14} {'TS':>5} {'RPC':>4} {'us rep0':>8} {'us rep1':>8}")
for r in rows:
    if r["rep"] == 0:
        r1 = [x for x in rows if x["rep"] == 1 and all(x[k] == r[k] for k in ("context", "summary", "threads", "rows_per_cta"))]
        print(f"{r['context']:>7} {r['summary']:>14} {r['threads']:>5} {r['rows_per_cta']:>4} {r['us']:8.2f} {r1[0]['us'] if r1 else float('nan'):8.2f}")
