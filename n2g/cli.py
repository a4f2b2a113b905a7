"""The ``n2g`` command line: a thin layer over :mod:`n2g.pipeline` and the report/viewer modules.

``main(argv) -> int``; progress and logs go to stderr, results to stdout and files. Every mistake a
user can make comes back as one line on stderr and exit code 2, never a traceback. When the reader
of stdout goes away (``n2g ... | head``) the command stops quietly with exit code 141, as Unix
tools killed by SIGPIPE do.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import re
import sys
from pathlib import Path

from .config import PRESETS
from .errors import N2GError, not_unicode
from .fileio import read_json
from .records import plural


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="subject model: 'default' (packaged SmolLM2-135M-Instruct), a .gguf file, a local HF directory or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="default",
                   help="'default' (offline Python docs), a text/JSONL/Parquet file or directory, or hf:NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="JSONL field or Parquet column holding the text (default: text)")
    p.add_argument("--excerpt-length", type=int, default=64, help="tokens per excerpt (default 64)")
    p.add_argument("--max-excerpts", type=int, default=None, help="use only the first N excerpts of the corpus")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="distiller settings (default: default)")
    p.add_argument("--augment", dest="augment", action="store_true", default=None, help="make variants of important tokens (on in the default preset: the activator, with substitutes the training text does not show)")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation (no substitute forwards)")
    p.add_argument("--substitutes", default=None,
                   help="augmentation substitutes: 'embedding' (the tokens nearest in the subject model's input "
                        "embedding; the default preset's), 'model' (its next-token guesses; paper --augment's) "
                        "or mlm:NAME (a masked LM)")
    p.add_argument("--written", type=int, default=None, metavar="N",
                   help="excerpts the subject model writes from training openings; their tokens the corpus shows "
                        "fewer than twice teach the graph (default preset: 512, at most one per training excerpt; 0: none)")
    p.add_argument("--vocabulary", type=int, default=None, metavar="N",
                   help="contexts after which the subject model is read at every token the corpus shows fewer than "
                        "twice; the tokens that fire teach the graph (default preset: 4; 0: none)")
    p.add_argument("--out", default=None, help="run directory (default: graphs/<model>-<preset>)")
    p.add_argument("--group-size", type=int, default=64, help="neurons fitted together in shared batches (default 64)")
    p.add_argument("--store-tokens", type=int, default=None,
                   help="token budget of each layer's on-disk activation store (default 131072; larger corpora keep a seeded subset)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per fitting batch (default: sized to free GPU memory; 16384 on CPU)")
    p.add_argument("--scan-batch", type=int, default=None,
                   help="excerpts per scan batch (default: sized to free GPU memory; on CPU 32, fewer for a very wide layer)")
    p.add_argument("--host-workers", type=int, default=None,
                   help="worker processes for graph building and scoring (default: all cores but one on a GPU, 0 on CPU; at most 4 per core)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="fit on Ray workers: a local cluster, or the cluster at ADDRESS (needs pip install 'n2g[ray]')")
    p.add_argument("--sae", default=None, metavar="PATH",
                   help="a local SAELens directory (cfg.json + sae_weights.safetensors): fit its latents instead of MLP neurons")
    p.add_argument("--control", default=None, choices=["random"],
                   help="also fit the same neurons on a randomly initialised copy of the model (seeded); the report shows both")
    p.add_argument("--ablation", action="store_true",
                   help="also score each graph standing in for its neuron inside the model (more forward work)")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--no-report", dest="report", action="store_false",
                   help="skip drawing, the report, the search index and the viewer (n2g report RUN writes them later)")
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (progress stays on stderr)")


def _verbosity_args(p: argparse.ArgumentParser, json_out: bool = False) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    if json_out:
        p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")


def _run_default(name: str) -> str:
    """The Python default of a RunOptions field, so the CLI and ``n2g.pipeline.run`` agree."""
    from dataclasses import fields

    from .pipeline import RunOptions

    return next(f.default for f in fields(RunOptions) if f.name == name)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: what is wrong and where the help is, no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="n2g", description="Neuron to Graph: explain single neurons as token-pattern graphs.")
    parser.add_argument("--version", action="version", version=f"n2g {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a subject model", description="Print a model's architecture, size, device and dtype.")
    _model_args(p)
    _verbosity_args(p, json_out=True)

    p = sub.add_parser("fit", help="distil one neuron", description="Distil one neuron into a graph, score it and save it.")
    _model_args(p)
    _corpus_args(p)
    p.add_argument("--layer", type=int, required=True, help="layer index")
    p.add_argument("--neuron", type=int, required=True, help="neuron index within the layer's MLP")
    p.add_argument("--sign", default="positive", choices=["positive", "negative", "both"],
                   help="which side to distil (both: the positive and the negative side, two graphs)")
    _fit_args(p)

    p = sub.add_parser("run", help="distil many neurons", description="Distil many neurons (layers x neurons) with batched fitting; resumable.")
    _model_args(p)
    _corpus_args(p)
    layers, neurons = _run_default("layers"), _run_default("neurons")
    p.add_argument("--layers", default=layers, help=f"e.g. 0,5,10 or 0-29 or all (default {layers})")
    p.add_argument("--neurons", default=neurons,
                   help=f"e.g. 0-99 or 1,2,3 or all (default {neurons}: a quick look; 'all' is a whole layer, hours on a CPU)")
    p.add_argument("--sign", default="positive", choices=["positive", "negative", "both"],
                   help="which side of each neuron to distil (default positive; both: two graphs per neuron)")
    _fit_args(p)

    p = sub.add_parser("report", help="write the validation report and viewer for a run",
                       description="Render graphs and write report.html/json/csv, the search index and viewer pages.")
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("--out", default=None,
                   help="write the report into a copy of the run made here (for a read-only run directory)")
    _verbosity_args(p)

    p = sub.add_parser("serve", help="serve a run's viewer with search", description="Serve the viewer of a run directory.")
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", default="8000", help="port, 1-65535 (default 8000; 0 picks a free one)")
    p.add_argument("--model", default=None,
                   help="load this subject model (e.g. default) so try-your-own-text shows the neuron's true activation")
    p.add_argument("--sae", default=None, metavar="PATH",
                   help="with --model, for a run of SAE latents: the run's SAE (a local SAELens directory)")
    p.add_argument("--device", default=None, help="device for --model (default: cuda if available)")
    _verbosity_args(p)

    p = sub.add_parser("steer", help="clamp a neuron on a prompt: next-token changes, continuation, attribution",
                       description="Clamp one neuron to a multiple of its maximum activation on a prompt and show the "
                                   "change in next-token probabilities, a greedy continuation before and after, and "
                                   "the neuron's attribution to an output token.")
    _model_args(p)
    _corpus_args(p)
    p.add_argument("--layer", type=int, required=True, help="layer index")
    p.add_argument("--neuron", type=int, required=True, help="neuron index within the layer's MLP")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--scale", default="4", help="clamp to this multiple of the neuron's maximum activation (default 4)")
    p.add_argument("--max", dest="max_activation", default=None,
                   help="the neuron's maximum activation, or with --sign negative its most negative one (default: from "
                        "a scan of the corpus, cached)")
    p.add_argument("--sign", default="positive", choices=["positive", "negative"],
                   help="clamp to a multiple of the neuron's maximum (positive, the default) or of its most negative "
                        "activation (negative: its negative side, the .neg neuron of a run)")
    p.add_argument("--tokens", type=int, default=12, help="greedy continuation length (default 12, at most 1,024)")
    p.add_argument("--target", default=None, help="output token for the attribution (default: the clean model's top next token)")
    p.add_argument("--sae", default=None, metavar="PATH", help="steer a latent of this local SAELens SAE instead of an MLP neuron")
    _verbosity_args(p, json_out=True)

    p = sub.add_parser("search", help="find neurons by token", description=(
        "Find the neurons whose graphs contain a token: exact matches first, then the same ignoring case and "
        "spaces, then tokens that start with it, then tokens that contain it."))
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("token", help="token text, e.g. Paris or ' Paris' (case-insensitive; prefixes and substrings match)")
    p.add_argument("--role", default=None, choices=["activator", "context"], help="only as activating or context token")
    p.add_argument("--limit", type=int, default=20, help="at most this many hits (default 20)")
    _verbosity_args(p, json_out=True)

    p = sub.add_parser("predict", help="which neurons of a run fire on a text, by their graphs", description=(
        "Split TEXT into tokens and list the neurons of the run whose graphs predict firing on it (normalised "
        "activation at or above the run's fire threshold, 0.5 unless the run was fitted at another), strongest "
        "first, with the tokens where they fire. With --model, also the neurons' "
        "true activations on the text: neurons that truly fire are listed too, so a graph's misses show. "
        "With --neuron, every token's prediction for those neurons."))
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("text", help="the text to predict on ('-' reads it from standard input, less the one line break "
                   "that ends it, as `echo` and files add one)")
    p.add_argument("--neuron", action="append", default=None, metavar="KEY",
                   help="show every token's prediction for this neuron, e.g. L5.N2 or L5.N2.neg (repeatable)")
    p.add_argument("--model", default=None, help="the run's subject model, to show the true activations too "
                   "(without it the text is split by the tokenizer the run saved, else by the tokens its excerpts "
                   "and graphs show)")
    p.add_argument("--sae", default=None, metavar="PATH",
                   help="with --model, for a run of SAE latents: the run's SAE (a local SAELens directory)")
    p.add_argument("--device", default=None, help="device for --model (default: cuda if available, else cpu)")
    p.add_argument("--limit", type=int, default=20, help="at most this many neurons in the list (default 20)")
    _verbosity_args(p, json_out=True)

    p = sub.add_parser("show", help="print fitted neurons of a run: scores, summary and graph paths", description=(
        "Print neurons a run fitted, as the terminal can show them: the graph's test firing F1 beside the token "
        "lookup and the best lookup fitted on the same training text, Pearson r, the summary paragraph of the "
        "neuron's page, the graph's strongest paths in reading order ([activating token], its END value and how "
        "many training paths end there), and where the neuron's page is. Nothing is refitted."))
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("keys", nargs="+", metavar="KEY", help="neuron keys, e.g. L5.N2 or L5.N2.neg")
    p.add_argument("--paths", default="20", metavar="N",
                   help="print the N strongest paths of each graph (default 20; 0: none; all: every path)")
    _verbosity_args(p, json_out=True)

    p = sub.add_parser("compare", help="compare the graphs of two runs of one model, neuron by neuron", description=(
        "Pair the neurons two runs of one model share (scored on the same held-out text) and show each run's mean "
        "firing F1 and Pearson r, the difference B - A with a 95 % bootstrap interval over the neurons, wins and "
        "losses, the difference per layer and the neurons that moved most. For a setting changed between the runs "
        "(e.g. --augment, --written 0, --vocabulary 0, another n2g version)."))
    p.add_argument("run_a", help="the first run directory (A)")
    p.add_argument("run_b", help="the second run directory (B)")
    p.add_argument("--limit", type=int, default=10, help="list at most this many gains and losses (default 10; 0: none)")
    _verbosity_args(p, json_out=True)
    return parser


def _options(args, layers: str, neurons: str):
    from .pipeline import RunOptions

    overrides = {"augment": args.augment, "written": args.written, "vocabulary": args.vocabulary}
    return RunOptions(model=args.model, corpus=args.corpus, text_field=args.text_field, excerpt_length=args.excerpt_length,
                      max_excerpts=args.max_excerpts, layers=layers, neurons=neurons, sign=args.sign, preset=args.preset,
                      overrides=overrides, substitutes=args.substitutes, out=args.out, device=args.device, dtype=args.dtype, group_size=args.group_size,
                      store_tokens=args.store_tokens, scan_batch=args.scan_batch, batch_tokens=args.batch_tokens,
                      host_workers=args.host_workers, ray=args.ray, ray_workers=args.ray_workers, ablation=args.ablation,
                      control=args.control, sae=args.sae,
                      report=args.report, progress=not args.quiet)


def _check_out(out: Path) -> None:
    """Refuse to write a run into an unrelated non-empty directory; tidy up after a killed run."""
    if out.is_symlink() and not out.exists():  # mkdir would fail with "File exists"
        raise N2GError(f"--out {out} is a link to {os.readlink(out)}, which does not exist; create that "
                       "directory, or choose another --out")
    if out.exists() and not out.is_dir():
        raise N2GError(f"--out {out} is a file, not a directory; choose a new or empty directory, "
                       "or an existing run directory")
    if out.is_dir() and not (out / "run.json").exists():
        from .fileio import is_temporary

        try:  # n2g's temporaries alone: run.json being made by another run now, or by one killed doing it
            occupied = any(not is_temporary(p.name) for p in out.iterdir())
        except OSError as exc:
            raise N2GError(f"cannot read --out directory {out} ({exc.strerror}); choose another --out") from None
        if occupied:
            raise N2GError(f"--out {out} is a non-empty directory that is not an n2g run; "
                           "choose a new or empty directory, or an existing run directory")
    if (out / "run.json").is_file():
        from .fileio import remove_stale_temporaries

        remove_stale_temporaries(out)


def _run(args) -> int:
    from .pipeline import default_out, run, summary_table

    if args.command == "fit":
        opts = _options(args, str(args.layer), str(args.neuron))
    else:
        opts = _options(args, args.layers, args.neurons)
    _check_out(Path(opts.out) if opts.out else default_out(opts))
    summary = run(opts)
    if args.json:
        data = _summary_json(summary)
        if args.command == "fit":  # one neuron: what its graph says, in words, as the terminal shows it
            for entry, r in zip(data["neurons"], summary.results):
                entry["summary"] = _fit_summary(summary.out, r) or None
        _print_json(data)
        return 0
    unit = "latent" if getattr(args, "sae", None) else "neuron"
    print(summary_table(summary.results, unit))
    print(f"\n{len(summary.results)} {plural(len(summary.results), unit)} ({summary.fitted_now} fitted now) in {summary.seconds:.1f}s -> {summary.out}")
    if "report" in summary.artifacts:
        print(f"report: {summary.artifacts['report']}")
    if args.command == "fit":
        for r in summary.results:  # what the graph says, in words, and what to open next: the neuron's own page
            text = _fit_summary(summary.out, r)
            if text:
                print("\n" + _wrapped(text))
            if "viewer" in summary.artifacts:
                print(f"page: {summary.out / 'viewer' / 'neurons' / (r.neuron.key + '.html')}")
    return 0


def _fit_summary(out: Path, result) -> str:
    """The neuron page's summary paragraph, plain text ("" where the saved graph cannot be read: the page says why)."""
    from .explain import summary_text
    from .render import load_graph_json
    from .search import _run_fire_threshold

    G = None
    gjson = out / "neurons" / result.neuron.key / "graph.json"
    if gjson.exists():
        try:
            G = load_graph_json(gjson, out, check=True)
        except N2GError:
            return ""
    return summary_text(result, G, _run_fire_threshold(out))


