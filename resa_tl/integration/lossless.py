"""The lossless mode of resa_tl's ``generate()`` loop (``ReSAConfig(lossless=True)``): sparse
decoding whose output is exactly dense decoding's, as self-speculative decoding makes it.

Sparse steps propose tokens. Every verify window (``w`` tokens, see
:meth:`resa_tl.ReSAConfig.verify_windows`) the dense pass that rectifies the cache (each row's
last committed token and its w proposals, fed again densely) keeps the logits of all its w + 1
positions: the dense model's distribution after each prefix. Each row then accepts its own
number of proposals and gets one dense token after them:

* **greedy**: proposals are accepted up to the first one that differs from the dense argmax,
  which replaces it; after a full acceptance the last position's argmax is one more token.
  Every token emitted is the argmax of the dense model's (processed) logits over its prefix.
* **sampling** (``do_sample=True``): the speculative-sampling rule (Leviathan et al. 2023;
  Chen et al. 2023). Proposal x, drawn from the sparse step's distribution p, is kept with
  probability min(1, q(x) / p(x)), q the dense distribution at the same prefix (both after the
  logits processors and warpers); the first rejected position draws from max(q - p, 0)
  renormalised, and a fully accepted window draws one more token from q. Each emitted token is
  then distributed exactly as dense sampling's.

Rows run ahead of one another (the cache keeps a length per row, and each row is rewound to
its own accepted prefix). The window is chosen before each pass among the configured ones to
commit the most tokens per unit of time (:func:`resa_tl.heuristics.verify_window`), from each
row's recent agreement with dense and the measured times of a sparse step and of a dense pass:
it shrinks after rejections and grows after agreement, and grows further where the dense pass
is dear (long contexts). Where no window is predicted to beat plain dense decoding (sparse and
dense often part, or a sparse step costs nearly what a dense one does), the loop takes dense
one-token steps instead (window 0: its token is dense decoding's choice, no proposal to check),
so the mode then runs at about dense decoding's speed; while it does, the agreement estimates
drift back to their prior, so proposals are tried again now and then.

Logits processors and stopping criteria see each row's committed prefix only: they are called
once per distinct prefix length among the rows (once per position when the rows are in step;
processors that do not read the ids, such as the sampling warpers, once per position).
Finished rows are padded as in transformers' loop. Each window reads the accepted counts and the
stop flags on the host in one transfer (one sync per window) where the stopping criteria are
transformers' EOS and max-length ones, which a device op evaluates for all the window's
positions at once; other criteria are called once per committed position after the counts are
read (a second sync).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .. import heuristics
from .decode_loop import StepGraphs, prefill_chunk, run_prefill

#: Take dense steps (window 0) where no verify window is predicted to commit tokens faster than
#: plain dense decoding (heuristics.verify_window): then the mode costs about what dense
#: decoding costs instead of more. False: always propose (tests of the speculation itself).
DENSE_STEPS = True

# Logits processors and warpers that do not read input_ids: one call covers rows whose
# prefixes have different lengths.
_PREFIX_FREE = {"TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper",
                "MinPLogitsWarper", "TypicalLogitsWarper", "EpsilonLogitsWarper",
                "EtaLogitsWarper", "InfNanRemoveLogitsProcessor", "LogitNormalization",
                "SuppressTokensLogitsProcessor"}


@dataclass
class VerifyStats:
    """What the lossless mode's last generate() call verified (``cache.lossless_stats``).
    Counts are summed over the rows that were still decoding."""
    verify_passes: int = 0        # dense passes that verified proposals (each covers the batch)
    dense_steps: int = 0          # one-token dense steps, where proposing would not have paid
    row_checks: int = 0           # rows verified, summed over the passes
    proposed: int = 0             # proposals (sparse tokens) verified
    accepted: int = 0             # of those, kept
    emitted: int = 0              # tokens committed by the verifications (accepted + 1 each)
    trace: list = field(default_factory=list)   # per row: (committed, proposed, accepted) each pass
    # where the time went, summed over the windows (ms; CUDA events on a GPU): the sparse steps
    # that proposed, the dense passes with their acceptance, and each window's host wall time
    # from its start to the next one's (so the rest is rewinds, stop checks, syncs and Python)
    sparse_steps: int = 0
    proposal_ms: float = 0.0
    verify_ms: float = 0.0
    dense_ms: float = 0.0
    window_ms: float = 0.0

    @property
    def acceptance(self) -> float:
        """Share of the sparse proposals that the dense pass kept."""
        return self.accepted / self.proposed if self.proposed else float("nan")

    def time_split(self) -> dict:
        """ms per sparse step, per verify pass, per dense step, and per window (a verify
        window or a dense step) with what those leave of it (the host-side rest)."""
        n = max(self.verify_passes + self.dense_steps, 1)
        return dict(sparse_step_ms=self.proposal_ms / max(self.sparse_steps, 1),
                    verify_ms=self.verify_ms / max(self.verify_passes, 1),
                    dense_step_ms=self.dense_ms / max(self.dense_steps, 1),
                    window_ms=self.window_ms / n,
                    rest_ms=(self.window_ms - self.proposal_ms - self.verify_ms
                             - self.dense_ms) / n)

    @property
    def tokens_per_pass(self) -> float:
        """Tokens a row commits per dense pass."""
        return self.emitted / self.row_checks if self.row_checks else float("nan")

    def agreement(self, row: int, prompt_len: int) -> list:
        """Row ``row``'s verdicts by generated position (0 = the first new token): 0 where a
        proposal was rejected, 1 elsewhere (accepted proposals, and tokens no proposal was
        made for). What ``replay_acceptance`` takes."""
        out = []
        for c, q, a in self.trace[row]:
            at = c - prompt_len
            out.extend([1] * (at + a + 1 - len(out)))
            if a < q:
                out[at + a] = 0
        return out


class StepClock:
    """Times of the proposal steps and of the dense pass of a window: CUDA events (read after
    the host has waited for the pass anyway), the host clock elsewhere (synchronous)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if self.cuda \
            else None
        self.times, self.n = [0.0] * 3, 0

    def mark(self):
        if self.cuda:
            self.events[self.n].record()
        else:
            self.times[self.n] = time.perf_counter() * 1e3
        self.n += 1

    def read(self):
        """(proposals ms, dense pass ms) of the window whose three marks were taken."""
        self.n = 0
        if self.cuda:
            e = self.events
            return e[0].elapsed_time(e[1]), e[1].elapsed_time(e[2])
        t = self.times
        return t[1] - t[0], t[2] - t[1]


