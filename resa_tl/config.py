"""ReSA hyper-parameters (Sun et al. 2025, arXiv 2506.04108): the paper's defaults, plus one
attention-sink block (``sink_blocks``)."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

from .kernels.block_summaries import FP8_FORMATS

SUMMARY_DTYPES = tuple(FP8_FORMATS)          # names ReSAConfig.summary_dtype accepts
# One attention-sink block by default: not in the paper, but better than it on every text and
# budget measured (docs/fidelity.md, SmolLM2-135M, five novels, keep 5-20%), at no cost (it is
# inside the same budget). More sink blocks measured worse.
DEFAULT_SINK_BLOCKS = 1


@dataclass(frozen=True)
class ReSAConfig:
    """Configuration of Rectified Sparse Attention.

    Parameters
    ----------
    block_size : int
        Tokens per KV block; a power of two in [16, 128]. Default 16.
    sparse_ratio : float
        Fraction of the valid blocks kept at each sparse decode step, in (0, 1].
        1.0 keeps every block (sparse decoding then equals dense decoding). Default 0.1.
    min_blocks : int
        A row keeps at least ``min(valid_blocks, min_blocks)`` blocks; >= 1. Default 16.
    local_blocks : int
        The newest ``local_blocks`` valid blocks are always kept; in [0, min_blocks]. Default 1.
    sink_blocks : int or None
        The oldest ``sink_blocks`` blocks (the attention-sink tokens at the start of the
        sequence) are always kept, inside the same budget; ``sink_blocks + local_blocks`` must
        not exceed ``min_blocks`` so that every forced block fits. Default None: one block
        where it fits (``min(1, min_blocks - local_blocks)``), which beat the paper's rule
        (0, no sink) on every text and budget measured in docs/fidelity.md; 0 is the paper's
        selection exactly. Read back as the int in use.
    rectify_every : int
        Every ``rectify_every`` sparse steps, a dense pass rewrites the K/V of those tokens.
        0 disables rectification (sparse-only decoding); >= 0. Default 32.
    lossless : bool
        Verify every sparse token against dense decoding, as self-speculative decoding does:
        each dense pass (rectification) also yields the dense logits of the tokens the sparse
        steps proposed since the last one. Greedy: they are kept up to the first one dense
        decoding would not have chosen, which is replaced by the dense choice, and the cache
        is rewound to it; the output is exactly dense greedy decoding. Sampling: the
        speculative-sampling rule, so each token is distributed as dense sampling's. Each row
        accepts its own number of tokens. The verify window adapts between
        ``min(4, rectify_every)`` and ``rectify_every`` tokens (halved when fewer than half of
        the proposals were kept, doubled when all were). In resa_tl's ``generate()`` loop
        only (a plain call after ``resa_tl.attach``); needs rectify_every >= 1. Default False.
    summary_dtype : str or None
        Storage of the per-block key summaries (kmin/kmax) that selection reads every step.
        None (default): the cache dtype, exact, as in the paper. "float8_e4m3fn" or
        "float8_e5m2": half the bytes (selection reads 1/16 of K instead of 1/8); kmin is
        rounded down and kmax up, so the score stays an upper bound, only a looser one; see
        docs/fidelity.md and docs/performance.md for what it changes.
    """

    block_size: int = 16
    sparse_ratio: float = 0.1
    min_blocks: int = 16
    local_blocks: int = 1
    rectify_every: int = 32
    sink_blocks: int | None = None
    summary_dtype: str | None = None
    lossless: bool = False

    def __post_init__(self) -> None:
        bs = self.block_size
        if not _is_int(bs) or bs < 16 or bs > 128 or bs & (bs - 1):
            raise ValueError(f"ReSAConfig.block_size must be a power of two in [16, 128], got {bs!r}")
        r = self.sparse_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
            raise ValueError(f"ReSAConfig.sparse_ratio must be a number in (0, 1], got {r!r}")
        mb = self.min_blocks
        if not _is_int(mb) or mb < 1:
            raise ValueError(f"ReSAConfig.min_blocks must be an integer >= 1, got {mb!r}")
        lb = self.local_blocks
        if not _is_int(lb) or lb < 0 or lb > mb:
            raise ValueError(
                f"ReSAConfig.local_blocks must be an integer in [0, min_blocks={mb}], got {lb!r}")
        sb = self.sink_blocks
        if sb is None:
            sb = min(DEFAULT_SINK_BLOCKS, mb - lb)
            object.__setattr__(self, "sink_blocks", sb)
            # not a field (asdict, ==, hash and the constructor ignore it): replace() resolves
            # the default again for the new budget
            object.__setattr__(self, "_sink_default", True)
        if not _is_int(sb) or sb < 0 or sb + lb > mb:
            raise ValueError(
                f"ReSAConfig.sink_blocks must be an integer in [0, min_blocks - local_blocks = "
                f"{mb - lb}] (the forced blocks must fit the smallest budget), got {sb!r}")
        sd = self.summary_dtype
        if sd is not None:
            name = str(sd).replace("torch.", "")
            if name not in SUMMARY_DTYPES:
                raise ValueError(f"ReSAConfig.summary_dtype must be None (the cache dtype) or one "
                                 f"of {SUMMARY_DTYPES}, got {sd!r}")
            object.__setattr__(self, "summary_dtype", name)    # torch dtypes normalised
        f = self.rectify_every
        if not _is_int(f) or f < 0:
            raise ValueError(
                f"ReSAConfig.rectify_every must be an integer >= 0 (0 disables rectification), got {f!r}")
        if not isinstance(self.lossless, bool):
            raise ValueError(f"ReSAConfig.lossless must be a bool, got {self.lossless!r}")
        if self.lossless and f < 1:
            raise ValueError("ReSAConfig.lossless verifies sparse tokens at the dense passes; it "
                             "needs rectify_every >= 1")

    def verify_windows(self) -> tuple:
        """Verify windows of the lossless mode, largest first: rectify_every, halved down to
        min(4, rectify_every). () when not lossless."""
        if not self.lossless:
            return ()
        w, low, out = self.rectify_every, min(4, self.rectify_every), []
        while w >= low:
            out.append(w)
            w //= 2
        return tuple(out)

    def replace(self, **overrides) -> "ReSAConfig":
        """A copy with some fields changed; unknown names raise TypeError naming the valid fields."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown ReSAConfig field(s) {unknown}; valid fields: {sorted(names)}")
        if getattr(self, "_sink_default", False) and "sink_blocks" not in overrides:
            overrides["sink_blocks"] = None
        return replace(self, **overrides)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
