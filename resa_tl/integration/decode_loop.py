"""resa_tl's decoding loop for ``model.generate()``: what a plain call after ``attach`` runs.

transformers' own loop (``GenerationMixin._sample``) reads ``unfinished_sequences.max()`` on the
host after every token, so the host waits for each step before it queues the next one, and it
prepares the step's inputs in Python every time. Around ReSA's few-hundred-microsecond kernels
that host time is a large share of a step. This loop keeps the semantics of ``_sample`` (logits
processors, stopping criteria, padding of finished rows, streamer, scores and logits in the
output) and changes how the work reaches the GPU:

* **Prefill in chunks** sized from the free memory (or ``prefill_chunk_size`` when the caller
  sets it), logits of the last position only; chunk attention runs as two flash calls per
  chunk (:mod:`resa_tl.integration.chunk_attention`), so a long prompt never materialises an
  activation or a score tensor that scales with the whole prompt.
* **Decode steps replay CUDA graphs** (:class:`StepGraphs`): one for the sparse one-token step
  and one for the rectification step (the f sparse tokens fed again with the new one, f + 1
  tokens; the lossless mode adds its verify windows). Each is recorded on its second use (the
  first runs eagerly and warms up), on the cache's own shapes, so a later ``generate()`` that
  reuses the cache records nothing. Host
  work per token: the logits processors, the argmax or sample, two small copies and a replay.
* **Stop checks lag** ``STOP_CHECK_LAG`` steps: the flags (and, for a streamer, the tokens)
  are copied to pinned memory with an event, and read when that event has long passed, so the
  host never waits on the step in flight. The steps run past the stop are undone (tokens,
  scores and the cache's last positions), so the result equals transformers' loop.

Rows, padding and the sparse/dense cycle are the cache's (:class:`ReSAHFCache`,
:class:`resa_tl.cycle.DecodeCycle`): every ``rectify_every`` sparse steps, the next step rewinds
them and feeds them again with the new token, densely.
"""
from __future__ import annotations

import collections
import warnings

import torch

from .. import heuristics
from .cache_layer import ReSAHFCache, head_dim_of, text_config

#: steps between a stop flag's computation and its reading on the host (see module doc)
STOP_CHECK_LAG = 4

# model_kwargs that generate() hands a decoding method for a decoder-only text model, all of
# which this loop consumes itself; any other key (multimodal inputs, inputs_embeds, ...) sends
# the call to transformers' loop.
_HANDLED_KWARGS = {"attention_mask", "position_ids", "past_key_values", "use_cache",
                   "logits_to_keep"}


def unsupported_reason(model, generation_config, model_kwargs, synced_gpus) -> str | None:
    """Why this generate() call runs transformers' loop instead of this one (None: it runs
    here). What the caller set explicitly wins: a cache_implementation or a compile_config
    selects transformers' loop (eager, or compiled by transformers)."""
    cache = model_kwargs.get("past_key_values")
    if not isinstance(cache, ReSAHFCache):
        return "no ReSA cache"
    if generation_config.cache_implementation is not None:
        return f"cache_implementation={generation_config.cache_implementation!r} was set"
    if generation_config.compile_config is not None:
        return "a compile_config was set"
    if synced_gpus:
        return "synced_gpus"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "output_attentions / output_hidden_states"
    extra = {k for k, v in model_kwargs.items() if v is not None} - _HANDLED_KWARGS
    if extra:
        return f"model inputs {sorted(extra)}"
    if cache._seen_host:
        return "the cache already holds tokens (continued generation)"
    return None


