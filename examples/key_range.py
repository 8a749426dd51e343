"""Largest key magnitude a checkpoint produces on a text: whether fp8 e4m3 block summaries
(ReSAConfig(summary_dtype="float8_e4m3fn"), range ±448) would saturate for it.

Hooks every layer's k_proj (keys before RoPE) over one forward of the first --tokens tokens of a
Jane Austen novel, and bounds the keys after RoPE by the norm of each rotated pair (a rotation
keeps it). Usage: python examples/key_range.py [--model PATH] [--novel emma] [--tokens 8193]
"""
import argparse

import torch

from fidelity import NOVELS, load_austen, load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local path or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--novel", default="emma", choices=NOVELS)
    ap.add_argument("--tokens", type=int, default=8193)
    args = ap.parse_args()
    model, tok, path = load_model(args.model)
    cfg = model.config
    D = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.tensor(tok(load_austen(args.novel))["input_ids"])[:args.tokens][None]
    rows = []

    def hook(layer):
        def record(module, inputs, out):
            k = out[0].view(out.shape[1], -1, D).float()
            pair = (k[..., :D // 2] ** 2 + k[..., D // 2:] ** 2).sqrt()
            rows.append((layer, k.abs().max().item(), pair.max().item()))
        return record

    hooks = [layer.self_attn.k_proj.register_forward_hook(hook(i))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    print(f"{path}, {args.novel}, {ids.shape[1]} tokens")
    print(f"{'layer':>5} {'max |k| before RoPE':>20} {'bound after RoPE':>17}")
    for layer, pre, post in rows:
        print(f"{layer:>5} {pre:20.2f} {post:17.2f}")
    worst = max(r[2] for r in rows)
    print(f"largest: {worst:.2f} (e4m3 saturates above 448, e5m2 above 57,344)")


if __name__ == "__main__":
    main()
