"""ReSA inside stock transformers ``generate()``: :func:`attach` / :func:`detach`.

transformers is imported on first use, so ``import resa_tl`` stays light.
"""
from __future__ import annotations


def attach(model, config=None, *, backend: str = "auto", **overrides):
    """Make ``model.generate(...)`` decode with ReSA (sparse steps, fused rectification).

    ``config``: a :class:`resa_tl.ReSAConfig` (paper defaults if None); ``**overrides`` replace
    some of its fields, e.g. ``attach(model, sparse_ratio=0.1, rectify_every=32)``.
    ``backend``: "auto" (TileLang for fp16/bf16 CUDA models, torch otherwise), "tilelang" or
    "torch". Returns the model. Details: :mod:`resa_tl.integration.hf`.
    """
    from .hf import attach as _attach
    return _attach(model, config, backend=backend, **overrides)


def detach(model):
    """Undo :func:`attach` exactly (attention implementation and generation hooks)."""
    from .hf import detach as _detach
    return _detach(model)


def new_cache(model, batch_size: int, max_cache_len: int, *, compileable: bool = False,
              config=None):
    """A ReSA cache for an attached model, to pass as ``past_key_values`` (and reuse)."""
    from .hf import new_cache as _new_cache
    return _new_cache(model, batch_size, max_cache_len, compileable=compileable, config=config)


def warm_up(model, batch_size: int, max_cache_len: int):
    """Before serving: allocate the cache the default ``generate()`` call reuses, load or
    compile its kernels and record its CUDA graphs, for ``batch_size`` rows and up to
    ``max_cache_len`` tokens. Details: :func:`resa_tl.integration.hf.warm_up`."""
    from .hf import warm_up as _warm_up
    return _warm_up(model, batch_size, max_cache_len)


__all__ = ["attach", "detach", "new_cache", "warm_up"]
