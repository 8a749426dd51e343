"""An eager decode step of an attached model only launches: its plans are resolved once per
cache, so the step does no schedule lookup, no argument checks, builds no ReSAConfig, plans
nothing new and writes into the plans' own output buffers. Run on the CPU as on an sm_90a GPU
(resa_tl.precompile.fake_hopper: meta tensors, kernels compiled, launches skipped), so it
needs nvcc (marker ``compile``)."""
import pytest
import torch

import resa_tl
from resa_tl import _checks, ops, plan, schedules
from resa_tl.config import ReSAConfig
from resa_tl.integration import new_cache
from resa_tl.integration.hf import resa_attention

pytestmark = pytest.mark.compile


def _model(layers=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=128, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
                      head_dim=64, max_position_embeddings=4096, use_sliding_window=False)
    return Qwen2ForCausalLM(cfg).to(device="meta", dtype=torch.bfloat16).eval()


@pytest.mark.parametrize("overrides", [{}, {"sparse_ratio": 1.0, "rectify_every": 0}],
                         ids=["sparse", "full-density"])
def test_eager_step_resolves_nothing(monkeypatch, overrides):
    from resa_tl.precompile import fake_hopper
    calls = []

    def counting(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    with fake_hopper(), torch.no_grad():
        model = resa_tl.attach(_model(), **overrides)
        cache = new_cache(model, 2, 1024)            # plans resolved here (and kernels built)
        B, H, Hkv, D = 2, 4, 1, 64
        q = torch.empty(B, H, 1, D, device="meta", dtype=torch.bfloat16)
        kv = torch.empty(B, Hkv, 1, D, device="meta", dtype=torch.bfloat16)
        attn = [layer.self_attn for layer in model.model.layers]

        def step():
            cache.begin_step(1)
            outs = []
            for module in attn:
                k, v = cache.layers[module.layer_idx].update(kv, kv)
                outs.append(resa_attention(module, q, k, v, None, scaling=D ** -0.5)[0])
            return outs

        step()                                       # anything lazy happens here
        monkeypatch.setattr(schedules, "config_for", counting("config_for", schedules.config_for))
        monkeypatch.setattr(plan, "_memo", counting("plan", plan._memo))
        monkeypatch.setattr(ReSAConfig, "__post_init__",
                            counting("ReSAConfig", ReSAConfig.__post_init__))
        for name in ("select_blocks", "sparse_decode", "dense_decode", "update_block_summaries"):
            monkeypatch.setattr(ops, name, counting(f"ops.{name}", getattr(ops, name)))
        for name in ("tensor", "seqlens", "summaries", "kv_caches"):
            monkeypatch.setattr(_checks, name, counting(f"check.{name}", getattr(_checks, name)))
        outs = step()
        assert calls == [], f"an eager step resolved or checked: {sorted(set(calls))}"
        sa = cache.attention
        p = sa._dense if sa.full_density else sa._sparse
        assert all(o.data_ptr() == p.out.data_ptr() for o in outs), \
            "eager steps write into the plan's output buffer"
