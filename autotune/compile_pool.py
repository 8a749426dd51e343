"""Parallel compilation of candidates in worker processes.

Each worker imports resa_tl and calls the op adapter's ``compile`` (the kernel module's
memoised compile function), which leaves the kernel in TileLang's disk cache
($TILELANG_CACHE_DIR). The measuring process then "compiles" the same kernel again through the
production wrapper and gets a disk-cache hit (tens of ms) instead of a compile (seconds).
Workers are spawned (not forked): the parent may hold a CUDA context.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _init_worker(repo: str, env: dict, log_dir: str | None):
    if repo not in sys.path:
        sys.path.insert(0, repo)
    os.environ.update(env)
    if log_dir:
        # TileLang prints whole generated programs on a failed build, nvcc its diagnostics:
        # keep them in a per-worker log (the error itself is recorded in the results)
        f = open(os.path.join(log_dir, f"worker-{os.getpid()}.log"), "a", buffering=1)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f


def compile_job(op: str, key_items: tuple, cfg_dict: dict, target: str) -> dict:
    """Compile one candidate; never raises (the error text is returned)."""
    from autotune.spaces import adapter
    t0 = time.perf_counter()
    try:
        ad = adapter(op)
        cfg = ad.config_from_dict(cfg_dict)
        ad.compile(dict(key_items), cfg, target)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "error": None}
    except BaseException as err:                    # noqa: BLE001 - recorded, not fatal
        tb = traceback.format_exception(type(err), err, err.__traceback__)
        msg = f"{type(err).__name__}: {err}"
        return {"ok": False, "seconds": round(time.perf_counter() - t0, 2),
                "error": _shorten(msg) + "\n" + _shorten("".join(tb[-3:]), 1500)}


def _shorten(s: str, n: int = 600) -> str:
    s = str(s)
    return s if len(s) <= n else s[: n // 2] + " ... " + s[-n // 2:]


class _Done(cf.Future):
    def __init__(self, value):
        super().__init__()
        self.set_result(value)


class CompilePool:
    """Submit (op, key, config) compile jobs; identical kernels (same op, static shape and
    config) are compiled once. ``jobs=0`` compiles inline in this process.

    A worker that dies (a crash inside TVM/nvcc) breaks a ProcessPoolExecutor and every job
    queued in it; the pool is then rebuilt and the broken jobs resubmitted, once: a job broken
    twice is recorded as failed."""

    def __init__(self, jobs: int, target: str, timeout_s: float | None = None,
                 log_dir: str | None = None, job_fn=None):
        self.job_fn = job_fn or compile_job        # tests substitute a fake
        self.target = target
        self.log_dir = log_dir
        self.jobs = jobs
        self.timeout_s = timeout_s
        self._futures: dict = {}          # ident -> current future
        self._meta: dict = {}
        self._args: dict = {}
        self._attempts: dict = {}
        self._ident_of: dict = {}          # any future ever issued -> ident
        self._solo: list = []              # one-job executors for suspected crashers
        self._executor = None
        self._env = {"TILELANG_PRINT_ON_COMPILATION": "0", "PYTHONUNBUFFERED": "1"}
        if timeout_s:
            self._env.setdefault("TILELANG_COMPILE_TIMEOUT_SECONDS", str(int(timeout_s)))
        if jobs > 0:
            self._executor = self._new_executor()

    def _new_executor(self):
        return cf.ProcessPoolExecutor(
            max_workers=self.jobs, mp_context=mp.get_context("spawn"),
            initializer=_init_worker, initargs=(str(REPO), self._env, self.log_dir))

    def _issue(self, ident, executor=None):
        args = self._args[ident]
        ex = executor or self._executor
        if ex is None:
            fut = _Done(self.job_fn(*args))
        else:
            fut = ex.submit(self.job_fn, *args)
        self._attempts[ident] = self._attempts.get(ident, 0) + 1
        self._futures[ident] = fut
        self._ident_of[fut] = ident
        return fut

    def submit(self, op: str, static_id: tuple, key: dict, cfg_dict: dict):
        ident = (op, static_id, tuple(sorted((k, str(v)) for k, v in cfg_dict.items())))
        fut = self._futures.get(ident)
        if fut is None:
            self._args[ident] = (op, tuple(key.items()), cfg_dict, self.target)
            self._meta[ident] = {"op": op, "static": dict(static_id), "config": cfg_dict}
            fut = self._issue(ident)
        return fut

    @staticmethod
    def _broken(fut) -> bool:
        return fut.done() and not fut.cancelled() and \
            isinstance(fut.exception(), BrokenProcessPool)

    def _stop(self, ex):
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()

    def _recover(self):
        """After a worker died: a ProcessPoolExecutor fails every job it held, so rebuild it
        and resubmit those jobs (first time), then run jobs broken twice each in a process of
        its own (the one that kills its worker then fails alone), then give up on them."""
        if self._executor is not None and getattr(self._executor, "_broken", False):
            self._stop(self._executor)
            self._executor = self._new_executor()
        for ident, fut in list(self._futures.items()):
            if not self._broken(fut):
                continue
            if self._attempts[ident] == 1:
                self._issue(ident)
            elif self._attempts[ident] == 2:
                solo = cf.ProcessPoolExecutor(
                    max_workers=1, mp_context=mp.get_context("spawn"),
                    initializer=_init_worker, initargs=(str(REPO), self._env, self.log_dir))
                self._solo.append(solo)
                self._issue(ident, solo)

    def result(self, fut, timeout: float | None = None) -> dict:
        ident = self._ident_of.get(fut)
        if ident is not None:
            fut = self._futures[ident]             # follow a resubmission
        try:
            return fut.result(timeout=timeout if timeout is not None else self.timeout_s)
        except cf.TimeoutError:
            return {"ok": False, "seconds": None, "error": "compile did not finish in time"}
        except BrokenProcessPool:
            if ident is not None and self._attempts.get(ident, 3) < 3:
                self._recover()
                return self.result(self._futures[ident], timeout)
            return {"ok": False, "seconds": None,
                    "error": "the compile killed its worker process (crash in TVM/TileLang)"}
        except BaseException as err:                # noqa: BLE001 - a worker died
            return {"ok": False, "seconds": None, "error": f"worker failed: {err!r}"}

    def records(self) -> list[dict]:
        """Every compile job with its result (finished ones), in submission order."""
        out = []
        for ident, fut in self._futures.items():
            rec = dict(self._meta[ident])
            if fut.cancelled():
                rec.update(ok=None, seconds=None, error="not compiled (the run ended first)")
            elif fut.done():
                rec.update(self.result(fut, 0) if not self._broken(fut) else {
                    "ok": False, "seconds": None,
                    "error": "the compile killed its worker process (crash in TVM/TileLang)"})
            else:
                rec.update(ok=None, seconds=None, error="not finished")
            out.append(rec)
        return out

    def shutdown(self):
        """Cancel what has not started and stop the workers (a compile in flight is not
        waited for)."""
        for ex in [self._executor] + self._solo:
            if ex is not None:
                self._stop(ex)
        self._executor, self._solo = None, []


def default_jobs() -> int:
    """Compile workers: all cores but one for the measuring process, at most 16, and not
    more than memory allows (~1.5 GB per TileLang/nvcc worker)."""
    n = os.cpu_count() or 2
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = min(n, max(1, int(mem / (1.5 * 2 ** 30))))
    except (ValueError, OSError, AttributeError):
        pass
    return max(1, min(16, n - 1))
