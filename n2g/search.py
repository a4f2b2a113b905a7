"""Token -> neuron search over a run: a SQLite index of every graph's activating and context tokens.

``build_index`` reads ``neurons/*/result.json`` and ``graph.json`` and writes ``RUN/index.sqlite``
(built in a temporary file, then moved into place, so a reader never sees half an index).
``search`` finds the neurons whose graphs contain a token, ``similar`` the neurons whose graphs
share the most tokens with a given one. All SQL is parametrised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from n2g.errors import N2GError
from n2g.fileio import loads_json, read_bytes, replacing
from n2g.records import NeuronId, NeuronResult, Sign, check_folder, plural
from n2g.graph import fires
from n2g.render import QUIET_BELOW, graph_token_rows, is_finite_number, load_graph_json

log = logging.getLogger(__name__)

INDEX_NAME = "index.sqlite"
ROLES = ("activator", "context")
ACTIVATOR_WEIGHT = 2.0
"""In ``similar``, a token shared as activator counts this many times a shared context token."""

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE neurons (
    key TEXT PRIMARY KEY, layer INTEGER, idx INTEGER, sign TEXT, status TEXT,
    f1 REAL, pearson REAL, firing_rate REAL, max_activation REAL,
    token_lookup_f1 REAL, ngram_f1 REAL, score_status TEXT
);
CREATE TABLE tokens (token_id INTEGER, token TEXT, key TEXT, role TEXT, weight REAL, folded TEXT);
CREATE INDEX tokens_token ON tokens (token);
CREATE INDEX tokens_folded ON tokens (folded);
CREATE INDEX tokens_token_id ON tokens (token_id);
CREATE INDEX tokens_key ON tokens (key);
"""


INDEX_SCHEMA = "3"
"""Schema of ``index.sqlite``; an index of another schema is rebuilt before it is searched. 3: a graph whose
"any token" activator ends a path (a dense neuron) has a row for it (see :func:`_any_token_row`)."""


def fold(text: str) -> str:
    """How search compares tokens: surrounding whitespace dropped, case folded (`` Dictionary`` -> ``dictionary``)."""
    return text.strip().casefold()


def _number_or_none(v) -> bool:
    return v is None or is_finite_number(v)


_FLOATS = frozenset({float})
_INTS = frozenset({int})
_STRS = frozenset({str})


def _numbers(values: list) -> bool:
    """``all(map(_number_or_none, values))``, fast for the usual list of plain finite floats."""
    if set(map(type, values)) <= _FLOATS and all(map(math.isfinite, values)):
        return True
    return all(map(_number_or_none, values))


def _token_ids(values: list) -> bool:
    """Every value an int (not a bool); fast for the usual list of plain ints."""
    return set(map(type, values)) <= _INTS or all(isinstance(t, int) and not isinstance(t, bool) for t in values)


_METHOD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.]{0,63}")


def result_problem(r: NeuronResult) -> str | None:
    """What is wrong with a loaded result's field types (what the report and viewer rely on), or None."""
    if not (0 <= r.neuron.layer < 10**6 and 0 <= r.neuron.index < 10**9):
        return "layer or neuron index out of range"
    if not isinstance(r.status, str):
        return "status is not text"
    st = r.stats
    if not (is_finite_number(st.max_activation) and is_finite_number(st.firing_rate) and 0 <= st.firing_rate <= 1
            and isinstance(st.n_sampled_tokens, int) and isinstance(st.quantiles, dict)
            and all(_number_or_none(v) for v in st.quantiles.values())):
        return "stats has a field of the wrong type"
    for method, s in r.scores.items():
        if not (isinstance(method, str) and _METHOD_NAME.fullmatch(method)):
            return f"score method name {str(method)[:40]!r} is not a method name (letters, digits, _ and .)"
        numbers = (s.precision, s.recall, s.f1, s.nonfiring_precision, s.nonfiring_recall, s.nonfiring_f1,
                   s.pearson, s.explained_variance)
        counts = (s.n_tokens, s.n_firing, s.n_predicted_firing)
        if not (all(map(_number_or_none, numbers)) and all(isinstance(c, int) and not isinstance(c, bool) for c in counts)
                and isinstance(s.status, str)):
            return f"scores of {method!r} have a field of the wrong type"
    h = r.histogram
    if not isinstance(h, dict) or not (
            all(isinstance(h.get(k, []), list) for k in ("edges", "counts", "bands"))
            and all(is_finite_number(v) for v in h.get("edges", []))
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in h.get("counts", []))
            and all(isinstance(b, dict) and is_finite_number(b.get("lo")) and is_finite_number(b.get("hi"))
                    and isinstance(b.get("n_excerpts"), int) for b in h.get("bands", []))):
        return "histogram has a field of the wrong type"
    for i, e in enumerate(r.examples + r.band_examples):
        ok = (isinstance(e.token_ids, list) and _token_ids(e.token_ids)
              and isinstance(e.activations, list) and _numbers(e.activations)
              and (e.predicted is None or (isinstance(e.predicted, list) and _numbers(e.predicted)))
              and (e.tokens is None or (isinstance(e.tokens, list) and (
                  set(map(type, e.tokens)) <= _STRS or all(isinstance(t, str) for t in e.tokens))))
              and isinstance(e.split, str) and isinstance(e.source, str)
              and (e.excerpt_index is None or isinstance(e.excerpt_index, int)))
        if not ok:
            return f"example {i} has a field of the wrong type"
    a = r.ablation
    if not isinstance(a, dict) or (a and not (
            _number_or_none(a.get("ce_clean")) and _number_or_none(a.get("recovered"))
            and all(isinstance(a.get(k, {}), dict) and all(_number_or_none(v) for v in a.get(k, {}).values())
                    for k in ("ce_increase", "kl")))):
        return "ablation has a field of the wrong type"
    st = r.steering
    if not isinstance(st, dict) or (st and not (
            isinstance(st.get("prompt"), str) and isinstance(st.get("before"), str) and isinstance(st.get("after"), str)
            and all(isinstance(row, list) and len(row) == 3 and isinstance(row[0], str) and _number_or_none(row[1])
                    and _number_or_none(row[2]) for row in [*st.get("gainers", []), *st.get("losers", [])]))):
        return "steering has a field of the wrong type"
    c = r.ceiling
    count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(c, dict) or (c and not (
            count(c.get("n_firing")) and count(c.get("n_seen")) and c["n_seen"] <= c["n_firing"]
            and (c.get("f1") is None or (is_finite_number(c["f1"]) and 0 <= c["f1"] <= 1 and c["n_firing"] > 0)))):
        return "ceiling has a field of the wrong type"
    if not all(isinstance(t, str) for t, _ in [*r.promoted, *r.suppressed]):
        return "an output token is not text"
    if not all(isinstance(k, str) for k in r.graph_stats):
        return "graph_stats has a key that is not text"
    if not (is_finite_number(r.seconds) and r.seconds >= 0):
        return "seconds is not a finite number of seconds"
    return None


