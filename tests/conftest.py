import os

import pytest
import torch

# Kernels compiled by the tests land in one cache dir, shared between test processes.
os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "compile: lowers and compiles TileLang kernels with nvcc "
                                       "(no GPU needed)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
