"""ReSACache: appends and rewinds keep block summaries equal to a rebuild from scratch."""
import random

import pytest
import torch

import naive
from resa_tl import ReSAConfig, ops
from resa_tl.cache import ReSACache


@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_incremental_summaries_equal_rebuild(bs, dtype):
    rng = random.Random(bs)
    torch.manual_seed(bs)
    B, S, Hkv, D = 3, 300, 2, 64
    cache = ReSACache(1, B, S, Hkv, D, config=ReSAConfig(block_size=bs), dtype=dtype)
    prompt = torch.randn(B, 40, Hkv, D).to(dtype)
    cache.prefill(0, prompt, prompt * 2, [40, 17, 1])
    for _ in range(25):
        if rng.random() < 0.7:
            n = rng.choice([1, 1, 1, 5, 33])
            if cache.max_length() + n > S:
                continue
            kv = torch.randn(B, n, Hkv, D).to(dtype)
            cache.append(0, kv, kv)
        else:
            cache.rewind(rng.randint(0, cache.min_length()))
        L = cache.lengths(0)
        rmin, rmax = naive.summaries(cache.k[0], L, bs)
        for b in range(B):
            nv = -(-int(L[b]) // bs)        # only blocks a row holds are specified
            assert torch.equal(cache.kmin[0][b, :nv].double(), rmin[b, :nv])
            assert torch.equal(cache.kmax[0][b, :nv].double(), rmax[b, :nv])
    assert cache.max_length() == int(cache.lengths(0).max())
    assert cache.min_length() == int(cache.lengths(0).min())


def test_append_writes_at_each_rows_end():
    B, Hkv, D = 2, 1, 64
    cache = ReSACache(2, B, 64, Hkv, D, dtype=torch.float32)
    p = torch.randn(B, 10, Hkv, D)
    for layer in range(2):
        cache.prefill(layer, p, p, torch.tensor([10, 3]))
    new = torch.randn(B, 2, Hkv, D)
    cache.append(1, new, -new)
    assert cache.lengths(1).tolist() == [12, 5] and cache.lengths(0).tolist() == [10, 3]
    assert torch.equal(cache.k[1][0, 10:12], new[0]) and torch.equal(cache.k[1][1, 3:5], new[1])
    assert torch.equal(cache.v[1][1, 3:5], -new[1])
    assert torch.equal(cache.k[1][0, :10], p[0])


def test_cache_errors():
    cache = ReSACache(1, 2, 32, 1, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="exceeds the cache capacity max_seq_len=32"):
        cache.prefill(0, torch.zeros(2, 33, 1, 64), torch.zeros(2, 33, 1, 64))
    kv = torch.randn(2, 30, 1, 64).half()
    cache.prefill(0, kv, kv, [30, 20])
    with pytest.raises(ValueError, match="would exceed the cache capacity max_seq_len=32"):
        cache.append(0, kv[:, :3], kv[:, :3])
    with pytest.raises(ValueError, match="shortest row of layer 0 holds 20"):
        cache.rewind(21)
    with pytest.raises(ValueError, match=r"key must be \[B=2, n, Hkv=1, D=64\]"):
        cache.append(0, kv[:, :1, :, :32], kv[:, :1])
    with pytest.raises(TypeError, match="dtype must be float16, bfloat16 or float32"):
        ReSACache(1, 1, 8, 1, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match="max_seq_len must be an int >= 1"):
        ReSACache(1, 1, 0, 1, 64)
