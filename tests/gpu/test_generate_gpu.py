"""The default generate() path after resa_tl.attach on CUDA (resa_tl.integration.decode_loop):
CUDA-graph decode steps give exactly what the eager steps of transformers' loop give; calls in
the same capacity bucket record, compile and trace nothing new; the prefill's chunk attention
(torch's flash kernel, two calls merged) matches an fp32 reference."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_attach_gpu import DEV, GEN, SPARSE, left_padded, make_model  # noqa: E402

import resa_tl  # noqa: E402
from resa_tl.integration.chunk_attention import attend_reference, chunk_attention  # noqa: E402
from resa_tl.kernels import (block_summaries, dense_decode, rectify_attention,  # noqa: E402
                             select_blocks, sparse_decode)
from resa_tl.kernels.rectify_attention import rectify_attention_reference  # noqa: E402

pytestmark = pytest.mark.gpu
KERNEL_MODULES = (block_summaries, dense_decode, rectify_attention, select_blocks, sparse_decode)


def kernels_compiled() -> int:
    return sum(m.compile_kernel.cache_info().misses for m in KERNEL_MODULES)


def test_graph_steps_equal_eager_steps():
    """Same prompt, same cache kind: the default call (steps replayed from CUDA graphs,
    rectifications included) and transformers' eager loop (cache_implementation="dynamic")
    run the same kernels, so tokens and logits are identical, left padding and all."""
    model = resa_tl.attach(make_model("qwen2", head_dim=128, layers=3), **SPARSE)
    ids, mask = left_padded([900, 611, 302], seed=3)
    kw = dict(max_new_tokens=40, return_dict_in_generate=True, output_logits=True, **GEN)
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=mask, **kw)
        eager = model.generate(ids, attention_mask=mask, cache_implementation="dynamic", **kw)
    steps = ours.past_key_values.__dict__["_step_graphs"]
    f = SPARSE["rectify_every"]
    assert steps.captures == 2 and set(steps.graphs) == {(1, 1), (f + 1, 1)}
    assert ours.past_key_values.num_rectifications == 4
    assert torch.equal(ours.sequences, eager.sequences)
    for a, b in zip(ours.logits, eager.logits):
        assert torch.equal(a, b)


def test_calls_in_one_bucket_record_and_compile_nothing():
    model = resa_tl.attach(make_model("llama", head_dim=128), **SPARSE)
    with torch.no_grad():
        first = model.generate(left_padded([500])[0], max_new_tokens=30,
                               return_dict_in_generate=True, **GEN)
        torch._dynamo.utils.counters.clear()     # the first call compiles the layers
        cache = first.past_key_values
        steps = cache.__dict__["_step_graphs"]
        captured, compiled = steps.captures, kernels_compiled()
        for n in (650, 801):                 # same bucket: capacity 1024
            out = model.generate(left_padded([n], seed=n)[0], max_new_tokens=30,
                                 return_dict_in_generate=True, **GEN)
            assert out.past_key_values is cache
    assert steps.captures == captured == 2
    assert kernels_compiled() == compiled
    assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("g", [1, 4, 6, 7, 8])
@pytest.mark.parametrize("D", [64, 128])
def test_chunk_attention_flash(dtype, g, D):
    torch.manual_seed(g + D)
    Hkv, T = 2, 300
    for lens in ([1500, 1500], [300, 300], [700, 2049]):
        B, S = len(lens), max(lens) + 37
        q = torch.randn(B, T, g * Hkv, D, device=DEV, dtype=dtype)
        k = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype)
        v = torch.randn(B, S, Hkv, D, device=DEV, dtype=dtype)
        L = torch.tensor(lens, dtype=torch.int32, device=DEV)
        out = chunk_attention(q, k, v, L, D ** -0.5)
        ref = rectify_attention_reference(q, k, v, L, softmax_scale=D ** -0.5)
        # bf16 output rounding dominates: 2 ulp of values of magnitude <= 1
        tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def test_flash_part_returns_the_reference_log_sum_exp():
    from resa_tl.integration.chunk_attention import _attend
    torch.manual_seed(0)
    q = torch.randn(2, 4, 129, 128, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(2, 4, 777, 128, device=DEV, dtype=torch.bfloat16)
    out, lse = _attend(q, k, k, False, 0.1)
    ref_out, ref_lse = attend_reference(q, k, k, False, 0.1)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out, ref_out, rtol=2 ** -7, atol=2 ** -7)


def teacher_forced(dense16, dense32, sequences, mask, prompt_len):
    """fp32 and bf16 dense logits predicting each generated token of ``sequences`` (left-padded
    prompts of ``mask``, then the new tokens), one teacher-forced forward each; [B, N, V]."""
    full = torch.cat([mask, mask.new_ones(mask.shape[0], sequences.shape[1] - prompt_len)], 1)
    fwd = dict(attention_mask=full, position_ids=(full.cumsum(-1) - 1).clamp(min=0))
    start = prompt_len - 1
    return (dense32(sequences, **fwd).logits[:, start:-1],
            dense16(sequences, **fwd).logits[:, start:-1].float())


def assert_dense_argmax(gen, tf32, tf16, eps):
    """Every token of ``gen`` [B, N] is the fp32 argmax up to bf16 noise (its fp32 logit within
    3x the bf16 pass's own error, plus eps, of the maximum); returns that noise [B, N]."""
    noise = 3 * (tf16 - tf32).abs().amax(-1) + eps
    assert bool((tf32.gather(-1, gen[..., None])[..., 0] >= tf32.max(-1).values - noise).all())
    return noise


def test_lossless_tokens_are_dense_argmax():
    """bf16 on CUDA: every token ReSAConfig(lossless=True) emits (graph-replayed sparse steps
    and verify passes) is the argmax of a teacher-forced fp32 dense pass over its own prefix,
    up to bf16 noise: its fp32 logit is within 3x the bf16 dense pass's own error of the
    maximum (a near-tie, where dense decoding itself could pick either). And it equals dense
    greedy decoding up to the first step where dense's top-2 margin is within that noise
    (after which the runs continue from different prefixes). 2,048 new tokens, rows of
    different prompt lengths (each accepts its own count)."""
    import copy
    N = 2048
    model = make_model("qwen2", head_dim=128, layers=3)
    model.config.max_position_embeddings = 4096               # 1,500 + 2,048 positions
    dense = copy.deepcopy(model)
    dense32 = copy.deepcopy(model).float()
    ids, mask = left_padded([1500, 900], seed=7)
    kw = dict(max_new_tokens=N, return_dict_in_generate=True, output_logits=True, **GEN)
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, **kw)
        resa_tl.attach(model, lossless=True, sparse_ratio=0.1, min_blocks=2, rectify_every=16)
        out = model.generate(ids, attention_mask=mask, **kw)
        tf32, tf16 = teacher_forced(dense, dense32, out.sequences, mask, 1500)
    if DEV == "cuda":                                         # not in a CPU dry run
        assert out.past_key_values.__dict__["_step_graphs"].captures >= 2
    stats = out.past_key_values.lossless_stats
    assert stats.proposed > stats.accepted                    # verification had work to do
    gen = out.sequences[:, 1500:]
    noise = assert_dense_argmax(gen, tf32, tf16, 1e-4)
    ref_top2 = torch.stack(ref.logits, 1).float().topk(2, dim=-1).values
    near_tie = (ref_top2[..., 0] - ref_top2[..., 1]) <= noise
    for b in range(2):
        ties = near_tie[b].nonzero()
        limit = int(ties[0]) + 1 if ties.numel() else gen.shape[1]
        assert torch.equal(gen[b, :limit], ref.sequences[b, 1500:1500 + limit]), b


