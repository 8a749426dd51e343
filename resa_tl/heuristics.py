"""Launch heuristics, in one place, each with its reason. Device properties are read from the
device (never hard-coded): SM count and L2 size differ between H100 SXM/PCIe, H200, A100, ...

One function per decision, with its reason; resa_tl.plan calls them (a tuned schedule entry,
resa_tl.schedules, takes precedence where one fits the shape). The kernels never do.

Measurements quoted in the reasons below were taken on an NVIDIA H100 80GB HBM3 with the
benchmark script named beside each figure; docs/performance.md and docs/history.md give the
date, commit and command of each."""
from __future__ import annotations

import functools
import os
import re

import torch

from .kernels.block_summaries import SummariesConfig
from .kernels.dense_decode import DenseDecodeConfig
from .kernels.rectify_attention import RectifyConfig
from .kernels.select_blocks import SelectionConfig
from .kernels.sparse_decode import SparseDecodeConfig


@functools.lru_cache(maxsize=None)
def device_props(device_index: int | None = None):
    """(sm_count, l2_bytes, (major, minor)) of a CUDA device, cached: the query is not free and
    the answer never changes within a process."""
    idx = torch.cuda.current_device() if device_index is None else device_index
    p = torch.cuda.get_device_properties(idx)
    return p.multi_processor_count, int(getattr(p, "L2_cache_size", 0)), (p.major, p.minor)


def sm_count(device: torch.device | None = None) -> int:
    index = None if device is None or device.index is None else device.index
    return device_props(index)[0]


def arch_of(device: torch.device | None = None) -> str:
    """TileLang target arch of a CUDA device: "sm_90a" on Hopper (wgmma/TMA need the "a"
    variant), "sm_80"/"sm_86"/"sm_89" otherwise."""
    index = None if device is None or device.index is None else device.index
    major, minor = device_props(index)[2]
    return f"sm_{major}{minor}" + ("a" if major == 9 else "")


def use_pdl(arch: str) -> bool:
    """Whether kernels are built for programmatic dependent launch (see
    resa_tl/kernels/common.grid_dependency).

    Reason: a sparse decode step chains five of our kernels per layer (summary update, block
    scoring, top-k, split attention, combine), each a few microseconds long at batch 1-8, so
    the gap between one grid draining and the next starting is a visible share of the step.
    With PDL each kernel lets its successor launch at once and waits for its predecessor
    only before its first global access. The griddepcontrol instructions exist from sm_90 on.
    Measured on the H100 (benchmarks/bench_e2e.py, Qwen2.5-7B shape, PDL off vs on in one call,
    2026-11-28): 0.3-0.9% less time per ReSA token below 128K context and at
    128K x 1, within +-0.2% at 128K x 4/8 and 256K; outputs bit-identical
    (tests/gpu/test_pdl_gpu.py).
    RESA_TL_PDL=0 builds kernels without it (A/B measurements; an escape hatch). Planning
    (resa_tl.plan) asks once per plan and keys the plan on the answer."""
    return _has_griddepcontrol(arch) and os.environ.get("RESA_TL_PDL", "1") != "0"


@functools.lru_cache(maxsize=None)
def _has_griddepcontrol(arch: str) -> bool:
    digits = re.match(r"sm_(\d+)", arch)
    if digits is None:
        raise ValueError(f"arch must look like 'sm_90a' or 'sm_80', got {arch!r}")
    return int(digits.group(1)) >= 90


# --- rectify_attention (resa_tl/kernels/rectify.py) ------------------------------------------

