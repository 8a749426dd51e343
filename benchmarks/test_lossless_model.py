"""lossless_model.simulate: the predicted speed of the lossless mode from verdicts and step
times, on streams whose answer is known."""
import pytest

from lossless_model import simulate

W = (32, 16, 8, 4)


def test_full_agreement_grows_to_the_largest_window():
    r = simulate([[1] * 400] * 2, W, sparse_ms=1.0, dense_ms=10.0)
    assert r["acceptance"] == 1.0 and r["dense_steps"] == 0
    # a pass of 32 proposals commits 33 tokens for 32 + 10 ms; the first windows are shorter
    assert 42 / 33 < r["ms_per_token"] < 1.5
    assert r["speedup_vs_dense"] == pytest.approx(10.0 / r["ms_per_token"])


def test_no_agreement_falls_back_to_dense_steps():
    streams = [[0] * 300] * 4
    with_dense = simulate(streams, W, sparse_ms=5.0, dense_ms=10.0)
    assert with_dense["dense_steps"] > 280 and with_dense["verify_passes"] < 15   # retries
    assert with_dense["speedup_vs_dense"] > 0.9          # about dense decoding's speed
    only = simulate(streams, W, sparse_ms=5.0, dense_ms=10.0, dense_steps=False)
    assert only["dense_steps"] == 0
    assert only["ms_per_token"] == pytest.approx(4 * 5.0 + 10.0, rel=0.05)   # 1 token a pass


def test_rows_wait_for_the_slowest():
    """The batch ends when its slowest row has committed every token."""
    fast, slow = [1] * 200, [1, 0] * 100
    both = simulate([fast, slow], W, 1.0, 10.0, dense_steps=False)
    alone = simulate([fast, fast], W, 1.0, 10.0, dense_steps=False)
    assert both["ms_per_token"] > alone["ms_per_token"]
