"""Fill TileLang's kernel cache on a machine without a GPU, for a Hopper (sm_90a) GPU run.

TileLang compiles a kernel on first use (seconds to a minute each with nvcc) and keeps it in
its disk cache, ``$TILELANG_CACHE_DIR`` (default ``~/.tilelang/cache``). A machine with nvcc but
no GPU can compile what a GPU run will ask for and hand over the cache directory, so the GPU
spends its time running rather than compiling.

Inside :func:`fake_hopper`, the library runs its ops on ``device="meta"`` tensors as if they
were CUDA tensors of an sm_90a device: every op, :class:`resa_tl.ReSACache` and
:class:`resa_tl.cycle.StepAttention` resolve their plans (:mod:`resa_tl.plan`: the tuned
schedule's config for sm_90a, else the heuristic; programmatic dependent launch as on the GPU,
``RESA_TL_PDL`` included; split counts) and compile the plan's kernel, and the launch itself is
skipped. So exactly the kernels the same calls would launch on the GPU get compiled, with
nothing to maintain beside the calls themselves::

    import torch
    from resa_tl import ops
    from resa_tl.precompile import fake_hopper

    with fake_hopper():
        meta = dict(device="meta", dtype=torch.bfloat16)
        k = torch.empty(8, 32768, 4, 128, **meta)                      # [B, S_max, Hkv, D]
        lens = torch.empty(8, device="meta", dtype=torch.int32)
        kmin, kmax = ops.block_summaries(k, lens, 16)                  # compiles, no launch
        idx = ops.select_blocks(torch.empty(8, 28, 128, **meta), kmin, kmax, lens)
        ...
    # then copy $TILELANG_CACHE_DIR to the GPU machine (same TileLang version)

Shapes must match the GPU run's exactly where they are compile-time values: head counts and
dims, dtypes, block size, the selection's number of blocks (the cache capacity S_max) and its
hyper-parameters, the rectification chunk T; and, through the tuned schedules, the extents the
schedule is keyed on (batch, context, ...). ``benchmarks/*.py --precompile`` do this for their
runs. Outputs are meta tensors (no values): code that reads values (``.item()``, ``.tolist()``)
cannot run inside.
"""
from __future__ import annotations

import contextlib
from unittest import mock

__all__ = ["fake_hopper"]

#: H100 SXM: SMs and L2 bytes. They steer only run-time arguments (split counts, workspace
#: sizes), never what is compiled.
H100_SMS = 132
H100_L2_BYTES = 50 << 20


@contextlib.contextmanager
def fake_hopper(sm_count: int = H100_SMS, l2_bytes: int = H100_L2_BYTES):
    """Context manager: compile for sm_90a without a GPU; undone on exit.

    Inside:

    * ``resa_tl.heuristics.device_props`` answers for an sm_90a device with ``sm_count`` SMs
      and ``l2_bytes`` of L2 (so ``arch_of`` gives "sm_90a", ``use_pdl`` what it gives on a
      Hopper GPU, and the split counts what they are on such a card);
    * ``resa_tl.ops.resolve_backend`` answers "tilelang" whatever the tensors' device;
    * ``resa_tl._checks.value_checks_enabled`` answers False (meta tensors have no values);
    * a compiled TileLang kernel's launch (``JITKernel.__call__``) does nothing.

    Everything else runs as usual, so compiled kernels land in TileLang's disk cache and
    memory caches (``compile_kernel`` of each kernel module), and the plans resolved inside
    stay memoised (for the meta device: they never serve a CUDA tensor). Not thread-safe
    (it patches module attributes), and it hides a real GPU too while active.
    """
    from tilelang.jit.kernel import JITKernel

    from . import _checks, heuristics, ops

    def props(device_index=None):
        return sm_count, l2_bytes, (9, 0)

    with mock.patch.object(heuristics, "device_props", props), \
            mock.patch.object(JITKernel, "__call__", lambda self, *a, **k: None), \
            mock.patch.object(ops, "resolve_backend", lambda *a, **k: "tilelang"), \
            mock.patch.object(_checks, "value_checks_enabled", lambda t: False):
        yield
