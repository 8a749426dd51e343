"""Causal attention of a chunk of T queries against a cache that already holds their keys:
the prompt chunks of a chunked prefill, where T is in the thousands.

Row b holds ``len_b`` keys and its T queries sit at positions ``len_b - T .. len_b - 1``. The
attention splits exactly into the prefix (keys ``[0, len_b - T)``, which every query sees) and
the chunk itself (keys ``[len_b - T, len_b)``, causal, a square T x T problem); each part runs as
one flash-attention call that also returns its log-sum-exp, and the two are merged with the
softmax-merge rule. So memory stays O(B·H·T·D) whatever the context, no mask is built, and
grouped-query attention needs no copy of the cache: for the prefix, the query heads of a group
are folded into the query axis ([B, Hkv, g·T, D] against [B, Hkv, P, D]); only the chunk's own
T keys are repeated per query head.

A single masked SDPA call (a [B, T, L] mask) would instead fall back to the math kernel under
grouped-query attention and materialise [B, H, T, L] scores: gigabytes per chunk at long
contexts, which is what bounds the chunk size of a masked implementation.

On CUDA with fp16/bf16 the parts run through ``aten._scaled_dot_product_flash_attention``
(torch's own flash kernel, the one ``F.scaled_dot_product_attention`` picks, called directly
for its log-sum-exp); elsewhere through :func:`attend_reference`, a plain fp32 implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

#: head dims torch's flash kernel takes
_FLASH_HEAD_DIMS = range(8, 257, 8)


def _use_flash(q: torch.Tensor) -> bool:
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] in _FLASH_HEAD_DIMS)


def attend_reference(q, k, v, causal: bool, scale: float, chunk: int = 512):
    """Attention with its log-sum-exp, in fp32 (fp64 for fp64 inputs). q [B, H, T, D], k/v
    [B, H, S, D] (same heads); ``causal`` needs T == S. Returns (out [B, H, T, Dv] in q's
    dtype, lse [B, H, T] in the compute dtype)."""
    B, H, T, D = q.shape
    S = k.shape[2]
    ct = torch.promote_types(q.dtype, torch.float32)
    out = q.new_empty(B, H, T, v.shape[-1])
    lse = torch.empty(B, H, T, dtype=ct, device=q.device)
    kf, vf = k.to(ct), v.to(ct)
    for s in range(0, T, chunk):                       # bounds the scores to [B, H, chunk, S]
        e = min(T, s + chunk)
        scores = (q[:, :, s:e].to(ct) @ kf.transpose(-1, -2)) * scale
        if causal:
            rows = torch.arange(s, e, device=q.device)[:, None]
            scores = scores.masked_fill(torch.arange(S, device=q.device)[None] > rows,
                                        float("-inf"))
        m = torch.logsumexp(scores, dim=-1)
        lse[:, :, s:e] = m
        out[:, :, s:e] = (torch.exp(scores - m[..., None]) @ vf).to(q.dtype)
    return out, lse


def _attend(q, k, v, causal: bool, scale: float):
    if _use_flash(q):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    return attend_reference(q, k, v, causal, scale)


def _prefix_part(q, k, v, scale):
    """q [B, H, T, D] against a shared prefix k/v [B, Hkv, P, D], with the g = H / Hkv query
    heads of each group folded into the query axis (no copy of the prefix)."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    g = H // Hkv
    qf = q.reshape(B, Hkv, g * T, D)                     # head h = kv * g + j (repeat_kv)
    out, lse = _attend(qf, k, v, False, scale)
    return out.reshape(B, H, T, -1), lse.reshape(B, H, T)


def _chunk_part(q, k, v, scale):
    """q [B, H, T, D] against its own T keys k/v [B, Hkv, T, D], causal."""
    g = q.shape[1] // k.shape[1]
    if g > 1:
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    return _attend(q, k, v, True, scale)


def merge(out_a, lse_a, out_b, lse_b):
    """Softmax-merge two attention results over disjoint key sets: out [B, H, T, D], lse
    [B, H, T] fp32 -> the attention over the union (out in out_a's dtype)."""
    m = torch.maximum(lse_a, lse_b)
    wa = torch.exp(lse_a - m)[..., None]
    wb = torch.exp(lse_b - m)[..., None]
    return ((out_a.to(wa.dtype) * wa + out_b.to(wa.dtype) * wb) / (wa + wb)).to(out_a.dtype)


def equal_length_chunk(q, k_cache, v_cache, length: int, scale: float):
    """All rows hold ``length`` keys. q [B, T, H, D]; k/v_cache [B, S_max, Hkv, D]
    -> [B, T, H, Dv]."""
    T = q.shape[1]
    P = length - T
    qh = q.transpose(1, 2)                                            # [B, H, T, D]
    kc = k_cache[:, P:length].transpose(1, 2)                         # [B, Hkv, T, D]
    vc = v_cache[:, P:length].transpose(1, 2)
    if P == 0:                   # a fresh prompt: one causal call (flash, grouped-query aware)
        o = F.scaled_dot_product_attention(qh, kc, vc, is_causal=True, scale=scale,
                                           enable_gqa=True)
        return o.transpose(1, 2)
    qh = qh.contiguous()
    o_p, l_p = _prefix_part(qh, k_cache[:, :P].transpose(1, 2), v_cache[:, :P].transpose(1, 2),
                            scale)
    o_c, l_c = _chunk_part(qh, kc, vc, scale)
    return merge(o_p, l_p, o_c, l_c).transpose(1, 2)


def chunk_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale: float):
    """Causal attention of the last T cached positions of every row. q [B, T, H, D];
    k_cache / v_cache [B, S_max, Hkv, D / Dv]; cache_seqlens int [B] (each >= T) ->
    [B, T, H, Dv]. Reads the lengths on the host: for prefill, not for a captured step."""
    host = cache_seqlens.tolist()
    T = q.shape[1]
    if min(host) < T:
        raise ValueError(f"chunk_attention: every row must hold the chunk's {T} keys; lengths "
                         f"{host}")
    if all(n == host[0] for n in host):
        return equal_length_chunk(q, k_cache, v_cache, host[0], softmax_scale)
    out = q.new_empty(*q.shape[:3], v_cache.shape[-1])
    for b, n in enumerate(host):
        out[b:b + 1] = equal_length_chunk(q[b:b + 1], k_cache[b:b + 1], v_cache[b:b + 1], n,
                                          softmax_scale)
    return out
