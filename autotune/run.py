#!/usr/bin/env python3
"""Tune the resa_tl TileLang kernels for one GPU architecture and write its schedule.
(Over ~450 lines: the command line, the compile / validate / time pipeline across a compile
pool and a GPU worker process, interruption and the report hand-off are one program.)

    python autotune/run.py --arch sm90                       # default workload (common models)
    python autotune/run.py --arch sm90 --model qwen2.5-7b    # one model's shapes (preset or
                                                             #   path to a config.json)
    python autotune/run.py --arch sm80 --compile-only        # no GPU: compile every candidate
    python autotune/run.py --arch sm90 --check               # re-measure the shipped schedule
    python autotune/run.py --arch sm90 --from-results DIR    # publish a run made elsewhere

A tuning run compiles the candidates of every problem in parallel worker processes (TileLang
disk cache), while one GPU process validates each compiled candidate against the torch
reference and times the valid ones (CUDA graphs, inputs rotated past L2). The GPU process is
watched: a candidate that crashes or hangs it is recorded as such and the run goes on in a
fresh process. Writes:

    schedules/<arch>.json        (--out; the schedule resa_tl loads)
    <user cache>/autotune-reports/<arch>/<date>-<gpu>/report.md
                                 (--report-dir; + results.json, *.png; the user cache is
                                 $RESA_TL_CACHE_DIR, else ~/.cache/resa_tl)

Ctrl-C (SIGINT) or SIGTERM stops a run at once: the compiles and the measurement in flight are
abandoned (not recorded as failures), the worker processes and their nvcc are killed, and a
report marked partial is written (and, for a tuning run, the schedule of what was measured).

Exit status: 0 on success (failed candidates are recorded, not fatal); 2 on usage errors
(e.g. --arch does not match the GPU); with --check, 1 when a tuned entry is now slower than
the heuristic default; 130 after SIGINT, 143 after SIGTERM.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")

from resa_tl import schedules  # noqa: E402

from autotune import workloads  # noqa: E402
from autotune.compile_pool import CompilePool, default_jobs  # noqa: E402
from autotune.report import TARGET_SPEEDUP, write_report, write_results  # noqa: E402

ARCHES = ("sm80", "sm86", "sm89", "sm90")
TIE_TOLERANCE = 0.01         # the heuristic default wins unless another config is > 1% faster
WATCHDOG_S = 240.0           # a GPU process silent this long is considered hung
BUDGET_S = 570.0             # default --budget-s
ROTATION_MEMORY = 4 << 30    # device memory for rotated input sets (beyond a single set)


class UsageError(Exception):
    pass


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: the run stops, writes a partial report, exits 128 + signum. A
    KeyboardInterrupt, so that nothing on the way (e.g. CompilePool.result) records it as a
    failed compile."""

    def __init__(self, signum: int):
        super().__init__(_signame(signum))
        self.signum = signum


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


