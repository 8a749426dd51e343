"""Test doubles for the autotuner's process orchestration (importable by spawned processes).

``fake_gpu_child`` speaks the GPU child's protocol without a GPU: a candidate whose config has
``"crash": true`` kills the process, ``"hang": true`` stops it answering; the others are
"validated" and "timed" with latency = config["us"].
``slow_compile_job`` is a compile that never ends, for the interrupt tests of the command line
(``RESA_TL_AUTOTUNE_COMPILE_JOB=autotune._testing:slow_compile_job``).
"""
from __future__ import annotations

import os
import subprocess
import time


def fake_gpu_child(task_q, result_q, opts):
    result_q.put(("ready", {"arch": "sm90", "l2_bytes": 50 << 20,
                            "copy_bandwidth": {"gbps": 3000.0, "bytes": 1 << 30}}))
    while True:
        task = task_q.get()
        if task is None:
            return
        out = []
        for i, c in enumerate(task["candidates"]):
            c = dict(c)
            if c.get("skip"):
                out.append(c)
                continue
            result_q.put(("cand", task["idx"], i, "validate"))
            cfg = c["config"]
            if cfg.get("crash"):
                os._exit(3)
            if cfg.get("hang"):
                time.sleep(3600)
            us = float(cfg.get("us", 10.0))
            c["validation"] = {"ok": True, "error": None}
            c["timing"] = {"median_us": us, "p10_us": us, "p90_us": us, "min_us": us,
                           "max_us": us, "mode": "fake", "samples_us": [us]}
            out.append(c)
        result_q.put(("done", task["idx"], {"candidates": out, "n_sets": 1}))


def fake_compile_job(op, key_items, cfg_dict, target):
    """Stands in for compile_pool.compile_job: kills its worker for {"crash": true}."""
    if cfg_dict.get("crash"):
        os._exit(9)
    time.sleep(0.05)
    return {"ok": True, "seconds": 0.05, "error": None}


def slow_compile_job(op, key_items, cfg_dict, target):
    """Stands in for a compile stuck in nvcc: runs a child process (the "nvcc") that sleeps
    for 10 minutes. Touches $RESA_TL_FAKE_COMPILE_DIR/compiling-<worker pid>-<child pid> when
    the child has started, so that a test knows compiles are in flight."""
    child = subprocess.Popen(["sleep", "600"])
    d = os.environ.get("RESA_TL_FAKE_COMPILE_DIR")
    if d:
        open(os.path.join(d, f"compiling-{os.getpid()}-{child.pid}"), "w").close()
    child.wait()
    return {"ok": True, "seconds": 600.0, "error": None}
