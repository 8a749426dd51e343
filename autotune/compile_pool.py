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
    config) are compiled once. ``jobs=0`` compiles inline in this process."""

    def __init__(self, jobs: int, target: str, timeout_s: float | None = None,
                 log_dir: str | None = None):
        self.target = target
        self.log_dir = log_dir
        self.jobs = jobs
        self.timeout_s = timeout_s
        self._futures: dict = {}
        self._meta: dict = {}
        self._executor = None
        if jobs > 0:
            env = {"TILELANG_PRINT_ON_COMPILATION": "0", "PYTHONUNBUFFERED": "1"}
            if timeout_s:
                env.setdefault("TILELANG_COMPILE_TIMEOUT_SECONDS", str(int(timeout_s)))
            self._executor = cf.ProcessPoolExecutor(
                max_workers=jobs, mp_context=mp.get_context("spawn"),
                initializer=_init_worker, initargs=(str(REPO), env, log_dir))

    def submit(self, op: str, static_id: tuple, key: dict, cfg_dict: dict):
        ident = (op, static_id, tuple(sorted((k, str(v)) for k, v in cfg_dict.items())))
        fut = self._futures.get(ident)
        if fut is None:
            args = (op, tuple(key.items()), cfg_dict, self.target)
            if self._executor is None:
                fut = _Done(compile_job(*args))
            else:
                fut = self._executor.submit(compile_job, *args)
            self._futures[ident] = fut
            self._meta[ident] = {"op": op, "static": dict(static_id), "config": cfg_dict}
        return fut

    def result(self, fut, timeout: float | None = None) -> dict:
        try:
            return fut.result(timeout=timeout if timeout is not None else self.timeout_s)
        except cf.TimeoutError:
            return {"ok": False, "seconds": None, "error": "compile did not finish in time"}
        except BaseException as err:                # noqa: BLE001 - a worker died
            return {"ok": False, "seconds": None, "error": f"worker failed: {err!r}"}

    def records(self) -> list[dict]:
        """Every compile job with its result (finished ones), in submission order."""
        out = []
        for ident, fut in self._futures.items():
            rec = dict(self._meta[ident])
            if fut.done():
                rec.update(self.result(fut, 0))
            else:
                rec.update(ok=None, seconds=None, error="not finished")
            out.append(rec)
        return out

    def shutdown(self):
        """Cancel what has not started and stop the workers (a compile in flight is not
        waited for)."""
        if self._executor is not None:
            procs = list(getattr(self._executor, "_processes", {}).values())
            self._executor.shutdown(wait=False, cancel_futures=True)
            for p in procs:
                if p.is_alive():
                    p.terminate()
            self._executor = None


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