_warned: set[tuple[str, int]] = set()
_loaded: dict[str, tuple[bytes, NeuronResult]] = {}
"""Results this process has parsed and checked, by path, with a hash of the file's bytes and the
result's summary (:func:`summary_of`): the report, index and viewer of one run each go over every
result, and now parse and check each file once, and memory holds summaries, not whole results."""


def summary_of(result: NeuronResult) -> NeuronResult:
    """A result without its examples, histogram, output effects and steering check: what the report,
    the index and the viewer's index page read (a few hundred bytes instead of every excerpt)."""
    return dataclasses.replace(result, examples=[], band_examples=[], histogram={}, promoted=[], suppressed=[],
                               steering={})


def checked_result(result: NeuronResult) -> NeuronResult:
    """``result`` if :func:`result_problem` finds nothing wrong with it; else ValueError naming the problem
    (a damaged file: the report skips it, a resumed run redoes the neuron, the server answers 404)."""
    problem = result_problem(result)
    if problem:
        raise ValueError(problem)
    return result


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _parse(data: bytes, check: bool = True) -> NeuronResult:
    d = loads_json(data)
    if not isinstance(d, dict):
        raise ValueError(f"a JSON {type(d).__name__}, not an object")
    result = NeuronResult.from_dict(d)
    return checked_result(result) if check else result


def _skip_damaged(path: Path, e: Exception) -> None:
    """Name a damaged or unreadable file in a warning (once per process and version of the file)."""
    key = (str(path), _mtime(path))
    if key in _warned:
        return
    _warned.add(key)
    if isinstance(e, PermissionError):
        log.warning("skipping neuron result %s: permission denied; make it readable to include that neuron", path)
    else:
        log.warning("skipping damaged neuron result %s (%s); re-run the same `n2g run` command to redo it", path, e)


def result_paths(run_dir: str | os.PathLike) -> list[Path]:
    """Every ``neurons/*/result.json`` of a run, sorted by folder name. A ``neurons`` folder that cannot be
    listed is an N2GError naming it; a neuron folder that cannot be opened is named in a warning and left
    out (a glob would pass over both without a word)."""
    neurons = Path(run_dir, "neurons")
    try:
        with os.scandir(neurons) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise N2GError(f"cannot list {neurons} ({e.strerror or e}); make it readable, or run `n2g run` again") from None
    out = []
    for entry in entries:
        path = Path(neurons, entry.name, "result.json")
        try:
            if not entry.is_dir():
                continue
            os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as e:  # a folder that cannot be searched
            if (str(path), 0) not in _warned:
                _warned.add((str(path), 0))
                log.warning("skipping neuron folder %s (%s); make it readable to include that neuron",
                            path.parent, e.strerror or e)
            continue
        out.append(path)
    return out


