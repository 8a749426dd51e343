"""resa_tl.fidelity's layer-parallel teacher forcing equals decoding the same tokens one at a
time through resa_tl.attach + model.generate (forced tokens, logits recorded per step)."""
import itertools

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


@pytest.mark.parametrize("f,sink", [(0, 0), (5, 0), (5, 1)])
def test_teacher_forced_simulation_equals_generate(f, sink):
    m = model()
    L, N = 150, 24
    ids = torch.randint(0, 300, (L + N + 1,), generator=torch.Generator().manual_seed(1))
    cfg = ReSAConfig(sparse_ratio=0.25, min_blocks=2, local_blocks=1, rectify_every=f,
                     sink_blocks=sink)
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
    if sink:                                                             # and so did the sink
        no_sink = teacher_forced_logits(m, ids, L, {"resa": cfg.replace(sink_blocks=0)},
                                        backend="torch")["resa"]
        assert (no_sink[:N] - want).abs().max() > 1e-3 * scale


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


# --- diagnostic selection rules -----------------------------------------------------------

def _selection_inputs(R=5, Hkv=2, g=3, D=16, S=150, bs=16, seed=3):
    from resa_tl.kernels.block_summaries import block_summaries_reference
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(R, Hkv * g, D, generator=gen) * 2
    k = torch.randn(1, S, Hkv, D, generator=gen)
    lens = torch.tensor([S, S - 7, 40, 17, 1][:R], dtype=torch.int32)
    kx = k.expand(R, S, Hkv, D)
    kmin, kmax = block_summaries_reference(kx.contiguous(), lens, bs)
    return q, k, kx, kmin, kmax, lens


