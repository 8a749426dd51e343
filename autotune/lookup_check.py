"""Leave-one-out check of the schedule lookup (resa_tl.schedules.shape_distance / KEY_SPECS).

For every tuned shape of a run's results.json: drop its own entry, let the lookup pick the
nearest remaining entry of that op, and compare the config it would borrow, as measured at this
shape in the same run (when it was one of its candidates), with the heuristic default measured
there. Shapes that no entry may serve count as 1.0 (the heuristic runs).

    python autotune/lookup_check.py autotune/reports/sm90/<run>/results.json

Prints per op the geometric mean and the worst of default_time / borrowed_time (> 1: faster).
"""
from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from resa_tl import schedules  # noqa: E402


def borrowed_ratios(results: dict) -> dict[str, list[float]]:
    probs = [p for p in results["problems"] if p.get("status") == "tuned"]
    out: dict[str, list[float]] = {}
    for p in probs:
        times = {json.dumps(c["config"], sort_keys=True): c["timing"]["median_us"]
                 for c in p["candidates"]
                 if c.get("timing") and (c.get("validation") or {}).get("ok")}
        best = None
        for q in probs:
            if q is p or q["op"] != p["op"]:
                continue
            d = schedules.shape_distance(p["op"], q["key"], p["key"])
            if d is not None and (best is None or d < best[0]):
                best = (d, q)
        if best is None:
            out.setdefault(p["op"], []).append(1.0)
            continue
        t = times.get(json.dumps(best[1]["winner"], sort_keys=True))
        if t is not None:                   # the borrowed config was measured here
            out.setdefault(p["op"], []).append(p["default_latency_us"] / t)
    return out


def main(argv):
    for path in argv:
        print(path)
        ratios = borrowed_ratios(json.loads(Path(path).read_text()))
        for op, rs in sorted(ratios.items()):
            g = math.exp(statistics.mean(math.log(x) for x in rs))
            print(f"  {op:24s} n={len(rs):3d} geomean {g:.3f} worst {min(rs):.3f} "
                  f"best {max(rs):.3f}")
        allr = [x for rs in ratios.values() for x in rs]
        if allr:
            g = math.exp(statistics.mean(math.log(x) for x in allr))
            print(f"  {'all':24s} n={len(allr):3d} geomean {g:.3f} worst {min(allr):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