def test_compiled_layers_on_cuda():
    """attach(compile_layers=True) on CUDA: the layers compile before any CUDA-graph capture
    (both decode graphs recorded, none fell back to eager); with ratio 1 and no rectification
    every greedy token is the argmax of a teacher-forced fp32 pass over its prefix up to bf16
    noise (3x the bf16 eager model's own error there), and the prompt's logits are no further
    from fp32 than twice the eager layers'; a second call with other prompt lengths in the same
    bucket compiles and records nothing. Token for token equality with the eager layers is not
    expected in bf16: the fused kernels round differently, and this random model's logits carry
    a bf16 error near its top-2 margins."""
    import copy
    model = make_model("qwen2", head_dim=128, layers=3)
    eager16, eager32 = copy.deepcopy(model), copy.deepcopy(model).float()
    ids, mask = left_padded([900, 611, 302], seed=3)
    n = 40
    kw = dict(max_new_tokens=n, return_dict_in_generate=True, output_logits=True, **GEN)
    with torch.no_grad():
        resa_tl.attach(model, compile_layers=True, **dict(SPARSE, sparse_ratio=1.0,
                                                         rectify_every=0))
        out = model.generate(ids, attention_mask=mask, **kw)
        tf32, tf16 = teacher_forced(eager16, eager32, out.sequences, mask, ids.shape[1])
    if DEV == "cuda":
        steps = out.past_key_values.__dict__["_step_graphs"]
        assert steps.enabled and steps.captures == 1            # ratio 1: no rectification step
    assert_dense_argmax(out.sequences[:, ids.shape[1]:], tf32, tf16, 1e-3)
    first = out.logits[0].float()
    assert bool(((first - tf32[:, 0]).abs().amax(-1)
                 <= 2 * (tf16[:, 0] - tf32[:, 0]).abs().amax(-1) + 1e-3).all())
    with torch.no_grad():                                   # sparse, rectification included
        resa_tl.attach(model, compile_layers=True, **SPARSE)
        out = model.generate(ids, attention_mask=mask, **kw)
        steps = out.past_key_values.__dict__["_step_graphs"]
        if DEV == "cuda":
            assert steps.enabled and steps.captures == 2
        assert out.past_key_values.num_rectifications > 0
        assert bool(torch.stack(out.logits).isfinite().all())
        torch._dynamo.utils.counters.clear()
        ids2, mask2 = left_padded([800, 700, 500], seed=4)
        again = model.generate(ids2, attention_mask=mask2, **kw)
        assert again.past_key_values is out.past_key_values
        assert steps.captures == (2 if DEV == "cuda" else 0)
        assert not torch._dynamo.utils.counters["stats"]["unique_graphs"]
    resa_tl.detach(model)
