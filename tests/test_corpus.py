"""Corpus loading and excerpting: sources, determinism, and helpful errors."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import deny
from n2g.corpus import Corpus, load_texts, make_excerpts
from n2g.errors import N2GError


def char_encode(text: str) -> list[int]:
    """A model-free tokenizer: one token per character."""
    return [ord(c) % 1000 for c in text]


def test_default_corpus_is_pydoc_and_deterministic():
    texts = load_texts()
    assert len(texts) > 50 and all(t.strip() for t in texts)
    assert sum(map(len, texts)) > 100_000
    assert texts == load_texts("default") == load_texts("pydoc")
    from pydoc_data.topics import topics

    assert texts[0] == topics[sorted(topics)[0]]
    a = Corpus.build(None, char_encode, length=32, max_excerpts=500)
    b = Corpus.build("default", char_encode, length=32, max_excerpts=500)
    assert a.source == b.source == "pydoc"
    assert a.excerpts.shape == (500, 32) and a.excerpts.dtype == torch.long
    assert a.fingerprint() == b.fingerprint() and len(a.fingerprint()) == 16
    c = Corpus.build(None, char_encode, length=32, max_excerpts=499)
    assert c.fingerprint() != a.fingerprint()


def test_excerpts_are_consecutive_windows_and_tails_dropped():
    encode = lambda text: [int(w) for w in text.split()]  # noqa: E731
    texts = [" ".join(map(str, range(10))), "1 2", " ".join(map(str, range(100, 108)))]
    ex = make_excerpts(texts, encode, length=4)
    assert ex.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [100, 101, 102, 103], [104, 105, 106, 107]]
    assert make_excerpts(texts, encode, length=4, max_excerpts=3).tolist() == ex[:3].tolist()
    with pytest.raises(N2GError, match="fewer than 20 tokens.*--excerpt-length"):
        make_excerpts(texts, encode, length=20)


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [{"body": "first doc", "id": 1}, {"body": "  "}, {"body": None}, {"body": "second doc"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(path), text_field="body") == ["first doc", "second doc"]
    assert load_texts(str(path), text_field="body", max_docs=1) == ["first doc"]
    with pytest.raises(N2GError, match="no field 'text'.*body, id.*--text-field"):
        load_texts(str(path))


def test_json_array(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"text": "a b"}, {"text": "c"}]), encoding="utf-8")
    assert load_texts(str(path)) == ["a b", "c"]


def test_json_nested_too_deeply_is_one_line(tmp_path):
    # Python's decoder recurses per level: 100,000 nested arrays end in RecursionError, not JSONDecodeError.
    deep = "[" * 100_000 + "]" * 100_000
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n' + deep + "\n", encoding="utf-8")
    (tmp_path / "c.json").write_text('{"text": ' + deep + "}", encoding="utf-8")
    with pytest.raises(N2GError, match="line 2 of .*c.jsonl nests JSON .* too deeply"):
        load_texts(str(tmp_path / "c.jsonl"))
    with pytest.raises(N2GError, match="c.json nests JSON .* too deeply"):
        load_texts(str(tmp_path / "c.json"))


def test_directory_is_read_recursively_in_sorted_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "a.md").write_text("ay", encoding="utf-8")
    (tmp_path / "sub" / "c.jsonl").write_text('{"text": "sea"}\n', encoding="utf-8")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_texts(str(tmp_path)) == ["ay", "bee", "sea"]
    corpus = Corpus.build(str(tmp_path), char_encode, length=2)
    assert corpus.excerpts.shape == (3, 2) and corpus.source == str(tmp_path)


def test_a_run_written_inside_the_corpus_folder_is_not_read_as_corpus(tmp_path):
    """`--out` inside `--corpus DIR` (or `--corpus .` with the default graphs/ folder): the run's files
    (scores.parquet, a notes.md) must not become corpus text, or the next run of the same command sees
    another corpus (and a Parquet file without a text column stopped it)."""
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    run = tmp_path / "graphs" / "run1"
    (run / "neurons").mkdir(parents=True)
    (run / "run.json").write_text('{"kind": "n2g.run", "identity": {}}', encoding="utf-8")
    (run / "notes.md").write_text("not corpus", encoding="utf-8")
    (run / "neurons" / "x.txt").write_text("nor this", encoding="utf-8")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "run.json").write_text('{"kind": "something else"}', encoding="utf-8")
    (tmp_path / "other" / "b.txt").write_text("bee", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["ay", "bee"]


def test_parquet_file_and_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train-00000.parquet"  # how Hugging Face stores a dataset
    pq.write_table(pa.table({"id": [1, 2, 3, 4], "content": ["first doc", None, " ", "second doc"]}), path,
                   row_group_size=2)
    assert load_texts(str(path), text_field="content") == ["first doc", "second doc"]
    (tmp_path / "a.txt").write_text("ay", encoding="utf-8")
    assert load_texts(str(tmp_path), text_field="content") == ["ay", "first doc", "second doc"]
    corpus = Corpus.build(str(path), char_encode, length=3, text_field="content")
    assert corpus.excerpts.shape == (6, 3)  # "first doc" and "second doc": 3 + 3 windows of 3 characters
    with pytest.raises(N2GError, match="no column 'text' .*id, content.*--text-field"):
        load_texts(str(path))
    with pytest.raises(N2GError, match="column 'id' .* holds int64, not text"):
        load_texts(str(path), text_field="id")
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(path.read_bytes()[:-40])
    with pytest.raises(N2GError, match="not a readable Parquet file"):
        load_texts(str(broken), text_field="content")


def test_plain_file_is_one_document(tmp_path):
    path = tmp_path / "doc.rst"
    path.write_text("line one\nline two\n", encoding="utf-8")
    assert load_texts(str(path)) == ["line one\nline two\n"]


def test_errors_say_what_to_do(tmp_path):
    with pytest.raises(N2GError, match="does not exist"):
        load_texts(str(tmp_path / "missing.txt"))
    binary = tmp_path / "x.txt"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(N2GError, match="is not a UTF-8 text file"):
        load_texts(str(binary))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(N2GError, match="is not a UTF-8 text file"):
        load_texts(str(latin))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\t", encoding="utf-8")
    with pytest.raises(N2GError, match="corpus is empty"):
        load_texts(str(empty))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(N2GError, match="holds no"):
        load_texts(str(tmp_path / "nothing"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(N2GError, match="line 2 .* not valid JSON"):
        load_texts(str(bad))


def test_a_corpus_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    # A glob passed over a folder it could not list without a word: its text silently left the corpus
    # (or, for the corpus folder itself, "holds no .txt files"). Denied where the OS would deny it.
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("more text", encoding="utf-8")
    (tmp_path / ".hidden").mkdir()  # hidden folders are not corpus text, so never listed
    assert sorted(load_texts(str(tmp_path))) == ["more text", "some text"]
    deny(monkeypatch, "os.scandir", tmp_path / "sub", tmp_path / ".hidden")
    with pytest.raises(N2GError, match=r"cannot list .*sub in the corpus \(Permission denied\); make it readable"):
        load_texts(str(tmp_path))


def test_hf_source_without_datasets(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(N2GError, match="pip install datasets"):
        load_texts("hf:some/dataset")


def test_a_corpus_build_reads_documents_only_as_far_as_max_excerpts_needs(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 200, encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"\x00" * 100)  # never reached: it would be refused as binary
    corpus = Corpus.build(str(tmp_path), char_encode, length=50, max_excerpts=4)
    assert corpus.excerpts.shape == (4, 50)
    with pytest.raises(N2GError, match="is not a UTF-8 text file"):  # needed after all: read, and refused
        Corpus.build(str(tmp_path), char_encode, length=50, max_excerpts=5)
    (tmp_path / "b.txt").write_text("  \n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\t", encoding="utf-8")
    with pytest.raises(N2GError, match="corpus is empty"):
        Corpus.build(str(tmp_path), char_encode, length=50)
    with pytest.raises(N2GError, match="excerpt length must be at least 1"):
        Corpus.build(str(tmp_path), char_encode, length=0)
    (tmp_path / "a.txt").write_text("short", encoding="utf-8")
    with pytest.raises(N2GError, match="yields no excerpt"):
        Corpus.build(str(tmp_path), char_encode, length=50)


def test_a_large_text_file_is_read_a_piece_at_a_time_cut_at_line_breaks(tmp_path, monkeypatch):
    import n2g.corpus as corpus

    monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)
    text = "".join(f"line {i} café ☕\n" for i in range(40))  # multi-byte characters across piece borders
    path = tmp_path / "big.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a BOM
    pieces = load_texts(str(path))
    assert len(pieces) > 5 and "".join(pieces) == text and all(p.endswith("\n") for p in pieces)
    assert all(len(p.encode("utf-8")) <= 64 + 64 for p in pieces)
    path.write_bytes(text.encode("utf-8") + b"tail \xff\xfe never read\n")  # invalid UTF-8 near the end
    with pytest.raises(N2GError, match=r"not a UTF-8 text file \(invalid start byte near byte \d+\)"):
        load_texts(str(path))
    corpus_ = Corpus.build(str(path), char_encode, length=16, max_excerpts=3)  # stops before the bad bytes
    assert corpus_.excerpts.shape == (3, 16)
    path.write_bytes(text.encode("utf-8") + b"\x00" * 10)
    with pytest.raises(N2GError, match="it looks binary"):
        load_texts(str(path))


def test_jsonl_lines_end_at_newlines_only_and_large_files_stream(tmp_path, monkeypatch):
    import n2g.corpus as corpus

    path = tmp_path / "c.jsonl"
    odd = "a\u2028b\x85c\x1cd"  # valid raw inside a JSON string; str.splitlines() would cut at each
    path.write_text(json.dumps({"text": odd}, ensure_ascii=False) + "\r\n" + json.dumps({"text": "two"}) + "\n",
                    encoding="utf-8")
    assert load_texts(str(path)) == [odd, "two"]
    monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)  # read in pieces: the same records, the same line numbers
    path.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(30)) + "{oops\n", encoding="utf-8")
    with pytest.raises(N2GError, match="line 31 of .* is not valid JSON"):
        load_texts(str(path))
    assert load_texts(str(path), max_docs=30) == [f"record {i}" for i in range(30)]


def runs_encode(text: str) -> list[int]:
    """A tokenizer whose tokens are whole runs of spaces and line breaks or of other characters,
    the way byte-level BPE keeps "\\n    " together: cutting inside a run changes the tokens."""
    import re
    import zlib

    return [zlib.crc32(m.group().encode()) % 50_000 for m in re.finditer(r"\s+|\S+", text)]


def test_a_long_document_is_tokenised_in_pieces_that_change_no_token(monkeypatch, smollm2):
    import n2g.corpus as corpus
    from n2g.corpus import _pydoc_texts, encode_long

    monkeypatch.setattr(corpus, "ENCODE_PIECE_CHARS", 300)
    monkeypatch.setattr(corpus, "CUT_CHECK_CHARS", 40)
    text = "\n\n".join(_pydoc_texts()[:40])  # prose, indented code, blank lines
    calls = []

    def counted(encode):
        def run(s):
            calls.append(len(s))
            return encode(s)
        return run

    crlf = text.replace("\n", "\r\n")  # Windows line ends, indented lines: cut before the line break
    indented = "\n".join("  " + line for line in text.split("\n"))
    for encode, text in [(smollm2.encode, text), (smollm2.encode, crlf), (smollm2.encode, indented),
                         (runs_encode, text), (runs_encode, crlf), (char_encode, text)]:
        calls.clear()
        assert encode_long(text, counted(encode)).tolist() == list(encode(text))
        assert max(calls) < len(text) // 10  # it was cut: no call saw the whole text
    # one that marks the start of every call (a prefix space, a BOS) finds no safe cut: every few pieces
    # the text is cut unchecked, so memory stays bounded, and only the marks at those borders differ
    marked = lambda s: [7] + char_encode(s)
    calls.clear()
    got = encode_long(text, counted(marked)).tolist()
    assert max(calls) <= (corpus.MAX_PIECE_PIECES + 1) * 300 and got.count(7) > 10
    assert [t for t in got if t != 7] == [t for t in marked(text) if t != 7]


def test_a_long_document_gives_the_same_excerpts_cut_or_whole(tmp_path, monkeypatch):
    import n2g.corpus as corpus

    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(400))
    path = tmp_path / "code.txt"
    path.write_text(text)
    whole = Corpus.build(str(path), runs_encode, length=8)
    monkeypatch.setattr(corpus, "ENCODE_PIECE_CHARS", 256)
    monkeypatch.setattr(corpus, "CUT_CHECK_CHARS", 32)
    cut = Corpus.build(str(path), runs_encode, length=8)
    assert torch.equal(whole.excerpts, cut.excerpts) and whole.fingerprint() == cut.fingerprint()
    assert len(whole) == len(runs_encode(text)) // 8 > 100  # excerpts run on across piece borders
    assert torch.equal(Corpus.build(str(path), runs_encode, length=8, max_excerpts=50).excerpts, whole.excerpts[:50])


def test_token_rows_read_excerpts_as_lists_without_copying_the_corpus():
    corpus_ = Corpus("t", 4, torch.arange(40).view(10, 4))
    rows = corpus_.rows()
    assert len(rows) == 10 and rows[3] == [12, 13, 14, 15] and rows[torch.tensor(9)] == [36, 37, 38, 39]
    assert rows.array.ctypes.data == corpus_.excerpts.data_ptr()  # a view, not a copy
    some = corpus_.rows([7, 2])  # only these excerpts, by their excerpt numbers
    assert some[2] == [8, 9, 10, 11] and some[7] == [28, 29, 30, 31] and len(some) == 2
    with pytest.raises(KeyError):
        some[3]
    import pickle

    assert pickle.loads(pickle.dumps(some))[7] == [28, 29, 30, 31]  # sent to worker processes


def test_a_large_json_list_is_read_a_record_at_a_time(tmp_path, monkeypatch):
    import n2g.corpus as corpus

    records = [{"text": f"doc {i}: brackets ] [ , and \"quotes\" \u2028 café ☕\n{'x' * (i % 7)}", "n": [i, {"k": 1.5e3}]}
               for i in range(60)] + [{"text": "   "}, {"text": "last"}]
    texts = [r["text"] for r in records if r["text"].strip()]
    path = tmp_path / "c.json"
    for dumped in (json.dumps(records), json.dumps(records, indent=2, ensure_ascii=False)):
        path.write_text(dumped, encoding="utf-8")
        assert load_texts(str(path)) == texts  # whole, as before
        monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)  # now it streams: pieces of 64 bytes
        assert load_texts(str(path)) == texts
        monkeypatch.undo()
    monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)
    path.write_text("[" + "1" * 200 + "]", encoding="utf-8")  # a number across pieces is one record
    with pytest.raises(N2GError, match="record 0 of .* is a JSON int"):
        load_texts(str(path))
    good = json.dumps(records)
    for broken, says in ((good[:-40], "record 59: Expecting ',' delimiter"), (good + ' [{"text": "b"}]', "more text follows"),
                         (good[:-1] + ' {"text": "b"}]', "after record 61: '{'"), (good[:-1], "after record 61: the file ends")):
        path.write_text(broken, encoding="utf-8")
        with pytest.raises(N2GError, match=f"is not one JSON list of records \\({says}.*\\.jsonl file"):
            load_texts(str(path))
    # only as far as needed: bytes that are not UTF-8 near the end are never read
    path.write_bytes(good[:-1].encode("utf-8") + b', {"text": "\xff\xfe"}' * 200 + b"]")
    built = Corpus.build(str(path), char_encode, length=16, max_excerpts=3)
    assert built.excerpts.shape == (3, 16)
    with pytest.raises(N2GError, match="not a UTF-8 text file"):
        load_texts(str(path))


def test_the_corpus_fingerprint_hashes_the_ids_in_blocks_whatever_their_storage():
    import hashlib

    c = Corpus("src", 4, torch.arange(4 * 3_000_000).view(3_000_000, 4) % 50_000)  # 12 blocks
    h = hashlib.sha256(b"src" + b"4" + c.excerpts.numpy().tobytes()).hexdigest()[:16]
    assert c.fingerprint() == h
    assert Corpus("src", 4, c.excerpts.to(torch.int32)).fingerprint() == h  # ids, not their storage type
    tokens = hashlib.sha256(b"tokens|" + b"4" + c.excerpts.numpy().tobytes()).hexdigest()[:16]
    assert c.tokens_key() == Corpus("/elsewhere/src", 4, c.excerpts).tokens_key() == tokens != h  # the name left out


def test_parquet_text_stored_as_a_dictionary_is_text(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    words = pa.array(["alpha beta", "gamma", None, "alpha beta"]).dictionary_encode()  # how repeated strings are kept
    pq.write_table(pa.table({"text": words}), path)
    assert load_texts(str(path)) == ["alpha beta", "gamma", "alpha beta"]
    big = tmp_path / "big.parquet"  # rows of a megabyte each, one per row group
    pq.write_table(pa.table({"text": ["ab" * (1 << 19)] * 40}), big, row_group_size=1, compression="zstd")
    built = Corpus.build(str(big), char_encode, length=8, max_excerpts=2)
    assert built.excerpts.tolist() == [[97, 98] * 4] * 2


def test_utf16_and_utf32_text_is_named_with_how_to_convert_it(tmp_path, monkeypatch):
    import n2g.corpus as corpus

    for encoding, name in (("utf-16", "UTF-16"), ("utf-32", "UTF-32")):
        path = tmp_path / f"{encoding}.txt"
        path.write_bytes(("some text\n" * 20).encode(encoding))  # Python writes the byte order mark first
        with pytest.raises(N2GError, match=f"is {name} text, not UTF-8; convert it to UTF-8 .*iconv -f {name}"):
            load_texts(str(path))
        monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)  # read in pieces: the same message
        with pytest.raises(N2GError, match=f"is {name} text, not UTF-8"):
            load_texts(str(path))
        monkeypatch.undo()


def test_parquet_batches_hold_about_64_mb_of_text_whatever_the_row_size(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from n2g.corpus import _parquet_batch_rows

    small, big = tmp_path / "small.parquet", tmp_path / "big.parquet"
    pq.write_table(pa.table({"text": ["a short document"] * 1000}), small)
    pq.write_table(pa.table({"text": ["ab" * (1 << 22)] * 20}), big, row_group_size=1, compression="zstd")  # 8 MB rows
    assert _parquet_batch_rows(pq.ParquetFile(small)) == 256
    assert _parquet_batch_rows(pq.ParquetFile(big)) == 7  # 64 MB / 8 MB a row, rounded down
