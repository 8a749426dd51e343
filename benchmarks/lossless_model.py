"""Will the lossless mode beat dense decoding on a shape? Its speed predicted from a real
model's recorded verdicts and the shape's step times, with the decode loop's own window policy.

The lossless mode commits, per row and verify window of q proposals, the accepted run plus one
dense token, and costs q sparse steps and one dense pass; where no window is predicted to beat
dense decoding it takes dense one-token steps instead (resa_tl.integration.lossless). Given
  * per-row verdicts by generated position (``lossless_acceptance.py --trace-json``; row b takes
    the b-th ``--new-tokens`` stretch, as ``bench_generate.py --acceptance`` does),
  * the time of a sparse step, of a dense one-token step and of a verify pass on the shape
    (``bench_generate.py``: ``resa`` and ``full`` ms per token, a lossless row's ``verify_ms``),
this replays the policy (resa_tl.heuristics.verify_window, the agreement counts with their
prior and decay, the drift back to the prior during dense steps) and adds up the time. Host
time between steps is left out: the prediction is what the loop would reach with none.

    python benchmarks/lossless_model.py --acceptance docs/fidelity/lossless_trace_smollm2_L6144.json \\
        --rows 8 --new-tokens 133 --sparse-ms 7.96 --dense-ms 10.32

``--sweep`` also prints the prediction over a range of sparse/dense step-cost ratios: where the
mode can win with these verdicts at all.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from resa_tl import heuristics  # noqa: E402


def simulate(streams: list, windows: tuple, sparse_ms: float, dense_ms: float,
             verify_ms: float | None = None, dense_steps: bool = True) -> dict:
    """Replay the window policy over ``streams`` (per row, 0/1 verdicts by generated position,
    all of one length N; position 0 comes from the prompt's pass, as in the loop): time and
    counts until every row has committed N tokens, per token after the first.
    ``verify_ms``: a verify pass (default: ``dense_ms``, a dense step; a pass of q + 1 tokens
    costs a little more where the weights, not the tokens, dominate)."""
    verify_ms = dense_ms if verify_ms is None else verify_ms
    B, N = len(streams), len(streams[0])
    choices = tuple(windows) + ((0,) if dense_steps else ())
    c = [1] * B                       # position 0 is the prompt pass's token: never proposed
    agree = [list(heuristics.VERIFY_PRIOR) for _ in range(B)]
    window, t = windows[-1], 0.0            # as the loop starts: its smallest window
    passes = dense = proposed = accepted = 0
    while min(c) < N:
        active = [b for b in range(B) if c[b] < N]
        q = min(window, max(N - c[b] for b in active))
        if q == 0:
            t += dense_ms
            dense += 1
            for b in active:
                c[b] += 1
                agree[b] = heuristics.agreement_after(agree[b], 0, 0)
        else:
            t += q * sparse_ms + verify_ms
            passes += 1
            for b in active:
                run = streams[b][c[b]:c[b] + q]
                acc = next((i for i, v in enumerate(run) if not v), len(run))
                acc = acc if len(run) == q or acc < len(run) else q      # past the end: kept
                proposed += q
                accepted += acc
                c[b] = min(c[b] + acc + 1, N)
                agree[b] = heuristics.agreement_after(agree[b], q, acc)
        window = heuristics.verify_window(
            choices, [agree[b][0] / sum(agree[b]) for b in active], sparse_ms, verify_ms,
            dense_ms)
    return dict(ms_per_token=t / (N - 1), verify_passes=passes, dense_steps=dense,
                acceptance=accepted / proposed if proposed else float("nan"),
                speedup_vs_dense=dense_ms * (N - 1) / t)


def load_streams(path: str, rows: int, new_tokens: int) -> list:
    from bench_generate import replay_streams
    return replay_streams(path, rows, new_tokens)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--acceptance", required=True, help="lossless_acceptance.py --trace-json file")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=133)
    ap.add_argument("--sparse-ms", type=float, required=True, help="one sparse decode step")
    ap.add_argument("--dense-ms", type=float, required=True, help="one dense decode step")
    ap.add_argument("--verify-ms", type=float, default=None,
                    help="one verify pass (default: --dense-ms)")
    ap.add_argument("--rectify-every", type=int, default=32,
                    help="the largest verify window (ReSAConfig.rectify_every)")
    ap.add_argument("--sweep", action="store_true",
                    help="also predict over sparse/dense cost ratios 0.1 .. 1.0")
    args = ap.parse_args()
    from resa_tl import ReSAConfig
    windows = ReSAConfig(lossless=True, rectify_every=args.rectify_every).verify_windows()
    streams = load_streams(args.acceptance, args.rows, args.new_tokens)
    rows = []
    for dense_steps in (True, False):
        r = simulate(streams, windows, args.sparse_ms, args.dense_ms, args.verify_ms,
                     dense_steps)
        rows.append(dict(r, policy="with dense steps" if dense_steps else "proposals only"))
    print(json.dumps(dict(args.__dict__, windows=windows, predictions=rows)))
    print(f"\n{args.rows} rows x {args.new_tokens} tokens, sparse {args.sparse_ms} ms, dense "
          f"{args.dense_ms} ms, verify {args.verify_ms or args.dense_ms} ms per step")
    print(f"{'policy':<26} {'ms/token':>9} {'vs dense':>9} {'passes':>7} {'dense steps':>12}")
    for r, name in zip(rows, ("with dense steps", "proposals only")):
        print(f"{name:<26} {r['ms_per_token']:9.3f} {r['speedup_vs_dense']:8.2f}x "
              f"{r['verify_passes']:7d} {r['dense_steps']:12d}")
    if args.sweep:
        print(f"\n{'sparse/dense':>12} {'vs dense, with dense steps':>27} {'proposals only':>15}")
        for k in range(1, 11):
            ratio = k / 10
            a, b = (simulate(streams, windows, ratio * args.dense_ms, args.dense_ms,
                             args.verify_ms, ds)["speedup_vs_dense"] for ds in (True, False))
            print(f"{ratio:12.1f} {a:26.2f}x {b:14.2f}x")


if __name__ == "__main__":
    main()
