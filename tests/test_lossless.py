"""ReSAConfig(lossless=True) on CPU (torch backend, fp32): generate() equals dense greedy
decoding token for token, with left padding, EOS in one row, streamer and scores; a
teacher-forced dense pass confirms every emitted token is the dense argmax; the verify window
adapts; clear errors where the mode cannot run."""
import copy

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

import resa_tl
from resa_tl import ReSAConfig

from test_attach import GEN, left_padded, make_model

# A sparse budget tight enough that sparse and dense often disagree (tiny random models have
# no long-range structure to keep): the verification then has work to do.
LOSSY = dict(sparse_ratio=0.1, min_blocks=2, local_blocks=1, rectify_every=8)


@pytest.fixture(autouse=True)
def always_propose(monkeypatch):
    """On a CPU the timings of a tiny model would often choose dense steps over proposals;
    these tests check the speculation, so it always proposes unless a test says otherwise."""
    from resa_tl.integration import lossless
    monkeypatch.setattr(lossless, "DENSE_STEPS", False)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(value.shape[0], -1).clone())

    def end(self):
        pass


def dense_and_lossless(arch, lengths, new_tokens, seed=0, **gen):
    model = make_model(arch, layers=3, seed=seed)
    dense = copy.deepcopy(model)
    ids, mask = left_padded(lengths, seed=seed)
    kw = dict(GEN, **gen)
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)
        resa_tl.attach(model, lossless=True, **LOSSY)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                             return_dict_in_generate=True, **kw)
        resa_tl.attach(model, **LOSSY)
        sparse = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **kw)
    return dense, ids, mask, ref, out, sparse


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_lossless_equals_dense_greedy(arch):
    dense, ids, mask, ref, out, sparse = dense_and_lossless(arch, [300, 211, 97], 160)
    assert not torch.equal(sparse, ref)           # plain ReSA departs from dense here ...
    assert torch.equal(out.sequences, ref)        # ... the lossless mode does not
    cache = out.past_key_values
    assert cache.lengths(0).tolist() == [n + 159 for n in (300, 211, 97)]
    # teacher-forced: every emitted token is the argmax of a dense pass over its prefix
    full = torch.cat([mask, mask.new_ones(3, 160)], 1)
    with torch.no_grad():
        logits = dense(ref, attention_mask=full,
                       position_ids=(full.cumsum(-1) - 1).clamp(min=0)).logits
    assert torch.equal(logits[:, 299:-1].argmax(-1), ref[:, 300:])


def test_lossless_with_eos_streamer_and_scores():
    model = make_model("qwen2", layers=3, seed=4)
    dense = copy.deepcopy(model)
    ids, mask = left_padded([120, 77], seed=4)
    with torch.no_grad():
        probe = dense.generate(ids, attention_mask=mask, max_new_tokens=60, **GEN)
    eos = int(probe[1, 120 + 25])                # row 1 stops there (or earlier)
    kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=60,
              return_dict_in_generate=True, output_scores=True)
    s_ref, s_out = Collect(), Collect()
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, streamer=s_ref, **kw)
        resa_tl.attach(model, lossless=True, **LOSSY)
        out = model.generate(ids, attention_mask=mask, streamer=s_out, **kw)
    assert torch.equal(out.sequences, ref.sequences)
    assert len(out.scores) == len(ref.scores)
    gen = ref.sequences[:, 120:]
    for k, (a, b) in enumerate(zip(out.scores, ref.scores)):
        live = ~(gen[:, :k] == eos).any(1)        # rows still decoding (after EOS: padding)
        assert torch.equal(a[live].argmax(-1), b[live].argmax(-1))
        torch.testing.assert_close(a[live], b[live], rtol=1e-4, atol=1e-4)
    assert torch.equal(torch.cat(s_out.chunks, 1), torch.cat(s_ref.chunks, 1))


