"""Host time of one eager decode step of an attached transformers model (CUDA).

A step's host time is the wall time of the Python forward call while the GPU keeps up: the
model is small (Qwen2 layout, head_dim 128, GQA 4:1) and the context short, so the kernels
finish before the host has enqueued the next ones and the call's duration is what the host
spends per step (Python, argument handling, launches). Divided by the layer count it is the
per-layer cost that an eager ``generate()`` pays on top of the kernels.

Modes: "resa" (attach, sparse steps), "dense-kernel" (attach with sparse_ratio=1,
rectify_every=0: the dense kernel in the same loop), "stock" (no resa_tl, sdpa).

``--mock-launches`` measures the same on a machine without a GPU: the model and cache live on
the meta device inside resa_tl.precompile.fake_hopper (the library plans and compiles as for an
sm_90a GPU, and TileLang launches do nothing), so what is timed is the host work alone, minus
the launch calls themselves (the same for every version of the library).

    python benchmarks/eager_step_host_time.py [--layers 8] [--context 4096] [--steps 200]
    python benchmarks/eager_step_host_time.py --mock-launches        # CPU, no GPU needed

Prints one JSON line per mode: median / p10 / p90 host ms per step and per layer; for "resa"
also ``resa_us_per_layer``: the cache update plus the attention function of one layer, timed
alone (what resa_tl adds to a layer, without the model's other work).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def make_model(layers: int, device: str, vocab: int = 1024):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=1024, intermediate_size=2048,
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
                      head_dim=128, max_position_embeddings=1 << 17, use_sliding_window=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=torch.bfloat16).eval()


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def host_ms_per_step(model, cache, context: int, steps: int, warmup: int = 10):
    """Median, p10, p90 of the wall time of one eager one-token forward (no sync inside)."""
    device = model.device.type
    if device == "meta":
        # a prompt of one rectification (f + 1 = 33 tokens) runs the rectify kernel, whose
        # launch is mocked; a longer one would go through SDPA, which reads the lengths
        context = 33
    ids = torch.randint(0, model.config.vocab_size, (1, context)).to(device)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        tok = ids[:, -1:]
        times = []
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            model(input_ids=tok, past_key_values=cache, use_cache=True)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e3)
        _sync(device)
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[0], q[-1]


def attention_us_per_layer(model, cache, steps: int, warmup: int = 10):
    """Median host time of ReSA's share of one layer of an eager decode step: the cache update
    (the model's ``past_key_values.update``) plus the registered attention function, called as
    the model calls them, for one token (no model around them, no sync inside)."""
    from resa_tl.integration.hf import resa_attention
    cfg = model.config
    B, H, Hkv, D = 1, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dev, dt = model.device, model.dtype
    q = torch.randn(B, H, 1, D).to(device=dev, dtype=dt)
    kv = torch.randn(B, Hkv, 1, D).to(device=dev, dtype=dt)
    attn = [layer.self_attn for layer in model.model.layers]
    device = dev.type
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            cache.begin_step(1)
            for module in attn:
                k, v = cache.layers[module.layer_idx].update(kv, kv)
                resa_attention(module, q, k, v, None, scaling=D ** -0.5)
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e6 / len(attn))
        _sync(device)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--modes", nargs="+", default=["resa", "dense-kernel", "stock"])
    ap.add_argument("--mock-launches", action="store_true",
                    help="no GPU: meta tensors under resa_tl.precompile.fake_hopper")
    args = ap.parse_args(argv)
    import contextlib

    import resa_tl
    from resa_tl.integration import new_cache
    from transformers import DynamicCache
    device, where = "cuda", None
    mocked = contextlib.nullcontext()
    if args.mock_launches:
        from resa_tl.precompile import fake_hopper
        device, where, mocked = "meta", "cpu, launches mocked", fake_hopper()
        if "dense-kernel" in args.modes:       # its prompt would go through SDPA (host reads)
            ap.error("--mock-launches runs the resa and stock modes")
    cap = args.context + args.steps + 64
    with mocked:
        for mode in args.modes:
            model = make_model(args.layers, device)
            if mode == "stock":
                cache = DynamicCache(config=model.config)
            else:
                kw = dict(sparse_ratio=1.0, rectify_every=0) if mode == "dense-kernel" else {}
                resa_tl.attach(model, **kw)
                cache = new_cache(model, 1, -(-cap // 1024) * 1024)
            med, p10, p90 = host_ms_per_step(model, cache, args.context, args.steps)
            row = dict(mode=mode, layers=args.layers, context=args.context, steps=args.steps,
                       host_ms_per_step=round(med, 4), p10=round(p10, 4), p90=round(p90, 4),
                       host_us_per_layer=round(1e3 * med / args.layers, 1),
                       where=where or torch.cuda.get_device_name())
            if mode == "resa":
                row["resa_us_per_layer"] = round(attention_us_per_layer(model, cache,
                                                                        args.steps), 1)
            print(json.dumps(row), flush=True)
            del model, cache
            if device == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
