"""How far torch.compile'd generate() drifts from eager generate() with resa_tl attached, on a
small random bf16 Qwen2 model (the one tests/gpu/test_attach_gpu.py uses): per decode step, the
largest logit difference as a fraction of the logit scale, for mode="default" (inductor, no CUDA
graphs) and mode="reduce-overhead" (CUDA graphs), at ratio 1 (dense attention) and at 20% kept.

    python benchmarks/compiled_vs_eager.py [--json out.json]      # needs a CUDA GPU

Why it exists: inductor fuses the bf16 model differently from eager, so compiled and eager
logits differ by rounding even with dense attention; a sparse selection parting at a near-tie
amplifies that. tests/gpu/test_attach_gpu.py therefore compares CUDA graphs against compiled
code without graphs, not against eager.
"""
from __future__ import annotations

import argparse
import json

import torch
import transformers
from transformers import CompileConfig

import resa_tl
from _timing import git_commit

CONFIGS = {"ratio 1": dict(sparse_ratio=1.0, min_blocks=1, rectify_every=8),
           "keep 20%": dict(sparse_ratio=0.2, min_blocks=2, local_blocks=1, rectify_every=8)}


def make_model():
    cfg = transformers.Qwen2Config(vocab_size=256, hidden_size=256, intermediate_size=512,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=64, initializer_range=0.2,
                                   max_position_embeddings=4096, pad_token_id=0,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ids = torch.randint(3, 256, (2, 600), generator=torch.Generator().manual_seed(7)).cuda()
    kw = dict(max_new_tokens=30, cache_implementation="static", return_dict_in_generate=True,
              output_logits=True, do_sample=False, eos_token_id=None, pad_token_id=0)
    rows = []
    for name, cfg in CONFIGS.items():
        model = make_model()
        resa_tl.attach(model, **cfg)
        with torch.no_grad():
            eager = model.generate(ids, disable_compile=True, **kw)
            for mode in ("default", "reduce-overhead"):
                torch._dynamo.reset()
                out = model.generate(ids, compile_config=CompileConfig(fullgraph=True, mode=mode),
                                     **kw)
                for b in range(ids.shape[0]):
                    diff = (eager.sequences[b, 600:] != out.sequences[b, 600:]).nonzero()
                    first = int(diff[0]) if diff.numel() else 30
                    rel = [float((out.logits[i][b].float() - eager.logits[i][b].float()).abs().max()
                                 / eager.logits[i][b].float().abs().max())
                           for i in range(1, min(first, 29) + 1)]
                    rows.append(dict(config=name, mode=mode, row=b, first_token_difference=first,
                                     max_rel_logit_diff=max(rel), per_step=rel))
    header = dict(gpu=torch.cuda.get_device_name(), commit=git_commit(), torch=torch.__version__)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, rows=rows), fh, indent=1)
    print(json.dumps(header))
    print(f"{'config':10s} {'mode':16s} row  first token diff  max |logit diff| / scale "
          "(steps before it)")
    for r in rows:
        print(f"{r['config']:10s} {r['mode']:16s} {r['row']:3d}  {r['first_token_difference']:16d}"
              f"  {r['max_rel_logit_diff']:.3f}")


if __name__ == "__main__":
    main()
