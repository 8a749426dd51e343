"""A transformers ``Cache`` backed by :class:`resa_tl.ReSACache`.

``ReSAHFCache`` is a ``transformers.Cache`` whose layers (``ReSACacheLayer``, one
``CacheLayerMixin`` per decoder layer) write into the static, preallocated NHD storage of a
``ReSACache`` and keep its block summaries up to date. Each layer's ``update`` returns views of
that storage (``[B, Hkv, S_max, D]``, like ``StaticLayer``), and the attention function that
``resa_tl.attach`` registers reads the storage, the per-row lengths and the summaries directly.

Lengths. Every row keeps its own number of valid positions (``store.seqlens[layer]``): padding
tokens of a left-padded batch are never stored (rows are compacted), and keys already carry RoPE,
so where a key sits in storage does not matter. ``get_seq_length`` reports the *logical* length
(tokens fed so far, padding included: what the 2D attention mask of ``generate`` counts), as a
0-d device tensor like ``StaticLayer`` so a compiled decode step never specialises on it.

Host bookkeeping (capacity checks, the lengths' host mirrors, the count of sparse steps since the
last dense pass) happens in :meth:`ReSAHFCache.begin_step`, which ``resa_tl.attach``'s
``prepare_inputs_for_generation`` calls before every forward. A forward that nobody planned
(a direct ``model(...)`` call) is planned on the fly by the first layer's ``update``, eagerly.
The decode step itself only touches device tensors, so it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ops
from ..cache import ReSACache
from ..config import ReSAConfig
from ..cycle import DecodeCycle, StepAttention
from . import _torch_ops  # noqa: F401  (registers torch.ops.resa_tl.hf_*)

# The ReSA layer whose ``update`` ran last. In every supported model the attention call of a
# layer immediately follows its cache update, so the attention function finds its cache here
# (the model does not pass ``past_key_values`` to the attention function). It is cleared once
# read, so a forward without a ReSA cache never sees a stale layer.
ACTIVE = {"layer": None}


def text_config(model_config):
    return model_config.get_text_config(decoder=True)


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def sliding_windows(cfg) -> dict:
    """{layer index: window} for the layers that use sliding-window attention."""
    window = getattr(cfg, "sliding_window", None)
    if window is None:
        return {}
    types = getattr(cfg, "layer_types", None)
    if types is None:                                  # Mistral: every layer uses the window
        return {i: window for i in range(cfg.num_hidden_layers)}
    return {i: window for i, t in enumerate(types) if t == "sliding_attention"}


class ReSACacheLayer(CacheLayerMixin):
    """One decoder layer's view of a :class:`ReSAHFCache` (storage lives in the owner)."""

    is_sliding = False
    is_croppable = False
    supports_early_init = False           # storage is allocated up front

    def __init__(self, owner: "ReSAHFCache", layer_idx: int, compileable: bool):
        super().__init__()
        self.owner, self.layer_idx = owner, layer_idx
        self.is_compileable = compileable
        store = owner.store
        self.keys = store.k[layer_idx].transpose(1, 2)           # [B, Hkv, S_max, D] views
        self.values = store.v[layer_idx].transpose(1, 2)
        self.batch_size, self.num_heads = store.batch_size, store.num_kv_heads
        self.dtype, self.device = store.k[layer_idx].dtype, store.device
        self.max_cache_len = store.max_seq_len
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        return self.owner._write(self.layer_idx, key_states, value_states)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_seq_length(self):
        return self.owner.seen[self.layer_idx]

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:              # the owner resets all layers at once
        pass

    def offload(self):
        raise NotImplementedError("ReSAHFCache does not support offloading")

    def prefetch(self):
        raise NotImplementedError("ReSAHFCache does not support offloading")

    def _unsupported(self, what):
        raise NotImplementedError(
            f"ReSAHFCache does not support {what} (used by beam search, contrastive search and "
            "assisted decoding); ReSA decoding supports greedy decoding and sampling")

    def reorder_cache(self, beam_idx):
        self._unsupported("reorder_cache")

    def crop(self, tokens_to_remove):
        self._unsupported("crop")

    def batch_repeat_interleave(self, repeats):
        self._unsupported("batch_repeat_interleave")

    def batch_select_indices(self, indices):
        self._unsupported("batch_select_indices")