def _wrapped(text: str) -> str:
    """``text`` for the terminal: control characters made visible, wrapped to the terminal's width (at most 100)."""
    import shutil
    import textwrap

    width = min(100, max(40, shutil.get_terminal_size((100, 24)).columns - 1))
    return textwrap.fill(visible(text), width, break_on_hyphens=False)


def _print_json(data) -> None:
    import json

    text = json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False, default=str)
    # a path that is not UTF-8, or text JSON leaves raw that a terminal obeys (a C1 control such as the 8-bit
    # CSI, a bidirectional override: a run folder's tokens): JSON's \u escapes keep the output plain text
    if not_unicode(text) or visible(text) != text:
        text = json.dumps(data, indent=1, ensure_ascii=True, allow_nan=False, default=str)
    print(text)


def _summary_json(summary) -> dict:
    """A run's summary as JSON: where it went, how long it took, and per neuron its status and scores."""
    neurons = []
    for r in summary.results:
        neurons.append({"key": r.neuron.key, "layer": r.neuron.layer, "index": r.neuron.index, "sign": r.neuron.sign.value,
                        "status": r.status, "max_activation": r.stats.max_activation, "firing_rate": r.stats.firing_rate,
                        "graph": dict(r.graph_stats), "seconds": r.seconds,
                        "scores": {m: {k: v for k, v in s.to_dict().items()} for m, s in r.scores.items()},
                        "ceiling": dict(r.ceiling),
                        "page": str(summary.out / "viewer" / "neurons" / f"{r.neuron.key}.html")
                        if "viewer" in summary.artifacts else None})
    return {"out": str(summary.out), "n_neurons": len(summary.results), "fitted_now": summary.fitted_now,
            "seconds": round(summary.seconds, 3), "artifacts": {k: str(v) for k, v in summary.artifacts.items()},
            "neurons": neurons}


