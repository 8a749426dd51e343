"""The autotuner's command line (autotune/run.py) as a user runs it, without a GPU or nvcc: a
fake compiler (autotune/_testing.py, through $RESA_TL_AUTOTUNE_COMPILE_JOB) and a fake GPU
process. Ctrl-C / SIGTERM stop a run at once with a partial report and no process left behind;
--compile-only defaults (every core, --budget-s ignored with a warning, reports outside the
repository); the tuner without matplotlib and tqdm."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from autotune import compile_pool  # noqa: E402
from autotune import run as at_run  # noqa: E402

SLOW = "autotune._testing:slow_compile_job"
FAST = "autotune._testing:fake_compile_job"
# a run starts with imports (torch, tilelang) and the workload's planning: slow on a busy box
START_TIMEOUT_S = 180


def _state(pid: int) -> str | None:
    """The process's state letter, None when it is gone ('Z': dead, not yet reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _alive(pid: int) -> bool:
    return _state(pid) not in (None, "Z", "X")


def _marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark`` (every descendant of a process
    started with it, wherever it was reparented to)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            env = (d / "environ").read_bytes()
        except OSError:
            continue
        if mark.encode() in env and _alive(int(d.name)):
            pids.append(int(d.name))
    return pids


def _wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _compiling(d: Path) -> list[tuple[int, int]]:
    """(worker pid, fake nvcc pid) of the slow compiles started (see slow_compile_job)."""
    return [tuple(int(x) for x in f.name.split("-")[1:]) for f in d.glob("compiling-*")]


def _assert_partial(rd: Path, signame: str, mode: str):
    res = json.loads((rd / "results.json").read_text())
    meta = res["meta"]
    assert meta["mode"] == mode and meta["partial"] is True and meta["interrupted"] == signame
    # the compiles in flight were abandoned, not failed
    assert res["compiles"] and not [c for c in res["compiles"] if c["ok"] is False]
    assert all(f"interrupted by {signame}" in c["error"] for c in res["compiles"]
               if c["ok"] is None)
    assert not [p for p in res["problems"] if "fail" in p["status"]]
    md = (rd / "report.md").read_text()
    assert f"Partial report: the run was interrupted by {signame}" in md
    assert "## Compile failures\n\nNone." in md
    return res


# ------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_compile_only_stops_at_once_on_a_signal(sig, tmp_path):
    """A compile-only run whose 2 workers are stuck in "nvcc": SIGINT to its process group (a
    Ctrl-C at the terminal) or SIGTERM to the tuner (kill) ends it within seconds, 130/143, with
    a report that says it is partial, the interrupt not recorded as a failure, and no worker
    or nvcc process left."""
    mark = f"resa-tl-test-{uuid.uuid4().hex}"
    fake = tmp_path / "fake"
    fake.mkdir()
    rd = tmp_path / "report"
    env = dict(os.environ, RESA_TL_AUTOTUNE_COMPILE_JOB=SLOW, RESA_TL_FAKE_COMPILE_DIR=str(fake),
               RESA_TL_CACHE_DIR=str(tmp_path / "cache"), RESA_TL_TEST_MARK=mark)
    cmd = [sys.executable, str(REPO / "autotune" / "run.py"), "--arch", "sm80",
           "--compile-only", "--workload", "tiny", "--jobs", "2", "--out", "-",
           "--report-dir", str(rd), "--no-progress"]
    # a session of its own, as a shell job: the signal to its group does not reach pytest
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def started():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended early:\n{proc.communicate()[0]}")
            return len(_compiling(fake)) == 2
        _wait_for(started, START_TIMEOUT_S, "the two slow compiles to start")
        t0 = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + sig, out
    assert took < 10, f"took {took:.1f} s to stop:\n{out}"
    name = signal.Signals(sig).name
    assert f"interrupted by {name}" in out and "partial" in out
    _assert_partial(rd, name, "compile-only")
    # no worker, no "nvcc" (its grandchildren), nothing else the run started (the
    # multiprocessing resource tracker ends once it sees the tuner gone)
    for worker, nvcc in _compiling(fake):
        _wait_for(lambda: not _alive(worker) and not _alive(nvcc), 10, "the workers to end")
    _wait_for(lambda: not _marked(mark), 10, "every process of the run to end")


