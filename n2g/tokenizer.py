"""The run's tokenizer: typed text split into the model's own tokens without loading the model.

``n2g run`` and ``n2g fit`` save the subject model's tokenizer in the run (``RUN/tokenizer.json``: the
``tokenizers`` library's definition of it, and every token id's display string as the run's pages show it)
when that library alone splits a set of probe texts exactly as the model does. ``n2g predict RUN TEXT`` and
``n2g serve RUN`` without ``--model`` split typed text with it, so a graph is asked about the tokens the model
would have read (the run's own vocabulary, split greedily, makes " in Paris" into " in", " P", "ar", "is").
A run without one (made before it, or whose model's tokenizer is not a ``tokenizers`` one) falls back to
:class:`n2g.viewer.RunVocabulary`.

A run folder may come from anyone: the file is read only when it is a regular file of the run of at most
64 MiB in the format written here, the tokenizer library's refusal of a broken definition (a Rust panic
included) is a warning and the fallback, and the ids it gives are used only within its table of tokens.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path

from n2g.errors import N2GError
from n2g.fileio import inside, read_json, write_text_atomic

log = logging.getLogger(__name__)

NAME = "tokenizer.json"
KIND = "n2g.tokenizer"
SCHEMA_VERSION = 1
MAX_TOKENS = 1 << 22
"""Most token ids a saved tokenizer may list (every real vocabulary is far smaller)."""
MAX_TOKEN_STRING = 1024
"""Longest display string a saved tokenizer may give a token (real ones: under 100 characters). Typed text shows
one per token, so a 50 MB string for " a" made a server's answer to 2,000 typed characters 100 GB."""

PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    " in Paris, 1999: don't stop!",
    "def f(x):\n    return dict(a=1, b=[2, 3])  # done\n",
    "  two  spaces\tand a tab\n\nnew paragraph",
    "Ünïcödé → 日本語の文 🙂 émigré naïve",
    "HTTP/1.1 200 OK\r\nContent-Length: 42",
)
"""Texts the saved tokenizer must split exactly as the model does before it is saved (code, prose, spacing,
non-Latin scripts and characters past the basic plane)."""


MAX_GROWTH = 1024
"""Most times longer a saved tokenizer's normalizers and pre-tokenizers may make typed text, as bounded by :func:`_growth` (real ones:
a few times at most). A hostile definition chaining Replace("a", "aa") forty times is a few hundred bytes that make
one typed "a" a terabyte, which the tokenizers library allocates until the process is killed (as do forty ByteLevel
pre-tokenizers in a row: each makes a character past ASCII two)."""

_SMALL_GROWTH = {"NFC": 1, "NFD": 3, "NFKC": 18, "NFKD": 18, "Lowercase": 3, "Strip": 1, "StripAccents": 1, "Nmt": 1,
                 "BertNormalizer": 3 * 3, "ByteLevel": 4, "Metaspace": 2, "Split": 1, "Whitespace": 1,
                 "WhitespaceSplit": 1, "BertPreTokenizer": 1, "Punctuation": 1, "Digits": 1, "CharDelimiterSplit": 1,
                 "UnicodeScripts": 1, "FixedLength": 1}
"""How many times longer each fixed normalizer or pre-tokenizer may make text at most (Unicode bounds its
normalisation forms' expansion by 18, case mapping by 3; BERT's pads Chinese characters with spaces and lower-cases;
a byte becomes one character; Metaspace adds one before a word); another kind counts as 18."""


