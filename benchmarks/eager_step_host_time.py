"""Host time of one eager decode step of an attached transformers model (CUDA).

A step's host time is the wall time of the Python forward call while the GPU keeps up: the
model is small (Qwen2 layout, head_dim 128, GQA 4:1) and the context short, so the kernels
finish before the host has enqueued the next ones and the call's duration is what the host
spends per step (Python, argument handling, launches). Divided by the layer count it is the
per-layer cost that an eager ``generate()`` pays on top of the kernels.

Modes: "resa" (attach, sparse steps), "dense-kernel" (attach with sparse_ratio=1,
rectify_every=0: the dense kernel in the same loop), "stock" (no resa_tl, sdpa).

    python benchmarks/eager_step_host_time.py [--layers 8] [--context 4096] [--steps 200]

Prints one JSON line per mode: median / p10 / p90 host ms per step and per layer.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_model(layers: int, vocab: int = 1024):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=1 << 17, use_sliding_window=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device="cuda", dtype=torch.bfloat16).eval()


def host_ms_per_step(model, cache, context: int, steps: int, warmup: int = 10):
    """Median, p10, p90 of the wall time of one eager one-token forward (no sync inside)."""
    ids = torch.randint(0, model.config.vocab_size, (1, context), device="cuda")
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = ids[:, -1:]
        times = []
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(input_ids=tok, past_key_values=cache, use_cache=True)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e3)
        torch.cuda.synchronize()
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--modes", nargs="+", default=["resa", "dense-kernel", "stock"])
    args = ap.parse_args(argv)
    import resa_tl
    from resa_tl.integration import new_cache
    from transformers import DynamicCache
    cap = args.context + args.steps + 64
    for mode in args.modes:
        model = make_model(args.layers)
        if mode == "stock":
            cache = DynamicCache(config=model.config)
        else:
            kw = dict(sparse_ratio=1.0, rectify_every=0) if mode == "dense-kernel" else {}
            resa_tl.attach(model, **kw)
            cache = new_cache(model, 1, -(-cap // 1024) * 1024)
        med, p10, p90 = host_ms_per_step(model, cache, args.context, args.steps)
        print(json.dumps(dict(mode=mode, layers=args.layers, context=args.context,
                              steps=args.steps, host_ms_per_step=round(med, 4),
                              p10=round(p10, 4), p90=round(p90, 4),
                              host_us_per_layer=round(1e3 * med / args.layers, 1),
                              gpu=torch.cuda.get_device_name())), flush=True)
        del model, cache
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