def warn_if_index_behind(run_dir: str | os.PathLike) -> bool:
    """Warn (and say True) when a neuron result of the run is newer than its search index, or the run holds
    another number of results than the index lists: neurons fitted since `n2g report` that search and
    predict would not see. One stat per result; for the command line, not for each request of the server."""
    run_dir = Path(run_dir)
    path = run_dir / INDEX_NAME
    try:
        if not _regular(path):
            return False
        built = path.stat().st_mtime_ns
        con = _open(path)
        try:
            listed = con.execute("SELECT COUNT(*) FROM neurons").fetchone()[0]
        finally:
            con.close()
    except (OSError, sqlite3.Error):
        return False  # a damaged index is rebuilt or named where it is read
    paths = result_paths(run_dir)
    newer = 0
    for p in paths:
        with contextlib.suppress(OSError):
            newer += p.stat().st_mtime_ns > built
    if newer or listed != len(paths):
        log.warning("the search index of %s lists %d %s, the run holds %d (%d saved since the index was built); "
                    "run `n2g report %s` to bring it up to date", run_dir, listed, plural(listed, "neuron"),
                    len(paths), newer, run_dir)
        return True
    return False


def scan_results(run_dir: str | os.PathLike) -> list[tuple[Path, NeuronResult, bytes]]:
    """``(neuron folder, summary, hash of the file)`` for every readable ``neurons/*/result.json``,
    sorted by neuron; each version of a file is parsed and checked once per process.

    A damaged file (unreadable, not JSON, fields of the wrong type) is named in a warning and
    skipped; re-running the same ``n2g run`` command redoes that neuron.
    """
    found = []
    root = Path(run_dir).resolve()
    for path in result_paths(run_dir):
        try:
            if not path.resolve().is_relative_to(root):
                raise ValueError("it is a link that leads out of the run directory")
            data = read_bytes(path)
            signature = hashlib.blake2b(data, digest_size=16).digest()
            cached = _loaded.get(str(path))
            if cached is not None and cached[0] == signature:
                found.append((path.parent, cached[1], signature))  # parsed and checked already, same bytes
                continue
            summary = summary_of(_parse(data))
            check_folder(summary.neuron, path.parent.name)
        except Exception as e:  # any damage: name the file, skip it, keep going
            _skip_damaged(path, e)
            continue
        _loaded[str(path)] = (signature, summary)
        found.append((path.parent, summary, signature))
    found.sort(key=lambda item: item[1].neuron)
    return found


def read_result(folder: str | os.PathLike, checked: bytes | None = None) -> NeuronResult | None:
    """The whole result stored in ``folder``; None (and a warning) when it is damaged. The check of
    field types is skipped when the file's bytes hash to ``checked`` (or to what this process
    checked before)."""
    path = Path(folder) / "result.json"
    try:
        data = read_bytes(path)
        signature = hashlib.blake2b(data, digest_size=16).digest()
        cached = _loaded.get(str(path))
        trusted = signature == checked or (cached is not None and cached[0] == signature)
        return _parse(data, check=not trusted)
    except Exception as e:
        _skip_damaged(path, e)
        return None


def iter_results(run_dir: str | os.PathLike) -> Iterator[tuple[Path, NeuronResult]]:
    """``(neuron folder, result)`` for every readable ``neurons/*/result.json``, sorted by neuron,
    read one at a time (damaged files are skipped with a warning, see :func:`scan_results`)."""
    for folder, _, signature in scan_results(run_dir):
        result = read_result(folder, signature)
        if result is not None:
            yield folder, result


def _f1(result: NeuronResult, method: str) -> float | None:
    s = result.scores.get(method)
    return None if s is None else s.f1


def _any_token_row(G) -> float | None:
    """The END value of a graph's wildcard activator ("any token", a dense neuron's base), or None where it ends no
    path. The index holds it as an activator row without a token (token id NULL, empty text: no search finds it),
    so that :func:`fires_on` reads a graph that fires on any token whatever the text's tokens."""
    for node, a in G.nodes(data=True):
        if a.get("kind") == "activator" and a.get("token_id") is None and a.get("token") == "*":
            ends = [G.nodes[c].get("activation") for c in G.successors(node) if G.nodes[c].get("kind") == "end"]
            ends = [float(v) for v in ends if is_finite_number(v)]
            return max(ends) if ends else None
    return None