def _growth(node, depth: int = 0) -> float:
    """An upper bound on how many times longer the normalizer or pre-tokenizer ``node`` (the definition's JSON) makes
    text: the
    product over a sequence, 1 + the length of what a Replace puts in (a pattern may match the empty string at
    every position) or a Prepend adds, 1 + the longest string a Precompiled character map gives."""
    if node is None:
        return 1.0
    if not isinstance(node, dict) or depth > 64:
        raise ValueError("a normalizer n2g cannot read")
    kind = node.get("type")
    if kind == "Sequence":
        total = 1.0
        for part in node.get("normalizers") or node.get("pretokenizers") or ():
            total *= _growth(part, depth + 1)
        return total
    if kind in ("Replace", "Prepend"):
        added = node.get("content" if kind == "Replace" else "prepend")
        return 1.0 + (len(added) if isinstance(added, str) else MAX_GROWTH)
    if kind == "Precompiled":
        import base64
        import struct

        try:
            blob = base64.b64decode(node.get("precompiled_charsmap") or b"")
            (size,) = struct.unpack_from("<I", blob) if blob else (0,)
            strings = blob[4 + size:].split(b"\0") if blob else [b""]
        except (ValueError, TypeError, struct.error):
            return float(MAX_GROWTH + 1)
        return 1.0 + max(len(s) for s in strings)
    return float(_SMALL_GROWTH.get(kind, 18))


MAX_STEPS = 256
"""Most normalizers and pre-tokenizers a saved tokenizer may chain (real ones: a handful). Each passes over all typed
text: three million Whitespace pre-tokenizers in a 64 MiB file made one prediction take minutes of CPU."""


def _steps(node) -> int:
    """How many normalizers or pre-tokenizers ``node`` (checked by :func:`_growth`) chains."""
    if isinstance(node, dict) and node.get("type") == "Sequence":
        return sum(_steps(part) for part in node.get("normalizers") or node.get("pretokenizers") or ())
    return int(node is not None)


def _check_costs(definition: str, strings: list[str], spec: str) -> None:
    """ValueError unless a tokenizer keeps within what typed text may cost: token texts of at most
    :data:`MAX_TOKEN_STRING` characters, a model name of at most 4,096, normalizers and pre-tokenizers that make text
    at most :data:`MAX_GROWTH` times longer in at most :data:`MAX_STEPS` steps. :func:`save` checks what it writes
    as :meth:`RunTokenizer.load` checks what it reads."""
    if any(len(s) > MAX_TOKEN_STRING for s in strings):
        raise ValueError(f"a token's text is longer than {MAX_TOKEN_STRING:,} characters")
    if len(spec) > 4096:  # said in every answer of `n2g predict` and the server: the model's name or path
        raise ValueError("its model name is longer than 4,096 characters")
    parsed = json.loads(definition)
    growth = _growth(parsed.get("normalizer")) * _growth(parsed.get("pre_tokenizer")) if isinstance(parsed, dict) else 1.0
    if growth > MAX_GROWTH:
        raise ValueError(f"its normalizers and pre-tokenizers can make typed text {growth:,.0f} times longer")
    steps = _steps(parsed.get("normalizer")) + _steps(parsed.get("pre_tokenizer")) if isinstance(parsed, dict) else 0
    if steps > MAX_STEPS:
        raise ValueError(f"it chains {steps:,} normalizers and pre-tokenizers")


def _run_model(run_dir: Path) -> dict:
    """The model as run.json records it; {} where run.json cannot say."""
    from n2g.report import read_run_json

    try:
        info, _ = read_run_json(run_dir)
    except N2GError:  # a newer n2g's run: every command refuses it before this matters
        return {}
    model = (info or {}).get("model")
    return model if isinstance(model, dict) else {}


