"""The validation report of a run: how well each graph predicts its neuron, per layer, vs baselines.

``write_report`` reads every ``neurons/*/result.json`` and writes ``RUN/report.html`` (one
self-contained file from the ``report.html`` jinja2 template, autoescaped: inline CSS, matplotlib
plots as base64 PNG, nothing from the network),
``RUN/report.json`` and ``RUN/report.csv`` with the same numbers. Means are over the neurons of a
layer; firing-class precision/recall/F1 leave out neurons with no firing test token (their F1 is
undefined, never counted as perfect) and every mean skips undefined values (e.g. the precision of
a predictor that never fires); dead neurons are counted but not scored. ``build_all`` is what the
pipeline calls at the end of a run: index, graph renders, viewer and report.
"""

from __future__ import annotations

import base64
import csv
import errno
import io
import json
import logging
import math
import os
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

from n2g.errors import N2GError
from n2g.fileio import MAX_JSON_DEPTH, csv_cell, inside, nested_deeper, read_json, remove_stale_temporaries
from n2g.records import NeuronResult, newer_schema, plural
from n2g.render import DrawingFailed, atomic_write, dot_available, drawn_by_this_version, load_graph_json, render
from n2g.search import _run_fire_threshold, build_index, iter_results, result_paths, scan_results

log = logging.getLogger(__name__)

KIND = "n2g.report"
SCHEMA_VERSION = 1
METHODS = ("n2g", "token_lookup", "ngram", "zero")
METHOD_NAMES = {"n2g": "N2G graph", "token_lookup": "token lookup", "ngram": "3-gram lookup (max)", "zero": "all zero",
                # the other lookups of n2g.baselines.BASELINES, "ngram{N}_{statistic}": the last N tokens, backing off
                **{f"ngram{n}_{stat}": f"{'token' if n == 1 else f'{n}-gram'} lookup ({stat}{' quantile' if stat[0].isdigit() else ''})"
                   for n in (1, 2, 3) for stat in ("mean", "0.75", "max")}}
METRICS = ("precision", "recall", "f1", "nonfiring_precision", "nonfiring_recall", "nonfiring_f1", "pearson")
FIRING_METRICS = ("precision", "recall", "f1")
N_BEST = 10


def _mean(values: list) -> float | None:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(vals) / len(vals) if vals else None


def _no_firing(r: NeuronResult) -> bool:
    s = r.scores.get("n2g")
    return s is not None and (s.f1 is None or s.status == "no_firing_test_token")


def _summary(label, results: list[NeuronResult], methods: list[str]) -> dict:
    fitted = [r for r in results if r.status != "dead" and r.scores]
    firing = [r for r in fitted if not _no_firing(r)]
    row = {
        "layer": label,
        "n_neurons": len(results),
        "n_dead": sum(r.status == "dead" for r in results),
        "n_scored": len(fitted),
        "n_no_firing_test_token": len(fitted) - len(firing),
        "n_in_f1_mean": len(firing),
        "methods": {},
    }
    for m in methods:
        stats = {}
        for metric in METRICS:
            pool = firing if metric in FIRING_METRICS else fitted
            vals = [getattr(r.scores[m], metric) for r in pool if m in r.scores]
            stats[metric] = _mean(vals)
        row["methods"][m] = stats
    row["graph_nodes"] = _mean([r.graph_nodes for r in fitted if r.graph_stats])  # as `n2g run` prints them
    ceilings = [r.ceiling for r in firing if r.ceiling.get("f1") is not None]
    if ceilings:  # the most a predictor keyed on tokens could score (a token never firing in training is out of reach)
        n_firing = sum(c["n_firing"] for c in ceilings)
        row["ceiling"] = {"f1": _mean([c["f1"] for c in ceilings]), "n_neurons": len(ceilings),
                          "unseen_share": (n_firing - sum(c["n_seen"] for c in ceilings)) / n_firing if n_firing else None}
    ablated = [r.ablation for r in fitted if r.ablation]
    if ablated:  # runs with --ablation: how well the graphs stand in for their neurons inside the model
        row["ablation"] = {
            "n_neurons": len(ablated),
            "recovered": _mean([a.get("recovered") for a in ablated]),
            "n_recovered": sum(a.get("recovered") is not None for a in ablated),
            **{f"ce_increase_{v}": _mean([a.get("ce_increase", {}).get(v) for a in ablated]) for v in ("graph", "zero", "mean")},
        }
    return row