def _run_folder(text: str) -> Path:
    """``text`` as a path, once it is a run directory this n2g can read (not one a newer n2g wrote)."""
    from .report import read_run_json

    run_dir = Path(text)
    if not (run_dir / "run.json").exists():
        raise N2GError(f"{text} is not an n2g run directory (no run.json); run `n2g run` first")
    read_run_json(run_dir)  # N2GError where a newer n2g wrote it; a damaged run.json is each command's to handle
    return run_dir


def _run_dir_and_limit(args) -> Path:
    """``args.run_dir`` as a path, once it is a run directory and ``--limit`` is at least 1 (search, predict)."""
    run_dir = _run_folder(args.run_dir)
    if args.limit < 1:
        raise N2GError(f"--limit must be at least 1 (got {args.limit})")
    return run_dir


def _search(args) -> int:
    import sqlite3

    from .search import search
    from .render import display_token

    run_dir = _run_dir_and_limit(args)
    logging.getLogger(__name__).debug("searching %s for %r (role %s, limit %d)", run_dir, args.token, args.role, args.limit)
    from .search import warn_if_index_behind

    warn_if_index_behind(run_dir)
    try:
        hits = search(run_dir, args.token, role=args.role, limit=args.limit)
    except (sqlite3.Error, OSError) as exc:
        raise N2GError(f"cannot read the search index of {run_dir} ({exc}); run `n2g report {run_dir}` to rebuild it") from None
    from .graph import shown_fixed
    from .search import _run_fire_threshold

    threshold = _run_fire_threshold(run_dir)
    if args.json:
        _print_json({"query": args.token, "role": args.role, "fire_threshold": threshold, "results": hits})
        return 0
    if not hits:
        print(f"no neuron's graph has a token matching {args.token!r}", file=sys.stderr)
        return 1
    print(f"{'neuron':<16}{'token':<24}{'role':<11}{'weight':>7}{'N2G F1':>8}  match")
    for h in hits:
        f1 = "  -  " if h["f1"] is None else f"{h['f1']:.2f}"
        w = "  -  " if h["weight"] is None else \
            shown_fixed(h["weight"], threshold) if h["role"] == "activator" else f"{h['weight']:.2f}"  # quiet reads 0.49
        role = "quiet" if h["quiet"] else h["role"]
        # the key too is text from the index file, which may not be the user's own: control characters shown, not sent
        print(f"{display_token(h['key'])[:40]:<16}{display_token(h['token'])[:23]:<24}{role:<11}{w:>7}{f1:>8}  {h['match']}")
    if any(h["quiet"] for h in hits):
        print(f"(quiet: an activating token whose graph value stays below the fire threshold {threshold:g}; "
              "the graph holds its graded value but never predicts it to fire)")
    return 0