def rectify_config(num_q: int, group: int, head_dim: int, arch: str):
    """Tile config of the rectify kernel for T = num_q queries and GQA group g.

    Reasons: the R = T * g query rows of a KV head share every K/V tile. Per key the kernel
    reads 2 * D * 2 bytes and does 4 * D * R flops, so at R > 64 (T = 32, g = 7: R = 224) it is
    as much compute- as memory-bound on an H100 (~260 flop/byte at ~3 TB/s vs ~700 TFLOP/s
    wgmma). Two consumer warpgroups (block_M = 128, 256 threads) halve the number of row
    tiles that re-read K/V (from L2) compared with 64-row tiles, and block_N = 128 halves the
    per-step softmax/barrier overhead; smem = 32 KB Q + 2 stages x 64 KB K/V fits 227 KB.
    For R <= 64 the kernel is decode-like (memory-bound): one warpgroup of 64 rows and
    block_N = 64 keeps smem at 80 KB so two CTAs share an SM and keep more bytes in flight.
    sm_80 has no warp-specialised TMA pipeline and a runtime trip count forbids cp.async with
    >= 2 stages in TileLang 0.1.15, so it gets one stage and block_N = 64 (164 KB smem).
    Schedule: on sm_90a with 128-row tiles and head_dim 128 the hand-written "pingpong"
    schedule (one warpgroup's softmax under the other's wgmma) measured faster than "auto"
    on the H100 (2026-11-27, Qwen2.5-7B shapes, bf16: T=33 at 1.41-1.53x of a SDPA decode
    step vs 1.43-1.67x for auto, T=64 2.6-2.9x vs 2.7-3.1x; T=32 better at 9 of 12 shapes);
    head_dim 64 keeps "auto" (pingpong was not measured or GPU-tested there).
    """
    rows = num_q * group
    block_M = 64 if rows <= 64 else 128
    hopper = arch.startswith("sm_9")
    if not hopper:
        return RectifyConfig(block_M=block_M, block_N=64, num_stages=1, threads=2 * block_M)
    block_N = 64 if block_M == 64 else 128
    schedule = "pingpong" if block_M == 128 and head_dim == 128 else "auto"
    return RectifyConfig(block_M=block_M, block_N=block_N, num_stages=2, threads=2 * block_M,
                         schedule=schedule)


def rectify_ctas_per_sm(config) -> int:
    """CTAs of the rectify split kernel that fit on one SM (an estimate, for split counts).

    Reason: with warp specialisation the 256 consumer threads of a 128-row tile take 240
    registers each (setmaxnreg), i.e. the whole 64K register file; a 64-row tile takes half,
    and its smem (<= 80 KB at block_N = 64) lets two CTAs share an SM."""
    if config.block_M >= 128:
        return 1
    smem = (config.block_M + 2 * max(config.num_stages, 1) * config.block_N) * 128 * 2
    return 2 if smem <= 100 * 1024 else 1


