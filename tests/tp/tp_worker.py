"""One rank of tests/test_tensor_parallel.py (run under torchrun): load a saved tiny model,
tensor-parallel when WORLD_SIZE is set (gloo on CPU), and write rank 0's greedy outputs of the
unattached model, of ReSA at ratio 1 with no rectification, and of ReSA with real sparsity.

    python tp_worker.py MODEL_DIR OUT_JSON            # one process
    torchrun --nproc-per-node 2 tp_worker.py MODEL_DIR OUT_JSON
"""
import json
import os
import sys

import torch
import transformers

import resa_tl


def main(path, out):
    kw = {"tp_plan": "auto"} if os.environ.get("WORLD_SIZE") else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw)
    model.eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :77] = 0                                   # left padding in row 1
    ids[1, :77] = 0
    gen = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=None,
               pad_token_id=0)
    res = {"tp_size": model.tp_size or 1}
    with torch.no_grad():
        res["dense"] = model.generate(ids, **gen).tolist()
        resa_tl.attach(model, sparse_ratio=1.0, min_blocks=1, rectify_every=0)
        res["ratio1"] = model.generate(ids, **gen).tolist()
        resa_tl.attach(model, sparse_ratio=0.2, min_blocks=2, rectify_every=6)
        out_resa = model.generate(ids, return_dict_in_generate=True, **gen)
        res["resa"] = out_resa.sequences.tolist()
        res["cache_kv_heads"] = out_resa.past_key_values.store.num_kv_heads
    if int(os.environ.get("RANK", 0)) == 0:
        with open(out, "w") as fh:
            json.dump(res, fh)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
