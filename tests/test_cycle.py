"""The reference decode cycle: rectification makes the cache equal a dense recompute; with
ratio 1 the cycle is dense decoding."""
import torch

from resa_tl import ReSAConfig
from resa_tl.reference_cycle import ToyAttentionModel, dense_recompute, run_decode_cycle

LENGTHS = [300, 251, 170]


def setup(g=3):
    model = ToyAttentionModel(num_layers=3, num_heads=2 * g, num_kv_heads=2, head_dim=16, seed=1)
    prompt = torch.randint(0, 97, (3, 300), generator=torch.Generator().manual_seed(0))
    return model, prompt


def compare(cache, fed, dense):
    worst = 0.0
    for layer in range(cache.num_layers):
        for b, row in enumerate(fed):
            n = len(row)
            for got, ref in ((cache.k, dense.k), (cache.v, dense.v)):
                worst = max(worst, (got[layer][b, :n] - ref[layer][b, :n]).abs().max().item())
    return worst


def test_after_every_rectification_kv_equal_dense_recompute():
    model, prompt = setup()
    cfg = ReSAConfig(sparse_ratio=0.1, min_blocks=2, rectify_every=8)
    snaps = []
    steps = 44
    res = run_decode_cycle(model, prompt, LENGTHS, steps, cfg)
    assert res.dense_steps == [8, 17, 26, 35]
    # Re-run to each rectification point and compare the whole cache there.
    for step, fed in res.snapshots:
        part = run_decode_cycle(model, prompt, LENGTHS, step + 1, cfg)
        assert [len(r) for r in fed] == part.cache.lengths(0).tolist()
        dense = dense_recompute(model, fed, cfg)
        assert compare(part.cache, fed, dense) < 1e-4
    # Between rectifications the sparse steps really drift (so the check above means something).
    final_fed = [list(res.snapshots[-1][1][b]) + res.tokens[b, 36:].tolist() for b in range(3)]
    final_fed = [r[:-1] for r in final_fed]                         # last token not yet fed
    drift = compare(res.cache, final_fed, dense_recompute(model, final_fed, cfg))
    assert drift > 1e-3


def test_ratio_one_equals_dense_decoding():
    model, prompt = setup(g=2)
    cfg = ReSAConfig(sparse_ratio=1.0, min_blocks=1, rectify_every=8)
    dense = run_decode_cycle(model, prompt, LENGTHS, 30, cfg, mode="dense")
    resa = run_decode_cycle(model, prompt, LENGTHS, 30, cfg)
    assert torch.equal(dense.tokens, resa.tokens)
    for layer in range(3):
        for b, n in enumerate(resa.cache.lengths(layer).tolist()):
            assert torch.allclose(resa.cache.k[layer][b, :n], dense.cache.k[layer][b, :n], atol=1e-4)


def test_sparse_only_never_rectifies():
    model, prompt = setup()
    res = run_decode_cycle(model, prompt, LENGTHS, 20, ReSAConfig(rectify_every=0, min_blocks=2))
    assert res.dense_steps == [] and res.tokens.shape == (3, 20)


def test_decode_cycle_rewinds_when_rectification_is_due():
    from resa_tl.cycle import DecodeCycle
    c = DecodeCycle(rectify_every=3)
    c.advance(50)                                   # prompt: dense
    assert c.pending == 0 and c.rewind_before(1) == 0
    for n in (1, 2, 3):
        c.advance(1)                                # sparse steps
        assert c.pending == n
    assert c.rewind_before(1) == 3                  # due: rewind 3, feed 4 densely
    assert c.rewind_before(1, can_refeed=False) == 0
    c.advance(4)
    assert c.pending == 0
    c.advance(1)
    assert c.rewind_before(5) == 1                  # a dense chunk folds pending tokens in
    sparse_only = DecodeCycle(rectify_every=0)
    for _ in range(100):
        sparse_only.advance(1)
    assert sparse_only.rewind_before(1) == 0 and sparse_only.rewind_before(2) == 100


def test_cycle_spans_and_per_token_time():
    from resa_tl.cycle import cycle_spans, per_token_time
    assert cycle_spans(10, 3) == [(0, 4, 3), (4, 8, 3), (8, 10, 2)]
    assert cycle_spans(6, 0) == [(0, 6, 6)]
    assert cycle_spans(0, 32) == []
    assert per_token_time(1.0, 5.0, 3) == (3 * 1.0 + 5.0) / 4
    assert per_token_time(1.0, 5.0, 0) == 1.0
