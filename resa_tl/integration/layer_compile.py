"""torch.compile of the model's decoder layers around ReSA's attention (``attach(...,
compile_layers=True)``), for resa_tl's decode loop and transformers' eager one.

A decode step inside resa_tl's CUDA graph is the model's own eager code, captured as it is. In a
transformers decoder layer that is dozens of small kernels besides attention: RMSNorm in about
eight (casts, pow, mean, rsqrt, two muls), RoPE in about ten per tensor, SiLU and the gate
product, the residual adds. At decode batch sizes each costs a few microseconds of GPU time
however little it computes, which adds up to milliseconds per token over 28 layers.
torch.compile fuses them into a few Triton kernels per layer.

Each decoder layer is compiled in place (``nn.Module.compile``) with two holes left eager: the
cache write (``ReSAHFCache.update``) and the attention function (``resa_attention``), which
launch TileLang kernels from plans resolved on the host. Dynamo stops at both
(``torch.compiler.disable``) and compiles the pieces between them: the input norm, the q/k/v
projections with RoPE, the output projection, and the residuals with the MLP and its norm.
Shapes are dynamic except the sizes 1 that torch specialises, so one compile serves every
prompt chunk, rectification and verify length, and the one-token step has its own; the layers
share one compiled code (the layer index is read as a symbolic int, see ``_call``). Compiling
happens at the first forward of each kind (the prompt, the first decode step), never inside a
CUDA-graph capture: the loop records a step only after the same step has run eagerly.

The compiled calls are installed only for a generate() call that decodes with a ReSA cache
transformers does not compile itself, and the layers' own calls come back when it returns
(:func:`install`), so other forwards of the model and a user's own ``layer.compile()`` are left
as they were. Transformers' compiled path (``cache_implementation="static"`` or a
``compile_config``) compiles the whole forward itself with resa_tl's custom ops.
"""
from __future__ import annotations

import torch
from torch import nn

EAGER_ATTENTION = "_resa_tl_eager_attention"      # attention-module flag read by resa_attention


def decoder_layers(model) -> nn.ModuleList:
    """The model's decoder layers (the ModuleList with one entry per hidden layer)."""
    n = model.config.get_text_config(decoder=True).num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and all(
                hasattr(layer, "self_attn") for layer in module):
            return module
    raise ValueError(f"resa_tl: compile_layers found no list of {n} decoder layers with a "
                     f"self_attn in {type(model).__name__}")


def _call(compiled):
    """The layer's call through its compiled code. Layer modules differ in their int attributes
    (layer_idx); read as symbolic ints, all layers share one compiled graph instead of one each
    (which would also exceed dynamo's recompile limit)."""
    def call(*args, **kwargs):
        with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
            return compiled(*args, **kwargs)
    return call


def compile_layers(model) -> list:
    """torch.compile wrappers of every decoder layer's call (nothing compiles until the first
    forward through them), kept by the attach state so that installing them again recompiles
    nothing."""
    return [_call(torch.compile(layer._call_impl, dynamic=True))
            for layer in decoder_layers(model)]


def layer_calls(model) -> list:
    """The layers' current compiled calls (None where a layer has none): what
    :func:`install` puts back."""
    return [layer._compiled_call_impl for layer in decoder_layers(model)]


def install(model, calls: list, eager_attention: bool) -> None:
    """Make ``calls`` the layers' calls (``nn.Module._compiled_call_impl``; None: the plain
    call). ``eager_attention``: the calls are resa_tl's compiled ones, around which ReSA's
    attention must stay eager (resa_attention reads the flag)."""
    for layer, call in zip(decoder_layers(model), calls):
        layer._compiled_call_impl = call
        if eager_attention:
            setattr(layer.self_attn, EAGER_ATTENTION, True)
        else:
            layer.self_attn.__dict__.pop(EAGER_ATTENTION, None)