class RowProcessor:
    """``logits_processor`` over rows whose prefixes have different lengths. A processor that
    does not read input_ids (a sampling warper, or one whose ``prefix_free`` attribute is
    True) is called once; otherwise once per distinct length, each row taking its own call's
    result through a device-side mask (no host transfer, so no sync)."""

    def __init__(self, logits_processor, seq):
        self.lp, self.seq = logits_processor, seq
        self.prefix_free = all(type(p).__name__ in _PREFIX_FREE or getattr(p, "prefix_free", False)
                               for p in logits_processor)

    def __call__(self, logits, lengths: list, lengths_dev):
        """logits [B, V] fp32 (not modified); row b's prefix is ``seq[b, :lengths[b]]``
        (``lengths_dev``: the same, int [B] on the device)."""
        if self.prefix_free or len(set(lengths)) == 1:
            return self.lp(self.seq[:, :max(lengths)], logits.clone())
        out = logits
        for n in sorted(set(lengths)):
            s = self.lp(self.seq[:, :n], logits.clone())
            out = torch.where((lengths_dev == n)[:, None], s, out)
        return out


class StopCheck:
    """The stopping criteria of a window's positions. Where every criterion is transformers'
    EOS or max-length one (which read only a prefix's last token or its length), the flags of
    all positions [lo, hi) are one device op, read with the accepted counts in one transfer;
    otherwise the criteria are called once per committed position (a second transfer)."""

    def __init__(self, stopping_criteria, device):
        self.criteria = stopping_criteria
        self.together = all(type(c) in (EosTokenCriteria, MaxLengthCriteria)
                            for c in stopping_criteria)
        eos = [c.eos_token_id.flatten() for c in stopping_criteria
               if type(c) is EosTokenCriteria]
        self.eos = torch.cat(eos).to(device) if eos else None
        self.max_length = min((c.max_length for c in stopping_criteria
                               if type(c) is MaxLengthCriteria), default=None)

    def read(self, accepted, seq, lo: int, hi: int):
        """One host read: (accepted counts, flag(b, p) for lo <= p < hi, or None where the
        criteria must be called per position)."""
        if not self.together:
            return accepted.tolist(), None
        if self.eos is None:
            host = accepted[:, None].tolist()
        else:
            block = torch.isin(seq[:, lo:hi], self.eos)                    # [B, hi - lo]
            host = torch.cat([accepted[:, None], block.to(accepted.dtype)], 1).tolist()
        ml = self.max_length

        def flag(b: int, p: int) -> bool:
            return (ml is not None and p + 1 >= ml) or (self.eos is not None
                                                        and bool(host[b][1 + p - lo]))
        return [r[0] for r in host], flag

    def per_position(self, seq, scores, span):
        """flag(b, p) for the positions in span (sorted), the criteria called per position."""
        rows = (torch.stack([self.criteria(seq[:, :p + 1], scores) for p in span]).tolist()
                if span else [])
        at = {p: j for j, p in enumerate(span)}
        return lambda b, p: bool(rows[at[p]][b])


