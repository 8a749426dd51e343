"""resa_tl under transformers tensor parallelism, on CPU: two processes (torchrun, gloo) load a
tiny Llama and a tiny Qwen2 (4 query / 2 KV heads) with tp_plan="auto"; each rank's ReSA cache
holds its own KV head. ReSA emits the same tokens as in one process, and ratio 1 with no
rectification the same tokens as the unattached model (left padding included). Plans that
resa_tl cannot follow are refused with the reason."""
import json
import os
import subprocess
import sys

import pytest
import torch

import resa_tl
from resa_tl.integration.tensor_parallel import local_heads

from test_attach import make_model

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp", "tp_worker.py")


def run(args, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([*args, WORKER, str(tmp_path / "model"), str(out)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_ranks_emit_single_process_tokens(arch, tmp_path):
    make_model(arch, layers=2).save_pretrained(tmp_path / "model")
    single = run([sys.executable], tmp_path, "single")
    tp = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
              "--master-port", str(29500 + os.getpid() % 1000)], tmp_path, "tp")
    assert single["tp_size"] == 1 and tp["tp_size"] == 2
    assert single["cache_kv_heads"] == 2 and tp["cache_kv_heads"] == 1
    assert tp["ratio1"] == tp["dense"] == single["dense"]
    assert tp["resa"] == single["resa"]
    assert single["resa"] != single["dense"]          # the sparse run is not trivially dense


def test_plans_resa_tl_cannot_follow():
    model = make_model("llama")                        # 4 query / 2 KV heads, unsharded
    assert local_heads(model) == (4, 2)
    model._tp_size = 4                                 # KV heads do not divide by 4
    with pytest.raises(ValueError, match="divide by the world size"):
        resa_tl.attach(model)
    model._tp_size = 2                                 # "sharded" but every rank holds all heads
    with pytest.raises(ValueError, match="cannot follow|resa_tl follows plans"):
        resa_tl.attach(model)
    model._tp_size = None
    assert local_heads(model) == (4, 2)
