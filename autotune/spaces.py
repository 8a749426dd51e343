"""Tuning adapters: per op, the search space of TileLang configs and how to compile, feed, run
and validate one candidate. (Over ~450 lines: six small adapters, one per op, side by side so
that their spaces and checks read alike.)

An adapter is a small class over one kernel module (resa_tl/kernels/<op>.py) and its contract:
a Config dataclass, a Shape dataclass, compile_kernel(shape, config, arch, pdl) and the torch
reference. Everything op-specific lives in its methods:

    default_config(key, target)  -> the heuristic's config (resa_tl.heuristics)
    space(key, target)           -> candidate configs (default included), deterministic order
    kernel_shape(key)            -> the kernel module's Shape of the problem
    static_id(key)               -> what a compiled kernel depends on (dedupes compiles)
    compile(key, cfg, target)    -> compile_kernel(...) (memoised, TileLang disk cache), no GPU
    make_inputs(key, device, gen, ragged) -> dict of tensors (one input set)
    call(inp, cfg, out)          -> runs the op's plan (resa_tl.plan) built with ``cfg``
    check(out, inp)              -> None, or why the output is wrong (vs the torch reference)
    validation_key(key)          -> a small problem with the same static params (same kernel)
    bytes_moved(key)             -> compulsory DRAM bytes of one call (roofline %, rotation)
    alloc_bytes(key)             -> device memory of one input set

Candidates run through the production path (plan: workspaces, split heuristics, combine
kernel) with the candidate given as the plan's config override: the same code the ops run,
nothing patched.
"""
from __future__ import annotations

import dataclasses
import itertools
import math

from resa_tl import heuristics, plan, schedules
from resa_tl.kernels import block_summaries, dense_decode, rectify_attention, select_blocks
from resa_tl.kernels import sparse_decode

from .workloads import LOCAL_BLOCKS, MIN_BLOCKS, SPARSE_RATIO, blocks_kept

# Largest dynamic shared memory per CTA (bytes) by arch; compile does not check it (TileLang
# notes §8.2), so candidates over it are dropped before compiling.
SMEM_LIMIT = {"sm80": 163 * 1024, "sm86": 99 * 1024, "sm89": 99 * 1024, "sm90": 227 * 1024}
# Shared memory per SM (bytes): bounds CTAs per SM.
SM_SMEM = {"sm80": 164 * 1024, "sm86": 100 * 1024, "sm89": 100 * 1024, "sm90": 228 * 1024}
# SM counts for heuristics that need one when no GPU is present (--compile-only).
NOMINAL_SMS = {"sm80": 108, "sm86": 84, "sm89": 128, "sm90": 132}

MAX_CANDIDATES = 12


