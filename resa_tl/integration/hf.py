"""``resa_tl.attach(model)`` / ``resa_tl.detach(model)``: ReSA decoding inside an unchanged
``model.generate(...)`` of a transformers causal LM (Llama, Qwen2, Qwen3, Mistral).

How it plugs in (transformers >= 5.17):

* An attention function and a matching mask function are registered under the name
  ``"resa_tl"`` (``transformers.AttentionInterface`` / ``masking_utils.AttentionMaskInterface``)
  and the model is switched to it with ``model.set_attn_implementation("resa_tl")``. The
  attention function gets the query after RoPE and computes attention itself from the ReSA cache:
  one query token -> block selection + sparse attention; several (prefill, rectification) ->
  dense causal attention. The mask function hands the 2D padding mask through unchanged.
* ``generate`` is wrapped (instance attribute) to pass resa_tl's decoding loop
  (:mod:`resa_tl.integration.decode_loop`: chunked prefill, decode steps replayed from CUDA
  graphs, stop checks that never stall the GPU) as transformers' ``custom_generate``. That loop
  hands the call back to transformers' own loop where the caller chose one: a
  ``cache_implementation`` ("dynamic": eager; "static": compiled by transformers), a
  ``compile_config``, a ``custom_generate``, outputs it does not produce (attentions, hidden
  states) or a cache that already holds tokens.
* ``_prepare_cache_for_generation`` is wrapped (instance attribute) to inject a
  :class:`~resa_tl.integration.cache_layer.ReSAHFCache` when the caller passed none (sized like
  transformers sizes its caches, rounded up to a capacity bucket; the default call's cache and
  ``cache_implementation="static"``'s are kept and reused by later calls that fit), and to
  reject what ReSA cannot do (beam search, assisted decoding, ...).
* ``prepare_inputs_for_generation`` is wrapped (instance attribute, ``functools.wraps``) to fuse
  rectification into transformers' loop (resa_tl's loop does the same itself): once ``rectify_every`` tokens were decoded sparsely, the next step
  rewinds them and feeds them again together with the new token, densely, in the same forward
  (``generate`` keeps one row of logits: ``logits_to_keep=1``). Inputs, position ids and masks of
  that step are sliced by transformers' own ``prepare_inputs_for_generation`` for the f + 1 tokens.

Left padding: padding keys are never written to the cache (each row is compacted; keys carry RoPE
already), so rows simply have different lengths; the dense pass over a padded prompt runs per
row on its real tokens. Sliding-window layers: accepted only while the window can never bind (the
cache is no longer than the window); otherwise creating the cache raises.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .. import ops
from ..config import ReSAConfig
from . import _torch_ops, decode_loop
from ._torch_ops import dense
from .cache_layer import ACTIVE, ReSAHFCache, head_dim_of, sliding_windows, text_config
from .layer_compile import EAGER_ATTENTION, install, layer_calls
from .layer_compile import compile_layers as compile_layers_of
from .tensor_parallel import local_heads

IMPLEMENTATION = "resa_tl"
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
TILELANG_HEAD_DIMS = (64, 128)
_WRAPPED = ("generate", "prepare_inputs_for_generation", "_prepare_cache_for_generation")
_MISSING = object()


@dataclass
class AttachState:
    config: ReSAConfig
    backend: str
    previous_implementation: object
    saved_attributes: dict = field(default_factory=dict)
    static_cache: ReSAHFCache | None = None       # reused by cache_implementation="static"
    compiled_layers: list | None = None           # layer_compile wrappers (compile_layers=True)
    saved_layer_calls: list | None = None         # the layers' own calls while resa_tl's are in
    loop_cache: ReSAHFCache | None = None         # reused by the default call (decode_loop)


def attached_state(model) -> AttachState | None:
    return model.__dict__.get("_resa_state")


# ---------------------------------------------------------------------------------- checks
def check_model(model, backend: str) -> None:
    """Architecture, dtype, head_dim and backend checks, with the reason in the message."""
    from transformers import PreTrainedModel
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"resa_tl.attach expects a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    cfg = text_config(model.config)
    mt = getattr(cfg, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES or getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"resa_tl.attach supports the decoder-only architectures "
                         f"{SUPPORTED_MODEL_TYPES}; got model_type={mt!r} "
                         f"({type(model).__name__})")
    if not model.can_generate():
        raise ValueError(f"{type(model).__name__} cannot generate; attach a *ForCausalLM model")
    dtype = model.dtype
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"resa_tl supports float16, bfloat16 and float32 models; this one is "
                        f"{str(dtype).replace('torch.', '')}")
    if backend not in ops.BACKENDS:
        raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
    resolved = ops.resolve_backend(backend, model.device, dtype)
    d = head_dim_of(cfg)
    if resolved == "tilelang" and d not in TILELANG_HEAD_DIMS:
        raise ValueError(f"head_dim={d} is not supported by the TileLang kernels (supported: "
                         f"{TILELANG_HEAD_DIMS}); use backend='torch' (slow) for this model")
    if cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(f"num_attention_heads={cfg.num_attention_heads} must be a multiple of "
                         f"num_key_value_heads={cfg.num_key_value_heads}")
    local_heads(model)                       # tensor parallelism: a split resa_tl can follow


def _check_generation(generation_config, generation_mode) -> None:
    from transformers.generation.configuration_utils import GenerationMode
    if generation_config.is_assistant:
        raise ValueError("a model with resa_tl attached cannot serve as an assistant model "
                         "(assisted decoding rolls the cache back; ReSA's cache cannot)")
    if generation_mode == GenerationMode.ASSISTED_GENERATION:
        raise ValueError("assisted decoding (assistant_model / prompt_lookup_num_tokens) is not "
                         "supported with resa_tl attached: it rolls the cache back")
    if generation_mode not in (GenerationMode.GREEDY_SEARCH, GenerationMode.SAMPLE):
        raise ValueError(f"resa_tl supports greedy decoding and sampling (num_beams=1); got "
                         f"{generation_mode.value} (num_beams={generation_config.num_beams})")


def new_cache(model, batch_size: int, max_cache_len: int, *, compileable: bool = False,
              config: ReSAConfig | None = None) -> ReSAHFCache:
    """A ReSA cache for an attached model, e.g. to pass as ``past_key_values`` to ``generate``
    (and to continue from it later). ``config`` defaults to the one given to ``attach``."""
    state = attached_state(model)
    if state is None:
        raise ValueError("resa_tl is not attached to this model; call resa_tl.attach(model)")
    check_model(model, state.backend)
    return ReSAHFCache(model.config, batch_size, max_cache_len, config=config or state.config,
                       dtype=model.dtype, device=model.device, backend=state.backend,
                       compileable=compileable, softmax_scale=_attention_scale(model),
                       heads=local_heads(model))


def warm_up(model, batch_size: int, max_cache_len: int) -> ReSAHFCache:
    """Prepare an attached model for ``generate()`` calls of ``batch_size`` rows and up to
    ``max_cache_len`` tokens (prompt + new tokens), once, before serving: allocates the cache
    that the default call keeps and reuses, loads or compiles its TileLang kernels (from
    TileLang's disk cache when present), torch.compiles the decoder layers (``compile_layers``)
    and records the decode loop's CUDA graphs, by generating ``2 * (rectify_every + 1) + 1``
    tokens from a short random prompt (a step is recorded on its second run). Later calls whose
    rows match and whose prompt + max_new_tokens fit then compile and record nothing (the
    lossless mode records each verify length as it first recurs). Returns the cache."""
    state = attached_state(model)
    if state is None:
        raise ValueError("resa_tl is not attached to this model; call resa_tl.attach(model)")
    for name, val in (("batch_size", batch_size), ("max_cache_len", max_cache_len)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"warm_up: {name} must be an int >= 1, got {val!r}")
    f = state.config.rectify_every
    new = 2 * (f + 1) + 1                     # the one-token step and the rectification, twice
    prompt = min(64, max(1, max_cache_len - new))
    if prompt + new > max_cache_len + 1:
        raise ValueError(f"warm_up: max_cache_len={max_cache_len} is too short to run two "
                         f"rectifications (rectify_every={f}; needs {new + 1} positions)")
    state.loop_cache = None
    state.loop_cache = new_cache(model, batch_size, bucketed_capacity(
        model, max_cache_len + lossless_slack(state.config)))
    vocab = text_config(model.config).vocab_size
    ids = torch.randint(0, vocab, (batch_size, prompt), device=model.device)
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    return state.loop_cache


def _attention_scale(model) -> float | None:
    """The softmax scale of the model's attention modules (``scaling``), if they say."""
    for module in model.modules():
        scale = getattr(module, "scaling", None)
        if isinstance(scale, (int, float)) and getattr(module, "layer_idx", None) is not None:
            return float(scale)
    return None


# ------------------------------------------------------------------ attention / mask functions
def resa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   **kwargs):
    """AttentionInterface function. query [B, H, T, D] (after RoPE); key/value are the views the
    cache update returned. Returns ([B, T, H, Dv], None)."""
    if getattr(module, EAGER_ATTENTION, False):       # a layer compiled around it: stays eager
        return _eager_attention(module, query, key, value, attention_mask, scaling, **kwargs)
    return _attention(module, query, key, value, attention_mask, scaling, **kwargs)


