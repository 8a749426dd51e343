"""One Qwen2.5-7B-shaped layer's attention kernels, once each inside an NVTX range "prof", for
Nsight Compute. What bench_e2e.py's ReSA and dense steps launch per layer at one shape:
select_blocks (scoring + top-k with the summary refresh), sparse_decode (split + combine),
rectify_attention (T = rectify_every + 1: split + combine) and dense_decode (split + combine).

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --csv --page details \\
        python3 examples/profile_layer_ncu.py --context 32768 --batch 8

ncu runs the kernels one at a time with cold caches, so a kernel that reads what the previous
one wrote (the top-k, the combines) is slower there than inside the CUDA-graph chain of a step.
"""
import argparse

import torch

from bench_e2e import cache_capacity          # examples/ is on sys.path when run as a script
from resa_tl import ReSAConfig, ops


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    cfg = ReSAConfig()
    B, Hkv, D = args.batch, args.kv_heads, args.head_dim
    cap = cache_capacity(args.context, cfg)                       # the bench_e2e cache
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    k = torch.randn(B, cap, Hkv, D, device=dev, dtype=dt)
    v = torch.randn(B, cap, Hkv, D, device=dev, dtype=dt)
    lens = torch.full((B,), args.context + 1, device=dev, dtype=torch.int32)
    kmin, kmax = ops.block_summaries(k, lens, cfg.block_size)
    q = torch.randn(B, args.heads, D, device=dev, dtype=dt)
    qr = torch.randn(B, cfg.rectify_every + 1, args.heads, D, device=dev, dtype=dt)

    def layer():
        idx = ops.select_blocks(q, kmin, kmax, lens, block_size=cfg.block_size,
                                sparse_ratio=cfg.sparse_ratio, min_blocks=cfg.min_blocks,
                                local_blocks=cfg.local_blocks, sink_blocks=cfg.sink_blocks,
                                k_cache=k)
        ops.sparse_decode(q, k, v, idx, lens, block_size=cfg.block_size)
        ops.rectify_attention(qr, k, v, lens)
        ops.dense_decode(q, k, v, lens)

    for _ in range(3):                      # load / compile, allocate workspaces
        layer()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    layer()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