def test_exact_block_mass():
    from resa_tl.fidelity import exact_block_mass
    q, k, kx, _, _, lens = _selection_inputs()
    R, H, D = q.shape
    Hkv, g, bs = k.shape[2], H // k.shape[2], 16
    mass = exact_block_mass(q, k, lens, bs, 0.3)
    assert torch.allclose(exact_block_mass(q, kx, lens, bs, 0.3), mass, atol=1e-6)
    for r in range(R):                                  # one row, one head at a time
        n = int(lens[r])
        for h in range(H):
            p = torch.softmax((q[r, h].double() @ k[0, :n, h // g].double().T) * 0.3, -1)
            blocks = torch.nn.functional.pad(p, (0, -n % bs)).view(-1, bs).sum(-1)
            mass[r, h // g, :blocks.shape[0]] -= blocks.float()
        assert mass[r, :, -(-n // bs):].abs().sum() == 0      # nothing past the row's end
    assert mass.abs().max() < 1e-5                      # every head's mass, summed per group


@pytest.mark.parametrize("rule", ["upper_bound", "sink", "oracle", "int8_summaries", "head_max",
                                  "head_sum", "head_max+sink", "head_sum+sink"])
def test_diagnostic_select(rule):
    from resa_tl import ops
    from resa_tl.fidelity import diagnostic_select, exact_block_mass
    q, k, kx, kmin, kmax, lens = _selection_inputs()
    cfg = ReSAConfig(sparse_ratio=0.2, min_blocks=2, local_blocks=1, sink_blocks=0)   # the paper's
    got = diagnostic_select(rule, q, kmin, kmax, k, lens, cfg, 0.25)
    paper = ops.select_blocks(q, kmin, kmax, lens, block_size=16, sparse_ratio=0.2,
                              min_blocks=2, local_blocks=1, backend="torch")
    assert got.dtype == torch.int32 and got.shape == paper.shape
    assert torch.equal(got >= 0, paper >= 0)            # same budget per row
    nvalid = (lens + 15) // 16
    for r in range(q.shape[0]):
        for h in range(k.shape[2]):
            ids = got[r, h][got[r, h] >= 0].tolist()
            assert ids == sorted(set(ids)) and int(nvalid[r]) - 1 in ids    # newest block
            if rule == "upper_bound":
                assert torch.equal(got[r, h], paper[r, h])
            if rule.endswith("sink"):
                assert 0 in ids
            if rule == "oracle":                        # the most massive non-local blocks
                m = exact_block_mass(q, k, lens, 16, 0.25)[r, h, :int(nvalid[r]) - 1]
                rest = m[[i for i in range(m.shape[0]) if i not in ids]]
                kept = m[[i for i in ids if i < m.shape[0]]]
                if rest.numel() and kept.numel():
                    assert kept.min() >= rest.max()
    if rule == "oracle":
        assert not torch.equal(got, paper)              # the inputs do tell the rules apart
    if rule == "sink":                                  # = the kernels' rule with one sink block
        assert torch.equal(got, ops.select_blocks(q, kmin, kmax, lens, block_size=16,
                                                  sparse_ratio=0.2, min_blocks=2, local_blocks=1,
                                                  sink_blocks=1, backend="torch"))
    if rule in ("head_max", "head_sum"):                # g = 3: not the group-mean rule
        assert not torch.equal(got, paper)
    with pytest.raises(ValueError, match="selection"):
        diagnostic_select("best", q, kmin, kmax, k, lens, cfg, 0.25)


def test_head_rules_with_one_head_per_group_are_the_paper_rule():
    from resa_tl.fidelity import diagnostic_select, head_bound_scores
    from resa_tl.kernels.select_blocks import block_scores_reference
    q, k, kx, kmin, kmax, lens = _selection_inputs(Hkv=3, g=1)
    cfg = ReSAConfig(sparse_ratio=0.2, min_blocks=2, local_blocks=1)
    ref = block_scores_reference(q, kmin, kmax, lens, 16, 0)
    for fold in ("max", "sum"):
        got = head_bound_scores(q, kmin, kmax, fold)
        fin = torch.isfinite(ref)
        assert torch.allclose(got[fin], ref[fin], rtol=1e-5, atol=1e-5)
    want = diagnostic_select("upper_bound", q, kmin, kmax, k, lens, cfg, 0.25)
    for rule in ("head_max", "head_sum"):
        assert torch.equal(diagnostic_select(rule, q, kmin, kmax, k, lens, cfg, 0.25), want)
    want = diagnostic_select("sink", q, kmin, kmax, k, lens, cfg, 0.25)
    for rule in ("head_max+sink", "head_sum+sink"):
        assert torch.equal(diagnostic_select(rule, q, kmin, kmax, k, lens, cfg, 0.25), want)


def test_head_bounds_bound_the_logits():
    """head_max >= every query head's largest logit in the block; head_sum >= the sum over heads
    of each one's largest logit >= g x the group-mean bound, equal to it where the heads' query
    signs agree in every dimension."""
    from resa_tl.fidelity import head_bound_scores
    from resa_tl.kernels.select_blocks import block_scores_reference
    q, k, kx, kmin, kmax, lens = _selection_inputs()
    R, H, D = q.shape
    Hkv, bs = k.shape[2], 16
    g = H // Hkv
    hmax, hsum = head_bound_scores(q, kmin, kmax, "max"), head_bound_scores(q, kmin, kmax, "sum")
    mean = block_scores_reference(q, kmin, kmax, lens, bs, 0)
    logits = torch.einsum("rhd,shd->rhs", q.view(R, Hkv, g, D).reshape(R, H, D).double(),
                          k[0].repeat_interleave(g, dim=1).double()) * D ** -0.5   # [R, H, S]
    tol = 1e-4
    strict = 0
    for r in range(R):
        n = int(lens[r])
        for b in range(-(-n // bs)):
            blk = logits[r, :, b * bs:min(n, (b + 1) * bs)].amax(-1).view(Hkv, g)   # [Hkv, g]
            assert (hmax[r, :, b] >= blk.amax(-1) - tol).all()
            assert (hsum[r, :, b] >= blk.sum(-1) - tol).all()
            assert (hsum[r, :, b] >= g * mean[r, :, b] - tol).all()
            strict += int((hsum[r, :, b] > g * mean[r, :, b] + 1e-3).sum())
    assert strict > 0                                   # random signs: the choice differs
    same = q.abs() * torch.randn(1, Hkv, 1, D).sign().repeat_interleave(g, 1).view(1, H, D)
    assert torch.allclose(head_bound_scores(same, kmin, kmax, "sum")[torch.isfinite(mean)],
                          g * block_scores_reference(same, kmin, kmax, lens, bs, 0)[
                              torch.isfinite(mean)], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="fold"):
        head_bound_scores(q, kmin, kmax, "min")


def test_selected_mass_and_recall_bounds():
    """No selection of the oracle's size keeps more exact mass than the oracle; the lowest-mass
    blocks keep less."""
    from resa_tl.fidelity import SELECTIONS, diagnostic_select, exact_block_mass, selected_mass
    q, k, kx, kmin, kmax, lens = _selection_inputs()
    cfg = ReSAConfig(sparse_ratio=0.2, min_blocks=2, local_blocks=1)
    mass = exact_block_mass(q, k, lens, 16, 0.25)
    best = selected_mass(mass, diagnostic_select("oracle", q, kmin, kmax, k, lens, cfg, 0.25))
    assert (best > 0).all() and (best <= 3 + 1e-5).all()        # g = 3 heads, each sums to 1
    # all blocks: every head's whole softmax
    full = ReSAConfig(sparse_ratio=1.0, min_blocks=1, local_blocks=1)
    every = selected_mass(mass, diagnostic_select("oracle", q, kmin, kmax, k, lens, full, 0.25))
    assert torch.allclose(every, torch.full_like(every, 3.0), atol=1e-5)
    for rule, c in itertools.product(SELECTIONS, (cfg, cfg.replace(sink_blocks=0))):
        got = selected_mass(mass, diagnostic_select(rule, q, kmin, kmax, k, lens, c, 0.25))
        assert (got <= best + 1e-6).all() and (got > 0).all()
    # a deliberately bad rule: the least massive blocks (the newest still forced)
    bad_scores = torch.where(mass > 0, -mass, float("-inf"))
    nvalid = (lens.long() + 15) // 16
    bad_scores[torch.arange(5), :, nvalid - 1] = float("inf")
    from resa_tl.kernels.select_blocks import default_max_selected, select_from_scores_reference
    K = default_max_selected(kmin.shape[1], 0.2, 2)
    bad = select_from_scores_reference(bad_scores, lens, block_size=16, sparse_ratio=0.2,
                                       min_blocks=2, max_selected=K)
    recall = selected_mass(mass, bad) / best
    assert recall[0].max() < 0.9                       # the full rows lose mass
    assert (recall <= 1 + 1e-6).all() and (recall > 0).all()


def test_int8_summaries_bound():
    from resa_tl.fidelity import int8_summaries
    g = torch.Generator().manual_seed(7)
    lo = torch.randn(3, 50, 2, 64, generator=g) * 10 ** torch.empty(1, 1, 2, 64).uniform_(
        -4, 3, generator=g)
    hi = lo + torch.rand(3, 50, 2, 64, generator=g) * lo.abs()
    qlo, qhi = int8_summaries(lo, hi)
    assert (qlo <= lo).all() and (qhi >= hi).all()
    scale = torch.maximum(lo.abs(), hi.abs()).amax(-1, keepdim=True) / 127
    assert ((lo - qlo) <= scale * 1.0001).all() and ((qhi - hi) <= scale * 1.0001).all()


def test_diagnostic_selections_in_teacher_forcing():
    m = model()
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(2))
    full = ReSAConfig(sparse_ratio=1.0, min_blocks=1)
    part = ReSAConfig(sparse_ratio=0.1, min_blocks=1, rectify_every=8)
    cfgs = {"full-oracle": full, "full-sink": full, "paper": part, "oracle": part}
    sels = {"full-oracle": "oracle", "full-sink": "sink", "oracle": "oracle"}
    out = teacher_forced_logits(m, ids, 120, cfgs, backend="torch", selections=sels)
    scale = out["dense"].abs().max()
    for name in ("full-oracle", "full-sink"):           # nothing dropped: dense, any rule
        assert (out[name] - out["dense"]).abs().max() <= 1e-4 * scale
    assert (out["oracle"] - out["paper"]).abs().max() > 1e-3 * scale
    stats = nll_and_agreement(out, ids, 120)            # the oracle is the closer to dense
    assert stats["oracle"][1].float().mean() >= stats["paper"][1].float().mean()
    with pytest.raises(ValueError, match="selections"):
        teacher_forced_logits(m, ids, 120, cfgs, selections={"paper": "best"})


def test_recall_in_teacher_forcing():
    m = model()
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(2))
    full = ReSAConfig(sparse_ratio=1.0, min_blocks=1)
    # min_blocks 2: the budget holds the newest block and the sink block; "paper": no sink
    part = ReSAConfig(sparse_ratio=0.1, min_blocks=2, rectify_every=8, sink_blocks=0)
    cfgs = {"full": full, "paper": part, "oracle": part, "head_max": part, "head_sum+sink": part}
    sels = {"oracle": "oracle", "head_max": "head_max", "head_sum+sink": "head_sum+sink"}
    rec = {}
    plain = teacher_forced_logits(m, ids, 120, {"paper": part}, backend="torch")
    out = teacher_forced_logits(m, ids, 120, cfgs, backend="torch", selections=sels, recall=rec)
    assert torch.equal(out["paper"], plain["paper"])    # measuring does not change the result
    assert set(rec) == set(cfgs)
    for name, r in rec.items():                         # 80 decoded, every (f+1)-th dense
        f = cfgs[name].rectify_every
        assert r["steps"] == 80 - 80 // (f + 1) and len(r["recall_per_layer"]) == 3
        assert 0 < r["recall"] <= 1 + 1e-6 and 0 < r["mass"] <= 1 + 1e-6
        assert all(0 < x <= 1 + 1e-6 for x in r["recall_per_layer"])
    assert abs(rec["full"]["recall"] - 1) < 1e-6 and abs(rec["full"]["mass"] - 1) < 1e-5
    assert abs(rec["oracle"]["recall"] - 1) < 1e-6
    assert rec["oracle"]["mass"] < 1 - 1e-3              # keep 10%: the oracle drops mass too
    assert rec["paper"]["recall"] < 1 - 1e-3
    assert rec["paper"]["mass"] < rec["oracle"]["mass"]


# --- K/V drift -----------------------------------------------------------------------------

def test_kv_errors_drift_and_rectification():
    m = model()
    L, N, f = 150, 40, 5
    ids = torch.randint(0, 300, (L + N,), generator=torch.Generator().manual_seed(4))
    cfgs = {"full": ReSAConfig(sparse_ratio=1.0, min_blocks=1),
            "sparse-only": ReSAConfig(sparse_ratio=0.2, min_blocks=2, rectify_every=0),
            "resa": ReSAConfig(sparse_ratio=0.2, min_blocks=2, rectify_every=f)}
    errs = {}
    out = teacher_forced_logits(m, ids, L, cfgs, backend="torch", kv_errors=errs)
    assert set(errs) == set(cfgs)
    for e in errs.values():
        assert e.shape == (3, 2, N) and e.dtype == torch.float32 and (e >= 0).all()
        assert e[0].max() <= 1e-6          # layer 0's K/V come from the embeddings alone
    assert errs["full"].max() <= 1e-5      # nothing dropped: the dense K/V
    rect = torch.arange(N) % (f + 1) == f  # positions fed by a rectification step
    assert errs["resa"][:, :, rect].max() <= 1e-5
    assert errs["sparse-only"][1:, :, rect].min() > 1e-4
    # every sparse step writes approximate K or V somewhere past layer 0
    assert errs["resa"][1:, :, ~rect].amax((0, 1)).min() > 1e-3
    # the first cycle is the same computation with and without rectification
    assert torch.equal(errs["resa"][:, :, :f], errs["sparse-only"][:, :, :f])
    # (this toy model's sharpened random attention saturates the error near 1 on every sparse
    # step, so how the drift grows is measured on the real model: examples/fidelity.py --kv-drift)
    assert (out["full"] - out["dense"]).abs().max() <= 1e-4 * out["dense"].abs().max()


def test_relative_kv_error_definition():
    """One norm over all KV heads and dims per position, relative to the dense K/V; K first."""
    from resa_tl import fidelity
    L, N, Hkv, D = 7, 5, 3, 4
    gen = torch.Generator().manual_seed(5)
    kd = torch.randn(1, Hkv, L + N, D, generator=gen)
    vd = torch.randn(1, Hkv, L + N, D, generator=gen)
    scale = torch.tensor([1.5, 1.0, 0.8])[None, :, None, None]     # per-head error 50%, 0, 20%
    k_sim = kd[:, :, L:] * scale
    state = fidelity._state
    saved = (state.prompt_len, state.dense_k, state.dense_v)
    try:
        state.prompt_len, state.dense_k, state.dense_v = L, {0: kd}, {0: vd}
        got = fidelity._relative_kv_error(0, k_sim, vd[:, :, L:].clone())
    finally:
        state.prompt_len, state.dense_k, state.dense_v = saved
    ref = kd[0, :, L:]                                               # [Hkv, N, D]
    want = ((scale[0] - 1) ** 2 * ref ** 2).sum((0, 2)).sqrt() / (ref ** 2).sum((0, 2)).sqrt()
    assert got.shape == (2, N)
    assert torch.allclose(got[0], want, rtol=1e-5, atol=0)
    assert got[1].abs().max() == 0                                  # V is the dense V
