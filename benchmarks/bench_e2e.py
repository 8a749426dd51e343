"""End-to-end decode speed: ReSA vs dense on a Qwen2.5-7B-shaped model (random weights).

One harness for every mode: a gpt-fast style decoder (28 layers, 28 q / 4 kv heads, d=128,
hidden 3584, intermediate 18944, vocab 152064, bf16) with a static NHD KV cache; each decode step
is captured once as a CUDA graph and timed as graph replays, so no host overhead counts.

Modes (per context x batch):
  dense-sdpa   torch SDPA over the cache (the strongest dense kernel torch ships on the card)
  dense-tl     resa_tl.ops.dense_decode (TileLang)
  resa         the library's decode cycle (resa_tl.cycle) over a resa_tl.cache.ReSACache that
               holds the decoder's K/V: sparse steps (StepAttention.sparse: select_blocks,
               which also refreshes the newest block's summary, + sparse_decode) and, every f
               steps, one fused rectification step feeding f+1 tokens densely (the touched
               summaries updated, then StepAttention.dense: rectify_attention). Per-token time
               = (f * t_sparse + t_rect) / (f + 1) (resa_tl.cycle.per_token_time): a cycle of
               f+1 forwards yields f+1 tokens.
The cache is filled with random K/V (a real 256K prefill of a 7B model would take minutes and
does not change the decode cost). Where the per-layer caches would not fit on the card, all layers
share ONE K/V cache (the paper did the same on an A100); the script says when it does.

Breakdown of a sparse step: selection (28 x select_blocks, summary refresh included), sparse
attention (28 x sparse_decode), the rest (projections, MLP, norms, RoPE, cache writes), each
captured and replayed on its own. Memory model: bytes per token
  dense: W + KV;   ReSA: W + KV * (1/block + kept + 1/(f+1))
with W the weight bytes, KV the K+V bytes of all layers, kept the fraction of blocks selected.

    python benchmarks/bench_e2e.py [--contexts 16384 65536 131072 262144] [--batches 1 4 8]
    python benchmarks/bench_e2e.py --precompile --contexts ... --batches ...   # CPU, no GPU
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
from resa_tl.cache import ReSACache
from resa_tl.config import SUMMARY_DTYPES
from resa_tl.cycle import StepAttention, per_token_time
from resa_tl.kernels.select_blocks import blocks_to_keep

from _timing import copy_gbs, git_commit, graph_kernel_table, graph_ms


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


class DecoderAttention:
    """The attention of the decoder's layers, over the library's ReSA cache and decode cycle.

    The K/V of all layers live in a :class:`resa_tl.cache.ReSACache` of ``cache_capacity``
    positions per row: one cache layer per model layer, or (``share_kv``) one cache layer that
    every model layer uses (model layer ``l`` reads cache layer ``l % n_kv``). ReSA steps run
    through :class:`resa_tl.cycle.StepAttention`, which resolves every plan (config, kernel,
    split counts, workspaces) once here: :meth:`sparse` (select_blocks with the newest block's
    summary refresh + sparse_decode) and :meth:`rectify` (rectify_attention over the f + 1
    tokens of a fused rectification). The dense TileLang baseline is ops.dense_decode, and
    the parts of a sparse step timed on their own (:meth:`select`, :meth:`sparse_only`) are
    the public ops with the same arguments: resa_tl.plan memoises per problem, so they launch
    the very kernels, configs and split counts of StepAttention (benchmarks/test_bench_e2e.py
    checks that, and that this launches what the ops-based decoder of earlier commits did).

    Row lengths: the benchmark times every step at a fixed context (see Decoder.step), so the
    lengths are set, not advanced: the caller writes the cache's ``seqlens`` before a step.
    ``device="meta"`` with ``fill=False`` under resa_tl.precompile.fake_hopper resolves (and
    compiles) the same plans without a GPU (see :func:`precompile`)."""

    def __init__(self, s: Qwen7BShape, batch: int, context: int, cfg: ReSAConfig,
                 share_kv: bool, device, fill: bool = True):
        self.cfg, self.context = cfg, context
        self.capacity = cache_capacity(context, cfg)
        self.n_kv = 1 if share_kv else s.layers
        self.scale = s.head_dim ** -0.5
        self.cache = c = ReSACache(self.n_kv, batch, self.capacity, s.kv_heads, s.head_dim,
                                   config=cfg, dtype=torch.bfloat16, device=device)
        if fill:                     # random K/V (torch.randn's values: the earlier decoder's)
            gen = torch.Generator(device=device).manual_seed(1)
            for t in (*c.k, *c.v):
                t.normal_(generator=gen)
        c.seqlens.fill_(context)     # summaries over the context (a step re-sets the lengths)
        c.reserve(context)
        for layer in range(self.n_kv):
            c.rebuild_summaries(layer)
        self.step = StepAttention(c, s.heads, refresh=True)

    def kv(self, layer: int):
        """(k_cache, v_cache) of model layer ``layer``."""
        i = layer % self.n_kv
        return self.cache.k[i], self.cache.v[i]

    def lengths(self, layer: int):
        return self.cache.seqlens[layer % self.n_kv]

    def sparse(self, layer: int, q):
        """A sparse step's attention (its token written): q [B, H, D] -> [B, H, Dv]."""
        return self.step.sparse(layer % self.n_kv, q, self.scale)

    def update_summaries(self, layer: int, start, length: int):
        """Refresh the summaries of the blocks that positions [start, start + length) touch
        (a rectification rewrote them)."""
        i = layer % self.n_kv
        c = self.cache
        ops.update_block_summaries(c.kmin[i], c.kmax[i], c.k[i], start, length,
                                   self.cfg.block_size)

    def rectify(self, layer: int, q):
        """The fused rectification's attention: q [B, T, H, D] -> [B, T, H, Dv]."""
        return self.step.dense(layer % self.n_kv, q, self.scale)

    def dense(self, layer: int, q):
        """Dense TileLang decode: q [B, H, D] -> [B, H, Dv]."""
        k, v = self.kv(layer)
        return ops.dense_decode(q, k, v, self.lengths(layer), softmax_scale=self.scale)

    def select(self, layer: int, q):
        """Only the selection of a sparse step (summary refresh included)."""
        i, c, cfg = layer % self.n_kv, self.cache, self.cfg
        return ops.select_blocks(q, c.kmin[i], c.kmax[i], c.seqlens[i],
                                 block_size=cfg.block_size, sparse_ratio=cfg.sparse_ratio,
                                 min_blocks=cfg.min_blocks, local_blocks=cfg.local_blocks,
                                 sink_blocks=cfg.sink_blocks, k_cache=c.k[i])

    def sparse_only(self, layer: int, q, idx):
        """Only the sparse attention of a sparse step, over the blocks ``idx``."""
        k, v = self.kv(layer)
        return ops.sparse_decode(q, k, v, idx, self.lengths(layer),
                                 block_size=self.cfg.block_size, softmax_scale=self.scale)