def _attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    layer = ACTIVE["layer"]
    ACTIVE["layer"] = None
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    if layer is None:                        # this forward runs without a ReSA cache
        return _dense_without_cache(query, key, value, attention_mask, scale)
    if layer.layer_idx != getattr(module, "layer_idx", None):
        raise RuntimeError(f"resa_tl: attention of layer {getattr(module, 'layer_idx', None)} "
                           f"follows the cache update of layer {layer.layer_idx}; this model "
                           "does not update its cache right before attending")
    cache, i = layer.owner, layer.layer_idx
    store, cfg = cache.store, cache.config
    B, H, T, D = query.shape
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("resa_tl takes 2D padding masks ([batch, tokens]); got a "
                         f"{attention_mask.dim()}D attention mask")
    if T == 1 and not cache.dense_one_token:
        q = query[:, :, 0].contiguous()
        if _torch_ops.use_registered_op(q):
            out = _torch_ops.hf_sparse_attention(
                q, store.k[i], store.v[i], store.kmin[i], store.kmax[i], store.seqlens[i],
                cfg.block_size, float(cfg.sparse_ratio), cfg.min_blocks, cfg.local_blocks,
                cfg.sink_blocks, scale, cache.backend, cache.refresh_in_select)
        else:                                 # eager: the cache's plans, launches only
            out = cache.attention.sparse(i, q, scale)
        return out.unsqueeze(1), None
    if attention_mask is not None:
        valid = attention_mask[:, -T:].to(device=query.device, dtype=torch.bool)
        if torch.compiler.is_compiling():
            raise NotImplementedError("a padded multi-token chunk cannot be compiled; run the "
                                      "prefill of a padded batch eagerly")
        if not bool(valid.all()):
            return _padded_chunk(cache, i, query, valid, scale), None
    q = query.transpose(1, 2).contiguous()
    rectification = T in cache.chunk_kernel_lengths   # the chunk lengths inside decoding
    if _torch_ops.use_registered_op(q):
        out = _torch_ops.hf_dense_attention(q, store.k[i], store.v[i], store.seqlens[i], scale,
                                            cache.backend, rectification)
    elif rectification and cache.attention.has_chunk_kernel(T):
        out = cache.attention.dense(i, q, scale)
    else:
        out = dense(q, store.k[i], store.v[i], store.seqlens[i], scale, cache.backend,
                    use_kernel=rectification)
    return out, None


