"""Schedules (resa_tl/schedules.py) and the autotuner's CPU-side parts (autotune/): parsing and
validation, provenance, rejection of corrupt / other-arch / other-TileLang files with one
warning and the heuristic, nearest-shape lookup, dispatch memoisation, workloads, search spaces,
validation logic, winner selection, and ``--compile-only`` on a tiny workload. (Over ~450
lines: it covers the schedule format and the tuner's CPU side, which share fixtures.)"""
import copy
import dataclasses
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from resa_tl import schedules
from resa_tl.schedules import ScheduleError, ScheduleWarning

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from autotune import run as at_run  # noqa: E402
from autotune import spaces, workloads  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Cfg:
    block_N: int = 64
    num_stages: int = 2
    threads: int = 128

    def __post_init__(self):
        if self.block_N % 16:
            raise ValueError("block_N must be a multiple of 16")


TL = schedules.tilelang_version() or "0.1.15"


def prov(**over):
    p = dict(gpu="NVIDIA H100 80GB HBM3", sm_count=132, driver="580.159.04", cuda="13.0",
             torch="2.11.0+cu130", tilelang=TL, date="2026-11-27T12:00:00Z",
             git_commit="0123abc", source_sha256="ffff")
    p.update(over)
    return p


def entry(op="dense_decode", cfg=None, tuned=True, lat=100.0, **key):
    k = dict(dtype="bfloat16", head_dim=128, g=7, hkv=4, context=65536, batch=4)
    k.update(key)
    return {"op": op, "key": k, "config": cfg or {"block_N": 128}, "tuned": tuned,
            "latency_us": lat if tuned else None, "default_latency_us": 130.0 if tuned else None,
            "speedup_vs_default": 1.3 if tuned else None, "margin_vs_runner_up": 0.05}