# ------------------------------------------------------------------------------- the steps
class StepGraphs:
    """The forwards of one cache's decode loop, as CUDA graphs where the device allows.

    ``run(ids, positions)`` feeds ids [B, T] at positions [B, T] (the cache's host bookkeeping,
    ``begin_step``, already done) and returns the last position's logits [B, V]; the tensor is
    overwritten by the next run of the same T. T = 1 and T = f + 1 (when the rectify kernel
    takes it; the lossless mode's verify lengths too) are captured on their second call: the
    first runs eagerly and warms up what its path initialises lazily (kernel modules, and with
    compiled layers the torch.compile of that shape, which must not happen inside a capture);
    other T (prompt chunks) run eagerly.
    ``enabled`` False (CPU, the torch backend, or a capture that failed): everything eager.
    """

    def __init__(self, model, cache: ReSAHFCache):
        self.model, self.cache = model, cache
        self.capture_lengths = {1} | {T for T in cache.chunk_kernel_lengths
                                      if T > 1 and cache.attention.has_chunk_kernel(T)}
        self.enabled = cache.store.device.type == "cuda" and cache._uses_tilelang()
        self.graphs = {}              # key -> (graph, ids buffer, positions buffer, logits)
        self.calls = collections.Counter()
        self.warmups = 0              # runs that warmed up or recorded a graph (see run)
        self.captures = 0

    def forward(self, ids, positions, attention_mask=None, keep=1):
        out = self.model(input_ids=ids, position_ids=positions, attention_mask=attention_mask,
                         past_key_values=self.cache, use_cache=True, logits_to_keep=keep,
                         return_dict=True)
        return out.logits[:, -1] if keep == 1 else out.logits

    def key(self, T: int, keep: int) -> tuple:
        """A graph's key: the tokens fed and logits kept, and for one token whether it attends
        densely (the lossless mode's dense steps) or sparsely."""
        return (T, keep, "dense") if T == 1 and self.cache.dense_one_token else (T, keep)

    def run(self, ids, positions, attention_mask=None, keep=1):
        """``keep`` > 1: the logits of the last ``keep`` positions, [B, keep, V]."""
        T = ids.shape[1]
        key = self.key(T, keep)
        entry = self.graphs.get(key)
        if entry is None:
            self.calls[key] += 1
            if not self.enabled or attention_mask is not None or T not in self.capture_lengths:
                return self.forward(ids, positions, attention_mask, keep)
            self.warmups += 1                   # a first run or a recording: not a steady step
            if self.calls[key] < 2:
                return self.forward(ids, positions, attention_mask, keep)
            entry = self._capture(ids, positions, keep)
            if entry is None:
                return self.forward(ids, positions, keep=keep)
        graph, ids_buf, pos_buf, logits = entry
        ids_buf.copy_(ids)
        pos_buf.copy_(positions)
        graph.replay()
        return logits

    def _capture(self, ids, positions, keep):
        """Record the forward of ids' shape; None (and eager from now on) if it cannot be
        captured. Recording runs nothing, so the cache is untouched until the replay."""
        ids_buf, pos_buf = ids.clone(), positions.clone()
        graph = torch.cuda.CUDAGraph()
        planned = self.cache._planned
        try:
            with torch.cuda.graph(graph):
                logits = self.forward(ids_buf, pos_buf, keep=keep)
        except Exception as e:                          # a host sync somewhere in the forward
            self.enabled = False
            self.cache._planned = planned               # the eager retry is this same step
            warnings.warn(f"resa_tl: the decode step of this model could not be captured in a "
                          f"CUDA graph ({type(e).__name__}: {str(e)[:200]}); decoding eagerly")
            return None
        self.cache._planned = planned
        self.captures += 1
        entry = self.graphs[self.key(ids.shape[1], keep)] = (graph, ids_buf, pos_buf, logits)
        return entry