def _paths_limit(text: str) -> int | None:
    """``--paths``: a whole number of 0 or more, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    if not re.fullmatch(r"\s*[0-9]+\s*", text):  # ASCII digits only: not int()'s "1_0", "+3" or other scripts' digits
        n = -1
    elif len(text.strip().lstrip("0")) > 18:  # more paths than any graph holds (int() refuses 4,300 digits and more)
        return None
    else:
        n = int(text.strip().lstrip("0") or "0")  # (leading zeros count toward int()'s digit limit)
    if n < 0:
        raise N2GError(f"--paths must be a whole number of 0 or more, or 'all' (got {visible(text)[:40]!r})")
    return n


def _show(args) -> int:
    """``n2g show RUN KEY...``: each neuron's scores, summary and strongest paths, from what the run saved."""
    from .api import load_neuron
    from .records import NeuronId
    from .render import path_text
    from .report import METHOD_NAMES

    run_dir = _run_folder(args.run_dir)
    limit = _paths_limit(args.paths)
    keys = []
    for key in args.keys:
        try:
            keys.append(NeuronId.from_key(key).key)  # L05.N2 is L5.N2
        except ValueError as exc:
            raise N2GError(visible(str(exc))) from None
    shown = []
    for key in dict.fromkeys(keys):  # each neuron once, in the order asked
        neuron = load_neuron(run_dir, key)
        r = neuron.result_
        scores = {m: s for m, s in r.scores.items() if s is not None}
        lookups = [(s.f1, m) for m, s in scores.items() if m not in ("n2g", "zero") and s.f1 is not None]
        best = max(lookups, key=lambda fm: fm[0])[1] if lookups else None
        paths = neuron.graph_.paths()
        page = run_dir / "viewer" / "neurons" / f"{r.neuron.key}.html"
        shown.append({
            "key": r.neuron.key, "layer": r.neuron.layer, "index": r.neuron.index, "sign": r.neuron.sign.value,
            "status": r.status, "max_activation": r.stats.max_activation, "best_lookup": best,
            "scores": {m: {"precision": s.precision, "recall": s.recall, "f1": s.f1, "pearson": s.pearson}
                       for m, s in scores.items()},
            "summary": _fit_summary(run_dir, r) or None, "n_paths": len(paths),
            "paths": [{"text": path_text(p), "tokens": p["tokens"], "kinds": p["kinds"], "end": p["end"],
                       "count": p["count"]} for p in (paths if limit is None else paths[:limit])],
            "page": str(page) if page.is_file() else None, "_graph": neuron.graph_})
    if args.json:
        _print_json({"run": str(run_dir), "neurons": [{k: v for k, v in e.items() if k != "_graph"} for e in shown]})
        return 0

    for n, e in enumerate(shown):
        def f1(method: str, e=e) -> str:
            s = e["scores"].get(method)
            return "-" if s is None or s["f1"] is None else f"{s['f1']:.3f}"

        head = f"{e['key']} ({e['status']})"
        if e["status"] != "dead":
            head += ": test firing F1 " + (f1("n2g") if f1("n2g") != "-" else "undefined (no held-out token fires)")
            if "token_lookup" in e["scores"] and f1("token_lookup") != "-":
                head += f"; token lookup {f1('token_lookup')}"
            if e["best_lookup"] and e["best_lookup"] != "token_lookup":
                head += f"; best lookup, {METHOD_NAMES.get(e['best_lookup'], e['best_lookup'])}, {f1(e['best_lookup'])}"
            pearson = (e["scores"].get("n2g") or {}).get("pearson")
            head += f"; Pearson r {pearson:.3f}" if pearson is not None else ""
            negative = e["sign"] == "negative"  # the stored extreme is its size; the model's value is below 0
            head += f"; {'most negative' if negative else 'maximum'} activation {-e['max_activation'] if negative else e['max_activation']:.4g}"
        print(("\n" if n else "") + visible(head))
        if e["summary"]:
            print(_wrapped(e["summary"]))
        if limit != 0 and e["status"] != "dead":
            print("\n" + visible(e["_graph"].describe(limit=limit)).replace("graph.describe(limit=None) lists all",
                                                                         "--paths all lists every one"))
        if e["page"]:
            print(f"page: {_shown(e['page'], 400)}")
    return 0


def _compare(args) -> int:
    from .compare import compare_runs, format_comparison

    if args.limit < 0:
        raise N2GError(f"--limit must be 0 or more (got {args.limit})")
    comparison = compare_runs(args.run_a, args.run_b, progress=not args.quiet)
    if args.json:
        _print_json(comparison.to_dict())
    else:
        print(format_comparison(comparison, args.limit))
    return 0


MAX_PREDICT_CHARS = 100_000
"""Longest text ``n2g predict`` reads (more than any model here reads in one pass)."""


def _run_made_with(run_dir: Path) -> dict:
    try:
        made_with = read_json(run_dir / "run.json").get("model") or {}
    except (OSError, ValueError, AttributeError, RecursionError):
        made_with = {}
    return made_with if isinstance(made_with, dict) else {}


