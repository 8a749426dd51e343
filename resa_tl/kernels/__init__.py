"""One module per kernel family: the TileLang program factory, its host wrapper and the
pure-PyTorch reference, side by side.

- ``summaries``: block_summaries / update_block_summaries (per-block min/max keys)
- ``selection``: select_blocks (upper-bound scoring of blocks + top-k)
- ``sparse_decode``: split-KV flash decoding over the selected blocks, GQA-packed
- ``dense_decode``: the same machinery over every key
- ``rectify``: a chunk of T queries against the whole cache, causal within the chunk
"""