def build_index(run_dir: str | os.PathLike) -> Path:
    """Write ``RUN/index.sqlite`` from every neuron of the run; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise N2GError(f"run directory {run_dir} does not exist; run `n2g run` first")
    out = run_dir / INDEX_NAME
    with replacing(out) as tmp:
        con = sqlite3.connect(tmp)
        try:
            con.executescript(_SCHEMA)
            con.execute("INSERT INTO meta VALUES (?, ?)", ("schema_version", INDEX_SCHEMA))
            n = 0
            for folder, r, _ in scan_results(run_dir):
                key = r.neuron.key
                n2g = r.scores.get("n2g")
                con.execute(
                    "INSERT OR REPLACE INTO neurons VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        key, r.neuron.layer, r.neuron.index, r.neuron.sign.value, r.status,
                        _f1(r, "n2g"), n2g.pearson if n2g else None, r.stats.firing_rate,
                        r.stats.max_activation, _f1(r, "token_lookup"), _f1(r, "ngram"),
                        n2g.status if n2g else None,
                    ),
                )
                n += 1
                gpath = folder / "graph.json"
                if not gpath.exists():
                    continue
                try:
                    G = load_graph_json(gpath, run_dir, check=True)
                except N2GError as e:
                    log.warning("skipping graph of %s: %s", key, e)
                    continue
                # one row per (token, role): the strongest occurrence in the graph
                best: dict[tuple, tuple] = {}
                for token_id, token, role, weight in graph_token_rows(G):
                    k = (token_id, token, role)
                    if k not in best or weight > best[k][3]:
                        best[k] = (token_id, token, role, weight)
                any_token = _any_token_row(G)
                con.executemany(
                    "INSERT INTO tokens VALUES (?,?,?,?,?,?)",
                    [(tid, tok, key, role, w, fold(tok)) for tid, tok, role, w in best.values()]
                    + ([(None, "", key, "activator", any_token, "")] if any_token is not None else []),
                )
            con.commit()
        finally:
            con.close()
        for sidecar in ("-journal", "-wal", "-shm"):  # the old file's: SQLite would try to roll them into the new one
            out.with_name(out.name + sidecar).unlink(missing_ok=True)
    log.info("indexed %d %s into %s", n, plural(n, "neuron"), out)
    return out


SEARCH_SECONDS = 30.0
"""Time budget of the queries on one connection to a run's index (a search of a whole model's index takes
well under a second; an index made by hand could otherwise keep SQLite busy for ever)."""
_expected_schema: list = []


def _schema_rows(con: sqlite3.Connection) -> list:
    return [tuple(r) for r in con.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")]


def _schema_problem(con: sqlite3.Connection) -> str | None:
    """How the index's tables differ from those n2g writes (a view, a trigger, another column), or None."""
    if not _expected_schema:
        mem = sqlite3.connect(":memory:")
        mem.executescript(_SCHEMA)
        _expected_schema.extend(_schema_rows(mem))
        mem.close()
    return None if _schema_rows(con) == _expected_schema else "its tables are not the ones n2g writes"


class _Connection(sqlite3.Connection):
    deadline = 0.0
    """When this connection's queries are stopped (``time.monotonic()``)."""


def _open(path: Path) -> _Connection:
    """A read-only connection whose queries stop after :data:`SEARCH_SECONDS` (or at Ctrl-C)."""
    # as a URI with the path percent-encoded: a '#', '?' or '%' in a folder's name is part of the path
    con = sqlite3.connect(f"{Path(path).absolute().as_uri()}?mode=ro", uri=True, factory=_Connection)
    con.row_factory = sqlite3.Row
    con.deadline = time.monotonic() + SEARCH_SECONDS
    con.set_progress_handler(lambda: time.monotonic() > con.deadline, 20_000)
    return con


def _execute(con: _Connection, sql: str, params=()) -> list:
    """Every row of a query; its time budget used up is a one-line error (a signal meanwhile: Ctrl-C)."""
    try:
        return con.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "interrupt" not in str(exc):
            raise
        if time.monotonic() <= con.deadline:  # SQLite was stopped by a signal, not by the budget
            raise KeyboardInterrupt from None
        raise N2GError(f"the search took more than {SEARCH_SECONDS:g} s and was stopped; run `n2g report` on the "
                       "run to rebuild its index, then search again") from None


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _connect(run_dir: str | os.PathLike) -> sqlite3.Connection:
    run_dir = Path(run_dir)
    path = run_dir / INDEX_NAME
    if not os.path.lexists(path):
        if not result_paths(run_dir):
            raise N2GError(f"no neuron results in {run_dir}; run `n2g run` first")
        build_index(run_dir)
    stale = None if _regular(path) else "it is not a regular file"  # a FIFO would hold the open for ever
    con = None
    if stale is None:
        con = _open(path)
        try:
            stale = _schema_problem(con)
            if stale is None:
                row = con.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
                if row is None or row[0] != INDEX_SCHEMA:
                    stale = "it was written by another n2g version"
        except sqlite3.DatabaseError:
            con.close()
            raise  # damaged: the caller decides whether it can rebuild (the server does, once)
    if stale is not None:  # rebuild it once
        if con is not None:
            con.close()
        log.info("rebuilding the search index of %s: %s", run_dir, stale)
        try:
            build_index(run_dir)
        except OSError as exc:
            raise N2GError(f"the search index of {run_dir} cannot be used ({stale}) or rebuilt here "
                           f"({exc.strerror or exc}); run `n2g report {run_dir} --out COPY`") from None
        if not _regular(path):
            raise N2GError(f"the search index of {run_dir} is not a regular file; delete it and run `n2g report`")
        con = _open(path)
    try:
        _check_types(con, path)
    except sqlite3.DatabaseError:
        con.close()
        raise  # as damaged as a file sqlite cannot read: the caller rebuilds it or says how to
    return con