_eager_attention = torch.compiler.disable(_attention)


def _padded_chunk(cache, i, query, valid, scale):
    """Compact the chunk's padding out of layer i, then run each row's real tokens densely."""
    cache.compact_chunk(i, valid)
    store = cache.store
    B, H, T, D = query.shape
    out = query.new_zeros(B, T, H, store.v[i].shape[-1])
    q = query.transpose(1, 2)                                          # [B, T, H, D]
    for b, n in enumerate(valid.sum(-1).tolist()):
        if n == 0:
            continue
        rows = valid[b].nonzero().squeeze(1)
        o = dense(q[b:b + 1, rows].contiguous(), store.k[i][b:b + 1], store.v[i][b:b + 1],
                  store.seqlens[i][b:b + 1], scale, cache.backend, use_kernel=False)
        out[b, rows] = o[0]
    return out


def _dense_without_cache(query, key, value, attention_mask, scale):
    """Plain causal attention for a forward that runs without a ReSA cache (use_cache=False)."""
    B, H, Tq, D = query.shape
    Tk = key.shape[2]
    g = H // key.shape[1]
    k = key.repeat_interleave(g, dim=1)
    v = value.repeat_interleave(g, dim=1)
    qi = torch.arange(Tq, device=query.device)[:, None] + (Tk - Tq)
    kj = torch.arange(Tk, device=query.device)[None]
    allowed = (kj <= qi)[None, None]                                   # [1, 1, Tq, Tk]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[-1] != Tk:
            raise ValueError("without a ReSA cache, resa_tl attention takes a 2D padding mask "
                             f"covering all {Tk} keys; got shape {tuple(attention_mask.shape)}")
        allowed = allowed & attention_mask.to(torch.bool)[:, None, None, :]
        allowed = allowed | (kj == qi)[None, None]        # a padding query attends to itself
    out = F.scaled_dot_product_attention(query, k, v, attn_mask=allowed, scale=scale)
    return out.transpose(1, 2), None


