"""Stock transformers generate(): decode speed with and without resa_tl.attach, on one GPU.

The first thing a user measures: take a checkpoint, call ``resa_tl.attach(model)``, keep the
same ``model.generate(...)`` call, and compare decode tokens/s with the model left alone.
bench_e2e.py measures the kernels' ceiling in a hand-written CUDA-graph decoder; this script
measures what transformers' own generate loop makes of them.

Model: transformers' Qwen2ForCausalLM with Qwen2.5-7B's shape (28 layers, 28 q / 4 kv heads,
head_dim 128, hidden 3584, intermediate 18944, vocab 152064), bf16, random weights built from the
config (no download; the speed does not depend on the weights). Per (context, batch): a random
prompt of ``context`` tokens in every row (no padding), then ``--new-tokens`` greedy tokens
(``eos_token_id=None``, so every row decodes all of them).

Modes:
  resa          resa_tl.attach(model) (its defaults) and the plain call: resa_tl's decoding
                loop (chunked prefill, decode steps replayed from CUDA graphs)
  resa-compiled the same with attach(compile_layers=True): decoder layers torch.compiled
                around ReSA's cache write and attention, inside the CUDA graphs
  full          resa_tl.attach(sparse_ratio=1.0, rectify_every=0), the plain call: every block
                kept and no rectification, which the integration runs as dense attention
                (resa_tl's dense_decode kernel) over the same cache in the same loop: the
                same-harness dense baseline (it also keeps the block summaries up to date,
                one small kernel per layer and step)
  dense         attn_implementation="sdpa", the default (dynamic) cache, eager
  dense-static  sdpa, cache_implementation="static": generate() torch.compiles the decode step
                (mode "reduce-overhead": CUDA graphs)
  (``--stock-prefill-chunk N``: the two dense modes pass prefill_chunk_size=N, transformers'
  chunked prefill, without which long prompts do not fit)
  resa-eager    resa_tl.attach, cache_implementation="dynamic": transformers' own loop, eager
  resa-static   resa_tl.attach, cache_implementation="static": transformers' own loop,
                torch.compiled the same way as dense-static
  lossless      resa_tl.attach(lossless=True): sparse proposals verified by the dense passes,
                output equal to dense greedy decoding. Random weights make sparse and dense
                disagree at almost every token, so ``--acceptance FILE`` replays a real
                model's verdicts (``benchmarks/lossless_acceptance.py --trace-json``): row b
                takes the b-th ``--new-tokens`` stretch of the recorded streams. Its ms/token
                is the decode time (first token to last) over the tokens committed after the
                first, since its steps are not one per token; also reported: acceptance and
                tokens committed per dense pass, and a window's time split into its
                sparse steps, its dense pass and the host-side rest (VerifyStats.time_split).
                It always runs at least two calls and
                times the last: its windows are recorded as they first occur, mid-decode

Each mode runs generate() ``--calls`` times (default 2) with the same arguments and times the
last (the first compiles or records); ``call_wall_s`` is each call's wall time, so the first
call's one-time cost (cache allocation, kernel loading, graph recording or compiling) is the
difference between the first two. One call is enough for the decode time (recording and
compiling happen in the first cycle, which the average leaves out), not for the prefill time.
Peak GPU memory (torch's allocator) is taken for the prefill (up to the first logits) and for
the decoding after it. A LogitsProcessor records a CUDA event after each step's logits (no host sync;
_timing.Marks). The default 133 new tokens are a prefill and 132 decode steps = 4 cycles of
f + 1 = 33 steps for f = 32 (a cycle ends with the rectification step); ms/token is the mean
step over the last 3 cycles (the first absorbs CUDA-graph recording, if generate() records
again), which excludes the prefill and weighs ReSA's rectification steps in their real
proportion. ``ms_per_token_all`` is the mean over all 132 steps. Also reported: the median
step (a sparse step for ReSA), the slowest step, the prefill (generate() call to the first
logits) and, for ReSA, how many rectifications ran. Speedups: over the faster stock dense mode (dense,
dense-static) of the same shape, and over full.

    python benchmarks/bench_generate.py [--contexts 32768] [--batches 8] [--modes ...]
    python benchmarks/bench_generate.py --precompile ...   # CPU: fill TileLang's kernel cache
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import itertools
import json
import math
import statistics
import sys
import time
import types

import torch

import resa_tl
from resa_tl import ReSAConfig, heuristics, ops

from _timing import Marks, git_commit, trace_events, window_kernels
from bench_e2e import Qwen7BShape, kernel_group

MODES = ("resa", "full", "dense", "dense-static", "resa-eager", "resa-static", "lossless",
         "resa-compiled")


def model_config(layers: int, max_positions: int):
    """transformers' Qwen2Config of bench_e2e's Qwen2.5-7B shape (rope theta 1e6, untied)."""
    import transformers
    s = Qwen7BShape(layers=layers)
    return transformers.Qwen2Config(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.inter,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
        head_dim=s.head_dim, rope_theta=1e6, tie_word_embeddings=False,
        max_position_embeddings=max_positions, pad_token_id=0, bos_token_id=1, eos_token_id=2)


class StepTimer(Marks):
    """LogitsProcessor that stamps each generate() step (_timing.Marks: a CUDA event recorded
    on the stream, no sync, on CUDA; the host clock elsewhere). At its first call (the
    prefill's logits are out) it also takes the allocator's peak so far and resets it, so
    ``peaks`` ends as [prefill peak, decode peak] in bytes (a host query, no sync)."""

    prefix_free = True            # reads no ids: resa_tl's lossless loop calls it once a step

    def __init__(self, device):
        super().__init__(device)
        self.cuda = torch.device(device).type == "cuda"
        self.peaks = []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def __call__(self, input_ids, scores):
        self.mark()
        if self.cuda and not self.peaks:
            self.peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()
        return scores

    def decode_peak(self):
        if self.cuda:
            self.peaks.append(torch.cuda.max_memory_allocated())
        return self.peaks


def mode_config(mode: str, cfg: ReSAConfig) -> ReSAConfig | None:
    """The ReSAConfig a mode attaches with (None: the model is left alone)."""
    if mode == "full":
        return cfg.replace(sparse_ratio=1.0, rectify_every=0)
    if mode == "lossless":
        return cfg.replace(lossless=True)
    return cfg if mode.startswith("resa") else None


def steady_steps(steps: list, cycle: int) -> list:
    """The decode steps to average: the last whole cycles of ``cycle`` steps (a ReSA cycle is f
    sparse steps and the rectification that closes it), the first cycle left out (CUDA-graph
    recording). Cycles start at the first decode step (its rectification is step f + 1), so
    the window is steps[cycle : cycle * whole cycles]; fewer than two cycles: all steps."""
    n = len(steps) // cycle
    return steps[cycle:n * cycle] if n >= 2 else steps


@contextlib.contextmanager
def generating_in(model, ids, mode, new_tokens, cfg, stock_chunk=None):
    """Inside: the model set up for ``mode`` (attached or not), and a function that runs
    generate() greedily with a LogitsProcessor; detached again on exit."""
    from transformers import LogitsProcessorList
    attach_cfg = mode_config(mode, cfg)
    if attach_cfg is not None:
        resa_tl.attach(model, attach_cfg, compile_layers=mode == "resa-compiled")
    kw = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
              return_dict_in_generate=True)                 # no EOS: every row decodes them all
    if mode.endswith("static"):
        kw["cache_implementation"] = "static"
    elif mode == "resa-eager":
        kw["cache_implementation"] = "dynamic"
    if stock_chunk and mode in ("dense", "dense-static"):
        kw["prefill_chunk_size"] = stock_chunk              # transformers' chunked prefill

    def generate(processor):
        return model.generate(ids, attention_mask=torch.ones_like(ids),
                              logits_processor=LogitsProcessorList([processor]), **kw)
    try:
        yield generate
    finally:
        if attach_cfg is not None:
            resa_tl.detach(model)


def replay_streams(path: str, rows: int, new_tokens: int) -> list:
    """Row b's 0/1 verdicts: the b-th ``new_tokens`` stretch of the recorded streams, taken
    in the file's order (each stream cut into whole stretches)."""
    with open(path) as fh:
        streams = json.load(fh)["streams"]
    out = [s[i:i + new_tokens] for s in streams.values()
           for i in range(0, len(s) - new_tokens + 1, new_tokens)]
    if len(out) < rows:
        raise ValueError(f"{path} holds {len(out)} stretches of {new_tokens} tokens; "
                         f"{rows} rows need one each")
    return out[:rows]


def run_mode(model, ids, mode, new_tokens, cfg, calls=2, stock_chunk=None, replay=None):
    """generate() ``calls`` times in this mode; returns the timings of the last call.
    ``replay``: the lossless mode's per-row verdicts (replay_streams)."""
    if mode == "lossless":              # its verify windows are recorded as they first occur
        calls = max(calls, 2)
    with generating_in(model, ids, mode, new_tokens, cfg, stock_chunk) as generate:
        if replay is not None:                  # the cache generate() will reuse, replaying
            from resa_tl.integration import warm_up
            warm_up(model, ids.shape[0], ids.shape[1] + new_tokens).replay_acceptance = replay
        walls = []
        for attempt in range(calls):
            timer = StepTimer(ids.device)
            t0 = time.perf_counter()
            timer.mark()                                       # before the prefill
            out = generate(timer)
            peaks = timer.decode_peak()
            gaps = timer.ms_between()
            walls.append(round(time.perf_counter() - t0, 2))
        rect = getattr(out.past_key_values, "num_rectifications", None)
        stats = getattr(out.past_key_values, "lossless_stats", None) if mode == "lossless" \
            else None
        generated = out.sequences.shape[1] - ids.shape[1]
        del out
    prefill, steps = gaps[0], gaps[1:]
    B = ids.shape[0]
    extra = {}
    if stats is not None:               # lossless: forwards are not one per token
        per_token = sum(steps) / (generated - 1)
        steady = steps
        extra = dict(acceptance=stats.acceptance, tokens_per_pass=stats.tokens_per_pass,
                     verify_passes=stats.verify_passes, replayed=replay is not None,
                     **{k: round(v, 3) for k, v in stats.time_split().items()})
    else:
        steady = steady_steps(steps, cfg.rectify_every + 1)
        per_token = sum(steady) / len(steady)
    return dict(mode=mode, generated=generated, prefill_ms=prefill, ms_per_token=per_token,
                ms_per_token_all=sum(steps) / max(generated - 1, 1) if stats is not None
                else sum(steps) / len(steps), steady_steps=len(steady),
                median_step_ms=statistics.median(steps), max_step_ms=max(steps),
                tokens_per_s=B * 1e3 / per_token, rectifications=rect, calls=calls,
                peak_prefill_gib=round(peaks[0] / 2**30, 2) if peaks else None,
                peak_decode_gib=round(peaks[1] / 2**30, 2) if peaks else None,
                call_wall_s=walls, **extra)


class StepMarker:
    """LogitsProcessor that leaves a zero-length profiler annotation at each step (for
    profile_mode: the CPU and CUDA events of a torch.profiler trace share one clock)."""

    def __call__(self, input_ids, scores):
        with torch.profiler.record_function("bench_generate_step"):
            pass
        return scores


def profile_mode(model, ids, mode, new_tokens, cfg):
    """One more generate() in this mode under torch.profiler (after run_mode compiled it):
    GPU busy time per decode step and kernel time per step by class, over the same steady
    window as the timing (whole cycles, the first left out). The window opens at the step mark
    that starts it, a cycle after the prefill: a mark is taken when the host has queued a step,
    so the first marks come while the prefill's last kernels still run. Busy time is the union
    of the kernel intervals inside the window; each kernel counts only its part inside it. The
    timed run's ms per step minus the busy time is roughly what the GPU spends waiting for the
    host (roughly: these are two generate() calls)."""
    from torch.profiler import ProfilerActivity, profile
    with generating_in(model, ids, mode, new_tokens, cfg) as generate, \
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        generate(StepMarker())
        if ids.is_cuda:
            torch.cuda.synchronize()
    return trace_summary(trace_events(prof), cfg.rectify_every + 1, kernel_group)


def trace_summary(events, cycle: int, group) -> dict:
    """From a Chrome trace's events (µs): the step marks (CPU annotations "bench_generate_step",
    marks[i] after step i, 0 = the prefill) and the CUDA kernels, the GPU busy time per decode
    step over the steady window (steady_steps: steps marks[j] -> marks[j + 1]) and kernel time
    per step by ``group(name)``. Kernels are clipped to the window; busy time is the union of the
    clipped intervals (kernels that overlap, e.g. under PDL, count once there, but each in its
    own class): _timing.window_kernels."""
    marks = sorted(e["ts"] for e in events if e.get("name") == "bench_generate_step")
    window = steady_steps(list(range(len(marks) - 1)), cycle)
    t0, t1 = marks[window[0]], marks[window[-1] + 1]
    steps = len(window)
    busy, classes, launches = window_kernels(events, t0, t1, group)
    per_step = {g: us / steps / 1e3 for g, us in classes.items()}
    return dict(steps=steps, window_ms_per_step=(t1 - t0) / steps / 1e3,
                gpu_busy_ms_per_step=busy / steps / 1e3,
                launches_per_step=launches / steps,
                kernel_ms_per_step={k: round(v, 4) for k, v in
                                    sorted(per_step.items(), key=lambda kv: -kv[1])})


def random_prompt(vocab: int, batch: int, context: int, device):
    """Token ids [batch, context] drawn from [3, vocab), seeded by the shape (special ids
    0-2 left out), the same on every run and every rank."""
    g = torch.Generator().manual_seed(context + batch)
    return torch.randint(3, vocab, (batch, context), generator=g).to(device)


def free_memory(model):
    """Between modes: drop generate()'s compiled forward (the next mode has another attention
    implementation) and the CUDA-graph memory pools behind it."""
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def capacity_for(context: int, new_tokens: int, layers: int = 28,
                 cfg: ReSAConfig | None = None) -> int:
    """The ReSA cache capacity generate() will ask for: the integration's own bucketing of
    max_length - 1 tokens (transformers' cache size for prompt + new tokens), plus the
    lossless mode's slack."""
    from resa_tl.integration.hf import bucketed_capacity, lossless_slack
    model = types.SimpleNamespace(config=model_config(layers, context + new_tokens))
    slack = lossless_slack(cfg) if cfg is not None else 0
    return bucketed_capacity(model, context + new_tokens - 1 + slack)


def precompile(cfg: ReSAConfig, contexts, batches, new_tokens: int, layers: int,
               lossless: bool = False):
    """CPU: compile every TileLang kernel the ReSA modes launch (what the HF integration calls:
    the prompt's summary update, the warm-up's sparse step and rectification, the decode loop's
    sparse steps, the rewinds' and rectifications' summary updates), on meta tensors with the
    public ops under resa_tl.precompile.fake_hopper."""
    from resa_tl.precompile import fake_hopper
    c = model_config(layers, 1)
    H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    with fake_hopper():
        configs = (cfg, mode_config("full", cfg)) + ((mode_config("lossless", cfg),)
                                                     if lossless else ())
        for context, B, cfg in itertools.product(contexts, batches, configs):
            cap = capacity_for(context, new_tokens, layers, cfg)
            f = cfg.rectify_every
            verify = tuple(w + 1 for w in cfg.verify_windows()) + ((1,) if cfg.lossless else ())
            kv = dict(device="meta", dtype=torch.bfloat16)
            k = torch.empty(B, cap, Hkv, D, **kv)
            lens = torch.empty(B, device="meta", dtype=torch.int32)
            nb = -(-cap // cfg.block_size)
            kmin = torch.empty(B, nb, Hkv, D, **kv)
            kmax = torch.empty_like(kmin)
            full = cfg.sparse_ratio >= 1            # dense_decode; the write updates summaries
            # the prompt's writes (one prompt, or the default call's chunks: their length as
            # when memory does not bind, and the last one's); a rectification's rewind (the new
            # last block, 1 position) and its write of f + 1 tokens; a decode step's write
            # where select_blocks does not refresh the summaries (full density)
            chunk = heuristics.prefill_chunk_tokens(
                context, B, hidden=c.hidden_size, intermediate=c.intermediate_size,
                num_heads=H, num_kv_heads=Hkv, head_dim=D, dtype_bytes=2, free_bytes=None)
            prompt = (context, chunk, *((context % chunk,) if context % chunk else ()))
            for length in dict.fromkeys((*prompt, *((1, f + 1) if f else ()),
                                         *((1,) if full else ()), *verify)):
                ops.update_block_summaries(kmin, kmax, k, lens, length, cfg.block_size)
            q = torch.empty(B, H, D, **kv)
            if full:
                ops.dense_decode(q, k, k, lens)
            else:
                idx = ops.select_blocks(q, kmin, kmax, lens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio,
                                        min_blocks=cfg.min_blocks, local_blocks=cfg.local_blocks,
                                        sink_blocks=cfg.sink_blocks, k_cache=k)
                ops.sparse_decode(q, k, k, idx, lens, block_size=cfg.block_size)
            for T in dict.fromkeys(((f + 1,) if f else ()) + verify):
                ops.rectify_attention(torch.empty(B, T, H, D, **kv), k, k, lens)
            print(f"compiled the kernels of {context} x {B} (capacity {cap}, ratio "
                  f"{cfg.sparse_ratio}, f = {f})", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768])
    ap.add_argument("--batches", type=int, nargs="+", default=[8])
    ap.add_argument("--new-tokens", type=int, default=133)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--profile", nargs="*", choices=MODES, default=[],
                    help="also profile these modes (one more generate() each under torch.profiler): GPU busy time per step, kernel time by class")
    ap.add_argument("--calls", type=int, default=2,
                    help="generate() calls per mode; the last is timed")
    ap.add_argument("--stock-prefill-chunk", type=int, default=None,
                    help="prefill_chunk_size for the stock dense modes (transformers' chunked "
                         "prefill; without it a long prompt may not fit)")
    ap.add_argument("--acceptance", default=None,
                    help="lossless mode: replay these recorded verdicts (lossless_acceptance.py "
                         "--trace-json) instead of the random model's own")
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--sink-blocks", type=int, default=None, help="ReSAConfig.sink_blocks (default: the library's, one block; 0: the paper's selection)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--precompile", action="store_true",
                    help="no GPU needed: compile the TileLang kernels of these shapes into "
                         "TileLang's cache (copy $TILELANG_CACHE_DIR to the GPU machine)")
    args = ap.parse_args()
    cfg = ReSAConfig(sink_blocks=args.sink_blocks)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the decode time is measured between steps)")
    if args.precompile:
        return precompile(cfg, args.contexts, args.batches, args.new_tokens, args.layers,
                          lossless="lossless" in args.modes)

    import transformers
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    max_pos = 1 << max(15, math.ceil(math.log2(max(args.contexts) + args.new_tokens)))
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.Qwen2ForCausalLM(model_config(args.layers, max_pos)).to(dtype)
    model.eval()
    model.set_attn_implementation("sdpa")
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    header = dict(gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  date=datetime.date.today().isoformat(), commit=git_commit(),
                  torch=torch.__version__, transformers=transformers.__version__,
                  model="Qwen2ForCausalLM, Qwen2.5-7B shape, random weights", layers=args.layers,
                  dtype=str(dtype).replace("torch.", ""), weights_gb=round(weights_gb, 2),
                  config=cfg.__dict__, new_tokens=args.new_tokens,
                  command=" ".join(["python3", *sys.argv]))
    print(json.dumps(header), flush=True)
    rows = []
    with torch.no_grad():
        for context in args.contexts:
            for batch in args.batches:
                ids = random_prompt(model.config.vocab_size, batch, context, device)
                for mode in args.modes:
                    t0 = time.perf_counter()
                    try:
                        replay = (replay_streams(args.acceptance, batch, args.new_tokens)
                                  if mode == "lossless" and args.acceptance else None)
                        row = run_mode(model, ids, mode, args.new_tokens, cfg, args.calls,
                                       args.stock_prefill_chunk, replay)
                        if mode in args.profile:
                            row["profile"] = profile_mode(model, ids, mode, args.new_tokens,
                                                          cfg)
                    except Exception as e:                             # report, keep going
                        row = dict(mode=mode, error=repr(e)[:300])
                        if ids.is_cuda:
                            torch.cuda.synchronize()
                    row.update(context=context, batch=batch,
                               wall_s=round(time.perf_counter() - t0, 1))
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    free_memory(model)
                    if args.json:                     # after every row: a killed run keeps them
                        with open(args.json, "w") as fh:
                            json.dump(dict(header=header, rows=rows), fh, indent=1)
    for r in rows:          # speedup over the faster dense mode of the same context x batch
        dense = [d["ms_per_token"] for d in rows if d["mode"].startswith("dense")
                 and "ms_per_token" in d and (d["context"], d["batch"]) ==
                 (r["context"], r["batch"])]
        if dense and "ms_per_token" in r:
            r["speedup_vs_best_dense"] = min(dense) / r["ms_per_token"]
        full = [d["ms_per_token"] for d in rows if d["mode"] == "full" and "ms_per_token"
                in d and (d["context"], d["batch"]) == (r["context"], r["batch"])]
        if full and "ms_per_token" in r:
            r["speedup_vs_full"] = full[0] / r["ms_per_token"]
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=rows), fh, indent=1)
    print(f"\n{header['gpu']}, {header['date']}, commit {header['commit']}, transformers "
          f"{header['transformers']}; {args.new_tokens} new tokens; ms")
    print(f"{'ctx':>7} {'B':>2} {'mode':<13} {'ms/token':>9} {'median':>8} {'max':>8} "
          f"{'tok/s':>8} {'prefill':>9} {'rect':>4} {'vs best dense':>13} {'vs full':>8} {'GiB prefill':>11} {'decode':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['context']:>7} {r['batch']:>2} {r['mode']:<13} error: {r['error']}")
            continue
        sp, sf = r.get("speedup_vs_best_dense"), r.get("speedup_vs_full")
        print(f"{r['context']:>7} {r['batch']:>2} {r['mode']:<13} {r['ms_per_token']:9.3f} "
              f"{r['median_step_ms']:8.3f} {r['max_step_ms']:8.2f} {r['tokens_per_s']:8.1f} "
              f"{r['prefill_ms']:9.1f} {str(r['rectifications']):>4} "
              f"{(f'{sp:.2f}x' if sp else '-'):>13} {(f'{sf:.2f}x' if sf else '-'):>8} "
              f"{str(r['peak_prefill_gib']):>11} {str(r['peak_decode_gib']):>7}")
    for r in rows:
        if "window_ms" in r:
            print(f"\n{r['context']} x {r['batch']} lossless: {r['tokens_per_pass']:.2f} tokens "
                  f"per row per dense pass ({100 * r['acceptance']:.0f}% of proposals kept); a "
                  f"window took {r['window_ms']:.2f} ms: sparse steps "
                  f"{r['sparse_step_ms']:.2f} ms each, dense pass {r['verify_ms']:.2f} ms, "
                  f"rest {r['rest_ms']:.2f} ms")
    for r in rows:
        p = r.get("profile")
        if p:
            print(f"\n{r['context']} x {r['batch']} {r['mode']} (profiled, {p['steps']} steps): "
                  f"GPU busy {p['gpu_busy_ms_per_step']:.3f} of {p['window_ms_per_step']:.3f} "
                  f"ms per step, {p['launches_per_step']:.0f} kernels per step")
            for g, ms in p["kernel_ms_per_step"].items():
                print(f"  {g:<32} {ms:8.3f} ms/step")


if __name__ == "__main__":
    main()