_BIG = 1.7976931348623157e308
_BAD_ROWS = (
    "SELECT 'tokens' FROM tokens WHERE typeof(token) != 'text' OR typeof(folded) != 'text' OR typeof(key) != 'text'"
    " OR typeof(role) != 'text' OR role NOT IN ('activator', 'context') OR typeof(token_id) NOT IN ('integer', 'null')"
    f" OR typeof(weight) NOT IN ('real', 'integer', 'null') OR abs(weight) > {_BIG!r}"
    " UNION ALL SELECT 'neurons' FROM neurons WHERE typeof(key) != 'text' OR typeof(layer) != 'integer'"
    " OR typeof(idx) != 'integer' OR typeof(sign) != 'text' OR typeof(f1) NOT IN ('real', 'integer', 'null')"
    f" OR abs(f1) > {_BIG!r} LIMIT 1"
)
"""A row of a type no index n2g writes holds (text where a number belongs, an infinite weight):
the file was damaged or made by hand."""
_checked: dict[str, tuple] = {}


def _check_types(con: sqlite3.Connection, path: Path) -> None:
    """sqlite3.DatabaseError when a row of the index has a value of the wrong type (checked once per
    process and version of the file): search results go out as JSON and into sorted tables."""
    try:
        st = path.stat()
        version = (st.st_ino, st.st_mtime_ns, st.st_size)
    except OSError:
        version = None
    if version is not None and _checked.get(str(path)) == version:
        return
    bad = con.execute(_BAD_ROWS).fetchone()
    if bad is not None:
        raise sqlite3.DatabaseError(f"the {bad[0]} table holds a value of the wrong type")
    if version is not None:
        _checked[str(path)] = version


MAX_QUERY_CHARS = 1000
"""Longest token text :func:`search` looks for (SQLite refuses LIKE patterns of 50,000 bytes and more,
and no tokenizer makes a token this long)."""

MATCHES = ("exact", "case-insensitive", "prefix", "substring")
"""How a hit matched the query, best first (see :func:`search`)."""


def search(run_dir: str | os.PathLike, token: str, role: str | None = None, limit: int = 50) -> list[dict]:
    """Neurons whose graphs contain ``token``, best matches first, then strongest.

    A graph token matches when it equals the query (with or without one leading space: ``exact``),
    equals it ignoring case and surrounding whitespace (``case-insensitive``), starts with it
    (``prefix``: ``dict`` finds `` dictionary``) or contains it (``substring``). ``role`` is
    ``"activator"``, ``"context"`` or None for both. Each hit is a dict with key, layer, index, sign,
    f1, token, token_id, role, weight (activation for activators, importance for context tokens),
    quiet (an activator whose value stays below the run's fire threshold: a graded value, never predicted to
    fire) and match; one hit per neuron and role (its best-matching, then strongest token).
    """
    if role in ("", "any", "all"):
        role = None
    if role is not None and role not in ROLES:
        raise N2GError(f"unknown role {role!r}; use one of {', '.join(ROLES)} (or none for both)")
    if not token:
        raise N2GError("empty search token; give the token text to look for, e.g. ' Paris' or 'Paris'")
    if len(token) > MAX_QUERY_CHARS:
        raise N2GError(f"the search token is {len(token):,} characters long; search for at most "
                       f"{MAX_QUERY_CHARS:,} characters (a part of the token finds it too)")
    try:
        token.encode("utf-8")
    except UnicodeEncodeError as exc:  # a byte of the command line that is not UTF-8 (Python keeps it as a surrogate)
        raise N2GError(f"the search token is not valid UTF-8 text (character {exc.start}); "
                       "type the token in UTF-8") from None
    limit = max(1, min(int(limit), 10_000))
    q = fold(token)
    if not q:  # a whitespace token: only exact matches make sense
        where, params = "(t.token = ? OR t.token = ?)", [token, " " + token]
    else:
        pattern = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        where, params = "t.folded LIKE ? ESCAPE '\\'", ["%" + pattern + "%"]
    sql = (
        "SELECT t.key, n.layer, n.idx, n.sign, n.f1, t.token, t.token_id, t.role, t.weight, t.folded "
        "FROM tokens t JOIN neurons n ON n.key = t.key WHERE " + where
    )
    if role is not None:
        sql += " AND t.role = ?"
        params.append(role)
    con = _connect(run_dir)
    try:
        rows = _execute(con, sql, params)
    finally:
        con.close()
    hits: dict[tuple[str, str], tuple] = {}
    for r in rows:
        tok, folded = r["token"], r["folded"] or ""
        if tok in (token, " " + token):
            kind = 0
        elif folded == q:
            kind = 1
        elif folded.startswith(q):
            kind = 2
        elif q in folded:  # LIKE folds ASCII only; this is the exact test
            kind = 3
        else:
            continue
        rank = (kind, -(r["weight"] if r["weight"] is not None else float("-inf")))
        k = (r["key"], r["role"])
        if k not in hits or rank < hits[k][0]:
            hits[k] = (rank, r)
    ordered = sorted(hits.values(), key=lambda h: (h[0], h[1]["layer"], h[1]["idx"], h[1]["key"], h[1]["role"]))
    fire = _run_fire_threshold(Path(run_dir))
    return [
        {
            "key": r["key"], "layer": r["layer"], "index": r["idx"], "sign": r["sign"], "f1": r["f1"],
            "token": r["token"], "token_id": r["token_id"], "role": r["role"], "weight": r["weight"],
            "quiet": r["role"] == "activator" and isinstance(r["weight"], (int, float)) and not fires(r["weight"], fire),
            "match": MATCHES[rank[0]],
        }
        for rank, r in ordered[:limit]
    ]