def resa_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
              mask_function=None, attention_mask=None, **kwargs):
    """AttentionMaskInterface function: the attention function needs only which tokens are
    padding, so the 2D mask goes through as a bool tensor (None: no padding)."""
    if attention_mask is None:
        return None
    return attention_mask.to(torch.bool)


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(IMPLEMENTATION, resa_attention)
    AttentionMaskInterface.register(IMPLEMENTATION, resa_mask)
    _REGISTERED = True


# ------------------------------------------------------------------------ generate() wrappers
CAPACITY_QUANTUM = 1024


def bucketed_capacity(model, needed: int) -> int:
    """Capacity of a cache generate() creates: ``needed`` rounded up to a multiple of
    CAPACITY_QUANTUM tokens. The block-selection kernel is compiled per number of blocks, so
    generate calls of slightly different lengths then share kernels (and CUDA graphs); at most
    one quantum of positions per row is spent on it. Never past a sliding window that
    ``needed`` fits in."""
    cap = -(-needed // CAPACITY_QUANTUM) * CAPACITY_QUANTUM
    windows = sliding_windows(text_config(model.config))
    if windows:
        cap = min(cap, max(needed, min(windows.values())))
    return cap


def lossless_slack(config: ReSAConfig) -> int:
    """Positions a cache needs beyond max_length - 1: the lossless mode's rows run up to a
    verify window (and its dense token) ahead of where the slowest row commits."""
    return max(config.verify_windows(), default=-1) + 1


def _wrap_prepare_cache(model, state: AttachState):
    original = model._prepare_cache_for_generation

    @functools.wraps(original)
    def _prepare_cache_for_generation(generation_config, model_kwargs, generation_mode,
                                      batch_size, max_cache_length, *args, **kwargs):
        _check_generation(generation_config, generation_mode)
        rows = max(generation_config.num_beams or 1,
                   generation_config.num_return_sequences or 1) * batch_size
        cache = model_kwargs.get("past_key_values")
        if cache is not None:
            if not isinstance(cache, ReSAHFCache):
                raise TypeError(f"with resa_tl attached, past_key_values must be a ReSAHFCache "
                                f"(resa_tl.integration.new_cache) or None; got "
                                f"{type(cache).__name__}")
            if cache.store.batch_size != rows:
                raise ValueError(f"the ReSA cache holds {cache.store.batch_size} rows; this "
                                 f"generate call needs {rows}")
            if max_cache_length > cache.max_cache_len:
                raise ValueError(f"generation needs up to {max_cache_length} cached tokens "
                                 f"(max_length - 1) but the ReSA cache holds "
                                 f"{cache.max_cache_len} (max_cache_len); the prompt plus "
                                 "max_new_tokens must fit the cache")
            _use_compiled_layers(model, state, not cache.compileable)
            return original(generation_config, model_kwargs, generation_mode, batch_size,
                            max_cache_length, *args, **kwargs)
        if generation_config.use_cache is False:
            raise ValueError("ReSA decoding needs the KV cache; generate(use_cache=False) is not "
                             "supported with resa_tl attached")
        impl = generation_config.cache_implementation
        if impl not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation={impl!r} is not supported with resa_tl "
                             "attached; use None (default) or 'static'")
        check_model(model, state.backend)
        capacity = bucketed_capacity(model, max_cache_length + lossless_slack(state.config))
        # Which cache: the default call (no cache_implementation, no compile_config) decodes in
        # resa_tl's loop (decode_loop) and reuses its cache, with the CUDA graphs recorded on
        # it, while rows and capacity fit; "static" is transformers' compiled loop, also
        # reused; "dynamic" a fresh cache for transformers' eager loop; a compile_config with
        # no cache_implementation a fresh compileable one (transformers compiles the step).
        if impl == "static":
            capacity = max(capacity, getattr(generation_config, "max_cache_len", None) or 0)
            slot, compileable = "static_cache", True
        elif impl is None and generation_config.compile_config is None:
            slot, compileable = "loop_cache", False
        else:
            slot, compileable = None, impl is None
        # transformers compiles a compileable cache's forward whole, with resa_tl's custom ops
        _use_compiled_layers(model, state, not compileable)
        if slot is not None:
            reuse = getattr(state, slot)
            if _fits(reuse, model, state, rows, capacity):
                reuse.reset()
                model_kwargs["past_key_values"] = reuse
                return
            setattr(state, slot, None)            # freed before the new one is allocated
            del reuse
        cache = new_cache(model, rows, capacity, compileable=compileable)
        if slot is not None:
            setattr(state, slot, cache)
        model_kwargs["past_key_values"] = cache

    return _prepare_cache_for_generation


