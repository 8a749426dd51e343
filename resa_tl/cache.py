"""ReSACache: preallocated per-layer K/V (NHD) with incrementally maintained block summaries.

Each layer keeps its own length vector (a row of ``seqlens`` [L, B], int32, on the device): a
model's forward updates layer 0 before layer 1 reads its cache, so per-layer lengths keep every
layer consistent at every moment. Rows may have different lengths. Host-side counters mirror the
longest and shortest row so capacity errors are raised without reading the device.
"""
from __future__ import annotations

import torch

from . import ops, plan
from . import _checks as chk
from .config import ReSAConfig
from .kernels.block_summaries import fp8_name, warn_if_saturated


class ReSACache:
    """Static KV cache for ReSA decoding.

    Parameters
    ----------
    num_layers, batch_size, max_seq_len, num_kv_heads, head_dim : int
        Storage is ``k[l], v[l]`` of shape [batch_size, max_seq_len, num_kv_heads, head_dim]
        and ``kmin[l], kmax[l]`` of shape [batch_size, ceil(max_seq_len / block_size),
        num_kv_heads, head_dim], all in ``dtype`` (the summaries in ``config.summary_dtype``
        if set).
    config : ReSAConfig, optional — its block_size sizes the summaries.
    dtype : torch.dtype — float16, bfloat16 or float32.
    device : torch.device or str.
    v_head_dim : int, optional — defaults to head_dim.
    backend : "auto" | "tilelang" | "torch" — used for the summary updates.
    """

    def __init__(self, num_layers: int, batch_size: int, max_seq_len: int, num_kv_heads: int,
                 head_dim: int, *, config: ReSAConfig | None = None, dtype=torch.float16,
                 device="cpu", v_head_dim: int | None = None, backend: str = "auto"):
        for name, val in (("num_layers", num_layers), ("batch_size", batch_size),
                          ("max_seq_len", max_seq_len), ("num_kv_heads", num_kv_heads),
                          ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"ReSACache: {name} must be an int >= 1, got {val!r}")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"ReSACache: dtype must be float16, bfloat16 or float32, got {dtype}")
        self.config = config or ReSAConfig()
        self.block_size = self.config.block_size
        self.num_layers, self.batch_size, self.max_seq_len = num_layers, batch_size, max_seq_len
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.v_head_dim = v_head_dim or head_dim
        self.backend = backend
        self._tilelang = ops.resolve_backend(backend, torch.device(device), dtype) == "tilelang"
        self._update_plans = {}              # summary-update plans by positions written per row
        self.num_blocks = -(-max_seq_len // self.block_size)
        dev = torch.device(device)
        shape = (batch_size, max_seq_len, num_kv_heads)
        sshape = (batch_size, self.num_blocks, num_kv_heads, head_dim)
        self.k = [torch.zeros(*shape, head_dim, dtype=dtype, device=dev) for _ in range(num_layers)]
        self.v = [torch.zeros(*shape, self.v_head_dim, dtype=dtype, device=dev)
                  for _ in range(num_layers)]
        sdt = chk.summary_dtype(self.config.summary_dtype, dtype)
        self.kmin = [torch.zeros(sshape, dtype=sdt, device=dev) for _ in range(num_layers)]
        self.kmax = [torch.zeros(sshape, dtype=sdt, device=dev) for _ in range(num_layers)]
        self.seqlens = torch.zeros(num_layers, batch_size, dtype=torch.int32, device=dev)
        self._rows = torch.arange(batch_size, device=dev)
        self._steps = torch.arange(max_seq_len, device=dev)
        self._max_len = [0] * num_layers   # host mirrors of the longest / shortest row
        self._min_len = [0] * num_layers

    @property
    def device(self) -> torch.device:
        return self.seqlens.device

    def lengths(self, layer: int) -> torch.Tensor:
        """Valid positions per row of ``layer``: int32 [B] (a view; updated in place)."""
        return self.seqlens[layer]

    def max_length(self, layer: int = 0) -> int:
        """Longest row of ``layer``, from the host mirror (no device sync)."""
        return self._max_len[layer]

    def min_length(self, layer: int = 0) -> int:
        return self._min_len[layer]

    def _check_kv(self, k, v, what: str):
        B, Hkv, D, Dv = self.batch_size, self.num_kv_heads, self.head_dim, self.v_head_dim
        if k.dim() != 4 or k.shape[0] != B or k.shape[2:] != (Hkv, D):
            raise ValueError(f"{what}: key must be [B={B}, n, Hkv={Hkv}, D={D}], got {list(k.shape)}")
        if v.dim() != 4 or v.shape[:3] != k.shape[:3] or v.shape[3] != Dv:
            raise ValueError(f"{what}: value must be [B, n, Hkv, Dv={Dv}] like the key, got "
                             f"{list(v.shape)}")

    def prefill(self, layer: int, k: torch.Tensor, v: torch.Tensor, lengths=None):
        """Write a prompt's K/V at positions [0, n) and rebuild the layer's summaries.

        k, v : [B, n, Hkv, D] / [B, n, Hkv, Dv]. lengths : int tensor or list [B] of valid
        positions per row (right padding beyond them is ignored), default n for every row.
        Not on the decode hot path: the lengths are read on the host once.
        """
        self._check_kv(k, v, "prefill")
        n = k.shape[1]
        if n > self.max_seq_len:
            raise ValueError(f"prefill: prompt of {n} tokens exceeds the cache capacity "
                             f"max_seq_len={self.max_seq_len}")
        if lengths is None:
            lengths = [n] * self.batch_size
        lens = torch.as_tensor(lengths, dtype=torch.int32).reshape(-1)
        host = lens.tolist()
        if len(host) != self.batch_size or min(host) < 0 or max(host) > n:
            raise ValueError(f"prefill: lengths must be {self.batch_size} values in [0, {n}], "
                             f"got {host}")
        self.k[layer][:, :n].copy_(k)
        self.v[layer][:, :n].copy_(v)
        self.seqlens[layer].copy_(lens)
        self._max_len[layer], self._min_len[layer] = max(host), min(host)
        self.rebuild_summaries(layer)
        kmin, kmax = self.kmin[layer], self.kmax[layer]
        if fp8_name(kmin.dtype) and not chk.value_checks_enabled(kmin):
            # fp8: say if keys overflow its range (block_summaries did if it checks values)
            warn_if_saturated(kmin, kmax, f"ReSACache.prefill (layer {layer})")

    def reserve(self, n: int) -> None:
        """Host bookkeeping before ``n`` positions per row are written to every layer (by
        :meth:`write`, e.g. inside a compiled forward): checks the capacity and advances the
        host mirrors of the row lengths. No device work."""
        if self._max_len[0] + n > self.max_seq_len:
            raise ValueError(f"{n} more token(s) would exceed the cache capacity max_seq_len="
                             f"{self.max_seq_len} (longest row holds {self._max_len[0]})")
        for layer in range(self.num_layers):
            self._max_len[layer] += n
            self._min_len[layer] += n

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, *,
              update_summaries: bool = True) -> None:
        """Device side of an append: write n positions per row at each row's end (k, v
        [B, n, Hkv, D] / [B, n, Hkv, Dv]), refresh the O(n / block_size) touched summaries and
        advance the layer's lengths. No host sync and no host state, so a compiled or captured
        forward can run it; the host mirrors are :meth:`reserve`'s job.

        ``update_summaries=False`` leaves the summary of the block the new positions went into
        stale: only for one-token decode steps whose select_blocks(k_cache=...) refreshes it
        (it is a local block, kept whatever its summary says)."""
        n = k.shape[1]
        lens = self.seqlens[layer]
        pos = lens.long()[:, None] + self._steps[:n]                        # [B, n]
        self.k[layer][self._rows[:, None], pos] = k.to(self.k[layer].dtype)
        self.v[layer][self._rows[:, None], pos] = v.to(self.v[layer].dtype)
        if update_summaries:
            self._update_summaries(layer, lens, n)
        lens.add_(n)

    def _update_summaries(self, layer: int, start: torch.Tensor, n: int) -> None:
        kmin, kmax, k = self.kmin[layer], self.kmax[layer], self.k[layer]
        if torch.compiler.is_compiling():      # an opaque custom op inside a compiled graph
            from .integration._torch_ops import update_summaries
            update_summaries(kmin, kmax, k, start, n, self.block_size, self.backend)
        elif self._tilelang:                   # storage is ours: contiguous, aligned, checked
            p = self._update_plans.get(n)       # every layer has the same shapes
            if p is None:
                p = self._update_plans[n] = plan.summaries_like(k, start, self.block_size,
                                                                kmin.dtype, "update", n)
            p.run(k, start, kmin, kmax, n)
        else:
            ops.update_block_summaries(kmin, kmax, k, start, n, self.block_size,
                                       backend=self.backend)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write n new positions per row at each row's end (decode: n = 1; a rectification pass
        re-appends the rewound tokens) and refresh the O(n / block_size) touched summaries.
        Eager: :meth:`write` plus this layer's host bookkeeping."""
        self._check_kv(k, v, "append")
        n = k.shape[1]
        if self._max_len[layer] + n > self.max_seq_len:
            raise ValueError(f"append: {n} more token(s) would exceed the cache capacity "
                             f"max_seq_len={self.max_seq_len} (longest row holds "
                             f"{self._max_len[layer]})")
        self.write(layer, k, v)
        self._max_len[layer] += n
        self._min_len[layer] += n

    def compact(self, layer: int, valid: torch.Tensor) -> None:
        """Drop padding from the last T positions written to ``layer``: valid bool [B, T]
        (True = real token) says which of them to keep; kept positions move to the front,
        in order, and the layer's lengths and summaries follow. Eager only (reads the lengths
        on the host); for padded prompts."""
        T = valid.shape[1]
        lens = self.seqlens[layer]
        base = lens.long() - T
        pos = base[:, None] + self._steps[:T]                              # raw positions
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # real tokens first
        src = pos.gather(1, order)
        rows = self._rows[:, None]
        for buf in (self.k[layer], self.v[layer]):
            buf[rows, pos] = buf[rows, src]
        lens.copy_(base + valid.sum(-1))
        self.rebuild_summaries(layer)
        host = lens.tolist()
        self._max_len[layer], self._min_len[layer] = max(host), min(host)

    def rebuild_summaries(self, layer: int) -> None:
        """Recompute the layer's summaries from its K over the current lengths."""
        kmin, kmax = ops.block_summaries(self.k[layer], self.seqlens[layer], self.block_size,
                                         summary_dtype=self.kmin[layer].dtype,
                                         backend=self.backend)
        self.kmin[layer].copy_(kmin)
        self.kmax[layer].copy_(kmax)

    def rewind(self, n: int, layers=None):
        """Drop the last n positions of every row (rectification rewrites them) and refresh the
        block that becomes each row's last, so summaries equal a rebuild from scratch."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"rewind: n must be an int >= 0, got {n!r}")
        for layer in range(self.num_layers) if layers is None else layers:
            if n > self._min_len[layer]:
                raise ValueError(f"rewind: cannot drop {n} positions; the shortest row of layer "
                                 f"{layer} holds {self._min_len[layer]}")
            if n == 0:
                continue
            lens = self.seqlens[layer]
            lens.sub_(n)
            self._max_len[layer] -= n
            self._min_len[layer] -= n
            if self._min_len[layer] >= 1:
                # Recompute the block holding position len-1 over positions < len.
                ops.update_block_summaries(self.kmin[layer], self.kmax[layer], self.k[layer],
                                           lens - 1, 1, self.block_size, backend=self.backend)
            else:
                self.rebuild_summaries(layer)

    def rewind_rows(self, n: torch.Tensor, n_host: list, lengths_after: list, layers=None):
        """Drop the last ``n[b]`` positions of row b (int [B] on the cache's device; ``n_host``
        the same counts on the host, and ``lengths_after`` each row's length afterwards, which
        the caller knows, so the host mirrors stay exact without a sync) and refresh the block
        that becomes each row's last, as :meth:`rewind` does. The lossless mode's rows keep
        different numbers of verified tokens."""
        B = self.batch_size
        if len(n_host) != B or len(lengths_after) != B or min(n_host) < 0 or min(lengths_after) < 0:
            raise ValueError(f"rewind_rows: need {B} counts >= 0 and {B} lengths >= 0, got "
                             f"{n_host} and {lengths_after}")
        for layer in range(self.num_layers) if layers is None else layers:
            if max(n_host) == 0:
                continue
            lens = self.seqlens[layer]
            lens.sub_(n.to(lens.dtype))
            self._max_len[layer], self._min_len[layer] = max(lengths_after), min(lengths_after)
            if self._min_len[layer] >= 1:
                ops.update_block_summaries(self.kmin[layer], self.kmax[layer], self.k[layer],
                                           lens - 1, 1, self.block_size, backend=self.backend)
            else:
                self.rebuild_summaries(layer)

    def reset(self):
        self.seqlens.zero_()
        self._max_len = [0] * self.num_layers
        self._min_len = [0] * self.num_layers
