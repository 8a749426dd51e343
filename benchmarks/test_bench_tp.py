"""CPU check of bench_tp.py: at a toy shape, in one process and under torchrun with two
(gloo), it writes a checkpoint, loads it (tensor-parallel with two), and times every mode."""
import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("procs", [1, 2])
def test_toy_run(tmp_path, procs):
    out = tmp_path / "tp.json"
    launch = [sys.executable] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
        "--master-port", str(29600 + os.getpid() % 1000)]
    proc = subprocess.run([*launch, os.path.join(HERE, "bench_tp.py"), "--shape", "toy",
                           "--contexts", "100", "--batches", "2", "--new-tokens", "36",
                           "--device", "cpu", "--model-dir", str(tmp_path / "model"),
                           "--json", str(out)],
                          cwd=HERE, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["header"]["world_size"] == procs
    assert [r["mode"] for r in data["rows"]] == ["resa", "full", "dense"]
    assert all(r["ms_per_token"] > 0 for r in data["rows"])