def _use_compiled_layers(model, state: AttachState, on: bool) -> None:
    """With compile_layers: resa_tl's compiled layer calls for this generate() call (on), or
    the layers' own (off). The layers' own calls are taken when resa_tl's go in, not at
    attach, so a ``layer.compile()`` the user runs after attach is what comes back."""
    if state.compiled_layers is None:
        return
    if on and state.saved_layer_calls is None:
        state.saved_layer_calls = layer_calls(model)
        install(model, state.compiled_layers, True)
    elif not on and state.saved_layer_calls is not None:
        install(model, state.saved_layer_calls, False)
        state.saved_layer_calls = None


def _fits(cache, model, state: AttachState, rows: int, capacity: int) -> bool:
    """Whether a cache kept from an earlier generate() call can serve this one."""
    return (cache is not None and cache.store.batch_size == rows
            and cache.max_cache_len >= capacity and cache.config == state.config
            and cache.store.k[0].dtype == model.dtype and cache.store.device == model.device)


def _wrap_generate(model):
    """generate() with resa_tl's decoding loop (decode_loop.decode) as its decoding method,
    unless the caller picked one (custom_generate) or passed what a callable custom_generate
    does not receive (tokenizer, synced_gpus). The streamer travels as ``resa_streamer`` for
    the same reason. decode_loop.decode itself hands the call to transformers' loop where the
    generation config asks for it."""
    original = model.generate

    @functools.wraps(original)
    def generate(*args, **kwargs):
        try:
            if (kwargs.get("custom_generate") is not None or kwargs.get("synced_gpus")
                    or kwargs.get("tokenizer") is not None):
                return original(*args, **kwargs)
            streamer = kwargs.pop("streamer", None)
            return original(*args, custom_generate=decode_loop.decode, resa_streamer=streamer,
                            **kwargs)
        finally:                     # compiled layers (installed by the cache hook) end here
            state = attached_state(model)
            if state is not None:
                _use_compiled_layers(model, state, False)

    return generate


