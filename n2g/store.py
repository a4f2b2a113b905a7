"""The run directory: per-neuron artifacts, the run's identity, the scores table.

Layout (README.md, "What a run writes")::

    RUN/run.json                      identity (model, corpus, config) and versions
    RUN/neurons/<key>/graph.json      the graph (absent for a dead neuron)
    RUN/neurons/<key>/result.json     scores, examples, stats; written last, so it marks "done"
    RUN/scores.csv                    one row per neuron and method
    RUN/.claims/<key>                 which process is fitting the neuron now (gone once it is saved)

Every file is written to a temporary name and renamed into place, so a run killed at any moment
leaves only whole files; on resume a neuron counts as done only if its files load, and a damaged
one is redone. A directory written with another model, corpus or configuration is refused.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import socket
from pathlib import Path

from .baselines import BASELINES
from .errors import N2GError, not_unicode
from .fileio import MAX_READ_BYTES, alive, create_json, csv_cell, inside, read_json, replacing, write_bytes_atomic, write_text_atomic
from .graph import NeuronGraph
from .records import SCHEMA_VERSION, NeuronId, NeuronResult, check_folder, newer_schema
from .search import checked_result

log = logging.getLogger(__name__)

RUN_KIND = "n2g.run"
LATER_IDENTITY_KEYS = frozenset({"model_weights", "substitutes", "corpus_tokens", "model_config", "model_path",
                                 "model_content", "model_tokens"})
"""Identity keys newer runs record; a run made before one was recorded resumes without it being compared."""
SAME_CONTENT = {"corpus_tokens": ("corpus", "corpus_fingerprint"), "model_path": ("model",)}
"""Identity keys that say the same thing exactly, and the keys they stand for: when both runs record the
first and it agrees, the others are not compared (the corpus's tokens for its name: the same corpus file
reached by another path; the resolved model location for ``--model`` as typed: ``./m`` and ``/abs/m``, or
``--model default`` and the packaged GGUF's path)."""
METHODS = ("n2g", "token_lookup", "ngram", "zero", *sorted(set(BASELINES) - {"token_lookup", "ngram", "zero"}))
SCORE_FIELDS = ("precision", "recall", "f1", "nonfiring_precision", "nonfiring_recall", "nonfiring_f1",
                "pearson", "explained_variance", "n_tokens", "n_firing", "n_predicted_firing", "status")


CLAIMS = ".claims"
"""Folder of the run directory where each process notes the neurons it is fitting (see :meth:`RunStore.claim`)."""


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid from the process
    that held it; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode("ascii")
    except (OSError, IndexError, UnicodeDecodeError):
        return None


def this_process() -> dict:
    """Who holds a claim: host name, pid and the process's start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid())}


_IDENTITY_OPTIONS = {
    "corpus": "--corpus", "corpus_fingerprint": "--corpus", "corpus_tokens": "--corpus and the model's tokenizer",
    "excerpt_length": "--excerpt-length", "n_excerpts": "--max-excerpts", "store_tokens": "--store-tokens",
    "substitutes": "--substitutes", "partition": "an n2g from before repeated excerpts were kept on one side",
}
"""The option (or what else) that sets each identity key of run.json the user may not know by name."""


def _differences(diff: list[str], theirs: dict, ours: dict) -> str:
    """The identity keys that differ, each with what sets it: ``n_excerpts (--max-excerpts: 512 then, 128 now)``,
    ``config (settings: preset 'default' then, 'paper' now)``; the model's keys by name."""
    words = []
    for key in diff:
        then, now = theirs.get(key), ours.get(key)
        if key == "config" and isinstance(then, dict) and isinstance(now, dict):
            fields = sorted(str(k) for k in set(then) | set(now) if then.get(k) != now.get(k))
            shown = ", ".join(f"{k} {then.get(k)!r:.40} then, {now.get(k)!r:.40} now" for k in fields[:4])
            words.append(f"config (settings: {shown}" + (f", and {len(fields) - 4} more" if len(fields) > 4 else "") + ")")
        elif key in ("n_excerpts", "excerpt_length", "store_tokens"):
            words.append(f"{key} ({_IDENTITY_OPTIONS[key]}: {then!r:.20} then, {now!r:.20} now)")
        elif key in _IDENTITY_OPTIONS:
            words.append(f"{key} ({_IDENTITY_OPTIONS[key]})")
        else:
            words.append(key)
    return ", ".join(words)


def _computed_elsewhere(existing: dict, extra: dict | None, diff: list[str]) -> str:
    """Where only the weights' keys differ because the run was computed on another device type or in another
    dtype (both are part of the keys: the activations differ), the words that say so and how to resume it."""
    if not {"model_weights", "model_content"} & set(diff):
        return ""
    then, now = existing.get("model"), (extra or {}).get("model")
    if not (isinstance(then, dict) and isinstance(now, dict)):
        return ""
    kind = lambda d: str(d.get("device", "")).split(":")[0]  # noqa: E731 (cuda:1 and cuda compute alike)
    if (kind(then), then.get("dtype")) == (kind(now), now.get("dtype")):
        return ""
    return (f" (it was computed on {kind(then) or '?'} in {then.get('dtype') or '?'}, this run on {kind(now) or '?'} in "
            f"{now.get('dtype') or '?'}: pass --device {kind(then) or '?'} --dtype {then.get('dtype') or '?'} to resume it)")


def _holder_alive(holder: dict) -> bool:
    """Whether the process of a claim made on this host still runs (the same pid and start time)."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    if not alive(pid):
        return False
    now = _start_time(pid)  # where /proc says, n2g recorded it: a claim without it is not n2g's own
    return now is None or holder.get("start") == now


def _as_text(value):
    """``value`` with every string made UTF-8 text: a file name that is not UTF-8 (Python holds its bytes as
    lone surrogates) is recorded with its bytes escaped, ``x\\xff.txt``, the same way on every run."""
    if isinstance(value, str):
        if not not_unicode(value):
            return value
        return value.encode("utf-8", "surrogateescape" if _escaped_bytes(value) else "backslashreplace") \
            .decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {_as_text(k): _as_text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_as_text(v) for v in value]
    return value


def _escaped_bytes(text: str) -> bool:
    """Whether every lone surrogate of ``text`` stands for a byte (U+DC80-U+DCFF, Python's surrogateescape)."""
    return all(not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _parquet_cell(value, kind):
    """A scores-table value as a ``kind`` column takes it: an int in a float column as a float, an int beyond
    64 bits as null (Arrow refuses either)."""
    import pyarrow as pa

    if value is None or isinstance(value, (str, bool)):
        return value
    if kind == pa.float64():
        return float(value)
    if pa.types.is_integer(kind) and isinstance(value, int) and not -2**63 <= value < 2**63:
        return None
    return value


def _disk_error(path: Path, exc: OSError) -> N2GError:
    if exc.errno == errno.ENOSPC:
        return N2GError(f"disk full while writing {path}; free some space and re-run the same command to resume")
    if exc.errno == errno.EISDIR:  # os.replace(temporary, destination) onto a folder names the destination second
        where = getattr(exc, "filename2", None) or path
        return N2GError(f"{where} is a directory where the run writes a file; remove it and re-run the same command")
    return N2GError(f"cannot write {path} ({exc.strerror or exc}); choose a writable --out directory")


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._held: set[NeuronId] = set()
        self._me = this_process()
        self._warned = False
        self._made: list[Path] = []  # what open() created: run.json, and the folders it made for it
        self._made_beside: list[Path] = []  # files written beside run.json since (the model's tokenizer)

    # -- identity ------------------------------------------------------------------------
    def open(self, identity: dict, extra: dict | None = None) -> None:
        """Create the run, or check that an existing one was made with the same identity (also when
        another process created it a moment ago: the file is made only where none exists)."""
        identity, extra = _as_text(identity), _as_text(extra)
        path = self.root / "run.json"
        if not path.exists():
            try:
                missing = [p for p in (self.root, *self.root.parents) if not p.exists()]
                self.root.mkdir(parents=True, exist_ok=True)
                if create_json(path, {"kind": RUN_KIND, "schema_version": SCHEMA_VERSION,
                                      "identity": identity, **(extra or {})}):
                    self._made = [path, *missing]
                    return
            except OSError as exc:
                raise _disk_error(path, exc) from exc
        try:
            existing = read_json(path)
        except (OSError, ValueError, RecursionError) as exc:
            raise N2GError(f"{path} is unreadable ({exc}); delete it or choose another --out") from None
        if not isinstance(existing, dict) or existing.get("kind") != RUN_KIND:
            raise N2GError(f"{self.root} is not an n2g run directory; choose another --out")
        if newer := newer_schema(existing):  # adding to it could write what the newer n2g reads otherwise
            raise N2GError(f"{self.root} was {newer} to add to it, or choose another --out")
        theirs = existing.get("identity")
        if isinstance(theirs, dict):  # a run made before a key was recorded is judged on the keys it has
            identity = {k: v for k, v in identity.items() if k in theirs or k not in LATER_IDENTITY_KEYS}
            for content, names in SAME_CONTENT.items():
                if content in theirs and theirs[content] == json.loads(json.dumps(identity.get(content))):
                    theirs = {k: v for k, v in theirs.items() if k not in names}
                    identity = {k: v for k, v in identity.items() if k not in names}
        if theirs != json.loads(json.dumps(identity)):
            theirs = theirs if isinstance(theirs, dict) else {}
            diff = sorted(str(k) for k in set(identity) | set(theirs)
                          if theirs.get(k) != json.loads(json.dumps(identity.get(k))))
            raise N2GError(
                f"{self.root} holds a run made with a different {_differences(diff, theirs, json.loads(json.dumps(identity)))}"
                f"{_computed_elsewhere(existing, extra, diff)}; "
                "choose another --out (or delete that directory) instead of mixing results"
            )

    def discard_if_empty(self) -> None:
        """Remove what :meth:`open` created (run.json and the folders made for it) while no neuron has been
        saved and no other process has claimed one: a run refused before its first neuron leaves nothing."""
        if not self._made:
            return
        for sub in ("neurons", ".claims"):
            folder = self.root / sub
            try:
                if folder.is_dir() and not folder.is_symlink() and any(folder.iterdir()):
                    return  # another process sharing this --out is at work
                if folder.is_dir() and not folder.is_symlink():
                    folder.rmdir()
            except OSError:
                return
        run_json, *folders = self._made
        for path in self._made_beside:
            path.unlink(missing_ok=True)
        run_json.unlink(missing_ok=True)
        for folder in folders:  # the deepest first, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break
        self._made, self._made_beside = [], []

    def save_tokenizer(self, model) -> None:
        """Save ``model``'s tokenizer in the run (:func:`n2g.tokenizer.save`) unless it has one; removed with
        run.json by :meth:`discard_if_empty`."""
        from n2g import tokenizer

        if tokenizer.save(self.root, model) and self._made:
            self._made_beside.append(self.root / tokenizer.NAME)

    def meta(self) -> dict:
        return read_json(self.root / "run.json")

    # -- neurons -------------------------------------------------------------------------
    def neuron_dir(self, neuron: NeuronId) -> Path:
        return self.root / "neurons" / neuron.key

    def load_result(self, neuron: NeuronId, then: str = "it will be redone") -> NeuronResult | None:
        """The stored result if it and its graph load; None (and a warning ending in ``then``) if missing or damaged."""
        folder = self.neuron_dir(neuron)
        path = folder / "result.json"
        try:
            if not path.exists():
                return None
        except PermissionError:  # a folder that cannot be searched can be neither read nor redone
            raise N2GError(f"cannot open {folder}: permission denied; make it readable and writable (or remove it "
                           "to redo that neuron), then re-run the same command") from None
        if not (inside(self.root, path) and inside(self.root, folder / "graph.json")):
            log.warning("%s: its stored result is a link that leads out of the run; %s", neuron.key, then)
            return None
        try:
            result = checked_result(NeuronResult.from_dict(read_json(path)))
            check_folder(result.neuron, folder.name)
            if result.status != "dead":
                NeuronGraph.load(folder / "graph.json")
            return result
        except PermissionError as exc:
            log.warning("%s: %s cannot be read (permission denied); %s", neuron.key, exc.filename, then)
            return None
        except Exception as exc:  # any damage means: redo this neuron
            log.warning("%s: stored artifacts are damaged (%s); %s", neuron.key, exc, then)
            return None

    def is_done(self, neuron: NeuronId) -> bool:
        return self.load_result(neuron) is not None

    # -- claims: several processes sharing one run directory -------------------------------------
    def claim(self, neuron: NeuronId) -> tuple[str, dict | None]:
        """Take ``neuron`` for this process before fitting it, so that runs started on the same
        directory share the work instead of each fitting every neuron.

        Returns ``("mine", None)`` when this process holds it now, ``("done", None)`` when its result
        is saved, ``("busy", holder)`` when a live process on this host is fitting it, and
        ``("remote", holder)`` when a process on another host claimed it (whether that one still runs
        cannot be told from here). A claim whose process has ended (killed, or the pid reused since)
        is taken over. Where claims cannot be written (a read-only directory) every neuron is ``mine``."""
        if self.is_done(neuron):
            return "done", None
        folder = self.root / CLAIMS
        path = folder / neuron.key
        try:
            folder.mkdir(exist_ok=True)
            import fcntl

            # the folder itself is the lock (a file there could be a FIFO); one that is a link, or not
            # a folder, is not used: claims would be written, and removed, wherever it leads
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)  # one process at a time decides who holds a claim (closing unlocks)
                try:
                    holder = read_json(path, 4096)
                except FileNotFoundError:
                    holder = None
                except (OSError, ValueError, RecursionError):
                    holder = {}  # damaged: nobody's
                if isinstance(holder, dict) and holder:
                    if holder == self._me:
                        return "mine", None
                    if holder.get("host") != self._me["host"]:
                        return "remote", holder
                    if _holder_alive(holder):
                        return "busy", holder
                if self.is_done(neuron):  # saved while we looked, and its claim already gone
                    return "done", None
                # no fsync: a claim lost in a crash was a claim of a process the crash ended (a whole
                # model's 46,080 claims would cost ~30 s of fsyncs)
                write_bytes_atomic(path, json.dumps(self._me).encode("utf-8"), sync=False)
            finally:
                os.close(fd)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("%s cannot hold claims (%s: a link, a file or a read-only folder); this run fits "
                            "without them, so a second run on the same --out would repeat its work", folder,
                            exc.strerror or exc)
            return "mine", None
        self._held.add(neuron)
        return "mine", None

    def release_claims(self) -> None:
        """Drop this process's claims on neurons it did not finish (an interrupted or failed run)."""
        for neuron in self._held:
            path = self.root / CLAIMS / neuron.key
            try:
                if not os.path.islink(path.parent) and read_json(path, 4096) == self._me:
                    path.unlink()
            except (OSError, ValueError, RecursionError):
                pass
        self._held.clear()

    def save(self, result: NeuronResult, graph: NeuronGraph | None) -> None:
        """Write the graph, then the result (the result's presence marks the neuron done)."""
        folder = self.neuron_dir(result.neuron)
        if not folder.resolve().is_relative_to(self.root.resolve()):  # neurons/ or its folder links out
            raise N2GError(f"{folder} is a link that leads out of the run directory; remove it (or choose "
                           "another --out) and re-run the same command")
        data = json.dumps(result.to_dict(), ensure_ascii=False, allow_nan=False).encode("utf-8")
        if len(data) > MAX_READ_BYTES:
            raise N2GError(f"the result of {result.neuron.key} is {len(data) / 2**20:.0f} MiB, more "
                           f"than the {MAX_READ_BYTES >> 20} MiB n2g reads back (it keeps about 30 excerpts a neuron); "
                           "choose a shorter --excerpt-length and another --out")
        try:
            if graph is not None:
                graph.save(folder / "graph.json")
            write_bytes_atomic(folder / "result.json", data)
        except OSError as exc:
            raise _disk_error(folder, exc) from exc
        claims = self.root / CLAIMS
        try:  # saved: whoever claimed it is done with it
            if not os.path.islink(claims):
                (claims / result.neuron.key).unlink()
        except OSError:
            pass
        self._held.discard(result.neuron)

    def results(self) -> list[NeuronResult]:
        return sorted(self._each_result(), key=lambda r: r.neuron)

    def _each_result(self):
        """Every readable stored result, one at a time, in folder order."""
        folder = self.root / "neurons"
        if not folder.is_dir():
            return
        for sub in sorted(folder.iterdir()):
            if (sub / "result.json").exists():
                if not inside(self.root, sub / "result.json"):
                    log.warning("skipping %s: it is a link that leads out of the run", sub / "result.json")
                    continue
                try:
                    result = checked_result(NeuronResult.from_dict(read_json(sub / "result.json")))
                    check_folder(result.neuron, sub.name)
                except Exception as exc:
                    log.warning("skipping unreadable %s (%s)", sub / "result.json", exc)
                    continue
                yield result

    def score_rows(self) -> tuple[list[str], list[list]]:
        """The scores table: a header and one row per neuron and method (a dead neuron gets one row)."""
        header = ["neuron", "layer", "index", "sign", "status", "method",
                  *("score_status" if f == "status" else f for f in SCORE_FIELDS),
                  "max_activation", "firing_rate", "ceiling_f1", "seconds"]
        per_neuron = []  # results are read one at a time; only their rows are kept
        for r in self._each_result():
            rows = []
            head = [r.neuron.key, r.neuron.layer, r.neuron.index, r.neuron.sign.value, r.status]
            tail = [r.stats.max_activation, r.stats.firing_rate, r.ceiling.get("f1"), round(r.seconds, 4)]
            if not r.scores:
                rows.append(head + [None] + [None] * len(SCORE_FIELDS) + tail)
            for method in METHODS:
                if method in r.scores:
                    s = r.scores[method].to_dict()
                    rows.append(head + [method] + [s.get(f) for f in SCORE_FIELDS] + tail)
            per_neuron.append((r.neuron, rows))
        per_neuron.sort(key=lambda item: item[0])
        return header, [row for _, rows in per_neuron for row in rows]

    def write_scores_table(self) -> Path:
        """``scores.csv`` (and ``scores.parquet`` when pyarrow is installed): one row per neuron and method."""
        header, rows = self.score_rows()
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows([[csv_cell(v) for v in row] for row in rows])  # text from result files is never a formula
        csv_path = path = self.root / "scores.csv"
        try:
            write_text_atomic(path, buf.getvalue())
            path = self.root / "scores.parquet"  # the file an error below is about
            self._write_parquet(header, rows)
        except OSError as exc:
            raise _disk_error(path, exc) from exc
        return csv_path

    def _write_parquet(self, header: list[str], rows: list[list]) -> Path | None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            return None
        types = {"neuron": pa.string(), "sign": pa.string(), "status": pa.string(), "method": pa.string(),
                 "score_status": pa.string(),
                 "layer": pa.int32(), "index": pa.int32(), "n_tokens": pa.int64(), "n_firing": pa.int64(),
                 "n_predicted_firing": pa.int64()}
        columns = list(zip(*rows)) if rows else [[] for _ in header]
        table = pa.table({name: pa.array([_parquet_cell(v, types.get(name, pa.float64())) for v in col],
                                         type=types.get(name, pa.float64()))
                          for name, col in zip(header, columns)})
        path = self.root / "scores.parquet"
        with replacing(path) as tmp, open(tmp, "wb") as f:  # a file object: pyarrow takes only UTF-8 path names
            pq.write_table(table, f)
        return path