def sched_obj(entries=None, arch="sm90", tuned=True, **prov_over):
    return {"format": schedules.FORMAT, "arch": arch, "tuned": tuned,
            "provenance": prov(**prov_over),
            "entries": entries if entries is not None else [entry()]}


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No user cache, no env override, fresh memo/warnings for every test."""
    monkeypatch.setenv("RESA_TL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RESA_TL_SCHEDULE", raising=False)
    schedules.reset()
    yield
    schedules.reset()


def write(tmp_path, obj, name="sched.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def lookup(op="dense_decode", default=Cfg(), arch="sm_90a", **shape):
    s = dict(dtype=torch.bfloat16, head_dim=128, g=7, hkv=4, context=65536, batch=4)
    s.update(shape)
    return schedules.config_for(op, default, arch=arch, **s)


def schedule_warnings(rec):
    return [w for w in rec if issubclass(w.category, ScheduleWarning)]


# ------------------------------------------------------------------------------------------
# parsing and validation
# ------------------------------------------------------------------------------------------

def test_parse_roundtrip_and_deterministic_write(tmp_path):
    obj = sched_obj([entry(context=4096), entry(context=262144, batch=1)])
    s = schedules.parse_schedule(obj, installed_tilelang=TL)
    assert s.arch == "sm90" and s.tuned and len(s.entries) == 2
    assert s.provenance["sm_count"] == 132
    p1 = schedules.write_schedule(s, tmp_path / "a.json")
    s2 = schedules.load_schedule(p1)
    p2 = schedules.write_schedule(s2, tmp_path / "b.json")
    assert p1.read_text() == p2.read_text()
    # shuffled entries write identically (sorted by op and key)
    obj2 = copy.deepcopy(obj)
    obj2["entries"].reverse()
    p3 = schedules.write_schedule(schedules.parse_schedule(obj2, installed_tilelang=TL),
                                  tmp_path / "c.json")
    assert p3.read_text() == p1.read_text()


@pytest.mark.parametrize("mutate, msg", [
    (lambda o: o.update(format="other/9"), "format"),
    (lambda o: o.update(arch="hopper"), "arch"),
    (lambda o: o.update(tuned="yes"), "tuned"),
    (lambda o: o["provenance"].pop("driver"), "provenance lacks ['driver']"),
    (lambda o: o["provenance"].pop("git_commit"), "git_commit"),
    (lambda o: o["provenance"].update(tilelang="latest"), "provenance.tilelang"),
    (lambda o: o.update(entries={}), "entries"),
    (lambda o: o["entries"][0].update(op="flash_attn"), "unknown op"),
    (lambda o: o["entries"][0]["key"].pop("g"), "missing ['g']"),
    (lambda o: o["entries"][0]["key"].update(extra=1), "unexpected ['extra']"),
    (lambda o: o["entries"][0]["key"].update(head_dim=0), "head_dim"),
    (lambda o: o["entries"][0]["key"].update(dtype="float32"), "dtype"),
    (lambda o: o["entries"][0].update(config={}), "config"),
    (lambda o: o["entries"][0].update(config={"block_N": [64]}), "config"),
    (lambda o: o["entries"][0].update(latency_us=None), "needs latency_us"),
    (lambda o: o["entries"][0].update(latency_us=float("nan")), "latency_us"),
    (lambda o: o["entries"].append(copy.deepcopy(o["entries"][0])), "duplicate"),
    (lambda o: o.update(tuned=False), "tuned entry in a schedule whose header says tuned=false"),
])
def test_validation_errors_name_the_problem(mutate, msg):
    obj = sched_obj()
    mutate(obj)
    with pytest.raises(ScheduleError, match=None) as ei:
        schedules.parse_schedule(obj, path="x.json", installed_tilelang=TL)
    assert msg in str(ei.value) and "x.json" in str(ei.value)


def test_untuned_schedule_parses_without_latencies():
    obj = sched_obj([entry(tuned=False)], tuned=False)
    s = schedules.parse_schedule(obj, installed_tilelang=TL)
    assert not s.tuned and not s.entries[0].tuned


def test_tilelang_version_compatibility():
    assert schedules.tilelang_compatible("0.1.15", "0.1.15")
    assert schedules.tilelang_compatible("0.1.15", "0.1.15+cu130.gitabc")
    assert not schedules.tilelang_compatible("0.1.15", "0.1.16")
    assert not schedules.tilelang_compatible("0.1.15", "0.2.0")
    with pytest.raises(ScheduleError, match="TileLang 0.1.14"):
        schedules.parse_schedule(sched_obj(tilelang="0.1.14"), installed_tilelang="0.1.15")


def test_arch_names():
    assert schedules.arch_key("sm_90a") == "sm90" == schedules.arch_key("sm90")
    assert schedules.arch_key("sm_80") == "sm80" and schedules.arch_key("89") == "sm89"
    assert schedules.target_arch("sm90") == "sm_90a" and schedules.target_arch("sm_80") == "sm_80"
    assert schedules.target_arch("sm89") == "sm_89"
    with pytest.raises(ValueError):
        schedules.arch_key("hopper")


# ------------------------------------------------------------------------------------------
# nearest-shape lookup
# ------------------------------------------------------------------------------------------

def test_nearest_shape_lookup():
    es = [entry(cfg={"block_N": 32}, context=4096, batch=1),
          entry(cfg={"block_N": 64}, context=65536, batch=1),
          entry(cfg={"block_N": 128}, context=262144, batch=16),
          entry(cfg={"block_N": 16}, head_dim=64, context=65536, batch=1)]
    s = schedules.parse_schedule(sched_obj(es), installed_tilelang=TL)
    base = dict(dtype="bfloat16", head_dim=128, g=7, hkv=4)
    assert s.lookup("dense_decode", **base, context=4096, batch=1).config["block_N"] == 32
    assert s.lookup("dense_decode", **base, context=8192, batch=1).config["block_N"] == 32
    assert s.lookup("dense_decode", **base, context=49152, batch=2).config["block_N"] == 64
    assert s.lookup("dense_decode", **base, context=200000, batch=8).config["block_N"] == 128
    # head_dim is exact: d64 only matches the d64 entry
    assert s.lookup("dense_decode", **{**base, "head_dim": 64}, context=65536,
                    batch=2).config["block_N"] == 16
    # context and batch borrow within one octave, not further (the heuristic takes over)
    assert s.lookup("dense_decode", **base, context=16384, batch=1) is None      # 2 octaves
    assert s.lookup("dense_decode", **base, context=65536, batch=4) is None      # 2 octaves
    assert s.lookup("dense_decode", **base, context=131072, batch=2).config["block_N"] == 64
    assert s.lookup("dense_decode", **{**base, "head_dim": 256}, context=4096, batch=1) is None
    # g may borrow within one octave (g=6 -> g=7), not further (g=1)
    assert s.lookup("dense_decode", **{**base, "g": 6}, context=4096, batch=1) is not None
    assert s.lookup("dense_decode", **{**base, "g": 1}, context=4096, batch=1) is None
    # another dtype borrows (penalised), another op never
    assert s.lookup("dense_decode", **{**base, "dtype": "float16"}, context=4096,
                    batch=1).config["block_N"] == 32
    assert s.lookup("rectify_attention", **base, T=33, context=4096, batch=1) is None


def test_summaries_entries_serve_only_their_kv_head_count():
    """Summary kernels' best CTA shape depends on the KV-head count: a tuned entry measured
    1.7-1.8x slower than the heuristic when it served another Hkv, so it never does."""
    key = dict(dtype="bfloat16", head_dim=128, block_size=16, batch=1)
    es = [dict(entry(cfg={"threads": 128, "blocks_per_cta": 2}), op="block_summaries",
               key={**key, "hkv": 8, "context": 32768})]
    s = schedules.parse_schedule(sched_obj(es), installed_tilelang=TL)
    assert s.lookup("block_summaries", **key, hkv=8, context=65536) is not None
    assert s.lookup("block_summaries", **key, hkv=4, context=32768) is None


def test_lookup_prefers_same_dtype_and_breaks_ties_deterministically():
    es = [entry(cfg={"block_N": 32}, dtype="float16", context=65536),
          entry(cfg={"block_N": 64}, dtype="bfloat16", context=131072)]
    s = schedules.parse_schedule(sched_obj(es), installed_tilelang=TL)
    k = dict(dtype="float16", head_dim=128, g=7, hkv=4, batch=4)
    assert s.lookup("dense_decode", **k, context=65536).config["block_N"] == 32
    # equidistant in context (one octave each side): lower key order wins, in any file order
    es = [entry(cfg={"block_N": 64}, context=131072), entry(cfg={"block_N": 32}, context=32768)]
    for order in (es, es[::-1]):
        s = schedules.parse_schedule(sched_obj(order), installed_tilelang=TL)
        assert s.lookup("dense_decode", **{**k, "dtype": "bfloat16"},
                        context=65536).config["block_N"] == 32


def test_untuned_entries_are_never_picked():
    es = [entry(cfg={"block_N": 32}, context=32768), dict(entry(cfg={"block_N": 64}),
                                                           tuned=False, latency_us=None)]
    s = schedules.parse_schedule(sched_obj(es), installed_tilelang=TL)
    k = dict(dtype="bfloat16", head_dim=128, g=7, hkv=4, batch=4)
    assert s.lookup("dense_decode", **k, context=65536).config["block_N"] == 32


# ------------------------------------------------------------------------------------------
# run-time dispatch: sources, rejection with one warning, memoisation
# ------------------------------------------------------------------------------------------

def test_config_for_uses_env_schedule(tmp_path, monkeypatch):
    p = write(tmp_path, sched_obj([entry(cfg={"block_N": 128, "num_stages": 3})]))
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = lookup()
    assert got == Cfg(block_N=128, num_stages=3, threads=128)
    # dict defaults merge too
    assert lookup(default={"block_N": 64, "num_stages": 1, "threads": 128}) == \
        {"block_N": 128, "num_stages": 3, "threads": 128}
    # a directory holding <arch>.json works as well
    d = tmp_path / "dir"
    d.mkdir()
    write(d, sched_obj([entry(cfg={"block_N": 32})]), "sm90.json")
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(d))
    schedules.reset()
    assert lookup().block_N == 32


def test_config_for_is_memoised(tmp_path, monkeypatch):
    p = write(tmp_path, sched_obj([entry(cfg={"block_N": 128})]))
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    calls = []
    real = schedules._resolve
    monkeypatch.setattr(schedules, "_resolve", lambda *a: calls.append(a) or real(*a))
    first = lookup()
    for _ in range(100):
        assert lookup() is first
    assert len(calls) == 1
    lookup(batch=16)                                  # another static shape: one more resolve
    assert len(calls) == 2


@pytest.mark.parametrize("content, reason", [
    ("{not json", "corrupt JSON"),
    (json.dumps(sched_obj(arch="sm80")), "stamped for arch sm80"),
    (json.dumps(sched_obj(tilelang="0.0.1")), "TileLang 0.0.1"),
    (json.dumps({"format": schedules.FORMAT}), "arch"),
])
def test_rejected_file_falls_back_with_one_warning(tmp_path, monkeypatch, content, reason):
    p = write(tmp_path, content)
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        outs = [lookup(batch=b) for b in (1, 2, 4, 8)] + [lookup(op="rectify_attention", T=33)]
    assert all(o == Cfg() for o in outs)
    ws = schedule_warnings(rec)
    assert len(ws) == 1, [str(w.message) for w in ws]
    assert reason in str(ws[0].message) and str(p) in str(ws[0].message)
    assert "heuristic" in str(ws[0].message)


def test_no_fitting_entry_warns_once_per_op(tmp_path, monkeypatch):
    p = write(tmp_path, sched_obj([entry(head_dim=64)]))
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for ctx in (4096, 8192, 65536):
            assert lookup(context=ctx) == Cfg()
    ws = schedule_warnings(rec)
    assert len(ws) == 1 and "no entry for dense_decode" in str(ws[0].message)


def test_entry_that_does_not_fit_the_config_class(tmp_path, monkeypatch):
    p = write(tmp_path, sched_obj([entry(cfg={"block_N": 64, "warp_count": 4}),
                                   entry(cfg={"block_N": 24}, context=4096)]))
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert lookup() == Cfg() and lookup() == Cfg()
        assert lookup(context=4096) == Cfg()             # block_N=24 fails Cfg's check
    ws = schedule_warnings(rec)
    assert len(ws) == 2
    assert "warp_count" in str(ws[0].message) and "multiple of 16" in str(ws[1].message)


def test_untuned_schedule_and_off_switch_use_heuristics_silently(tmp_path, monkeypatch):
    p = write(tmp_path, sched_obj([entry(cfg={"block_N": 128}, tuned=False)], tuned=False))
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(p))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup() == Cfg()
        monkeypatch.setenv("RESA_TL_SCHEDULE", "off")
        schedules.reset()
        assert schedules.active_schedule("sm90") is None and lookup() == Cfg()


def test_user_cache_overrides_packaged(tmp_path, monkeypatch):
    cache = tmp_path / "cache" / "schedules"
    cache.mkdir(parents=True)
    write(cache, sched_obj([entry(cfg={"block_N": 16})]), "sm90.json")
    srcs = schedules.schedule_sources("sm_90a")
    assert srcs[0] == ("user cache", cache / "sm90.json")
    assert lookup().block_N == 16
    assert schedules.describe("sm_90a").startswith(f"sm90: {cache / 'sm90.json'}")


def test_missing_schedule_warns_once(monkeypatch, tmp_path):
    monkeypatch.setattr(schedules, "PACKAGE_DIR", tmp_path / "none1")
    monkeypatch.setattr(schedules, "REPO_DIR", tmp_path / "none2")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert lookup(arch="sm_86") == Cfg() and lookup(arch="sm_86", batch=1) == Cfg()
    ws = schedule_warnings(rec)
    assert len(ws) == 1 and "no kernel schedule for sm86" in str(ws[0].message)


def test_shipped_schedules_parse_and_are_packaged():
    """Every schedule in schedules/ is valid for its arch; resa_tl/schedule_data points at it
    (the package data that wheels carry)."""
    files = sorted((REPO / "schedules").glob("*.json"))
    assert files, "no schedule shipped in schedules/"
    for f in files:
        s = schedules.load_schedule(f, expect_arch=f.stem, installed_tilelang=None)
        assert s.entries and s.arch == f.stem
        assert (REPO / "resa_tl" / "schedule_data" / f.name).read_bytes() == f.read_bytes()
        # a schedule the runtime would not use (untuned) is not shipped: the heuristics are it
        assert s.tuned and all(e.tuned for e in s.entries), f"{f.name} is not tuned"
    assert "sm90" in {f.stem for f in files}


# ------------------------------------------------------------------------------------------
# autotune: workloads, spaces, validation logic, winner selection, schedule building
# ------------------------------------------------------------------------------------------

def test_presets_and_config_json(tmp_path):
    q = workloads.resolve_model("qwen2.5-7b")
    assert (q.hq, q.hkv, q.head_dim, q.g, q.dtype) == (28, 4, 128, 7, "bfloat16")
    assert workloads.resolve_model("llama-3-8b").g == 4
    assert workloads.resolve_model("smollm2-135m").head_dim == 64
    cfg = {"num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 1536,
           "torch_dtype": "float16", "model_type": "qwen2"}
    write(tmp_path, cfg, "config.json")
    h = workloads.resolve_model(str(tmp_path))
    assert (h.hq, h.hkv, h.head_dim, h.g, h.dtype) == (12, 2, 128, 6, "float16")
    write(tmp_path, {"text_config": {"num_attention_heads": 8, "head_dim": 64}}, "config.json")
    assert workloads.resolve_model(str(tmp_path / "config.json")).hkv == 8
    with pytest.raises(ValueError, match="--model"):
        workloads.resolve_model("no-such-model")


def test_default_workload_covers_the_issue_grid():
    ops = list(schedules.KEY_SPECS)
    probs = workloads.default_workload(ops)
    assert probs == workloads.default_workload(ops)              # deterministic
    keys = [p.key for p in probs]
    assert {p.op for p in probs} == set(ops)
    assert {k["head_dim"] for k in keys} == {64, 128}
    assert {k["g"] for k in keys if "g" in k} == set(range(1, 9))
    assert {k["block_size"] for k in keys if "block_size" in k} == {16, 32, 64}
    ctx = {k["context"] for k in keys if "context" in k}
    assert min(ctx) == 4096 and max(ctx) == 262144
    assert {k["batch"] for k in keys} == {1, 4, 8, 16}
    mid = {(p.op, p.key["g"]) for p in probs if p.key["batch"] in (4, 8) and "g" in p.key}
    assert {g for _, g in mid} == {4, 7}                          # the two main models only
    assert {op for op, _ in mid} == set(ops) - {"block_summaries", "update_block_summaries"}
    assert {k["dtype"] for k in keys} == {"float16", "bfloat16"}
    for p in probs:                                               # valid keys
        schedules.make_key(p.op, **p.key)
    m = workloads.model_workload(workloads.PRESETS["qwen2.5-7b"], ops)
    assert all(p.key.get("g", 7) == 7 for p in m) and {p.key["batch"] for p in m} == {1, 4, 16}


def _available(op):
    return spaces.adapter(op).available() is None


@pytest.mark.parametrize("op", spaces.OPS)
@pytest.mark.parametrize("target", ["sm_90a", "sm_80", "sm_89"])
def test_spaces_include_default_and_are_deterministic(op, target):
    ad = spaces.adapter(op)
    if ad.available() is not None:
        pytest.skip(f"{op}: {ad.available()}")
    probs = [p for p in workloads.default_workload([op])][:6]
    for p in probs:
        default = ad.default_config(p.key, target)
        sp = ad.space(p.key, target)
        assert default in sp and sp == ad.space(p.key, target)
        assert len(sp) <= ad.max_candidates and len(set(map(ad._ident, sp))) == len(sp)
        for c in sp:
            if target != "sm_90a" and hasattr(c, "num_stages"):
                assert c.num_stages <= 1, "runtime trip count: at most 1 cp.async stage"
            assert ad.config_from_dict(dataclasses.asdict(c)) == c


@pytest.mark.parametrize("op", ["rectify_attention", "select_blocks", "block_summaries",
                                "update_block_summaries", "dense_decode", "sparse_decode"])
def test_validation_accepts_reference_and_rejects_garbage(op):
    """The checks a candidate must pass, exercised on the CPU with the torch reference standing
    in for the kernel: the reference passes, a corrupted output fails."""
    ad = spaces.adapter(op)
    key = ad.validation_key(next(p.key for p in workloads.tiny_workload([op])))
    gen = torch.Generator().manual_seed(0)
    inp = ad.make_inputs(key, "cpu", gen, ragged=True)
    if op == "rectify_attention":
        good = ad.reference(inp)
        bad = good.clone()
        bad[0, -1, 0, 0] += 1.0
    elif op in ("dense_decode", "sparse_decode"):
        good = ad.reference(inp)
        bad = good.clone()
        bad[-1, -1, 0] = float("nan")
    elif op == "select_blocks":
        good = ad.reference(inp)
        bad = good.flip(-1)
    elif op == "block_summaries":
        good = ad.reference(inp)
        bad = (good[0], good[1] + 1)
    else:
        kmin, kmax = ad.reference(inp)                 # in place, as the kernel
        good = (kmin, kmax)
        bad = (kmin, kmax.clone().fill_(0))
    assert ad.check(good, inp) is None
    assert ad.check(bad, inp) is not None


def cand(cfg, med, default=False, ok=True):
    return {"config": cfg, "is_default": default, "compile": {"ok": True},
            "validation": {"ok": ok, "error": None if ok else "x"},
            "timing": {"median_us": med, "p10_us": med, "p90_us": med, "mode": "graph"}}


def test_select_winner_rules():
    a, b, d = {"block_N": 32}, {"block_N": 64}, {"block_N": 128}
    # fastest valid wins
    assert at_run.select_winner([cand(d, 100, True), cand(a, 80), cand(b, 70, ok=False)]) == 1
    # the default keeps its place within the tie tolerance
    assert at_run.select_winner([cand(d, 100, True), cand(a, 99.5)]) == 0
    # exact ties: canonical config order, independent of candidate order
    c1, c2 = cand(b, 50), cand(a, 50)
    assert at_run.select_winner([c1, c2]) == 1 and at_run.select_winner([c2, c1]) == 0
    assert at_run.select_winner([cand(a, 5, ok=False)]) is None


def test_summarize_and_build_schedule_roundtrip():
    item = dict(op="dense_decode", key=dict(dtype="bfloat16", head_dim=128, g=7, hkv=4,
                                            context=65536, batch=4),
                label="x", static_id=(("g", 7),), default={"block_N": 128})
    cands = [cand({"block_N": 128}, 120.0, True), cand({"block_N": 64}, 100.0),
             cand({"block_N": 32}, 110.0)]
    p = at_run.summarize_problem(item, cands, copy_gbps=3000.0, bytes_moved=300_000_000)
    assert p["status"] == "tuned" and p["winner"] == {"block_N": 64}
    assert p["speedup_vs_default"] == pytest.approx(1.2)
    assert p["margin_vs_runner_up"] == pytest.approx(0.1)
    assert p["gbps"] == pytest.approx(3000.0) and p["roofline_pct"] == pytest.approx(100.0)
    failed = at_run.summarize_problem(dict(item, key={**item["key"], "batch": 1}),
                                      [cand({"block_N": 128}, 1, True, ok=False)], 3000.0, 1)
    assert failed["status"] == "no valid candidate"
    res = {"meta": {"provenance": prov(), "report_dir": "autotune/reports/sm90/x"},
           "problems": [p, failed]}
    s = at_run.build_schedule(res, "sm90", tuned=True)
    obj = s.to_json()
    s2 = schedules.parse_schedule(obj, installed_tilelang=TL)
    assert len(s2.entries) == 1 and s2.entries[0].config == {"block_N": 64}
    e = s2.entries[0].data
    assert e["latency_us"] == 100.0 and e["default_latency_us"] == 120.0
    assert s2.provenance["report"] == "autotune/reports/sm90/x"


def test_default_kept_within_tie_tolerance_roundtrips():
    """The default wins against a runner-up faster by < 1% (no churn on noise): the entry's
    margin over the runner-up is then negative, and the schedule must still parse (an H100
    run once failed to write its schedule on exactly this)."""
    item = dict(op="block_summaries", key=dict(dtype="bfloat16", head_dim=128, hkv=4,
                                               block_size=16, context=65536, batch=4),
                label="x", static_id=(), default={"threads": 128})
    cands = [cand({"threads": 128}, 100.0, True), cand({"threads": 256}, 99.5)]
    p = at_run.summarize_problem(item, cands, copy_gbps=3000.0, bytes_moved=10 ** 8)
    assert p["winner"] == {"threads": 128} and p["margin_vs_runner_up"] == pytest.approx(-0.005)
    res = {"meta": {"provenance": prov(), "report_dir": "autotune/reports/sm90/x"},
           "problems": [p]}
    obj = at_run.build_schedule(res, "sm90", tuned=True).to_json()
    e = schedules.parse_schedule(obj, installed_tilelang=TL).entries[0].data
    assert e["margin_vs_runner_up"] == pytest.approx(-0.005)
    obj["entries"][0]["margin_vs_runner_up"] = -1.5
    with pytest.raises(schedules.ScheduleError, match="margin_vs_runner_up"):
        schedules.parse_schedule(obj, installed_tilelang=TL)


def test_report_renders_from_results(tmp_path):
    from autotune import report
    item = dict(op="dense_decode", key=dict(dtype="bfloat16", head_dim=128, g=7, hkv=4,
                                            context=65536, batch=4),
                label="shape-a", static_id=(), default={"block_N": 128})
    p = at_run.summarize_problem(item, [cand({"block_N": 128}, 120.0, True),
                                        cand({"block_N": 64}, 100.0)], 3000.0, 10 ** 8)
    res = {"meta": {"mode": "tune", "arch": "sm90", "provenance": prov(),
                    "copy_bandwidth": {"gbps": 3000.0, "bytes": 2 ** 30}},
           "problems": [p], "compiles": [{"op": "dense_decode", "static": {"g": 7},
                                          "config": {"block_N": 16}, "ok": False,
                                          "error": "TypeError: Downcast"}]}
    md = report.write_report(res, tmp_path).read_text()
    assert "shape-a" in md and "N64" in md and "1.200x" in md
    assert "does NOT meet" not in md and "meets the 1.15x target" in md
    assert "Downcast" in md and "NVIDIA H100" in md


# ------------------------------------------------------------------------------------------
# the command line
# ------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_arch_without_gpu_points_at_compile_only(capsys):
    assert at_run.main(["--arch", "sm90", "--workload", "tiny", "--out", "-"]) == 2
    err = capsys.readouterr().err
    assert "--compile-only" in err and "sm90" in err
    assert at_run.main(["--arch", "sm90", "--check"]) == 2
    assert "--compile-only" in capsys.readouterr().err


def test_compile_only_records_failures_and_keeps_tuned_schedule(tmp_path, monkeypatch, capsys):
    """Inline (jobs 0) with a fake compile: a failing candidate is recorded, not fatal; the
    untuned schedule does not replace a tuned one without --force."""
    ad = spaces.adapter("block_summaries")
    if ad.available() is not None:
        pytest.skip(ad.available())

    def fake_compile(self, key, cfg, target):
        if cfg.threads == 512:
            raise RuntimeError("Downcast from tirx.Sub to ir.IntImm failed")

    monkeypatch.setattr(spaces.SummariesAdapter, "compile", fake_compile)
    out = tmp_path / "sm80.json"
    write(tmp_path, sched_obj(arch="sm80"), "sm80.json")
    rd = tmp_path / "rep"
    rc = at_run.main(["--arch", "sm80", "--compile-only", "--workload", "tiny", "--ops",
                      "block_summaries", "--jobs", "0", "--out", str(out), "--report-dir",
                      str(rd), "--no-progress"])
    assert rc == 0
    res = json.loads((rd / "results.json").read_text())
    comp = res["compiles"]
    assert any(c["ok"] is False and "Downcast" in c["error"] for c in comp)
    assert any(c["ok"] for c in comp)
    assert "Downcast" in (rd / "report.md").read_text()
    assert json.loads(out.read_text())["tuned"] is True          # kept
    assert "not replacing" in capsys.readouterr().out
    rc = at_run.main(["--arch", "sm80", "--compile-only", "--workload", "tiny", "--ops",
                      "block_summaries", "--jobs", "0", "--out", str(out), "--report-dir",
                      str(tmp_path / "rep2"), "--no-progress", "--force", "--space",
                      "heuristic"])
    s = schedules.load_schedule(out, expect_arch="sm80")
    assert rc == 0 and not s.tuned and len(s.entries) == 1


@pytest.mark.compile
def test_compile_only_tiny_workload_real(tmp_path):
    """Real TileLang + nvcc compiles in 2 worker processes for sm_80 (the summaries kernels:
    the fastest to compile; a few candidates each)."""
    ops = [o for o in ("block_summaries", "update_block_summaries") if _available(o)]
    if not ops:
        pytest.skip("summaries kernels not available")
    out, rd = tmp_path / "sm80.json", tmp_path / "rep"
    rc = at_run.main(["--arch", "sm80", "--compile-only", "--workload", "tiny", "--ops",
                      ",".join(ops), "--max-candidates", "2", "--jobs", "2", "--out", str(out),
                      "--report-dir", str(rd), "--no-progress"])
    assert rc == 0
    res = json.loads((rd / "results.json").read_text())
    assert res["meta"]["mode"] == "compile-only" and res["meta"]["arch"] == "sm80"
    assert len(res["compiles"]) >= 2 and all(c["ok"] for c in res["compiles"]), res["compiles"]
    s = schedules.load_schedule(out, expect_arch="sm80")
    assert not s.tuned and {e.op for e in s.entries} == set(ops)
    assert s.provenance["tilelang"] == TL and s.provenance["git_commit"]


# ------------------------------------------------------------------------------------------
# the GPU-side flow, exercised on the CPU
# ------------------------------------------------------------------------------------------

def test_gpu_runner_survives_crash_and_hang():
    """A candidate that kills or hangs the GPU process is recorded as such; the problem is
    finished in a fresh process and later problems still run."""
    from autotune._testing import fake_gpu_child
    runner = at_run.GpuRunner({}, child=fake_gpu_child, watchdog_s=4)
    info = runner.start(copy_bw=True)
    assert info["copy_bandwidth"]["gbps"] == 3000.0
    try:
        mk = lambda cfg: {"config": cfg, "is_default": False, "compile": {"ok": True}}  # noqa
        res = runner.run_task({"idx": 0, "op": "dense_decode", "key": {}, "candidates": [
            mk({"us": 5}), mk({"crash": True}), mk({"us": 3}), mk({"hang": True}),
            mk({"us": 4})]})
        c = res["candidates"]
        assert [x.get("timing", {}).get("median_us") if x.get("timing") else None
                for x in c] == [5.0, None, 3.0, None, 4.0]
        assert "crashed" in c[1]["validation"]["error"]
        assert "hung" in c[3]["validation"]["error"]
        assert at_run.select_winner(c) == 2
        res = runner.run_task({"idx": 1, "op": "dense_decode", "key": {},
                               "candidates": [mk({"us": 7})]})
        assert res["candidates"][0]["timing"]["median_us"] == 7.0
    finally:
        runner.close()


@pytest.mark.parametrize("op", spaces.OPS)
def test_measure_task_flow_on_cpu(op, monkeypatch):
    """_measure_task (validation, then timing on rotated inputs) with the torch reference
    standing in for the kernel wrapper and a fake timer; the winner, margins and the schedule
    entry follow."""
    import queue as q
    ad = spaces.adapter(op)
    if ad.available() is not None:
        pytest.skip(ad.available())
    wrong = {"n": 0}

    def fake_call(self, inp, cfg, out=None):
        r = ad.reference(inp)
        if cfg == bad_cfg:                       # one candidate computes garbage
            wrong["n"] += 1
            r = tuple(t + 1 for t in r) if isinstance(r, tuple) else r.flip(-1) + 1
        return r

    def fake_timer(call, n_sets, samples, in_place):
        for j in range(n_sets):
            call(j)
        us = 10.0 + 0.5 * sum(len(str(v)) for v in dataclasses.asdict(current["cfg"]).values())
        return {"median_us": us, "p10_us": us, "p90_us": us, "mode": "fake"}

    monkeypatch.setattr(type(ad), "call", fake_call)
    key = next(p.key for p in workloads.tiny_workload([op]))
    key = ad.validation_key(key)                 # small enough for the CPU
    target = "sm_90a"
    default = ad.default_config(key, target)
    cands = ad.space(key, target)[:3]
    bad_cfg = next(c for c in cands if c != default)
    current = {"cfg": default}
    task_cands = [{"config": dataclasses.asdict(c), "is_default": c == default,
                   "compile": {"ok": True}} for c in cands]

    def timer(call, n_sets, samples, in_place):
        return fake_timer(call, n_sets, samples, in_place)

    # the timer needs to know which config it times: wrap config_from_dict
    real_from = ad.config_from_dict
    monkeypatch.setattr(type(ad), "config_from_dict",
                        lambda self, d: current.update(cfg=real_from(d)) or current["cfg"])
    rq = q.Queue()
    res = at_run._measure_task({"idx": 0, "op": op, "key": key, "candidates": task_cands},
                               {"l2_bytes": 1 << 20}, {"device": "cpu"}, rq, timer=timer)
    c = res["candidates"]
    bad_i = next(i for i, x in enumerate(c) if ad.config_from_dict(x["config"]) == bad_cfg)
    assert c[bad_i]["validation"]["ok"] is False and c[bad_i].get("timing") is None
    assert all(x["validation"]["ok"] and x["timing"] for i, x in enumerate(c) if i != bad_i)
    assert res["n_sets"] >= 1 and wrong["n"] >= 1
    msgs = [rq.get_nowait() for _ in range(rq.qsize())]
    assert ("cand", 0, bad_i, "validate") in msgs
    item = dict(op=op, key=key, label="x", static_id=tuple(ad.static_id(key)),
                default=dataclasses.asdict(default))
    p = at_run.summarize_problem(item, c, 3000.0, ad.bytes_moved(key))
    assert p["status"] == "tuned" and p["n_valid"] == len(c) - 1
    s = at_run.build_schedule({"meta": {"provenance": prov()}, "problems": [p]}, "sm90", True)
    schedules.parse_schedule(s.to_json(), installed_tilelang=TL)


def test_from_results_publishes_a_remote_run(tmp_path, capsys):
    """--from-results: results.json made on a GPU machine -> report + schedule here."""
    item = dict(op="dense_decode", key=dict(dtype="bfloat16", head_dim=128, g=7, hkv=4,
                                            context=65536, batch=4),
                label="shape-a", static_id=(), default={"block_N": 128})
    p = at_run.summarize_problem(item, [cand({"block_N": 128}, 120.0, True),
                                        cand({"block_N": 64}, 100.0)], 3000.0, 10 ** 8)
    res = {"meta": {"mode": "tune", "arch": "sm90", "elapsed_s": 10.0,
                    "provenance": prov(date="2026-11-28T01:02:03Z"),
                    "report_dir": "/remote/out/report"},
           "problems": [p], "compiles": []}
    write(tmp_path, res, "results.json")
    out, rd = tmp_path / "sm90.json", tmp_path / "published"
    assert at_run.main(["--arch", "sm90", "--from-results", str(tmp_path), "--out", str(out),
                        "--report-dir", str(rd)]) == 0
    s = schedules.load_schedule(out, expect_arch="sm90")
    assert s.tuned and s.entries[0].config == {"block_N": 64}
    assert s.provenance["report"] == str(rd)
    assert (rd / "report.md").exists() and (rd / "results.json").exists()
    assert at_run.main(["--arch", "sm80", "--from-results", str(tmp_path), "--out", "-"]) == 2
    assert "not --arch sm80" in capsys.readouterr().err


def test_from_results_merge_with_keeps_the_untuned_shapes(tmp_path, capsys):
    """--merge-with: the run's winners replace the base schedule's entries for the same shapes;
    the base's other tuned entries stay, each naming the run it came from."""
    def problem(batch, winner_latency, label):
        item = dict(op="dense_decode", key=dict(dtype="bfloat16", head_dim=128, g=7, hkv=4,
                                                context=65536, batch=batch),
                    label=label, static_id=(), default={"block_N": 128})
        return at_run.summarize_problem(item, [cand({"block_N": 128}, 120.0, True),
                                               cand({"block_N": 64}, winner_latency)],
                                        3000.0, 10 ** 8)
    base_res = {"meta": {"provenance": prov(date="2026-11-27T00:00:00Z", git_commit="aaa"),
                         "report_dir": "autotune/reports/sm90/old"},
                "problems": [problem(1, 100.0, "a"), problem(16, 90.0, "b"),
                             problem(4, 95.0, "d")]}
    base = tmp_path / "base.json"
    schedules.write_schedule(at_run.build_schedule(base_res, "sm90", tuned=True), base)
    new_p = problem(16, 80.0, "b")
    skipped = dict(problem(8, 70.0, "c"), status="skipped (time budget)")
    failed = dict(problem(4, 70.0, "d"), status="no valid candidate")
    res = {"meta": {"mode": "tune", "arch": "sm90", "elapsed_s": 10.0,
                    "provenance": prov(date="2026-11-28T01:02:03Z", git_commit="bbb"),
                    "report_dir": "/remote/out/report"},
           "problems": [new_p, skipped, failed], "compiles": []}
    write(tmp_path, res, "results.json")
    out = tmp_path / "sm90.json"
    assert at_run.main(["--arch", "sm90", "--from-results", str(tmp_path), "--out", str(out),
                        "--report-dir", str(tmp_path / "rep"), "--merge-with", str(base)]) == 0
    s = schedules.load_schedule(out, expect_arch="sm90")
    by_batch = {e.key["batch"]: e for e in s.entries}
    # batch 8: skipped now, absent before; batch 4: measured now without a valid winner, so
    # its old entry is not resurrected; batch 1: not in this run, kept from the base
    assert sorted(by_batch) == [1, 16]
    assert by_batch[16].latency_us == 80.0 and "from_run" not in by_batch[16].data
    assert by_batch[1].latency_us == 100.0
    assert by_batch[1].data["from_run"]["git_commit"] == "aaa"
    assert s.provenance["git_commit"] == "bbb"
    assert s.provenance["merged_from"]["entries"] == 1
    assert "kept 1 entries" in capsys.readouterr().out
    # merging again on top keeps the first origin of a carried entry and the chain of runs
    out2 = tmp_path / "sm90b.json"
    assert at_run.main(["--arch", "sm90", "--from-results", str(tmp_path), "--out", str(out2),
                        "--report-dir", str(tmp_path / "rep2"), "--merge-with", str(out)]) == 0
    s2 = schedules.load_schedule(out2, expect_arch="sm90")
    e1 = next(e for e in s2.entries if e.key["batch"] == 1)
    assert e1.data["from_run"]["git_commit"] == "aaa"
    assert s2.provenance["merged_from"]["earlier"]["git_commit"] == "aaa"