def _predict(args) -> int:
    import sqlite3

    from .graph import shown_fixed
    from .records import NeuronId
    from .render import display_token
    from .search import _run_fire_threshold, fires_on, run_neurons, warn_if_index_behind

    run_dir = _run_dir_and_limit(args)
    for key in args.neuron or ():
        try:
            NeuronId.from_key(key)
        except ValueError as exc:
            raise N2GError(f"--neuron: {visible(str(exc))}") from None
    text = args.text
    if text == "-":
        try:
            text = sys.stdin.read(MAX_PREDICT_CHARS + 1)
        except (AttributeError, OSError, ValueError) as exc:  # closed, or bytes that are not UTF-8
            raise N2GError(f"cannot read the text from standard input ({exc}); pipe UTF-8 text in, or pass it as TEXT") from None
        if len(text) <= MAX_PREDICT_CHARS:  # `echo TEXT |` and a file end in a line break that is no part of the text
            text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if len(text) > MAX_PREDICT_CHARS:
        raise N2GError(f"the text is longer than {MAX_PREDICT_CHARS:,} characters; predict on a part of it")
    if not_unicode(text):
        raise N2GError("the text is not valid UTF-8; give it in UTF-8")
    if not text.strip():
        raise N2GError("no text given; pass the text to predict on (or '-' to read it from standard input)")
    true = None
    if args.model or args.sae:
        from .viewer import _predict_room

        model = _run_subject(args, _run_made_with(run_dir), "predict on it")
        room = _predict_room(model)
        ids = model.encode(text)
        if len(ids) > room:
            logging.getLogger(__name__).warning(
                "the text is %d tokens long; the model reads the first %d in one pass, so only they are used",
                        len(ids), room)
            ids = ids[:room]
        toks = model.token_strings(ids)
        how = f"the model's tokenizer ({model.spec})"
    else:
        from .tokenizer import splitter

        split = splitter(run_dir)
        ids, toks = split.split(text)
        how = split.how if split.exact else f"{split.how}; --model for the model's tokenizer"
    if not ids:
        raise N2GError("the text has no tokens; pass some text to predict on")
    warn_if_index_behind(run_dir)
    try:
        if args.model:
            from .viewer import true_activations

            true = true_activations(model, [r for r in run_neurons(run_dir) if not args.neuron or r["key"] in args.neuron], ids)
        results = fires_on(run_dir, ids, true, neurons=args.neuron, progress=not args.quiet)
    except (sqlite3.Error, OSError) as exc:
        raise N2GError(f"cannot read the search index of {run_dir} ({exc}); run `n2g report {run_dir}` to rebuild it") from None
    shown = [display_token(t) for t in toks]
    threshold = _run_fire_threshold(run_dir)  # a value just below it reads 0.49, never 0.50
    if args.json:
        _print_json({"tokens": toks, "token_ids": [i if 0 <= i < 2**31 else None for i in ids], "tokenizer": how,
                     "unit": "normalised activation", "n_results": len(results),  # the text says "... and N more"
                     "results": results if args.neuron else results[:args.limit]})
        return 0
    print(visible(f"{len(ids)} tokens, split by {how}"))  # how: the model name a run's tokenizer.json gives
    if any(e["sign"] == "negative" for e in results[:None if args.neuron else args.limit]):
        print("values are normalised activations; a .neg side's is the activation ÷ its most negative value "
              "(1 = its strongest, where the model's value is lowest)")
    if args.neuron:
        for e in results:
            f1 = "-" if e["f1"] is None else f"{e['f1']:.2f}"
            said = f"the graph says it fires on {len(e['fires'])} of {len(ids)} tokens"
            if true is not None:
                said += f"; it truly fires on {len(e['true_fires'])}" if e.get("true") is not None else "; no true activation (a dead neuron)"
            print(f"\n{display_token(e['key'])} (N2G F1 {f1}): {said}")
            print(f"  {'token':<24}{'predicted':>10}" + (f"{'true':>8}" if true is not None else ""))
            for i, tok in enumerate(shown):
                line = f"  {tok[:23]:<24}{shown_fixed(e['predicted'][i], threshold):>10}"
                if true is not None:
                    v = (e.get("true") or [None] * len(ids))[i]
                    line += f"{'-' if v is None else shown_fixed(v, threshold):>8}"  # as truly firing says
                print(line)
        return 0
    if not results:
        print("no neuron's graph predicts firing on this text" + (", and none truly fires" if true is not None else ""),
              file=sys.stderr)
        return 1
    print(f"{'neuron':<16}{'N2G F1':>7}{'predicted':>10}" + (f"{'true':>7}" if true is not None else "")
          + "  where the graph says it fires" + (" (true: where it fires)" if true is not None else ""))
    for e in results[:args.limit]:
        f1 = "  -" if e["f1"] is None else f"{e['f1']:.2f}"
        where = ", ".join(f"{shown[i][:20]} {shown_fixed(e['predicted'][i], threshold)}" for i in e["fires"][:6])
        where += f" and {len(e['fires']) - 6} more" if len(e["fires"]) > 6 else ""
        line = f"{display_token(e['key'])[:40]:<16}{f1:>7}{shown_fixed(e['predicted_max'], threshold):>10}"
        if true is not None:
            line += f"{'-' if e.get('true_max') is None else shown_fixed(e['true_max'], threshold):>7}"
            if not e["fires"]:
                where = "(none; true: " + ", ".join(shown[i][:20] for i in e["true_fires"][:6]) + ")"
        print(f"{line}  {where}")
    if len(results) > args.limit:
        print(f"... and {len(results) - args.limit} more (--limit)")
    return 0


def _number(text: str, flag: str) -> float:
    import math

    try:
        value = float(text)
    except (TypeError, ValueError):
        raise N2GError(f"{flag} must be a number (got {text!r})") from None
    if not math.isfinite(value):
        raise N2GError(f"{flag} must be a finite number (got {text!r})")
    return value


