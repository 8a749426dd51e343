"""Naive float64 implementations of the ReSA ops: explicit loops over rows, heads and blocks,
written independently of resa_tl's vectorised references."""
from __future__ import annotations

import math

import torch


def summaries(k, lens, bs):
    B, S, H, D = k.shape
    nb = -(-S // bs)
    kmin = torch.zeros(B, nb, H, D, dtype=torch.float64)
    kmax = torch.zeros(B, nb, H, D, dtype=torch.float64)
    for b in range(B):
        for j in range(nb):
            hi = min((j + 1) * bs, int(lens[b]))
            if hi > j * bs:
                blk = k[b, j * bs:hi].double()
                kmin[b, j], kmax[b, j] = blk.min(dim=0).values, blk.max(dim=0).values
    return kmin, kmax


def block_scores(q, kmin, kmax, lens, bs, local, sink=0):
    """fp64 scores [B, Hkv, NB] with -inf past the end and +inf for local and sink blocks."""
    B, H, D = q.shape
    NB, Hkv = kmin.shape[1], kmin.shape[2]
    g = H // Hkv
    out = torch.full((B, Hkv, NB), -math.inf, dtype=torch.float64)
    for b in range(B):
        nv = -(-int(lens[b]) // bs)
        for h in range(Hkv):
            qm = q[b, h * g:(h + 1) * g].double().mean(0) / math.sqrt(D)
            for j in range(nv):
                lo, hi = kmin[b, j, h].double(), kmax[b, j, h].double()
                out[b, h, j] = torch.maximum(qm * lo, qm * hi).sum()
                if j >= nv - local or j < sink:
                    out[b, h, j] = math.inf
    return out


def keep_count(nv, ratio, min_blocks):
    # Exact decimal ceil: Fraction(str(ratio)) is the ratio the user wrote.
    from fractions import Fraction
    return max(math.ceil(nv * Fraction(str(ratio))), min(nv, min_blocks))


def attention(q_rows, keys, values, scale):
    """q_rows [R, D], keys [N, D], values [N, Dv] -> [R, Dv] in fp64; zeros if N == 0."""
    if keys.shape[0] == 0:
        return torch.zeros(q_rows.shape[0], values.shape[1], dtype=torch.float64)
    s = (q_rows.double() @ keys.double().T) * scale
    return torch.softmax(s, dim=-1) @ values.double()


def sparse_decode(q, k, v, idx, lens, bs, scale):
    B, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    out = torch.zeros(B, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            pos = [p for j in idx[b, h].tolist() if j >= 0
                   for p in range(j * bs, (j + 1) * bs) if p < int(lens[b])]
            out[b, h * g:(h + 1) * g] = attention(q[b, h * g:(h + 1) * g], k[b, pos, h],
                                                  v[b, pos, h], scale)
    return out


def dense_decode(q, k, v, lens, scale):
    B, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    out = torch.zeros(B, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        for h in range(Hkv):
            out[b, h * g:(h + 1) * g] = attention(q[b, h * g:(h + 1) * g], k[b, :n, h],
                                                  v[b, :n, h], scale)
    return out


def rectify(q, k, v, lens, scale):
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    g = H // Hkv
    out = torch.zeros(B, T, H, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            n = int(lens[b]) - T + t + 1
            for hq in range(H):
                h = hq // g
                out[b, t, hq] = attention(q[b, t, hq][None], k[b, :n, h], v[b, :n, h], scale)[0]
    return out
