"""The ReSA decode cycle over plain tensors, for a toy attention-only model.

Dense prefill, then sparse decode steps; once ``rectify_every`` tokens have been decoded
sparsely, the next step rewinds them and feeds them again together with the new token in one
dense pass (rectification fused into decoding, as ``resa_tl.attach`` does it), which rewrites
their K/V with what dense decoding would have produced. Tests use it to show that after every
rectification the cache equals a dense recompute, and that ratio 1 equals dense decoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import ops
from .cache import ReSACache
from .config import ReSAConfig
from .cycle import DecodeCycle, StepAttention


class ToyAttentionModel:
    """Embedding + learned positions, L pre-norm attention-only layers with GQA, unembedding.
    Weights are random but scaled so that greedy decoding is decided by clear margins."""

    def __init__(self, vocab=97, hidden=64, num_layers=2, num_heads=4, num_kv_heads=2,
                 head_dim=16, max_positions=4096, seed=0, dtype=torch.float32, device="cpu"):
        g = torch.Generator().manual_seed(seed)

        def w(*shape, scale):
            return (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)

        self.num_layers, self.num_heads, self.num_kv_heads = num_layers, num_heads, num_kv_heads
        self.head_dim, self.hidden = head_dim, hidden
        self.embed = w(vocab, hidden, scale=1.0)
        self.pos = w(max_positions, hidden, scale=0.5)
        self.layers = [dict(wq=w(hidden, num_heads * head_dim, scale=2.0 / hidden ** 0.5),
                            wk=w(hidden, num_kv_heads * head_dim, scale=2.0 / hidden ** 0.5),
                            wv=w(hidden, num_kv_heads * head_dim, scale=1.0 / hidden ** 0.5),
                            wo=w(num_heads * head_dim, hidden, scale=1.0 / (num_heads * head_dim) ** 0.5))
                       for _ in range(num_layers)]
        self.unembed = w(hidden, vocab, scale=4.0 / hidden ** 0.5)

    def new_cache(self, batch_size, max_seq_len, config, backend="auto"):
        return ReSACache(self.num_layers, batch_size, max_seq_len, self.num_kv_heads,
                         self.head_dim, config=config, dtype=self.embed.dtype,
                         device=self.embed.device, backend=backend)

    def forward(self, tokens, positions, cache: ReSACache, attend):
        """tokens, positions [B, T]; ``attend(layer, q [B, T, H, D]) -> [B, T, H, D]`` runs
        after the layer's K/V were written. Returns logits [B, T, vocab] (fp32)."""
        B, T = tokens.shape
        x = self.embed[tokens] + self.pos[positions]
        for i, p in enumerate(self.layers):
            h = torch.nn.functional.rms_norm(x, (self.hidden,))
            q = (h @ p["wq"]).view(B, T, self.num_heads, self.head_dim)
            k = (h @ p["wk"]).view(B, T, self.num_kv_heads, self.head_dim)
            v = (h @ p["wv"]).view(B, T, self.num_kv_heads, self.head_dim)
            x = x + attend((i, k, v), q).reshape(B, T, -1) @ p["wo"]
        return (torch.nn.functional.rms_norm(x, (self.hidden,)) @ self.unembed).float()


@dataclass
class CycleResult:
    tokens: torch.Tensor                 # [B, steps] generated (or teacher-forced) tokens
    cache: ReSACache
    logits: torch.Tensor = None          # [B, steps, vocab] logits each token was chosen from
    dense_steps: list = field(default_factory=list)   # step indices that ran a dense pass
    snapshots: list = field(default_factory=list)     # (step, [B, T] all fed tokens) after each rectification


def _prefill(model, cache, prompt, lengths, backend):
    B, T = prompt.shape
    positions = torch.arange(T, device=prompt.device).expand(B, T)
    full = torch.full((B,), T, dtype=torch.int32, device=prompt.device)

    def attend(kv, q):
        layer, k, v = kv
        # every position is written; lengths and summaries cover the real tokens only, and
        # the attention runs over all T (causal: a padded tail only reaches padding)
        cache.prefill(layer, k, v, lengths)
        return ops.rectify_attention(q, cache.k[layer], cache.v[layer], full, backend=backend)

    logits = model.forward(prompt, positions, cache, attend)
    return logits[torch.arange(B), lengths.long() - 1]


