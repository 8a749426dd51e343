"""attach(compile_layers=True): each decoder layer torch.compiled around ReSA's cache write and
attention (resa_tl.integration.layer_compile). CPU, torch backend, inductor's CPU code: the same
tokens and logits as the eager layers, one compiled code for all layers, nothing compiled again
for a new prompt length, and the layers uncompiled by detach and for transformers' own
compiled path."""
import pytest
import torch
import torch._dynamo
from transformers import LogitsProcessor, LogitsProcessorList

import resa_tl
from resa_tl.integration.layer_compile import EAGER_ATTENTION, decoder_layers, layer_calls

from test_attach import GEN, left_padded, make_model

CFG = dict(sparse_ratio=0.25, min_blocks=2, rectify_every=4)


def graphs():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


class LayersSeen(LogitsProcessor):
    """Whether the model's layers ran compiled (and attention eager) during generation."""

    def __init__(self, model):
        self.model, self.seen = model, set()

    def __call__(self, input_ids, scores):
        self.seen.update((layer._compiled_call_impl is not None,
                          getattr(layer.self_attn, EAGER_ATTENTION, False))
                         for layer in decoder_layers(self.model))
        return scores


def generate(model, ids, mask=None, n=12, **kw):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, **GEN,
                              return_dict_in_generate=True, output_logits=True, **kw)


def plain(model):
    """The layers as the model has them outside generate()."""
    return all(layer._compiled_call_impl is None and not hasattr(layer.self_attn, EAGER_ATTENTION)
               for layer in decoder_layers(model))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_compiled_layers_equal_eager_and_share_one_code(arch):
    torch._dynamo.reset()
    ids, mask = left_padded([37, 21])
    counts = []
    for layers in (2, 4):
        model = make_model(arch, layers=layers)
        resa_tl.attach(model, compile_layers=False, **CFG)
        eager = generate(model, ids, mask)
        resa_tl.attach(model, compile_layers=True, **CFG)
        assert plain(model)                           # installed per generate() call only
        before = graphs()
        seen = LayersSeen(model)
        out = generate(model, ids, mask, logits_processor=LogitsProcessorList([seen]))
        counts.append(graphs() - before)
        assert seen.seen == {(True, True)} and plain(model)
        assert torch.equal(out.sequences, eager.sequences)
        for a, b in zip(out.logits, eager.logits):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        # other prompt lengths, same batch: the dynamic code serves them, no new graph
        before = graphs()
        generate(model, *left_padded([29, 33], seed=1), n=9)
        assert graphs() == before, "a new prompt length compiled again"
        resa_tl.detach(model)
        assert plain(model)
        torch._dynamo.reset()
    assert counts[0] > 0 and counts[0] == counts[1], \
        f"compiled graphs grow with the layer count: {counts} for 2 and 4 layers"


def test_compiled_layers_lossless_and_static_path():
    """The lossless mode through compiled layers gives dense greedy output; the static-cache
    path (transformers compiles the forward itself) runs the layers uncompiled, and the next
    default call compiles them again."""
    torch._dynamo.reset()
    model = make_model("llama", layers=2)
    ids = torch.randint(3, 96, (2, 40), generator=torch.Generator().manual_seed(5))
    dense = generate(model, ids, n=20).sequences
    resa_tl.attach(model, compile_layers=True, lossless=True, **CFG)
    assert torch.equal(generate(model, ids, n=20).sequences, dense)
    resa_tl.attach(model, compile_layers=True, **CFG)
    static, default = LayersSeen(model), LayersSeen(model)
    generate(model, ids, n=4, cache_implementation="static",
             logits_processor=LogitsProcessorList([static]))
    assert static.seen == {(False, False)}
    generate(model, ids, n=4, logits_processor=LogitsProcessorList([default]))
    assert default.seen == {(True, True)}
    resa_tl.detach(model)


def test_a_users_own_layer_compile_is_kept():
    """A layer the user compiled keeps its compiled call outside resa_tl's generate() calls and
    after detach, whether compiled before attach or after it."""
    model = make_model("llama", layers=2)

    def compile_mine():
        mine = [torch.compile(layer._call_impl) for layer in decoder_layers(model)]
        for layer, call in zip(decoder_layers(model), mine):
            layer._compiled_call_impl = call
        return mine

    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(2))
    mine = compile_mine()
    resa_tl.attach(model, compile_layers=True, **CFG)
    assert layer_calls(model) == mine
    seen = LayersSeen(model)
    generate(model, ids, n=3, logits_processor=LogitsProcessorList([seen]))
    assert layer_calls(model) == mine and seen.seen == {(True, True)}
    mine = compile_mine()                               # compiled again after attach
    generate(model, ids, n=3)
    assert layer_calls(model) == mine
    resa_tl.detach(model)
    assert layer_calls(model) == mine


def test_compile_layers_default_and_bad_value():
    model = make_model("llama", layers=1)
    resa_tl.attach(model)                              # off by default
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    with pytest.raises(TypeError, match="compile_layers"):
        resa_tl.attach(model, compile_layers="yes")
    model._tp_size = 2                                  # as loading with a tp_plan sets it
    with pytest.raises(ValueError, match="tensor parallelism"):
        resa_tl.attach(model, compile_layers=True)
    model._tp_size = None
    resa_tl.detach(model)