def _similar_rows(threshold: float = QUIET_BELOW) -> str:
    """The token rows ``similar`` counts: quiet activators (graded values of common tokens, below the run's fire
    threshold, never firing) would make neurons look alike for sharing a background token, so they are left out."""
    return f"token_id IS NOT NULL AND NOT (role = 'activator' AND weight < {float(threshold)!r})"


def _weights(con: sqlite3.Connection, key: str, threshold: float = QUIET_BELOW) -> dict[int, float]:
    w: dict[int, float] = {}
    for tid, role in con.execute(f"SELECT token_id, role FROM tokens WHERE key = ? AND {_similar_rows(threshold)}", (key,)):
        w[tid] = max(w.get(tid, 0.0), ACTIVATOR_WEIGHT if role == "activator" else 1.0)
    return w


class _TokenWeights:
    """Every graph's token weights of one index file, as arrays: which neurons hold each token id
    (rows sorted by token id) and each neuron's total weight. Loaded once per process and index
    file, so :func:`similar` costs a few array operations per neuron however large the run."""

    def __init__(self, con: sqlite3.Connection, threshold: float = QUIET_BELOW):
        rows = con.execute(
            f"SELECT key, token_id, MAX(CASE WHEN role = 'activator' THEN {ACTIVATOR_WEIGHT!r} ELSE 1.0 END) "
            f"FROM tokens WHERE {_similar_rows(threshold)} GROUP BY key, token_id").fetchall()
        self.keys = sorted({k for k, _, _ in rows})
        number = {k: i for i, k in enumerate(self.keys)}
        key_ids = np.fromiter((number[k] for k, _, _ in rows), np.int64, len(rows))
        tokens = np.fromiter((t for _, t, _ in rows), np.int64, len(rows))
        weights = np.fromiter((w for _, _, w in rows), np.float64, len(rows))
        order = np.argsort(tokens, kind="stable")
        self.tokens, self.owners, self.weights = tokens[order], key_ids[order], weights[order]
        self.totals = np.bincount(key_ids, weights=weights, minlength=len(self.keys))
        self.number = number

    def similar(self, key: str, mine: dict[int, float], limit: int) -> list[tuple[str, float]]:
        ids = np.fromiter(mine, np.int64, len(mine))
        lo, hi = np.searchsorted(self.tokens, ids, "left"), np.searchsorted(self.tokens, ids, "right")
        if not (hi > lo).any():
            return []
        rows = np.concatenate([np.arange(a, b) for a, b in zip(lo.tolist(), hi.tolist())])
        mine_w = np.repeat(np.fromiter(mine.values(), np.float64, len(mine)), hi - lo)
        # weights are 1 and 2, so every sum below is exact whatever its order
        shared = np.bincount(self.owners[rows], weights=np.minimum(mine_w, self.weights[rows]), minlength=len(self.keys))
        me = self.number.get(key)
        if me is not None:
            shared[me] = 0.0
        others = np.flatnonzero(shared > 0)
        if not len(others) or limit <= 0:
            return []
        union = sum(mine.values()) + self.totals[others] - shared[others]
        score = shared[others] / union
        if len(others) > limit:  # everything tied with the limit-th best stays in, then the exact order
            cut = -np.partition(-score, limit - 1)[limit - 1]
            keep = score >= cut
            others, score = others[keep], score[keep]
        ranked = sorted(zip((-score).tolist(), (self.keys[i] for i in others.tolist())))
        return [(k, -s) for s, k in ranked[:limit]]


_token_weights: dict[str, tuple[tuple, _TokenWeights]] = {}


def similar(run_dir: str | os.PathLike, key: str, limit: int = 10) -> list[tuple[str, float]]:
    """Neurons whose graphs share the most token ids with ``key``'s: ``(key, weighted Jaccard)``.

    Each token id weighs 2 where it is an activating token and 1 where it is only context; the
    score is sum(min) / sum(max) over the union. Quiet activators (below the run's fire threshold: never
    predicted to fire) do not count. Neurons sharing nothing are left out.
    """
    threshold = _run_fire_threshold(Path(run_dir))
    con = _connect(run_dir)
    try:
        if con.execute("SELECT 1 FROM neurons WHERE key = ?", (key,)).fetchone() is None:
            raise N2GError(f"no neuron {key!r} in {run_dir}; keys look like L5.N123 or L5.N123.neg")
        mine = _weights(con, key, threshold)
        if not mine:
            return []
        path = Path(run_dir) / INDEX_NAME
        st = path.stat()
        version = (st.st_ino, st.st_mtime_ns, st.st_size, threshold)
        cached = _token_weights.get(str(path))
        if cached is None or cached[0] != version:
            cached = _token_weights[str(path)] = (version, _TokenWeights(con, threshold))
    finally:
        con.close()
    return cached[1].similar(key, mine, max(0, int(limit)))