# ------------------------------------------------------------------------------------------
# dispatch wiring: every plan takes its config from the schedule
# ------------------------------------------------------------------------------------------

class _Captured(Exception):
    pass


@pytest.mark.parametrize("op", spaces.OPS)
def test_plans_take_their_config_from_the_schedule(op, tmp_path, monkeypatch):
    """Plan each op for CPU tensors (an sm_90a device faked, the compile stubbed): with a tuned
    schedule entry for the shape, the plan compiles the entry's config; for a shape no entry
    fits (another head_dim), the heuristic default. Catches key-name drift between the planning
    layer and schedules.KEY_SPECS."""
    from resa_tl import heuristics, plan
    ad = spaces.adapter(op)

    def stub(shape, config, arch, pdl):
        raise _Captured(config)

    monkeypatch.setattr(ad.kernel, "compile_kernel", stub)
    monkeypatch.setattr(heuristics, "device_props",
                        lambda device_index=None: (132, 50 << 20, (9, 0)))
    key = ad.validation_key(next(p.key for p in workloads.tiny_workload([op])))
    default = ad.default_config(key, "sm_90a")
    tuned = next(c for c in ad.space(key, "sm_90a") if c != default)
    e = {"op": op, "key": key, "config": dataclasses.asdict(tuned), "tuned": True,
         "latency_us": 10.0}
    monkeypatch.setenv("RESA_TL_SCHEDULE", str(write(tmp_path, sched_obj([e]))))

    def planned_config(k):
        schedules.reset()                            # also forgets earlier plans
        inp = ad.make_inputs(k, "cpu", torch.Generator().manual_seed(0))
        with pytest.raises(_Captured) as ei:
            ad.call(inp, None)
        return ei.value.args[0]

    try:
        assert planned_config(key) == tuned
        other = dict(key, head_dim=128 if key["head_dim"] == 64 else 64)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            assert planned_config(other) == ad.default_config(other, "sm_90a")
    finally:
        plan.clear()


def test_compile_pool_survives_a_dying_worker():
    """A compile that kills its worker breaks the process pool: the pool is rebuilt, the other
    jobs are resubmitted and succeed, the killer is recorded as failed."""
    from autotune._testing import fake_compile_job
    from autotune.compile_pool import CompilePool
    pool = CompilePool(2, "sm_80", timeout_s=60, job_fn=fake_compile_job)
    try:
        cfgs = [{"i": i} for i in range(6)]
        cfgs.insert(3, {"crash": True})
        futs = [pool.submit("dense_decode", (("g", 1),), {"g": 1}, c) for c in cfgs]
        res = [pool.result(f) for f in futs]
    finally:
        pool.shutdown()
    assert [r["ok"] for r in res] == [True, True, True, False, True, True, True]
    assert "killed its worker" in res[3]["error"]
    recs = pool.records()
    assert len(recs) == 7 and sum(r["ok"] is True for r in recs) == 6