class StopSignals:
    """SIGINT/SIGTERM handlers: the first signal raises Interrupted in the main thread while
    ``raising`` is on; a later one (or one after the run loop, while the report is written) is
    only noted, so that killing the workers and writing the report are not cut short."""

    def __init__(self):
        self.signum = None
        self.raising = True

    def install(self) -> dict:
        """Returns the previous handlers (main() restores them: tests call it in-process);
        none outside the main thread, where Python allows no handler."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            if self.raising:
                self.raising = False
                raise Interrupted(signum)
        # os.write: print() could re-enter a stream the main thread is writing
        os.write(2, f"\n{_signame(signum)}: already stopping\n".encode())

    def exit_code(self, rc: int) -> int:
        return 128 + self.signum if self.signum is not None else rc


# ------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        prog="autotune/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", required=True, choices=ARCHES,
                    help="GPU architecture to tune for (must be the present GPU's, unless "
                         "--compile-only)")
    ap.add_argument("--model", help="tune one model's shapes: a preset "
                    f"({', '.join(sorted(workloads.PRESETS))}) or a config.json path/dir")
    ap.add_argument("--workload", choices=("default", "quick", "tiny"), default=None,
                    help="without --model: 'default' (common models), 'quick' (two models, "
                         "few shapes), 'tiny' (CI smoke test)")
    ap.add_argument("--ops", default=None,
                    help="comma-separated ops to tune (default: all): "
                         + ", ".join(schedules.KEY_SPECS))
    ap.add_argument("--contexts", type=int, nargs="+", help="with --model: cache capacities")
    ap.add_argument("--batches", type=int, nargs="+", help="with --model: batch sizes")
    ap.add_argument("--block-sizes", type=int, nargs="+", help="with --model: block sizes")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--compile-only", action="store_true",
                      help="no GPU: compile every candidate for --arch, record failures, "
                           "write an untuned (heuristic) schedule")
    mode.add_argument("--check", action="store_true",
                      help="re-measure the schedule's entries on the present GPU")
    mode.add_argument("--from-results", metavar="RESULTS_JSON",
                      help="no GPU: publish a run made elsewhere from its results.json: copy it "
                           "to the report directory, render report.md and plots, write the "
                           "schedule")
    ap.add_argument("--schedule", help="schedule to --check (default: schedules/<arch>.json)")
    ap.add_argument("--check-tolerance", type=float, default=0.03,
                    help="--check fails when tuned > default * (1 + this) (default 0.03)")
    ap.add_argument("--space", choices=("full", "heuristic"), default="full",
                    help="candidates: the search space, or only the heuristic default")
    ap.add_argument("--max-candidates", type=int, default=None,
                    help="candidates per problem (default: adapter's, 12)")
    ap.add_argument("--jobs", type=int, default=None,
                    help=f"compile worker processes (default here: {default_jobs()}, one core "
                         f"left to the GPU process; with --compile-only {default_jobs(True)}, "
                         "every core; 0 = inline)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="tuning runs only: stop starting new problems after this many seconds "
                         f"(default {BUDGET_S:.0f}); ignored by --compile-only and --check, "
                         "which go through every problem (Ctrl-C stops a run: a --compile-only "
                         "or tuning run then writes a partial report)")
    ap.add_argument("--samples", type=int, default=15, help="timed replays per candidate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None,
                    help="schedule file to write (default: schedules/<arch>.json; '-' = none)")
    ap.add_argument("--report-dir", default=None,
                    help="report directory (default: "
                         f"{schedules.user_cache_dir() / 'autotune-reports'}/<arch>/<date>-<gpu>, "
                         "outside the repository; the published reports go to "
                         "autotune/reports/ only when named here)")
    ap.add_argument("--install", action="store_true",
                    help="also copy the schedule to the user cache "
                         f"({schedules.user_cache_dir() / 'schedules'})")
    ap.add_argument("--force", action="store_true",
                    help="allow replacing a tuned schedule with an untuned one")
    ap.add_argument("--merge-with", metavar="SCHEDULE_JSON",
                    help="with a tuning run or --from-results: keep this tuned schedule's "
                         "entries for the shapes the run did not tune (e.g. skipped by the time "
                         "budget); each kept entry names the run it came from")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def selected_ops(args) -> list[str]:
    ops = list(schedules.KEY_SPECS)
    if args.ops:
        want = [o.strip() for o in args.ops.split(",") if o.strip()]
        bad = [o for o in want if o not in ops]
        if bad:
            raise UsageError(f"--ops: unknown op(s) {bad}; known: {', '.join(ops)}")
        ops = [o for o in ops if o in want]
    return ops


def build_workload(args, ops) -> tuple[list, str]:
    if args.model:
        h = workloads.resolve_model(args.model)
        probs = workloads.model_workload(h, ops, args.contexts, args.batches, args.block_sizes)
        return probs, (f"model {h.name}: Hq={h.hq} Hkv={h.hkv} head_dim={h.head_dim} "
                       f"g={h.g} {h.dtype}")
    wl = args.workload or "default"
    fn = {"default": workloads.default_workload, "quick": lambda o: workloads.default_workload(
        o, quick=True), "tiny": workloads.tiny_workload}[wl]
    return fn(ops), wl


# ------------------------------------------------------------------------------------------
# planning
# ------------------------------------------------------------------------------------------

def plan_problems(problems, target: str, space: str, max_candidates: int | None):
    """Per problem: default config and candidates (dicts), or why the op is unavailable."""
    from autotune.spaces import adapter
    items, unavailable = [], {}
    avail: dict = {}
    for p in problems:
        ad = adapter(p.op)
        if p.op not in avail:
            avail[p.op] = ad.available()
            if avail[p.op]:
                unavailable[p.op] = avail[p.op]
        if avail[p.op]:
            continue
        key = p.key
        try:
            default = ad.default_config(key, target)
            if space == "heuristic":
                cands = [default]
            else:
                kw = {} if max_candidates is None else {"max_candidates": max_candidates}
                cands = ad.space(key, target, **kw)
        except Exception as err:                    # noqa: BLE001 - recorded per problem
            items.append(dict(problem=p, op=p.op, key=key, label=p.label(), static_id=None,
                              default=None, candidates=[], error=f"planning failed: {err!r}"))
            continue
        dd = schedules.config_to_dict(default)
        cd = [schedules.config_to_dict(c) for c in cands]
        if dd not in cd:
            cd.insert(0, dd)
        items.append(dict(problem=p, op=p.op, key=key, label=p.label(),
                          static_id=ad.static_id(key), default=dd, candidates=cd, error=None))
    return items, unavailable


def submit_compiles(pool: CompilePool, items):
    futs = []
    for it in items:
        futs.append([pool.submit(it["op"], it["static_id"], it["key"], c)
                     for c in it["candidates"]])
    return futs


# ------------------------------------------------------------------------------------------
# winner selection and per-problem summaries (pure functions, unit-tested)
# ------------------------------------------------------------------------------------------

def _cfg_order(c: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in c.items()))


def select_winner(cands: list[dict], tie_tolerance: float = TIE_TOLERANCE):
    """Index of the winning candidate among those validated and timed, or None.

    Lowest median wins; the heuristic default keeps its place unless another config is more
    than ``tie_tolerance`` faster (no churn on noise); exact ties go to the first config in
    canonical (sorted field) order. Deterministic for given measurements."""
    ok = [i for i, c in enumerate(cands) if c.get("timing") and (c.get("validation") or {}).get("ok")]
    if not ok:
        return None
    best = min(ok, key=lambda i: (cands[i]["timing"]["median_us"], _cfg_order(cands[i]["config"])))
    dflt = next((i for i in ok if cands[i].get("is_default")), None)
    if dflt is not None and cands[dflt]["timing"]["median_us"] <= \
            cands[best]["timing"]["median_us"] * (1 + tie_tolerance):
        return dflt
    return best


def summarize_problem(item: dict, cands: list[dict], copy_gbps: float | None,
                      bytes_moved: int | None) -> dict:
    rec = {k: item[k] for k in ("op", "key", "label")}
    rec["static_id"] = dict(item["static_id"] or ())
    rec["default"] = item["default"]
    rec["candidates"] = cands
    rec["n_valid"] = sum(1 for c in cands if (c.get("validation") or {}).get("ok"))
    rec["bytes"] = bytes_moved
    w = select_winner(cands)
    if w is None:
        rec["status"] = item.get("status") or (
            "no valid candidate" if any(c.get("compile", {}).get("ok") for c in cands)
            else "no candidate compiled")
        return rec
    win = cands[w]
    rec["status"] = "tuned"
    rec["winner"] = win["config"]
    rec["winner_is_default"] = bool(win.get("is_default"))
    rec["winner_timing"] = {k: v for k, v in win["timing"].items() if k != "samples_us"}
    t = win["timing"]["median_us"]
    rec["latency_us"] = t
    others = [c["timing"]["median_us"] for i, c in enumerate(cands)
              if i != w and c.get("timing") and (c.get("validation") or {}).get("ok")]
    rec["runner_up_latency_us"] = min(others) if others else None
    rec["margin_vs_runner_up"] = round(min(others) / t - 1, 4) if others else None
    d = next((c for c in cands if c.get("is_default")), None)
    dt = d["timing"]["median_us"] if d and d.get("timing") and (d.get("validation") or {}).get("ok") else None
    rec["default_latency_us"] = dt
    rec["speedup_vs_default"] = round(dt / t, 4) if dt else None
    if bytes_moved:
        rec["gbps"] = round(bytes_moved / (t * 1e-6) / 1e9, 1)
        if copy_gbps:
            rec["roofline_pct"] = round(100 * rec["gbps"] / copy_gbps, 1)
            if dt:
                rec["default_roofline_pct"] = round(100 * bytes_moved / (dt * 1e-6) / 1e9
                                                    / copy_gbps, 1)
    return rec


def build_schedule(results: dict, arch: str, tuned: bool) -> schedules.Schedule:
    """Schedule entries from a run's problems: tuned winners, or (untuned) the heuristic
    default of every problem whose default compiled."""
    prov = dict(results["meta"]["provenance"])
    prov["report"] = results["meta"].get("report_dir")
    prov["workload"] = results["meta"].get("workload")
    entries = []
    for p in results["problems"]:
        if tuned:
            if p["status"] != "tuned":
                continue
            data = {k: p.get(k) for k in ("latency_us", "default_latency_us",
                                          "runner_up_latency_us", "speedup_vs_default",
                                          "margin_vs_runner_up", "roofline_pct")}
            data.update(default_config=p["default"], candidates=len(p["candidates"]),
                        valid=p["n_valid"], timing_mode=p["winner_timing"].get("mode"))
            entries.append(schedules.Entry(op=p["op"], key=p["key"], config=p["winner"],
                                           tuned=True, data=data))
        else:
            if not p.get("default_compile_ok"):
                continue
            entries.append(schedules.Entry(op=p["op"], key=p["key"], config=p["default"],
                                           tuned=False, data={"latency_us": None,
                                                              "compile_validated": True}))
    seen, uniq = set(), []
    for e in entries:
        ident = (e.op, tuple(sorted(e.key.items())))
        if ident not in seen:
            seen.add(ident)
            uniq.append(e)
    return schedules.Schedule(arch=arch, tuned=tuned, provenance=prov, entries=uniq)


def merge_schedules(new: schedules.Schedule, base_path: Path,
                    results: dict) -> schedules.Schedule:
    """``new`` plus the tuned entries of the schedule at ``base_path`` for shapes the run did
    not reach (skipped by the time budget, or not in its workload). A shape the run measured
    without a winner (no valid candidate) does not get its old entry back. A kept entry's data
    gains ``from_run`` (the base run's report, date and commit, unless it already names an
    earlier run); the header's provenance gains ``merged_from`` with the same and the number of
    entries kept."""
    base = schedules.load_schedule(base_path, expect_arch=new.arch)
    if not base.tuned:
        raise UsageError(f"--merge-with {base_path}: not a tuned schedule")
    bp = base.provenance
    origin = {k: bp.get(k) for k in ("report", "date", "git_commit", "source_sha256", "gpu")}

    def ident(op, key):
        return op, tuple(sorted(key.items()))
    reached = {ident(p["op"], p["key"]) for p in results["problems"]
               if not str(p.get("status", "")).startswith("skipped")}
    have = {ident(e.op, e.key) for e in new.entries} | reached
    kept = [schedules.Entry(op=e.op, key=e.key, config=e.config, tuned=True,
                            data={**e.data, "from_run": e.data.get("from_run", origin)})
            for e in base.entries if e.tuned and ident(e.op, e.key) not in have]
    merged = {**origin, "entries": len(kept)}
    if "merged_from" in bp:
        merged["earlier"] = bp["merged_from"]
    prov = {**new.provenance, "merged_from": merged}
    print(f"schedule: kept {len(kept)} entries of {_rel(base_path)} for shapes this run did "
          f"not tune")
    return schedules.Schedule(arch=new.arch, tuned=True, provenance=prov,
                              entries=new.entries + kept)


# ------------------------------------------------------------------------------------------
# the GPU process
# ------------------------------------------------------------------------------------------

def _gpu_child(task_q, result_q, opts: dict):
    """Validates and times problems sent by the parent; reports progress before each
    candidate so that the parent can attribute a crash or hang."""
    sys.path.insert(0, str(REPO))
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    # a Ctrl-C reaches the whole process group: the parent stops the run and kills this
    # process; a KeyboardInterrupt here would be recorded as the problem's error
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch
        from autotune import measure
        from resa_tl import heuristics
        dev = torch.device("cuda")
        torch.cuda.init()
        info = {"arch": schedules.arch_key(heuristics.arch_of(dev)),
                "l2_bytes": measure.l2_bytes()}
        if opts.get("copy_bw"):
            info["copy_bandwidth"] = measure.copy_bandwidth_gbps()
        result_q.put(("ready", info))
    except BaseException as err:                    # noqa: BLE001
        result_q.put(("fatal", f"GPU process failed to start: {err!r}"))
        return
    while True:
        task = task_q.get()
        if task is None:
            return
        try:
            res = _measure_task(task, info, opts, result_q)
            result_q.put(("done", task["idx"], res))
        except BaseException as err:                # noqa: BLE001 - report and go on
            result_q.put(("done", task["idx"], {"error": f"{type(err).__name__}: {err}",
                                                "trace": traceback.format_exc()[-1500:]}))
        finally:
            _free(torch)


def _free(torch):
    import gc

    from resa_tl import plan
    plan.clear()                                    # plans (and workspaces) of past problems
    gc.collect()
    torch.cuda.empty_cache()


CONTEXT_LOST_EXIT = 70


def _exit_if_context_lost(cuda: bool):
    """After a failed call: a sticky CUDA error (illegal address, launch failure) poisons the
    context for every later call, so end the process; the parent attributes the crash to the
    candidate it was told about last and resumes in a fresh process."""
    if not cuda:
        return
    import torch
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception:                               # noqa: BLE001
        os._exit(CONTEXT_LOST_EXIT)


def _measure_task(task, info, opts, result_q, timer=None):
    """Validate then time the candidates of one problem (in the GPU process).

    ``task``: {"idx", "op", "key", "candidates": [{"config", "is_default", "compile", "skip"?}]}.
    Posts ("cand", idx, i, phase) before each candidate. ``opts["device"]`` (default "cuda")
    and ``timer`` (default measure.time_calls) exist for CPU tests of this flow."""
    import torch
    from autotune import measure
    from autotune.spaces import adapter
    dev = torch.device(opts.get("device", "cuda"))
    cuda = dev.type == "cuda"
    timer = timer or measure.time_calls
    ad = adapter(task["op"])
    key = task["key"]
    out = [dict(c) for c in task["candidates"]]
    seed = opts.get("seed", 0)

    def gen(s):
        return torch.Generator(device=dev).manual_seed(s)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    # 1. validation on a small problem with the same static parameters (same kernel)
    vkey = ad.validation_key(key)
    vin = ad.make_inputs(vkey, dev, gen(seed + 1), ragged=True)
    for i, c in enumerate(out):
        if not (c.get("compile") or {}).get("ok") or c.get("skip"):
            continue
        result_q.put(("cand", task["idx"], i, "validate"))
        cfg = ad.config_from_dict(c["config"])
        try:
            buf = ad.poisoned_out(vin)
            res = ad.call(vin, cfg, out=buf)
            sync()
            err = ad.check(res, vin)
        except torch.OutOfMemoryError as e:
            err = f"out of memory: {str(e)[:200]}"
        except Exception as e:                      # noqa: BLE001 - recorded
            err = f"{type(e).__name__}: {str(e)[:400]}"
            _exit_if_context_lost(cuda)
        c["validation"] = {"ok": err is None, "error": err}
    del vin
    if cuda:
        torch.cuda.empty_cache()
    # 2. timing on the full problem, inputs rotated past 2x L2
    valid = [i for i, c in enumerate(out) if (c.get("validation") or {}).get("ok")]
    if not valid or task.get("validate_only"):
        return {"candidates": out}
    # enough sets that one pass over the bytes the op touches exceeds 2x L2, within a memory
    # cap (sets of a small op over a large cache, e.g. the summary update, are mostly unread)
    n_sets = min(measure.rotation_sets(ad.bytes_moved(key), info["l2_bytes"]),
                 max(1, ROTATION_MEMORY // max(1, ad.alloc_bytes(key))))
    g = gen(seed + 2)
    try:
        sets = [ad.make_inputs(key, dev, g) for _ in range(n_sets)]
    except torch.OutOfMemoryError as e:
        return {"candidates": out, "error": f"out of memory building inputs: {str(e)[:200]}"}
    in_place = task["op"] == "update_block_summaries"
    for i in valid:
        c = out[i]
        result_q.put(("cand", task["idx"], i, "time"))
        cfg = ad.config_from_dict(c["config"])
        try:
            c["timing"] = timer(lambda j, cfg=cfg: ad.call(sets[j], cfg), n_sets,
                                samples=opts.get("samples", 15), in_place=in_place)
        except Exception as e:                      # noqa: BLE001 - recorded
            c["timing"] = None
            c["validation"] = {"ok": False, "error": f"timing failed: {type(e).__name__}: "
                                                     f"{str(e)[:300]}"}
            _exit_if_context_lost(cuda)
    sets.clear()
    return {"candidates": out, "n_sets": n_sets}


class _PipeQueue:
    """put() over the sending end of a pipe (synchronous, unlike mp.Queue)."""

    def __init__(self, conn):
        self.conn = conn

    def put(self, msg):
        self.conn.send(msg)


class GpuRunner:
    """Parent side: one GPU child at a time, restarted after a crash or hang."""

    def __init__(self, opts, child=None, watchdog_s: float = WATCHDOG_S):
        self.opts = opts
        self.child = child or _gpu_child
        self.watchdog_s = watchdog_s
        self.ctx = mp.get_context("spawn")
        self.proc = None
        self.info = None

    def start(self, copy_bw: bool):
        # results come back through a pipe: Connection.send writes synchronously, so the
        # progress message naming the candidate survives a crash right after it (an
        # mp.Queue's feeder thread would die with the process, message unsent)
        self.task_q = self.ctx.Queue()
        recv, send = self.ctx.Pipe(duplex=False)
        self.result_conn = recv
        self.proc = self.ctx.Process(target=self.child, args=(
            self.task_q, _PipeQueue(send), dict(self.opts, copy_bw=copy_bw)), daemon=True)
        self.proc.start()
        send.close()
        msg = self._get(max(self.watchdog_s, 60.0))
        if msg is None or msg[0] != "ready":
            self.kill()
            raise RuntimeError(f"GPU process did not start: {msg[1] if msg else 'timeout'}")
        self.info = msg[1] if self.info is None else {**self.info, **msg[1]}
        return msg[1]

    def _get(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.result_conn.poll(min(1.0, max(0.05, deadline - time.monotonic()))):
                    return self.result_conn.recv()
            except (EOFError, OSError):
                self.proc.join(5)
                return ("dead", self.proc.exitcode)
            if not self.proc.is_alive():
                if self.result_conn.poll(0):
                    continue
                return ("dead", self.proc.exitcode)
            if time.monotonic() >= deadline:
                return None

    def kill(self):
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.proc = None

    def run_task(self, task) -> dict:
        """Measure one problem; a candidate that kills or hangs the process is marked and the
        problem retried without it (at most 3 times)."""
        task = dict(task)
        for _attempt in range(4):
            if self.proc is None or not self.proc.is_alive():
                self.start(copy_bw=False)
            self.task_q.put(task)
            current = None
            while True:
                msg = self._get(self.watchdog_s)
                if msg is not None and msg[0] == "cand":
                    current = msg[2:]
                    continue
                if msg is not None and msg[0] == "done":
                    return msg[2]
                why = ("hung (no progress for %ds)" % self.watchdog_s if msg is None
                       else "lost its CUDA context (sticky CUDA error)"
                       if msg[1] == CONTEXT_LOST_EXIT else f"crashed (exit code {msg[1]})")
                self.kill()
                if current is None:
                    return {"error": f"GPU process {why} before any candidate"}
                i, phase = current
                c = dict(task["candidates"][i])
                c["skip"] = True
                c["validation"] = {"ok": False, "error": f"GPU process {why} during {phase}"}
                task["candidates"] = [c if j == i else x for j, x in enumerate(task["candidates"])]
                break
        return {"error": "too many crashes", "candidates": task["candidates"]}

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            try:
                self.task_q.put(None)
                self.proc.join(15)
            except Exception:                       # noqa: BLE001
                pass
        self.kill()


# ------------------------------------------------------------------------------------------
# modes
# ------------------------------------------------------------------------------------------

def present_gpu_arch() -> str | None:
    import torch
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm{major}{minor}"


def check_arch(args):
    present = present_gpu_arch()
    if present is None:
        raise UsageError(
            f"no CUDA GPU here, so --arch {args.arch} cannot be {'checked' if args.check else 'tuned'}"
            f". To compile every candidate for {args.arch} without a GPU, run:\n"
            f"  python autotune/run.py --arch {args.arch} --compile-only")
    if present != args.arch:
        import torch
        raise UsageError(
            f"--arch {args.arch} does not match the present GPU ({torch.cuda.get_device_name()}"
            f", {present}). Tune on an {args.arch} GPU, run with --arch {present}, or compile "
            f"the {args.arch} candidates without running them:\n"
            f"  python autotune/run.py --arch {args.arch} --compile-only")
    return present


def _progress(total, desc, disable):
    try:
        from tqdm import tqdm
        return tqdm(total=total, desc=desc, disable=disable, dynamic_ncols=True,
                    file=sys.stderr)
    except ImportError:
        class _P:
            def __init__(self):
                self.n = 0

            def update(self, k=1):
                self.n += k
                if not disable:
                    print(f"{desc}: {self.n}/{total}", file=sys.stderr)

            def set_postfix_str(self, s):
                pass

            def close(self):
                pass
        return _P()


def default_report_dir(arch: str, gpu: str, compile_only: bool, day: str | None = None) -> Path:
    """<user cache>/autotune-reports/<arch>/<date>-<gpu>: outside the repository, so that a
    user's run does not show up as uncommitted files there (the reports published under
    autotune/reports/ are written with an explicit --report-dir)."""
    from autotune.provenance import gpu_slug
    day = day or datetime.date.today().isoformat()
    base = schedules.user_cache_dir() / "autotune-reports" / arch / (
        f"{day}-compile-only" if compile_only else f"{day}-{gpu_slug(gpu)}")
    d, n = base, 2
    while d.exists():
        d = base.with_name(f"{base.name}-{n}")
        n += 1
    return d


def _log_dir() -> str:
    import tempfile
    d = tempfile.mkdtemp(prefix="resa_tl_compile_logs_")
    print(f"compile worker logs: {d}")
    return d


def _rel(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(REPO))
    except ValueError:
        return str(p)


def write_outputs(results, args, tuned: bool, schedule: bool = True):
    rd = Path(results["meta"]["report_dir"])
    write_results(results, rd)
    rep = write_report(results, rd)
    print(f"report: {_rel(rep)}" + (" (partial)" if results["meta"].get("partial") else ""))
    if args.out == "-":
        return
    if not schedule:
        print("schedule: not written (the run was interrupted)")
        return
    out = Path(args.out) if args.out else REPO / "schedules" / f"{args.arch}.json"
    sched = build_schedule(results, args.arch, tuned)
    if not sched.entries:
        print("schedule: no entries, nothing written")
        return
    if out.exists() and not tuned and not args.force:
        try:
            old = json.loads(out.read_text())
            if old.get("tuned"):
                print(f"schedule: {_rel(out)} holds a tuned schedule; not replacing it with an "
                      f"untuned one (use --force or --out)")
                return
        except (OSError, json.JSONDecodeError):
            pass
    if getattr(args, "merge_with", None):
        if tuned:
            sched = merge_schedules(sched, Path(args.merge_with), results)
        else:
            print("schedule: --merge-with ignored (this run is untuned)")
    schedules.parse_schedule(sched.to_json(), path=str(out), installed_tilelang=None)
    schedules.write_schedule(sched, out)
    print(f"schedule: {_rel(out)} ({len(sched.entries)} entries, "
          f"{'tuned' if tuned else 'untuned'})")
    if args.install:
        dst = schedules.user_cache_dir() / "schedules" / f"{args.arch}.json"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, dst)
        print(f"schedule installed: {dst}")


def _meta(args, prov, workload, items, unavailable, t0, report_dir, mode, **extra):
    return dict(mode=mode, arch=args.arch, target=schedules.target_arch(args.arch),
                provenance=prov, workload=workload, report_dir=_rel(report_dir),
                problems=len(items), unavailable=unavailable,
                elapsed_s=round(time.monotonic() - t0, 1), **extra)


def _interrupt_meta(signum, n_finished: int) -> dict:
    if signum is None:
        return {}
    return {"partial": True, "interrupted": _signame(signum), "problems_finished": n_finished}


def _abandoned(signum) -> dict:
    return {"ok": None, "seconds": None,
            "error": f"abandoned: the run was interrupted by {_signame(signum)}"}


def _unfinished_candidates(it, fl, pool, signum) -> list[dict]:
    """After an interrupt: a problem's candidates with the compiles that finished; the others
    abandoned (neither compiled nor failed)."""
    fl = fl if fl is not None else [None] * len(it["candidates"])
    return [{"config": c, "is_default": c == it["default"],
             "compile": (pool.peek(f) if pool is not None else None) or _abandoned(signum)}
            for c, f in zip(it["candidates"], fl)]


def _mark_abandoned(records, signum):
    for r in records:
        if signum is not None and r.get("ok") is None:
            r["error"] = _abandoned(signum)["error"]
    return records


def _compile_only_problem(it, recs, status=None) -> dict:
    p = {k: it[k] for k in ("op", "key", "label", "default")}
    p["static_id"] = dict(it["static_id"] or ())
    p["candidates"] = recs
    p["default_compile_ok"] = next((r["compile"]["ok"] for r in recs if r["is_default"]),
                                   False)               # None: abandoned (interrupted)
    p["status"] = status or it["error"] or (
        "compiled" if all(r["compile"]["ok"] for r in recs) else "some candidates failed")
    return p


def run_compile_only(args, ops, t0, stop: StopSignals):
    from autotune import provenance
    target = schedules.target_arch(args.arch)
    prov = provenance.collect(args.arch, target, gpu=False)     # the sources as compiled
    problems, wl = build_workload(args, ops)
    items, unavailable = plan_problems(problems, target, args.space, args.max_candidates)
    jobs = default_jobs(compile_only=True) if args.jobs is None else args.jobs
    pool = bar = signum = None
    futs, probs, records = [], [], []
    try:                                # from the first worker on: the finally stops them
        pool = CompilePool(jobs, target, timeout_s=600, log_dir=_log_dir())
        futs = submit_compiles(pool, items)
        n = sum(len(f) for f in futs)
        print(f"{args.arch} ({target}) compile-only: {len(items)} problems, {n} candidate "
              f"compiles ({len(pool._futures)} distinct kernels), {jobs} workers", flush=True)
        bar = _progress(len(items), "compile", args.no_progress)
        for it, fl in zip(items, futs):
            recs = []
            for c, f in zip(it["candidates"], fl):
                r = pool.result(f)
                recs.append({"config": c, "is_default": c == it["default"], "compile": r})
            probs.append(_compile_only_problem(it, recs))
            bar.update(1)
    except Interrupted as intr:
        signum = intr.signum
        for i in range(len(probs), len(items)):
            it = items[i]
            recs = _unfinished_candidates(it, futs[i] if i < len(futs) else None, pool, signum)
            probs.append(_compile_only_problem(
                it, recs, f"not finished (interrupted by {_signame(signum)})"))
    finally:
        stop.raising = False
        if bar is not None:
            bar.close()
        if pool is not None:
            records = pool.records()
            pool.shutdown()             # kills the workers and their nvcc
    n_done = len(probs) if signum is None else sum(
        not p["status"].startswith("not finished") for p in probs)
    rd = Path(args.report_dir) if args.report_dir else default_report_dir(args.arch, "", True)
    results = {"meta": _meta(args, prov, wl, items, unavailable, t0, rd, "compile-only",
                             compile_jobs=jobs, space=args.space,
                             **_interrupt_meta(signum, n_done)),
               "problems": probs, "compiles": _mark_abandoned(records, signum)}
    # an interrupted run's untuned schedule would lack the shapes not reached: not written
    write_outputs(results, args, tuned=False, schedule=signum is None)
    ok = sum(1 for r in records if r.get("ok"))
    failed = sum(1 for r in records if r.get("ok") is False)
    if signum is not None:
        print(f"\ninterrupted by {_signame(signum)} after {time.monotonic() - t0:.0f} s: "
              f"{n_done}/{len(items)} problems done; compiled {ok}/{len(records)} kernels, "
              f"{failed} failed, {len(records) - ok - failed} abandoned (partial report)")
        return 128 + signum
    print(f"\ncompiled {ok}/{len(records)} kernels for {args.arch} in "
          f"{time.monotonic() - t0:.0f} s; {failed} failed (see the report)")
    for op, why in unavailable.items():
        print(f"  {op}: not available: {why}")
    return 0


def run_tune(args, ops, t0, stop: StopSignals):
    from autotune import provenance
    from autotune.spaces import adapter
    check_arch(args)
    target = schedules.target_arch(args.arch)
    prov = provenance.collect(args.arch, target, gpu=True)      # the sources as tuned
    problems, wl = build_workload(args, ops)
    items, unavailable = plan_problems(problems, target, args.space, args.max_candidates)
    jobs = default_jobs() if args.jobs is None else args.jobs
    pool = gpu = bar = signum = None
    futs, probs, records, info, copy, truncated, n_done = [], [], [], {}, {}, False, 0
    try:                                # from the first worker on: the finally stops them
        pool = CompilePool(jobs, target, timeout_s=600, log_dir=_log_dir())
        futs = submit_compiles(pool, items)
        print(f"{args.arch} tuning: {len(items)} problems, "
              f"{sum(len(i['candidates']) for i in items)} candidates, {len(pool._futures)} "
              f"distinct kernels compiled by {jobs} workers; budget {args.budget_s:.0f} s")
        for op, why in unavailable.items():
            print(f"  {op}: not tuned: {why}")
        gpu = GpuRunner({"seed": args.seed, "samples": args.samples})
        try:
            info = gpu.start(copy_bw=True)
        except RuntimeError as err:
            raise UsageError(str(err)) from None
        copy = info.get("copy_bandwidth") or {}
        print(f"copy roofline: {copy.get('gbps')} GB/s; L2 {info['l2_bytes'] / 2**20:.0f} MiB")
        bar = _progress(len(items), "tune", args.no_progress)
        for it, fl in zip(items, futs):
            over = time.monotonic() - t0 > args.budget_s
            cands = []
            for c, f in zip(it["candidates"], fl):
                if over:
                    comp = pool.result(f, 0) if f.done() else {
                        "ok": None, "seconds": None, "error": "not waited for (time budget)"}
                else:
                    remaining = max(1.0, args.budget_s - (time.monotonic() - t0))
                    comp = pool.result(f, timeout=remaining)
                cands.append({"config": c, "is_default": c == it["default"], "compile": comp})
            if over or time.monotonic() - t0 > args.budget_s:
                truncated = True
                probs.append(summarize_problem(dict(it, status="skipped (time budget)"), cands,
                                               None, None))
                bar.update(1)
                continue
            if it["error"]:
                probs.append(summarize_problem(dict(it, status=it["error"]), cands, None, None))
                bar.update(1)
                continue
            res = gpu.run_task({"idx": len(probs), "op": it["op"], "key": it["key"],
                                "candidates": cands})
            cands = res.get("candidates", cands)
            status = None if "error" not in res else f"error: {res['error']}"
            p = summarize_problem(dict(it, status=status), cands, copy.get("gbps"),
                                  adapter(it["op"]).bytes_moved(it["key"]))
            if "error" in res:
                p["error"] = res["error"]
            p["n_sets"] = res.get("n_sets")
            probs.append(p)
            bar.update(1)
            if p["status"] == "tuned":
                bar.set_postfix_str(f"{it['op']} {p['latency_us']:.0f}us "
                                    f"x{p.get('speedup_vs_default') or 0:.2f}")
    except Interrupted as intr:
        # Ctrl-C, or a time limit's SIGTERM: stop measuring now and keep what was measured;
        # the problem in flight and the rest are "skipped" (--merge-with keeps older entries)
        signum, truncated = intr.signum, True
        if gpu is not None:
            gpu.kill()
        n_done = len(probs)
        for i in range(n_done, len(items)):
            it = items[i]
            cands = _unfinished_candidates(it, futs[i] if i < len(futs) else None, pool, signum)
            probs.append(summarize_problem(
                dict(it, status=f"skipped (interrupted by {_signame(signum)})"), cands,
                None, None))
    finally:
        stop.raising = False
        if bar is not None:
            bar.close()
        if gpu is not None:
            gpu.close()
        if pool is not None:
            records = pool.records()
            pool.shutdown()             # kills the workers and their nvcc
    rd = Path(args.report_dir) if args.report_dir else default_report_dir(
        args.arch, prov.get("gpu", ""), False)
    results = {"meta": _meta(args, prov, wl, items, unavailable, t0, rd, "tune",
                             compile_jobs=jobs, budget_s=args.budget_s, truncated=truncated,
                             copy_bandwidth=copy, l2_bytes=info.get("l2_bytes"),
                             samples=args.samples, tie_tolerance=TIE_TOLERANCE,
                             **_interrupt_meta(signum, n_done)),
               "problems": probs, "compiles": _mark_abandoned(records, signum)}
    write_outputs(results, args, tuned=True)
    print_summary(results)
    return 0 if signum is None else 128 + signum


def print_summary(results):
    probs = results["problems"]
    print()
    print(f"{'op':24s} {'tuned':>7s} {'median x':>9s} {'max x':>7s} {'best %roof':>10s} "
          f"{'failed cands':>12s}")
    allsp = []
    for op in sorted({p["op"] for p in probs}):
        ps = [p for p in probs if p["op"] == op]
        sp = [p["speedup_vs_default"] for p in ps if p.get("speedup_vs_default")]
        allsp += sp
        roof = [p["roofline_pct"] for p in ps if p.get("roofline_pct") is not None]
        failed = sum(1 for p in ps for c in p.get("candidates", [])
                     if not (c.get("compile") or {}).get("ok")
                     or (c.get("validation") or {}).get("ok") is False)
        print(f"{op:24s} {sum(p['status'] == 'tuned' for p in ps):>3d}/{len(ps):<3d} "
              f"{statistics.median(sp) if sp else float('nan'):>9.3f} "
              f"{max(sp) if sp else float('nan'):>7.3f} "
              f"{max(roof) if roof else float('nan'):>10.1f} {failed:>12d}")
    if allsp:
        med = statistics.median(allsp)
        print(f"\nmedian speedup over the heuristic default: {med:.3f}x "
              f"({'meets' if med >= TARGET_SPEEDUP else 'does NOT meet'} the "
              f"{TARGET_SPEEDUP}x target); elapsed {results['meta']['elapsed_s']:.0f} s"
              + (" (truncated by the time budget)" if results["meta"].get("truncated") else ""))


def run_check(args, ops, t0):
    from autotune.spaces import adapter
    check_arch(args)
    target = schedules.target_arch(args.arch)
    path = Path(args.schedule) if args.schedule else (
        schedules.packaged_schedule_path(args.arch) or REPO / "schedules" / f"{args.arch}.json")
    try:
        sched = schedules.load_schedule(path, expect_arch=args.arch)
    except schedules.ScheduleError as err:
        raise UsageError(str(err)) from None
    entries = [e for e in sched.entries if e.op in ops]
    print(f"checking {len(entries)} entries of {_rel(path)} ({'tuned' if sched.tuned else 'untuned'}"
          f", {sched.provenance.get('gpu')}, {sched.provenance.get('date')})")
    jobs = default_jobs() if args.jobs is None else args.jobs
    pool = gpu = None
    items, rows, failures = [], [], 0
    try:                                # from the first worker on: the finally stops them
        pool = CompilePool(jobs, target, timeout_s=600, log_dir=_log_dir())
        for e in entries:
            ad = adapter(e.op)
            why = ad.available()
            if why:
                items.append((e, None, why))
                continue
            dflt_obj = ad.default_config(e.key, target)
            default = schedules.config_to_dict(dflt_obj)
            try:                                # what config_for would run: entry over default
                tuned_cfg = schedules.config_to_dict(schedules.apply_config(dflt_obj, e.config))
            except (TypeError, ValueError) as err:
                items.append((e, None, f"entry does not fit the kernel's config: {err}"))
                continue
            cands = [tuned_cfg] + ([default] if default != tuned_cfg else [])
            futs = [pool.submit(e.op, ad.static_id(e.key), e.key, c) for c in cands]
            items.append((e, (cands, futs, default), None))
        gpu = GpuRunner({"seed": args.seed, "samples": args.samples})
        try:
            gpu.start(copy_bw=False)
        except RuntimeError as err:
            raise UsageError(str(err)) from None
        for e, plan, why in items:
            if plan is None:
                rows.append((e, None, None, e.latency_us, f"FAILED: {why}"))
                failures += int(e.tuned)
                continue
            cands, futs, default = plan
            cl = [{"config": c, "is_default": c == default, "compile": pool.result(f)}
                  for c, f in zip(cands, futs)]
            res = gpu.run_task({"idx": 0, "op": e.op, "key": e.key, "candidates": cl})
            cl = res.get("candidates", cl)
            t = [c["timing"]["median_us"] if c.get("timing") else None for c in cl]
            tuned_t = t[0]
            default_t = t[1] if len(t) > 1 else t[0]
            note = ""
            if tuned_t is None:
                v = cl[0].get("validation") or {}
                note = "FAILED: " + str(v.get("error") or (cl[0].get("compile") or {}).get("error")
                                        or res.get("error"))[:120]
                failures += int(e.tuned)
            elif e.tuned and default_t is not None and \
                    tuned_t > default_t * (1 + args.check_tolerance):
                note = "SLOWER than the heuristic default"
                failures += 1
            rows.append((e, tuned_t, default_t, e.latency_us, note))
    finally:
        if gpu is not None:
            gpu.close()
        if pool is not None:
            pool.shutdown()
    print(f"\n{'op':22s} {'shape':58s} {'recorded':>9s} {'now':>9s} {'ratio':>6s} "
          f"{'default':>9s} {'x dflt':>6s}  note")
    for e, now, dflt, rec, note in rows:
        label = workloads.problem_from_entry(e.op, e.key).label()
        ratio = f"{now / rec:.3f}" if now and rec else "—"
        xd = f"{dflt / now:.3f}" if now and dflt else "—"
        print(f"{e.op:22s} {label[:58]:58s} {rec or 0:9.1f} {now or 0:9.1f} {ratio:>6s} "
              f"{dflt or 0:9.1f} {xd:>6s}  {note}")
    print(f"\n{failures} tuned entr{'y' if failures == 1 else 'ies'} failed the check"
          if failures else "\nall tuned entries are at least as fast as the heuristic default")
    return 1 if failures else 0


def run_from_results(args):
    """Publish a tuning run's results.json (e.g. fetched from a remote GPU machine)."""
    src = Path(args.from_results)
    if src.is_dir():
        src = src / "results.json"
    try:
        results = json.loads(src.read_text())
        meta = results["meta"]
    except (OSError, json.JSONDecodeError, KeyError) as err:
        raise UsageError(f"--from-results {src}: not a results.json of autotune/run.py: {err}")
    if meta.get("arch") != args.arch:
        raise UsageError(f"--from-results {src}: the run was for {meta.get('arch')}, not "
                         f"--arch {args.arch}")
    tuned = meta.get("mode") == "tune"
    day = str(meta.get("provenance", {}).get("date", ""))[:10] or None
    rd = Path(args.report_dir) if args.report_dir else default_report_dir(
        args.arch, meta.get("provenance", {}).get("gpu", ""), not tuned, day)
    meta["report_dir"] = _rel(rd)
    write_outputs(results, args, tuned=tuned)
    if tuned:
        print_summary(results)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.monotonic()
    if args.budget_s is not None and (args.compile_only or args.check):
        # it used to be accepted silently, and a user expected it to shorten the run
        mode = "--compile-only" if args.compile_only else "--check"
        print(f"warning: --budget-s is ignored with {mode}: it limits tuning runs only"
              + (" (every candidate is compiled; Ctrl-C stops the run with a partial report)"
                 if args.compile_only else ""), file=sys.stderr)
    if args.budget_s is None:
        args.budget_s = BUDGET_S
    stop = StopSignals()
    previous = stop.install()
    try:
        ops = selected_ops(args)
        if args.compile_only:
            return stop.exit_code(run_compile_only(args, ops, t0, stop))
        if args.check:
            return stop.exit_code(run_check(args, ops, t0))
        if args.from_results:
            return stop.exit_code(run_from_results(args))
        return stop.exit_code(run_tune(args, ops, t0, stop))
    except Interrupted as intr:         # before a run loop started, or --check: no report
        print(f"\ninterrupted by {_signame(intr.signum)}: no report written", file=sys.stderr)
        return 128 + intr.signum
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except ValueError as err:                       # bad --model etc.
        if "--model" in str(err):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
