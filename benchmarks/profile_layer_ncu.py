"""One Qwen2.5-7B-shaped layer's attention kernels, once each inside an NVTX range "prof", for
Nsight Compute. What bench_e2e.py's ReSA and dense steps launch per layer at one shape, through
the same code (bench_e2e.DecoderAttention: the ReSA cache and resa_tl.cycle.StepAttention):
select_blocks (scoring + top-k with the summary refresh), sparse_decode (split + combine),
rectify_attention (T = rectify_every + 1: split + combine) and dense_decode (split + combine).

    ncu --clock-control none --nvtx --nvtx-include "prof/" --section SpeedOfLight \\
        --section MemoryWorkloadAnalysis --section Occupancy --csv --page details \\
        python3 benchmarks/profile_layer_ncu.py --context 32768 --batch 8

ncu runs the kernels one at a time with cold caches, so a kernel that reads what the previous
one wrote (the top-k, the combines) is slower there than inside the CUDA-graph chain of a step.
"""
import argparse

import torch

from bench_e2e import DecoderAttention, Qwen7BShape   # benchmarks/ is on sys.path as a script
from resa_tl import ReSAConfig


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
    s = Qwen7BShape(layers=1, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim)
    B, D = args.batch, args.head_dim
    dev, dt = "cuda", torch.bfloat16
    torch.manual_seed(0)
    attn = DecoderAttention(s, B, args.context, cfg, share_kv=True, device=dev)  # bench_e2e's
    attn.cache.seqlens.fill_(args.context + 1)            # as during a bench_e2e step
    q = torch.randn(B, args.heads, D, device=dev, dtype=dt)
    qr = torch.randn(B, cfg.rectify_every + 1, args.heads, D, device=dev, dtype=dt)

    def layer():
        attn.sparse(0, q)                  # select_blocks (with the refresh) + sparse_decode
        attn.rectify(0, qr)
        attn.dense(0, q)

    for _ in range(3):                      # load / compile, allocate workspaces
        layer()
    torch.cuda.synchronize()
    torch.cuda.nvtx.range_push("prof")
    layer()
    torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
