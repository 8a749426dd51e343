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
  "upper_bound"  the paper's (and the kernels') rule: the group-mean query against per-block
                 min/max keys, sum_d max(q_d kmin_d, q_d kmax_d), with the config's sink_blocks
                 (the paper's rule exactly with ReSAConfig(sink_blocks=0));
  "sink"         the same, with block 0 (the attention-sink tokens) always kept, inside the budget:
                 the kernels' rule with ReSAConfig(sink_blocks=1), resa_tl's default;
  "oracle"       blocks ranked by their exact attention mass: softmax over every valid key of the
                 K that this step really sees, summed over the group's query heads (only the
                 newest blocks forced, whatever the config's sink_blocks);
  "int8_summaries" the upper bound from summaries stored as int8 with one scale per (block, KV
                 head), max|k| / 127, kmin rounded down and kmax up (a bound still): a storage
                 format the kernels do not implement, to compare with the fp8 summaries they do
                 (ReSAConfig.summary_dtype);
  "head_max"     the same bound computed for each of the g query heads of a KV head with its own
                 query, sum_d max(q_hd kmin_d, q_hd kmax_d), folded over the group by max: a
                 bound on the largest logit any head of the group can reach in the block (the
                 per-head bound of Quest, folded for GQA). Why: the group mean cancels where the
                 heads' queries disagree in sign, so a block that one head needs can score low;
  "head_sum"     the per-head bounds folded by sum: a bound on the group's summed logit
                 sum_h q_h.k. It is >= g times the group-mean score, with equality only where, in
                 every dimension, all g heads pick the same end (kmin or kmax), i.e. their
                 query components agree in sign; the paper's rule is this one with the max/min
                 choice made once for the group. Why: it separates the looseness of the shared
                 choice from that of the fold (max vs sum);
  "head_max+sink", "head_sum+sink"  those two with block 0 always kept inside the budget, as
                 "sink" does for the upper bound (the sink and the scoring rule are independent
                 fixes; these measure whether they add up).
All keep the same number of blocks, force the newest ``local_blocks`` and rectify alike. Per-head
scoring reads the same summaries as the paper's rule with g times the multiply-adds; the kernels
implement only "upper_bound" (with ``sink_blocks``) and fp8 summaries.

Attention-mass recall (``recall=`` of :func:`teacher_forced_logits`): for every sparse step,
layer and KV head, the exact attention mass (:func:`exact_block_mass`, summed over the group's
query heads) of the blocks the rule selected divided by that of the blocks "oracle" selects at
the same budget (forcing only the newest blocks); averaged with equal weight over steps x
layers x KV heads. The oracle maximises that mass over all selections of the same size that
keep the newest blocks, so recall lies in [0, 1] and is 1 for the oracle, wherever the budget
holds the newest block and any sink block together (min_blocks >= 2 ensures it; with a budget
of one block the "+sink" rules keep block 0 instead of the newest, and nothing bounds their
recall by 1). The
fused dense (rectification) steps are not counted. ``mass`` next to it: the mean fraction of the
group's attention (selected mass / g) that the selection keeps.

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
SELECTIONS = ("upper_bound", "sink", "oracle", "int8_summaries", "head_max", "head_sum",
              "head_max+sink", "head_sum+sink")


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
    recall: dict | None = None  # layer -> [3] (sum of recall, sum of mass kept / g, count)


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
            mass = None
            if _state.recall is not None or _state.selection == "oracle":
                mass = exact_block_mass(qr, kc[None], lens, cfg.block_size, scale)
            if _state.selection == "upper_bound":
                idx = ops.select_blocks(qr, mn, mx, lens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio, min_blocks=cfg.min_blocks,
                                        local_blocks=cfg.local_blocks,
                                        sink_blocks=cfg.sink_blocks, backend=_state.backend)
            else:
                idx = diagnostic_select(_state.selection, qr, mn, mx, kc[None], lens, cfg, scale,
                                        mass=mass)
            if _state.recall is not None:
                best = (idx if _state.selection == "oracle" else
                        diagnostic_select("oracle", qr, mn, mx, kc[None], lens, cfg, scale,
                                          mass=mass))
                got, top = selected_mass(mass, idx), selected_mass(mass, best)
                acc = _state.recall.setdefault(layer, torch.zeros(3, dtype=torch.float64))
                acc += torch.tensor([(got / top).double().sum().item(),
                                     got.double().sum().item() / (q.shape[1] // kc.shape[1]),
                                     got.numel()], dtype=torch.float64)
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


def head_bound_scores(q, kmin, kmax, fold: str):
    """Per-query-head upper bounds folded over each KV head's group of g query heads.

    q [R, H, D]; kmin/kmax [R, NB, Hkv, D] (any summary dtype). For query head h of KV head j,
    b_h(n) = D^-1/2 sum_d max(q_hd kmin_nd, q_hd kmax_nd) >= D^-1/2 q_h.k for every key k of
    block n (the scale matches block_scores_reference). Returns fp32 [R, Hkv, NB]: max_h b_h
    (``fold="max"``) or sum_h b_h (``fold="sum"``), unmasked. Computed as
    q.(kmin+kmax)/2 + |q|.(kmax-kmin)/2, the same quantity."""
    from .kernels.block_summaries import summary_values
    R, H, D = q.shape
    Hkv = kmin.shape[2]
    lo, hi = summary_values(kmin, kmax)
    lo, hi = lo.float(), hi.float()
    qh = q.float().view(R, Hkv, H // Hkv, D) * D ** -0.5
    b = (torch.einsum("rjgd,rnjd->rjgn", qh, (lo + hi) * 0.5)
         + torch.einsum("rjgd,rnjd->rjgn", qh.abs(), (hi - lo) * 0.5))    # [R, Hkv, g, NB]
    if fold == "max":
        return b.amax(2)
    if fold == "sum":
        return b.sum(2)
    raise ValueError(f"fold must be 'max' or 'sum', got {fold!r}")


def selected_mass(mass, idx):
    """Sum of ``mass`` [R, Hkv, NB] over the blocks of ``idx`` [R, Hkv, K] (-1 = none): the
    attention mass a selection keeps. Returns fp32 [R, Hkv]."""
    sel = mass.gather(-1, idx.long().clamp_min(0))
    return torch.where(idx >= 0, sel, 0).sum(-1)


def diagnostic_select(rule: str, q, kmin, kmax, k, cache_seqlens, cfg: ReSAConfig, scale: float,
                      mass=None):
    """Block indices [R, Hkv, K] int32 (ascending, -1 padded, as ops.select_blocks returns them)
    chosen by one of the :data:`SELECTIONS`; budget, local blocks and K as in select_blocks.
    ``mass``: :func:`exact_block_mass` of these rows if already computed (the oracle uses it)."""
    if rule not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {rule!r}")
    base, plus_sink = rule.removesuffix("+sink"), rule.endswith("+sink")
    sink = max(cfg.sink_blocks, 1) if rule == "sink" or plus_sink else cfg.sink_blocks
    if rule == "oracle":        # the best selection of this size: nothing forced but the newest
        sink = 0
    if rule == "int8_summaries":
        if fp8_name(kmin.dtype):
            raise ValueError("selection 'int8_summaries' re-quantises exact summaries; it cannot "
                             "be combined with fp8 ones (ReSAConfig.summary_dtype)")
        kmin, kmax = int8_summaries(kmin, kmax)
    if base in ("head_max", "head_sum"):
        s = _masked_scores(head_bound_scores(q, kmin, kmax, base[5:]), cache_seqlens,
                           cfg.block_size, cfg.local_blocks, sink)
    elif rule == "oracle" and mass is not None:         # only the masks are needed
        s = _masked_scores(mass[..., :kmin.shape[1]], cache_seqlens, cfg.block_size,
                           cfg.local_blocks, sink)
    else:
        s = block_scores_reference(q, kmin, kmax, cache_seqlens, cfg.block_size,
                                   cfg.local_blocks, sink)
    if rule == "oracle":
        if mass is None:
            mass = exact_block_mass(q, k, cache_seqlens, cfg.block_size, scale)
        s = torch.where(torch.isinf(s), s, mass[..., :s.shape[-1]])   # keeps the -inf / +inf masks
    K = default_max_selected(kmin.shape[1], cfg.sparse_ratio, cfg.min_blocks)
    return select_from_scores_reference(s, cache_seqlens, block_size=cfg.block_size,
                                        sparse_ratio=cfg.sparse_ratio,
                                        min_blocks=cfg.min_blocks, max_selected=K)


def _masked_scores(s, cache_seqlens, block_size: int, local_blocks: int, sink_blocks: int):
    """block_scores_reference's masks on given scores [R, Hkv, NB]: -inf past a row's end, +inf
    for its newest ``local_blocks`` and first ``sink_blocks`` blocks."""
    NB = s.shape[-1]
    nvalid = (cache_seqlens.long() + block_size - 1) // block_size
    j = torch.arange(NB, device=s.device)
    valid = j[None] < nvalid[:, None]
    local = valid & ((j[None] >= nvalid[:, None] - local_blocks) | (j[None] < sink_blocks))
    s = torch.where(valid[:, None], s, float("-inf"))
    return torch.where(local[:, None], float("inf"), s)


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
        _state.selection, _state.kv_rel, _state.recall = "upper_bound", None, None


@torch.no_grad()
def teacher_forced_logits(model, token_ids, prompt_len: int, configs: dict, *,
                          backend: str = "auto", chunk: int = 128, selections: dict | None = None,
                          kv_errors: dict | None = None, recall: dict | None = None):
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
    recall : optional dict, filled with name -> dict(recall=float, mass=float,
        recall_per_layer=list, steps=int) for every configuration: the attention-mass recall
        against the oracle (module doc) averaged over sparse steps x layers x KV heads, the same
        mean and per layer, and the mean fraction of the group's attention mass that the
        selection keeps (``mass``, selected mass / g). Costs one exact attention per sparse step
        and layer (the oracle's own, shared when the rule is "oracle").

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
            _state.recall = {} if recall is not None else None
            results[name] = model(decode_ids, position_ids=positions, use_cache=False).logits[0].float()
            if recall is not None and _state.recall:
                acc = torch.stack([_state.recall[i] for i in sorted(_state.recall)])   # [layers, 3]
                n = acc[:, 2]
                recall[name] = dict(recall=(acc[:, 0].sum() / n.sum()).item(),
                                    mass=(acc[:, 1].sum() / n.sum()).item(),
                                    recall_per_layer=(acc[:, 0] / n).tolist(),
                                    steps=int(acc[0, 2].item()) // model.config.num_key_value_heads)
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