def _wrap_prepare_inputs(model):
    original = model.prepare_inputs_for_generation

    @functools.wraps(original)
    def prepare_inputs_for_generation(input_ids, next_sequence_length=None, past_key_values=None,
                                      attention_mask=None, inputs_embeds=None,
                                      is_first_iteration=False, **kwargs):
        cache = past_key_values
        call = functools.partial(original, input_ids, past_key_values=past_key_values,
                                 attention_mask=attention_mask, inputs_embeds=inputs_embeds,
                                 is_first_iteration=is_first_iteration, **kwargs)
        if not isinstance(cache, ReSAHFCache):
            return call(next_sequence_length=next_sequence_length)
        embeds = inputs_embeds is not None and is_first_iteration and not \
            model.config.is_encoder_decoder
        available = inputs_embeds.shape[1] if embeds else input_ids.shape[1]
        T = available if next_sequence_length is None else int(next_sequence_length)
        # Rectification, fused: re-feed the sparse tokens densely together with the new ones
        # (resa_tl.cycle), when generate's input_ids still hold them.
        fold = cache.cycle.rewind_before(
            T, can_refeed=not embeds and next_sequence_length is not None
            and input_ids.shape[1] >= T + cache.pending)
        n = T + fold
        # Padding: only a chunk holding prompt tokens can contain any (generated ones never do).
        padded = False
        if attention_mask is not None and T > 1:
            padded = not bool(attention_mask[:, -n:].to(torch.bool).all())
        cache.begin_step(T, rewind=fold)
        model_inputs = call(next_sequence_length=n if fold else next_sequence_length)
        if padded:
            model_inputs["attention_mask"] = attention_mask.to(torch.bool)
        else:
            model_inputs.pop("attention_mask", None)
        return model_inputs

    return prepare_inputs_for_generation


# ------------------------------------------------------------------------------- attach/detach
def attach(model, config: ReSAConfig | None = None, *, backend: str = "auto",
           compile_layers: bool = False, **overrides):
    """Make ``model.generate(...)`` decode with ReSA.

    Parameters
    ----------
    model : a transformers causal LM (Llama, Qwen2, Qwen3 or Mistral architecture).
    config : ReSAConfig, optional (paper defaults); ``**overrides`` replace some of its fields,
        e.g. ``attach(model, sparse_ratio=0.1, rectify_every=32)``.
    backend : "auto" (TileLang for fp16/bf16 CUDA models, torch otherwise), "tilelang", "torch".
    compile_layers : bool — torch.compile each decoder layer around ReSA's cache write and
        attention (:mod:`resa_tl.integration.layer_compile`): fuses the norms, RoPE and
        activations that the decode step otherwise runs as dozens of small kernels per layer;
        the first generate() compiles (about 25 s for a 7B model on an H100). Off by default:
        a shorter median step on an H100, but a second call's mean per token not yet measured
        (see docs/performance.md). Not under tensor parallelism.

    Returns the model. Attaching again replaces the configuration. Raises ValueError / TypeError
    for unsupported architectures, dtypes, head dims and backends.
    """
    if config is None:
        config = ReSAConfig()
    elif not isinstance(config, ReSAConfig):
        raise TypeError(f"config must be a resa_tl.ReSAConfig, got {type(config).__name__}")
    if overrides:
        config = config.replace(**overrides)
    if not isinstance(compile_layers, bool):
        raise TypeError(f"compile_layers must be a bool, got {compile_layers!r}")
    if compile_layers and (getattr(model, "tp_size", None) or 1) > 1:
        raise ValueError("compile_layers=True is not supported under tensor parallelism")
    check_model(model, backend)
    if attached_state(model) is not None:
        detach(model)
    _register()
    previous = model.config._attn_implementation
    state = AttachState(config=config, backend=backend, previous_implementation=previous,
                        saved_attributes={n: model.__dict__.get(n, _MISSING) for n in _WRAPPED})
    model.set_attn_implementation(IMPLEMENTATION)
    model.__dict__["generate"] = _wrap_generate(model)
    model.__dict__["prepare_inputs_for_generation"] = _wrap_prepare_inputs(model)
    model.__dict__["_prepare_cache_for_generation"] = _wrap_prepare_cache(model, state)
    model.__dict__["_resa_state"] = state
    if compile_layers:
        state.compiled_layers = compile_layers_of(model)
    return model


def detach(model):
    """Undo :func:`attach`: the previous attention implementation and the model's own
    ``prepare_inputs_for_generation`` / ``_prepare_cache_for_generation`` come back. Returns
    the model."""
    state = attached_state(model)
    if state is None:
        raise ValueError("resa_tl is not attached to this model")
    model.set_attn_implementation(state.previous_implementation)
    _use_compiled_layers(model, state, False)
    for name, saved in state.saved_attributes.items():
        if saved is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = saved
    del model.__dict__["_resa_state"]
    return model