# -------------------------------------------------------------------------------- stop checks
class LaggedStopCheck:
    """Reads each step's "every row finished" flag ``lag`` steps later from pinned memory
    (and hands the step's tokens to a streamer then), so the host never waits on the step
    in flight. ``push`` returns the index of the first step after which every row had
    finished, once it is known; ``drain`` reads what is left."""

    def __init__(self, batch: int, device, lag: int, streamer=None):
        self.lag, self.streamer = lag, streamer
        cuda = torch.device(device).type == "cuda"        # elsewhere copies are synchronous
        self.slots = [(torch.zeros((), dtype=torch.bool, pin_memory=cuda),
                       torch.zeros(batch, dtype=torch.long, pin_memory=cuda),
                       torch.cuda.Event() if cuda else None) for _ in range(lag + 1)]
        self.pending = collections.deque()        # step indices pushed and not read yet

    def push(self, step: int, unfinished, tokens) -> int | None:
        flag, toks, event = self.slots[step % len(self.slots)]
        flag.copy_(unfinished.max() == 0, non_blocking=True)
        if self.streamer is not None:
            toks.copy_(tokens, non_blocking=True)
        if event is not None:
            event.record()
        self.pending.append(step)
        if len(self.pending) > self.lag:
            return self._read()
        return None

    def _read(self) -> int | None:
        step = self.pending.popleft()
        flag, toks, event = self.slots[step % len(self.slots)]
        if event is not None:
            event.synchronize()
        if self.streamer is not None:
            self.streamer.put(toks.clone())
        return step if bool(flag) else None

    def drain(self) -> int | None:
        while self.pending:
            done = self._read()
            if done is not None:
                self.pending.clear()
                return done
        return None


# ------------------------------------------------------------------------------------ prefill
def prefill_chunk(model, generation_config, batch: int, prompt: int, device) -> int:
    """Tokens per row of each prefill forward: the caller's ``prefill_chunk_size``, else
    :func:`resa_tl.heuristics.prefill_chunk_tokens` from the free memory."""
    if generation_config.prefill_chunk_size:
        return int(generation_config.prefill_chunk_size)
    cfg = text_config(model.config)
    free = torch.cuda.mem_get_info(device)[0] if torch.device(device).type == "cuda" else None
    return heuristics.prefill_chunk_tokens(
        prompt, batch, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
        num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads,
        head_dim=head_dim_of(cfg), dtype_bytes=model.dtype.itemsize, free_bytes=free)


def run_prefill(steps: StepGraphs, ids, positions, attention_mask, chunk: int):
    """Feed the prompt ids [B, P] in chunks of ``chunk`` tokens; the last position's logits."""
    cache = steps.cache
    P = ids.shape[1]
    logits = None
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        cache.begin_step(e - s)
        mask = None
        if attention_mask is not None and not bool(attention_mask[:, s:e].all()):
            mask = attention_mask[:, :e].to(torch.bool)
        logits = steps.run(ids[:, s:e], positions[:, s:e], mask)
    return logits


