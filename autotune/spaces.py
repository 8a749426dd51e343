"""Tuning adapters: per op, the search space of TileLang configs and how to compile, feed, run
and validate one candidate.

An adapter is a small class; everything op-specific lives in its methods:

    available()                  -> None, or why the op cannot be tuned (factory missing ...)
    default_config(key, target)  -> the heuristic's config (resa_tl.heuristics)
    space(key, target)           -> candidate configs (default included), deterministic order
    static_id(key)               -> what a compiled kernel depends on (dedupes compiles)
    compile(key, cfg, target)    -> compiles (memoised, TileLang disk cache) — no GPU needed
    make_inputs(key, device, gen, ragged) -> dict of tensors (one input set)
    call(inp, cfg)               -> runs the production host wrapper with ``cfg``
    check(out, inp)              -> None, or why the output is wrong (vs the torch reference)
    validation_key(key)          -> a small problem with the same static params (same kernel)
    bytes_moved(key)             -> compulsory DRAM bytes of one call (roofline %, rotation)
    alloc_bytes(key)             -> device memory of one input set

Candidates run through the real wrapper (workspaces, split heuristics, combine kernel): the
config reaches it through its ``config=`` argument when it has one, else through
``resa_tl.schedules.forced`` (what ``schedules.config_for`` returns) plus a patch of the
heuristic it calls; an op whose wrapper consults neither is reported as not wired.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools
import math
from resa_tl import schedules

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
    module: str = ""             # resa_tl.kernels.<module>
    wrapper: str = ""            # host wrapper in that module
    config_class: str = ""       # config dataclass in that module
    heuristic: str = ""          # resa_tl.heuristics function returning the default config
    dynamic_fields: tuple = ("batch", "context")    # key fields the compiled kernel ignores
    tolerance_factor = 2.0
    out_arg: str | None = None   # wrapper kwarg taking a preallocated output (NaN-poisoned)
    max_candidates = MAX_CANDIDATES

    # -- plumbing --------------------------------------------------------------------------
    def mod(self):
        return importlib.import_module(f"resa_tl.kernels.{self.module}")

    def available(self) -> str | None:
        try:
            m = self.mod()
        except Exception as err:                    # noqa: BLE001 - report any import error
            return f"cannot import resa_tl.kernels.{self.module}: {err}"
        from resa_tl import heuristics
        missing = [n for n in (self.wrapper, self.config_class) if not hasattr(m, n)]
        if not hasattr(heuristics, self.heuristic):
            missing.append(f"heuristics.{self.heuristic}")
        missing += self._missing_factories(m)
        if missing:
            return f"resa_tl.kernels.{self.module} lacks {', '.join(missing)}"
        return None

    def _missing_factories(self, m) -> list:
        return []

    def config_cls(self):
        return getattr(self.mod(), self.config_class)

    def config_from_dict(self, d: dict):
        return self.config_cls()(**d)

    def static_id(self, key: dict) -> tuple:
        return tuple((k, v) for k, v in key.items() if k not in self.dynamic_fields)

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

    # -- running -----------------------------------------------------------------------------
    def wrapper_fn(self):
        return getattr(self.mod(), self.wrapper)

    def accepts(self, name: str) -> bool:
        try:
            return name in inspect.signature(self.wrapper_fn()).parameters
        except (TypeError, ValueError):
            return False

    @contextlib.contextmanager
    def forcing(self, cfg):
        """Make the wrapper run with ``cfg``; yields a counter dict {'hits': n} telling whether
        it consulted the config (via config_for or the heuristic)."""
        from resa_tl import heuristics
        counter = {"hits": 0}
        orig = getattr(heuristics, self.heuristic, None)

        def patched(*a, **k):
            counter["hits"] += 1
            return cfg

        before = schedules.forced_hits(self.op)
        if orig is not None:
            setattr(heuristics, self.heuristic, patched)
        try:
            with schedules.forced(self.op, cfg):
                yield counter
        finally:
            if orig is not None:
                setattr(heuristics, self.heuristic, orig)
            counter["hits"] += schedules.forced_hits(self.op) - before

    def call(self, inp: dict, cfg, out=None):
        """One call of the production wrapper with ``cfg``; returns the output."""
        fn = self.wrapper_fn()
        args, kwargs = self.wrapper_args(inp)
        if out is not None and self.out_arg and self.accepts(self.out_arg):
            kwargs[self.out_arg] = out
        if self.accepts("config"):
            return fn(*args, config=cfg, **kwargs)
        with self.forcing(cfg) as counter:
            res = fn(*args, **kwargs)
        if counter["hits"] == 0:
            raise NotWired(f"{self.module}.{self.wrapper} takes no config= argument and consults "
                           f"neither schedules.config_for nor heuristics.{self.heuristic}")
        return res

    def wrapper_args(self, inp: dict) -> tuple[tuple, dict]:
        raise NotImplementedError

    def poisoned_out(self, inp: dict):
        """A NaN-filled output buffer for ``out_arg`` (None: the wrapper allocates)."""
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


class NotWired(RuntimeError):
    """The wrapper ignores the config the tuner wants to run."""


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
    module = "rectify"
    wrapper = "rectify_attention_tilelang"
    config_class = "RectifyConfig"
    heuristic = "rectify_config"
    out_arg = "out"
    max_candidates = 10

    def _missing_factories(self, m):
        return [] if hasattr(m, "compile_rectify_kernel") else ["compile_rectify_kernel"]

    def default_config(self, key, target):
        from resa_tl import heuristics
        D = key["head_dim"]
        return heuristics.rectify_config(key["T"], key["g"], D, D, target)

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

    def compile(self, key, cfg, target):
        D = key["head_dim"]
        self.mod().compile_rectify_kernel(key["T"], key["g"], key["hkv"], D, D, key["dtype"],
                                          float(D ** -0.5), cfg, target)

    def make_inputs(self, key, device, gen, ragged=False):
        B, T, D = key["batch"], key["T"], key["head_dim"]
        S, Hkv, H = key["context"], key["hkv"], key["hkv"] * key["g"]
        dt = torch_dtype(key["dtype"])
        return dict(q=_randn((B, T, H, D), dt, gen, device),
                    k=_randn((B, S, Hkv, D), dt, gen, device),
                    v=_randn((B, S, Hkv, D), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device, lo=T))

    def wrapper_args(self, inp):
        D = inp["q"].shape[-1]
        return (inp["q"], inp["k"], inp["v"], inp["lens"]), {"softmax_scale": D ** -0.5}

    def poisoned_out(self, inp):
        import torch
        return torch.full_like(inp["q"], float("nan"))

    def check(self, out, inp):
        import torch
        ref = self.mod().rectify_attention_reference
        D = inp["q"].shape[-1]
        args = (inp["q"], inp["k"], inp["v"], inp["lens"])
        r32 = ref(*args, softmax_scale=D ** -0.5)
        rlo = ref(*args, softmax_scale=D ** -0.5, compute_dtype=inp["q"].dtype)
        return _attention_check(out, r32.to(torch.float32), rlo, self.tolerance_factor)

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
    module = "summaries"
    wrapper = "block_summaries_tilelang"
    config_class = "SummariesConfig"
    heuristic = "summaries_config"
    mode = "build"
    max_candidates = 8

    def _missing_factories(self, m):
        return [] if hasattr(m, "build_summaries_kernel") else ["build_summaries_kernel"]

    def default_config(self, key, target):
        from resa_tl import heuristics
        return heuristics.summaries_config(key["hkv"], key["head_dim"], key["block_size"])

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

    def compile(self, key, cfg, target):
        self.mod().build_summaries_kernel(key["hkv"], key["head_dim"], key["block_size"],
                                          key["dtype"], "int32", self.mode, cfg, target)

    def make_inputs(self, key, device, gen, ragged=False):
        B, S = key["batch"], key["context"]
        dt = torch_dtype(key["dtype"])
        return dict(k=_randn((B, S, key["hkv"], key["head_dim"]), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device), bs=key["block_size"])

    def wrapper_args(self, inp):
        return (inp["k"], inp["lens"], inp["bs"]), {}

    def check(self, out, inp):
        import torch
        rmin, rmax = self.mod().block_summaries_reference(inp["k"], inp["lens"], inp["bs"])
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
    wrapper = "update_block_summaries_tilelang"
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

    def wrapper_args(self, inp):
        return (inp["kmin"], inp["kmax"], inp["k"], inp["start"], inp["n"], inp["bs"]), {}

    def check(self, out, inp):
        import torch
        # the kernel updated inp's kmin/kmax in place; apply the reference to the state
        # before the call (the update recomputes whole blocks, so repeated calls agree)
        kmin, kmax = out
        rmin, rmax = inp["kmin0"].clone(), inp["kmax0"].clone()
        self.mod().update_block_summaries_reference(rmin, rmax, inp["k"], inp["start"],
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
    module = "selection"
    wrapper = "select_blocks_tilelang"
    config_class = "SelectionConfig"
    heuristic = "selection_config"
    dynamic_fields = ("batch",)
    max_candidates = 8             # one kernel per NB: keep the compile count down
    out_arg = "out"

    def _missing_factories(self, m):
        return [] if hasattr(m, "build_select_blocks_kernel") else ["build_select_blocks_kernel"]

    def default_config(self, key, target):
        from resa_tl import heuristics
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

    def compile(self, key, cfg, target):
        self.mod().build_select_blocks_kernel(
            key["num_blocks"], key["hkv"], key["g"], key["head_dim"], key["block_size"],
            float(SPARSE_RATIO), MIN_BLOCKS, LOCAL_BLOCKS, self.K(key), key["dtype"], "int32",
            cfg, target)

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

    def wrapper_args(self, inp):
        return (inp["q"], inp["kmin"], inp["kmax"], inp["lens"]), dict(
            block_size=inp["bs"], sparse_ratio=SPARSE_RATIO, min_blocks=MIN_BLOCKS,
            local_blocks=LOCAL_BLOCKS, max_selected=inp["K"])

    def check(self, out, inp):
        """Same count and order as the reference; every kept block scores at least the n-th
        best reference score (fp32 ties near the threshold may pick different blocks)."""
        import torch
        m = self.mod()
        ref = m.select_blocks_reference(inp["q"], inp["kmin"], inp["kmax"], inp["lens"],
                                        **self.wrapper_args(inp)[1])
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
#
# The decode modules are being written; these adapters bind the module's compile factory by
# parameter names (see _bind) so that they need no change when the factory lands, as long as
# it follows the convention of the other kernels: a memoised ``compile_<op>_kernel`` (or
# ``build_<op>_kernel`` returning compiled kernels or PrimFuncs) taking the static shape, the
# dtype name, the config dataclass and the target arch string.
# ------------------------------------------------------------------------------------------

_ALIASES = {
    "num_kv_heads": "hkv", "heads_kv": "hkv", "hkv": "hkv", "kv_heads": "hkv",
    "group": "g", "g": "g", "group_size": "g",
    "num_heads": "H", "heads": "H", "num_q_heads": "H", "heads_q": "H",
    "head_dim": "D", "dim": "D", "head_dim_v": "D", "dim_v": "D", "head_dim_qk": "D",
    "dtype": "dtype", "index_dtype": "index_dtype",
    "block_size": "block_size", "softmax_scale": "scale", "scale": "scale", "sm_scale": "scale",
    "config": "config", "cfg": "config", "target": "target", "arch": "target",
    "num_q": "T", "T": "T", "num_blocks": "num_blocks", "max_selected": "k_blocks",
    "k_blocks": "k_blocks", "topk": "k_blocks", "num_selected": "k_blocks",
    "num_sms": "num_sms", "sm_count": "num_sms",
}


def _bind(fn, values: dict) -> tuple[list, dict]:
    """Positional/keyword arguments for ``fn`` from ``values`` by parameter name; raises
    TypeError naming a required parameter the tuner cannot supply."""
    args, kwargs = [], {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        alias = _ALIASES.get(p.name)
        if alias is not None and alias in values and values[alias] is not None:
            v = values[alias]
        elif p.default is not p.empty:
            continue
        else:
            raise TypeError(f"{fn.__name__}() needs parameter {p.name!r}, which the tuner "
                            f"cannot bind (known names: {sorted(_ALIASES)})")
        if p.kind == p.KEYWORD_ONLY:
            kwargs[p.name] = v
        else:
            if kwargs:
                kwargs[p.name] = v
            else:
                args.append(v)
    return args, kwargs


def _compile_result(res, target):
    """Compile PrimFuncs a factory returned (compiled kernels pass through)."""
    items = res if isinstance(res, (tuple, list)) else [res]
    if any(type(x).__name__ == "PrimFunc" for x in items):
        import tilelang
        for x in items:
            if type(x).__name__ == "PrimFunc":
                tilelang.compile(x, target={"kind": "cuda", "arch": target})


class _DecodeAdapter(Adapter):
    out_arg = "out"
    max_candidates = 10

    def factory(self):
        m = self.mod()
        for name in (f"compile_{self.op}_kernel", f"build_{self.op}_kernel",
                     f"compile_{self.module}_kernel", f"build_{self.module}_kernel"):
            if hasattr(m, name):
                return getattr(m, name)
        return None

    def _missing_factories(self, m):
        return [] if self.factory() is not None else [
            f"compile_{self.op}_kernel / build_{self.op}_kernel"]

    def values(self, key, target, cfg=None) -> dict:
        D = key["head_dim"]
        v = dict(hkv=key["hkv"], g=key["g"], H=key["hkv"] * key["g"], D=D, dtype=key["dtype"],
                 index_dtype="int32", scale=float(D ** -0.5), config=cfg, target=target,
                 num_sms=NOMINAL_SMS.get(schedules.arch_key(target)))
        v.update({k: key[k] for k in ("block_size", "k_blocks", "context", "batch") if k in key})
        return v

    def default_config(self, key, target):
        from resa_tl import heuristics
        fn = getattr(heuristics, self.heuristic)
        args, kwargs = _bind(fn, self.values(key, target))
        return fn(*args, **kwargs)

    def axes(self, key, target, default):
        """Keys per pipeline stage, padded query rows per CTA (GQA rows per tile: wgmma wants
        64 on sm_90a, mma_sync takes 16/32), stages (1 on sm_80/89: runtime trip count)."""
        bs = key.get("block_size", 16)
        return {"block_N": sorted({max(bs, n) for n in (32, 64, 128)}),
                "block_H": [16, 32, 64],
                "num_stages": [1, 2, 3] if is_hopper(target) else [1],
                # hand-written warp-specialised schedule (sm_90a), two CTAs per SM
                "schedule": ["auto", "ws"] if is_hopper(target) else ["auto"],
                "ctas_per_sm": [1, 2],
                # split policy, if the config class carries one (ignored otherwise)
                "split_overhead": [0.5, 1.0, 2.0, 4.0]}

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
        check = getattr(self.mod(), "_check_config", None)
        if check is not None:                    # the kernel module's own rules
            try:
                args, kwargs = _bind(check, dict(self.values(key, target, cfg), cfg=cfg))
                check(*args, **kwargs)
            except (TypeError, ValueError):
                return False
        if getattr(cfg, "schedule", "auto") != "auto" and not is_hopper(target):
            return False
        smem = (bh * D + st * bn * 2 * D) * 2
        ctas = getattr(cfg, "ctas_per_sm", 1)
        a = schedules.arch_key(target)
        return smem <= SMEM_LIMIT.get(a, 99 * 1024) and \
            smem * ctas <= SM_SMEM.get(a, 100 * 1024)

    def compile(self, key, cfg, target):
        fn = self.factory()
        args, kwargs = _bind(fn, self.values(key, target, cfg))
        _compile_result(fn(*args, **kwargs), target)

    def static_id(self, key):
        fn = self.factory()
        names = set()
        if fn is not None:
            names = {_ALIASES.get(p) for p in inspect.signature(fn).parameters}
        keep = ("dtype", "head_dim", "g", "hkv", "block_size")
        extra = tuple(k for k in ("k_blocks",) if k in key and k in names)
        return tuple((k, key[k]) for k in keep + extra if k in key)

    def poisoned_out(self, inp):
        import torch
        q = inp["q"]
        return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)

    def bytes_moved(self, key):
        raise NotImplementedError


class DenseDecodeAdapter(_DecodeAdapter):
    op = "dense_decode"
    module = "dense_decode"
    wrapper = "dense_decode_tilelang"
    config_class = "DenseDecodeConfig"
    heuristic = "dense_decode_config"

    def make_inputs(self, key, device, gen, ragged=False):
        B, S, D = key["batch"], key["context"], key["head_dim"]
        H, Hkv = key["hkv"] * key["g"], key["hkv"]
        dt = torch_dtype(key["dtype"])
        return dict(q=_randn((B, H, D), dt, gen, device),
                    k=_randn((B, S, Hkv, D), dt, gen, device),
                    v=_randn((B, S, Hkv, D), dt, gen, device),
                    lens=_seqlens(B, S, ragged, gen, device))

    def wrapper_args(self, inp):
        D = inp["q"].shape[-1]
        return (inp["q"], inp["k"], inp["v"], inp["lens"]), {"softmax_scale": D ** -0.5}

    def check(self, out, inp):
        ref = self.mod().dense_decode_reference
        args, kw = self.wrapper_args(inp)
        return _attention_check(out, ref(*args, **kw),
                                ref(*args, **kw, compute_dtype=inp["q"].dtype),
                                self.tolerance_factor)

    def bytes_moved(self, key):
        B, S, D = key["batch"], key["context"], key["head_dim"]
        H = key["hkv"] * key["g"]
        return 2 * (B * S * key["hkv"] * 2 * D + 2 * B * H * D)


class SparseDecodeAdapter(_DecodeAdapter):
    op = "sparse_decode"
    module = "sparse_decode"
    wrapper = "sparse_decode_tilelang"
    config_class = "SparseDecodeConfig"
    heuristic = "sparse_decode_config"
    dynamic_fields = ("batch",)

    @staticmethod
    def context_of(key) -> int:
        """Cache capacity of a sparse problem: K blocks are ~10% of it (paper ratio)."""
        K, bs = key["k_blocks"], key["block_size"]
        return max(K * bs, int(math.ceil(K / SPARSE_RATIO)) * bs)

    def values(self, key, target, cfg=None):
        v = super().values(key, target, cfg)
        v["context"] = self.context_of(key)
        v["num_blocks"] = -(-v["context"] // key["block_size"])
        return v

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

    def wrapper_args(self, inp):
        D = inp["q"].shape[-1]
        return (inp["q"], inp["k"], inp["v"], inp["idx"], inp["lens"]), {
            "block_size": inp["bs"], "softmax_scale": D ** -0.5}

    def check(self, out, inp):
        ref = self.mod().sparse_decode_reference
        args, kw = self.wrapper_args(inp)
        return _attention_check(out, ref(*args, **kw),
                                ref(*args, **kw, compute_dtype=inp["q"].dtype),
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


__all__ = ["Adapter", "ADAPTERS", "OPS", "adapter", "NotWired", "config_label", "SMEM_LIMIT",
           "NOMINAL_SMS", "MAX_CANDIDATES"]