def test_tune_run_interrupted_while_waiting_for_compiles(tmp_path, monkeypatch):
    """A tuning run (fake GPU process) interrupted while it waits for a compile: partial
    report with every problem "skipped (interrupted by SIGINT)", exit 130, workers and GPU
    process gone; the previous SIGINT handler is back afterwards."""
    _fake_gpu(monkeypatch, tmp_path)
    fake = tmp_path / "fake"
    fake.mkdir()
    monkeypatch.setenv("RESA_TL_AUTOTUNE_COMPILE_JOB", SLOW)
    monkeypatch.setenv("RESA_TL_FAKE_COMPILE_DIR", str(fake))
    runners = []
    real_runner = at_run.GpuRunner
    monkeypatch.setattr(at_run, "GpuRunner", lambda *a, **k: runners.append(
        real_runner(*a, **k)) or runners[-1])

    def interrupt():
        _wait_for(lambda: _compiling(fake), START_TIMEOUT_S, "a slow compile to start")
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    t = threading.Thread(target=interrupt, daemon=True)
    t.start()
    rd = tmp_path / "report"
    t0 = time.monotonic()
    rc = at_run.main(["--arch", "sm90", "--workload", "tiny", "--ops", "block_summaries",
                      "--jobs", "1", "--out", "-", "--report-dir", str(rd), "--no-progress"])
    t.join(5)
    assert rc == 130 and time.monotonic() - t0 < START_TIMEOUT_S
    assert signal.getsignal(signal.SIGINT) is before
    res = _assert_partial(rd, "SIGINT", "tune")
    assert res["problems"] and all(p["status"] == "skipped (interrupted by SIGINT)"
                                   for p in res["problems"])
    assert res["meta"]["truncated"] is True
    assert runners and runners[0].proc is None                  # GPU process killed
    for worker, nvcc in _compiling(fake):
        _wait_for(lambda: not _alive(worker) and not _alive(nvcc), 10, "the workers to end")


def test_tune_run_with_fake_gpu_completes(tmp_path, monkeypatch):
    """The same run left alone: every problem tuned, exit 0, a complete report."""
    _fake_gpu(monkeypatch, tmp_path)
    monkeypatch.setenv("RESA_TL_AUTOTUNE_COMPILE_JOB", FAST)
    rd = tmp_path / "report"
    out = tmp_path / "sm90.json"
    rc = at_run.main(["--arch", "sm90", "--workload", "tiny", "--ops", "block_summaries",
                      "--jobs", "1", "--out", str(out), "--report-dir", str(rd),
                      "--no-progress"])
    assert rc == 0
    res = json.loads((rd / "results.json").read_text())
    assert "partial" not in res["meta"] and res["meta"]["truncated"] is False
    assert res["problems"] and all(p["status"] == "tuned" for p in res["problems"])
    assert "Partial report" not in (rd / "report.md").read_text()
    assert json.loads(out.read_text())["tuned"] is True