PREDICT_SECONDS = 5.0
"""Time budget of one graph's walk over the text in :func:`fires_on` (a graph n2g writes needs milliseconds)."""


def _neuron_key(layer: int, index: int, sign) -> str | None:
    """The key n2g gives the neuron of an index row (as :class:`n2g.records.NeuronId` does), or None for a row
    no run holds (a layer or index out of range, a sign that is neither)."""
    if sign not in ("positive", "negative") or not (0 <= layer < 10**6 and 0 <= index < 10**9):
        return None
    return NeuronId(layer, index, Sign(sign)).key


def run_neurons(run_dir: str | os.PathLike) -> list[dict]:
    """Every neuron of the run's index: key, layer, index, sign, status, f1 and max_activation (raw).

    A row whose key is not the one n2g gives its layer, index and sign (an index made by hand: a key with
    path pieces such as ``L0.N2/../L0.N1``, or naming another neuron than its numbers) is left out with a
    warning: the key names the folder whose graph is read, and the numbers the neuron the model is read at."""
    con = _connect(run_dir)
    try:
        rows = _execute(con, "SELECT key, layer, idx, sign, status, f1, max_activation FROM neurons ORDER BY layer, idx, sign")
    finally:
        con.close()
    out = [{"key": r["key"], "layer": r["layer"], "index": r["idx"], "sign": r["sign"], "status": r["status"],
            "f1": r["f1"], "max_activation": r["max_activation"]} for r in rows
           if r["key"] == _neuron_key(r["layer"], r["idx"], r["sign"])]
    if len(out) < len(rows):
        log.warning("the search index of %s names %d %s whose key is not its layer, index and sign; they are left out "
                    "(run `n2g report %s` to rebuild the index)", Path(run_dir).name, len(rows) - len(out),
                    plural(len(rows) - len(out), "neuron"), run_dir)
    return out


def _run_fire_threshold(run_dir: Path) -> float:
    """The fire threshold the run was fitted at (the config ``run.json`` records with the run's identity), 0.5
    where it records no valid one, or where run.json is a link that leads out of the run (as the report reads it)."""
    from n2g.fileio import inside, read_json

    try:
        if not inside(run_dir, Path(run_dir) / "run.json"):
            return 0.5
        value = read_json(Path(run_dir) / "run.json")["identity"]["config"]["fire_threshold"]
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError, RecursionError):
        return 0.5
    return float(value) if is_finite_number(value) and 0 < value <= 1 else 0.5