class Decoder:
    """Static-cache decoder; ``step(tokens [B, T], mode)`` is graph-capturable."""

    def __init__(self, s: Qwen7BShape, W: Weights, batch: int, context: int, cfg: ReSAConfig,
                 share_kv: bool, device, rest: Rest):
        self.s, self.W, self.cfg, self.B, self.rest = s, W, cfg, batch, rest
        self.attn = DecoderAttention(s, batch, context, cfg, share_kv, device)
        self.capacity = self.attn.capacity
        self.seqlens = torch.full((batch,), context, device=device, dtype=torch.int32)
        self.start = self.seqlens.clone()
        self.context = context
        self.rows = torch.arange(batch, device=device)
        self.steps = torch.arange(cfg.rectify_every + 1, device=device)
        inv = 1.0 / (1e6 ** (torch.arange(0, s.head_dim, 2, device=device).float() / s.head_dim))
        ang = torch.arange(self.capacity, device=device).float()[:, None] * inv[None]
        self.cos, self.sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)
        self.kv_bytes = 2 * s.layers * batch * context * s.kv_heads * s.head_dim * 2

    def attention(self, layer, q, mode):
        a = self.attn
        if mode == "dense-sdpa":                      # T == 1; a fixed context (see module doc)
            kc, vc = a.kv(layer)
            n = self.context + 1
            o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :n].transpose(1, 2),
                                               vc[:, :n].transpose(1, 2), enable_gqa=True)
            return o.transpose(1, 2)
        if mode == "dense-tl":
            return a.dense(layer, q[:, 0])[:, None]
        if mode == "rect":
            return a.rectify(layer, q.contiguous())
        return a.sparse(layer, q[:, 0].contiguous())[:, None]

    def step(self, tokens, mode):
        s, W, a = self.s, self.W, self.attn
        T = tokens.shape[1]
        # Lengths stay fixed across replays, so every timing is at its nominal context: a step
        # writes positions [len - T + 1, len] and attends over len + 1 keys. For "rect" that is
        # the fused rectification (rewind f, feed f + 1 tokens).
        self.start.copy_(self.seqlens - (T - 1))
        start = self.start
        pos = start.long()[:, None] + self.steps[:T]
        a.cache.seqlens.copy_(self.seqlens + 1)       # every cache layer: len + 1 keys
        x = W.embed[tokens]
        for layer in range(s.layers):
            kc, vc = a.kv(layer)
            q = self.rest.pre(x, W.ln, W.wqkv[layer], self.cos, self.sin, pos, s.heads,
                              s.kv_heads, kc, vc, self.rows)
            if mode == "rect":               # (a sparse step refreshes in select_blocks)
                a.update_summaries(layer, start, T)
            o = self.attention(layer, q, mode)
            x = self.rest.post(x, o, W.wo[layer], W.ln, W.wgu[layer], W.wdown[layer])
        return self.rest.head(x, W.ln, W.lm_head)

    def parts(self, q, which):
        """Only the selection or only the sparse attention of a sparse step, all layers."""
        for layer in range(self.s.layers):
            if which == "select":
                self.attn.select(layer, q)
            else:
                self.attn.sparse_only(layer, q, self._idx[layer])


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
    share of the step's span, _timing.frontier_us: with PDL on, the kernel time of a class
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
    dec._idx = [dec.attn.select(layer, q) for layer in range(s.layers)]
    row["select"] = graph_ms([lambda: dec.parts(q, "select")], replays=10, samples=5)
    row["sparse_attn"] = graph_ms([lambda: dec.parts(q, "sparse")], replays=10, samples=5)
    if profile:
        tag = f"{context // 1024}k_b{batch}"
        row["profile"] = {m: profile_step(lambda: dec.step(tok1, m), f"{tag}_{m}", trace_dir)
                          for m in ("dense-tl", "resa")}
        row["profile"]["rect"] = profile_step(lambda: dec.step(tokf, "rect"), f"{tag}_rect",
                                              trace_dir)
    f = cfg.rectify_every
    row["resa_per_token"] = per_token_time(row["resa"], row["rect"], f)
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
    """CPU: compile every TileLang kernel that run_one launches, into TileLang's disk cache:
    the decoder's own attention (DecoderAttention: the ReSA cache, its summaries, the decode
    cycle's plans) built on meta tensors under resa_tl.precompile.fake_hopper, each of its
    calls run once (the launches skipped)."""
    from resa_tl.precompile import fake_hopper
    f = cfg.rectify_every
    with fake_hopper():
        for context in contexts:
            for B in batches:
                a = DecoderAttention(s, B, context, cfg, share_kv=True, device="meta",
                                     fill=False)
                meta = dict(device="meta", dtype=torch.bfloat16)
                q = torch.empty(B, s.heads, s.head_dim, **meta)
                start = torch.empty(B, device="meta", dtype=torch.int32)
                a.sparse(0, q)                                   # "resa"
                a.dense(0, q)                                    # "dense-tl"
                a.update_summaries(0, start, f + 1)              # "rect"
                a.rectify(0, torch.empty(B, f + 1, s.heads, s.head_dim, **meta))
                a.sparse_only(0, q, a.select(0, q))              # the parts of a sparse step
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
    ap.add_argument("--sink-blocks", type=int, default=None,
                    help="ReSAConfig.sink_blocks (default: the library's, one block; 0: the "
                         "paper's selection)")
    args = ap.parse_args()
    cfg = ReSAConfig(summary_dtype=args.summary_dtype, sink_blocks=args.sink_blocks)
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
