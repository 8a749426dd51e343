"""Provenance stamps for schedules and reports: GPU, driver, CUDA, versions, date, commit."""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(cmd) -> str | None:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> tuple[str, bool | None]:
    """(commit, dirty). $RESA_TL_GIT_COMMIT (or $RESA_TL_COMMIT, as the benchmarks take it)
    wins: a copy of the tree without .git, e.g. on a remote GPU machine; 'unknown' when
    neither is available."""
    env = os.environ.get("RESA_TL_GIT_COMMIT") or os.environ.get("RESA_TL_COMMIT")
    if env:
        return env.strip(), None
    sha = _run(["git", "rev-parse", "HEAD"])
    if not sha:
        return "unknown", None
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return sha, bool(status)


def source_sha256() -> str:
    """Hash of the kernel sources (resa_tl/**/*.py): identifies what was tuned even where
    git is unavailable."""
    h = hashlib.sha256()
    for p in sorted((REPO / "resa_tl").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def nvcc_version() -> str | None:
    out = _run(["nvcc", "--version"])
    m = re.search(r"release (\d+\.\d+)", out or "")
    return m.group(1) if m else None


def driver_version() -> str | None:
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else None


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version
        return version(mod)
    except Exception:                              # noqa: BLE001
        return None


def collect(arch: str, target: str, gpu: bool) -> dict:
    import torch
    commit, dirty = git_commit()
    p = {
        "arch": arch, "target": target,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "git_commit": commit, "git_dirty": dirty, "source_sha256": source_sha256(),
        "torch": torch.__version__, "tilelang": _version("tilelang") or "unknown",
        "tvm_ffi": _version("apache-tvm-ffi"), "python": platform.python_version(),
        "cuda": torch.version.cuda or nvcc_version(), "nvcc": nvcc_version(),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
    }
    if gpu:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        p.update(gpu=torch.cuda.get_device_name(), sm_count=props.multi_processor_count,
                 l2_bytes=int(getattr(props, "L2_cache_size", 0)),
                 capability=f"{props.major}.{props.minor}",
                 memory_gb=round(props.total_memory / 2 ** 30, 1),
                 driver=driver_version() or "unknown")
    else:
        p.update(gpu="none (compile-only)", sm_count=None, driver=None)
    return p


def gpu_slug(name: str) -> str:
    s = re.sub(r"^NVIDIA\s+", "", name or "gpu")
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-").lower() or "gpu"