def _step(model, cache, tokens, positions, sparse: bool, attention: StepAttention, backend):
    """Feed tokens [B, n] at positions [B, n]: append K/V, attend (sparse only for n == 1)."""
    n = tokens.shape[1]
    scale = model.head_dim ** -0.5

    def attend(kv, q):
        layer, k, v = kv
        cache.append(layer, k, v)
        if n > 1:
            return attention.dense(layer, q.contiguous(), scale)
        if not sparse:
            lens = cache.seqlens[layer]
            return ops.dense_decode(q[:, 0], cache.k[layer], cache.v[layer], lens,
                                    backend=backend)[:, None]
        return attention.sparse(layer, q[:, 0].contiguous(), scale)[:, None]

    logits = model.forward(tokens, positions, cache, attend)
    return logits[:, -1]


def run_decode_cycle(model: ToyAttentionModel, prompt, lengths, steps: int, config: ReSAConfig,
                     *, mode: str = "resa", backend: str = "auto", max_seq_len=None,
                     teacher_tokens=None) -> CycleResult:
    """Greedy decoding of ``steps`` tokens.

    prompt [B, T] right-padded token ids with per-row ``lengths`` [B]; mode "resa" (sparse steps
    with rectification every ``config.rectify_every``; 0 = sparse only) or "dense".
    teacher_tokens [B, steps], optional: feed these instead of the argmax (teacher forcing), so
    the logits of different modes can be compared position by position.
    """
    if mode not in ("resa", "dense"):
        raise ValueError(f"mode must be 'resa' or 'dense', got {mode!r}")
    B, T = prompt.shape
    lengths = torch.as_tensor(lengths, dtype=torch.int32, device=prompt.device)
    cache = model.new_cache(B, max_seq_len or T + steps + 1, config, backend)
    logits = _prefill(model, cache, prompt, lengths, backend)
    fed = [list(prompt[b, : int(lengths[b])].tolist()) for b in range(B)]
    cycle = DecodeCycle(config.rectify_every)
    attention = StepAttention(cache, model.num_heads, refresh=False)
    out, all_logits, result = [], [], CycleResult(tokens=None, cache=cache)
    for step in range(steps):
        all_logits.append(logits)
        nxt = logits.argmax(-1) if teacher_tokens is None else teacher_tokens[:, step]
        out.append(nxt)
        for b in range(B):
            fed[b].append(int(nxt[b]))
        f = cycle.rewind_before(1) if mode == "resa" else 0
        if f:                                          # fused rectification: rewind f, feed f+1
            cache.rewind(f)
            toks = torch.tensor([row[-(f + 1):] for row in fed], device=prompt.device)
            pos = cache.seqlens[0].long()[:, None] + torch.arange(f + 1, device=prompt.device)
            logits = _step(model, cache, toks, pos, False, attention, backend)
            cycle.advance(f + 1)
            result.dense_steps.append(step)
            result.snapshots.append((step, [list(r) for r in fed]))
        else:
            pos = cache.seqlens[0].long()[:, None]
            logits = _step(model, cache, nxt[:, None], pos, mode == "resa", attention, backend)
            if mode == "resa":
                cycle.advance(1)
    result.tokens = torch.stack(out, dim=1)
    result.logits = torch.stack(all_logits, dim=1)
    return result


def dense_recompute(model: ToyAttentionModel, fed_rows, config: ReSAConfig, backend="auto"):
    """Teacher-forced dense pass over each row's tokens; returns a cache holding their K/V."""
    B = len(fed_rows)
    T = max(len(r) for r in fed_rows)
    dev = model.embed.device
    prompt = torch.zeros(B, T, dtype=torch.long, device=dev)
    for b, r in enumerate(fed_rows):
        prompt[b, : len(r)] = torch.tensor(r, device=dev)
    lengths = torch.tensor([len(r) for r in fed_rows], dtype=torch.int32, device=dev)
    cache = model.new_cache(B, T + 1, config, backend)
    _prefill(model, cache, prompt, lengths, backend)
    return cache
