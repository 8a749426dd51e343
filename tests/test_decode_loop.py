"""resa_tl's generate() decoding loop (resa_tl.integration.decode_loop) on CPU, torch backend:
a bare generate() after attach runs it; it gives what transformers' own loop gives over the
same cache (tokens, padding after EOS, scores, streamer, the cache left behind); chunked
prefill leaves the same K/V and summaries as one chunk; explicit settings pick transformers'
loop; the prefill chunk heuristic and the exact chunk attention."""
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
from transformers.generation.utils import GenerationMixin

import resa_tl
from resa_tl import heuristics
from resa_tl.integration import decode_loop
from resa_tl.integration.chunk_attention import chunk_attention
from resa_tl.kernels.rectify_attention import rectify_attention_reference

from test_attach import GEN, left_padded, make_model


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone().reshape(value.shape[0], -1) if value.dim() > 1
                           else value.clone()[:, None])

    def end(self):
        self.ended = True

    def tokens(self):
        return torch.cat(self.chunks, 1)


class Forbid:
    """Makes transformers' own decoding loop fail if generate() calls it."""

    def __init__(self, monkeypatch):
        def refuse(*a, **k):
            raise AssertionError("transformers' _sample ran")
        monkeypatch.setattr(GenerationMixin, "_sample", refuse)


def test_bare_generate_runs_the_resa_loop(monkeypatch):
    model = resa_tl.attach(make_model("qwen2"), min_blocks=2, rectify_every=4)
    ids, mask = left_padded([70, 52])
    Forbid(monkeypatch)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=11,
                             return_dict_in_generate=True, **GEN)
    cache = out.past_key_values
    assert out.sequences.shape == (2, 70 + 11)
    assert cache.__dict__["_step_graphs"].model is model
    assert cache.num_rectifications == 2        # steps 5 and 10 re-fed 4 sparse tokens each
    # the cache holds every token but the last one generated, as after transformers' loop
    assert cache.lengths(0).tolist() == [70 + 10, 52 + 10]


@pytest.mark.parametrize("explicit", [dict(cache_implementation="dynamic"),
                                      dict(custom_generate=GenerationMixin._sample)])
def test_explicit_choices_run_transformers_loop(monkeypatch, explicit):
    model = resa_tl.attach(make_model("llama"), min_blocks=2, rectify_every=4)
    calls = []
    original = GenerationMixin._sample

    def spy(*a, **k):
        calls.append(1)
        return original(*a, **k)
    monkeypatch.setattr(GenerationMixin, "_sample", spy)
    if "custom_generate" in explicit:
        explicit = dict(custom_generate=spy)
    ids, _ = left_padded([40])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=5, **explicit, **GEN)
    assert calls


def _both_loops(model, ids, mask, **kw):
    """generate() through resa_tl's loop, then through transformers' loop over a fresh ReSA
    cache of the same kind (cache_implementation="dynamic")."""
    with torch.no_grad():
        torch.manual_seed(3)
        ours = model.generate(ids, attention_mask=mask, **kw)
        torch.manual_seed(3)
        theirs = model.generate(ids, attention_mask=mask, cache_implementation="dynamic", **kw)
    return ours, theirs


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_same_result_as_transformers_loop(arch):
    """Sparse steps, rectifications, left padding, EOS in one row before the other: the same
    sequences (pad after EOS, stop when every row finished), scores and logits, and the cache
    left with the same lengths; the streamer sees the same tokens."""
    model = resa_tl.attach(make_model(arch, layers=3), min_blocks=2, rectify_every=5)
    ids, mask = left_padded([90, 64], seed=2)
    with torch.no_grad():                     # pick an EOS that row 0 emits early
        probe = model.generate(ids, attention_mask=mask, max_new_tokens=30, **GEN)
    eos = int(probe[0, 90 + 7])
    kw = dict(max_new_tokens=30, do_sample=False, eos_token_id=eos, pad_token_id=0,
              return_dict_in_generate=True, output_scores=True, output_logits=True)
    ours, theirs = _both_loops(model, ids, mask, **kw)
    s1, s2 = Collect(), Collect()
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, streamer=s1, **kw)
        model.generate(ids, attention_mask=mask, cache_implementation="dynamic", streamer=s2,
                       **kw)
    assert torch.equal(ours.sequences, theirs.sequences)
    assert len(ours.scores) == len(theirs.scores) == ours.sequences.shape[1] - 90
    for a, b in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert (ours.past_key_values.lengths(0).tolist()
            == theirs.past_key_values.lengths(0).tolist())
    assert torch.equal(s1.tokens(), s2.tokens()) and s1.ended


def test_stop_lag_undoes_the_extra_steps():
    """Every row stops at EOS well before max_new_tokens: the loop ran up to STOP_CHECK_LAG
    steps past it and undid them (sequence, cache length, pending sparse steps)."""
    model = resa_tl.attach(make_model("qwen2"), min_blocks=2, rectify_every=6)
    ids, _ = left_padded([50], seed=9)
    with torch.no_grad():
        probe = model.generate(ids, max_new_tokens=20, **GEN)
        eos = int(probe[0, 50 + 3])
        first = int((probe[0, 50:] == eos).nonzero()[0])
        out = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, return_dict_in_generate=True)
    n = first + 1
    assert out.sequences.shape[1] == 50 + n
    cache = out.past_key_values
    assert cache.lengths(0).tolist() == [50 + n - 1]
    # the undone steps may have crossed a rectification: then fewer tokens are still sparse
    assert cache.pending <= (n - 1) % 7