def rectify_num_splits(batch: int, num_kv_heads: int, row_tiles: int, s_max: int, config,
                       device: torch.device | None = None, max_splits: int = 64,
                       num_sms: int | None = None) -> int:
    """Split-KV count of the rectify kernel: enough CTAs for one full wave on the device.

    Reasons: a row's work is one sequential stream over its cache, so without splitting
    B * Hkv * row_tiles CTAs (8 for one Qwen2.5-7B row at T = 32) would leave most of the
    132 SMs idle; one wave (not more) keeps every SM busy while keeping the partial-O traffic
    (NS * T * H * Dv * 8 bytes per row) and the combine small. Splits never get fewer than 2
    key blocks each (from the cache capacity S_max, host-known: no sync on the lengths), and
    are capped at ``max_splits`` to bound the workspace."""
    per_split = max(1, batch * num_kv_heads * row_tiles)
    slots = (sm_count(device) if num_sms is None else num_sms) * rectify_ctas_per_sm(config)
    ns = max(1, slots // per_split)
    max_by_len = max(1, -(-s_max // config.block_N) // 2)
    return int(max(1, min(ns, max_by_len, max_splits)))


# --- block summaries / selection (resa_tl/kernels/summaries.py, selection.py) ----------------

def summaries_config(num_kv_heads: int, head_dim: int):
    """Launch shape of block_summaries / update_block_summaries.

    Reason: the op streams K once, so what matters is bytes in flight. A thread owns one
    16-byte vector of one block's Hkv*D row and issues the block's (up to 16 unrolled)
    token loads back to back: 256 threads x 16 loads x 16 B = 64 KB in flight per CTA, several
    CTAs per SM. With one item per thread a CTA covers 256 / (Hkv*D/8) blocks (4 for Hkv=4,
    D=128), i.e. thousands of CTAs at long contexts. For the update, those few blocks per row
    also make the grid tiny (one CTA per row at length 1), which is what an O(length) op wants.
    """
    threads = 256
    row_vectors = max(1, num_kv_heads * head_dim // 8)
    return SummariesConfig(threads=threads, blocks_per_cta=max(1, threads // row_vectors))


def selection_config(num_blocks: int, num_kv_heads: int, head_dim: int):
    """Launch shape of select_blocks (scoring kernel + one-CTA-per-(b, hkv) select kernel).

    Reasons: scoring reads kmin+kmax (2/block_size of K: 16.8 MB for one 128K Qwen2.5-7B row)
    and is memory-bound, so it gets many CTAs of 256 threads, each thread holding 4 (block,
    16-byte vector) items of kmin and of kmax in registers (8 loads of 16 B in flight) before
    computing: 16 blocks per CTA at Hkv*D = 512, 512 CTAs per 128K row, ~54 registers, so
    several CTAs share an SM (32 blocks per CTA measured the same on the H100, at 168 regs).
    The select kernel is latency/throughput-bound inside one SM (a radix select over NB fp32
    scores, up to 4 passes, then an ordered compaction) and only B*Hkv CTAs exist, so each CTA
    uses as many threads as help: a thread keeps a contiguous chunk of C = NB / threads keys
    (contiguous chunks make the block-order compaction a plain prefix sum over threads).
    Measured on the H100 (2026-11-27, benchmarks/bench_selection_kernels.py): at NB=1024, 256
    threads (C=4) beat 128 (C=8) and 1024; at NB=8192, 1024 threads (C=8) beat 512 and 256.
    So: C <= 4, 256..1024 threads (C = 16 at NB = 16384, i.e. 256K tokens at block 16); 128
    threads for tiny rows. Histogram: "hybrid" (match_any aggregation in the first radix pass
    only) was fastest at every size: select kernel 8.5 us vs 14.8 ("match" in every pass) and
    11.0 ("priv", 8 lane-private copies) at NB=8192; 17.1 / 28.4 / 17.2 us at NB=16384.
    """
    row_vectors = max(1, num_kv_heads * head_dim // 8)
    score_threads = 256
    rows = max(1, (4 * score_threads) // row_vectors)
    t = 128 if num_blocks <= 256 else 256
    while t < 1024 and t * 4 < num_blocks:
        t *= 2
    return SelectionConfig(score_threads=score_threads, score_rows_per_cta=rows, select_threads=t,
                           hist="hybrid")


def selection_config_for_summaries(config, summary_dtype, dtype):
    """The select_blocks config for summaries stored in ``summary_dtype`` (``dtype`` = q's).

    Reason: tuned configs (and selection_config) size a scoring thread's work in 16-byte
    (block, vector) items of fp16/bf16 summaries. An fp8 vector holds twice the elements, so a
    block row has half the items; doubling the blocks per CTA keeps the loads each thread has
    in flight, and so the bytes in flight per SM, what they were (the op is memory-bound).
    """
    import dataclasses
    if summary_dtype == dtype or torch.finfo(summary_dtype).bits != 8:
        return config
    return dataclasses.replace(config, score_rows_per_cta=2 * config.score_rows_per_cta)


# --- sparse_decode / dense_decode (resa_tl/kernels/sparse_decode.py, dense_decode.py) --------

def _decode_tile(arch: str, block_size: int = 16):
    """(block_N, num_stages) of the split-KV decode kernels.

    Reasons: decode is memory-bound (g <= 8 query rows per KV head: ~4 flop/byte), so a tile
    only has to keep enough bytes in flight. On sm_90a the warp-specialised TMA producer with
    2 stages of 64 keys (K+V: 32 KB per stage at D = 128) reached ~3.05 TB/s for dense decode
    on the H100 (notes/h100-baselines.md); 64 keys = 4 gathered 16-token blocks per stage for
    the sparse kernel. Smem 80 KB at D = 128. On sm_80 a run-time trip count with cp.async
    only compiles with one stage in TileLang 0.1.15. A block larger than 64 tokens is one
    stage by itself (block_N = block_size)."""
    hopper = arch.startswith("sm_9")
    return max(64, block_size), (2 if hopper else 1)


def sparse_decode_config(block_size: int, arch: str):
    """Default SparseDecodeConfig (see _decode_tile for block_N / stages). block_H = 64 with
    128 consumer threads: wgmma needs M = 64 per warpgroup, and the g <= 8 heads of a KV group
    are padded to it (compute is not the bottleneck).

    schedule "ws" on sm_90a: TileLang's automatic warp specialisation gives every gathered
    copy (4 blocks x 2 column pieces x K/V per stage at block 16) its own mbarrier pair, i.e.
    16 consumer arrivals per thread per stage; the hand-written producer needs 2. Measured on
    the H100 (Qwen2.5-7B shapes, keep 10% of 16-token blocks, CUDA-graph replays,
    benchmarks/bench_decode_kernels.py, 2026-11-27): "ws" vs "auto" 9.6 vs 11.8 us (16K, batch
    1), 13.8 vs 25.3 us (64K, 1), 47.8 vs 121.8 us (64K, 8), 159.2 vs 454.4 us (256K, 8).
    3 stages and block_N 128 were within +-5% of this default, block_N 32 with 4 stages up to
    19% slower, 2 CTAs per SM -2% at 256K batch 8 but +9% at 64K batch 1.
    "auto" elsewhere (sm_80: cp.async)."""
    bn, st = _decode_tile(arch, block_size)
    return SparseDecodeConfig(block_N=bn, block_H=64, threads=128, num_stages=st,
                              schedule="ws" if arch.startswith("sm_9") else "auto")


def dense_decode_config(arch: str):
    """Default DenseDecodeConfig: the same tile as sparse decode (see _decode_tile)."""
    bn, st = _decode_tile(arch, 64)
    return DenseDecodeConfig(block_N=bn, block_H=64, threads=128, num_stages=st)


@functools.lru_cache(maxsize=4096)
def _decode_splits(rows: int, tiles: int, slots: int, overhead: float, max_splits: int) -> int:
    best_cost, best_ns = None, 1
    per = 1
    while per <= tiles:
        ns = -(-tiles // per)
        if ns <= max_splits:
            waves = -(-(rows * ns) // slots)
            cost = waves * (per + overhead)
            if best_cost is None or cost < best_cost - 1e-9:
                best_cost, best_ns = cost, ns
        # only split counts that change ceil(tiles / per) matter
        per = -(-tiles // (ns - 1)) if ns > 1 else tiles + 1
    return best_ns


def decode_num_splits(batch: int, num_kv_heads: int, num_tiles: int,
                      device: torch.device | None = None, num_sms: int | None = None,
                      ctas_per_sm: int = 1, split_overhead: float = 1.0,
                      max_splits: int = 256) -> int:
    """Split count of the split-KV decode kernels (sparse and dense).

    The B * Hkv (row, KV head) pairs each have ``num_tiles`` pipeline tiles (host-known:
    from the index width K or the cache capacity S_max, never from the lengths, so no sync).
    Each of B * Hkv * NS CTAs runs ceil(num_tiles / NS) tiles. Reasons:
    * at batch 1 B * Hkv is 4 for Qwen2.5-7B, so without splitting 128 of 132 SMs idle;
    * the split kernel holds one CTA per SM (setmaxnreg gives its 128 MMA threads 240
      registers: 256 threads x 142+ registers at launch), so CTAs run in waves of num_sms;
    * the makespan is waves * (tiles per split + a fixed per-CTA cost: prologue, index scan,
      pipeline fill, partial-output write ~ one tile): this model picks e.g. 26 splits of 4
      tiles (104 CTAs, one wave) for 103 tiles at batch 1 rather than 35 splits of 3 (140 CTAs,
      two waves); ties go to fewer splits (less partial-output traffic and combine work);
    * split counts whose ceil(num_tiles / NS) is the same are collapsed to the smallest, so no
      split is empty by construction.
    The SM count is read from the device (never hard-coded). On the H100 (sparse, Qwen2.5-7B,
    64K/256K, batch 1/8) the chosen count was the fastest of {NS/2, NS, 2 NS, 2 waves}."""
    rows = max(1, batch * num_kv_heads)
    tiles = max(1, num_tiles)
    slots = max(1, (sm_count(device) if num_sms is None else num_sms) * ctas_per_sm)
    return _decode_splits(rows, tiles, slots, float(split_overhead), max_splits)


# ---------------------------------------------------------------------------- prefill chunks
#: Share of the free GPU memory a prefill chunk's activations may take. The per-token estimate
#: below counts the large live tensors only; the rest (allocator fragmentation, cuBLAS
#: workspaces, the flash kernels' own buffers, the last chunk's logits) lives in the remainder.
PREFILL_MEMORY_SHARE = 0.35
#: Tokens per prefill forward (all rows together) past which a larger chunk buys nothing: the
#: GEMMs of a 7B-sized layer run at full throughput well below 16K rows, and the chunk's
#: attention costs the same per token whatever the chunk length.
PREFILL_MAX_TOKENS = 32768
#: Chunk length granularity: multiples of a KV block of every supported size.
PREFILL_CHUNK_QUANTUM = 128


def prefill_chunk_tokens(prompt: int, batch: int, *, hidden: int, intermediate: int,
                         num_heads: int, num_kv_heads: int, head_dim: int, dtype_bytes: int,
                         free_bytes: int | None) -> int:
    """Tokens per row in each prefill forward of the transformers integration.

    Peak activations of one decoder layer per token (eager, no autograd): about 4 hidden-sized
    tensors (residual, norm, attention and MLP outputs), 3 intermediate-sized ones (gate, up
    and their product), q/k/v with their RoPE copies, and the chunk attention's folded query,
    its repeated chunk K/V and two partial outputs, plus the merge in fp32. ``free_bytes``
    None (no CUDA device): only the token cap applies."""
    qkv = (num_heads + 2 * num_kv_heads) * head_dim
    per_token = (4 * hidden + 3 * intermediate + 2 * qkv + 6 * num_heads * head_dim) \
        * dtype_bytes + 2 * num_heads * head_dim * 4
    tokens = PREFILL_MAX_TOKENS
    if free_bytes is not None:
        tokens = min(tokens, int(free_bytes * PREFILL_MEMORY_SHARE) // per_token)
    chunk = max(tokens // batch, PREFILL_CHUNK_QUANTUM) // PREFILL_CHUNK_QUANTUM \
        * PREFILL_CHUNK_QUANTUM
    return max(1, min(prompt, chunk))


# ---------------------------------------------------------------- lossless mode: verify window
#: Prior of the lossless mode's per-row agreement estimate, as (agreements, disagreements)
#: pseudo-counts: 0.8, worth a few tokens, so the first windows are neither timid nor reckless.
VERIFY_PRIOR = (4.0, 1.0)
#: Decay of the agreement counts per verify pass: the estimate follows the last few windows
#: (a text's passage changes how well sparse attention tracks dense).
VERIFY_DECAY = 0.8
#: Per dense step of the lossless mode (no proposals, so no verdicts), the agreement counts move
#: this share of the way back to VERIFY_PRIOR, so proposals get tried again: after failures
#: (about 0 yes, 5 no) it takes some 40 dense steps before a short window looks worth a try at
#: a sparse/dense cost ratio of 0.5, so retrying costs a few percent where agreement stays low.
VERIFY_RETRY_DRIFT = 0.05


def agreement_after(counts, proposed: int, accepted: int) -> list:
    """A row's (yes, no) agreement counts after a verify pass that kept ``accepted`` of its
    ``proposed`` proposals: decayed, plus a yes per kept proposal and a no for a rejection.
    A dense step (``proposed`` 0) tells nothing: the counts drift towards VERIFY_PRIOR, so
    proposals get tried again."""
    yes, no = counts
    if proposed:
        d = VERIFY_DECAY
        return [d * yes + accepted, d * no + (accepted < proposed)]
    r = VERIFY_RETRY_DRIFT
    return [(1 - r) * x + r * p for x, p in zip(counts, VERIFY_PRIOR)]


def expected_tokens(alpha: float, window: int) -> float:
    """Tokens a row commits from one verify pass of ``window`` proposals when each proposal
    agrees with dense with probability ``alpha`` (independently): the accepted run, expected
    sum_{k=1..w} alpha^k, plus the dense token after it."""
    if alpha >= 1.0:
        return window + 1.0
    return alpha * (1.0 - alpha ** window) / (1.0 - alpha) + 1.0


def verify_window(windows, alphas, step_ms: float, verify_ms: float,
                  dense_ms: float | None = None) -> int:
    """The lossless mode's next window: of ``windows``, the one that commits the most tokens
    per unit of time for the batch, a window of w costing w sparse steps (``step_ms`` each)
    and one dense pass (``verify_ms``) and committing expected_tokens(alpha_b, w) in row b.
    Low agreement or a cheap dense pass (short context) gives short windows, high agreement
    and an expensive dense pass (long context) long ones; ties go to the shorter window.
    A window of 0 (no proposals: one dense step of ``dense_ms``, default ``verify_ms``, which
    commits one token per row) wins where nothing beats plain dense decoding."""
    best, best_rate = None, -1.0
    for w in sorted(windows):
        cost = w * step_ms + verify_ms if w else (verify_ms if dense_ms is None else dense_ms)
        rate = sum(expected_tokens(a, w) for a in alphas) / cost
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = w, rate
    return best
