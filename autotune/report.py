"""Reports of a tuning run: report.md, results.json and png plots, in one directory.

Everything is rendered from results.json, so a report can be re-rendered elsewhere (e.g. where
matplotlib is installed): ``python -m autotune.report autotune/reports/sm90/<run>``.
matplotlib is optional (``pip install -e ".[tune]"``): without it the plots are skipped and
report.md says so.
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TARGET_SPEEDUP = 1.15


def write_results(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "results.json"
    p.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    return p


def _fmt(x, nd=1, suffix=""):
    if x is None:
        return "—"
    return f"{x:.{nd}f}{suffix}"


def _cfg(d: dict | None) -> str:
    if not d:
        return "—"
    short = {"block_M": "M", "block_N": "N", "block_H": "H", "num_stages": "st",
             "threads": "thr", "blocks_per_cta": "bpc", "score_threads": "sthr",
             "score_rows_per_cta": "srows", "select_threads": "selthr", "schedule": ""}
    return " ".join(f"{short.get(k, k)}{v}" if short.get(k, k) else str(v) for k, v in d.items())


def op_summary(problems: list[dict]) -> dict:
    sp = [p["speedup_vs_default"] for p in problems if p.get("speedup_vs_default")]
    return {"tuned": sum(p["status"] == "tuned" for p in problems), "total": len(problems),
            "median_speedup": round(statistics.median(sp), 3) if sp else None,
            "max_speedup": round(max(sp), 3) if sp else None,
            "beats_default": sum(s > 1.0 for s in sp)}


def render_markdown(res: dict, plots: list[str] | None = None) -> str:
    """report.md; ``plots``: the png files rendered (None: all of them)."""
    meta = res["meta"]
    mode = meta.get("mode")
    prov = meta.get("provenance", {})
    L = [f"# resa_tl autotune report: {meta.get('arch')} ({mode})", ""]
    if meta.get("partial"):
        L += [f"**Partial report: the run was interrupted by {meta.get('interrupted')}** after "
              f"{meta.get('elapsed_s')} s, {meta.get('problems_finished')} of "
              f"{meta.get('problems')} problems done. The compiles (and the measurement) in "
              "flight were abandoned: they are not failures.", ""]
    L += ["| | |", "|---|---|"]
    for k in ("gpu", "sm_count", "l2_bytes", "driver", "cuda", "nvcc", "torch", "tilelang",
              "python", "date", "git_commit", "git_dirty", "source_sha256", "command"):
        if k in prov:
            L.append(f"| {k} | `{prov[k]}` |")
    for k in ("workload", "candidates_per_problem", "compile_jobs", "budget_s", "elapsed_s",
              "truncated", "partial", "interrupted"):
        if k in meta:
            L.append(f"| {k} | `{meta[k]}` |")
    if meta.get("copy_bandwidth"):
        cb = meta["copy_bandwidth"]
        L.append(f"| copy roofline (measured) | {cb['gbps']} GB/s read+write "
                 f"({cb['bytes'] / 2**30:.1f} GiB device-to-device copy) |")
    L.append("")
    if meta.get("unavailable"):
        L += ["## Ops not tuned", ""]
        for op, why in sorted(meta["unavailable"].items()):
            L.append(f"- **{op}**: {why}")
        L.append("")
    probs = res.get("problems", [])
    ops = sorted({p["op"] for p in probs})
    if mode == "compile-only":
        L += _compile_only_md(res, ops)
    else:
        L += _tune_md(res, ops, plots)
    fails = [c for c in res.get("compiles", []) if c.get("ok") is False]
    L += ["## Compile failures", ""]
    if not fails:
        L += ["None.", ""]
    else:
        L += [f"{len(fails)} of {len(res.get('compiles', []))} compiles failed "
              "(recorded, not fatal):", "",
              "| op | static shape | config | error |", "|---|---|---|---|"]
        for c in fails:
            err = (c.get("error") or "").splitlines()[0][:160].replace("|", "/")
            L.append(f"| {c['op']} | {_shape(c['static'])} | {_cfg(c['config'])} | {err} |")
        L.append("")
    return "\n".join(L) + "\n"


def _shape(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def _compile_only_md(res, ops):
    L = ["## Compile results", "",
         "| op | problems | kernels compiled | failed | abandoned | heuristic default failed |",
         "|---|---|---|---|---|---|"]
    comp = res.get("compiles", [])
    for op in ops:
        cs = [c for c in comp if c["op"] == op]
        probs = [p for p in res["problems"] if p["op"] == op]
        dfail = sum(1 for p in probs if p.get("default_compile_ok") is False)
        L.append(f"| {op} | {len(probs)} | {sum(c.get('ok') is True for c in cs)} | "
                 f"{sum(c.get('ok') is False for c in cs)} | {sum(c.get('ok') is None for c in cs)}"
                 f" | {dfail} |")
    L.append("")
    secs = [c["seconds"] for c in comp if c.get("seconds")]
    if secs:
        L += [f"Compile time per kernel: median {statistics.median(secs):.1f} s, "
              f"max {max(secs):.1f} s, total {sum(secs):.0f} s of worker time.", ""]
    return L


def _tune_md(res, ops, plots=None):
    L = []
    probs = res["problems"]
    allsp = [p["speedup_vs_default"] for p in probs if p.get("speedup_vs_default")]
    L += ["## Summary", ""]
    if allsp:
        med = statistics.median(allsp)
        verdict = ("meets" if med >= TARGET_SPEEDUP else "does NOT meet")
        L += [f"Median speedup of the tuned config over the heuristic default, over "
              f"{len(allsp)} tuned shapes: **{med:.3f}x** — this {verdict} the "
              f"{TARGET_SPEEDUP:.2f}x target.", ""]
    L += ["| op | shapes tuned | median speedup vs default | max | shapes where tuned != "
          "default wins |", "|---|---|---|---|---|"]
    for op in ops:
        s = op_summary([p for p in probs if p["op"] == op])
        L.append(f"| {op} | {s['tuned']}/{s['total']} | {_fmt(s['median_speedup'], 3, 'x')} | "
                 f"{_fmt(s['max_speedup'], 3, 'x')} | {s['beats_default']} |")
    L.append("")
    for op in ops:
        L += [f"## {op}", "",
              "| shape | best config | latency µs (p10–p90) | GB/s | % copy roofline | "
              "speedup vs default | margin vs runner-up | valid/candidates |",
              "|---|---|---|---|---|---|---|---|"]
        for p in (p for p in probs if p["op"] == op):
            if p["status"] != "tuned":
                L.append(f"| {p['label']} | *{p['status']}* | | | | | | "
                         f"{p.get('n_valid', 0)}/{len(p.get('candidates', []))} |")
                continue
            w = p["winner_timing"]
            L.append(
                f"| {p['label']} | {_cfg(p['winner'])}{' (default)' if p['winner_is_default'] else ''}"
                f" | {w['median_us']:.1f} ({w['p10_us']:.1f}–{w['p90_us']:.1f}) "
                f"| {_fmt(p.get('gbps'), 0)} | {_fmt(p.get('roofline_pct'), 1, '%')} "
                f"| {_fmt(p.get('speedup_vs_default'), 3, 'x')} "
                f"| {_fmt(100 * p['margin_vs_runner_up'] if p.get('margin_vs_runner_up') is not None else None, 1, '%')} "
                f"| {p['n_valid']}/{len(p['candidates'])} |")
        L.append("")
        bad = [(p, c) for p in probs if p["op"] == op for c in p.get("candidates", [])
               if c.get("validation") and c["validation"].get("ok") is False]
        if bad:
            L += [f"Validation failures ({len(bad)}; such candidates never win):", ""]
            for p, c in bad[:30]:
                L.append(f"- {p['label']} / {_cfg(c['config'])}: {c['validation']['error']}")
            L.append("")
    if plots is None:
        plots = ["speedup.png", "roofline.png", "candidates.png"]
    L += ["## Plots", ""] + [f"![{n}]({n})" for n in plots]
    if not plots:
        L.append("None: " + ("matplotlib is not installed here (`pip install -e \".[tune]\"`); "
                             "re-render with `python -m autotune.report <this directory>` where "
                             "it is." if _pyplot() is None else "no shape was tuned."))
    return L + [""]


def _spread(i: int, n: int) -> list[float]:
    """x positions of n points around category i (one column per shape)."""
    return [i + ((j + 0.5) / max(n, 1) - 0.5) * 0.7 for j in range(n)]


def _pyplot():
    """matplotlib.pyplot (Agg backend), or None: matplotlib is an optional dependency (the
    "tune" extra), imported only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def render_plots(res: dict, out_dir: Path) -> list[str]:
    """speedup.png, roofline.png, candidates.png (none without matplotlib: report.md says so)."""
    plt = _pyplot()
    if plt is None:
        return []
    probs = [p for p in res.get("problems", []) if p["status"] == "tuned"]
    if not probs:
        return []
    ops = sorted({p["op"] for p in probs})
    made = []

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, op in enumerate(ops):
        ys = [p["speedup_vs_default"] for p in probs if p["op"] == op and p.get("speedup_vs_default")]
        ax.scatter(_spread(i, len(ys)), ys, s=14)
    ax.axhline(1.0, color="gray", lw=1)
    ax.axhline(TARGET_SPEEDUP, color="red", lw=1, ls="--", label=f"{TARGET_SPEEDUP}x target")
    ax.set_xticks(range(len(ops)), ops, rotation=15)
    ax.set_xlim(-0.5, len(ops) - 0.5)
    ax.set_ylabel("tuned / heuristic default speedup")
    ax.set_title(f"{res['meta'].get('arch')}: speedup over the heuristic default, per shape")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)
    made.append("speedup.png")

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for i, op in enumerate(ops):
        ps = [p for p in probs if p["op"] == op and p.get("roofline_pct") is not None]
        xs = _spread(i, len(ps))
        ax.scatter(xs, [p["roofline_pct"] for p in ps], s=14, label="tuned" if i == 0 else None,
                   color="C0")
        dd = [(x, p["default_roofline_pct"]) for x, p in zip(xs, ps)
              if p.get("default_roofline_pct") is not None]
        if dd:
            ax.scatter(*zip(*dd), s=10, marker="x", color="C3",
                       label="heuristic default" if i == 0 else None)
    ax.set_xticks(range(len(ops)), ops, rotation=15)
    ax.set_xlim(-0.5, len(ops) - 0.5)
    ax.set_ylim(0, max(105, ax.get_ylim()[1]))
    ax.set_ylabel("% of measured copy bandwidth")
    ax.set_title("Achieved DRAM rate (compulsory bytes / time) vs the copy roofline")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "roofline.png", dpi=110)
    plt.close(fig)
    made.append("roofline.png")

    fig, axes = plt.subplots(len(ops), 1, figsize=(10, 2.4 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        ps = [p for p in probs if p["op"] == op]
        for x, p in enumerate(ps):
            best = p["winner_timing"]["median_us"]
            for c in p["candidates"]:
                t = c.get("timing")
                if not t:
                    continue
                ax.scatter([x], [t["median_us"] / best], s=8,
                           color="C3" if c.get("is_default") else "C0",
                           alpha=1.0 if c.get("is_default") else 0.5)
        ax.set_ylabel("latency / best")
        ax.set_title(f"{op}: every candidate per shape (red: heuristic default)", fontsize=9)
        ax.set_xticks(range(len(ps)), [str(i) for i in range(len(ps))], fontsize=6)
    fig.tight_layout()
    fig.savefig(out_dir / "candidates.png", dpi=100)
    plt.close(fig)
    made.append("candidates.png")
    return made


def write_report(res: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    made = render_plots(res, out_dir) if res["meta"].get("mode") == "tune" else []
    md = render_markdown(res, made)
    p = out_dir / "report.md"
    p.write_text(md)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m autotune.report <report directory with results.json>")
        return 2
    d = Path(argv[0])
    res = json.loads((d / "results.json").read_text())
    print(write_report(res, d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