def decode_lossless(model, steps: StepGraphs, input_ids, positions, mask, logits_processor,
                    stopping_criteria, generation_config, streamer, scores, raw_logits,
                    has_eos: bool):
    """Decoding whose output is dense decoding's (see the module doc). Inputs as
    :func:`resa_tl.integration.decode_loop.decode` prepared them; ``scores`` / ``raw_logits``
    (lists or None) receive the committed positions' processed and raw dense logits. Returns
    the sequences [B, L]."""
    cache = steps.cache
    windows = cache.config.verify_windows()
    W = windows[0]
    choices = windows + ((0,) if DENSE_STEPS else ())     # 0: a dense step, no proposals
    device = input_ids.device
    B, P = input_ids.shape
    max_length = generation_config.max_length
    if cache.max_cache_len < max_length + W:
        raise ValueError(f"the lossless mode needs a cache of max_length + rectify_every = "
                         f"{max_length + W} positions (rows run up to a window ahead); this one "
                         f"holds {cache.max_cache_len}")
    do_sample = generation_config.do_sample
    pad = generation_config._pad_token_tensor
    seq = input_ids.new_zeros(B, max_length + W + 1)      # room for the last window's proposals
    seq[:, :P] = input_ids
    process = RowProcessor(logits_processor, seq)
    stop = StopCheck(stopping_criteria, device)
    rows = torch.arange(B, device=device)
    arange = torch.arange(W + 1, device=device)
    offset = positions[:, -1] - (P - 1)                   # position of seq[:, j] is j + offset
    pads = [0] * B if mask is None else (P - mask.sum(1)).tolist()
    draft = None                                          # sampling: the proposals' p [B, W+1, V]
    stats = cache.lossless_stats = VerifyStats(trace=[[] for _ in range(B)])
    # Benchmarks only: per-row 0/1 verdicts by generated position (VerifyStats.agreement of a
    # real model) that replace the comparison, to time a model whose weights cannot travel.
    replay = getattr(cache, "replay_acceptance", None)

    # the prompt: its last position's logits give the first token, densely
    logits = run_prefill(steps, input_ids, positions, mask,
                         prefill_chunk(model, generation_config, B, P, device))
    first_logits = logits.to(copy=True, dtype=torch.float32)
    first = process(first_logits, [P] * B, None)
    seq[:, P] = (torch.multinomial(torch.softmax(first, -1), 1).squeeze(1) if do_sample
                 else torch.argmax(first, -1))
    c = [P + 1] * B                                # committed tokens per row (host)
    c_dev = torch.full((B,), P + 1, dtype=torch.long, device=device)
    flags = stopping_criteria(seq[:, :P + 1], scores).tolist()
    finished = [bool(f) for f in flags]
    stop_at = [P + 1 if f else None for f in finished]    # where a finished row's output ends
    unfinished = torch.tensor([0 if f else 1 for f in finished], device=device)
    kept_scores = {P: first} if scores is not None else {}        # position -> [B, V]
    kept_logits = {P: first_logits} if raw_logits is not None else {}
    streamed = P
    window = windows[-1]                   # the cheapest probe: nothing is known yet
    agree = [list(heuristics.VERIFY_PRIOR) for _ in range(B)]     # per row: (yes, no) counts
    clock = StepClock(device)
    step_ms = verify_ms = dense_ms = None

    def target():                                  # the output's length, as far as known
        return max_length if not all(finished) else max(stop_at)

    while min(c) < target():
        started = time.perf_counter()
        # Rows below the target commit; finished rows (with an EOS criterion) commit padding,
        # which keeps their scores and cache as transformers' loop has them.
        active = [c[b] < target() for b in range(B)]
        padding = [has_eos and finished[b] for b in range(B)]
        verifying = [b for b in range(B) if active[b] and not padding[b]]
        # proposals: q sparse steps; row b feeds seq[b, c_b + k - 1], proposes seq[b, c_b + k]
        q = min(window, max(target() - c[b] for b in range(B) if active[b]))
        warmups = steps.warmups                    # grows where a step warms up or records
        clock.mark()
        for k in range(q):
            cache.begin_step(1)
            idx = c_dev + (k - 1)
            logits = steps.run(seq.gather(1, idx[:, None]), (idx + offset)[:, None])
            s = process(logits.to(copy=True, dtype=torch.float32), [n + k for n in c],
                        c_dev + k)
            if do_sample:
                if draft is None:
                    draft = s.new_zeros(B, W + 1, s.shape[-1])
                draft[:, k] = torch.softmax(s, -1)
                tok = torch.multinomial(draft[:, k], 1).squeeze(1)
            else:
                tok = torch.argmax(s, -1)
            if has_eos:                            # finished rows propose padding
                tok = tok * unfinished + pad * (1 - unfinished)
            seq.scatter_(1, (c_dev + k)[:, None], tok[:, None])
        clock.mark()
        # verify: each row's last committed token and its q proposals, fed densely (q = 0: a
        # dense step, its token committed as dense decoding would choose it)
        T = q + 1
        cache.begin_step(1, rewind=q)
        cache.dense_one_token = q == 0
        idx = c_dev[:, None] - 1 + arange[:T]                                  # [B, T]
        try:
            dense = steps.run(seq.gather(1, idx), idx + offset[:, None], keep=T)
        finally:
            cache.dense_one_token = False
        dense = dense.to(copy=True, dtype=torch.float32)
        if T == 1:
            dense = dense[:, None]
        proc = torch.stack([process(dense[:, i], [n + i for n in c], c_dev + i)
                            for i in range(T)], 1)
        proposals = seq.gather(1, c_dev[:, None] + arange[:q])                 # [B, q]
        if do_sample:
            target_p = torch.softmax(proc, -1)                                 # [B, T, V]
            q_x = target_p[:, :q].gather(-1, proposals[..., None]).squeeze(-1)
            p_x = draft[:, :q].gather(-1, proposals[..., None]).squeeze(-1)
            ok = torch.rand(B, q, device=device) * p_x < q_x                  # min(1, q/p)
        else:
            ok = proposals == proc[:, :q].argmax(-1)
        if replay is not None:
            ok = torch.tensor([[bool(r[p]) if p < len(r) else True
                                for p in range(c[b] - P, c[b] - P + q)]
                               for b, r in enumerate(replay)], dtype=torch.bool, device=device)
        if has_eos:
            ok |= (unfinished == 0)[:, None]
        accepted = ok.to(torch.long).cumprod(1).sum(1)                          # [B]
        clock.mark()
        if do_sample:
            draft[:, q] = 0                        # a full acceptance draws from q itself
            tgt = target_p[rows, accepted]
            resid = (tgt - draft[rows, accepted]).clamp_min(0)
            resid = torch.where(resid.sum(-1, keepdim=True) > 0, resid, tgt)
            extra = torch.multinomial(resid, 1).squeeze(1)
        else:
            extra = proc[rows, accepted].argmax(-1)
        if has_eos:
            extra = extra * unfinished + pad * (1 - unfinished)
        seq.scatter_(1, (c_dev + accepted)[:, None], extra[:, None])
        lo = min(c[b] for b in range(B) if active[b])             # positions a row may commit
        hi = min(max(c[b] for b in range(B) if active[b]) + q + 1, max_length)
        acc, flag = stop.read(accepted, seq, lo, hi)                           # host read
        s, v = clock.read()                        # the window's times: the host has waited
        # A window with a step's first (eager) run or its CUDA-graph recording (or, with
        # compiled layers, its compile) does not time a step: those samples are left out.
        if steps.warmups == warmups:
            if q:
                step_ms = s / q if step_ms is None else 0.5 * (step_ms + s / q)
                verify_ms = v if verify_ms is None else 0.5 * (verify_ms + v)
            else:
                dense_ms = v if dense_ms is None else 0.5 * (dense_ms + v)
        stats.sparse_steps += q
        stats.proposal_ms += s
        if q:
            stats.verify_ms += v
        else:
            stats.dense_ms += v
        # commit row b's positions [c_b, new_b); stopping criteria once per position
        new = [min(c[b] + acc[b] + 1, max_length) if active[b] else c[b] for b in range(B)]
        span = sorted({p for b in range(B) for p in range(c[b], new[b])})
        if flag is None:                                                       # host read 2
            flag = stop.per_position(seq, scores, span)
        for b in range(B):
            for p in range(c[b], new[b]):
                if not finished[b] and flag(b, p):
                    finished[b], stop_at[b] = True, p + 1
                    new[b] = p + 1                 # later positions: padding, fed next window
                    break
        if q:
            stats.verify_passes += 1
            stats.row_checks += len(verifying)
            stats.proposed += q * len(verifying)
            stats.accepted += sum(acc[b] for b in verifying)
            stats.emitted += sum(new[b] - c[b] for b in verifying)
            for b in verifying:
                stats.trace[b].append((c[b], q, acc[b]))
        else:
            stats.dense_steps += 1
        for p in span:
            ins = [b for b in range(B) if c[b] <= p < new[b]]
            at = [p - c[b] for b in ins]
            if scores is not None:
                kept_scores.setdefault(p, torch.zeros_like(proc[:, 0]))[ins] = proc[ins, at]
            if raw_logits is not None:
                kept_logits.setdefault(p, torch.zeros_like(dense[:, 0]))[ins] = dense[ins, at]
        # row b's cache holds c_b + q tokens; it keeps all but its last committed one
        drop = [c[b] + q - new[b] + 1 for b in range(B)]
        cache.drop_last_rows(torch.tensor(drop, device=device), drop,
                             [new[b] - 1 - pads[b] for b in range(B)], max(new) - 1)
        c = new
        c_dev.copy_(torch.tensor(c))
        unfinished.copy_(torch.tensor([0 if f else 1 for f in finished]))
        if streamer is not None:                   # positions every row has committed
            while streamed < min(c):
                streamer.put(seq[:, streamed].cpu())
                streamed += 1
        for b in verifying:
            agree[b] = heuristics.agreement_after(agree[b], q, acc[b])
        if verifying and step_ms is not None:
            window = heuristics.verify_window(
                choices, [agree[b][0] / sum(agree[b]) for b in verifying], step_ms, verify_ms,
                dense_ms)
        stats.window_ms += (time.perf_counter() - started) * 1e3
    L = target()
    if streamer is not None:
        for p in range(streamed, L):
            streamer.put(seq[:, p].cpu())
    over = [c[b] - L for b in range(B)]            # rows that ran past the end
    if max(over):
        cache.drop_last_rows(torch.tensor(over, device=device), over,
                             [L - 1 - pads[b] for b in range(B)], L - 1)
    for kept, out in ((kept_scores, scores), (kept_logits, raw_logits)):
        if out is not None:
            out.extend(kept[p] for p in range(P, L))
    return seq[:, :L]
