"""Bad input gets a clear error at the API boundary."""
import pytest
import torch

from resa_tl import ops


def base(B=2, S=64, Hkv=2, g=2, D=64, dtype=torch.float16):
    q = torch.randn(B, Hkv * g, D).to(dtype)
    k = torch.randn(B, S, Hkv, D).to(dtype)
    v = torch.randn(B, S, Hkv, D).to(dtype)
    return q, k, v, torch.tensor([S, 5])


def test_wrong_dtype():
    q, k, v, L = base()
    with pytest.raises(TypeError, match="q and the caches must share one dtype"):
        ops.dense_decode(q.float(), k, v, L)
    with pytest.raises(TypeError, match="q has dtype int64"):
        ops.dense_decode(q.long(), k, v, L)
    with pytest.raises(TypeError, match="cache_seqlens has dtype float32"):
        ops.dense_decode(q, k, v, L.float())
    with pytest.raises(TypeError, match="block_indices has dtype"):
        ops.sparse_decode(q, k, v, torch.zeros(2, 2, 1), L)


def test_wrong_rank_and_shape():
    q, k, v, L = base()
    with pytest.raises(ValueError, match=r"q must have 3 dims \[B, H, D\]"):
        ops.dense_decode(q[None], k, v, L)
    with pytest.raises(ValueError, match="k_cache must have 4 dims"):
        ops.dense_decode(q, k[0], v, L)
    with pytest.raises(ValueError, match="k_cache head_dim 64 != q head_dim 32"):
        ops.dense_decode(q[..., :32], k, v, L)
    with pytest.raises(ValueError, match="v_cache shape"):
        ops.dense_decode(q, k, v[:, :10], L)
    with pytest.raises(ValueError, match="cache_seqlens has 3 rows, batch is 2"):
        ops.dense_decode(q, k, v, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"block_indices must be \[B, Hkv, K\]"):
        ops.sparse_decode(q, k, v, torch.zeros(2, 3, 1, dtype=torch.int32), L)
    with pytest.raises(ValueError, match=r"q must have 4 dims \[B, T, H, D\]"):
        ops.rectify_attention(q, k, v, L)


def test_heads_not_divisible():
    q, k, v, L = base(g=2)
    with pytest.raises(ValueError, match="H=3 must be a multiple of KV heads Hkv=2"):
        ops.dense_decode(q[:, :3], k, v, L)
    kmin, kmax = ops.block_summaries(k, L)
    with pytest.raises(ValueError, match="H=3 must be a multiple"):
        ops.select_blocks(q[:, :3], kmin, kmax, L)


def test_block_size_not_power_of_two():
    q, k, v, L = base()
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ops.block_summaries(k, L, 24)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ops.sparse_decode(q, k, v, torch.zeros(2, 2, 1, dtype=torch.int32), L, block_size=12)
    kmin, kmax = ops.block_summaries(k, L)
    with pytest.raises(ValueError, match="block_size"):
        ops.select_blocks(q, kmin, kmax, L, block_size=20)


def test_lengths_beyond_capacity():
    q, k, v, _ = base()
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 64\]"):
        ops.dense_decode(q, k, v, torch.tensor([65, 1]))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 64\]"):
        ops.block_summaries(k, torch.tensor([-1, 1]))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[3, 64\]"):
        ops.rectify_attention(q[:, None].expand(2, 3, 4, 64), k, v, torch.tensor([2, 10]))
    kmin, kmax = ops.block_summaries(k, torch.tensor([10, 10]))
    with pytest.raises(ValueError, match=r"start \+ length must lie in \[0, S_max=64\]"):
        ops.update_block_summaries(kmin, kmax, k, torch.tensor([60, 0]), 5)
    with pytest.raises(ValueError, match=r"block_indices must lie in \[-1, 3\]"):
        ops.sparse_decode(q, k, v, torch.full((2, 2, 1), 4, dtype=torch.int32),
                          torch.tensor([10, 10]))


def test_bad_scalars_and_backend():
    q, k, v, L = base()
    with pytest.raises(ValueError, match="softmax_scale must be a positive float"):
        ops.dense_decode(q, k, v, L, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.dense_decode(q, k, v, L, backend="triton")
    with pytest.raises(ValueError, match="backend='tilelang' needs CUDA tensors"):
        ops.dense_decode(q, k, v, L, backend="tilelang")
    kmin, kmax = ops.block_summaries(k, L)
    with pytest.raises(ValueError, match="sparse_ratio"):
        ops.select_blocks(q, kmin, kmax, L, sparse_ratio=0)
    with pytest.raises(ValueError, match="max_selected must be None or an int >="):
        ops.select_blocks(q, kmin, kmax, L, max_selected=0)
    with pytest.raises(ValueError, match="the blocks that are always kept must fit"):
        ops.select_blocks(q, kmin, kmax, L, min_blocks=4, local_blocks=2, max_selected=1)
    with pytest.raises(ValueError, match=r"kmin must have shape \[B, NB, Hkv, D\]"):
        ops.update_block_summaries(kmin[:, :2], kmax, k, L, 1)
    with pytest.raises(ValueError, match="length must be an int >= 0"):
        ops.update_block_summaries(kmin, kmax, k, L, -1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_mixed_devices():
    q, k, v, L = base()
    with pytest.raises(ValueError, match="all tensors must be on one device"):
        ops.dense_decode(q.cuda(), k, v, L)


def test_mixed_devices_meta():
    # The meta device stands in for a second device on CPU-only machines.
    q, k, v, L = base()
    with pytest.raises(ValueError, match="all tensors must be on one device; got q on meta"):
        ops.dense_decode(q.to("meta"), k, v, L)


def test_lengths_as_a_python_list_name_the_parameter():
    q, k, v, L = base()
    with pytest.raises(TypeError, match="cache_seqlens must be a torch.Tensor, got list"):
        ops.dense_decode(q, k, v, L.tolist())
    kmin = torch.zeros(2, 4, 2, 64, dtype=torch.float16)
    with pytest.raises(TypeError, match="cache_seqlens must be a torch.Tensor, got list"):
        ops.select_blocks(q, kmin, kmin, [64, 5])


def test_hnd_cache_is_named_as_such():
    q, k, v, L = base(Hkv=2, g=3)                   # H = 6
    with pytest.raises(ValueError, match=r"HND cache \[B, Hkv, S, D\].*transpose\(1, 2\)"):
        ops.dense_decode(q, k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), L)


def test_rectify_lengths_say_why_they_must_cover_the_chunk():
    q, k, v, _ = base()
    qc = torch.randn(2, 8, 4, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="at least the T=8 queried positions"):
        ops.rectify_attention(qc, k, v, torch.tensor([64, 5]))


def test_package_exports_what_the_readme_names():
    import resa_tl
    assert resa_tl.ReSACache is __import__("resa_tl.cache").cache.ReSACache
    assert callable(resa_tl.reference_cycle.run_decode_cycle)
    assert callable(resa_tl.attach) and callable(resa_tl.detach)


def test_summaries_of_another_block_size_are_caught_where_the_cache_is_known():
    q, k, _, _ = base(S=64)
    L = torch.tensor([64, 40])
    kmin, kmax = ops.block_summaries(k, L, 16)                  # NB = 4 blocks of 16
    with pytest.raises(ValueError, match=r"ceil\(S_max / block_size\) = NB"):
        ops.select_blocks(q, kmin, kmax, L, block_size=32, k_cache=k)
    coarse = ops.block_summaries(k, L, 32)                      # NB = 2 blocks of 32
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        ops.select_blocks(q, *coarse, L, block_size=16)         # 2 * 16 < 64: lengths too long
