"""Autotuning of the resa_tl TileLang kernels: ``python autotune/run.py --arch sm90``.

- ``workloads``: model presets, config.json parsing, the default workload (problem shapes);
- ``spaces``: one adapter per op (search space, compile, inputs, run, validate, bytes);
- ``compile_pool``: compiles candidates in parallel worker processes (TileLang disk cache);
- ``measure``: CUDA-graph / CUDA-event timing with inputs rotated past the L2 cache;
- ``report``: report.md, results.json and plots of a run;
- ``run``: the command line (tune, --compile-only, --check).
"""
