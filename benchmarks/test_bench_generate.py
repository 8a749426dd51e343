"""CPU checks of bench_generate.py's bookkeeping: the averaging window covers whole
rectification cycles, the cache capacity it precompiles for is the one generate() asks for, and
the profile's busy time counts the steady window only."""
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
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=4096)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
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