def test_verify_window_adapts(monkeypatch):
    """The window follows agreement: it starts at the smallest, grows through a stretch where
    every proposal is kept and shrinks where every other one is rejected. Verdicts replayed
    (cache.replay_acceptance) and times fixed (a sparse step a tenth of a dense pass), so the
    policy, not this CPU's timings or a random model's agreement, decides."""
    from resa_tl.integration import lossless, warm_up
    lengths = []
    original = lossless.StepGraphs.run

    def spy(self, ids, positions, attention_mask=None, keep=1):
        if keep > 1:
            lengths.append(keep - 1)
        return original(self, ids, positions, attention_mask, keep)
    monkeypatch.setattr(lossless.StepGraphs, "run", spy)
    read = lossless.StepClock.read
    monkeypatch.setattr(lossless.StepClock, "read", lambda self: (read(self), (1.0, 10.0))[1])
    model = resa_tl.attach(make_model("llama", layers=2), lossless=True, **LOSSY)
    ids, _ = left_padded([300])
    warm_up(model, 1, 300 + 200).replay_acceptance = [[1] * 100 + [1, 0] * 50]
    with torch.no_grad():
        model.generate(ids, max_new_tokens=200, **GEN)
    grown = lengths.index(8)
    assert lengths[0] == 4 and grown > 0 and 4 in lengths[grown:]
    assert ReSAConfig(lossless=True, rectify_every=32).verify_windows() == (32, 16, 8, 4)
    assert ReSAConfig(lossless=True, rectify_every=3).verify_windows() == (3,)


def test_lossless_errors():
    with pytest.raises(ValueError, match="rectify_every >= 1"):
        ReSAConfig(lossless=True, rectify_every=0)
    with pytest.raises(ValueError, match="lossless must be a bool"):
        ReSAConfig(lossless=1)
    model = resa_tl.attach(make_model("llama"), lossless=True, **LOSSY)
    ids, _ = left_padded([50])
    with torch.no_grad():
        with pytest.raises(ValueError, match="transformers' loop"):
            model.generate(ids, max_new_tokens=4, cache_implementation="dynamic", **GEN)


def test_full_acceptance_up_to_max_length():
    """Ratio 1 with lossless: sparse steps are dense, every token is accepted, and the last
    verification ends exactly at max_new_tokens (no room for its extra dense token)."""
    model = make_model("qwen3", layers=2, seed=8)
    dense = copy.deepcopy(model)
    ids, mask = left_padded([64, 40], seed=8)
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, max_new_tokens=21, **GEN)
        resa_tl.attach(model, lossless=True, sparse_ratio=1.0, min_blocks=1, rectify_every=8)
        for n in (21, 18, 10):
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n,
                                 return_dict_in_generate=True, **GEN)
            assert torch.equal(out.sequences, ref[:, :64 + n])
            stats = out.past_key_values.lossless_stats
            assert stats.accepted == stats.proposed > 0
            assert out.past_key_values.lengths(0).tolist() == [64 + n - 1, 40 + n - 1]


def test_lossless_equals_dense_greedy_over_2048_tokens():
    """The long form of the proof on a tiny model: a batch with different prompt lengths,
    2,048 new tokens, equal to dense greedy token for token (fp32: no near-ties at this
    model's margins)."""
    model = make_model("llama", layers=2, seed=5)
    model.config.max_position_embeddings = 4096          # prompt + 2,048 new tokens
    dense = copy.deepcopy(model)
    ids, mask = left_padded([200, 131], seed=5)
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, max_new_tokens=2048, **GEN)
        resa_tl.attach(model, lossless=True, **LOSSY)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=2048,
                             return_dict_in_generate=True, **GEN)
    assert torch.equal(out.sequences, ref)
    assert out.past_key_values.lossless_stats.accepted > 0


def _joint_counts(seqs, P, outcomes):
    index = {o: i for i, o in enumerate(outcomes)}
    counts = torch.zeros(len(outcomes) + 1)
    for row in seqs[:, P:].tolist():
        counts[index.get(tuple(row), len(outcomes))] += 1      # last bin: outside the support
    return counts


