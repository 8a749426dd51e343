"""Fill TileLang's kernel cache on a machine without a GPU, for the kernels a benchmark will
launch on a Hopper GPU: resa_tl.ops runs on meta tensors with the TileLang backend forced, the
device query answered as an sm_90a part, value checks off and the launch skipped, so exactly
the kernels (and tuned-schedule configs) that the GPU run will ask for get compiled. Copy
$TILELANG_CACHE_DIR to the GPU machine afterwards."""
from __future__ import annotations

import contextlib
from unittest import mock


@contextlib.contextmanager
def fake_hopper(sm_count: int = 132, l2_bytes: int = 50 << 20):
    """Inside: heuristics see an sm_90a device, compiled kernels are not launched. The SM count
    and L2 size only steer run-time arguments (split counts), never what is compiled."""
    from tilelang.jit.kernel import JITKernel
    from resa_tl import _checks, heuristics, ops
    with mock.patch.object(heuristics, "device_props",
                           lambda device_index=None: (sm_count, l2_bytes, (9, 0))), \
            mock.patch.object(JITKernel, "__call__", lambda self, *a, **k: None), \
            mock.patch.object(ops, "resolve_backend", lambda *a, **k: "tilelang"), \
            mock.patch.object(_checks, "value_checks_enabled", lambda t: False):
        yield