def _run_vocab_size(run_dir: Path) -> int | None:
    """The vocabulary size run.json records for the run's model (what :func:`save` lists a display string for);
    None where run.json cannot say."""
    size = _run_model(run_dir).get("vocab_size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _foreign(run_dir: Path, strings: list[str]) -> str | None:
    """Why ``strings`` (a saved tokenizer's display strings) are not the run's model's, or None: the BOS token
    run.json records, and the token texts and ids of the run's pages (``viewer/vocabulary.json``), must be theirs.
    A tokenizer.json copied from another model's run with as many tokens names other tokens at those ids; a
    few texts may differ where another n2g version wrote the pages, so only a majority counts."""
    from n2g.viewer import VOCABULARY_KIND, VOCABULARY_NAME

    model = _run_model(run_dir)
    bos_id, bos = model.get("bos_token_id"), model.get("bos_token")
    if isinstance(bos_id, int) and not isinstance(bos_id, bool) and 0 <= bos_id < len(strings) \
            and isinstance(bos, str) and strings[bos_id] != bos:
        return f"its token {bos_id} is {strings[bos_id][:40]!r}, but the run's model begins text with {bos[:40]!r}"
    path = run_dir / "viewer" / VOCABULARY_NAME
    try:
        d = read_json(path) if inside(run_dir, path) else None
    except (OSError, ValueError, RecursionError):  # none, or damaged: the fallback says so when it reads it
        return None
    tokens = d.get("tokens") if isinstance(d, dict) and d.get("kind") == VOCABULARY_KIND else None
    if not isinstance(tokens, dict):
        return None
    pairs = [(t, i) for t, i in tokens.items()
             if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(strings)]
    differ = sum(strings[i] != t for t, i in pairs)
    if pairs and 2 * differ > len(pairs):
        return f"{differ:,} of the {len(pairs):,} tokens the run's pages show have other texts in it"
    return None


def _is_interrupt(exc: BaseException) -> bool:
    return isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


@contextlib.contextmanager
def _panics_quiet():
    """File descriptor 2 sent to /dev/null while the ``tokenizers`` library works on the main thread: a Rust panic
    (a hostile definition's pattern past its matching budget) writes its message and a backtrace there before
    Python sees it as an exception, which n2g reports in one line. (A server thread leaves it: other threads may
    be logging.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    try:
        quiet = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(quiet, 2)
        finally:
            os.close(quiet)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _plain(tokenizer):
    """``tokenizer`` (a ``tokenizers.Tokenizer``) without truncation or padding: a tokenizer.json may set them, and
    the backend of a transformers tokenizer keeps them until its first call, but ``model.encode`` applies neither
    (typed text past max_length would be cut short, a short one padded)."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _probes(backend, rows: int) -> tuple[str, ...]:
    """:data:`PROBES`, and a text of the tokenizer's added tokens (its special ones among them; those of ids below
    ``rows``, which the model embeds) typed between words: a tokenizer whose Python side reads them otherwise
    (``split_special_tokens``, a flag the definition does not carry) splits it otherwise."""
    try:
        added = [t.content for i, t in sorted(backend.get_added_tokens_decoder().items()) if i < rows][:256]
    except Exception:  # noqa: BLE001 - an older tokenizers library: the fixed probes only
        added = []
    added = [a for a in added if isinstance(a, str) and a.strip()]
    return PROBES + ((" ".join(f"a{a}b" for a in added) + " " + "".join(added),) if added else ())


def definition_of(model) -> str | None:
    """The ``tokenizers`` definition (JSON text) of ``model``'s tokenizer when that alone splits every probe text
    as ``model.encode`` does; None for a tokenizer that is not a ``tokenizers`` one or splits otherwise (a
    tokenizer whose Python side adds to the split)."""
    backend = getattr(getattr(model, "tokenizer", None), "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        from tokenizers import Tokenizer

        twin = _plain(Tokenizer.from_str(backend.to_str()))
        definition = twin.to_str()
        rows = getattr(model, "_embedding_rows", None) or getattr(model, "vocab_size", None) or MAX_TOKENS
        for text in _probes(backend, int(rows)):
            if list(twin.encode(text, add_special_tokens=False).ids) != list(model.encode(text)):
                log.info("the tokenizers library splits %r otherwise than the model's tokenizer; typed text will be "
                         "split by the run's own vocabulary unless --model is given", text[:200])
                return None
    except BaseException as exc:  # noqa: BLE001 - a Rust panic is a BaseException
        if _is_interrupt(exc):
            raise
        log.info("the model's tokenizer cannot be saved with the run (%s)", _first_line(exc))
        return None
    return definition


def save(run_dir: str | Path, model) -> bool:
    """Write ``run_dir/tokenizer.json`` for ``model`` unless the run has one; whether one was written. A run
    folder that cannot take it (read-only, full) is left as it is: typed text then falls back to the run's
    vocabulary."""
    path = Path(run_dir) / NAME
    if os.path.lexists(path):
        return False
    definition = definition_of(model)
    if definition is None:
        return False
    strings = model.token_strings(range(int(model.vocab_size)))
    spec = str(getattr(model, "spec", ""))
    try:  # never a file that loading would refuse
        _check_costs(definition, strings, spec)
    except ValueError as exc:
        log.info("the model's tokenizer is not saved with the run (%s); typed text will be split by the run's own "
                 "vocabulary unless --model is given", exc)
        return False
    data = {"kind": KIND, "schema_version": SCHEMA_VERSION, "model": spec, "tokenizer": definition,
            "token_strings": strings}
    try:
        write_text_atomic(path, json.dumps(data, ensure_ascii=False))
    except OSError as exc:
        log.info("cannot save the model's tokenizer as %s (%s); typed text will be split by the run's own "
                 "vocabulary unless --model is given", path, exc.strerror or exc)
        return False
    return True


class RunTokenizer:
    """The tokenizer a run saved: :meth:`split` gives the model's token ids and the run's display strings."""

    exact = True
    """Whether text is split as the model splits it (the run's own vocabulary is not)."""

    def __init__(self, path: Path, tokenizer, strings: list[str], spec: str):
        self.path, self.tokenizer, self.strings, self.spec = path, tokenizer, strings, spec

    def __len__(self) -> int:
        return len(self.strings)

    @property
    def how(self) -> str:
        model = f" ({self.spec})" if self.spec else ""
        return f"the model's tokenizer{model}, saved with the run"

    @classmethod
    def load(cls, run_dir: str | Path) -> RunTokenizer | None:
        """The run's saved tokenizer; None when it has none, or (with a warning) one that cannot be used."""
        run_dir = Path(run_dir)
        path = run_dir / NAME
        if not os.path.lexists(path):
            return None
        try:
            if not inside(run_dir, path):
                raise ValueError("a link that leads out of the run")
            d = read_json(path)
            if not isinstance(d, dict) or d.get("kind") != KIND:
                raise ValueError("not a tokenizer n2g saves")
            version = d.get("schema_version")
            if not isinstance(version, int) or isinstance(version, bool) or version < 1:
                raise ValueError("no schema version n2g writes")
            if version > SCHEMA_VERSION:
                raise ValueError(f"saved by a newer n2g (schema {version}); upgrade n2g to use it")
            definition, strings, spec = d.get("tokenizer"), d.get("token_strings"), d.get("model", "")
            if not isinstance(definition, str) or not isinstance(strings, list) or not isinstance(spec, str) \
                    or len(strings) > MAX_TOKENS or not all(isinstance(s, str) for s in strings):
                raise ValueError("not a tokenizer n2g saves")
            _check_costs(definition, strings, spec)
            rows = _run_vocab_size(run_dir)
            if rows is not None and rows != len(strings):  # copied from another model's run
                raise ValueError(f"it lists {len(strings):,} tokens, but the run's model has {rows:,}")
            foreign = _foreign(run_dir, strings)  # another model's, with as many tokens
            if foreign:
                raise ValueError(f"another model's tokenizer: {foreign}")
            from tokenizers import Tokenizer

            with _panics_quiet():
                tokenizer = _plain(Tokenizer.from_str(definition))  # (as saved by an n2g that kept them)
        except BaseException as exc:  # noqa: BLE001 - the tokenizers library's refusal may be a Rust panic
            if _is_interrupt(exc):
                raise
            log.warning("cannot use %s (%s); splitting typed text by the run's own vocabulary instead (pass "
                        "--model to split it with the model's tokenizer)", path, _first_line(exc))
            return None
        return cls(path, tokenizer, strings, spec)

    def split(self, text: str) -> tuple[list[int], list[str]]:
        """(token ids, display strings) of ``text``, as the model splits it; an id the saved table does not list
        (a tampered file) is the unknown token, shown as the text it covers."""
        from n2g.errors import not_unicode
        from n2g.viewer import _UNKNOWN

        if not isinstance(text, str):
            raise N2GError(f"text must be one string (got {type(text).__name__})")
        bad = not_unicode(text)
        if bad:
            raise N2GError(f"the text is not valid Unicode ({bad}); pass UTF-8 text")
        try:
            with _panics_quiet():
                encoding = self.tokenizer.encode(text, add_special_tokens=False)
        except BaseException as exc:  # noqa: BLE001 - a Rust panic (a pattern past its matching budget) included
            if _is_interrupt(exc):
                raise
            raise N2GError(f"the run's tokenizer ({self.path}) cannot split this text ({_first_line(exc)}); "
                           "pass --model to split it with the model's own") from None
        ids, toks = [], []
        for tid, (a, b) in zip(encoding.ids, encoding.offsets):
            if 0 <= tid < len(self.strings):
                ids.append(int(tid))
                toks.append(self.strings[tid])
            else:
                ids.append(_UNKNOWN)
                toks.append(text[a:b])
        return ids, toks

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as the model splits it (what :meth:`n2g.models.SubjectModel.encode` gives)."""
        from n2g.viewer import _UNKNOWN

        ids, toks = self.split(text)
        if _UNKNOWN in ids:
            raise N2GError(f"the run's tokenizer ({self.path}) gives a token id past its own table of "
                           f"{len(self.strings):,} tokens for {toks[ids.index(_UNKNOWN)]!r}; pass the run's model")
        return ids

    def token_strings(self, ids) -> list[str]:
        """Display string of each token id, as the run's pages show it."""
        return [self.strings[int(t)] if 0 <= int(t) < len(self.strings) else f"<{int(t)}>" for t in ids]


class SavedTokenizer:
    """A run's saved tokenizer, read when first used: a neuron loaded to be looked at never reads its 2 MB
    (:func:`n2g.load_neuron` without a model gives its neuron these ``encode`` and ``token_strings``)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir, self._loaded = Path(run_dir).absolute(), None  # a pickled neuron read elsewhere finds it

    def __getstate__(self) -> dict:  # a pickled neuron carries the run's path, not the tokenizer
        return {"run_dir": self.run_dir, "_loaded": None}

    def _get(self) -> RunTokenizer:
        if self._loaded is None:
            self._loaded = RunTokenizer.load(self.run_dir)
            if self._loaded is None and not os.path.lexists(self.run_dir / NAME):
                raise N2GError(f"{self.run_dir / NAME} is gone, so the neuron cannot read text; pass token ids, or "
                               "give it the run's model: n2g.load_neuron(run, key, model=...)")
            if self._loaded is None:
                raise N2GError(f"{self.run_dir / NAME} cannot be used (the warning says why), so the neuron cannot "
                               "read text; pass token ids, or give it the run's model: "
                               "n2g.load_neuron(run, key, model=...)")
        return self._loaded

    def encode(self, text: str) -> list[int]:
        return self._get().encode(text)

    def token_strings(self, ids) -> list[str]:
        return self._get().token_strings(ids)


def splitter(run_dir: str | Path):
    """What splits typed text for a run without its model: its saved tokenizer, else its own vocabulary
    (:class:`n2g.viewer.RunVocabulary`). Either has ``split(text) -> (ids, strings)`` and ``how``."""
    found = RunTokenizer.load(run_dir)
    if found is not None:
        return found
    from n2g.viewer import RunVocabulary

    return RunVocabulary(run_dir)