def _steer(args) -> int:
    import math

    import torch

    from .models import load_model
    from .steer import attribution, check_prompt, check_tokens, steer

    scale = _number(args.scale, "--scale")
    peak = _number(args.max_activation, "--max") if args.max_activation is not None else None
    if peak is not None and args.sign == "negative" and peak > 0:
        raise N2GError(f"with --sign negative, --max is the neuron's most negative activation, below 0 (got {peak:g}); "
                       f"give --max {-peak:g}")
    if args.tokens < 0:
        raise N2GError(f"--tokens must be 0 or more (got {args.tokens})")
    check_tokens(args.tokens)  # before the model is loaded
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.sae:
        from .sae import load_sae

        model = load_sae(args.sae, model)
    model.check_neuron(args.layer, args.neuron)
    ids = model.encode(args.prompt)
    check_prompt(model, ids, args.tokens)
    target = None
    if args.target is not None:
        found = model.encode(args.target)
        if len(found) != 1:
            raise N2GError(f"--target {args.target!r} is {len(found)} tokens for this model; give text that is one token")
        target = found[0]
    source = "--max"
    if peak is None:
        from .corpus import Corpus
        from .engine import device_budget
        from .models import cache_dir, check_excerpt_length
        from .records import Sign
        from .scan import scan_layers

        check_excerpt_length(model, args.excerpt_length)
        corpus = Corpus.build(args.corpus, model.encode, length=args.excerpt_length, max_excerpts=args.max_excerpts,
                              text_field=args.text_field)
        _, scan_batch = device_budget(model, args.excerpt_length)  # fewer excerpts at a time for a wide SAE
        scan = scan_layers(model, corpus.excerpts, [args.layer], batch_size=scan_batch, cache_dir=cache_dir(),
                           corpus_key=corpus.tokens_key(), progress=not args.quiet)[args.layer]
        peak = scan.scale(args.neuron, Sign(args.sign))
        peak = -peak if args.sign == "negative" else peak  # raw, as the model computes it: that side's extreme is below 0
        source = f"scan of {corpus.excerpts.shape[0]} excerpts"
    value = scale * peak
    limit = torch.finfo(model.dtype).max if model.dtype.is_floating_point else float("inf")
    if not math.isfinite(value) or abs(value) > limit:
        raise N2GError(f"--scale {scale:g} x maximum {peak:g} = {value:g} is beyond this model's {model.dtype} range; "
                       "give a smaller --scale or --max")
    result = steer(model, args.layer, args.neuron, ids, value, n_tokens=args.tokens)
    if target is None:
        from .steer import _next_probs

        target = int(_next_probs(model, ids, args.layer, args.neuron, None).argmax())
    attr = attribution(model, args.layer, args.neuron, ids, target)
    tokens = model.token_strings(ids)
    target_text = model.token_strings([target])[0]
    if args.json:
        _print_json({"neuron": f"L{args.layer}.N{args.neuron}", "sign": args.sign, "max_activation": peak, "max_from": source,
                     "scale": scale, **result.to_dict(), "attribution": {"target": target_text,
                     "per_token": [[t, float(v)] for t, v in zip(tokens, attr)], "total": float(attr.sum())}})
        return 0
    extreme = "most negative activation" if args.sign == "negative" else "maximum activation"
    unit = "latent" if args.sae else "neuron"  # an SAE's latent has a decoder direction, no output weights
    name = f"latent L{args.layer}.N{args.neuron} of the SAE at {model.hook_name}" if args.sae else f"neuron L{args.layer}.N{args.neuron}"
    print(f"{name}: {extreme} {peak:.4g} ({source}); clamped to "
          f"{scale:g} x {'that' if args.sign == 'negative' else 'max'} = {result.value:.4g} at every position")
    print(f"next-token KL(clean || clamped) {result.kl:.4f} nats; {result.promoted_overlap} of the top "
          f"{len(result.gainers)} gainers are among the {unit}'s 50 most "
          + ("promoted output tokens" if result.value >= 0 else "suppressed output tokens (a clamp below 0 promotes them)"))
    print("top gainers (probability before -> after):")
    for t, a, b in result.gainers:
        print(f"  {t!r:>20}  {a:.4f} -> {b:.4f}")
    print("top losers:")
    for t, a, b in result.losers:
        print(f"  {t!r:>20}  {a:.4f} -> {b:.4f}")
    print(f"continuation, clean:   {args.prompt}{result.before!r}")
    print(f"continuation, clamped: {args.prompt}{result.after!r}")
    print(f"attribution to {target_text!r} as the next token (d p / d activation x activation), per prompt token:")
    print("  " + "  ".join(f"{t!r}:{v:+.2e}" for t, v in zip(tokens, attr)) + f"  (total {attr.sum():+.3e})")
    return 0


def _info(args) -> int:
    from .models import load_model

    info = load_model(args.model, device=args.device, dtype=args.dtype).info()
    if args.json:
        _print_json(info)
        return 0
    width = max(len(k) for k in info)
    for key, value in info.items():  # the BOS token is text of the model folder, which may not be the user's own
        print(f"{key:<{width}}  {visible(str(value))}")
    return 0


def _copy_run(src: Path, dst: Path) -> Path:
    """Copy a run (without its report outputs) to ``dst``, all or nothing; returns ``dst``."""
    import shutil
    import tempfile

    from .fileio import remove_dead_copies, writer_tag

    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        made = f" (if it is the copy an interrupted `n2g report --out` made, `n2g report {dst}` finishes its report)" \
            if (dst / "run.json").exists() else ""
        raise N2GError(f"--out {dst} already exists; name a new or empty directory for the copy{made}")
    try:
        inside = dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve())
    except RuntimeError:  # Python 3.11's pathlib: "Symlink loop from ..."
        raise N2GError(f"--out {dst} is a link that leads back to itself; remove it, or choose another --out") from None
    if inside:
        raise N2GError(f"--out {dst} is inside the run {src}; name a directory elsewhere")
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_copies(dst)  # what an earlier copy killed half-way left
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.{writer_tag()}.", dir=dst.parent))
        skip = shutil.ignore_patterns(".*.tmp", "index.sqlite", "report.html", "report.json", "report.csv", "viewer")
        shutil.copytree(src, tmp / "run", symlinks=True, ignore=skip,  # links are copied as links, never followed
                        copy_function=_copy_regular)
        os.replace(tmp / "run", dst)
    except shutil.Error as exc:  # files of the run that could not be copied: (source, copy, why) each
        failed = exc.args[0] if exc.args and isinstance(exc.args[0], list) and exc.args[0] else None
        if failed is None:
            raise N2GError(f"cannot copy the run to {dst} ({exc}); choose a writable --out with enough space") from None
        first, why = failed[0][0], str(failed[0][2])
        more = f" and {len(failed) - 1} more file(s)" if len(failed) > 1 else ""
        if "Permission denied" in why or "Operation not permitted" in why:
            raise N2GError(f"cannot read {first}{more} of the run (permission denied), so it cannot be copied to "
                           f"{dst}; make the run readable") from None
        raise N2GError(f"cannot copy {first}{more} to {dst} ({why}); choose a writable --out with enough space") from None
    except OSError as exc:
        raise N2GError(f"cannot copy the run to {dst} ({exc}); choose a writable --out with enough space") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _copy_regular(src: str, dst: str) -> str:
    """``shutil.copy2`` of a regular file of the run; anything else is refused in one line: a device such as
    /dev/zero would be read until the copy fills the disk, a pipe would wait for a writer for ever."""
    import shutil
    import stat

    try:
        mode = os.lstat(src).st_mode
    except OSError:
        mode = None  # copy2 says what is wrong with it
    if mode is not None and not stat.S_ISREG(mode):
        raise N2GError(f"{_shown(src)} in the run is not a regular file (a pipe, device or socket), so the run is "
                       "not copied; remove it from the run and try again")
    return shutil.copy2(src, dst)


def _report(args) -> int:
    from .report import build_all

    run_dir = _run_folder(args.run_dir)
    if not args.out:
        paths = build_all(run_dir)
    else:
        run_dir = _copy_run(run_dir, Path(args.out))
        try:
            paths = build_all(run_dir)
        except KeyboardInterrupt:  # the same command again would refuse the copy it made
            raise KeyboardInterrupt(f"the copy {run_dir} is made; `n2g report {run_dir}` finishes its report") from None
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _check_served_model(model, made_with: dict, args, doing: str = "serve it") -> None:
    """N2GError unless ``model`` has the architecture and shape of the model the run was made with (as
    run.json records it): another model's neuron of the same index would be shown as the true activation."""
    from .models import shape_differences

    differ = shape_differences(made_with, model)
    if differ:
        spec = made_with.get("spec")
        raise N2GError(f"{args.run_dir} was made with another model than {args.model} ({'; '.join(differ)}); "
                       f"{doing} with the run's model{f' (--model {spec})' if isinstance(spec, str) else ''} "
                       "or without --model")