def _fake_gpu(monkeypatch, tmp_path):
    from autotune import _testing, provenance
    real_collect = provenance.collect
    monkeypatch.setattr(at_run, "check_arch", lambda args: args.arch)
    monkeypatch.setattr(provenance, "collect", lambda arch, target, gpu: dict(
        real_collect(arch, target, gpu=False), gpu="Fake GPU"))
    monkeypatch.setattr(at_run, "_gpu_child", _testing.fake_gpu_child)
    monkeypatch.setenv("RESA_TL_CACHE_DIR", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------
# compile-only defaults
# ------------------------------------------------------------------------------------------

def test_compile_only_defaults_to_every_core(monkeypatch):
    """No GPU process to leave a core to: --compile-only compiles on every usable core."""
    monkeypatch.setattr(compile_pool, "usable_cpus", lambda: 2)
    assert compile_pool.default_jobs(compile_only=True) == 2
    assert compile_pool.default_jobs() == 1
    monkeypatch.setattr(compile_pool, "usable_cpus", lambda: 64)
    assert compile_pool.default_jobs(compile_only=True) <= 16


def test_compile_only_run_defaults(tmp_path, monkeypatch, capsys):
    """Without --jobs and --report-dir: all cores' workers, the report in the user cache
    (nothing written under the repository), --budget-s ignored with a warning."""
    monkeypatch.setenv("RESA_TL_AUTOTUNE_COMPILE_JOB", FAST)
    monkeypatch.setenv("RESA_TL_CACHE_DIR", str(tmp_path / "cache"))
    import datetime
    in_repo = REPO / "autotune" / "reports" / "sm80"
    pattern = f"{datetime.date.today().isoformat()}-compile-only*"   # the old default's name
    before = sorted(in_repo.glob(pattern))
    rc = at_run.main(["--arch", "sm80", "--compile-only", "--workload", "tiny", "--ops",
                      "block_summaries", "--out", "-", "--no-progress", "--budget-s", "5"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "--budget-s is ignored with --compile-only" in err
    found = list((tmp_path / "cache" / "autotune-reports" / "sm80").glob("*-compile-only"))
    assert len(found) == 1 and (found[0] / "report.md").exists()
    res = json.loads((found[0] / "results.json").read_text())
    assert res["meta"]["compile_jobs"] == compile_pool.default_jobs(compile_only=True)
    assert all(c["ok"] for c in res["compiles"])
    assert sorted(in_repo.glob(pattern)) == before


def test_help_says_what_budget_and_report_dir_do(capsys):
    with pytest.raises(SystemExit):
        at_run.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split()).replace("- ", "-")     # wrapped at "-"
    assert "ignored by --compile-only" in out
    assert "autotune-reports" in out and "outside the repository" in out
    assert "with --compile-only" in out                      # the --jobs default there


# ------------------------------------------------------------------------------------------
# matplotlib and tqdm are optional
# ------------------------------------------------------------------------------------------

def test_tuner_without_matplotlib_and_tqdm(tmp_path, monkeypatch, capsys):
    """The "tune" extra missing: plain progress lines, and a report whose plot section says
    why there are none. (TileLang and transformers require tqdm themselves: they are imported
    first, the tuner's own import of tqdm then fails.)"""
    from autotune import workloads
    at_run.plan_problems(workloads.tiny_workload(["block_summaries"]), "sm_80", "full", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)          # import tqdm -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setenv("RESA_TL_AUTOTUNE_COMPILE_JOB", FAST)
    rd = tmp_path / "rep"
    rc = at_run.main(["--arch", "sm80", "--compile-only", "--workload", "tiny", "--ops",
                      "block_summaries", "--jobs", "0", "--out", "-", "--report-dir", str(rd)])
    assert rc == 0 and "compile: 1/" in capsys.readouterr().err
    from autotune import report
    res = {"meta": {"mode": "tune", "arch": "sm90", "provenance": {}},
           "problems": [{"op": "dense_decode", "label": "a", "status": "no valid candidate"}],
           "compiles": []}
    md = report.write_report(res, tmp_path / "tune").read_text()
    assert "matplotlib is not installed" in md and ".[tune]" in md
    assert not list((tmp_path / "tune").glob("*.png"))


def test_library_imports_without_matplotlib_and_tqdm():
    """import resa_tl (ops, attach) needs no matplotlib, and resa_tl's own code imports no
    tqdm (torch, TileLang and transformers may: they depend on it themselves)."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top not in ("matplotlib", "tqdm"):
            return None
        f = sys._getframe(1)                    # the importing module, past importlib
        while f is not None and f.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")):
            f = f.f_back
        by = f.f_globals.get("__name__", "") if f is not None else ""
        if top == "matplotlib" or by.split(".")[0] == "resa_tl":
            raise ImportError(f"not installed: {name} (imported by {by})")
sys.meta_path.insert(0, Block())
import resa_tl, resa_tl.ops
from resa_tl import attach, detach
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                           [str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])))
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_pyproject_keeps_plotting_out_of_the_install():
    tomllib = pytest.importorskip("tomllib")                # Python 3.11+
    proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [d.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip()
             for d in proj["dependencies"]]
    assert "matplotlib" not in names and "tqdm" not in names
    assert set(proj["optional-dependencies"]["tune"]) == {"matplotlib", "tqdm"}
