"""End-to-end decode speed: ReSA vs dense on a Qwen2.5-7B-shaped model (random weights).

One harness for every mode: a gpt-fast style decoder (28 layers, 28 q / 4 kv heads, d=128,
hidden 3584, intermediate 18944, vocab 152064, bf16) with a static NHD KV cache; each decode step
is captured once as a CUDA graph and timed as graph replays, so no host overhead counts.

Modes (per context x batch):
  dense-sdpa   torch SDPA over the cache (the strongest dense kernel torch ships on the card)
  dense-tl     resa_tl.ops.dense_decode (TileLang)
  resa         sparse steps (select_blocks, which also refreshes the newest block's summary, +
               sparse_decode) and, every f steps,
               one fused rectification step feeding f+1 tokens densely (rectify_attention).
               Per-token time = (f * t_sparse + t_rect) / (f + 1): a cycle of f+1 forwards
               yields f+1 tokens.
The cache is filled with random K/V (a real 256K prefill of a 7B model would take minutes and
does not change the decode cost). Where the per-layer caches would not fit on the card, all layers
share ONE K/V cache (the paper did the same on an A100); the script says when it does.

Breakdown of a sparse step: selection (28 x select_blocks, summary refresh included), sparse
attention (28 x sparse_decode), the rest (projections, MLP, norms, RoPE, cache writes), each
captured and replayed on its own. Memory model: bytes per token
  dense: W + KV;   ReSA: W + KV * (1/block + kept + 1/(f+1))
with W the weight bytes, KV the K+V bytes of all layers, kept the fraction of blocks selected.

    python examples/bench_e2e.py [--contexts 16384 65536 131072 262144] [--batches 1 4 8]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from resa_tl import ReSAConfig, heuristics, ops
from resa_tl.config import SUMMARY_DTYPES
from resa_tl.kernels.selection import blocks_to_keep

from _measure import copy_gbs, git_commit, graph_kernel_table, graph_ms


@dataclass
class Qwen7BShape:
    layers: int = 28
    hidden: int = 3584
    heads: int = 28
    kv_heads: int = 4
    head_dim: int = 128
    inter: int = 18944
    vocab: int = 152064


class Weights:
    def __init__(self, s: Qwen7BShape, device, dtype=torch.bfloat16, seed=0):
        torch.manual_seed(seed)
        qkv = (s.heads + 2 * s.kv_heads) * s.head_dim

        def w(*shape):
            return torch.randn(*shape, device=device, dtype=dtype) * (shape[0] ** -0.5)

        self.embed = torch.randn(s.vocab, s.hidden, device=device, dtype=dtype)
        self.lm_head = w(s.hidden, s.vocab)
        self.wqkv = [w(s.hidden, qkv) for _ in range(s.layers)]
        self.wo = [w(s.heads * s.head_dim, s.hidden) for _ in range(s.layers)]
        self.wgu = [w(s.hidden, 2 * s.inter) for _ in range(s.layers)]
        self.wdown = [w(s.inter, s.hidden) for _ in range(s.layers)]
        self.ln = torch.ones(s.hidden, device=device, dtype=dtype)
        self.bytes = sum(t.numel() * t.element_size() for t in
                         [self.lm_head, *self.wqkv, *self.wo, *self.wgu, *self.wdown])


def rope(x, cos, sin, pos):                          # x [B, T, h, D], pos [B, T]
    c, s_ = cos[pos][:, :, None], sin[pos][:, :, None]
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)


def pre_attention(x, ln, wqkv, cos, sin, pos, heads: int, kv_heads: int, k_cache, v_cache,
                  rows):
    """Input norm, fused QKV projection, RoPE, and the new K/V written into the static cache
    at (rows, pos) (compiled: inductor fuses the writes into the RoPE kernel, as gpt-fast's
    in-graph cache update; eager: two index_put kernels). x [B, T, hidden] -> q [B, T, H, D]."""
    B, T, hidden = x.shape
    h = F.rms_norm(x, (hidden,), ln)
    qkv = (h @ wqkv).view(B, T, heads + 2 * kv_heads, -1)
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=2)
    k_cache[rows[:, None], pos] = rope(k, cos, sin, pos)
    v_cache[rows[:, None], pos] = v
    return rope(q, cos, sin, pos)


def post_attention(x, o, wo, ln, wgu, wdown):
    """Output projection + residual, post-attention norm, SwiGLU MLP + residual."""
    B, T, hidden = x.shape
    x = x + o.reshape(B, T, -1) @ wo
    h = F.rms_norm(x, (hidden,), ln)
    g, u = (h @ wgu).chunk(2, dim=-1)
    return x + (F.silu(g) * u) @ wdown


def lm_head(x, ln, w):
    return (F.rms_norm(x[:, -1], (x.shape[-1],), ln) @ w).argmax(-1)


class Rest:
    """Everything but attention (cache writes included), per layer: eager torch ops (one
    kernel per elementwise op), or each piece compiled by torch.compile (inductor fuses the
    norms, RoPE, the cache writes, SiLU * up and the residual adds; the matmuls stay cuBLAS
    calls), as gpt-fast and serving engines run a decode step. Dense and ReSA use the same."""

    def __init__(self, compiled: bool):
        self.compiled = compiled
        wrap = (lambda f: torch.compile(f, dynamic=False, fullgraph=True)) if compiled else \
            (lambda f: f)
        self.pre, self.post, self.head = (wrap(pre_attention), wrap(post_attention),
                                          wrap(lm_head))


def cache_capacity(context: int, cfg: ReSAConfig) -> int:
    """Tokens the static cache holds: the context plus room for a few rectification cycles."""
    return context + 4 * (cfg.rectify_every + 1) + 1024


class Decoder:
    """Static-cache decoder; ``step(tokens [B, T], mode)`` is graph-capturable."""

    def __init__(self, s: Qwen7BShape, W: Weights, batch: int, context: int, cfg: ReSAConfig,
                 share_kv: bool, device, rest: Rest):
        self.s, self.W, self.cfg, self.B, self.rest = s, W, cfg, batch, rest
        self.capacity = cache_capacity(context, cfg)
        shape = (batch, self.capacity, s.kv_heads, s.head_dim)
        n_kv = 1 if share_kv else s.layers
        gen = torch.Generator(device=device).manual_seed(1)
        self.k = [torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
                  for _ in range(n_kv)]
        self.v = [torch.randn(shape, device=device, dtype=torch.bfloat16, generator=gen)
                  for _ in range(n_kv)]
        if share_kv:
            self.k, self.v = self.k * s.layers, self.v * s.layers
        self.seqlens = torch.full((batch,), context, device=device, dtype=torch.int32)
        self.lens_after = self.seqlens.clone()
        self.start = self.seqlens.clone()
        self.kmin, self.kmax = [], []
        for layer in range(n_kv):
            mn, mx = ops.block_summaries(self.k[layer], self.seqlens, cfg.block_size,
                                         summary_dtype=cfg.summary_dtype)
            self.kmin.append(mn)
            self.kmax.append(mx)
        if share_kv:
            self.kmin, self.kmax = self.kmin * s.layers, self.kmax * s.layers
        self.context = context
        self.rows = torch.arange(batch, device=device)
        self.steps = torch.arange(cfg.rectify_every + 1, device=device)
        inv = 1.0 / (1e6 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        ang = torch.arange(self.capacity, device=device).float()[:, None] * inv[None]
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        self.kv_bytes = 2 * s.layers * batch * context * s.kv_heads * s.head_dim * 2

    def attention(self, layer, q, mode):
        cfg, kc, vc = self.cfg, self.k[layer], self.v[layer]
        if mode == "dense-sdpa":                      # T == 1; a fixed context (see module doc)
            n = self.context + 1
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :n].transpose(1, 2),
                                               vc[:, :n].transpose(1, 2), enable_gqa=True)
            return o.transpose(1, 2)
        if mode == "dense-tl":
            return ops.dense_decode(q[:, 0], kc, vc, self.lens_after)[:, None]
        if mode == "rect":
            return ops.rectify_attention(q, kc, vc, self.lens_after)
        idx = self.select(layer, q[:, 0])
        return ops.sparse_decode(q[:, 0], kc, vc, idx, self.lens_after,
                                 block_size=cfg.block_size)[:, None]

    def select(self, layer, q):
        """Selection, with the newest block's summary refreshed in the same launch (the token
        this step wrote is in the cache already)."""
        c = self.cfg
        return ops.select_blocks(q, self.kmin[layer], self.kmax[layer], self.lens_after,
                                 block_size=c.block_size, sparse_ratio=c.sparse_ratio,
                                 min_blocks=c.min_blocks, local_blocks=c.local_blocks,
                                 sink_blocks=c.sink_blocks, k_cache=self.k[layer])

    def step(self, tokens, mode):
        s, W = self.s, self.W
        T = tokens.shape[1]
        # Lengths stay fixed across replays, so every timing is at its nominal context: a step
        # writes positions [len - T + 1, len] and attends over len + 1 keys. For "rect" that is
        # the fused rectification (rewind f, feed f + 1 tokens).
        self.start.copy_(self.seqlens - (T - 1))
        start = self.start
        pos = start.long()[:, None] + self.steps[:T]
        self.lens_after.copy_(self.seqlens + 1)
        x = W.embed[tokens]
        for layer in range(s.layers):
            q = self.rest.pre(x, W.ln, W.wqkv[layer], self.cos, self.sin, pos, s.heads,
                              s.kv_heads, self.k[layer], self.v[layer], self.rows)
            if mode == "rect":               # (a sparse step refreshes in select_blocks)
                ops.update_block_summaries(self.kmin[layer], self.kmax[layer], self.k[layer],
                                           start, T, self.cfg.block_size)
            o = self.attention(layer, q, mode)
            x = self.rest.post(x, o, W.wo[layer], W.ln, W.wgu[layer], W.wdown[layer])
        return self.rest.head(x, W.ln, W.lm_head)

    def parts(self, q, which):
        """Only the selection or only the sparse attention of a sparse step, all layers."""
        for layer in range(self.s.layers):
            if which == "select":
                self.select(layer, q)
            else:
                ops.sparse_decode(q, self.k[layer], self.v[layer], self._idx[layer],
                                  self.lens_after, block_size=self.cfg.block_size)


def kernel_group(name: str) -> str:
    """Coarse class of a kernel name, for the per-step profile."""
    for key, group in (("sparse_decode_kernel_1", "sparse combine"),
                       ("sparse_decode", "sparse split"),
                       ("dense_decode_kernel_1", "dense combine"),
                       ("dense_decode", "dense split"), ("select_blocks", "select (score+top-k)"),
                       ("update_block_summaries", "summary update"), ("split_prog", "rectify"),
                       ("combine_prog", "rectify combine"), ("flash", "sdpa"),
                       ("fmha", "sdpa"), ("triton", "fused elementwise (inductor)"),
                       ("index", "cache write (index_put)")):
        if key in name:
            return group
    if any(k in name for k in ("gemm", "gemv", "xmma", "cutlass", "nvjet", "splitKreduce")):
        return "matmul (cuBLAS)"
    return "other"


def profile_step(step, label, trace_dir):
    """Per kernel class of one captured step: launches, kernel time and frontier time (its
    share of the step's span, _measure.frontier_us: with PDL on, the kernel time of a class
    includes the waits of its early-launched kernels, the frontier does not)."""
    path = f"{trace_dir}/{label}.json" if trace_dir else None
    rows, span = graph_kernel_table([step], trace_path=path)
    groups: dict = {}
    for name, n, us, front in rows:
        g = kernel_group(name)
        c, t, f = groups.get(g, (0, 0.0, 0.0))
        groups[g] = (c + n, t + us, f + front)
    busy = sum(r[2] for r in rows)
    return dict(span_us=round(span, 1), busy_us=round(busy, 1), idle_us=round(span - busy, 1),
                launches=round(sum(r[1] for r in rows)),
                groups={g: [round(c), round(t, 1), round(f, 1)] for g, (c, t, f) in
                        sorted(groups.items(), key=lambda kv: -kv[1][2])},
                top=[[name, n, round(us, 1), round(front, 1)] for name, n, us, front in rows[:12]])


def run_one(s, W, context, batch, cfg, free_bytes, rest, profile=False, trace_dir=None):
    kv_bytes = 2 * s.layers * batch * (context + 2048) * s.kv_heads * s.head_dim * 2
    share = kv_bytes * 1.15 > free_bytes - 6 * 1024 ** 3
    dec = Decoder(s, W, batch, context, cfg, share, "cuda", rest)
    tok1 = torch.randint(0, s.vocab, (batch, 1), device="cuda")
    tokf = torch.randint(0, s.vocab, (batch, cfg.rectify_every + 1), device="cuda")
    row = dict(context=context, batch=batch, shared_kv=share)
    for mode in ("dense-sdpa", "dense-tl", "resa"):
        try:
            row[mode] = graph_ms([lambda: dec.step(tok1, mode)], replays=10, samples=5)
        except Exception as e:                                      # report, keep going
            row[mode] = float("nan")
            row[f"{mode}-error"] = repr(e)[:200]
    try:
        row["rect"] = graph_ms([lambda: dec.step(tokf, "rect")], replays=10, samples=5)
    except Exception as e:
        row["rect"], row["rect-error"] = float("nan"), repr(e)[:200]
    q = torch.randn(batch, s.heads, s.head_dim, device="cuda", dtype=torch.bfloat16)
    dec._idx = [dec.select(layer, q) for layer in range(s.layers)]
    row["select"] = graph_ms([lambda: dec.parts(q, "select")], replays=10, samples=5)
    row["sparse_attn"] = graph_ms([lambda: dec.parts(q, "sparse")], replays=10, samples=5)
    if profile:
        tag = f"{context // 1024}k_b{batch}"
        row["profile"] = {m: profile_step(lambda: dec.step(tok1, m), f"{tag}_{m}", trace_dir)
                          for m in ("dense-tl", "resa")}
        row["profile"]["rect"] = profile_step(lambda: dec.step(tokf, "rect"), f"{tag}_rect",
                                              trace_dir)
    f = cfg.rectify_every
    row["resa_per_token"] = (f * row["resa"] + row["rect"]) / (f + 1)
    row["rest"] = row["resa"] - row["select"] - row["sparse_attn"]
    row["rect_amortized"] = row["rect"] / (f + 1)
    best_dense = min(row["dense-sdpa"], row["dense-tl"])
    row["speedup_vs_best_dense"] = best_dense / row["resa_per_token"]
    nb = math.ceil(context / cfg.block_size)
    kept = blocks_to_keep(nb, cfg.sparse_ratio, cfg.min_blocks) / nb
    kv = dec.kv_bytes
    row["model_speedup"] = (W.bytes + kv) / (W.bytes + kv * (1 / cfg.block_size + kept + 1 / (f + 1)))
    row["kept_fraction"] = kept
    del dec
    torch.cuda.empty_cache()
    return row


def precompile(s: Qwen7BShape, cfg: ReSAConfig, contexts, batches):
    """CPU: compile every TileLang kernel that run_one launches (see _precompile)."""
    from _precompile import fake_hopper
    f = cfg.rectify_every
    with fake_hopper():
        for context in contexts:
            for B in batches:
                cap = cache_capacity(context, cfg)
                kv = dict(device="meta", dtype=torch.bfloat16)
                k = torch.empty(B, cap, s.kv_heads, s.head_dim, **kv)
                lens = torch.empty(B, device="meta", dtype=torch.int32)
                kmin, kmax = ops.block_summaries(k, lens, cfg.block_size,
                                                 summary_dtype=cfg.summary_dtype)
                ops.update_block_summaries(kmin, kmax, k, lens, f + 1, cfg.block_size)
                q = torch.empty(B, s.heads, s.head_dim, **kv)
                idx = ops.select_blocks(q, kmin, kmax, lens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio, min_blocks=cfg.min_blocks,
                                        local_blocks=cfg.local_blocks,
                                        sink_blocks=cfg.sink_blocks, k_cache=k)
                ops.sparse_decode(q, k, k, idx, lens, block_size=cfg.block_size)
                ops.dense_decode(q, k, k, lens)
                ops.rectify_attention(torch.empty(B, f + 1, s.heads, s.head_dim, **kv), k, k,
                                      lens)
                print(f"compiled the kernels of {context} x {B}", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 65536, 131072, 262144])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--json", default=None, help="write all rows here")
    ap.add_argument("--eager-rest", action="store_true",
                    help="run the non-attention part as eager torch ops (one kernel per op) "
                         "instead of torch.compile'd pieces")
    ap.add_argument("--precompile", action="store_true",
                    help="no GPU needed: compile the TileLang kernels of these shapes into "
                         "TileLang's cache (copy $TILELANG_CACHE_DIR to the GPU machine)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile one dense-tl, ReSA and rectification step per row "
                         "(torch.profiler over a graph replay): kernel time per class, idle time")
    ap.add_argument("--trace-dir", default=None, help="with --profile: keep Chrome traces here")
    ap.add_argument("--summary-dtype", default=None, choices=SUMMARY_DTYPES,
                    help="ReSAConfig.summary_dtype (default: the cache dtype, as in the paper)")
    args = ap.parse_args()
    cfg = ReSAConfig(summary_dtype=args.summary_dtype)
    if args.precompile:
        return precompile(Qwen7BShape(layers=args.layers), cfg, args.contexts, args.batches)
    torch._dynamo.config.cache_size_limit = 64       # one specialisation per (batch, T)
    rest = Rest(compiled=not args.eager_rest)
    s = Qwen7BShape(layers=args.layers)
    W = Weights(s, "cuda")
    bw = copy_gbs()
    header = dict(gpu=torch.cuda.get_device_name(), date=datetime.date.today().isoformat(),
                  commit=git_commit(), torch=torch.__version__, copy_gbs=round(bw),
                  weights_gb=round(W.bytes / 1e9, 2), config=cfg.__dict__,
                  command=" ".join(["python3", *sys.argv]),
                  pdl=heuristics.use_pdl(heuristics.arch_of(torch.device("cuda"))),
                  rest="eager" if args.eager_rest else "torch.compile")
    print(json.dumps(header))
    rows = []
    for context in args.contexts:
        for batch in args.batches:
            free = torch.cuda.mem_get_info()[0]
            rows.append(run_one(s, W, context, batch, cfg, free, rest, args.profile,
                                args.trace_dir))
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=rows), fh, indent=1)
    print(f"\n{header['gpu']}, {header['date']}, commit {header['commit']}, rest {header['rest']}; "
          "ms per token")
    print(f"{'ctx':>7} {'B':>2} {'shared':>6} {'sdpa':>7} {'dense-tl':>8} {'resa/tok':>8} "
          f"{'sparse':>7} {'rect':>7} {'select':>7} {'sp-attn':>7} {'rest':>7} {'speedup':>7} "
          f"{'model':>6}")
    for r in rows:
        print(f"{r['context']:>7} {r['batch']:>2} {str(r['shared_kv']):>6} {r['dense-sdpa']:7.3f} "
              f"{r['dense-tl']:8.3f} {r['resa_per_token']:8.3f} {r['resa']:7.3f} {r['rect']:7.3f} "
              f"{r['select']:7.3f} {r['sparse_attn']:7.3f} {r['rest']:7.3f} "
              f"{r['speedup_vs_best_dense']:6.2f}x {r['model_speedup']:5.2f}x")
    for r in rows:
        for mode, p in r.get("profile", {}).items():
            print(f"\n{r['context']} x {r['batch']} {mode}: span {p['span_us']} us, kernels "
                  f"{p['busy_us']} us, idle {p['idle_us']} us, {p['launches']} launches")
            print(f"  {'class':<30} {'n':>5} {'kernel us':>10} {'frontier us':>12}")
            for g, (n, us, front) in p["groups"].items():
                print(f"  {g:<30} {n:>5} {us:10.1f} {front:12.1f}")


if __name__ == "__main__":
    main()
