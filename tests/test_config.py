import pytest

from resa_tl import ReSAConfig


def test_defaults_are_the_papers_plus_one_sink_block():
    c = ReSAConfig()
    assert (c.block_size, c.sparse_ratio, c.min_blocks, c.local_blocks, c.rectify_every) == \
        (16, 0.1, 16, 1, 32)
    assert c.sink_blocks == 1                   # not in the paper; measured better
    assert c == ReSAConfig(sink_blocks=1)
    assert ReSAConfig(sink_blocks=0).sink_blocks == 0          # the paper's selection


def test_default_sink_fits_the_budget():
    """The default sink block is dropped where the forced blocks would not fit, and re-resolved
    by replace() unless it was set explicitly."""
    assert ReSAConfig(min_blocks=1).sink_blocks == 0           # 1 local block fills it
    assert ReSAConfig(min_blocks=1, local_blocks=0).sink_blocks == 1
    c = ReSAConfig(min_blocks=1, local_blocks=0)
    assert c.replace(local_blocks=1).sink_blocks == 0
    assert c.replace(min_blocks=4, local_blocks=1).sink_blocks == 1
    explicit = ReSAConfig(min_blocks=2, local_blocks=0, sink_blocks=2)
    with pytest.raises(ValueError, match="sink_blocks"):
        explicit.replace(local_blocks=1)                       # 2 + 1 > 2: not silently changed
    assert ReSAConfig(sink_blocks=0).replace(min_blocks=32).sink_blocks == 0


@pytest.mark.parametrize("field,value", [
    ("block_size", 8), ("block_size", 24), ("block_size", 256), ("block_size", 16.0),
    ("sparse_ratio", 0.0), ("sparse_ratio", 1.5), ("sparse_ratio", -0.1), ("sparse_ratio", "0.1"),
    ("min_blocks", 0), ("min_blocks", 2.5),
    ("local_blocks", -1), ("local_blocks", 17),
    ("rectify_every", -1), ("rectify_every", 1.0),
    ("sink_blocks", -1), ("sink_blocks", 1.0), ("sink_blocks", 16),   # 16 + 1 local > 16
])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ReSAConfig(**{field: value})


def test_valid_edges_and_replace():
    c = ReSAConfig(block_size=128, sparse_ratio=1.0, min_blocks=1, local_blocks=0, rectify_every=0)
    assert c.replace(local_blocks=1).local_blocks == 1
    with pytest.raises(ValueError, match="local_blocks"):
        c.replace(local_blocks=2)            # > min_blocks
    assert ReSAConfig(sink_blocks=15).sink_blocks == 15          # 15 + 1 local = min_blocks
    assert c.replace(sink_blocks=1).sink_blocks == 1                # 1 + 0 local = min_blocks
    with pytest.raises(ValueError, match="sink_blocks"):
        c.replace(local_blocks=1, sink_blocks=1)                    # 2 forced > min_blocks 1
    with pytest.raises(TypeError, match="unknown ReSAConfig field"):
        c.replace(ratio=0.5)
