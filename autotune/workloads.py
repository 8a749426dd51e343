"""Problem shapes to tune: model presets, a model's config.json, and the default workload.

A problem is an op plus its shape key (resa_tl.schedules.KEY_SPECS): the key holds every value
needed to build the problem's tensors, so a schedule entry can be re-measured from its key alone
(``--check``). Row lengths equal the cache capacity (full rows) unless an adapter says otherwise.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from resa_tl import schedules
from resa_tl.schedules import KEY_SPECS, make_key

# ReSA paper defaults (ReSAConfig): the selection kernel and the sparse-decode K depend on them.
SPARSE_RATIO = 0.1
MIN_BLOCKS = 16
LOCAL_BLOCKS = 1
RECTIFY_EVERY = 32


@dataclass(frozen=True)
class Problem:
    op: str
    key_items: tuple                       # the shape key as sorted-by-spec (name, value) pairs
    priority: int = 1                      # 0 = tuned first (the shapes of the named models)

    @staticmethod
    def make(op: str, priority: int = 1, **shape) -> "Problem":
        return Problem(op, tuple(make_key(op, **shape).items()), priority)

    @property
    def key(self) -> dict:
        return dict(self.key_items)

    def label(self) -> str:
        k = self.key
        short = {"dtype": lambda v: "bf16" if v == "bfloat16" else "fp16",
                 "context": _kfmt, "num_blocks": str, "k_blocks": str}
        return " ".join(f"{n}={short.get(n, str)(v)}" for n, v in k.items())

    def sort_key(self) -> tuple:
        return (self.priority, self.op, schedules.key_sort_tuple(self.op, self.key))


def _kfmt(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class HeadShape:
    """Attention geometry of a model: query heads, KV heads, head_dim, dtype."""
    name: str
    hq: int
    hkv: int
    head_dim: int
    dtype: str = "bfloat16"

    @property
    def g(self) -> int:
        return self.hq // self.hkv


PRESETS = {
    "qwen2.5-7b": HeadShape("qwen2.5-7b", 28, 4, 128),
    "llama-3-8b": HeadShape("llama-3-8b", 32, 8, 128),
    "smollm2-135m": HeadShape("smollm2-135m", 9, 3, 64),
}

# Head geometries of common models, covering g = 1..8 at head_dim 128 and a few at 64.
COMMON_HEADS = [
    HeadShape("llama-2-7b (MHA)", 32, 32, 128),          # g 1
    HeadShape("internlm2-1.8b", 16, 8, 128),             # g 2
    HeadShape("llama-3.2-3b", 24, 8, 128),               # g 3
    HeadShape("llama-3-8b", 32, 8, 128),                 # g 4
    HeadShape("qwen2.5-14b", 40, 8, 128),                # g 5
    HeadShape("qwen2.5-1.5b", 12, 2, 128),               # g 6
    HeadShape("qwen2.5-7b", 28, 4, 128),                 # g 7
    HeadShape("qwen2.5-3b", 16, 2, 128),                 # g 8
    HeadShape("smollm2-135m", 9, 3, 64),                 # g 3, d 64
    HeadShape("llama-3.2-1b", 32, 8, 64),                # g 4, d 64
    HeadShape("qwen2.5-0.5b", 14, 2, 64),                # g 7, d 64
]
# these also get fp16 and block sizes 32/64 in the default workload
MAIN_MODELS = ("llama-3-8b", "qwen2.5-7b")


def head_shape_from_config(path) -> HeadShape:
    """Read a Hugging Face config.json (or a directory holding one): heads, KV heads,
    head_dim and dtype; multimodal configs are read from their ``text_config``."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"--model {path}: cannot read a config.json: {err}") from None
    for sub in ("text_config", "llm_config", "language_config"):
        if isinstance(cfg.get(sub), dict) and "num_attention_heads" in cfg[sub]:
            cfg = {**cfg, **cfg[sub]}
    try:
        hq = int(cfg["num_attention_heads"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"--model {path}: config.json has no num_attention_heads") from None
    hkv = int(cfg.get("num_key_value_heads") or hq)
    d = cfg.get("head_dim")
    if d is None:
        if "hidden_size" not in cfg:
            raise ValueError(f"--model {path}: config.json has neither head_dim nor hidden_size")
        d = int(cfg["hidden_size"]) // hq
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    if dtype not in ("float16", "bfloat16"):
        dtype = "bfloat16"                 # fp32 checkpoints are served in bf16
    if hq % hkv:
        raise ValueError(f"--model {path}: {hq} query heads is not a multiple of {hkv} KV heads")
    name = str(cfg.get("_name_or_path") or cfg.get("model_type") or p.parent.name)
    return HeadShape(name, hq, hkv, int(d), dtype)


def resolve_model(spec: str) -> HeadShape:
    if spec.lower() in PRESETS:
        return PRESETS[spec.lower()]
    if Path(spec).exists():
        return head_shape_from_config(spec)
    raise ValueError(f"--model {spec!r}: not a preset ({', '.join(sorted(PRESETS))}) and no "
                     f"such config.json file or directory")


def blocks_kept(num_blocks: int) -> int:
    """Selected blocks per KV head at the paper defaults for a full cache of NB blocks."""
    from resa_tl.kernels.select_blocks import default_max_selected
    return default_max_selected(num_blocks, SPARSE_RATIO, MIN_BLOCKS)


def kv_bytes(h: HeadShape, context: int, batch: int) -> int:
    return 2 * batch * context * h.hkv * h.head_dim * 2


@dataclass
class Grid:
    """Which shapes of each head geometry to tune."""
    contexts: tuple = (4096, 32768, 262144)
    batches: tuple = (1, 16)
    block_sizes: tuple = (16,)
    rectify_T: tuple = (RECTIFY_EVERY + 1,)
    update_lengths: tuple = (1, RECTIFY_EVERY + 1)
    select_contexts: tuple | None = None       # default: contexts
    max_kv_bytes: int = 16 << 30               # skip larger caches (memory and time)


def problems_for_head(h: HeadShape, grid: Grid, ops, priority: int = 1,
                      select: bool = True) -> list[Problem]:
    out = []
    hk = dict(dtype=h.dtype, head_dim=h.head_dim)
    for batch in grid.batches:
        for ctx in grid.contexts:
            if kv_bytes(h, ctx, batch) > grid.max_kv_bytes:
                continue
            if "dense_decode" in ops:
                out.append(Problem.make("dense_decode", priority, **hk, g=h.g, hkv=h.hkv,
                                        context=ctx, batch=batch))
            for bs in grid.block_sizes:
                nb = -(-ctx // bs)
                if "sparse_decode" in ops:
                    out.append(Problem.make("sparse_decode", priority, **hk, g=h.g, hkv=h.hkv,
                                            block_size=bs, k_blocks=blocks_kept(nb),
                                            batch=batch))
                if "block_summaries" in ops:
                    out.append(Problem.make("block_summaries", priority, **hk, hkv=h.hkv,
                                            block_size=bs, context=ctx, batch=batch))
                if select and "select_blocks" in ops and \
                        ctx in (grid.select_contexts or grid.contexts):
                    out.append(Problem.make("select_blocks", priority, **hk, g=h.g, hkv=h.hkv,
                                            block_size=bs, num_blocks=nb, batch=batch))
            if "rectify_attention" in ops:
                for t in grid.rectify_T:
                    out.append(Problem.make("rectify_attention", priority, **hk, g=h.g,
                                            hkv=h.hkv, T=t, context=ctx, batch=batch))
        if "update_block_summaries" in ops:
            for bs in grid.block_sizes:
                for n in grid.update_lengths:
                    out.append(Problem.make("update_block_summaries", priority, **hk, hkv=h.hkv,
                                            block_size=bs, length=n, batch=batch))
    return out


def dedupe(problems) -> list[Problem]:
    """Unique problems (lowest priority number wins), in deterministic order."""
    best: dict = {}
    for p in problems:
        ident = (p.op, p.key_items)
        if ident not in best or p.priority < best[ident].priority:
            best[ident] = p
    return sorted(best.values(), key=Problem.sort_key)


def default_workload(ops, quick: bool = False) -> list[Problem]:
    """Common models: head_dim 64/128, g 1..8, block 16 (32/64 for the main models),
    contexts 4K..256K, batch 1..16, bf16 (fp16 for the main models).

    Sampled to fit a ~10 minute run on one H100: 3 contexts x 2 batches (1, 16) per geometry;
    selection (one kernel per NB) at 32K and 256K; fp16, block sizes 32/64 and batches 4/8
    only for Llama-3-8B and Qwen2.5-7B (schedule lookups take the nearest class for the rest).
    Batches 4 and 8 are there because a tuned entry serves only batches within 2x of its own:
    without them batch 4 falls back to the heuristic and batch 8, the batch of the paper's and
    our end-to-end benchmarks, borrows the batch-16 winner (9% slower sparse attention at
    256K x 8 on the H100, docs/performance.md).
    ``quick``: the two main models only, bf16, contexts 4K/64K, batch 1/8.
    """
    if quick:
        grid = Grid(contexts=(4096, 65536), batches=(1, 8))
        heads = [h for h in COMMON_HEADS if h.name in MAIN_MODELS]
        return dedupe(p for h in heads for p in problems_for_head(h, grid, ops, 0))
    out = []
    base = Grid(select_contexts=(32768, 262144))
    kv_seen = set()
    for h in COMMON_HEADS:
        main = h.name in MAIN_MODELS
        # selection: one geometry per (Hkv, head_dim) (g only changes the query mean)
        new_kv = (h.hkv, h.head_dim) not in kv_seen or main
        kv_seen.add((h.hkv, h.head_dim))
        out += problems_for_head(h, base, ops, 0 if main else 1, select=new_kv)
        if main:
            fp16 = HeadShape(h.name, h.hq, h.hkv, h.head_dim, "float16")
            out += problems_for_head(fp16, base, ops, 2)
            mid = Grid(batches=(4, 8), select_contexts=(32768, 262144))
            out += problems_for_head(h, mid, ops, 0)
            big = Grid(contexts=(32768, 262144), batches=(1, 16), block_sizes=(32, 64),
                       rectify_T=(), update_lengths=(1,), select_contexts=(262144,))
            out += problems_for_head(h, big, ops, 2)
    return dedupe(out)


def model_workload(h: HeadShape, ops, contexts=None, batches=None,
                   block_sizes=None) -> list[Problem]:
    """The shapes of one model: contexts 4K..256K, batch 1/4/16, block 16/32/64."""
    grid = Grid(contexts=tuple(contexts or (4096, 16384, 65536, 262144)),
                batches=tuple(batches or (1, 4, 16)),
                block_sizes=tuple(block_sizes or (16, 32, 64)),
                select_contexts=None)
    return dedupe(problems_for_head(h, grid, ops, 0))


def tiny_workload(ops) -> list[Problem]:
    """A handful of small shapes (CI, smoke tests)."""
    h = HeadShape("tiny", 8, 2, 64)
    grid = Grid(contexts=(4096,), batches=(1,), update_lengths=(1,), rectify_T=(17,))
    return dedupe(problems_for_head(h, grid, ops, 0))


def problem_from_entry(op: str, key: dict) -> Problem:
    """The problem a schedule entry was tuned on (its key is the representative shape)."""
    return Problem.make(op, 0, **key)


def geometric_buckets(lo: int, hi: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(lo)), int(math.log2(hi)) + 1)]


__all__ = ["Problem", "HeadShape", "PRESETS", "COMMON_HEADS", "default_workload",
           "model_workload", "tiny_workload", "resolve_model", "head_shape_from_config",
           "problem_from_entry", "KEY_SPECS"]
