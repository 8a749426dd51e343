"""The lossless mode of resa_tl's ``generate()`` loop (``ReSAConfig(lossless=True)``): sparse
decoding whose output is exactly dense greedy decoding.

Sparse steps emit tokens provisionally. Every verify window (``w`` tokens, see
:meth:`resa_tl.ReSAConfig.verify_windows`) the dense pass that rectifies the cache (the last
committed token and the w provisional ones, fed again densely) keeps the logits of all its
w + 1 positions: the dense model's choice after each prefix. The provisional tokens are
accepted up to the first one that differs from the dense choice (over the rows still
decoding: the batch stays in step, so it accepts the smallest count of its rows); that
position gets the dense choice, and the cache drops the positions after it. After a full
acceptance the last position's dense choice is one more token. Every token emitted is
therefore the argmax of the dense model's (processed) logits over the emitted prefix. The
window halves after a rejection and doubles after a full acceptance, within the configured
bounds, so a model whose sparse and dense choices often part wastes little.

Stopping criteria, the padding of finished rows and the streamer see committed tokens only, so
they behave as in dense greedy decoding. Each verification reads the accepted count on the host
(one sync per window).
"""
from __future__ import annotations

import torch

from dataclasses import dataclass

from .decode_loop import StepGraphs, prefill_chunk, run_prefill


@dataclass
class VerifyStats:
    """What the lossless mode's last generate() call verified (``cache.lossless_stats``)."""
    verify_passes: int = 0        # dense passes that verified provisional tokens
    proposed: int = 0             # provisional (sparse) tokens they verified
    accepted: int = 0             # of those, kept
    emitted: int = 0              # tokens committed by verify passes (accepted + 1 each)

    @property
    def acceptance(self) -> float:
        """Share of the sparse tokens that dense greedy decoding agreed with."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    @property
    def tokens_per_pass(self) -> float:
        return self.emitted / self.verify_passes if self.verify_passes else float("nan")


def decode_lossless(model, steps: StepGraphs, input_ids, positions, mask, logits_processor,
                    stopping_criteria, generation_config, streamer, scores, raw_logits,
                    has_eos: bool):
    """Greedy decoding equal to dense greedy decoding (see the module doc). Inputs as
    :func:`resa_tl.integration.decode_loop.decode` prepared them; ``scores`` / ``raw_logits``
    (lists or None) receive the committed positions' processed and raw dense logits. Returns
    the sequences [B, L]."""
    cache = steps.cache
    windows = cache.config.verify_windows()
    device = input_ids.device
    B, P = input_ids.shape
    max_length = generation_config.max_length
    pad = generation_config._pad_token_tensor
    seq = input_ids.new_empty(B, max_length)
    seq[:, :P] = input_ids
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    arange = torch.arange(max(windows) + 1, device=device)
    stats = cache.lossless_stats = VerifyStats()

    def commit(start: int, end: int, dense_scores, dense_logits) -> int | None:
        """Positions [start, end) of seq are final: stopping criteria, padding of finished
        rows, recorded scores, streamer. Returns the position after which every row had
        finished, if that happened in the range (one host read for the range)."""
        nonlocal unfinished
        done = []
        for p in range(start, end):
            if has_eos:
                seq[:, p] = seq[:, p] * unfinished + pad * (1 - unfinished)
            if scores is not None:
                scores.append(dense_scores[p - start])
            if raw_logits is not None:
                raw_logits.append(dense_logits[p - start])
            unfinished = unfinished & ~stopping_criteria(seq[:, :p + 1], scores)
            done.append(unfinished.max() == 0)
        hit = torch.stack(done).nonzero()
        stop = start + int(hit[0]) + 1 if hit.numel() else None
        if streamer is not None:
            for p in range(start, stop or end):
                streamer.put(seq[:, p].cpu())
        return stop

    # the prompt: its last position's logits give the first token, densely
    logits = run_prefill(steps, input_ids, positions, mask,
                         prefill_chunk(model, generation_config, B, P, device))
    next_pos = positions[:, -1].clone()            # position of seq[:, cur - 1]
    first_logits = logits.to(copy=True, dtype=torch.float32)
    first_scores = logits_processor(seq[:, :P], first_logits)
    seq[:, P] = torch.argmax(first_scores, dim=-1)
    cur = committed = P + 1
    stop = commit(P, cur, [first_scores], [first_logits])
    window = windows[0]
    while stop is None and committed < max_length:
        q = cur - committed                        # provisional tokens
        if q < window and cur < max_length:        # a sparse step: one more provisional token
            cache.begin_step(1)
            next_pos += 1                          # position of seq[:, cur - 1], fed now
            logits = steps.run(seq[:, cur - 1:cur], next_pos[:, None])
            step_scores = logits_processor(seq[:, :cur],
                                           logits.to(copy=True, dtype=torch.float32))
            seq[:, cur] = torch.argmax(step_scores, dim=-1)
            cur += 1
            continue
        # verify (q >= 1): the last committed token and the q provisional ones, fed densely
        T = q + 1
        cache.begin_step(1, rewind=q)
        next_pos += 1                              # position of seq[:, cur - 1]
        pos = next_pos[:, None] - q + arange[:T]
        dense = steps.run(seq[:, committed - 1:cur], pos, keep=T)
        dense = dense.to(copy=True, dtype=torch.float32)
        proc, chosen = [], []
        for i in range(T):                         # the dense choice after seq[:committed + i]
            s_i = logits_processor(seq[:, :committed + i], dense[:, i].clone())
            proc.append(s_i)
            chosen.append(torch.argmax(s_i, dim=-1))
        chosen = torch.stack(chosen, 1)                                   # [B, T]
        agree = (seq[:, committed:cur] == chosen[:, :q]) | (unfinished[:, None] == 0)
        misses = torch.where(~agree.all(0))[0]
        accepted = int(misses[0]) if misses.numel() else q                # one host read
        new_cur = committed + accepted
        if new_cur < max_length:                   # the dense choice after the accepted ones
            seq[:, new_cur] = chosen[:, accepted]
            new_cur += 1
        stats.verify_passes += 1
        stats.proposed += q
        stats.accepted += accepted
        stats.emitted += new_cur - committed
        # the cache holds seq[:cur]; it must hold all but the last token, seq[:new_cur - 1]
        cache.drop_last(cur - new_cur + 1)
        next_pos -= cur - new_cur + 1
        start, cur = committed, new_cur
        committed = cur
        stop = commit(start, cur, proc, [dense[:, i] for i in range(T)])
        window = (min(windows[0], window * 2) if accepted == q
                  else max(windows[-1], window // 2))
    if stop is not None and stop < cur:            # every row had finished at stop - 1
        cache.drop_last(cur - stop)
        cur = stop
    if scores is not None:
        del scores[cur - P:]
    if raw_logits is not None:
        del raw_logits[cur - P:]
    return seq[:, :cur]