def best_lookup(overall: dict, methods: list[str]) -> str | None:
    """The lookup baseline with the highest mean firing F1 over every layer (the report's "best lookup", compared
    with the graph layer by layer); None where no lookup has one."""
    scored = [(overall["methods"][m]["f1"], m) for m in methods
              if m not in ("n2g", "zero") and overall["methods"].get(m, {}).get("f1") is not None]
    return max(scored, key=lambda fm: (fm[0], -methods.index(fm[1])))[1] if scored else None


def neuron_row(r: NeuronResult) -> dict:
    """The per-neuron summary used by the report and the viewer index."""
    n2g = r.scores.get("n2g")
    row = {
        "key": r.neuron.key, "layer": r.neuron.layer, "index": r.neuron.index, "sign": r.neuron.sign.value,
        "status": r.status, "score_status": n2g.status if n2g else None,
        "firing_rate": r.stats.firing_rate, "max_activation": r.stats.max_activation,
    }
    for m in METHODS:
        s = r.scores.get(m)
        row[f"{m}_f1"] = s.f1 if s else None
    row["pearson"] = n2g.pearson if n2g else None
    row["ceiling_f1"] = r.ceiling.get("f1")
    return row


def scan_run(run_dir: str | os.PathLike) -> list[tuple[Path, NeuronResult, bytes]]:
    """``(folder, summary, file hash)`` of every readable result of a run, sorted (see
    :func:`n2g.search.scan_results`); N2GError when there are none."""
    run_dir = Path(run_dir)
    found = scan_results(run_dir) if run_dir.is_dir() else []
    if not found:
        _no_results(run_dir)
    return found


def load_summaries(run_dir: str | os.PathLike) -> list[NeuronResult]:
    """Every neuron result of a run without its examples (:func:`n2g.search.summary_of`), sorted;
    what the report and the index need, small enough to hold for every neuron of a model."""
    return [r for _, r, _ in scan_run(run_dir)]


def load_results(run_dir: str | os.PathLike) -> list[NeuronResult]:
    """All neuron results of a run, whole and sorted; N2GError when there are none."""
    run_dir = Path(run_dir)
    results = [r for _, r in iter_results(run_dir)] if run_dir.is_dir() else []
    if not results:
        _no_results(run_dir)
    return results


def _no_results(run_dir: Path) -> None:
    damaged = len(result_paths(run_dir)) if run_dir.is_dir() else 0
    if damaged:
        raise N2GError(f"none of the {damaged} neuron results in {run_dir} can be read (damaged); re-run the same "
                       "`n2g run` command to redo them")
    raise N2GError(f"no neuron results in {run_dir}; run `n2g run` first")


def read_run_json(run_dir: Path) -> tuple[dict | None, str | None]:
    """``(run.json as a dict, None)``, or ``(None, why it cannot be read)``: damaged, not an object, nested deeper
    than n2g writes (walks of it would run out of stack), or a link that leads out of the run (its fields reach
    pages and the terminal: nothing from outside the run). N2GError where a newer n2g wrote it: what its fields
    say may have changed, so nothing is read from the run."""
    try:
        if not inside(run_dir, run_dir / "run.json"):
            raise ValueError("it is a link that leads out of the run directory")
        d = read_json(run_dir / "run.json")
        problem = None if isinstance(d, dict) else f"it holds a JSON {type(d).__name__}, not an object"
        if problem is None and nested_deeper(d):
            problem = f"it nests lists and objects more than {MAX_JSON_DEPTH} deep, deeper than n2g writes"
        if problem is None and (newer := newer_schema(d)):
            raise N2GError(f"{run_dir} was {newer} to read it")
    except (OSError, ValueError, RecursionError) as exc:
        problem = str(exc)[:200]
    return (None, problem) if problem is not None else (d, None)


def _run_info(run_dir: Path) -> dict:
    """``run.json`` (the run's model, corpus and options); {} with a warning where it is damaged, since the
    neurons' own files still make a report."""
    d, problem = read_run_json(run_dir)
    if problem is not None:
        log.warning("%s cannot be read (%s); the report leaves out the run's model, corpus and options "
                    "(re-running the same `n2g run` command rewrites it)", run_dir / "run.json", problem)
        return {}
    return d


def _fields(record, names: tuple[str, ...]) -> dict:
    """``names`` of a ``run.json`` section, each present (None where the section lacks it, or is not an object)."""
    record = record if isinstance(record, dict) else {}
    return {k: record.get(k) for k in names}


