"""generate() under transformers tensor parallelism, stock dense against resa_tl, on N GPUs:

    torchrun --nproc-per-node 2 benchmarks/bench_tp.py --shape qwen2.5-7b --contexts 262144 --batches 8
    torchrun --nproc-per-node 4 benchmarks/bench_tp.py --shape qwen2.5-32b --contexts 131072 --batches 8
    python benchmarks/bench_tp.py ...               # one process: the same without parallelism

A random-weight checkpoint of the shape (bf16) is written once to ``--model-dir`` (rank 0) and
every rank loads it with ``from_pretrained(..., tp_plan="auto")``, as users load theirs, so each
rank holds its share of the heads and one cache per layer for them. Per (context, batch) and
mode, one generate() call of ``--new-tokens`` greedy tokens, timed as bench_generate.py times
it (CUDA events after each step, the last whole cycles averaged; rank 0 reports):

  dense   the stock model (sdpa, default cache), prefill_chunk_size=--stock-prefill-chunk
  resa    resa_tl.attach(model) and the plain call (resa_tl's loop, CUDA-graph steps)
  full    resa_tl.attach(sparse_ratio=1.0, rectify_every=0): our dense kernel, same loop

``--profile`` adds one more generate() per mode under torch.profiler on rank 0: the share of
GPU kernel time spent in NCCL collectives (the all-reduces after o_proj and the MLP). On CPU
(``--device cpu``, gloo) it runs the same code at toy sizes, for testing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

import resa_tl
from resa_tl import ReSAConfig

from _timing import git_commit
from bench_generate import StepTimer, random_prompt, steady_steps

SHAPES = {   # layers, hidden, heads, kv heads, head_dim, intermediate, vocab
    "qwen2.5-7b": (28, 3584, 28, 4, 128, 18944, 152064),
    "qwen2.5-32b": (64, 5120, 40, 8, 128, 27648, 152064),
    "toy": (2, 256, 4, 2, 64, 512, 512),
}


def rank() -> int:
    return int(os.environ.get("RANK", 0))


def write_checkpoint(shape: str, layers: int | None, path: str):
    import transformers
    L, hid, H, Hkv, D, inter, vocab = SHAPES[shape]
    cfg = transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=hid, intermediate_size=inter,
        num_hidden_layers=layers or L, num_attention_heads=H, num_key_value_heads=Hkv,
        head_dim=D, rope_theta=1e6, tie_word_embeddings=False, max_position_embeddings=1 << 19,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.Qwen2ForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    for p in model.parameters():                  # random weights, no init pass over 7-32B
        p.data.normal_(0, 0.02)
    model.save_pretrained(path)


def load(path: str, device: str):
    import transformers
    tp = {"tp_plan": "auto"} if int(os.environ.get("WORLD_SIZE", 1)) > 1 else {}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **tp)
    if not tp:
        model = model.to(device)
    model.set_attn_implementation("sdpa")
    return model.eval()


def run_mode(model, ids, mode, args, cfg):
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0)
    if mode == "dense":
        kw["prefill_chunk_size"] = args.stock_prefill_chunk
    else:
        resa_tl.attach(model, cfg if mode == "resa" else
                       cfg.replace(sparse_ratio=1.0, rectify_every=0))
    try:
        timer = StepTimer(ids.device)
        timer.mark()
        model.generate(ids, logits_processor=[timer], **kw)
        peaks = timer.decode_peak()
        gaps = timer.ms_between()
        row = dict(mode=mode, prefill_ms=gaps[0])
        steady = steady_steps(gaps[1:], cfg.rectify_every + 1)
        row["ms_per_token"] = sum(steady) / len(steady)
        if peaks:
            row["peak_prefill_gib"], row["peak_decode_gib"] = (round(p / 2**30, 2)
                                                               for p in peaks)
        if args.profile and ids.is_cuda:
            row["collective_share"] = collective_share(model, ids, kw)
        return row
    finally:
        if mode != "dense":
            resa_tl.detach(model)


def collective_share(model, ids, kw) -> float:
    """Share of CUDA kernel time in NCCL collectives over one more generate()."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    total = nccl = 0.0
    for e in prof.key_averages():
        t = e.device_time_total
        total += t
        if "nccl" in e.key.lower():
            nccl += t
    return nccl / total if total else float("nan")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than the shape's")
    ap.add_argument("--contexts", type=int, nargs="+", default=[262144])
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--new-tokens", type=int, default=133)
    ap.add_argument("--modes", nargs="+", default=["resa", "full", "dense"],
                    choices=["resa", "full", "dense"])
    ap.add_argument("--stock-prefill-chunk", type=int, default=4096)
    ap.add_argument("--model-dir", default=None, help="default: /tmp/resa_tl_bench_<shape>")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    path = args.model_dir or f"/tmp/resa_tl_bench_{args.shape}_{args.layers or 'all'}"
    world = int(os.environ.get("WORLD_SIZE", 1))
    # transformers initialises torch.distributed itself when it loads the model, so there is
    # no barrier before: rank 0 writes the checkpoint and the others wait for its last file
    done = os.path.join(path, "written")
    if rank() == 0 and not os.path.exists(done):
        write_checkpoint(args.shape, args.layers, path)
        open(done, "w").close()
    while not os.path.exists(done):
        time.sleep(1)
    model = load(path, args.device)
    device = next(model.parameters()).device
    header = dict(shape=args.shape, layers=model.config.num_hidden_layers, world_size=world,
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  date=datetime.date.today().isoformat(), commit=git_commit(),
                  command=" ".join(["torchrun" if world > 1 else "python", *sys.argv]))
    if rank() == 0:
        print(json.dumps(header), flush=True)
    cfg = ReSAConfig()
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            ids = random_prompt(model.config.vocab_size, batch, context, device)
            for mode in args.modes:
                try:
                    row = run_mode(model, ids, mode, args, cfg)
                except Exception as e:                          # report, keep going
                    row = dict(mode=mode, error=repr(e)[:300])
                row.update(context=context, batch=batch)
                rows.append(row)
                if rank() == 0:
                    print(json.dumps(row), flush=True)
    if rank() == 0:
        for r in rows:
            dense = [d["ms_per_token"] for d in rows if d["mode"] == "dense" and
                     "ms_per_token" in d and (d["context"], d["batch"]) ==
                     (r["context"], r["batch"])]
            if dense and "ms_per_token" in r:
                r["speedup_vs_dense"] = dense[0] / r["ms_per_token"]
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(header=header, rows=rows), fh, indent=1)
        print(f"\n{header['gpu']} x {world}, {header['date']}, commit {header['commit']}; ms")
        for r in rows:
            if "error" in r:
                print(f"{r['context']:>7} {r['batch']:>2} {r['mode']:<6} error: {r['error']}")
                continue
            sp = r.get("speedup_vs_dense")
            share = r.get("collective_share")
            print(f"{r['context']:>7} {r['batch']:>2} {r['mode']:<6} {r['ms_per_token']:9.3f} "
                  f"{(f'{sp:.2f}x' if sp else '-'):>7} "
                  f"{(f'{share:.1%}' if share is not None else ''):>7}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