def _run_subject(args, made_with: dict, doing: str):
    """``--model`` (with ``--sae`` over it for a run of SAE latents) once it is the run's model: its neurons or
    latents are read as the graphs' true activations. N2GError where the two do not fit together."""
    from .models import load_model

    if not args.model:
        raise N2GError(f"--sae needs --model, the model the SAE reads; give both, or neither to {doing} with the graphs alone")
    sae = made_with.get("sae")
    if sae and not args.sae:  # the model alone would show MLP neurons' activations under the latents' names
        hook = sae.get("hook_name") if isinstance(sae, dict) else sae
        raise N2GError(f"{args.run_dir} holds SAE latents ({hook}); give its SAE with --sae SAE_PATH beside --model, "
                       f"or {doing} without --model (the graphs' predictions)")
    if args.sae and not sae:
        raise N2GError(f"{args.run_dir} holds the model's MLP neurons, not an SAE's latents; {doing} without --sae")
    model = load_model(args.model, device=args.device)
    if args.sae:
        from .sae import load_sae

        model = load_sae(args.sae, model)
        from .records import sae_settings

        theirs = sae_settings(sae) if isinstance(sae, dict) else {}
        ours = sae_settings(model.info()["sae"])
        differ = [f"{k} {theirs[k]!r} there, {ours.get(k)!r} here" for k in theirs if theirs[k] != ours.get(k)]
        if differ:
            raise N2GError(f"{args.run_dir} was made with another SAE than {args.sae} ({'; '.join(differ)}); {doing} "
                           f"with the run's SAE (--sae {sae.get('path')}) or without --model")
    _check_served_model(model, made_with, args, doing)
    return model


def _serve(args) -> int:
    from .viewer import check_port, serve

    port = check_port(args.port)
    _run_folder(args.run_dir)
    model = None
    if args.model or args.sae:
        if not (Path(args.run_dir) / "viewer" / "index.html").exists():  # say so before loading a model
            raise N2GError(f"no viewer in {args.run_dir}; run `n2g report {args.run_dir}` first")
        model = _run_subject(args, _run_made_with(Path(args.run_dir)), "serve it")
    from .search import warn_if_index_behind

    warn_if_index_behind(args.run_dir)  # pages, search and "which neurons fire" would leave those neurons out
    serve(Path(args.run_dir), host=args.host, port=port, model=model)
    return 0


def _stdout_closed_to_devnull() -> None:
    """Where n2g started with its standard output closed (``n2g ... >&-``; Python then has no ``sys.stdout``):
    what it prints is discarded, as on a closed pipe, and descriptor 1 is /dev/null, so that no file n2g opens
    later gets it and receives what a library or a child process writes there."""
    if sys.stdout is not None:
        return
    try:
        try:
            os.fstat(1)
        except OSError:  # closed: the lowest free descriptor, 1, goes to /dev/null
            null = os.open(os.devnull, os.O_WRONLY)
            if null != 1:
                os.dup2(null, 1)
                os.close(null)
            sys.stdout = open(1, "w", closefd=False)
        else:
            sys.stdout = open(os.devnull, "w")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    _stdout_closed_to_devnull()
    try:  # a path whose name is not UTF-8 is printed with its own bytes, as ls does, not a UnicodeEncodeError
        if getattr(sys.stdout, "errors", None) == "strict":
            sys.stdout.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):  # not a TextIOWrapper (a test's capture), or closed
        pass
    try:
        with _interrupts_never_swallowed():
            code = _main(argv)
        if sys.stdout is not None:
            sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of stdout has gone (`n2g ... | head`): stop quietly, as Unix tools do.
        _discard_stdout()
        return 141
    except OSError as exc:
        if not _output_failed(exc):
            raise
        return 2
    except KeyboardInterrupt:  # before a command started (its own handler says how to resume)
        print("n2g: interrupted", file=sys.stderr)
        return 130


_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EIO, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _output_failed(exc: OSError) -> bool:
    """Whether ``exc`` is standard output that cannot be written (``> /dev/full``, a full disk or quota, a file past
    its size limit): then it is said in one line on stderr, and stdout is sent to /dev/null so that the flush at exit
    cannot fail again. A file n2g writes names its path and is the caller's to explain."""
    if isinstance(exc, BrokenPipeError) or exc.filename is not None or exc.errno not in _OUTPUT_ERRNOS:
        return False
    print(f"n2g: error: cannot write the output ({exc.strerror or exc}); free some space, or send the output "
          "elsewhere", file=sys.stderr)
    _discard_stdout()
    return True


def _discard_stdout() -> None:
    """Standard output sent to /dev/null once it cannot be written, so that the flush at exit cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, sys.stdout.fileno())
        finally:
            os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


@contextlib.contextmanager
def _interrupts_never_swallowed():
    """A Ctrl-C that lands while the garbage collector runs a finaliser (a ``__del__`` of a library, say while
    torch and transformers import) is printed by Python as "Exception ignored ... KeyboardInterrupt" with a
    traceback, and lost: the command went on and exited 0. Such an interrupt is delivered again a moment
    later, outside the finaliser, where the command's own handler stops it in one line."""
    import _thread
    import threading

    previous, timers = sys.unraisablehook, []

    def hook(info):
        if (isinstance(info.exc_type, type) and issubclass(info.exc_type, KeyboardInterrupt)
                and threading.current_thread() is threading.main_thread()):
            timer = threading.Timer(0.01, _thread.interrupt_main)  # not from here: it would land in this hook
            timer.daemon = True
            timers.append(timer)
            timer.start()
            return
        previous(info)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
        for timer in timers:
            timer.cancel()