def _control(run_dir: Path) -> dict | None:
    """Per-layer means of the same neurons fitted on a randomly initialised model (``--control random``)."""
    folder = run_dir / "control-random"
    if not (folder / "run.json").exists():
        return None
    if not (inside(run_dir, folder) and inside(run_dir, folder / "run.json")):
        log.warning("not reading %s: it is a link that leads out of the run", folder)
        return None
    try:
        results = load_summaries(folder)
    except N2GError:
        return None
    present = {m for r in results for m in r.scores}
    methods = [m for m in METHODS if m in present]
    layers = sorted({r.neuron.layer for r in results})
    rows = [_summary(layer, [r for r in results if r.neuron.layer == layer], methods) for layer in layers]
    return {"model": _fields(_run_info(folder).get("model"), ("spec",))["spec"], "methods": methods,
            "layers": rows + [_summary("all", results, methods)]}


def compute_report(run_dir: str | os.PathLike) -> dict:
    """The report's numbers as a JSON-ready dict (what ``report.json`` holds)."""
    run_dir = Path(run_dir)
    info = _run_info(run_dir)  # first: a run a newer n2g wrote is refused before its results are read
    results = load_summaries(run_dir)
    present = {m for r in results for m in r.scores}
    methods = [m for m in METHODS if m in present] + sorted(present - set(METHODS))
    layers = sorted({r.neuron.layer for r in results})
    rows = [_summary(layer, [r for r in results if r.neuron.layer == layer], methods) for layer in layers]
    overall = _summary("all", results, methods)
    neurons = [neuron_row(r) for r in results]
    ranked = sorted((n for n in neurons if n["n2g_f1"] is not None), key=lambda n: (-n["n2g_f1"], n["key"]))
    return {
        "kind": KIND,
        "schema_version": SCHEMA_VERSION,
        "run": {k: info.get(k) for k in ("name", "model", "corpus", "partition", "activation_store") if k in info},
        "methods": methods,
        "metrics": list(METRICS),
        "fire_threshold": _run_fire_threshold(run_dir),  # what the scores were binarised at
        "notes": (
            "Means over neurons. Firing-class precision/recall/F1 exclude neurons with no firing test "
            "token; every mean skips undefined values; dead neurons are not scored."
        ),
        "layers": rows,
        "overall": overall,
        "lookup": best_lookup(overall, methods),
        "control": _control(run_dir),
        "best": [n["key"] for n in ranked[:N_BEST]],
        "worst": [n["key"] for n in ranked[::-1][:N_BEST]],
        "neurons": neurons,
    }


# ---------------------------------------------------------------------------------------------
# plots


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no neuron has a firing held-out token to score", ha="center", va="center",
            transform=ax.transAxes, color="#555555")


