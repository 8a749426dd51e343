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
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        first = model.generate(left_padded([500])[0], max_new_tokens=30,
                               return_dict_in_generate=True, **GEN)
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


def test_lossless_matches_dense_greedy_up_to_near_ties():
    """bf16 on CUDA: ReSAConfig(lossless=True) (graph-replayed sparse steps and verify passes)
    emits dense greedy decoding's tokens. bf16 makes the two part at a near-tie of dense's own
    top-2 logits (a margin within bf16 resolution): they must agree up to the first such step
    (or to the end), and that prefix must be most of the output."""
    import copy
    model = make_model("qwen2", head_dim=128, layers=3)
    dense = copy.deepcopy(model)
    ids, mask = left_padded([1500, 900], seed=7)
    kw = dict(max_new_tokens=200, return_dict_in_generate=True, output_logits=True, **GEN)
    with torch.no_grad():
        ref = dense.generate(ids, attention_mask=mask, **kw)
        resa_tl.attach(model, lossless=True, sparse_ratio=0.1, min_blocks=2, rectify_every=16)
        out = model.generate(ids, attention_mask=mask, **kw)
    steps = out.past_key_values.__dict__["_step_graphs"]
    assert steps.captures >= 2
    gen_ref, gen_out = ref.sequences[:, 1500:], out.sequences[:, 1500:]
    top2 = torch.stack(ref.logits, 1).topk(2, dim=-1).values               # [B, N, 2]
    near_tie = (top2[..., 0] - top2[..., 1]) < 0.05
    for b in range(2):
        ties = near_tie[b].nonzero()
        limit = int(ties[0]) + 1 if ties.numel() else gen_ref.shape[1]
        assert torch.equal(gen_out[b, :limit], gen_ref[b, :limit]), b
        assert limit >= 50, f"row {b}: a near-tie at step {limit - 1} leaves too short a check"
