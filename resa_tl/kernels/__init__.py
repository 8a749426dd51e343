"""One module per op, each with the same contract, importing nothing above it (no planning,
no schedules, no heuristics):

- ``<Op>Config``: the launch/tile configuration (a frozen dataclass; part of the compile key);
- ``<Op>Shape``: the compile-time problem (heads, head dims, dtypes, ...); ``check_shape``;
- ``program(shape, config, pdl)``: the TileLang program;
- ``compile_kernel(shape, config, arch, pdl)``: compiled and memoised (and in TileLang's disk
  cache); ``launch(kernel, ...)``: one call with every tensor and workspace given;
- ``<op>_reference``: the pure-PyTorch reference the kernel is tested against.

Modules: ``block_summaries`` (block_summaries / update_block_summaries), ``select_blocks``
(upper-bound scoring + top-k), ``sparse_decode`` and ``dense_decode`` (split-KV decoding,
GQA-packed), ``rectify_attention`` (a chunk of T queries against the cache). ``common`` holds
the shared TileLang pieces (split-KV partials, online softmax, combine, tiles, barriers, PDL,
dtype/target names, compilation). Which config, split count and workspaces a call uses is
decided by resa_tl.plan.
"""