@contextlib.contextmanager
def _terminate_as_interrupt():
    """While a command runs, SIGTERM (``kill``, a batch system's time limit) stops it the way Ctrl-C
    does: temporary files are removed, finished neurons kept, and one line says how to resume."""
    import signal
    import threading

    def stop(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_NUMBER_OPTIONS = ("--scale", "--max", "--port")
"""Options whose value is a number parsed by n2g itself (argparse's type is str); every other option that
takes one value is found in the parser."""


def _join_negative_numbers(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """``--scale -1e3`` as ``--scale=-1e3``: argparse takes ``-1e3`` (unlike ``-2``) for an option and
    says the option expected one argument, so a negative number after an option that takes a number is
    joined to it."""
    numeric, other = set(_NUMBER_OPTIONS), set()
    for group in [parser] + [choice for action in parser._actions if isinstance(action, argparse._SubParsersAction)
                             for choice in action.choices.values()]:
        for action in group._actions:  # every option that takes one value: a number, or text that looks like one
            longs = [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._StoreAction) and action.nargs is None:
                numeric.update(longs)
            else:
                other.update(longs)
    other -= numeric

    def takes_one(item: str) -> bool:  # the option, or an abbreviation argparse would take for one like it
        if item in numeric:
            return True
        return (item.startswith("--") and len(item) > 2 and "=" not in item and item not in other
                and any(o.startswith(item) for o in numeric) and not any(o.startswith(item) for o in other))
    out: list[str] = []
    i = 0
    while i < len(argv):
        item = argv[i]
        if item == "--":  # everything after it is positional
            return out + argv[i:]
        if i + 1 < len(argv) and argv[i + 1].startswith("-") and _is_number(argv[i + 1]) and takes_one(item):
            out.append(f"{item}={argv[i + 1]}")
            i += 2
            continue
        out.append(item)
        i += 1
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


_EMPTY_HINTS = {
    "model": "--model is empty; pass a .gguf file, a model directory, a hub id, or 'default'",
    "corpus": "--corpus is empty; pass a text, JSONL or Parquet file, a directory, hf:NAME, or 'default'",
    "out": "--out is empty; pass the directory to write, or leave --out out for the default",
    "sae": "--sae is empty; pass the folder of a SAELens SAE, or leave --sae out for MLP neurons",
    "run_dir": "the run directory is empty; pass the folder `n2g run` wrote",
    "device": "--device is empty; pass cpu, cuda or cuda:N, or leave --device out for cuda if available",
}
"""Arguments that an empty value (``--corpus "$UNSET"``) would otherwise turn into the current directory or
the default, silently."""


def _empty_argument(args) -> str | None:
    for name, hint in _EMPTY_HINTS.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and not value.strip():
            return hint
    return None


def _n2g_or_warning(record: logging.LogRecord) -> bool:
    """Whether a log record is shown without -v: n2g's own, and any library's warnings and errors."""
    return record.levelno >= logging.WARNING or record.name == "n2g" or record.name.startswith("n2g.")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(_join_negative_numbers(parser, argv))
    if args.command is None:
        parser.print_help()
        return 2
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", False)
    if quiet and verbose:
        print("n2g: error: -q and -v contradict each other; pass one of them", file=sys.stderr)
        return 2
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_VisibleFormatter("n2g: %(levelname)s %(name)s: %(message)s" if verbose else "n2g: %(message)s"))
    if not verbose:  # a library's info and debug records with -v only (torch's, at exit, when a Ctrl-C stopped its
        handler.addFilter(_n2g_or_warning)  # import before it set its loggers' levels, followed the interrupt's line)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO,
                        handlers=[handler])
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        from .progress import silence_library_bars

        silence_library_bars()
    empty = _empty_argument(args)
    if empty:
        print(f"n2g: error: {empty}", file=sys.stderr)
        return 2
    handlers = {"info": _info, "fit": _run, "run": _run, "report": _report, "serve": _serve, "search": _search, "predict": _predict, "show": _show, "compare": _compare,
                "steer": _steer}
    try:
        with _terminate_as_interrupt():
            return handlers[args.command](args)
    except N2GError as exc:
        print(f"n2g: error: {visible(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if _output_failed(exc):
            return 2
        path = f"the path {_shown(exc.filename)}" if exc.filename is not None else "a path given"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # wherever it is met (a cache, a run's files)
            what = "is on a read-only file system" if exc.errno == errno.EROFS else "cannot be used (permission denied)"
            print(f"n2g: error: {path} {what}; change its permissions or choose another path{_cache_hint(exc.filename)}",
                  file=sys.stderr)
            return 2
        if exc.errno not in (errno.ENAMETOOLONG, errno.ELOOP):
            raise
        what = "too long for this file system" if exc.errno == errno.ENAMETOOLONG else "a loop of links"
        print(f"n2g: error: {path} is {what}; choose another path", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a command may say what to do instead (none of Ctrl-C's own says anything)
        advice = visible(str(exc)) or _INTERRUPTED.get(args.command)
        print(f"n2g: interrupted{'; ' + advice if advice else ''}", file=sys.stderr)
        return 130


_INTERRUPTED = {
    "fit": "finished neurons are saved, re-run the same command to resume",
    "run": "finished neurons are saved, re-run the same command to resume",
    "report": "what was written is whole; re-run the same command to finish the report",
}
"""What the interrupted line adds, by command: those that write a run say how to go on; the others (info, search,
predict, compare, steer, serve) saved nothing to resume (a search index left unbuilt is built by the next one)."""


_TERMINAL_CONTROLS: dict[int, str] = {}


def visible(text: str) -> str:
    """``text`` for the terminal with its control characters shown as ``\\x1b`` (a newline kept) and its
    bidirectional controls as ``\\u202e``: file names, node ids and fields of a run folder someone else made
    reach messages, and must not set the terminal's title, clear its screen or reorder the line."""
    if not _TERMINAL_CONTROLS:
        from .errors import BIDI_CONTROLS

        _TERMINAL_CONTROLS.update({i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA0)) if i != 0x0A})
        _TERMINAL_CONTROLS.update({ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS})
    return text.translate(_TERMINAL_CONTROLS)


class _VisibleFormatter(logging.Formatter):
    """Log lines through :func:`visible`."""

    def format(self, record: logging.LogRecord) -> str:
        return visible(super().format(record))


def _cache_hint(path) -> str:
    """" (n2g's cache: $N2G_CACHE)" where ``path`` lies in n2g's cache, which the user may not know n2g uses."""
    from .models import cache_dir

    try:
        inside_cache = path is not None and Path(os.fsdecode(path)).absolute().is_relative_to(cache_dir().absolute())
    except (OSError, ValueError, N2GError):
        inside_cache = False
    return f" (it is in n2g's cache, {_shown(cache_dir())}; set $N2G_CACHE to move it)" if inside_cache else ""


def _shown(path, limit: int = 120) -> str:
    """A path for a one-line message: its first and last characters where it is long."""
    text = visible(os.fsdecode(path) if isinstance(path, bytes) else str(path))
    return text if len(text) <= limit else f"{text[:limit // 2]}...{text[-limit // 2:]}"


if __name__ == "__main__":
    sys.exit(main())
