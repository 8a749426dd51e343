"""Teacher-forced ReSA fidelity without a token-by-token loop.

Under teacher forcing every decoded token is known in advance, so the K/V that sparse decoding
would have produced can be computed layer by layer for all decoded positions at once: at layer l,
the inputs of every position come from layer l-1 of the same (sparse) computation, and the
attention of each position is evaluated with exactly the keys the decode cycle would hold at that
step. This gives the same per-token logits as feeding the tokens one at a time through
``resa_tl.attach`` (tests check that on a short sequence) at the cost of a prefill, which makes
perplexity over thousands of decoded tokens affordable on a CPU.

The cycle (rectification fused into decoding, as ``attach`` runs it): after a dense prefill of L
tokens, decode step i feeds position L+i. With rectification every f steps, steps come in cycles
of f+1: the first f feed one token each through select_blocks + sparse_decode, the last rewinds
those f and feeds all f+1 densely (rewriting their K/V). A sparse step in a cycle starting at
position cs sees dense K/V below cs and the sparse K/V of positions cs..itself. f = 0 means
sparse-only decoding: one endless cycle.

Diagnostic selection rules (``selections=``; torch only, not something the kernels do): what
part of ReSA's loss comes from its scoring rule rather than from its budget.
  "upper_bound"  the paper's (and resa_tl's) rule: the group-mean query against per-block min/max
                 keys, sum_d max(q_d kmin_d, q_d kmax_d);
  "sink"         the same, with block 0 (the attention-sink tokens) always kept, inside the budget:
                 the kernels' rule with ReSAConfig(sink_blocks=1);
  "oracle"       blocks ranked by their exact attention mass: softmax over every valid key of the
                 K that this step really sees, summed over the group's query heads;
  "int8_summaries" the upper bound from summaries stored as int8 with one scale per (block, KV
                 head), max|k| / 127, kmin rounded down and kmax up (a bound still): a storage
                 format the kernels do not implement, to compare with the fp8 summaries they do
                 (ReSAConfig.summary_dtype).
All keep the same number of blocks, force the newest ``local_blocks`` and rectify alike.

Supported: transformers decoder-only models whose attention calls the attention interface with
``module.layer_idx`` (Llama, Qwen2, Qwen3, Mistral, ...).
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from . import ops
from .config import ReSAConfig
from .cycle import cycle_spans
from .kernels.block_summaries import fp8_name
from .kernels.select_blocks import (block_scores_reference, default_max_selected,
                                select_from_scores_reference)

_IMPL = "resa_tl_teacher_forced"
SELECTIONS = ("upper_bound", "sink", "oracle", "int8_summaries")


class _State:
    """What the registered attention function does for the current forward."""
    mode: str = "off"          # "capture" (dense, records K/V) | "simulate"
    dense_k: dict = {}         # layer -> [1, Hkv, S, D] dense K (after RoPE) of the whole sequence
    dense_v: dict = {}
    prompt_len: int = 0
    config: ReSAConfig | None = None
    backend: str = "auto"
    chunk: int = 128
    selection: str = "upper_bound"
    kv_rel: dict | None = None  # layer -> [2, N] relative K/V error of the decoded positions


_state = _State()


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """query [1, H, T, D], key/value [1, Hkv, T, D] of the positions of this forward."""
    layer = module.layer_idx
    if _state.mode == "capture":
        _state.dense_k[layer], _state.dense_v[layer] = key.detach(), value.detach()
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                             enable_gqa=True)
        return out.transpose(1, 2).contiguous(), None
    if _state.mode != "simulate":
        raise RuntimeError("resa_tl.fidelity attention used outside teacher_forced_logits")
    if _state.kv_rel is not None:
        _state.kv_rel[layer] = _relative_kv_error(layer, key, value)
    return _simulate_layer(layer, query, key, value, scaling), None


def _relative_kv_error(layer, k_sim, v_sim):
    """[2, N]: ||K_path - K_dense|| / ||K_dense|| (and V) over all KV heads and dims, for each
    decoded position, where K_path is what the decode path writes for that position (kept until
    a rectification rewrites it, f steps at most; forever without rectification)."""
    L, N = _state.prompt_len, k_sim.shape[2]
    out = []
    for sim, dense in ((k_sim, _state.dense_k[layer]), (v_sim, _state.dense_v[layer])):
        ref = dense[0, :, L:L + N].double()                         # [Hkv, N, D]
        err = (sim[0].double() - ref).pow(2).sum(dim=(0, 2)).sqrt()
        out.append((err / ref.pow(2).sum(dim=(0, 2)).sqrt().clamp_min(1e-30)).float())
    return torch.stack(out)


def _simulate_layer(layer, q, k_sim, v_sim, scale):
    cfg, L = _state.config, _state.prompt_len
    N = q.shape[2]
    f = cfg.rectify_every
    kd, vd = _state.dense_k[layer], _state.dense_v[layer]          # [1, Hkv, L + N (+1), D]
    out = torch.empty(1, N, q.shape[1], v_sim.shape[-1], dtype=q.dtype, device=q.device)
    for c0, c1, n_sparse in cycle_spans(N, f):
        # NHD cache for this cycle: dense below its start, the sparse path's K/V inside it.
        S = L + c1
        kc = kd[0, :, :S].transpose(0, 1).clone()                   # [S, Hkv, D]
        vc = vd[0, :, :S].transpose(0, 1).clone()
        kc[L + c0:L + c0 + n_sparse] = k_sim[0, :, c0:c0 + n_sparse].transpose(0, 1)
        vc[L + c0:L + c0 + n_sparse] = v_sim[0, :, c0:c0 + n_sparse].transpose(0, 1)
        kmin, kmax = ops.block_summaries(kc[None], torch.tensor([S], device=q.device),
                                         cfg.block_size, summary_dtype=cfg.summary_dtype,
                                         backend=_state.backend)
        for r0 in range(c0, c0 + n_sparse, _state.chunk):
            r1 = min(r0 + _state.chunk, c0 + n_sparse)
            R = r1 - r0
            pos = torch.arange(L + r0, L + r1, device=q.device)
            lens = (pos + 1).to(torch.int32)
            kx, vx = kc[None].expand(R, *kc.shape), vc[None].expand(R, *vc.shape)
            # Each query's last block holds only the keys up to its own position.
            mn, mx = kmin.expand(R, *kmin.shape[1:]).clone(), kmax.expand(R, *kmax.shape[1:]).clone()
            ops.update_block_summaries(mn, mx, kx, pos, 1, cfg.block_size, backend=_state.backend)
            qr = q[0, :, r0:r1].transpose(0, 1).contiguous()         # [R, H, D]
            if _state.selection == "upper_bound":
                idx = ops.select_blocks(qr, mn, mx, lens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio, min_blocks=cfg.min_blocks,
                                        local_blocks=cfg.local_blocks,
                                        sink_blocks=cfg.sink_blocks, backend=_state.backend)
            else:
                idx = diagnostic_select(_state.selection, qr, mn, mx, kc[None], lens, cfg, scale)
            out[0, r0:r1] = ops.sparse_decode(qr, kx, vx, idx, lens, block_size=cfg.block_size,
                                              softmax_scale=scale, backend=_state.backend)
        if n_sparse < c1 - c0:                                      # the fused dense step
            p = L + c1 - 1
            qd = q[0, :, c1 - 1][None]                              # [1, H, D]
            out[0, c1 - 1] = ops.dense_decode(qd, kd[0, :, :p + 1].transpose(0, 1)[None].contiguous(),
                                              vd[0, :, :p + 1].transpose(0, 1)[None].contiguous(),
                                              torch.tensor([p + 1], device=q.device),
                                              softmax_scale=scale, backend="torch")[0]
    return out


def exact_block_mass(q, k, cache_seqlens, block_size: int, scale: float):
    """Attention mass of every block: softmax(q k^T * scale) over the keys below each row's
    length, summed over the block's keys and over the g query heads of each KV head.

    q [R, H, D]; k [R or 1, S, Hkv, D] (1: one cache shared by all rows); cache_seqlens [R].
    Returns fp32 [R, Hkv, ceil(S / block_size)] (0 past a row's end)."""
    R, H, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    qg = q.float().view(R, Hkv, H // Hkv, D)
    kf = k.float()
    if kf.shape[0] == 1:
        logits = torch.einsum("rhgd,shd->rhgs", qg, kf[0]) * scale
    else:
        logits = torch.einsum("rhgd,rshd->rhgs", qg, kf) * scale
    valid = torch.arange(S, device=q.device)[None] < cache_seqlens.long()[:, None]   # [R, S]
    p = logits.masked_fill(~valid[:, None, None], float("-inf")).softmax(-1).sum(2)  # [R, Hkv, S]
    NB = -(-S // block_size)
    p = F.pad(p, (0, NB * block_size - S))
    return p.view(R, Hkv, NB, block_size).sum(-1)


def int8_summaries(kmin, kmax):
    """Exact summaries -> what int8 storage with one scale per (block, KV head) would give back
    (fp32): scale = max |k| / 127, kmin rounded down and kmax up, so the bound still holds."""
    lo, hi = kmin.float(), kmax.float()
    scale = torch.maximum(lo.abs(), hi.abs()).amax(-1, keepdim=True).clamp_min(1e-30) / 127
    qlo = (lo / scale).floor().clamp(-128, 127) * scale
    qhi = (hi / scale).ceil().clamp(-128, 127) * scale
    inf = torch.tensor(float("inf"))
    # fp32 rounding of the products may land one ulp inside: step outward where it did
    qlo = torch.where(qlo > lo, torch.nextafter(qlo, -inf), qlo)
    qhi = torch.where(qhi < hi, torch.nextafter(qhi, inf), qhi)
    return qlo, qhi


def diagnostic_select(rule: str, q, kmin, kmax, k, cache_seqlens, cfg: ReSAConfig, scale: float):
    """Block indices [R, Hkv, K] int32 (ascending, -1 padded, as ops.select_blocks returns them)
    chosen by one of the :data:`SELECTIONS`; budget, local blocks and K as in select_blocks."""
    if rule not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {rule!r}")
    sink = max(cfg.sink_blocks, 1) if rule == "sink" else cfg.sink_blocks   # = sink_blocks=1
    if rule == "int8_summaries":
        if fp8_name(kmin.dtype):
            raise ValueError("selection 'int8_summaries' re-quantises exact summaries; it cannot "
                             "be combined with fp8 ones (ReSAConfig.summary_dtype)")
        kmin, kmax = int8_summaries(kmin, kmax)
    s = block_scores_reference(q, kmin, kmax, cache_seqlens, cfg.block_size, cfg.local_blocks,
                               sink)
    if rule == "oracle":
        mass = exact_block_mass(q, k, cache_seqlens, cfg.block_size, scale)[..., :s.shape[-1]]
        s = torch.where(torch.isinf(s), s, mass)          # keeps the -inf / +inf masks
    K = default_max_selected(kmin.shape[1], cfg.sparse_ratio, cfg.min_blocks)
    return select_from_scores_reference(s, cache_seqlens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio,
                                        min_blocks=cfg.min_blocks, max_selected=K)


@contextlib.contextmanager
def _registered(model):
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(_IMPL, _attention)
    AttentionMaskInterface.register(_IMPL, lambda *args, **kwargs: None)   # we mask ourselves
    previous = model.config._attn_implementation
    model.set_attn_implementation(_IMPL)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _state.mode, _state.dense_k, _state.dense_v = "off", {}, {}
        _state.selection, _state.kv_rel = "upper_bound", None


@torch.no_grad()
def teacher_forced_logits(model, token_ids, prompt_len: int, configs: dict, *,
                          backend: str = "auto", chunk: int = 128, selections: dict | None = None,
                          kv_errors: dict | None = None):
    """Per-position logits of decoding ``token_ids[prompt_len:]`` one at a time after a dense
    prefill of ``token_ids[:prompt_len]``, for dense attention and each ReSA configuration.

    Parameters
    ----------
    model : transformers causal LM (batch 1).
    token_ids : LongTensor [T] — the true sequence.
    prompt_len : int — L, the densely prefilled part (>= 1).
    configs : dict name -> ReSAConfig (rectify_every = 0 for sparse-only).
    selections : optional dict name -> one of :data:`SELECTIONS` (default "upper_bound", the
        paper's rule); any other rule runs the torch reference, whatever ``backend`` says.
    kv_errors : optional dict, filled with name -> float32 Tensor [layers, 2, T - L]: per layer,
        the relative error ||K - K_dense|| / ||K_dense|| (index 0) and the same for V (index 1)
        of the K/V that decoding writes for each decoded position (over all KV heads and dims).
        Sparse-only keeps that error in the cache for good; ReSA rewrites it at the next
        rectification, and its rectification steps write dense K/V (error 0). This is the
        drift that rectification bounds.

    Returns
    -------
    dict name -> float32 Tensor [T - L, vocab]: row i holds the logits produced when position
    L+i is fed, i.e. the prediction of token L+i+1. Key "dense" is always included.
    """
    T = token_ids.shape[0]
    L = prompt_len
    selections = selections or {}
    for name, rule in selections.items():
        if name not in configs or rule not in SELECTIONS:
            raise ValueError(f"selections: {name!r} -> {rule!r} needs a name of configs and a "
                             f"rule in {SELECTIONS}")
    if not 1 <= L < T:
        raise ValueError(f"prompt_len must be in [1, {T - 1}], got {L}")
    dev = next(model.parameters()).device
    ids = token_ids.to(dev)[None]
    results = {}
    with _registered(model):
        _state.mode = "capture"
        dense = model(ids, use_cache=False).logits[0, L:].float()
        results["dense"] = dense
        decode_ids = ids[:, L:]
        positions = torch.arange(L, T, device=dev)[None]
        for name, cfg in configs.items():
            _state.mode, _state.config, _state.prompt_len = "simulate", cfg, L
            _state.backend, _state.chunk = backend, chunk
            _state.selection = selections.get(name, "upper_bound")
            _state.kv_rel = {} if kv_errors is not None else None
            results[name] = model(decode_ids, position_ids=positions, use_cache=False).logits[0].float()
            if kv_errors is not None:
                kv_errors[name] = torch.stack([_state.kv_rel[i] for i in sorted(_state.kv_rel)])
    return results


def nll_and_agreement(logits: dict, token_ids, prompt_len: int):
    """Per-position NLL of the true next token and top-1 agreement with dense.

    Returns dict name -> (nll [n], agree [n]) over the positions that have a next token.
    """
    targets = token_ids[prompt_len + 1:].to(logits["dense"].device)
    n = targets.shape[0]
    dense_top = logits["dense"][:n].argmax(-1)
    out = {}
    for name, lg in logits.items():
        lp = torch.log_softmax(lg[:n], dim=-1)
        nll = -lp.gather(1, targets[:, None])[:, 0]
        out[name] = (nll.cpu(), (lg[:n].argmax(-1) == dense_top).cpu())
    return out


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.double().mean().item())