def torch_dtype(name: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def is_hopper(target: str) -> bool:
    return schedules.arch_key(target).startswith("sm9")


# ------------------------------------------------------------------------------------------
# Base adapter
# ------------------------------------------------------------------------------------------

class Adapter:
    op: str = ""
    kernel = None                # the kernel module (resa_tl.kernels.<op>)
    config_class = None          # its Config dataclass
    dynamic_fields: tuple = ("batch", "context")    # key fields the compiled kernel ignores
    tolerance_factor = 2.0
    max_candidates = MAX_CANDIDATES

    def available(self) -> str | None:
        """None: the op can be tuned (kept for the tuner's report, which lists reasons)."""
        return None

    def config_cls(self):
        return self.config_class

    def config_from_dict(self, d: dict):
        return self.config_class(**d)

    def static_id(self, key: dict) -> tuple:
        return tuple((k, v) for k, v in key.items() if k not in self.dynamic_fields)

    def compile(self, key: dict, cfg, target: str):
        return self.kernel.compile_kernel(self.kernel_shape(key), cfg, target,
                                          heuristics.use_pdl(target))

    # -- search space ----------------------------------------------------------------------
    def axes(self, key: dict, target: str, default) -> dict[str, list]:
        """Values to try per config field (fields absent from the config class are ignored)."""
        return {}

    def derive(self, cfg_fields: dict, key: dict, target: str) -> dict:
        """Fields that follow from others (e.g. threads = 2 * block_M)."""
        return cfg_fields

    def legal(self, cfg, key: dict, target: str) -> bool:
        return True

    def space(self, key: dict, target: str, max_candidates: int | None = None) -> list:
        """The default plus the legal combinations of ``axes``; at most ``max_candidates``,
        preferring those closest to the default (fewest changed fields), then a fixed order."""
        default = self.default_config(key, target)
        names = {f.name for f in dataclasses.fields(default)}
        ax = {k: list(v) for k, v in self.axes(key, target, default).items() if k in names}
        base = dataclasses.asdict(default)
        cands = {self._ident(default): default}
        for combo in itertools.product(*ax.values()):
            fields = dict(base)
            fields.update(zip(ax.keys(), combo))
            fields = self.derive(fields, key, target)
            try:
                cfg = type(default)(**fields)
            except (TypeError, ValueError):
                continue
            if self.legal(cfg, key, target):
                cands.setdefault(self._ident(cfg), cfg)
        # order: fewest changed fields first; within that, round-robin over which fields
        # changed, nearest values first (so every axis gets explored under a small cap)
        def dist(k, v):
            b = base[k]
            if isinstance(v, (int, float)) and isinstance(b, (int, float)) and v > 0 and b > 0:
                return abs(math.log2(v / b))
            return 0.0 if v == b else 1.0

        groups: dict = {}
        for c in cands.values():
            d = dataclasses.asdict(c)
            changed = tuple(sorted(k for k in ax if d[k] != base[k]))   # derived ones aside
            groups.setdefault(changed, []).append(
                (sum(dist(k, d[k]) for k in changed), self._ident(c), c))
        ranked = []
        for changed, members in groups.items():
            for pos, (_, ident, c) in enumerate(sorted(members, key=lambda m: m[:2])):
                ranked.append(((len(changed), pos, changed, ident), c))
        ranked.sort(key=lambda r: r[0])
        out = [c for _, c in ranked]
        n = self.max_candidates if max_candidates is None else max_candidates
        return sorted(out[:max(1, n)], key=self._ident)

    @staticmethod
    def _ident(cfg) -> tuple:
        return tuple(sorted((k, str(v)) for k, v in dataclasses.asdict(cfg).items()))

    # -- running ---------------------------------------------------------------------------
    def call(self, inp: dict, cfg, out=None):
        """One call of the op's plan built with ``cfg`` (None: the schedule or heuristic, as
        the ops resolve it), into ``out`` when given."""
        raise NotImplementedError

    def reference(self, inp: dict, compute_dtype=None):
        """The torch reference's output for one input set (what :meth:`call` must match)."""
        raise NotImplementedError

    def poisoned_out(self, inp: dict):
        """A NaN-filled output buffer (None: the plan allocates)."""
        return None

    # -- problem sizes -----------------------------------------------------------------------
    def validation_key(self, key: dict) -> dict:
        k = dict(key)
        if "batch" in k:
            k["batch"] = min(k["batch"], 3)
        if "context" in k:
            k["context"] = min(k["context"], 4103)
        return k

    def alloc_bytes(self, key: dict) -> int:
        """Device memory of one input set (bounds how many sets rotate)."""
        return self.bytes_moved(key)

    def bytes_moved(self, key: dict) -> int:
        raise NotImplementedError


def _seqlens(B: int, S: int, ragged: bool, gen, device, lo: int = 1):
    """Full rows, or (ragged) the first row full and the others random in [lo, S]."""
    import torch
    if not ragged:
        return torch.full((B,), S, dtype=torch.int32, device=device)
    r = torch.randint(lo, S + 1, (B,), generator=gen, device=gen.device, dtype=torch.int32)
    r[0] = S
    return r.to(device)


def _randn(shape, dtype, gen, device, scale=1.0):
    """Normal values made on the generator's device (a CUDA generator for large tensors)."""
    import torch
    x = torch.empty(shape, dtype=dtype, device=gen.device).normal_(0.0, scale, generator=gen)
    return x.to(device)


def _attention_check(out, ref32, reflow, factor: float) -> str | None:
    import torch
    if tuple(out.shape) != tuple(ref32.shape):
        return f"shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    o, r, lo = out.float(), ref32.float(), reflow.float()
    if not torch.isfinite(o).all():
        return "non-finite values (unwritten or NaN outputs)"
    err = (o - r).abs().max().item()
    base = (lo - r).abs().max().item()
    bound = factor * base + 1e-5
    if err > bound:
        return f"max error {err:.3e} > {factor} x torch low-precision error {base:.3e} + 1e-5"
    return None


# ------------------------------------------------------------------------------------------
# rectify_attention
# ------------------------------------------------------------------------------------------

class RectifyAdapter(Adapter):
    op = "rectify_attention"
    kernel = rectify_attention
    config_class = rectify_attention.RectifyConfig
    max_candidates = 10

    def default_config(self, key, target):
        D = key["head_dim"]
        return heuristics.rectify_config(key["T"], key["g"], D, target)

    def axes(self, key, target, default):
        if is_hopper(target):
            return {"block_M": [64, 128], "block_N": [64, 128], "num_stages": [1, 2, 3],
                    "schedule": ["auto", "pingpong"]}
        # sm_80/89: cp.async with a runtime trip count allows at most one stage (notes §8.1)
        return {"block_M": [64, 128], "block_N": [32, 64, 128], "num_stages": [0, 1]}

    def derive(self, f, key, target):
        if "threads" in f and "block_M" in f:
            f["threads"] = 2 * f["block_M"]
        return f

    def legal(self, cfg, key, target):
        D = key["head_dim"]
        st = max(getattr(cfg, "num_stages", 1), 1)
        smem = (cfg.block_M * D + st * cfg.block_N * 2 * D) * 2
        if getattr(cfg, "schedule", "auto") == "pingpong" and not is_hopper(target):
            return False
        # 128-row tiles only pay off when there are > 64 rows (T * g)
        if cfg.block_M > 64 and key["T"] * key["g"] <= 64 and cfg.block_M != \
                self.default_config(key, target).block_M:
            return False
        return smem <= SMEM_LIMIT.get(schedules.arch_key(target), 99 * 1024)

    def static_id(self, key):
        return tuple((k, v) for k, v in key.items() if k not in ("batch", "context"))

    def kernel_shape(self, key):
        D = key["head_dim"]
        return rectify_attention.RectifyShape(key["T"], key["g"], key["hkv"], D, D, key["dtype"],
                                              float(D ** -0.5))

    def make_inputs(self, key, device, gen, ragged=False):
        B, T, D = key["batch"], key["T"], key["head_dim"]
        S, Hkv, H = key["context"], key["hkv"], key["hkv"] * key["g"]
        dt = torch_dtype(key["dtype"])
        return dict(q=_randn((B, T, H, D), dt, gen, device),
                    k=_randn((B, S, Hkv, D), dt, gen, device),
                    v=_randn((B, S, Hkv, D), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device, lo=T))

    def call(self, inp, cfg, out=None):
        q, k, v, lens = inp["q"], inp["k"], inp["v"], inp["lens"]
        p = plan.rectify_attention_like(q, k, v, q.shape[-1] ** -0.5, config=cfg)
        return p.run(q, k, v, lens, out)

    def poisoned_out(self, inp):
        import torch
        return torch.full_like(inp["q"], float("nan"))

    def reference(self, inp, compute_dtype=None):
        import torch
        return rectify_attention.rectify_attention_reference(
            inp["q"], inp["k"], inp["v"], inp["lens"], softmax_scale=inp["q"].shape[-1] ** -0.5,
            compute_dtype=compute_dtype or torch.float32)

    def check(self, out, inp):
        import torch
        return _attention_check(out, self.reference(inp).to(torch.float32),
                                self.reference(inp, inp["q"].dtype), self.tolerance_factor)

    def validation_key(self, key):
        k = super().validation_key(key)
        k["context"] = max(min(key["context"], 1000), key["T"] + 1)
        return k

    def bytes_moved(self, key):
        B, T, D, S = key["batch"], key["T"], key["head_dim"], key["context"]
        H = key["hkv"] * key["g"]
        return 2 * (B * S * key["hkv"] * 2 * D + 2 * B * T * H * D)


# ------------------------------------------------------------------------------------------
# block_summaries / update_block_summaries
# ------------------------------------------------------------------------------------------

class SummariesAdapter(Adapter):
    op = "block_summaries"
    kernel = block_summaries
    config_class = block_summaries.SummariesConfig
    mode = "build"
    max_candidates = 8

    def default_config(self, key, target):
        return heuristics.summaries_config(key["hkv"], key["head_dim"])

    def axes(self, key, target, default):
        return {"threads": [128, 256, 512], "blocks_per_cta": [1, 2, 4, 8, 16, 32]}

    def legal(self, cfg, key, target):
        row_vectors = key["hkv"] * key["head_dim"] // 8
        items = cfg.blocks_per_cta * row_vectors
        per_thread = -(-items // cfg.threads)
        # every thread gets work, and at most 8 (block, vector) items per thread
        return items >= cfg.threads and per_thread <= 8

    def static_id(self, key):
        return (("mode", self.mode),) + tuple(
            (k, v) for k, v in key.items() if k not in ("batch", "context", "length"))

    def kernel_shape(self, key):
        return block_summaries.SummariesShape(key["hkv"], key["head_dim"], key["block_size"],
                                              key["dtype"], "int32", self.mode)

    def make_inputs(self, key, device, gen, ragged=False):
        B, S = key["batch"], key["context"]
        dt = torch_dtype(key["dtype"])
        return dict(k=_randn((B, S, key["hkv"], key["head_dim"]), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device), bs=key["block_size"])

    def call(self, inp, cfg, out=None):
        import torch
        k, lens, bs = inp["k"], inp["lens"], inp["bs"]
        B, S, Hkv, D = k.shape
        kmin, kmax = (torch.empty((B, -(-S // bs), Hkv, D), dtype=k.dtype, device=k.device)
                      for _ in range(2))
        return plan.summaries_like(k, lens, bs, k.dtype, config=cfg).run(k, lens, kmin, kmax)

    def reference(self, inp, compute_dtype=None):
        return block_summaries.block_summaries_reference(inp["k"], inp["lens"], inp["bs"])

    def check(self, out, inp):
        import torch
        rmin, rmax = self.reference(inp)
        kmin, kmax = out
        if not (torch.equal(kmin, rmin) and torch.equal(kmax, rmax)):
            bad = int((kmin != rmin).sum().item() + (kmax != rmax).sum().item())
            return f"{bad} summary elements differ from the reference (must be exact)"
        return None

    def bytes_moved(self, key):
        B, S, bs = key["batch"], key["context"], key["block_size"]
        row = key["hkv"] * key["head_dim"] * 2
        return B * S * row + 2 * B * (-(-S // bs)) * row


class UpdateSummariesAdapter(SummariesAdapter):
    op = "update_block_summaries"
    mode = "update"
    CONTEXT = 1024             # cache capacity of the problem (the op's cost does not depend on it)

    def make_inputs(self, key, device, gen, ragged=False):
        import torch
        B, n, bs = key["batch"], key["length"], key["block_size"]
        S = max(self.CONTEXT, 4 * n)
        dt = torch_dtype(key["dtype"])
        shape = (B, -(-S // bs), key["hkv"], key["head_dim"])
        start = torch.randint(0, S - n + 1, (B,), generator=gen, device=gen.device,
                              dtype=torch.int32)
        inp = dict(kmin=_randn(shape, dt, gen, device), kmax=_randn(shape, dt, gen, device),
                   k=_randn((B, S, key["hkv"], key["head_dim"]), dt, gen, device),
                   start=start.to(device), n=n, bs=bs)
        if ragged:                  # validation: keep the state before the in-place update
            inp["kmin0"], inp["kmax0"] = inp["kmin"].clone(), inp["kmax"].clone()
        return inp

    def call(self, inp, cfg, out=None):
        k, start, n = inp["k"], inp["start"], inp["n"]
        p = plan.summaries_like(k, start, inp["bs"], inp["kmin"].dtype, "update", n, config=cfg)
        return p.run(k, start, inp["kmin"], inp["kmax"], n)

    def reference(self, inp, compute_dtype=None):
        """In place, like the kernel: inp's kmin / kmax updated and returned."""
        return block_summaries.update_block_summaries_reference(
            inp["kmin"], inp["kmax"], inp["k"], inp["start"], inp["n"], inp["bs"])

    def check(self, out, inp):
        import torch
        # the kernel updated inp's kmin/kmax in place; apply the reference to the state
        # before the call (the update recomputes whole blocks, so repeated calls agree)
        kmin, kmax = out
        rmin, rmax = inp["kmin0"].clone(), inp["kmax0"].clone()
        block_summaries.update_block_summaries_reference(rmin, rmax, inp["k"], inp["start"],
                                                    inp["n"], inp["bs"])
        if not (torch.equal(kmin, rmin) and torch.equal(kmax, rmax)):
            return "updated summaries differ from the reference (must be exact)"
        return None

    def validation_key(self, key):
        k = dict(key)
        k["batch"] = min(key["batch"], 3)
        return k

    def alloc_bytes(self, key):
        B, n, bs = key["batch"], key["length"], key["block_size"]
        S = max(self.CONTEXT, 4 * n)
        row = key["hkv"] * key["head_dim"] * 2
        return B * S * row + 2 * B * (-(-S // bs)) * row

    def bytes_moved(self, key):
        B, n, bs = key["batch"], key["length"], key["block_size"]
        blocks = -(-n // bs) + 1
        row = key["hkv"] * key["head_dim"] * 2
        return B * blocks * (min(bs, n + bs) * row + 2 * row)


# ------------------------------------------------------------------------------------------
# select_blocks
# ------------------------------------------------------------------------------------------

class SelectAdapter(Adapter):
    op = "select_blocks"
    kernel = select_blocks
    config_class = select_blocks.SelectionConfig
    dynamic_fields = ("batch",)
    max_candidates = 8             # one kernel per NB: keep the compile count down

    def default_config(self, key, target):
        return heuristics.selection_config(key["num_blocks"], key["hkv"], key["head_dim"])

    def axes(self, key, target, default):
        t = getattr(default, "select_threads", 256)
        return {"score_threads": [128, 256, 512],
                "score_rows_per_cta": [4, 8, 16, 32, 64],
                "select_threads": sorted({max(128, t // 2), t, min(1024, 2 * t)}),
                "hist": ["match", "hybrid", "priv"]}

    def poisoned_out(self, inp):
        import torch
        B, H = inp["q"].shape[:2]
        hkv = inp["kmin"].shape[2]
        return torch.full((B, hkv, inp["K"]), -7, dtype=torch.int32, device=inp["q"].device)

    def legal(self, cfg, key, target):
        row_vectors = key["hkv"] * key["head_dim"] // 8
        items = cfg.score_rows_per_cta * row_vectors
        per_thread = -(-items // cfg.score_threads)
        keys_per_thread = -(-key["num_blocks"] // cfg.select_threads)
        return items >= cfg.score_threads // 2 and per_thread <= 16 and keys_per_thread <= 16

    def K(self, key):
        return blocks_kept(key["num_blocks"])

    def kernel_shape(self, key):
        return select_blocks.SelectShape(
            key["num_blocks"], key["hkv"], key["g"], key["head_dim"], key["block_size"],
            float(SPARSE_RATIO), MIN_BLOCKS, LOCAL_BLOCKS, self.K(key), key["dtype"], "int32")

    def make_inputs(self, key, device, gen, ragged=False):
        B, NB, bs = key["batch"], key["num_blocks"], key["block_size"]
        H = key["hkv"] * key["g"]
        dt = torch_dtype(key["dtype"])
        shape = (B, NB, key["hkv"], key["head_dim"])
        kmin = _randn(shape, dt, gen, device)
        kmax = (kmin.float() + _randn(shape, torch_dtype("float16"), gen, device).float().abs()
                ).to(dt)
        return dict(q=_randn((B, H, key["head_dim"]), dt, gen, device), kmin=kmin, kmax=kmax,
                    lens=_seqlens(B, NB * bs, ragged, gen, device), bs=bs, K=self.K(key))

    @staticmethod
    def selection_args(inp):
        return dict(block_size=inp["bs"], sparse_ratio=SPARSE_RATIO, min_blocks=MIN_BLOCKS,
                    local_blocks=LOCAL_BLOCKS, max_selected=inp["K"])

    def call(self, inp, cfg, out=None):
        q, kmin, kmax, lens = inp["q"], inp["kmin"], inp["kmax"], inp["lens"]
        p = plan.select_blocks_like(q, kmin, lens, config=cfg, **self.selection_args(inp))
        return p.run(q, kmin, kmax, lens, None, out)

    def reference(self, inp, compute_dtype=None):
        return select_blocks.select_blocks_reference(inp["q"], inp["kmin"], inp["kmax"],
                                                     inp["lens"], **self.selection_args(inp))

    def check(self, out, inp):
        """Same count and order as the reference; every kept block scores at least the n-th
        best reference score (fp32 ties near the threshold may pick different blocks)."""
        import torch
        m = select_blocks
        ref = self.reference(inp)
        if tuple(out.shape) != tuple(ref.shape):
            return f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
        out = out.long()
        if not torch.equal(out < 0, ref < 0):
            return "number of kept blocks per (row, head) differs from the reference"
        kept = out >= 0
        o = torch.where(kept, out, torch.iinfo(torch.int64).max)
        if not bool((o[..., 1:] > o[..., :-1])[kept[..., 1:]].all()):
            return "kept block ids are not strictly ascending"
        s = m.block_scores_reference(inp["q"], inp["kmin"], inp["kmax"], inp["lens"], inp["bs"],
                                     LOCAL_BLOCKS)
        ref_s = s.gather(-1, ref.long().clamp(min=0)).masked_fill(ref < 0, float("inf"))
        thr = ref_s.amin(-1, keepdim=True)
        got = s.gather(-1, out.clamp(min=0)).masked_fill(~kept, float("inf"))
        tol = 1e-3 * (1.0 + thr.abs())
        if not bool((got >= thr - tol).all()):
            return "a kept block scores below the reference threshold"
        return None

    def validation_key(self, key):
        k = dict(key)
        k["batch"] = min(key["batch"], 3)
        return k

    def bytes_moved(self, key):
        B, NB = key["batch"], key["num_blocks"]
        return 2 * B * NB * key["hkv"] * key["head_dim"] * 2 + B * key["hkv"] * self.K(key) * 4


# ------------------------------------------------------------------------------------------
# dense_decode / sparse_decode (split-KV decode)
# ------------------------------------------------------------------------------------------

class _DecodeAdapter(Adapter):
    max_candidates = 10

    def axes(self, key, target, default):
        """Keys per pipeline stage, padded query rows per CTA (GQA rows per tile: wgmma wants
        64 on sm_90a, mma_sync takes 16/32), stages (1 on sm_80/89: runtime trip count)."""
        bs = key.get("block_size", 16)
        return {"block_N": sorted({max(bs, n) for n in (32, 64, 128)}),
                "block_H": [16, 32, 64],
                "num_stages": [1, 2, 3] if is_hopper(target) else [1],
                # hand-written warp-specialised schedule (sm_90a), two CTAs per SM
                "schedule": ["auto", "ws"] if is_hopper(target) else ["auto"],
                "ctas_per_sm": [1, 2]}

    def derive(self, f, key, target):
        if "threads" in f and "block_H" in f:
            f["threads"] = 2 * f["block_H"]      # each warp owns 16 full rows (FullRow)
        return f

    def legal(self, cfg, key, target):
        D = key["head_dim"]
        bn = max(getattr(cfg, "block_N", 64), key.get("block_size", 16))
        bh = getattr(cfg, "block_H", 64)
        st = max(getattr(cfg, "num_stages", 1), 1)
        if bh < key["g"]:
            return False
        try:                                     # the kernel module's own rules
            self.kernel.check_config(self.kernel_shape(key), cfg)
        except ValueError:
            return False
        if getattr(cfg, "schedule", "auto") != "auto" and not is_hopper(target):
            return False
        smem = (bh * D + st * bn * 2 * D) * 2
        ctas = getattr(cfg, "ctas_per_sm", 1)
        a = schedules.arch_key(target)
        return smem <= SMEM_LIMIT.get(a, 99 * 1024) and \
            smem * ctas <= SM_SMEM.get(a, 100 * 1024)

    def static_id(self, key):
        keep = ("dtype", "head_dim", "g", "hkv", "block_size")
        return tuple((k, key[k]) for k in keep if k in key)

    def poisoned_out(self, inp):
        import torch
        q = inp["q"]
        return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)

    def bytes_moved(self, key):
        raise NotImplementedError


class DenseDecodeAdapter(_DecodeAdapter):
    op = "dense_decode"
    kernel = dense_decode
    config_class = dense_decode.DenseDecodeConfig

    def default_config(self, key, target):
        return heuristics.dense_decode_config(target)

    def kernel_shape(self, key):
        D, H = key["head_dim"], key["hkv"] * key["g"]
        return dense_decode.DenseDecodeShape(H, key["hkv"], D, D, key["dtype"])

    def make_inputs(self, key, device, gen, ragged=False):
        B, S, D = key["batch"], key["context"], key["head_dim"]
        H, Hkv = key["hkv"] * key["g"], key["hkv"]
        dt = torch_dtype(key["dtype"])
        return dict(q=_randn((B, H, D), dt, gen, device),
                    k=_randn((B, S, Hkv, D), dt, gen, device),
                    v=_randn((B, S, Hkv, D), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device))

    def call(self, inp, cfg, out=None):
        q, k, v, lens = inp["q"], inp["k"], inp["v"], inp["lens"]
        p = plan.dense_decode_like(q, k, v, lens, config=cfg)
        return p.run(q, k, v, lens, q.shape[-1] ** -0.5, out)

    def reference(self, inp, compute_dtype=None):
        import torch
        return dense_decode.dense_decode_reference(
            inp["q"], inp["k"], inp["v"], inp["lens"], softmax_scale=inp["q"].shape[-1] ** -0.5,
            compute_dtype=compute_dtype or torch.float32)

    def check(self, out, inp):
        return _attention_check(out, self.reference(inp), self.reference(inp, inp["q"].dtype),
                                self.tolerance_factor)

    def bytes_moved(self, key):
        B, S, D = key["batch"], key["context"], key["head_dim"]
        H = key["hkv"] * key["g"]
        return 2 * (B * S * key["hkv"] * 2 * D + 2 * B * H * D)


class SparseDecodeAdapter(_DecodeAdapter):
    op = "sparse_decode"
    kernel = sparse_decode
    config_class = sparse_decode.SparseDecodeConfig
    dynamic_fields = ("batch",)

    def default_config(self, key, target):
        return heuristics.sparse_decode_config(key["block_size"], target)

    def kernel_shape(self, key):
        D, H = key["head_dim"], key["hkv"] * key["g"]
        return sparse_decode.SparseDecodeShape(H, key["hkv"], D, D, key["block_size"],
                                               key["dtype"])

    @staticmethod
    def context_of(key) -> int:
        """Cache capacity of a sparse problem: K blocks are ~10% of it (paper ratio)."""
        K, bs = key["k_blocks"], key["block_size"]
        return max(K * bs, int(math.ceil(K / SPARSE_RATIO)) * bs)

    def make_inputs(self, key, device, gen, ragged=False):
        import torch
        B, D, bs, K = key["batch"], key["head_dim"], key["block_size"], key["k_blocks"]
        H, Hkv = key["hkv"] * key["g"], key["hkv"]
        S = self.context_of(key)
        dt = torch_dtype(key["dtype"])
        lens = _seqlens(B, S, ragged, gen, device)
        nb = -(-S // bs)
        nvalid = (lens.long() + bs - 1) // bs                                   # [B]
        score = torch.rand((B, Hkv, nb), generator=gen, device=gen.device).to(device)
        j = torch.arange(nb, device=device)
        score = torch.where(j[None, None] < nvalid[:, None, None], score, -1.0)
        score = torch.where(j[None, None] == nvalid[:, None, None] - 1, 2.0, score)  # local
        top = score.topk(min(K, nb), dim=-1)
        idx = torch.where(top.values >= 0, top.indices, nb + 1)
        idx = idx.sort(dim=-1).values
        idx = torch.where(idx > nb, -1, idx).to(torch.int32)
        if idx.shape[-1] < K:
            idx = torch.nn.functional.pad(idx, (0, K - idx.shape[-1]), value=-1)
        return dict(q=_randn((B, H, D), dt, gen, device),
                    k=_randn((B, S, Hkv, D), dt, gen, device),
                    v=_randn((B, S, Hkv, D), dt, gen, device),
                    idx=idx.contiguous(), lens=lens, bs=bs)

    def call(self, inp, cfg, out=None):
        q, k, v, idx, lens = inp["q"], inp["k"], inp["v"], inp["idx"], inp["lens"]
        p = plan.sparse_decode_like(q, k, v, idx, lens, inp["bs"], config=cfg)
        return p.run(q, k, v, idx, lens, q.shape[-1] ** -0.5, out)

    def reference(self, inp, compute_dtype=None):
        import torch
        return sparse_decode.sparse_decode_reference(
            inp["q"], inp["k"], inp["v"], inp["idx"], inp["lens"], block_size=inp["bs"],
            softmax_scale=inp["q"].shape[-1] ** -0.5,
            compute_dtype=compute_dtype or torch.float32)

    def check(self, out, inp):
        return _attention_check(out, self.reference(inp), self.reference(inp, inp["q"].dtype),
                                self.tolerance_factor)

    def validation_key(self, key):
        k = dict(key)
        k["batch"] = min(key["batch"], 3)
        return k

    def alloc_bytes(self, key):
        B, D = key["batch"], key["head_dim"]
        return 2 * B * self.context_of(key) * key["hkv"] * 2 * D

    def bytes_moved(self, key):
        B, D, K, bs = key["batch"], key["head_dim"], key["k_blocks"], key["block_size"]
        H = key["hkv"] * key["g"]
        return 2 * (B * key["hkv"] * K * bs * 2 * D + 2 * B * H * D) + B * key["hkv"] * K * 4


ADAPTERS: dict[str, Adapter] = {a.op: a for a in (
    DenseDecodeAdapter(), SparseDecodeAdapter(), SelectAdapter(), SummariesAdapter(),
    UpdateSummariesAdapter(), RectifyAdapter())}

OPS = tuple(ADAPTERS)


def adapter(op: str) -> Adapter:
    if op not in ADAPTERS:
        raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
    return ADAPTERS[op]


def config_label(cfg) -> str:
    d = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    short = {"block_M": "M", "block_N": "N", "block_H": "H", "num_stages": "st",
             "threads": "thr", "schedule": "", "blocks_per_cta": "bpc",
             "score_threads": "sthr", "score_rows_per_cta": "srows",
             "select_threads": "selthr"}
    parts = []
    for k, v in d.items():
        s = short.get(k, k)
        parts.append(f"{s}{v}" if s else str(v))
    return " ".join(parts)


__all__ = ["Adapter", "ADAPTERS", "OPS", "adapter", "config_label", "SMEM_LIMIT",
           "NOMINAL_SMS", "MAX_CANDIDATES"]