def test_sampling_matches_transformers_loop():
    model = resa_tl.attach(make_model("mistral"), min_blocks=2, rectify_every=3)
    ids, _ = left_padded([33, 33], seed=5)
    ours, theirs = _both_loops(model, ids, None, do_sample=True, top_k=8, temperature=0.7,
                               max_new_tokens=14, eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, theirs)


class KVAfterPrefill(LogitsProcessor):
    """Keeps the cache's K, summaries and lengths as the first step finds them (after the
    prefill)."""

    def __init__(self, cache):
        self.cache, self.seen = cache, None

    def __call__(self, input_ids, scores):
        if self.seen is None:
            c = self.cache.store
            self.seen = ([k.clone() for k in c.k], [k.clone() for k in c.kmin],
                         [k.clone() for k in c.kmax], c.seqlens.clone())
        return scores


@pytest.mark.parametrize("padded", [False, True])
def test_chunked_prefill_leaves_the_same_cache(padded):
    model = resa_tl.attach(make_model("qwen2", layers=3), min_blocks=2, rectify_every=4)
    ids, mask = left_padded([150, 97] if padded else [150, 150], seed=11)
    got = {}
    for chunk in (None, 40):
        with torch.no_grad():
            cache = resa_tl.integration.new_cache(model, 2, 1024)
            proc = KVAfterPrefill(cache)
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=2,
                           prefill_chunk_size=chunk,
                           logits_processor=LogitsProcessorList([proc]), **GEN)
        got[chunk] = proc.seen
    (k1, n1, x1, l1), (k2, n2, x2, l2) = got[None], got[40]
    assert torch.equal(l1, l2)
    for a, b in zip(k1 + n1 + x1, k2 + n2 + x2):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_default_prefill_is_chunked_from_the_heuristic(monkeypatch):
    seen = []
    original = decode_loop.run_prefill

    def spy(steps, ids, positions, mask, chunk):
        seen.append(chunk)
        return original(steps, ids, positions, mask, chunk)
    monkeypatch.setattr(decode_loop, "run_prefill", spy)
    monkeypatch.setattr(heuristics, "PREFILL_MAX_TOKENS", 128)
    model = resa_tl.attach(make_model("llama"), min_blocks=2)
    ids, _ = left_padded([300, 300])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **GEN)
    assert seen == [128]              # 128 tokens per forward / 2 rows, at least one quantum


def test_the_cache_is_reused_within_a_capacity_bucket():
    model = resa_tl.attach(make_model("llama"), min_blocks=2)
    with torch.no_grad():
        a = model.generate(left_padded([100])[0], max_new_tokens=3,
                           return_dict_in_generate=True, **GEN).past_key_values
        b = model.generate(left_padded([180])[0], max_new_tokens=3,
                           return_dict_in_generate=True, **GEN).past_key_values
        c = model.generate(left_padded([1500])[0], max_new_tokens=3,
                           return_dict_in_generate=True, **GEN).past_key_values
    assert a is b and c is not a


# ------------------------------------------------------------------ prefill chunk heuristic
QWEN7B = dict(hidden=3584, intermediate=18944, num_heads=28, num_kv_heads=4, head_dim=128,
              dtype_bytes=2)


def test_prefill_chunk_tokens():
    f = heuristics.prefill_chunk_tokens
    assert f(100, 8, free_bytes=None, **QWEN7B) == 100                 # short prompts: 1 chunk
    assert f(1 << 20, 1, free_bytes=None, **QWEN7B) == heuristics.PREFILL_MAX_TOKENS
    small = f(1 << 20, 8, free_bytes=4 << 30, **QWEN7B)
    large = f(1 << 20, 8, free_bytes=40 << 30, **QWEN7B)
    assert small < large and small % heuristics.PREFILL_CHUNK_QUANTUM == 0
    assert f(1 << 20, 64, free_bytes=1 << 20, **QWEN7B) == heuristics.PREFILL_CHUNK_QUANTUM


# ------------------------------------------------------------------------- chunk attention
@pytest.mark.parametrize("g", [1, 2, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("lens", [[37, 37], [21, 58], [9, 9]])
def test_chunk_attention_is_exact(g, D, lens):
    torch.manual_seed(g * D + lens[0])
    B, Hkv, T = len(lens), 2, 9
    S = max(lens) + 5
    q = torch.randn(B, T, g * Hkv, D, dtype=torch.float64)
    k = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    v = torch.randn(B, S, Hkv, D, dtype=torch.float64)
    L = torch.tensor(lens, dtype=torch.int32)
    out = chunk_attention(q, k, v, L, D ** -0.5)
    ref = rectify_attention_reference(q, k, v, L, softmax_scale=D ** -0.5,
                                      compute_dtype=torch.float64)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_chunk_attention_rejects_short_rows():
    q = torch.randn(1, 8, 2, 16)
    k = torch.randn(1, 20, 2, 16)
    with pytest.raises(ValueError, match="every row must hold"):
        chunk_attention(q, k, k, torch.tensor([5], dtype=torch.int32), 0.25)


def test_warm_up_prepares_the_cache_later_calls_reuse(monkeypatch):
    model = resa_tl.attach(make_model("qwen2"), min_blocks=2, rectify_every=4)
    cache = resa_tl.integration.warm_up(model, 2, 1500)
    assert cache.max_cache_len == 2048 and cache.num_rectifications == 2
    Forbid(monkeypatch)
    with torch.no_grad():
        out = model.generate(left_padded([1000, 700])[0], max_new_tokens=9,
                             return_dict_in_generate=True, **GEN)
    assert out.past_key_values is cache
    with pytest.raises(ValueError, match="batch_size"):
        resa_tl.integration.warm_up(model, 0, 100)