def _plots(rep: dict) -> list[tuple[str, str]]:
    """(caption, base64 PNG) for each plot; made on Figure objects so no global backend changes."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    from matplotlib.ticker import MaxNLocator

    plots = []
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    layers = [row["layer"] for row in rep["layers"]]
    palette = [c for i, c in enumerate(colormaps["tab20"].colors) if i not in (6, 7)]  # reds are the graph's
    others = iter(palette * (len(rep["methods"]) // len(palette) + 1))  # one colour per method, however many
    for m in rep["methods"]:
        ys = [row["methods"][m]["f1"] for row in rep["layers"]]
        xs = [x for x, y in zip(layers, ys) if y is not None]
        ys = [y for y in ys if y is not None]
        style = {"color": "#d62728", "linewidth": 2.5, "zorder": 3} if m == "n2g" else {"color": next(others)}
        if ys:
            ax.plot(xs, ys, marker="o", label=METHOD_NAMES.get(m, m), **style)
    ceiling = [(x, row["ceiling"]["f1"]) for x, row in zip(layers, rep["layers"]) if (row.get("ceiling") or {}).get("f1") is not None]
    if ceiling:  # what a token-keyed predictor could reach at most
        ax.plot(*zip(*ceiling), color="black", linestyle="--", marker="_", label="token ceiling (max F1)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(set(layers)) == 1:  # one layer: one tick, not fractions of a layer around it
        ax.set_xticks(layers[:1])
        ax.set_xlim(layers[0] - 1, layers[0] + 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("mean firing F1")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    if ax.lines:  # beside the plot, not over its lines (eleven methods and the ceiling)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.subplots_adjust(right=0.68)
    else:  # every neuron is dead or had no firing held-out token: nothing has an F1
        _no_data(ax)
    plots.append(("Mean firing F1 by layer, per method", _png(fig)))

    f1s = [n["n2g_f1"] for n in rep["neurons"] if n["n2g_f1"] is not None]
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    ax.hist(f1s, bins=20, range=(0, 1), color="#d62728", edgecolor="white")
    if not f1s:
        _no_data(ax)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("per-neuron N2G firing F1")
    ax.set_ylabel("neurons")
    plots.append((f"Distribution of per-neuron N2G F1 ({len(f1s)} {plural(len(f1s), 'neuron')})", _png(fig)))

    pts = [(n["firing_rate"], n["n2g_f1"]) for n in rep["neurons"] if n["n2g_f1"] is not None]
    fig = Figure(figsize=(6, 3.4))
    ax = fig.add_subplot()
    if pts:
        xs = [max(x or 0.0, 1e-6) for x, _ in pts]
        ax.scatter(xs, [y for _, y in pts], s=14, alpha=0.7, color="#1f77b4")
        ax.set_xscale("log")
    else:
        _no_data(ax)
    ax.set_xlabel("firing rate on the corpus (log)")
    ax.set_ylabel("N2G firing F1")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    plots.append(("N2G F1 against firing rate", _png(fig)))
    return plots


# ---------------------------------------------------------------------------------------------
# HTML


def fmt(value, digits: int = 3) -> str:
    """A metric for display: 3 decimals, or an em dash when undefined."""
    if value is None or isinstance(value, (str, bytes)):
        return "—"
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):  # not a number (a damaged file), or an int too large
        return "—"
    return f"{v:.{digits}f}" if math.isfinite(v) else "—"


def f1_text(f1, status) -> str:
    """F1 for display; None with status no_firing_test_token reads as words, never a number."""
    if f1 is None and status == "no_firing_test_token":
        return "no firing test token"
    return fmt(f1)


def neuron_href(key: str, prefix: str = "viewer/neurons/") -> str:
    return prefix + quote(key, safe="") + ".html"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
 color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.5em;margin-bottom:4px}h2{font-size:1.2em;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right}th{background:#f4f4f4}
td.l,th.l{text-align:left}tr.all td{font-weight:bold;background:#fafafa}
.muted{color:#666;font-size:13px}.plots{display:flex;flex-wrap:wrap;gap:16px}
.plots figure{margin:0;max-width:100%}.plots img{max-width:min(560px,100%);border:1px solid #eee}
figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:1px 4px}
.wide{overflow-x:auto;max-width:100%}th.group{text-align:left}#layer-table td{white-space:nowrap}.next{background:#f6f7fb;padding:8px 12px;border-left:4px solid #1f77b4}
"""


GROUPS = (("firing F1", "f1"), ("firing precision", "precision"), ("firing recall", "recall"),
          ("non-firing precision", "nonfiring_precision"), ("non-firing recall", "nonfiring_recall"),
          ("non-firing F1", "nonfiring_f1"), ("Pearson r", "pearson"))


def report_html(rep: dict, plots: list[tuple[str, str]]) -> str:
    """The report page, from the ``report.html`` jinja2 template (autoescaped)."""
    from n2g.pages import Markup, render_page

    run = rep.get("run", {})
    return render_page(
        "report.html", css=Markup(CSS), rep=rep, title=f"n2g validation report: {run.get('name') or 'run'}",
        model=_fields(run.get("model"), ("spec", "architecture")), corpus=_fields(run.get("corpus"), ("source",)),
        part=_fields(run.get("partition"), ("training_excerpts", "held_out_excerpts")) if run.get("partition") else {},
        run_name=run.get("name") or "RUN", o=rep["overall"], rows=rep["layers"] + [rep["overall"]],
        methods=rep["methods"], method_names=METHOD_NAMES, groups=GROUPS, plots=plots,
        by_key={n["key"]: n for n in rep["neurons"]}, href=neuron_href,
        has_ceiling=any(row.get("ceiling") for row in rep["layers"] + [rep["overall"]]),
        negative=any(n["sign"] == "negative" for n in rep["neurons"]),
        sae=isinstance(run.get("model"), dict) and bool(run["model"].get("sae")),
    )


def _csv(rep: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", "method", "n_neurons", "n_dead", "n_no_firing_test_token", "n_in_f1_mean", *METRICS,
                "ceiling_f1", "ceiling_unseen_share"])
    for row in rep["layers"] + [rep["overall"]]:
        ceiling = row.get("ceiling") or {}  # the layer's token ceiling, the same on each of its method rows
        tail = ["" if ceiling.get(k) is None else repr(float(ceiling[k])) for k in ("f1", "unseen_share")]
        for m in rep["methods"]:
            stats = row["methods"][m]
            w.writerow([csv_cell(row["layer"]), csv_cell(m), row["n_neurons"], row["n_dead"], row["n_no_firing_test_token"],
                        row["n_in_f1_mean"], *("" if stats[k] is None else repr(float(stats[k])) for k in METRICS), *tail])
    return buf.getvalue()