class ReSAHFCache(Cache):
    """transformers ``Cache`` for ReSA decoding: static per-layer K/V (NHD) + block summaries.

    Parameters
    ----------
    model_config : transformers ``PretrainedConfig`` of the model (layers, KV heads, head_dim,
        sliding windows are read from it).
    batch_size, max_cache_len : int — rows and positions per row the cache can hold.
    config : ReSAConfig — block size, sparsity and rectification period.
    dtype, device : storage dtype / device (the model's).
    backend : "auto" | "tilelang" | "torch" — for every ReSA op.
    compileable : bool — report ``is_compileable`` to transformers (``generate`` then compiles
        the decode step on CUDA, as it does for ``cache_implementation="static"``).
    heads : (query heads, KV heads) this process attends with, if not the model's (tensor
        parallelism: each rank's share).

    Attributes of interest: ``store`` (the :class:`resa_tl.ReSACache`), ``num_rectifications``,
    ``last_step_rectified`` (the last forward re-fed sparse tokens densely).
    """

    def __init__(self, model_config, batch_size: int, max_cache_len: int, *,
                 config: ReSAConfig | None = None, dtype=torch.float32, device="cpu",
                 backend: str = "auto", compileable: bool = False,
                 softmax_scale: float | None = None, heads: tuple[int, int] | None = None):
        cfg = text_config(model_config)
        # (query, KV) heads this process attends with: the model's, or its share under
        # tensor parallelism (resa_tl.integration.tensor_parallel.local_heads)
        num_heads, num_kv_heads = heads or (cfg.num_attention_heads, cfg.num_key_value_heads)
        windows = sliding_windows(cfg)
        if windows:
            first, window = min(windows.items())
            if max_cache_len > window:
                raise ValueError(
                    f"layer {first} of this model uses sliding-window attention (window {window}), "
                    f"and the cache would hold up to {max_cache_len} tokens: resa_tl does not "
                    "implement sliding windows. Keep prompt + new tokens within the window, or "
                    "use a model without sliding-window layers")
        ops.resolve_backend(backend, torch.device(device), dtype)      # validates the pair
        self.config = config or ReSAConfig()
        self.backend = backend
        # A one-token step skips its summary-update launch: the sparse attention that follows
        # refreshes the newest block inside select_blocks. That block is then always kept, which
        # takes local_blocks >= 1 (ReSAConfig allows 0). At sparse_ratio >= 1 no selection runs
        # (dense_decode does the step, see resa_tl.cycle), so the write updates the summaries.
        self.refresh_in_select = self.config.local_blocks >= 1 and self.config.sparse_ratio < 1
        self.store = ReSACache(cfg.num_hidden_layers, batch_size, max_cache_len,
                               num_kv_heads, head_dim_of(cfg), config=self.config,
                               dtype=dtype, device=device, backend=backend)
        self.capacity = max_cache_len
        self.seen = torch.zeros(cfg.num_hidden_layers, dtype=torch.int64, device=device)
        super().__init__(layers=[ReSACacheLayer(self, i, compileable)
                                 for i in range(cfg.num_hidden_layers)])
        self.compileable = compileable
        # host-side state
        self._seen_host = 0          # logical length (tokens fed, padding included)
        self.cycle = DecodeCycle(self.config.rectify_every)
        self._planned = False
        self.num_rectifications = 0
        self.last_step_rectified = False
        # one-token forwards attend densely while set (the lossless mode's dense steps, taken
        # where no verify window would beat plain dense decoding); they then update the
        # summaries at the write, as no selection follows to refresh them
        self.dense_one_token = False
        self.num_heads = num_heads
        self.softmax_scale = float(softmax_scale or head_dim_of(cfg) ** -0.5)
        # Eager steps run through this (plans resolved once per cache); a compiled step goes
        # through the custom ops of _torch_ops, which resolve the same plans.
        self.attention = StepAttention(self.store, self.num_heads,
                                       refresh=self.refresh_in_select, reuse_outputs=True)
        if not torch.compiler.is_compiling():
            # fixed addresses: the CUDA graphs of a compiled decode step keep pointing at them
            for t in (*self.store.k, *self.store.v, *self.store.kmin, *self.store.kmax,
                      self.store.seqlens, self.seen):
                torch._dynamo.mark_static_address(t)
            self.warm_up()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        """transformers' Cache.update. Traced by dynamo inside a decoder layer compiled around
        ReSA (resa_tl.integration.layer_compile), the write stays eager: it launches from
        host-side plans."""
        if torch.compiler.is_compiling() and not self.compileable:
            return _eager_write(self, layer_idx, key_states, value_states)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def chunk_kernel_lengths(self) -> frozenset:
        """Multi-token forward lengths that run inside decoding (rectification: f + 1; the
        lossless mode's verify windows + 1): they use the rectify kernel (compiled once per
        length), no host sync, so a CUDA graph can capture them. Other chunks (prompts) use
        torch's flash attention."""
        cfg = self.config
        lengths = {cfg.rectify_every + 1} | {w + 1 for w in cfg.verify_windows()}
        if cfg.lossless:
            lengths.add(1)                    # its dense steps (dense_one_token)
        return frozenset(lengths)

    def _uses_tilelang(self) -> bool:
        return self.attention.tilelang

    @property
    def pending(self) -> int:
        """Tokens decoded sparsely since the last dense pass."""
        return self.cycle.pending

    def warm_up(self):
        """Run the decode loop's kernels once on this cache's shapes (a sparse step, and the
        rectification step of f + 1 tokens), outside any graph capture, and drop the results.
        The sparse step's summary refresh writes layer 0's summary of one block from the
        still-empty cache, i.e. zeros over zeros; any later write to that block recomputes it.

        This loads or compiles the kernels and allocates their workspaces (cached per shape in
        ordinary memory) before decoding starts. Otherwise the first sparse step of a
        torch.compile(mode="reduce-overhead") generate would allocate them during cudagraph
        trees' warm-up run, inside the graphs' private memory pool, where a tensor that outlives
        the run is an error ("tensors in the cudagraph pool not tracked as outputs") or memory
        that a later graph may reuse. No-op for the torch backend."""
        store, cfg = self.store, self.config
        dtype = store.k[0].dtype
        if not self._uses_tilelang():
            return
        from ..kernels.rectify_attention import RECTIFY_MAX_T
        B, D = store.batch_size, store.head_dim
        T = cfg.rectify_every + 1
        lens = torch.full((B,), min(store.max_seq_len, max(T, cfg.block_size)), dtype=torch.int32,
                          device=store.device)
        q = torch.zeros(B, self.num_heads, D, dtype=dtype, device=store.device)
        scale = self.softmax_scale
        _torch_ops.sparse_attention(q, store.k[0], store.v[0], store.kmin[0], store.kmax[0],
                                    lens, cfg.block_size, float(cfg.sparse_ratio),
                                    cfg.min_blocks, cfg.local_blocks, cfg.sink_blocks, scale,
                                    self.backend, self.refresh_in_select)
        if cfg.rectify_every and T <= RECTIFY_MAX_T and T <= store.max_seq_len:
            q = torch.zeros(B, T, self.num_heads, D, dtype=dtype, device=store.device)
            _torch_ops.dense_attention(q, store.k[0], store.v[0], lens, scale, self.backend,
                                       True)

    # ------------------------------------------------------------------ host side
    @property
    def max_cache_len(self) -> int:
        """Positions per row the cache can hold."""
        return self.capacity

    def get_seq_length(self, layer_idx: int = 0):
        return self.seen[layer_idx]

    def lengths(self, layer_idx: int = 0) -> torch.Tensor:
        """Stored (non-padding) positions per row of a layer, int32 [B]."""
        return self.store.lengths(layer_idx)

    def begin_step(self, num_tokens: int, rewind: int = 0):
        """Host bookkeeping before a forward that feeds ``num_tokens`` new tokens per row, after
        dropping the last ``rewind`` (rectification: they are fed again in the same forward)."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
            raise ValueError(f"num_tokens must be an int >= 1, got {num_tokens!r}")
        cap = self.capacity
        if self._seen_host + num_tokens > cap:
            if self._seen_host == 0:
                raise ValueError(f"the prompt ({num_tokens} tokens) is longer than the ReSA cache "
                                 f"(max_cache_len={cap})")
            raise ValueError(f"{num_tokens} more token(s) would exceed the ReSA cache "
                             f"(max_cache_len={cap}, {self._seen_host} tokens held)")
        if rewind:
            self.rewind(rewind)
        n = num_tokens + rewind
        self._seen_host += n
        self.store.reserve(n)                 # padded chunks lower the mirrors at compaction
        self.cycle.advance(n)
        self.last_step_rectified = rewind > 0
        self.num_rectifications += rewind > 0
        self._planned = True

    def rewind(self, n: int):
        """Drop the last n positions of every row (they must all be non-padding)."""
        self.store.rewind(n)
        self.seen.sub_(n)
        self._seen_host -= n

    def drop_last(self, n: int):
        """Forget the last n tokens fed (all rows; none of them padding), as if they had never
        been: the K/V positions, and the sparse steps among them in the decode cycle. The
        decode loop undoes the steps it ran past a stop with it."""
        if n <= 0:
            return
        self.rewind(n)
        self.cycle.pending = max(self.cycle.pending - n, 0)

    def drop_last_rows(self, n: torch.Tensor, n_host: list, lengths_after: list, logical: int):
        """Forget the last ``n[b]`` tokens fed to row b: ``n`` int [B] on the device, ``n_host``
        the same on the host, ``lengths_after`` the rows' stored (non-padding) lengths
        afterwards and ``logical`` the longest row's length with its padding. For the lossless
        mode, which drives the cycle itself and knows these on the host."""
        self.store.rewind_rows(n, n_host, lengths_after)
        self.seen.fill_(logical)
        self._seen_host = logical

    def reset(self):
        self.store.reset()
        self.seen.zero_()
        self._seen_host = 0
        self.cycle.reset()
        self._planned = False
        self.num_rectifications = 0
        self.last_step_rectified = False

    # ------------------------------------------------------------------ device side
    def _write(self, i: int, key_states, value_states):
        """Append the new K/V ([B, Hkv, T, D]) at each row's end; refresh touched summaries,
        except for one token with ``refresh_in_select``: then resa_attention's sparse step, which
        follows every such write in a ReSA forward, refreshes the block. (Writing one token
        through this cache without that attention would leave the block's summary stale.)"""
        if i == 0:
            if not self._planned and not torch.compiler.is_compiling():
                self.begin_step(key_states.shape[-2])         # a forward nobody planned
            self._planned = False
        T = key_states.shape[-2]
        # one token with refresh_in_select: the sparse attention that follows refreshes
        self.store.write(i, key_states.transpose(1, 2), value_states.transpose(1, 2),
                         update_summaries=not (T == 1 and self.refresh_in_select
                                               and not self.dense_one_token))
        self.seen[i].add_(T)
        layer = self.layers[i]
        ACTIVE["layer"] = layer
        return layer.keys, layer.values

    def compact_chunk(self, i: int, valid: torch.Tensor):
        """Drop the padding of the chunk just written to layer i. valid: bool [B, T] (True =
        real token). Eager only (reads lengths on the host); used for padded prompts."""
        self.store.compact(i, valid)


@torch.compiler.disable
def _eager_write(cache: ReSAHFCache, layer_idx: int, key_states, value_states):
    return cache._write(layer_idx, key_states, value_states)
