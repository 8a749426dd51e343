"""CPU checks of bench_generate.py's bookkeeping: the averaging window covers whole
rectification cycles, the cache capacity it precompiles for is the one generate() asks for, and
the profile's busy time counts the steady window only."""
import json
import os
import sys

import pytest
import torch

# the benchmark modules import each other as top-level modules (as when run as scripts);
# no conftest.py here: a second module named "conftest" would shadow tests/conftest.py
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")
import bench_generate  # noqa: E402

import resa_tl  # noqa: E402


def tiny_llama(seed: int):
    """A one-layer Llama (GQA 2:1, head_dim 16), random weights from ``seed``."""
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=4096)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_steady_window_is_whole_cycles_after_the_first():
    cycle = 5
    steps = list(range(23))                       # 4 whole cycles of 5, then 3 steps
    window = bench_generate.steady_steps(steps, cycle)
    assert window == list(range(5, 20))           # cycles 2-4; neither the first nor the tail
    assert len(window) % cycle == 0
    assert all((i + 1) % cycle == 0 for i in window[cycle - 1::cycle])   # each ends a cycle
    assert bench_generate.steady_steps(list(range(9)), cycle) == list(range(9))


def test_precompiled_capacity_is_what_generate_asks_for():
    """capacity_for(context, new_tokens) names the ReSA cache generate() creates: that is the
    shape the TileLang kernels are compiled for (the selection kernel per number of blocks)."""
    model = tiny_llama(seed=0)
    for context, new in ((1020, 6), (1020, 5), (300, 3)):
        resa_tl.attach(model, rectify_every=4)      # a fresh cache (attach replaces the state)
        ids = torch.randint(3, 64, (1, context))
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, return_dict_in_generate=True)
        assert out.past_key_values.max_cache_len == bench_generate.capacity_for(context, new)
    assert bench_generate.capacity_for(1020, 6) == 2048
    assert bench_generate.capacity_for(1020, 5) == 1024


def test_trace_summary_counts_the_steady_window_only():
    """The profile's busy time: kernels of the prefill that run past the first marks do not
    count, kernels are clipped to the window, overlapping kernels count once in the busy time
    (each in its class), and the window is the timing's (whole cycles, the first left out)."""
    cycle = 2
    marks = [1000.0 * i for i in range(7)]           # after the prefill, then 6 decode steps
    ev = [dict(name="bench_generate_step", ts=t, cat="user_annotation") for t in marks]

    def kernel(name, ts, dur):
        ev.append(dict(name=name, ts=ts, dur=dur, cat="kernel"))

    kernel("gemm prefill tail", 0.0, 1500.0)         # the prefill's last kernels: before it
    kernel("gemm", 1200.0, 400.0)                    # the first cycle: left out
    kernel("gemm", 1900.0, 300.0)                    # straddles the window's start: 200 in it
    kernel("sparse_decode split", 3000.0, 500.0)
    kernel("sparse_decode_kernel_1 combine", 3200.0, 500.0)   # overlaps the split by 300
    kernel("gemm", 5800.0, 400.0)                    # straddles the window's end: 200 in it
    out = bench_generate.trace_summary(ev, cycle, lambda n: n.split()[0])
    assert out["steps"] == 4                          # steps 3-6: marks[2] .. marks[6]
    assert out["window_ms_per_step"] == pytest.approx(1.0)
    assert out["launches_per_step"] == pytest.approx(4 / 4)
    # union inside [2000, 6000]: 2000-2200, 3000-3700, 5800-6000 = 200 + 700 + 200 us
    assert out["gpu_busy_ms_per_step"] == pytest.approx(1.1 / 4)
    k = out["kernel_ms_per_step"]
    assert k == pytest.approx({"gemm": 0.4 / 4, "sparse_decode": 0.5 / 4,
                               "sparse_decode_kernel_1": 0.5 / 4})


def test_lossless_mode_replays_recorded_verdicts(tmp_path):
    """--modes lossless --acceptance: row b replays the b-th stretch of the recorded streams,
    so the rejections land where the file says, whatever the random model would do; the row
    reports acceptance and tokens per dense pass; the capacity includes the lossless slack."""
    model = tiny_llama(seed=0)
    new = 24
    streams = {"a": [1] * 10 + [0] + [1] * 13 + [1] * 5 + [0] * 19,     # 2 stretches of 24
               "b": [1, 0] * 12}
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"header": {}, "streams": streams}))
    replay = bench_generate.replay_streams(str(path), 3, new)
    assert replay == [streams["a"][:24], streams["a"][24:48], streams["b"]]
    with pytest.raises(ValueError, match="3 stretches"):
        bench_generate.replay_streams(str(path), 4, new)
    rcfg = resa_tl.ReSAConfig(sparse_ratio=0.1, min_blocks=1, rectify_every=8)
    ids = torch.randint(3, 64, (3, 200))
    with torch.no_grad():
        row = bench_generate.run_mode(model, ids, "lossless", new, rcfg, calls=1,
                                      replay=replay)
    assert row["generated"] == new and row["replayed"]
    assert 0 < row["acceptance"] < 1 and row["tokens_per_pass"] > 1
    assert bench_generate.capacity_for(200, new, 1, rcfg.replace(lossless=True)) == \
        bench_generate.capacity_for(200, new + 9, 1)


def test_replayed_rejections_land_where_recorded(monkeypatch):
    """The lossless loop with replay_acceptance: each row's rejections are at the recorded
    positions (VerifyStats.agreement gives the same stream back where the row was verified).
    Always proposing (no dense steps, which this CPU's timings might choose)."""
    from resa_tl.integration import lossless
    monkeypatch.setattr(lossless, "DENSE_STEPS", False)
    model = tiny_llama(seed=1)
    resa_tl.attach(model, sparse_ratio=0.1, min_blocks=1, rectify_every=8, lossless=True)
    cache = resa_tl.integration.warm_up(model, 2, 300)
    streams = [[1] * 40, [1] * 40]
    for p in (3, 4, 17, 30):
        streams[0][p] = 0
    streams[1][9] = 0
    cache.replay_acceptance = streams
    ids = torch.randint(3, 64, (2, 250))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=None,
                             pad_token_id=0, return_dict_in_generate=True)
    stats = out.past_key_values.lossless_stats
    zeros = [{p for p, v in enumerate(stats.agreement(b, 250)) if not v} for b in range(2)]
    # a recorded rejection applies where this run proposes a token (not where a full window's
    # extra dense token falls); no other position is rejected
    assert {3, 4} <= zeros[0] <= {3, 4, 17, 30}
    assert zeros[1] <= {9}
    # row 1 rejected once, row 0 four times: the rows accepted different counts in one pass
    assert any(len({t[b][2] for b in range(2)}) > 1
               for t in zip(*stats.trace))
