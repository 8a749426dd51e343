import os
import shutil

import pytest
import torch

# Kernels compiled by the tests land in one cache dir, shared between test processes.
os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")

NVCC_MISSING = ("nvcc not found: the compile tests need the CUDA toolkit's nvcc (no GPU); "
                "set CUDA_HOME or put nvcc on PATH")


def find_nvcc(environ=None, which=shutil.which, exists=os.path.exists,
              nvcc_package_home=None) -> tuple[str | None, str]:
    """The nvcc TileLang 0.1.15 would run, as (path or None, how it was looked for).

    Mirrors tilelang/env.py ``_find_cuda_home`` (CUDA_HOME, else CUDA_PATH, used as given; else
    the CUDA home above ``nvcc`` on PATH; else pip's nvidia-cuda-nvcc; else /usr/local/cuda or
    the HPC SDK) and contrib/nvcc.py ``get_nvcc_compiler`` (<CUDA home>/bin/nvcc). The
    arguments stand in for the environment in tests."""
    env = os.environ if environ is None else environ
    var = "CUDA_HOME" if env.get("CUDA_HOME") else "CUDA_PATH"
    home = env.get(var) or None
    how = f"{var}={home}"
    if home is None:
        on_path = which("nvcc")
        if on_path is not None:
            up = os.path.dirname(os.path.dirname(on_path))
            home = up if exists(os.path.join(up, "include", "cuda_runtime.h")) else \
                os.path.dirname(os.path.dirname(os.path.realpath(on_path)))
            how = f"nvcc on PATH ({on_path})"
        else:
            home = nvcc_package_home() if nvcc_package_home else _nvcc_package_home()
            how = "no CUDA_HOME, CUDA_PATH or nvcc on PATH"
            if home is None:
                home = next((d for d in ("/usr/local/cuda", "/opt/nvidia/hpc_sdk/Linux_x86_64")
                             if exists(d)), None)
            if home is None:
                return None, how + ", no /usr/local/cuda"
    nvcc = os.path.join(home, "bin", "nvcc")
    return (nvcc, f"{how}: {nvcc}") if exists(nvcc) else (None, f"{how}: no {nvcc}")


def _nvcc_package_home() -> str | None:
    """CUDA home of pip's nvidia-cuda-nvcc (TileLang's third guess), if installed."""
    try:
        from importlib import metadata
        for f in metadata.files("nvidia-cuda-nvcc") or []:
            if f.name == "nvcc":
                return str(f.locate().parent.parent)
    except metadata.PackageNotFoundError:
        pass
    return None


def nvcc_skip_reason(environ=None, **kw) -> str | None:
    """Why the ``compile`` tests are skipped (None: nvcc is there, they run)."""
    nvcc, how = find_nvcc(environ, **kw)
    if nvcc is not None:
        return None
    # kernels already in TileLang's disk cache would load without nvcc, but which ones are
    # cached is not known before a test runs: skip them all rather than fail with
    # "No such file or directory: .../bin/nvcc"
    return (f"{NVCC_MISSING} ({how}; skipped even if TileLang's disk cache already holds "
            "some of the kernels)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "compile: lowers and compiles TileLang kernels with nvcc "
                                       "(no GPU needed; skipped without nvcc)")


def pytest_collection_modifyitems(config, items):
    why = nvcc_skip_reason()
    if why is not None:
        skip_compile = pytest.mark.skip(reason=why)
        for item in items:
            if item.get_closest_marker("compile") is not None:
                item.add_marker(skip_compile)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