def _finite(value):
    """``value`` with every non-finite float (a mean of huge values that overflowed) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write ``report.html``, ``report.json`` and ``report.csv`` into the run; returns the HTML path."""
    run_dir = Path(run_dir)
    rep = _finite(compute_report(run_dir))
    atomic_write(run_dir / "report.json", (json.dumps(rep, indent=1, allow_nan=False) + "\n").encode("utf-8"))
    atomic_write(run_dir / "report.csv", _csv(rep).encode("utf-8"))
    out = run_dir / "report.html"
    atomic_write(out, report_html(rep, _plots(rep)).encode("utf-8"))
    log.info("wrote %s", out)
    return out


# ---------------------------------------------------------------------------------------------
# everything at the end of a run


def render_missing_graphs(run_dir: str | os.PathLike) -> list[Path]:
    """Render ``neurons/<key>/graph.{dot,svg,png}`` wherever they are missing, older than graph.json, or drawn by an
    older n2g (:data:`n2g.render.DRAWING_VERSION`)."""
    run_dir = Path(run_dir)
    want = ("dot", "svg", "png") if dot_available() else ("dot",)
    jobs = []
    root = run_dir.resolve()
    for gpath in sorted(run_dir.glob("neurons/*/graph.json")):
        if not gpath.parent.resolve().is_relative_to(root):  # a linked folder: never write outside the run
            log.warning("not rendering %s: its folder is a link that leads out of the run", gpath)
            continue
        if not gpath.resolve().is_relative_to(root):  # a linked graph.json: never draw a graph from outside the run
            log.warning("not rendering %s: it is a link that leads out of the run", gpath)
            continue
        made = gpath.stat().st_mtime
        outs = [gpath.parent / f"graph.{f}" for f in want]
        # missing, older than a graph that was refitted since, or drawn by an older n2g
        if any(not p.exists() or p.stat().st_mtime < made for p in outs) or not drawn_by_this_version(outs[0]):
            jobs.append(gpath)

    def one(gpath: Path) -> list[Path]:
        try:
            G = load_graph_json(gpath, check=True)
        except N2GError as e:
            log.warning("cannot render %s: %s", gpath, e)
            return []
        try:
            return render(G, gpath.parent / "graph", formats=want, title=gpath.parent.name)
        except DrawingFailed as e:  # this graph only: the report goes on without its drawing
            log.warning("cannot draw %s: %s", gpath, e)
            return []

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        return [p for paths in pool.map(one, jobs) for p in paths]


def write_error(run_dir: Path, exc: BaseException) -> N2GError:
    """The user-facing message for a failed write of a run's outputs (disk full, read-only, ...)."""
    where = getattr(exc, "filename", None) or run_dir
    full = (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)) or (
        isinstance(exc, sqlite3.Error) and "full" in str(exc).lower())
    if full:
        return N2GError(f"disk full while writing {where}; free some space and run `n2g report {run_dir}` again")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return N2GError(f"cannot write the report into {run_dir} ({exc.strerror}); write it into a copy "
                        f"of the run with `n2g report {run_dir} --out COPY`")
    if isinstance(exc, OSError) and exc.errno == errno.EISDIR and getattr(exc, "filename2", None):
        # os.replace(temporary, output) onto a folder: name the folder, not the temporary that is already gone
        return N2GError(f"{exc.filename2} is a directory where the report writes a file; remove it, then run "
                        f"`n2g report {run_dir}` again")
    detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return N2GError(f"cannot write {where} ({detail}); check the disk and permissions, then run "
                    f"`n2g report {run_dir}` again")


def build_all(run_dir: str | os.PathLike) -> dict[str, Path]:
    """Index, missing graph renders, viewer pages and report for a run; the paths written by kind.

    Temporaries left by a killed earlier run are removed first; a failed write (disk full,
    read-only directory) becomes an :class:`N2GError` and leaves no partial file behind.
    """
    from n2g.viewer import write_viewer

    run_dir = Path(run_dir)
    read_run_json(run_dir)  # a run a newer n2g wrote is refused before anything is read or written
    scan_run(run_dir)  # fail early, with the user-facing message, on an empty run (each result is checked once)
    remove_stale_temporaries(run_dir)
    try:
        index = build_index(run_dir)
        render_missing_graphs(run_dir)
        viewer = write_viewer(run_dir)
        report = write_report(run_dir)
    except (OSError, sqlite3.Error) as exc:
        raise write_error(run_dir, exc) from None
    return {
        "index": index,
        "viewer": viewer,
        "report": report,
        "report_json": run_dir / "report.json",
        "report_csv": run_dir / "report.csv",
    }