def _chi2_pvalue(counts, probs):
    """Pearson's test of counts against probs (bins expecting < 5 pooled); the p-value."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs - exp) ** 2 / exp.clamp_min(1e-12))[keep].sum() + obs[~keep].sum() * 1e6
    dof = torch.tensor(float(keep.sum() - 1))
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def test_lossless_sampling_has_the_dense_distribution():
    """do_sample=True: the speculative-sampling rule makes the joint distribution of the
    first three new tokens equal dense sampling's, computed exactly by enumerating the dense
    model's top-4 continuations. 3,000 rows of one prompt (each row accepts on its own);
    plain ReSA's samples fail the same test, so it can tell the two apart."""
    model = make_model("llama", layers=3, seed=11)
    dense = copy.deepcopy(model)
    ids, _ = left_padded([320], seed=11)
    warp = dict(do_sample=True, top_k=4, temperature=1.0, top_p=1.0, pad_token_id=0,
                eos_token_id=None, max_new_tokens=3)
    N, P = 3000, ids.shape[1]

    def warped(logits):                                   # what top_k=4 sampling draws from
        top = logits.topk(4, dim=-1)
        return top.indices, torch.softmax(top.values.double(), -1)

    with torch.no_grad():                                 # the exact dense distribution
        outcomes, probs = [], []
        t1, p1 = warped(dense(ids).logits[0, -1])
        for a, pa in zip(t1.tolist(), p1.tolist()):
            x = torch.cat([ids, torch.tensor([[a]])], 1)
            t2, p2 = warped(dense(x).logits[0, -1])
            for b, pb in zip(t2.tolist(), p2.tolist()):
                y = torch.cat([x, torch.tensor([[b]])], 1)
                t3, p3 = warped(dense(y).logits[0, -1])
                for c, pc in zip(t3.tolist(), p3.tolist()):
                    outcomes.append((a, b, c))
                    probs.append(pa * pb * pc)
    probs = torch.tensor(probs + [0.0])
    cfg = dict(sparse_ratio=0.1, min_blocks=1, local_blocks=1, rectify_every=4)
    with torch.no_grad():
        torch.manual_seed(0)
        resa_tl.attach(model, lossless=True, **cfg)
        out = model.generate(ids.expand(N, P), return_dict_in_generate=True, **warp)
        stats = out.past_key_values.lossless_stats
        resa_tl.attach(model, **cfg)
        sparse = model.generate(ids.expand(N, P), **warp)
    assert 0 < stats.accepted < stats.proposed                # both outcomes happened
    assert _chi2_pvalue(_joint_counts(out.sequences, P, outcomes), probs) > 1e-3
    assert _chi2_pvalue(_joint_counts(sparse, P, outcomes), probs) < 1e-6


def test_verify_window_follows_agreement_and_costs():
    """The window maximises expected tokens per unit of time: it shrinks as agreement falls,
    grows as the dense pass gets dearer relative to a sparse step, and the expected run
    length is the truncated geometric sum."""
    from resa_tl.heuristics import expected_tokens, verify_window
    windows = (32, 16, 8, 4)
    assert expected_tokens(1.0, 8) == 9
    assert expected_tokens(0.0, 8) == 1
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert verify_window(windows, [0.99] * 8, 1.0, 10.0) == 32
    assert verify_window(windows, [0.3] * 8, 1.0, 10.0) == 4
    picks = [verify_window(windows, [a] * 8, 1.0, 2.0) for a in (0.5, 0.8, 0.9, 0.95, 0.99)]
    assert picks == sorted(picks) and picks[0] < picks[-1]        # more agreement, longer
    costs = [verify_window(windows, [0.9] * 8, 1.0, v) for v in (0.5, 2.0, 8.0, 32.0)]
    assert costs == sorted(costs) and costs[0] < costs[-1]       # dearer pass, longer
    # window 0 (a dense step, one token per row per pass): where proposals cannot pay
    assert verify_window(windows + (0,), [0.3] * 8, 1.0, 1.2) == 0     # a sparse step ~ dense
    assert verify_window(windows + (0,), [0.99] * 8, 0.1, 1.0) == 32
    assert verify_window(windows + (0,), [0.8] * 8, 0.5, 1.0) == 4


