"""resa_tl.fidelity's layer-parallel teacher forcing equals decoding the same tokens one at a
time through resa_tl.attach + model.generate (forced tokens, logits recorded per step)."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessor, LogitsProcessorList

import resa_tl
from resa_tl import ReSAConfig
from resa_tl.fidelity import nll_and_agreement, perplexity, teacher_forced_logits


class ForceAndRecord(LogitsProcessor):
    """Records the model's logits, then forces the true next token."""

    def __init__(self, targets):
        self.targets, self.seen = targets, []

    def __call__(self, input_ids, scores):
        self.seen.append(scores[0].float().clone())
        forced = torch.full_like(scores, float("-inf"))
        forced[0, self.targets[len(self.seen) - 1]] = 0
        return forced


def model():
    cfg = LlamaConfig(vocab_size=300, hidden_size=192, intermediate_size=256, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=1024)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():                      # sharper attention than the default init
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return m


@pytest.mark.parametrize("f", [0, 5])
def test_teacher_forced_simulation_equals_generate(f):
    m = model()
    L, N = 150, 24
    ids = torch.randint(0, 300, (L + N + 1,), generator=torch.Generator().manual_seed(1))
    cfg = ReSAConfig(sparse_ratio=0.25, min_blocks=2, local_blocks=1, rectify_every=f)
    sim = teacher_forced_logits(m, ids, L, {"resa": cfg}, backend="torch")
    # generate(): step i's logits come from the forward that fed position L+i-1; the first one
    # is the prefill's. Row i of the simulation is the forward that fed position L+i.
    rec = ForceAndRecord(ids[L:].tolist())
    resa_tl.attach(m, cfg, backend="torch")
    try:
        m.generate(ids[:L][None], max_new_tokens=N + 1, min_new_tokens=N + 1, do_sample=False,
                   logits_processor=LogitsProcessorList([rec]))
    finally:
        resa_tl.detach(m)
    got = torch.stack(rec.seen[1:])                                      # [N, vocab]
    want = sim["resa"][:N]
    scale = want.abs().max()
    live = torch.isfinite(got)         # generate's own processors (min_new_tokens) -inf the EOS
    assert live.float().mean() > 0.99
    assert (got - want)[live].abs().max() <= 1e-4 * scale
    assert (sim["resa"] - sim["dense"]).abs().max() > 1e-3 * scale      # sparsity did matter


def test_full_density_equals_dense_and_stats():
    m = model()
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(2))
    out = teacher_forced_logits(m, ids, 120, {"full": ReSAConfig(sparse_ratio=1.0, min_blocks=1)},
                                backend="torch")
    assert (out["full"] - out["dense"]).abs().max() <= 1e-4 * out["dense"].abs().max()
    stats = nll_and_agreement(out, ids, 120)
    assert stats["full"][1].all()
    assert abs(perplexity(stats["full"][0]) / perplexity(stats["dense"][0]) - 1) < 1e-4
    with pytest.raises(ValueError, match="prompt_len"):
        teacher_forced_logits(m, ids, 0, {})
