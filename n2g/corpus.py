"""Text in, fixed-length token excerpts out.

A corpus source is the offline Python reference documentation every CPython carries
(``pydoc_data.topics``, the default), a text / JSONL / Parquet file, a directory of such files, or a
Hugging Face dataset (``hf:NAME[:CONFIG]``, needs the optional ``datasets`` package). Documents
are tokenised and cut into consecutive, non-overlapping windows of exactly ``length`` tokens; the
result is deterministic and fingerprinted so later stages can tell whether a scan is still valid.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from n2g.errors import N2GError, not_unicode

log = logging.getLogger(__name__)

DEFAULT_SOURCES = ("default", "pydoc")
TEXT_SUFFIXES = (".txt", ".md", ".jsonl", ".text", ".parquet")
"""File types read from a corpus directory."""


def _pydoc_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def _record_text(record, text_field: str, where: str) -> str:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise N2GError(f"{where} is a JSON {type(record).__name__}, not an object with a "
                       f"{text_field!r} field; write one JSON object per line")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))) or "none"
        raise N2GError(f"{where} has no field {text_field!r} (fields: {fields}); "
                       "choose the field holding the text with --text-field")
    value = record[text_field]
    if value is None:  # a record with no text, skipped like an empty one (and like a Parquet file's null cells)
        return ""
    if not isinstance(value, str):
        raise N2GError(f"field {text_field!r} of {where} is not a string; "
                       "choose the field holding the text with --text-field")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # a JSON escape such as "\\ud800" that names half a character
        raise N2GError(f"field {text_field!r} of {where} holds a lone surrogate (U+{ord(value[exc.start]):04X}, "
                       f"character {exc.start}), which is not text; fix or remove that \\u escape") from None
    return value


_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
              (b"\xfe\xff", "UTF-16"))


def _not_text(path: Path, head: bytes) -> str:
    """Why a file holding NUL bytes is refused: text in a wide encoding (by its byte order mark), or binary."""
    for bom, name in _WIDE_BOMS:
        if head.startswith(bom):
            return (f"{path} is {name} text, not UTF-8; convert it to UTF-8 "
                    f"(e.g. iconv -f {name} -t UTF-8 {path} > converted.txt)")
    return f"{path} is not a UTF-8 text file (it looks binary); pass text, markdown or JSONL files"


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise N2GError(f"cannot read {path} ({exc.strerror}); check the path and permissions") \
            from exc
    if b"\x00" in data:
        raise N2GError(_not_text(path, data))
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise N2GError(f"{path} is not a UTF-8 text file ({exc.reason} at byte {exc.start}); "
                       "convert it to UTF-8") from exc


TEXT_PIECE_BYTES = 1 << 24
"""A plain text file larger than this is read a piece at a time, each piece one document ending at a
line break, so a huge file is never held whole (and ``--max-excerpts`` stops reading it early)."""


def _text_pieces(path: Path) -> Iterator[str]:
    """The documents of one plain text file: the whole file, or pieces of it cut at line breaks."""
    if _file_size(path) <= TEXT_PIECE_BYTES:
        yield _read_text(path)
        return
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    carry, offset = "", 0
    try:
        with path.open("rb") as f:
            while True:
                data = f.read(TEXT_PIECE_BYTES)
                if b"\x00" in data:
                    raise N2GError(_not_text(path, data if offset == 0 else b""))
                try:
                    text = carry + decoder.decode(data, final=not data)
                except UnicodeDecodeError as exc:
                    raise N2GError(f"{path} is not a UTF-8 text file ({exc.reason} near byte {offset + exc.start}); "
                                   "convert it to UTF-8") from None
                offset += len(data)
                if not data:
                    if text:
                        yield text
                    return
                cut = text.rfind("\n") + 1
                if cut == 0:  # one line longer than a piece: it goes on into the next piece
                    carry = text
                    if len(carry) > 4 * TEXT_PIECE_BYTES:  # a single line of this size is cut anyway
                        yield carry
                        carry = ""
                    continue
                carry = text[cut:]
                yield text[:cut]
    except OSError as exc:
        raise N2GError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from exc


def _json_array(path: Path, pieces: Iterable[str], text_field: str) -> Iterator[str]:
    """The text field of each record of a file holding one JSON list, decoded a record at a time from
    consecutive ``pieces`` of the file, so only the records being read are held."""
    decoder, chunks = json.JSONDecoder(), iter(pieces)
    buf, pos, done = "", 0, False

    def fill() -> None:
        nonlocal buf, pos, done
        piece = next(chunks, None)
        done = piece is None
        buf, pos = buf[pos:] + (piece or ""), 0

    def skip_space() -> None:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf) or done:
                return
            fill()

    def broken(what: str) -> N2GError:
        return N2GError(f"{path} is not one JSON list of records ({what}); a .json corpus is a list of "
                        "objects with a text field, JSON lines go in a .jsonl file")

    skip_space()
    pos += 1  # the opening bracket, seen by the caller
    skip_space()
    n = 0
    if buf[pos: pos + 1] == "]":
        pos += 1
    else:
        while True:
            skip_space()
            while True:  # a record may run past the piece in hand: read on until it decodes
                try:
                    value, end = decoder.raw_decode(buf, pos)
                    if end < len(buf) or done:  # a number could go on in the next piece
                        break
                except json.JSONDecodeError as exc:
                    if done:
                        raise broken(f"record {n}: {exc.msg}") from None
                except ValueError as exc:  # it decodes, but a number has more digits than Python converts
                    raise broken(f"record {n}: {_first_clause(exc)}") from None
                except RecursionError:
                    raise N2GError(f"record {n} of {path} nests JSON arrays or objects too deeply to read; "
                                   "a JSON corpus is a list of objects with a text field") from None
                fill()
            pos = end
            yield _record_text(value, text_field, f"record {n} of {path}")
            n += 1
            skip_space()
            sep = buf[pos: pos + 1]
            pos += 1
            if sep == "]":
                break
            if sep != ",":
                raise broken(f"after record {n - 1}: {'the file ends' if not sep else repr(sep)}")
    skip_space()
    if pos < len(buf):
        raise broken("more text follows the list")


def _json_records(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() != ".json":  # JSON lines: read a piece at a time, never held whole
        yield from _json_lines(path, _text_pieces(path), text_field)
        return
    if _file_size(path) > TEXT_PIECE_BYTES and _starts_with(path, b"["):  # a large list: a record at a time
        yield from _json_array(path, _text_pieces(path), text_field)
        return
    text = _read_text(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # not one JSON value: read it as JSON lines below
    except ValueError as exc:  # it decodes, but a number has more digits than Python converts
        raise N2GError(f"{path} cannot be read as JSON ({_first_clause(exc)}); "
                       "a JSON corpus is a list of objects with a text field") from None
    except RecursionError:
        raise N2GError(f"{path} nests JSON arrays or objects too deeply to read; "
                       "a JSON corpus is a list of objects with a text field") from None
    if isinstance(whole, list):
        for n, record in enumerate(whole):
            yield _record_text(record, text_field, f"record {n} of {path}")
        return
    if isinstance(whole, dict):
        yield _record_text(whole, text_field, str(path))
        return
    yield from _json_lines(path, [text], text_field)


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise N2GError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from exc


def _starts_with(path: Path, prefix: bytes) -> bool:
    """Whether the file's first bytes after a UTF-8 BOM and white space are ``prefix``."""
    try:
        with path.open("rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise N2GError(f"cannot read {path} ({exc.strerror}); check the path and permissions") from exc
    return head.removeprefix(b"\xef\xbb\xbf").lstrip(b" \t\r\n").startswith(prefix)


def _json_lines(path: Path, pieces: Iterable[str], text_field: str) -> Iterator[str]:
    """The text field of each JSON line of ``pieces`` (consecutive parts of one file, each ending at a line
    break). Lines end at ``\n`` only: a JSON string may hold U+2028 or U+0085 as they are."""
    lineno = 0
    for piece in pieces:
        lines = piece.split("\n")
        if piece.endswith("\n"):
            lines.pop()  # the empty text after the piece's last line break
        for line in lines:
            lineno += 1
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            yield _json_line(path, lineno, line, text_field)


def _first_clause(exc: Exception) -> str:
    """An exception's message up to its first semicolon (Python's advice to call set_int_max_str_digits is
    not the user's to act on)."""
    return str(exc).split(";")[0]


def _json_line(path: Path, lineno: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise N2GError(f"line {lineno} of {path} is not valid JSON ({exc.msg}); "
                       "a .jsonl corpus needs one JSON object per line") from exc
    except ValueError as exc:  # it decodes, but a number has more digits than Python converts
        raise N2GError(f"line {lineno} of {path} cannot be read as JSON ({_first_clause(exc)}); "
                       "a .jsonl corpus needs one JSON object per line") from None
    except RecursionError:
        raise N2GError(f"line {lineno} of {path} nests JSON arrays or objects too deeply to read; "
                       "a .jsonl corpus needs one flat JSON object with a text field per line") from None
    return _record_text(record, text_field, f"line {lineno} of {path}")


PARQUET_BATCH_BYTES = 64 << 20
"""About this many bytes of a Parquet file's text (uncompressed) are decoded at a time: 256 rows of
ordinary documents, or one row where rows are tens of megabytes."""


def _parquet_batch_rows(pf) -> int:
    """Rows per batch so a batch holds about :data:`PARQUET_BATCH_BYTES` (from the row groups' sizes)."""
    try:
        meta = pf.metadata
        rows = sum(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    except Exception:
        return 16
    if rows <= 0 or size <= 0:
        return 256
    return int(min(256, max(1, PARQUET_BATCH_BYTES * rows // size)))


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` column of a Parquet file (how Hugging Face datasets are stored), read a
    batch of rows at a time so memory stays flat; null cells are skipped. Needs pyarrow."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise N2GError(f"{path} is a Parquet file, which needs pyarrow; install it with `pip install pyarrow`, "
                       "or convert the corpus to JSONL") from exc
    try:  # pyarrow opens only UTF-8 path names; a file name that is not is handed over as an open file
        pf = pq.ParquetFile(open(path, "rb") if not_unicode(str(path)) else path)
        schema = pf.schema_arrow
    except Exception as exc:  # pyarrow's errors: not Parquet, truncated, unreadable
        raise N2GError(f"{path} is not a readable Parquet file ({str(exc)[:200]}); check the file") from None
    if text_field not in schema.names:
        raise N2GError(f"{path} has no column {text_field!r} (columns: {', '.join(schema.names[:20]) or 'none'}); "
                       "choose the column holding the text with --text-field")
    kind = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda t: False)
    plain = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or is_view(t)
    if not (plain(kind) or (pa.types.is_dictionary(kind) and plain(kind.value_type))):
        raise N2GError(f"column {text_field!r} of {path} holds {kind}, not text; "
                       "choose the column holding the text with --text-field")
    try:
        # A batch of about PARQUET_BATCH_BYTES, each row made a Python string only when it is wanted: a
        # small compressed file can hold rows of many megabytes, and --max-excerpts may need only the first.
        for batch in pf.iter_batches(columns=[text_field], batch_size=_parquet_batch_rows(pf)):
            column = batch.column(0)
            for i in range(len(column)):
                value = column[i].as_py()
                if value is not None:
                    yield value
    except N2GError:
        raise
    except Exception as exc:
        raise N2GError(f"{path} could not be read to the end ({str(exc)[:200]}); check the file") from None


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix.lower() == ".parquet":
        yield from _parquet_texts(path, text_field)
    elif path.suffix.lower() in (".jsonl", ".json"):
        yield from _json_records(path, text_field)
    else:
        yield from _text_pieces(path)


def _is_run_dir(folder: Path) -> bool:
    """Whether ``folder`` holds an n2g run (its ``run.json`` says so)."""
    try:
        with open(folder / "run.json", "rb") as f:
            return b'"n2g.run"' in f.read(4096)
    except OSError:
        return False


def _dir_texts(path: Path, text_field: str) -> Iterator[str]:
    runs: dict[Path, bool] = {}

    def in_run(p: Path) -> bool:  # n2g's own output (an --out inside the corpus folder) is not corpus text
        return any(runs.setdefault(d, _is_run_dir(d)) for d in p.parents if d != path and d.is_relative_to(path))

    def refuse(err: OSError):  # a glob passes over a folder it cannot list without a word
        raise N2GError(f"cannot list {err.filename} in the corpus ({err.strerror}); make it readable, or move it "
                       "out of the corpus folder")

    found = []
    for root, dirs, names in os.walk(path, onerror=refuse):  # links to folders are not followed
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [Path(root, name) for name in names if not name.startswith(".")]
    files = sorted(p for p in found if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES and not in_run(p))
    if not files:
        raise N2GError(f"directory {path} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                       "add text files or point the corpus at a file")
    for file in files:
        yield from _file_texts(file, text_field)


def _hf_texts(source: str, text_field: str) -> Iterator[str]:
    parts = source.split(":", 2)
    name = parts[1] if len(parts) > 1 else ""
    config = parts[2] if len(parts) > 2 and parts[2] else None
    if not name:
        raise N2GError(f"corpus {source!r} names no dataset; use hf:NAME or hf:NAME:CONFIG")
    try:
        import datasets
    except ImportError as exc:
        raise N2GError("Hugging Face corpora need the datasets package; install it with "
                       "`pip install datasets`, or use a local text/JSONL corpus") from exc
    try:
        stream = datasets.load_dataset(name, config, split="train", streaming=True)
        for n, record in enumerate(stream):
            yield _record_text(record, text_field, f"record {n} of {name}")
    except N2GError:
        raise
    except Exception as exc:
        raise N2GError(f"could not load dataset {name!r} (config {config!r}): {exc}; "
                       "check the name and your network, or use a local corpus") from exc


def _take(texts: Iterable[str], max_docs: int | None) -> list[str]:
    out = []
    for text in texts:
        if text.strip():
            out.append(text)
            if max_docs is not None and len(out) >= max_docs:
                break  # the next document is never read
    return out


def load_texts(source: str | None = None, *, text_field: str = "text",
               max_docs: int | None = None) -> list[str]:
    """Documents of a corpus source, in a deterministic order; empty documents are dropped.

    ``source``: ``None``/``"default"``/``"pydoc"`` (Python's offline reference docs), a file
    (``.jsonl``/``.json``: the ``text_field`` of each record; ``.parquet``: its ``text_field`` column,
    with pyarrow; anything else: one document, or pieces of 16 MiB cut at line breaks when larger), a directory (every ``.txt``/``.md``/``.jsonl``/``.text``/
    ``.parquet`` file under it, sorted), or
    ``hf:NAME[:CONFIG]`` (train split, streamed).
    """
    if max_docs is not None and max_docs < 1:
        raise N2GError(f"max_docs must be at least 1, got {max_docs}")
    texts, label = _source_texts(source, text_field)
    docs = _take(texts, max_docs)
    if not docs:
        raise N2GError(f"corpus is empty: {label} holds no non-blank text; add text to it")
    return docs


def _source_texts(source: str | None, text_field: str) -> tuple[Iterable[str], str]:
    """The documents of ``source`` as a lazy iterable (files are read as they are reached), and its label."""
    if source is None or str(source).lower() in DEFAULT_SOURCES:
        texts: Iterable[str] = _pydoc_texts()
        label = "the default corpus"
    elif str(source).startswith("hf:"):
        texts, label = _hf_texts(str(source), text_field), str(source)
    else:
        path = Path(source).expanduser()
        if path.is_dir():
            texts = _dir_texts(path, text_field)
        elif path.is_file():
            texts = _file_texts(path, text_field)
        elif path.exists():  # a FIFO, device or socket: reading it could block or never end
            raise N2GError(f"corpus {source!r} is not a regular file or a directory (it is a pipe, device "
                           "or socket); save the text to a file and pass that")
        else:
            raise N2GError(f"corpus {source!r} does not exist; pass a text/JSONL file, a "
                           "directory, hf:NAME for a Hugging Face dataset, or 'default'")
        label = str(path)
    return texts, label


PREFIX_MARGIN = 16
"""Tokens dropped at the end of a partly tokenised document, where the cut could change them."""


ENCODE_PIECE_CHARS = 1 << 20
"""A document longer than this many characters is tokenised a piece at a time: a fast tokenizer holds
several hundred bytes per token while it encodes (offsets, token strings), 2 GB for a 15 MB text."""

CUT_CHECK_CHARS = 256
"""Characters each side of a candidate cut that are encoded to check that the cut changes no token."""


def _ids(ids) -> np.ndarray:
    return np.fromiter(ids, dtype=np.int64, count=len(ids)) if isinstance(ids, list) else np.asarray(ids, np.int64)


MAX_PIECE_PIECES = 4
"""A stretch of this many pieces without a checked cut is cut anyway, before a space or line break: a
tokenizer that changes tokens at every cut (one that marks the start of each call), or a text without
line breaks, then costs a few token ids at a border every few megabytes instead of gigabytes of memory."""


def _candidates(text: str, lo: int, hi: int, tries: int) -> Iterator[int]:
    """Cut positions in ``(lo, hi]``, nearest ``hi`` first: for each of the last ``tries`` line breaks, before
    the run of white space holding it ("word|\\r\\n  next") and right after it; then before runs of spaces."""
    for mark in ("\n", " "):
        pos = hi
        for _ in range(tries):
            at = text.rfind(mark, lo, pos)
            if at <= lo:
                break
            start = at
            while start > lo and text[start - 1].isspace():
                start -= 1
            if start > lo:
                yield start
            if mark == "\n":
                yield at + 1
            pos = start


def _safe_cut(text: str, lo: int, hi: int, encode: Callable[[str], list[int]], tries: int = 16) -> int | None:
    """A position in ``(lo, hi]`` where cutting ``text`` changes no token ids, or None.

    The text around each candidate (:func:`_candidates`) is encoded whole and as its two halves; a cut
    is taken only where both agree, so the pieces give the ids the whole text gives.
    """
    for cut in _candidates(text, lo, hi, tries):
        left, right = text[max(0, cut - CUT_CHECK_CHARS): cut], text[cut: cut + CUT_CHECK_CHARS]
        if right and list(encode(left + right)) == list(encode(left)) + list(encode(right)):
            return cut
    return None


def _encode_pieces(text: str, encode: Callable[[str], list[int]]) -> Iterator[np.ndarray]:
    """The token ids of ``text`` as int64 arrays of consecutive pieces, which joined are ``encode(text)``.

    A text longer than :data:`ENCODE_PIECE_CHARS` is cut about every ``ENCODE_PIECE_CHARS`` characters at
    checked cuts (:func:`_safe_cut`); where a stretch has none the piece grows, up to
    :data:`MAX_PIECE_PIECES` pieces, where it is cut unchecked before white space (or anywhere)."""
    step = max(ENCODE_PIECE_CHARS // 2, 1)
    start = 0
    while len(text) - start > ENCODE_PIECE_CHARS:
        cut, hi = None, start + ENCODE_PIECE_CHARS
        while cut is None and hi < len(text):
            cut = _safe_cut(text, hi - step, hi, encode)
            if cut is None and hi - start >= MAX_PIECE_PIECES * ENCODE_PIECE_CHARS:
                cut = next(_candidates(text, hi - step, hi, 1), hi)
                log.debug("no token-preserving cut in %d characters: cut at %d unchecked", hi - start, cut)
            hi += step
        if cut is None:
            break
        yield _ids(list(encode(text[start:cut])))
        start = cut
    yield _ids(list(encode(text[start:] if start else text)))


def encode_long(text: str, encode: Callable[[str], list[int]]) -> np.ndarray:
    """``encode(text)`` as an int64 array, tokenised a piece at a time (:func:`_encode_pieces`)."""
    pieces = list(_encode_pieces(text, encode))
    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def _encode_prefix(text: str, encode: Callable[[str], list[int]], need: int | None) -> Iterator[np.ndarray]:
    """Token ids of ``text`` (in pieces, :func:`_encode_pieces`), or of a prefix of it when only the
    first ``need`` ids are wanted.

    ``--max-excerpts`` on one huge file must not tokenise all of it: a growing prefix, cut at a
    line break, is tokenised until it yields ``need`` ids plus a margin; the ids before the
    margin are the ones the whole text gives (tokenisers do not merge across a line break).
    """
    if need is None or len(text) <= max(65536, 16 * need):
        yield from _encode_pieces(text, encode)
        return
    chars = max(65536, 16 * need)
    while chars < len(text):
        cut = text.rfind("\n", 0, chars)
        if cut < chars // 2:
            cut = text.rfind(" ", 0, chars)
        if cut < chars // 2:
            cut = chars
        ids = list(encode(text[:cut]))
        if len(ids) >= need + PREFIX_MARGIN:
            yield _ids(ids[: len(ids) - PREFIX_MARGIN])
            return
        chars *= 4
    yield from _encode_pieces(text, encode)


def make_excerpts(texts: Iterable[str], encode: Callable[[str], list[int]], length: int = 64,
                  max_excerpts: int | None = None) -> torch.Tensor:
    """Cut each tokenised document into consecutive windows of exactly ``length`` tokens.

    Returns ``LongTensor[n_excerpts, length]``. A document's tail shorter than ``length`` is
    dropped; ``max_excerpts`` keeps the first N windows (documents after that are not tokenised).
    """
    if length < 1:
        raise N2GError(f"excerpt length must be at least 1, got {length}")
    if max_excerpts is not None and max_excerpts < 1:
        raise N2GError(f"max_excerpts must be at least 1, got {max_excerpts}")
    out = array("q")  # every excerpt's ids, appended as each piece is tokenised: one copy of the corpus
    count = 0
    for text in texts:
        need = None if max_excerpts is None else (max_excerpts - count) * length
        carry = np.zeros(0, np.int64)  # the document's ids not yet in a whole excerpt
        for piece in _encode_prefix(text, encode, need):
            ids = np.concatenate([carry, piece]) if len(carry) else piece
            n = len(ids) // length
            if max_excerpts is not None:
                n = min(n, max_excerpts - count)
            out.frombytes(memoryview(np.ascontiguousarray(ids[: n * length])).cast("B"))
            count += n
            carry = ids[n * length:]
            if max_excerpts is not None and count >= max_excerpts:
                break
        if max_excerpts is not None and count >= max_excerpts:
            break
    if not count:
        raise N2GError(f"the corpus has fewer than {length} tokens in every document, so it "
                       "yields no excerpt; lower --excerpt-length or add text")
    return torch.from_numpy(np.frombuffer(out, dtype=np.int64).reshape(count, length))


class TokenRows(Sequence):
    """Excerpts' token ids by excerpt index, each row read from an array as a list when asked.

    The fitting stages index excerpts as lists of ints; a list of lists over the whole corpus costs
    about 40 bytes a token, against 8 for the array it reads. With ``index`` (excerpt numbers, one
    per row of ``array``) only those excerpts are held: what a worker process needs."""

    def __init__(self, array, index: Sequence[int] | None = None):
        self.array = array.numpy() if isinstance(array, torch.Tensor) else array
        self.index = None if index is None else {int(e): r for r, e in enumerate(index)}

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, excerpt):
        if isinstance(excerpt, slice):
            raise TypeError("TokenRows is indexed by one excerpt number at a time")
        row = int(excerpt) if self.index is None else self.index[int(excerpt)]
        return self.array[row].tolist()


@dataclass
class Corpus:
    """Fixed-length token excerpts cut from one source."""

    source: str
    """Where the text came from (``"pydoc"``, a path, ``hf:NAME``)."""
    length: int
    """Tokens per excerpt."""
    excerpts: torch.Tensor
    """``LongTensor[n_excerpts, length]`` of token ids, without BOS."""

    def __len__(self) -> int:
        return int(self.excerpts.shape[0])

    def rows(self, index: Sequence[int] | None = None) -> TokenRows:
        """The excerpts (or only those numbered in ``index``) as token-id lists read when indexed."""
        if index is None:
            return TokenRows(self.excerpts)
        index = [int(e) for e in index]
        return TokenRows(self.excerpts.numpy()[index], index)

    def fingerprint(self) -> str:
        """First 16 hex digits of a SHA-256 over source, length and the excerpt tokens."""
        return self._digest(self.source)

    def tokens_key(self) -> str:
        """First 16 hex digits of a SHA-256 over length and the excerpt tokens alone: the same corpus named
        by another path (``corpus.txt``, ``./corpus.txt``, ``/abs/corpus.txt``) has the same key."""
        return self._digest(None)

    def _digest(self, source: str | None) -> str:
        h = hashlib.sha256()
        if source is not None:
            h.update(source.encode("utf-8", "surrogateescape"))  # a file name need not be UTF-8
        else:
            h.update(b"tokens|")
        h.update(str(self.length).encode("ascii"))
        ids = self.excerpts.numpy()
        step = max(1, (1 << 22) // max(1, self.length))  # blocks of about 4M ids: never a copy of the whole corpus
        for start in range(0, len(ids), step):
            h.update(np.ascontiguousarray(ids[start: start + step], np.int64).data)
        return h.hexdigest()[:16]

    @classmethod
    def build(cls, source: str | None, encode: Callable[[str], list[int]], length: int = 64,
              max_excerpts: int | None = None, text_field: str = "text",
              max_docs: int | None = None) -> "Corpus":
        """Load ``source`` as :func:`load_texts` does and cut it with :func:`make_excerpts`, reading
        documents only as far as ``max_excerpts`` needs (a directory of large files is not held whole)."""
        name = "pydoc" if source is None or str(source).lower() in DEFAULT_SOURCES \
            else str(source)
        if max_docs is not None and max_docs < 1:
            raise N2GError(f"max_docs must be at least 1, got {max_docs}")
        texts, label = _source_texts(source, text_field)
        seen = [0]

        def documents():
            for text in texts:
                if text.strip():
                    seen[0] += 1
                    yield text
                    if max_docs is not None and seen[0] >= max_docs:
                        return  # the next document is never read

        try:
            excerpts = make_excerpts(documents(), encode, length=length, max_excerpts=max_excerpts)
        except N2GError as exc:
            if seen[0] == 0 and "yields no excerpt" in str(exc):
                raise N2GError(f"corpus is empty: {label} holds no non-blank text; add text to it") from None
            raise
        log.info("corpus %s: %d documents read, %d excerpts of %d tokens",
                 name, seen[0], excerpts.shape[0], length)
        return cls(source=name, length=length, excerpts=excerpts)
