"""Parallel compilation of candidates in worker processes.

Each worker imports resa_tl and calls the op adapter's ``compile`` (the kernel module's
memoised compile function), which leaves the kernel in TileLang's disk cache
($TILELANG_CACHE_DIR). The measuring process then "compiles" the same kernel again through the
production wrapper and gets a disk-cache hit (tens of ms) instead of a compile (seconds).
Workers are spawned (not forked): the parent may hold a CUDA context.

Each worker runs in a session (process group) of its own and ignores SIGINT: a Ctrl-C at the
terminal reaches only the tuner, which stops the run and kills every worker's group, nvcc
included (``shutdown``); a worker also ends its group when the tuner dies (Linux).
``$RESA_TL_AUTOTUNE_COMPILE_JOB=module:function`` replaces the compile function (tests run the
command line with a fake compiler).
"""
from __future__ import annotations

import concurrent.futures as cf
import importlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV_COMPILE_JOB = "RESA_TL_AUTOTUNE_COMPILE_JOB"
_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _kill_own_group(signum=None, frame=None):
    os.killpg(0, signal.SIGKILL)               # this worker and its nvcc children


def _init_worker(repo: str, env: dict, log_dir: str | None, parent_pid: int | None = None):
    # Own session: SIGINT to the terminal's process group does not reach the worker (the
    # parent stops the run and kills the group); nvcc children join the group. The parent
    # blocked SIGINT/SIGTERM around the spawn, so none arrives before this is set up.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.setsid()
    except OSError:                            # still in the tuner's group: never killpg it
        pass
    else:
        signal.signal(signal.SIGTERM, _kill_own_group)
        if parent_pid is not None:
            _die_with_parent(parent_pid)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
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


def _die_with_parent(parent_pid: int):
    """Linux: SIGTERM (-> kill the group) when the tuner dies without stopping the pool, even
    of SIGKILL; elsewhere a no-op."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:             # it died before prctl
        _kill_own_group()


def _job_from_env():
    spec = os.environ.get(ENV_COMPILE_JOB)
    if not spec:
        return None
    mod, _, fn = spec.partition(":")
    return getattr(importlib.import_module(mod), fn)


def compile_job(op: str, key_items: tuple, cfg_dict: dict, target: str) -> dict:
    """Compile one candidate; never raises (the error text is returned)."""
    from autotune.spaces import adapter
    t0 = time.perf_counter()
    try:
        ad = adapter(op)
        cfg = ad.config_from_dict(cfg_dict)
        ad.compile(dict(key_items), cfg, target)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "error": None}
    except KeyboardInterrupt:                       # inline (jobs=0): the run is stopping
        raise
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
        self.job_fn = job_fn or _job_from_env() or compile_job     # tests substitute a fake
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

    def _new_executor(self, jobs: int | None = None):
        return cf.ProcessPoolExecutor(
            max_workers=jobs or self.jobs, mp_context=mp.get_context("spawn"),
            initializer=_init_worker,
            initargs=(str(REPO), self._env, self.log_dir, os.getpid()))

    def _issue(self, ident, executor=None):
        args = self._args[ident]
        ex = executor or self._executor
        if ex is None:
            fut = _Done(self.job_fn(*args))
        else:
            # submit() spawns the workers: they inherit this signal mask, so a SIGINT/SIGTERM
            # sent to the tuner's process group before a worker has left it stays pending
            # (then ignored) instead of killing it mid-start (a "failed" compile)
            old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
            try:
                fut = ex.submit(self.job_fn, *args)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
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
        """Stop an executor now: cancel its queue, SIGKILL each worker's process group (the
        worker and the nvcc it runs), reap the workers."""
        procs = list((getattr(ex, "_processes", None) or {}).values())
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)    # its own group since _init_worker
            except (ProcessLookupError, PermissionError):
                pass
            if p.is_alive():                        # not yet in a group of its own
                p.kill()
        for p in procs:
            p.join(5)

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
                solo = self._new_executor(1)
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
        except KeyboardInterrupt:                   # the run is stopping: not a compile failure
            raise
        except BrokenProcessPool:
            if ident is not None and self._attempts.get(ident, 3) < 3:
                self._recover()
                return self.result(self._futures[ident], timeout)
            return {"ok": False, "seconds": None,
                    "error": "the compile killed its worker process (crash in TVM/TileLang)"}
        except BaseException as err:                # noqa: BLE001 - a worker died
            return {"ok": False, "seconds": None, "error": f"worker failed: {err!r}"}

    def peek(self, fut) -> dict | None:
        """The result of a compile that has finished (without waiting or recovering), else
        None."""
        if fut is None:
            return None
        ident = self._ident_of.get(fut)
        if ident is not None:
            fut = self._futures[ident]
        if not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

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
        """Cancel what has not started and kill the workers with their nvcc processes (a
        compile in flight is abandoned, not waited for)."""
        for ex in [self._executor] + self._solo:
            if ex is not None:
                self._stop(ex)
        self._executor, self._solo = None, []


def usable_cpus() -> int:
    """The cores this process may run on (its affinity: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_jobs(compile_only: bool = False) -> int:
    """Compile workers: every usable core with --compile-only, else all but one (the GPU
    measuring process needs one); at most 16, and not more than memory allows (~1.5 GB per
    TileLang/nvcc worker)."""
    n = usable_cpus()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        n = min(n, max(1, int(mem / (1.5 * 2 ** 30))))
    except (ValueError, OSError, AttributeError):
        pass
    return max(1, min(16, n if compile_only else n - 1))