# ------------------------------------------------------------------------------- the loop
def decode(self, input_ids, logits_processor, stopping_criteria, generation_config,
           synced_gpus=False, streamer=None, resa_streamer=None, **model_kwargs):
    """A decoding method for ``generate(custom_generate=...)``, with ``_sample``'s signature
    and result; ``resa_streamer`` carries the caller's streamer (a callable custom_generate
    does not receive ``streamer``). Calls transformers' loop where this one does not apply
    (:func:`unsupported_reason`)."""
    from transformers.generation.utils import GenerationMixin
    streamer = streamer if streamer is not None else resa_streamer
    reason = unsupported_reason(self, generation_config, model_kwargs, synced_gpus)
    given = model_kwargs.get("past_key_values")
    lossless = isinstance(given, ReSAHFCache) and given.config.lossless
    if lossless and reason is not None:
        raise ValueError("ReSAConfig(lossless=True) runs in resa_tl's generate() loop only; this "
                         f"call would use transformers' loop ({reason})")
    if reason is not None:
        if streamer is not None:                  # generate() left the prompt to us
            streamer.put(input_ids.cpu())
        return GenerationMixin._sample(self, input_ids, logits_processor, stopping_criteria,
                                       generation_config, synced_gpus=synced_gpus,
                                       streamer=streamer, **model_kwargs)
    cache: ReSAHFCache = model_kwargs["past_key_values"]
    device = cache.store.device
    input_ids = input_ids.to(device)
    B, P = input_ids.shape
    max_length = generation_config.max_length
    pad = generation_config._pad_token_tensor
    do_sample = generation_config.do_sample
    want_dict = generation_config.return_dict_in_generate
    scores = [] if want_dict and generation_config.output_scores else None
    raw_logits = [] if want_dict and generation_config.output_logits else None
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    steps = cache.__dict__.get("_step_graphs")
    if steps is None or steps.model is not self:
        steps = cache.__dict__["_step_graphs"] = StepGraphs(self, cache)
    mask = model_kwargs.get("attention_mask")
    mask = mask.to(device) if mask is not None else None
    positions = model_kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(P, device=device).expand(B, P)
    positions = positions.to(device)
    if lossless:
        from .lossless import decode_lossless
        sequences = decode_lossless(
            self, steps, input_ids, positions, mask, logits_processor, stopping_criteria,
            generation_config, streamer, scores, raw_logits, has_eos)
        return _finish(sequences, scores, raw_logits, cache, streamer, want_dict)
    seq = input_ids.new_empty(B, max_length)
    seq[:, :P] = input_ids
    next_pos = positions[:, -1].clone()           # position of the newest token
    unfinished = torch.ones(B, dtype=torch.long, device=device)
    stop = LaggedStopCheck(B, device, STOP_CHECK_LAG, streamer)
    arange = torch.arange(cache.config.rectify_every + 1, device=device)

    logits = run_prefill(steps, input_ids, positions, mask,
                         prefill_chunk(self, generation_config, B, P, device))
    cur, finished_at = P, None
    for step in range(max_length - P):
        next_logits = logits.to(copy=True, dtype=torch.float32)
        next_scores = logits_processor(seq[:, :cur], next_logits)
        if scores is not None:
            scores.append(next_scores)
        if raw_logits is not None:
            raw_logits.append(next_logits)
        if do_sample:
            probs = torch.nn.functional.softmax(next_scores, dim=-1)
            tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(next_scores, dim=-1)
        if has_eos:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        seq[:, cur] = tokens
        cur += 1
        unfinished = unfinished & ~stopping_criteria(seq[:, :cur], scores)
        finished_at = stop.push(step, unfinished, tokens)
        if finished_at is not None or cur == max_length:
            break
        # feed the new token: a sparse step, or the rectification that re-feeds the cycle
        fold = cache.cycle.rewind_before(1)
        cache.begin_step(1, rewind=fold)
        next_pos += 1
        if fold:
            ids = seq[:, cur - 1 - fold:cur]
            pos = next_pos[:, None] - fold + arange[:fold + 1]
        else:
            ids, pos = seq[:, cur - 1:cur], next_pos[:, None]
        logits = steps.run(ids, pos)
    if finished_at is None:
        finished_at = stop.drain()
    if finished_at is not None:                   # undo the steps run past the stop
        cur = P + finished_at + 1
        if scores is not None:
            del scores[finished_at + 1:]
        if raw_logits is not None:
            del raw_logits[finished_at + 1:]
    cache.drop_last(cache._seen_host - (cur - 1))  # the cache holds all but the last token
    return _finish(seq[:, :cur], scores, raw_logits, cache, streamer, want_dict)


def _finish(sequences, scores, raw_logits, cache, streamer, want_dict):
    """What generate() returns, as transformers' loop builds it."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput
    if streamer is not None:
        streamer.end()
    if not want_dict:
        return sequences
    return GenerateDecoderOnlyOutput(
        sequences=sequences, scores=tuple(scores) if scores is not None else None,
        logits=tuple(raw_logits) if raw_logits is not None else None,
        past_key_values=cache)
