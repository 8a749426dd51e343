"""A small ReSA decoding run: a toy attention-only model decodes greedily from a 2K-token prompt
with dense attention, with sparse-only attention and with ReSA (sparse + rectification), and
reports how far each stays from dense. Uses TileLang kernels on a CUDA GPU, the torch backend
elsewhere.

    python examples/quickstart.py [--steps 96] [--prompt-len 2048]
"""
import argparse
import time

import torch

from resa_tl import ReSAConfig
from resa_tl.reference_cycle import ToyAttentionModel, dense_recompute, run_decode_cycle


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    print(f"device: {device} ({'TileLang' if cuda else 'torch'} backend), dtype {dtype}",
          flush=True)
    print(f"toy attention-only model (4 layers, 8 query / 2 KV heads, random weights); prompt "
          f"of {args.prompt_len} tokens x batch {args.batch} (ragged rows), then {args.steps} "
          f"greedy decode steps three ways: dense, sparse-only, ReSA", flush=True)
    model = ToyAttentionModel(vocab=512, hidden=256, num_layers=4, num_heads=8, num_kv_heads=2,
                              head_dim=64, max_positions=args.prompt_len + args.steps + 1,
                              seed=0, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 512, (args.batch, args.prompt_len), generator=gen).to(device)
    lengths = [args.prompt_len - 37 * b for b in range(args.batch)]   # ragged rows
    cfg = ReSAConfig(block_size=16, sparse_ratio=0.1, min_blocks=16, rectify_every=32)

    runs = {}
    for name, mode, c in (("dense", "dense", cfg), ("sparse-only", "resa", cfg.replace(rectify_every=0)),
                          ("ReSA", "resa", cfg)):
        print(f"{name:12s} prefill + {args.steps} steps x batch {args.batch} ... ", end="",
              flush=True)
        t0 = time.perf_counter()
        runs[name] = run_decode_cycle(model, prompt, lengths, args.steps, c, mode=mode)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{dt:.2f} s", flush=True)

    print("(the toy model has random weights and diffuse attention, so its token agreement says "
          "little; docs/fidelity.md measures a real model)")
    ref = runs["dense"].tokens
    for name in ("sparse-only", "ReSA"):
        agree = (runs[name].tokens == ref).float().mean().item()
        print(f"{name:12s} token agreement with dense: {agree:.1%}")
    res = runs["ReSA"]
    if res.snapshots:
        step, fed = res.snapshots[-1]
        print(f"checking the K cache after the rectification at step {step} against a dense "
              f"recompute of the same tokens ...", flush=True)
        part = run_decode_cycle(model, prompt, lengths, step + 1, cfg)
        dense = dense_recompute(model, fed, cfg)
        err = max((part.cache.k[l][b, :len(r)].float() - dense.k[l][b, :len(r)].float()).abs().max().item()
                  for l in range(model.num_layers) for b, r in enumerate(fed))
        print(f"after the rectification at step {step}: max |K - K_dense| = {err:.2e}")


if __name__ == "__main__":
    main()
