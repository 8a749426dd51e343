"""The `compile` tests skip, with the reason, where TileLang would find no nvcc (tests/conftest.py
find_nvcc mirrors TileLang's lookup), and run where it would."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import NVCC_MISSING, find_nvcc, nvcc_skip_reason

HERE = Path(__file__).resolve().parent


def _toolkit(root: Path, headers: bool = True) -> Path:
    """A fake CUDA home: bin/nvcc (and include/cuda_runtime.h)."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\nexit 0\n")
    nvcc.chmod(0o755)
    if headers:
        (root / "include").mkdir()
        (root / "include" / "cuda_runtime.h").write_text("")
    return nvcc


def no_nvcc_on_path(name):
    return None


def no_package():
    return None


def test_cuda_home_pointing_nowhere_skips_with_the_reason():
    env = {"CUDA_HOME": "/nowhere", "PATH": "/usr/bin"}
    nvcc, how = find_nvcc(env, which=no_nvcc_on_path, nvcc_package_home=no_package)
    assert nvcc is None and "/nowhere/bin/nvcc" in how
    why = nvcc_skip_reason(env, which=no_nvcc_on_path, nvcc_package_home=no_package)
    assert why.startswith(NVCC_MISSING)
    assert "set CUDA_HOME or put nvcc on PATH" in why and "CUDA_HOME=/nowhere" in why
    assert "disk cache" in why          # says that cached kernels would not have needed it


def test_cuda_home_wins_over_path(tmp_path):
    nvcc = _toolkit(tmp_path / "cuda")
    other = _toolkit(tmp_path / "other")
    env = {"CUDA_HOME": str(tmp_path / "cuda")}
    assert find_nvcc(env, which=lambda n: str(other))[0] == str(nvcc)
    assert nvcc_skip_reason(env, which=lambda n: str(other)) is None
    # CUDA_PATH when CUDA_HOME is unset or empty
    assert find_nvcc({"CUDA_HOME": "", "CUDA_PATH": str(tmp_path / "cuda")},
                     which=no_nvcc_on_path)[0] == str(nvcc)


def test_nvcc_on_path(tmp_path):
    nvcc = _toolkit(tmp_path / "cuda")
    assert find_nvcc({}, which=lambda n: str(nvcc))[0] == str(nvcc)
    # a wrapper on PATH outside a toolkit (no include/ above it) still is the nvcc TileLang
    # runs: <dir above bin>/bin/nvcc of its real path
    wrapper = _toolkit(tmp_path / "local", headers=False)
    assert find_nvcc({}, which=lambda n: str(wrapper))[0] == str(wrapper)
    link_dir = tmp_path / "links" / "bin"
    link_dir.mkdir(parents=True)
    (link_dir / "nvcc").symlink_to(nvcc)
    assert find_nvcc({}, which=lambda n: str(link_dir / "nvcc"))[0] == str(nvcc)


def test_default_install_locations():
    have = {"/usr/local/cuda", "/usr/local/cuda/bin/nvcc"}
    assert find_nvcc({}, which=no_nvcc_on_path, exists=have.__contains__,
                     nvcc_package_home=no_package)[0] == "/usr/local/cuda/bin/nvcc"
    nvcc, how = find_nvcc({}, which=no_nvcc_on_path, exists=lambda p: False,
                          nvcc_package_home=no_package)
    assert nvcc is None and "no CUDA_HOME, CUDA_PATH or nvcc on PATH" in how
    # a /usr/local/cuda without nvcc
    nvcc, how = find_nvcc({}, which=no_nvcc_on_path, exists={"/usr/local/cuda"}.__contains__,
                          nvcc_package_home=no_package)
    assert nvcc is None and "/usr/local/cuda/bin/nvcc" in how


def test_pip_nvcc_package(tmp_path):
    nvcc = _toolkit(tmp_path / "site" / "nvidia" / "cu13")
    assert find_nvcc({}, which=no_nvcc_on_path,
                     nvcc_package_home=lambda: str(tmp_path / "site" / "nvidia" / "cu13")
                     )[0] == str(nvcc)


@pytest.mark.parametrize("case", ["nowhere", "toolkit", "unset"])
def test_agrees_with_tilelang(case, tmp_path, monkeypatch):
    """The same nvcc as TileLang's own lookup (tilelang/env.py _find_cuda_home, then
    contrib/nvcc.py get_nvcc_compiler: <home>/bin/nvcc)."""
    tl_env = pytest.importorskip("tilelang.env")
    if not hasattr(tl_env, "_find_cuda_home"):
        pytest.skip("this TileLang has no tilelang.env._find_cuda_home")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    if case == "nowhere":
        monkeypatch.setenv("CUDA_HOME", "/nowhere")
    elif case == "toolkit":
        _toolkit(tmp_path / "cuda")
        monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    else:
        monkeypatch.delenv("CUDA_HOME", raising=False)
    home = tl_env._find_cuda_home()
    tl_nvcc = os.path.join(home, "bin", "nvcc") if home else None
    ours = find_nvcc()[0]
    if tl_nvcc is not None and not os.path.exists(tl_nvcc):
        tl_nvcc = None                  # TileLang would fail with "No such file ..."
    assert ours == tl_nvcc


@pytest.mark.parametrize("present", [False, True])
def test_compile_marked_tests_skip_only_without_nvcc(present, tmp_path):
    """The collection hook, in a pytest run of its own: a `compile` test is skipped with the
    reason when CUDA_HOME points nowhere, run when it holds an nvcc."""
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n@pytest.mark.compile\ndef test_needs_nvcc():\n    pass\n\n"
        "def test_plain():\n    pass\n")
    home = tmp_path / "cuda"
    if present:
        _toolkit(home)
    env = dict(os.environ, CUDA_HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                        str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    if present:
        assert "2 passed" in out and "skipped" not in out
    else:
        assert "1 passed, 1 skipped" in out and "nvcc not found" in out
        assert f"{home}/bin/nvcc" in out