def test_dense_steps_between_windows(monkeypatch):
    """Window 0 (dense one-token steps) mixed with verify windows, by a policy that alternates:
    the output is still dense greedy decoding, rows at different lengths, EOS in one row."""
    from resa_tl.integration import lossless
    monkeypatch.setattr(lossless, "DENSE_STEPS", True)
    picks = iter([0, 4, 0, 0, 8] * 100)
    monkeypatch.setattr(lossless.heuristics, "verify_window", lambda *a: next(picks))
    model = make_model("llama", layers=3, seed=3)
    dense = copy.deepcopy(model)
    ids, mask = left_padded([150, 93], seed=3)
    with torch.no_grad():
        probe = dense.generate(ids, attention_mask=mask, max_new_tokens=90, **GEN)
        eos = int(probe[0, 150 + 40])
        kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=90)
        ref = dense.generate(ids, attention_mask=mask, **kw)
        resa_tl.attach(model, lossless=True, **LOSSY)
        out = model.generate(ids, attention_mask=mask, return_dict_in_generate=True, **kw)
    assert torch.equal(out.sequences, ref)
    stats = out.past_key_values.lossless_stats
    assert stats.dense_steps > 0 and stats.verify_passes > 0 and stats.proposed > stats.accepted


def test_lossless_with_a_prefix_dependent_processor():
    """repetition_penalty reads each row's prefix: with rows committed to different lengths
    it runs once per distinct length, and the output still equals dense greedy decoding."""
    dense, ids, mask, ref, out, _ = dense_and_lossless("qwen2", [260, 181, 90], 96, seed=9,
                                                      repetition_penalty=1.3)
    assert torch.equal(out.sequences, ref)
    trace = out.past_key_values.lossless_stats.trace
    assert any(len({row[i][0] for row in trace}) > 1 for i in range(len(trace[0])))


def test_stop_flags_in_one_read_and_per_position(monkeypatch):
    """transformers' EOS and max-length criteria are evaluated for a whole window in the same
    host read as the accepted counts; a criterion of the user's own is called per committed
    position instead. Both stop each row where dense greedy decoding with them stops."""
    from transformers import StoppingCriteria, StoppingCriteriaList
    from resa_tl.integration import lossless

    class LastTokenIs(StoppingCriteria):          # a user's EOS check: not vectorised
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    together = []
    read = lossless.StopCheck.read

    def spy(self, *args):
        acc, flag = read(self, *args)
        together.append(flag is not None)
        return acc, flag
    monkeypatch.setattr(lossless.StopCheck, "read", spy)
    model = make_model("llama", layers=3, seed=5)
    dense = copy.deepcopy(model)
    ids, mask = left_padded([140, 88, 61], seed=5)
    with torch.no_grad():
        probe = dense.generate(ids, attention_mask=mask, max_new_tokens=70, **GEN)
    eos, mine = int(probe[0, 140 + 30]), int(probe[2, 140 + 12])
    kw = dict(do_sample=False, eos_token_id=eos, pad_token_id=0, max_new_tokens=70)
    with torch.no_grad():
        for extra in ({}, {"stopping_criteria": StoppingCriteriaList([LastTokenIs(mine)])}):
            ref = dense.generate(ids, attention_mask=mask, **kw, **extra)
            resa_tl.attach(model, lossless=True, **LOSSY)
            together.clear()
            out = model.generate(ids, attention_mask=mask, **kw, **extra)
            assert torch.equal(out, ref)
            assert together and all(together) == (not extra) and any(together) == (not extra)
            resa_tl.detach(model)
    assert (ref[:, 140:] == eos).any() and (ref[:, 140:] == mine).any()