def shown_value(value: float, threshold: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` decimals for a listing, unless that moves it across ``threshold`` (a graph's
    END kept just below it, 0.49999997, is no 0.5 that a page or a reader of the JSON takes for firing): then as is."""
    value = float(value)
    rounded = round(value, digits)
    return rounded if (rounded >= threshold) == (value >= threshold) else value


def _truly_max(values) -> float:
    """The largest finite value of a true activation, -inf where there is none."""
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    return float(v.max()) if v.size else -math.inf


def fires_on(run_dir: str | os.PathLike, token_ids: list[int], true: dict[str, np.ndarray] | None = None,
             neurons: list[str] | None = None, deadline: float | None = None, progress: bool = False) -> list[dict]:
    """The neurons of a run whose graphs predict firing somewhere on ``token_ids`` (normalised activation at or
    above the graph's fire threshold), strongest first; with ``true`` (key -> the neuron's normalised true
    activation per token), also the neurons that truly fire there, so that a graph's misses show.

    Only the graphs holding one of the text's tokens, as activating or context token, are read: a path fires
    only where each of its tokens is there (a wildcard activator's paths hold context tokens); and the graphs
    that fire on any token (a dense neuron's wildcard activator ends a firing path of its own). ``neurons``
    names the keys to answer for instead (every one of them is returned, firing or not). Past ``deadline`` (a
    :func:`time.monotonic` time) no more graphs are read, and what was found is returned. ``progress``: a bar
    while more than :data:`PROGRESS_GRAPHS` graphs are read. Each entry:
    key, layer, index, sign, f1, predicted (per token), predicted_max, fires (positions the graph says
    fire), and with ``true``: true, true_max, true_fires.
    """
    run_dir = Path(run_dir)
    ids = [int(t) for t in token_ids]
    rows = {r["key"]: r for r in run_neurons(run_dir)}
    fire = _run_fire_threshold(run_dir)
    if neurons is not None:
        missing = [k for k in neurons if k not in rows]
        if missing:
            raise N2GError(f"no neuron {missing[0]} in the index of {run_dir}; `n2g search` or the viewer lists its neurons")
        keys = list(dict.fromkeys(neurons))
    else:
        known = sorted({t for t in ids if 0 <= t < 2**31})
        con = _connect(run_dir)
        # the strongest activator among the text's tokens, per neuron (0 where only context tokens are there):
        # read first, so that a reading stopped by ``deadline`` has the likeliest to fire, whatever their layer
        strongest: dict[str, float] = {}
        try:  # graphs that fire on any token first (a dense neuron's: its row has no token), then the text's tokens
            for r in _execute(con, "SELECT key, MAX(weight) AS w FROM tokens WHERE token_id IS NULL AND role = 'activator' "
                                   "GROUP BY key"):
                w = r["w"] if isinstance(r["w"], (int, float)) and math.isfinite(r["w"]) else 0.0
                if w >= min(0.5, fire):  # (a graph fitted at a lower threshold than the run's is checked below)
                    strongest[r["key"]] = float(w)
            for start in range(0, len(known), 500):
                part = known[start:start + 500]
                for r in _execute(con, "SELECT key, MAX(CASE WHEN role = 'activator' THEN weight ELSE 0 END) AS w "
                                       f"FROM tokens WHERE token_id IN ({','.join('?' * len(part))}) GROUP BY key", part):
                    w = r["w"] if isinstance(r["w"], (int, float)) and math.isfinite(r["w"]) else 0.0
                    strongest[r["key"]] = max(strongest.get(r["key"], 0.0), float(w))
        finally:
            con.close()
        if true is not None:  # at the run's threshold (a graph's own is checked below): one fit at 0.3 fires at 0.4
            cutoff = min(0.5, fire)
            for k, v in true.items():
                if k in rows and _truly_max(v) >= cutoff:
                    strongest.setdefault(k, 0.0)
        keys = sorted(strongest, key=lambda k: (-strongest[k], rows[k]["layer"], rows[k]["index"], k) if k in rows
                      else (0.0, 0, 0, k))
    from n2g.progress import Progress

    out: list[dict] = []
    bar = Progress(len(keys), "read graphs", "graphs", enabled=progress and len(keys) > PROGRESS_GRAPHS)
    try:
        _read_graphs(run_dir, keys, rows, ids, fire, true, neurons, deadline, out, bar)
    finally:
        bar.close()
    if neurons is None:
        out.sort(key=lambda e: (-max(e["predicted_max"], e.get("true_max") or 0.0), e["layer"], e["index"], e["key"]))
    return out


PROGRESS_GRAPHS = 200
"""More graphs than this to read, and :func:`fires_on` shows a progress bar when asked to."""


def _read_graphs(run_dir: Path, keys: list[str], rows: dict, ids: list[int], fire: float, true: dict | None,
                 neurons: list[str] | None, deadline: float | None, out: list, bar) -> None:
    """:func:`fires_on`'s reading of each candidate's graph, appending its entries to ``out``."""
    from n2g.fileio import inside
    from n2g.graph import NeuronGraph

    def out_of_time(n_read: int) -> bool:
        if deadline is None or time.monotonic() <= deadline:
            return False
        log.warning("stopped after reading %d of the %d graphs that hold a token of the text (time budget)",
                    n_read, len(keys))
        return True

    for n_read, key in enumerate(keys):
        bar.update(1)
        row = rows.get(key)
        if row is None:
            continue
        if out_of_time(n_read):
            break
        predicted = np.zeros(len(ids), np.float32)
        threshold = fire  # a neuron without a graph: the run's
        gpath = run_dir / "neurons" / key / "graph.json"
        if os.path.lexists(gpath):
            try:
                if not inside(run_dir, gpath):
                    raise N2GError("a link that leads out of the run")
                graph = NeuronGraph.load(gpath)
                threshold = graph.fire_threshold
                predicted = graph.predict_sequence(ids, deadline=min(time.monotonic() + PREDICT_SECONDS, deadline or math.inf))
            except TimeoutError:  # the request's budget, or the graph's own: not a damaged file
                if out_of_time(n_read):
                    break
                log.warning("left out %s: its graph took more than %g s to predict on this text", key, PREDICT_SECONDS)
                continue
            except Exception as exc:  # a damaged graph: named, the others still answered
                log.warning("cannot predict with the graph of %s (%s); re-run `n2g run` to redo it",
                            key, str(exc)[:200] or type(exc).__name__)
                continue
        entry = {**{k: row[k] for k in ("key", "layer", "index", "sign", "f1")},
                 "predicted": [shown_value(v, threshold) for v in predicted],
                 "predicted_max": shown_value(np.max(predicted), threshold) if len(ids) else 0.0,
                 "fires": [i for i, v in enumerate(predicted) if v >= threshold]}
        if true is not None:
            t = true.get(key)
            entry["true"] = None if t is None else [shown_value(v, threshold) if math.isfinite(v) else None for v in t]
            finite = [v for v in (entry["true"] or []) if v is not None]
            entry["true_max"] = max(finite) if finite else None
            entry["true_fires"] = [] if t is None else [i for i, v in enumerate(t) if math.isfinite(v) and v >= threshold]
        if neurons is not None or entry["fires"] or (true is not None and entry["true_fires"]):
            out.append(entry)
