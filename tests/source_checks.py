"""Checks on generated CUDA source shared by the compile tests."""
from resa_tl import heuristics


def assert_pdl(src: str, arch: str):
    """Every kernel of the program opens with the PDL pair (launch dependents, then wait for
    the previous grid) where programmatic dependent launch is on (sm_90+), none elsewhere."""
    kernels = src.count("__global__") // 2          # a declaration and a definition each
    want = kernels if heuristics.use_pdl(arch) else 0
    assert src.count("cudaGridDependencySynchronize();") == want, \
        f"expected {want} griddepcontrol.wait for {kernels} kernels on {arch}"
    assert src.count("cudaTriggerProgrammaticLaunchCompletion();") == want
