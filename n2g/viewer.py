"""Static viewer pages for a run, and a small local server that adds search and try-your-own-text.

``write_viewer`` writes ``RUN/viewer/index.html`` (neurons by layer, sortable, filterable, with a
token search box) and one page per neuron under ``RUN/viewer/neurons/<key>.html``: a summary
paragraph written from the graph, the held-out excerpts coloured by true activation and by the
graph's prediction side by side, the rendered graph and every path, a try-your-own-text box, scores
against the baselines, the activation histogram, examples from activation bands, output tokens and
similar neurons. Links are relative, so the pages open from disk; ``serve`` adds ``/api/search``,
``/api/similar`` and ``/api/predict`` (the graph's prediction on typed text, and the neuron's true
activation when started with a model) and serves the run's pages and graphs: regular files of the
types the pages link to, resolved inside the run directory (no symlink leads out, no listing, no
dot files or temporaries), with a Content-Security-Policy header that allows no script but each
page's own fixed one (a viewer page another version or anyone else wrote is rendered again from
the run's records, never trusted to name its own script); bound to loopback, it answers only requests addressed to this machine (a
page elsewhere cannot reach it by rebinding its own name to 127.0.0.1), and its API only its own pages (a page
of another site cannot make it run the model or rebuild the index, nor embed the run's files). A run's ``graph.svg`` is
inlined only as rebuilt from the elements Graphviz draws with (:func:`safe_svg`), and nothing is
written through a link that leads out of the run. Pages come from jinja2 templates with autoescaping (:mod:`n2g.pages`), so
corpus text is escaped wherever it lands; scripts are fixed text, allowed by a per-page CSP nonce
(and by hash when served), and read data from the DOM or the API, never from strings spliced
into code.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import socket
import sqlite3
import stat
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from markupsafe import Markup, escape

from n2g.errors import N2GError
from n2g.fileio import inside as _inside, read_bytes, read_json
from n2g.graph import shown_fixed
from n2g.records import Example, NeuronResult, Sign, check_folder, plural
from n2g.render import BIDI_CONTROLS, atomic_write, display_token, dot_available, load_graph_json, svg_of, to_dot
from n2g.report import METHOD_NAMES, METHODS, f1_text, fmt, neuron_row
from n2g import tokenizer
from n2g.search import INDEX_NAME, _run_fire_threshold, build_index, search, similar

log = logging.getLogger(__name__)


def page_name(key: str) -> str:
    """File name of a neuron's page (keys are ``L5.N123[.neg]``; quoted anyway)."""
    return quote(key, safe="") + ".html"


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:20px auto;max-width:1300px;
 color:#222;padding:0 16px;line-height:1.4}
h1{font-size:1.4em;margin:4px 0}h2{font-size:1.15em;margin-top:24px;border-bottom:1px solid #ddd}
nav a{margin-right:12px}.muted{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #ddd;padding:3px 7px;text-align:right;vertical-align:top}th{background:#f4f4f4}
td.l,th.l{text-align:left}th[data-sort]{cursor:pointer;user-select:none}th[data-sort]:hover{background:#e8e8e8}
th.asc::after{content:" \\25B2"}th[data-sort]:focus-visible{outline:2px solid #1f77b4;outline-offset:-2px}th.desc::after{content:" \\25BC"}
.graph{overflow:auto;border:1px solid #eee;padding:6px;max-height:80vh}.graph svg{max-width:100%;height:auto}
pre.dot{font-size:12px;background:#f8f8f8;padding:8px;overflow:auto}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:break-spaces;word-break:break-all;
 line-height:1.7}
.ex span{border-radius:2px}.ex span.fire{outline:1px solid #555}
table.excerpts td{text-align:left;width:46%}table.excerpts td.meta{width:8%;color:#666;font-size:12px}
.cols{display:flex;flex-wrap:wrap;gap:24px}.tok{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:pre}
#search-msg{color:#666;font-size:13px}#search-msg.error{color:#a33}form{margin:8px 0}input,select,button{font-size:14px}
.summary{font-size:15px;background:#f6f7fb;padding:10px 14px;border-left:4px solid #d62728;max-width:1100px}
code.tok,td.tok{font-family:ui-monospace,Menlo,Consolas,monospace;background:#eef;padding:0 3px;white-space:pre}
.headline{font-size:15px;margin:6px 0}.headline a{font-size:13px;margin-left:6px}
.summary code.tok{white-space:break-spaces;overflow-wrap:anywhere}
.wide{overflow-x:auto;max-width:100%}#neurons td{white-space:nowrap}.cols>div{max-width:100%;overflow-x:auto}#histogram svg{max-width:100%;height:auto}
details summary{cursor:pointer;font-size:14px;margin:6px 0}
.scroll{max-height:60vh;overflow:auto;display:inline-block;max-width:100%}.scroll table{margin:0}
.scroll thead th{position:sticky;top:0;box-shadow:0 1px 0 #ddd}
#try-out .try-row{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;white-space:break-spaces;margin:4px 0;line-height:1.7}
#try-out span.fire{outline:1px solid #555}textarea{font-size:14px;max-width:100%}h3{font-size:1em;margin:14px 0 4px}
"""

# ---------------------------------------------------------------------------------------------
# neuron pages


_SHOWN_CONTROLS = {**{i: 0x2400 + i for i in range(0x20)}, 0x7F: 0x2421, ord("\r"): "␍", ord("\t"): "→   ",
                   ord("\n"): "↵\n", **{ord(c): f"\\u{ord(c):04x}" for c in BIDI_CONTROLS}}
"""How :func:`_tok_text` shows what would otherwise be invisible or reorder the excerpt: control
characters as their control pictures (NUL as ␀), bidirectional controls as ``\\u202e``."""


def _tok_text(token: str | None, token_id: int) -> str:
    """Excerpt text of a token: the raw string (spaces kept), newline shown as ↵ then a break, other
    control characters and bidirectional controls made visible (:data:`_SHOWN_CONTROLS`)."""
    if token is None:
        return f"[{token_id}]"
    return token.translate(_SHOWN_CONTROLS)


def _bg(v: float | None) -> str:
    if v is None or v != v:
        return "transparent"
    a = min(1.0, abs(float(v)))
    return f"rgba(214,39,40,{a:.3f})" if v >= 0 else f"rgba(31,119,180,{a:.3f})"


def _fg(v: float | None) -> str:
    """The text colour a token cell of value ``v`` needs (empty: the page's own, #222, which reads at 4.5 to 1 or
    more on backgrounds below 0.5): from 0.5 up, black, or white on the darkest, whichever contrasts more with
    the background laid over white; #222 fell to 3.2 to 1 on a token at 1, the neuron's strongest."""
    from n2g.render import _BLUE, _RED, _mix, white_text_on

    if v is None or v != v or abs(v) < 0.5:
        return ""
    fill = _mix(_RED if v >= 0 else _BLUE, round(min(1.0, abs(float(v))), 3))
    return ";color:#fff" if white_text_on(fill) else ";color:#000"


NEURON_JS = (Path(__file__).parent / "templates" / "neuron.js").read_text(encoding="utf-8")
"""The neuron page's one script (try your own text): fixed text, allowed by hash and by the page's nonce."""


_TOKEN_PARTS: dict = {}
"""Per token (its text, or its id when it has none): the escaped title text and the escaped cell text."""
_VALUE_PARTS: dict = {}
"""Per activation value: the cell's style (background, and text colour where it needs one) and the value as
the title shows it."""
_CACHE_LIMIT = 1 << 18


def _token_parts(tok: str | None, tid: int) -> tuple[str, str]:
    key = tok if tok is not None else int(tid)
    parts = _TOKEN_PARTS.get(key)
    if parts is None:
        if len(_TOKEN_PARTS) >= _CACHE_LIMIT:
            _TOKEN_PARTS.clear()
        shown = display_token(tok, tid) if tok is not None else str(tid)
        parts = _TOKEN_PARTS[key] = (str(escape(shown)), str(escape(_tok_text(tok, tid))))
    return parts


def _value_parts(v: float | None) -> tuple[str, str]:
    # -0.0 equals 0.0 as a key but prints as "-0.000": zeros are keyed with their sign
    key = v if v else (v, math.copysign(1.0, v)) if v is not None and v == v else None
    parts = _VALUE_PARTS.get(key) if key is not None else None
    if parts is None:
        parts = (_bg(v) + _fg(v), fmt(v))
        if key is not None:
            if len(_VALUE_PARTS) >= _CACHE_LIMIT:
                _VALUE_PARTS.clear()
            _VALUE_PARTS[key] = parts
    return parts


def _token_cells(ex: Example, values: list[float] | None, what: str, threshold: float) -> Markup | None:
    """One excerpt's tokens as coloured ``<span>`` cells (built here, not by a template macro per
    token: a page holds thousands of them). Every text and title is escaped: token texts once per
    token (cached), numbers need none (digits, sign, point or an em dash)."""
    if values is None:
        return None
    tokens = ex.tokens if ex.tokens is not None else ()
    n_tok, n_val = len(tokens), len(values)
    what = str(escape(what))
    out = []
    for i, tid in enumerate(ex.token_ids):
        shown, text = _token_parts(tokens[i] if i < n_tok else None, tid)
        v = values[i] if i < n_val else None
        bg, num = _value_parts(v)
        if v is not None and abs(v - threshold) < 5e-4:  # three decimals could round it across the threshold
            num = shown_fixed(v, threshold, 3)
        fire = ' class="fire"' if v is not None and v >= threshold else ""
        out.append(f'<span{fire} style="background:{bg}" title="{shown}  {what} {num}">{text}</span>')
    return Markup("".join(out))


def _peak(e: Example) -> float | None:
    """An excerpt's largest true activation; a value saved as null (it was not finite) does not count."""
    return max((v for v in e.activations if v is not None), default=None)


def _excerpt_section(exs: list[Example], section_id: str, what: str, threshold: float, max_raw: float) -> dict:
    rows = []
    for e in exs:
        peak = _peak(e)
        rows.append({"source": e.source, "excerpt": e.excerpt_index, "max": peak,
                     "max_raw": None if peak is None else peak * max_raw,
                     "true": _token_cells(e, e.activations, "true", threshold),
                     "pred": _token_cells(e, e.predicted, "predicted", threshold)})
    return {"id": section_id, "what": what, "rows": rows}


_SVG_NS = "{http://www.w3.org/2000/svg}"
_XLINK_TITLE = "{http://www.w3.org/1999/xlink}title"
_XML_SPACE = "{http://www.w3.org/XML/1998/namespace}space"
_SVG_TAGS = frozenset({"svg", "g", "title", "desc", "polygon", "polyline", "path", "ellipse", "circle", "rect", "line",
                       "text", "tspan", "a", "defs", "linearGradient", "radialGradient", "stop"})
"""The SVG elements Graphviz draws a graph with; anything else in a ``graph.svg`` (a script, an
image, ``foreignObject``, animation) is dropped with everything inside it before the SVG is inlined."""
_SVG_ATTRS = frozenset({
    "class", "width", "height", "viewBox", "transform", "points", "d", "x", "y", "dx", "dy", "cx", "cy", "r", "rx",
    "ry", "x1", "y1", "x2", "y2", "fill", "fill-opacity", "stroke", "stroke-width", "stroke-dasharray",
    "stroke-opacity", "stroke-linecap", "stroke-linejoin", "opacity", "font-family", "font-size", "font-weight",
    "font-style", "font-variant", "text-anchor", "text-decoration", "baseline-shift", "dominant-baseline", "offset",
    "stop-color", "stop-opacity", "gradientUnits", "gradientTransform", "preserveAspectRatio"})
"""Presentation attributes kept on those elements (no event handler, link, style or script)."""
_SVG_ID = re.compile(r"(?:graph|node|edge|clust|a_graph|a_node|a_edge|a_clust|[lr]_)[0-9]{1,9}")
_SVG_URL = re.compile(r"url\(\s*#[A-Za-z0-9_.:-]+\s*\)")
MAX_SVG_BYTES = 16 << 20
"""A ``graph.svg`` larger than this is not inlined (the page draws the graph from graph.json instead)."""


def safe_svg(text: str, strict: bool = False) -> str | None:
    """A Graphviz SVG rebuilt from what Graphviz draws with, fit to inline in a page; None if it is not one.

    The file comes from the run directory, which may not be the user's own: its elements and
    attributes are filtered to :data:`_SVG_TAGS` and :data:`_SVG_ATTRS` (ids only in Graphviz's own
    form, ``url()`` only to a fragment of the same SVG), and every text and value is escaped again.
    ``strict``: None unless the file itself holds nothing the filter would drop (no other element or
    attribute, no processing instruction but the XML declaration, no entity), so it is safe to open
    as it is, straight from disk.
    """
    svg, clean = _rebuild_svg(text)
    return None if strict and not clean else svg


def _rebuild_svg(text: str) -> tuple[str | None, bool]:
    """(:func:`safe_svg` of ``text``, whether the filter dropped nothing from it), parsed once."""
    import xml.etree.ElementTree as ET

    start = text.find("<svg")
    if start < 0:
        return None, False
    try:
        root = ET.fromstring(text[start:])
    except (ET.ParseError, ValueError, RecursionError):
        return None, False
    if root.tag != _SVG_NS + "svg":
        return None, False
    out: list[str] = []

    def attr(name: str, value: str) -> str | None:
        if "\\" in value or "url(" in re.sub(r"\s+", "", _SVG_URL.sub("", value)).lower():
            return None  # a reference out of the SVG (an external resource), or a CSS escape that could spell one
        if name == "id":
            return "id" if _SVG_ID.fullmatch(value) else None  # no id of the page's own elements
        if name == _XLINK_TITLE:
            return "xlink:title"
        if name == _XML_SPACE:
            return "xml:space"
        return name if name in _SVG_ATTRS else None

    def walk(el, depth: int) -> None:
        tag = el.tag if isinstance(el.tag, str) else ""
        name = tag[len(_SVG_NS):] if tag.startswith(_SVG_NS) else ""
        if name in _SVG_TAGS and depth <= 64:
            parts = [name]
            if depth == 0:
                parts.append('xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink"')
            for k, v in el.attrib.items():
                shown = attr(k, v)
                if shown is not None:
                    parts.append(f'{shown}="{escape(v)}"')
                else:
                    dropped.append(k)
            out.append("<" + " ".join(parts) + ">")
            out.append(str(escape(el.text or "")))
            for child in el:
                walk(child, depth + 1)
            out.append(f"</{name}>")
        else:
            dropped.append(tag)
        out.append(str(escape(el.tail or "")) if depth else "")

    dropped: list[str] = []
    walk(root, 0)
    prolog_clean = not re.search(r"<!ENTITY", text, re.I) and "<?" not in re.sub(r"\A\s*<\?xml\s[^>]*\?>", "", text)
    return "".join(out), prolog_clean and not dropped


def _graph_context(run_dir: Path, key: str):
    """(template dict, loaded graph or None) for the graph section of a neuron page."""
    folder = run_dir / "neurons" / key
    gjson = folder / "graph.json"
    out = {"svg": None, "dot": None, "message": "", "links": []}
    if not gjson.exists():
        out["message"] = "no graph (dead neurons have none)"
        return out, None
    rel = "../../neurons/" + quote(key, safe="") + "/graph"
    out["links"] = [(f.upper(), f"{rel}.{f}") for f in ("svg", "png", "dot", "json") if (folder / f"graph.{f}").exists()]
    try:
        G = load_graph_json(gjson, run_dir, check=True)
    except N2GError as e:
        out["message"] = f"cannot draw the graph: {e}"
        return out, None
    try:
        svg, clean = None, False
        svg_file = folder / "graph.svg"
        try:
            if _inside(run_dir, svg_file):  # read_bytes takes only a regular file of at most MAX_SVG_BYTES
                svg, clean = _rebuild_svg(read_bytes(svg_file, MAX_SVG_BYTES).decode("utf-8", "replace"))
        except OSError:  # missing, not a regular file, or too large: drawn from graph.json instead
            svg = None
        if not clean:  # a graph.svg holding more than Graphviz draws is shown filtered, never linked:
            out["links"] = [(name, href) for name, href in out["links"] if name != "SVG"]  # opened from disk it could run script
        if svg is None and dot_available():
            svg = svg_of(G, title=key)  # drawn here from the graph's own entity-escaped labels
        if svg:
            out["svg"] = Markup(svg)
        else:
            out["dot"] = to_dot(G, title=key)
    except N2GError as e:
        out["message"] = f"cannot draw the graph: {e}"
    return out, G


def _histogram(h: dict, threshold: float) -> dict | None:
    """Geometry of the activation histogram (density on a log scale) for the page's inline SVG."""
    from n2g.render import is_finite_number

    edges, counts = h.get("edges") or [], h.get("counts") or []
    if not (isinstance(edges, list) and isinstance(counts, list) and len(edges) == len(counts) + 1
            and all(map(is_finite_number, edges)) and all(isinstance(c, int) and c >= 0 for c in counts)):
        return None  # not a histogram n2g wrote (result_problem names such a file)
    edges = [float(e) for e in edges]
    n = sum(counts)
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0
    if not n or not math.isfinite(span) or any(b < a for a, b in zip(edges, edges[1:])):
        return None  # empty, or edges no drawing can hold (overflowing or out of order)
    width, height, left, top, bottom = 640, 200, 52, 8, 30
    plot_w, plot_h = width - left - 10, height - top - bottom
    # a bin's density underflows to 0 when it is tiny against the total: such a bar is not drawn
    dens = [c / n / max(edges[i + 1] - edges[i], 1e-12) for i, c in enumerate(counts)]
    nz = [d for d in dens if d > 0]
    if not nz:
        return None
    dmin, dmax = math.floor(math.log10(min(nz))), math.ceil(math.log10(max(nz)))
    if dmax == dmin:
        dmax += 1
    ypix = lambda d: top + plot_h * (1 - (math.log10(d) - dmin) / (dmax - dmin))
    xpix = lambda v: left + plot_w * (v - lo) / span
    bars = []
    for i, (c, d) in enumerate(zip(counts, dens)):
        if not c or not d > 0:
            continue
        x0, x1, y = xpix(edges[i]), xpix(edges[i + 1]), ypix(d)
        fires = edges[i] >= threshold
        bars.append({"x": round(x0, 2), "w": round(max(x1 - x0 - 1, 1), 2), "y": round(y, 2),
                     "h": round(top + plot_h - y, 2), "fill": "#d62728" if fires else "#9aa7b5",
                     "title": f"{edges[i]:.3f} to {edges[i + 1]:.3f}: {c} tokens (density {d:.3g})"})
    ticks = sorted({round(v, 2) for v in (lo, 0.0, 0.5, 1.0, hi) if lo <= v <= hi})
    return {"width": width, "height": height, "left": left, "top": top, "plot_w": plot_w, "plot_h": plot_h,
            "bars": bars, "fire_x": round(xpix(threshold), 2), "n_tokens": h.get("n_tokens", n), "bins": len(counts),
            "xticks": [{"x": round(xpix(v), 2), "label": f"{v:g}"} for v in ticks],
            "yticks": [{"y": round(ypix(10.0 ** e), 2), "label": f"1e{e}"} for e in range(dmin, dmax + 1)]}


FIRST_EXCERPTS = 4
"""Held-out excerpts shown open at the top of a neuron page (the rest are in a collapsed list)."""


GRAPH_WORDS = {"activator": "activating token", "context": "context node", "wildcard": "wildcard node",
               "end": "path"}
"""How a neuron page's header names each count of ``NeuronGraph.stats()`` (its ``paths`` key counts the
training tokens behind the ENDs, not the paths a reader sees: left out)."""


def graph_line(stats: dict, quiet: int = 0) -> str:
    """``198 activating tokens, 93 context nodes, 1 wildcard node, 291 paths`` from a result's graph_stats;
    ``quiet``: how many of the activating tokens are quiet (graded values, never predicted to fire), said beside them."""
    parts = []
    for key, words in GRAPH_WORDS.items():
        if key in stats:
            n = int(stats[key])
            parts.append(f"{n:,} {plural(n, words)}"
                         + (f" ({quiet:,} of them quiet: never predicted to fire)" if key == "activator" and quiet else ""))
    return ", ".join(parts)


def _run_sae_hook(run_dir: Path) -> str:
    """The hook site of the SAE whose latents the run fitted (``run.json``), or "" for a run of MLP neurons."""
    from n2g.report import read_run_json

    try:
        info, _ = read_run_json(Path(run_dir))  # (damaged, or a link out of the run: None)
    except N2GError:  # a newer n2g's run.json
        info = None
    model = (info or {}).get("model")
    sae = model.get("sae") if isinstance(model, dict) else None
    hook = sae.get("hook_name") if isinstance(sae, dict) else None
    return hook if isinstance(hook, str) else ""


def neuron_page(run_dir: Path, result: NeuronResult, threshold: float | None = None, nonce: str | None = None,
                sae_hook: str | None = None, graph_tokens: dict[str, int] | None = None) -> str:
    """HTML of one neuron's page (relative links: it lives in ``viewer/neurons/``); tokens fire at ``threshold``,
    by default the run's fire threshold (``run.json``); ``sae_hook``: the SAE hook site of a run of SAE latents
    ("" for MLP neurons; by default as ``run.json`` records it), so the page calls the feature a latent;
    ``graph_tokens``: a dict the graph's token texts and ids are added to (:func:`_add_graph_tokens`)."""
    from n2g.explain import summary
    from n2g.profile import band_label
    from n2g.render import is_finite_number
    from n2g.pages import render_page
    from n2g.render import MAX_DRAWN_PATHS, graph_paths, is_quiet, path_text
    from n2g.search import _run_fire_threshold

    if threshold is None:
        threshold = _run_fire_threshold(Path(run_dir))
    if sae_hook is None:
        sae_hook = _run_sae_hook(Path(run_dir))
    n = result.neuron
    key = n.key
    st = result.stats
    # the stats are on the distilled side (a negative neuron's negated); raw values are shown as the model computes
    # them, so a negative neuron's extreme is its most negative activation and normalised = activation / that
    negative = n.sign == Sign.NEGATIVE
    scale = st.max_activation
    max_raw = -scale if negative else scale
    graph, G = _graph_context(run_dir, key)
    if graph_tokens is not None and G is not None:
        _add_graph_tokens(graph_tokens, G)
    paths = graph_paths(G) if G is not None else []
    quantiles = [{"q": q, "raw": None if v is None else (-v if negative else v),
                  "norm": (v / scale if scale > 0 and v is not None else None)}
                 for q, v in sorted(st.quantiles.items(), key=lambda kv: float(kv[0]) if _isnum(kv[0]) else 0.0)]
    methods = [m for m in METHODS if m in result.scores] + sorted(set(result.scores) - set(METHODS))
    scores = [{"name": METHOD_NAMES.get(m, m), "s": result.scores[m], "f1": f1_text(result.scores[m].f1, result.scores[m].status)}
              for m in methods]
    n2g_scores, lookup = result.scores.get("n2g"), result.scores.get("token_lookup")
    headline = None if n2g_scores is None else {  # the graph's scores, above the summary that explains them
        "f1": f1_text(n2g_scores.f1, n2g_scores.status), "pearson": n2g_scores.pearson,
        "lookup": None if lookup is None else lookup.f1}
    try:
        sims = similar(run_dir, key, limit=10)
    except (N2GError, sqlite3.Error):
        sims = []
    # the strongest held-out excerpts first; the rest (and the random ones) one click away
    tests = sorted((e for e in result.examples if e.split == "test"),
                   key=lambda e: (e.source != "top", -(_peak(e) or 0.0)))
    bands = []
    for b in (result.histogram or {}).get("bands", []):
        q_lo, q_hi = b.get("q_lo"), b.get("q_hi")
        if not (is_finite_number(q_lo) and is_finite_number(q_hi)):
            continue  # bands of another n2g version
        exs = [e for e in result.band_examples if e.source == f"band {q_lo:g}-{q_hi:g}"]
        bands.append({"label": band_label(q_lo, q_hi), "lo": b["lo"], "hi": b["hi"], "n": b["n_excerpts"],
                      "section": _excerpt_section(exs, f"band-{q_lo:g}", "excerpt of this band", threshold, max_raw)})
    return render_page(
        "neuron.html", css=Markup(CSS), script=Markup(NEURON_JS), nonce=nonce or secrets.token_urlsafe(16),
        key=key, layer=n.layer, index=n.index, sign=n.sign.value,
        status="dead: it never fires on the scanned corpus" if result.status == "dead" else result.status,
        gstats=graph_line(result.graph_stats, sum(is_quiet(a, threshold) for _, a in G.nodes(data=True)) if G is not None else 0),
        seconds=result.seconds,
        summary=summary(result, G, threshold), headline=headline, threshold=threshold, max_raw=max_raw, negative=negative,
        test=_excerpt_section(tests[:FIRST_EXCERPTS], "test-excerpts", "test excerpts", threshold, max_raw),
        test_more=_excerpt_section(tests[FIRST_EXCERPTS:], "test-excerpts-more", "more test excerpts", threshold, max_raw),
        train=_excerpt_section([e for e in result.examples if e.split == "train"], "train-excerpts", "train excerpts",
                               threshold, max_raw),
        graph=graph, paths=[{**p, "text": path_text(p), "end_text": shown_fixed(p["end"], threshold) if is_finite_number(p["end"]) else None,
                             # END x count as its END reads where the count is 1 (never 0.50 beside 0.49, nor -0.00)
                             "strength_text": shown_fixed(p["strength"], threshold) if is_finite_number(p["strength"]) else None}
               for p in paths], summarised=len(paths) > MAX_DRAWN_PATHS,
        drawn=MAX_DRAWN_PATHS, scores=scores, firing_rate=st.firing_rate, n_sampled=st.n_sampled_tokens,
        hist=_histogram(result.histogram or {}, threshold), quantiles=quantiles, bands=bands,
        promoted=result.promoted, suppressed=result.suppressed, ablation=_fields_of(result.ablation, _ABLATION_FIELDS),
        steering=_fields_of(result.steering, _STEERING_FIELDS),
        similar=[(k, page_name(k), j) for k, j in sims], sae_hook=sae_hook, unit="latent" if sae_hook else "neuron",
    )


_ABLATION_FIELDS = {"n_excerpts": None, "n_tokens": None, "ce_clean": None, "ce_increase": {}, "kl": {},
                    "recovered": None, "status": None}
_STEERING_FIELDS = {"scale": None, "value": None, "kl": None, "promoted_overlap": None, "prompt": "",
                    "gainers": [], "losers": [], "before": "", "after": ""}


def _fields_of(record: dict, fields: dict) -> dict | None:
    """The fields a page shows of a stored ablation or steering record, each present (a record of
    another version, or a damaged one, may lack some: the page shows them as missing)."""
    if not record or not isinstance(record, dict):
        return None
    out = {}
    for k, default in fields.items():
        v = record.get(k, default)
        out[k] = v if v is not None or default is None else default
    return out


def _isnum(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# index page

INDEX_JS = r"""
(function () {
  "use strict";
  var table = document.getElementById("neurons");
  var tbody = table.tBodies[0];
  var heads = table.querySelectorAll("th[data-sort]");
  heads.forEach(function (th, col) {
    th.addEventListener("keydown", function (ev) {  // focusable (tabindex): Enter or Space sorts, as a click does
      if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); th.click(); }
    });
    th.addEventListener("click", function () {
      var desc = !th.classList.contains("desc");
      heads.forEach(function (h) { h.classList.remove("asc", "desc"); h.removeAttribute("aria-sort"); });
      th.classList.add(desc ? "desc" : "asc");
      th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      var num = th.getAttribute("data-sort") === "num";
      var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
      var rows = Array.prototype.slice.call(tbody.rows);
      rows.sort(function (a, b) {
        var x = a.cells[idx].getAttribute("data-v"), y = b.cells[idx].getAttribute("data-v");
        if (num) {
          var fx = x === "" ? NaN : parseFloat(x), fy = y === "" ? NaN : parseFloat(y);
          if (isNaN(fx) && isNaN(fy)) return 0;
          if (isNaN(fx)) return 1;
          if (isNaN(fy)) return -1;
          return desc ? fy - fx : fx - fy;
        }
        return desc ? y.localeCompare(x) : x.localeCompare(y);
      });
      rows.forEach(function (r) { tbody.appendChild(r); });
    });
  });

  var layerSel = document.getElementById("layer");
  var filter = document.getElementById("filter");
  function applyFilter() {
    var layer = layerSel.value, text = filter.value.toLowerCase();
    Array.prototype.forEach.call(tbody.rows, function (r) {
      var ok = (layer === "" || r.getAttribute("data-layer") === layer) &&
               (text === "" || r.textContent.toLowerCase().indexOf(text) >= 0);
      r.hidden = !ok;
    });
  }
  layerSel.addEventListener("change", applyFilter);
  filter.addEventListener("input", applyFilter);

  var form = document.getElementById("search-form");
  var msg = document.getElementById("search-msg");
  var out = document.getElementById("search-results");
  var served = location.protocol === "http:" || location.protocol === "https:";
  if (!served) {
    msg.className = "error";
    msg.textContent = "Token search needs the server: run `n2g serve RUN` and open the address it prints. " +
      "The Browse table's filter box below works offline.";
  }
  function visibleChars(t) { return t.replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/g, function (c) { return "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"); }).replace(/[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, function (c) { return "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"); }); }  // control and bidi characters shown, never obeyed (as the pages and the terminal show them)
  function shown(tok) {  // as the pages show tokens: a space is \u2423, four spaces \u2423x4, a newline \u21b5
    return visibleChars(tok.replace(/^ +| +$/g, function (s) { return s.length > 2 ? "\u2423x" + s.length : "\u2423".repeat(s.length); })
              .replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"));
  }
  function weightText(h, thr) { if (h.weight === null) return "\u2014"; var t = h.weight.toFixed(3), v = parseFloat(t); if (h.role === "activator" && typeof thr === "number" && (v >= thr) === h.quiet) t = (h.quiet ? v - 0.001 : v + 0.001).toFixed(3); return t; }  // an activator's weight on its side of the fire threshold, as `n2g search` shows it: a quiet 0.49999997 reads 0.499, never 0.500
  function sideFixed(v, thr, n) {  // v with n decimals on its own side of the fire threshold (0.49999997 reads 0.49, not 0.50)
    var t = v.toFixed(n), p = Math.pow(10, n);
    if (typeof thr === "number" && !isNaN(thr) && (parseFloat(t) >= thr) !== (v >= thr))
      t = ((v >= thr ? Math.ceil(v * p) : Math.floor(v * p)) / p).toFixed(n);
    return t;
  }
  function cell(tr, text) { var td = document.createElement("td"); td.textContent = text; tr.appendChild(td); return td; }
  function keyCell(tr, key) {  // the neuron's key, linked to its page
    var td = document.createElement("td"); td.className = "l";
    var a = document.createElement("a");
    a.href = "neurons/" + encodeURIComponent(key) + ".html";
    a.textContent = key; td.appendChild(a); tr.appendChild(td);
  }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var token = document.getElementById("q").value;
    var role = document.getElementById("role").value;
    if (!served) { return; }
    if (token === "") { msg.className = "error"; msg.textContent = "Type a token to search for."; return; }
    msg.className = "";  // a status; red only for what went wrong
    msg.textContent = "searching\u2026";
    var url = "../api/search?token=" + encodeURIComponent(token) + "&role=" + encodeURIComponent(role);
    fetch(url, {headers: {"X-N2G-Request": "1"}}).then(function (r) { return r.json(); }).then(function (data) {
      var body = out.tBodies[0];
      while (body.firstChild) body.removeChild(body.firstChild);
      if (data.error) { msg.className = "error"; msg.textContent = data.error; out.hidden = true; return; }
      msg.textContent = data.results.length ? data.results.length + " match(es)" : "no neuron has this token in its graph";
      data.results.forEach(function (h) {
        var tr = document.createElement("tr");
        keyCell(tr, h.key);
        cell(tr, shown(h.token)).className = "l tok";
        cell(tr, h.quiet ? "quiet" : h.role).className = "l";
        cell(tr, weightText(h, data.fire_threshold));
        cell(tr, h.f1 === null ? "\u2014" : h.f1.toFixed(3));
        cell(tr, h.match || "").className = "l";
        body.appendChild(tr);
      });
      out.hidden = data.results.length === 0;
    }).catch(function (e) { msg.className = "error"; msg.textContent = "search failed: " + e; });
  });

  var firesForm = document.getElementById("fires-form");
  var firesMsg = document.getElementById("fires-msg");
  var firesOut = document.getElementById("fires-results");
  if (!served) { firesMsg.textContent = "This needs the server too: run `n2g serve RUN`."; }
  firesForm.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (!served) return;
    var text = document.getElementById("fires-text").value;
    if (!text.trim()) { firesMsg.textContent = "Type some text first."; return; }
    firesMsg.textContent = "predicting\u2026";
    fetch("../api/fires?text=" + encodeURIComponent(text), {headers: {"X-N2G-Request": "1"}})
      .then(function (r) { return r.json(); }).then(function (d) {
        var body = firesOut.tBodies[0];
        while (body.firstChild) body.removeChild(body.firstChild);
        if (d.error) { firesMsg.textContent = d.error; firesOut.hidden = true; return; }
        var truth = d.results.some(function (h) { return h.true !== undefined; });
        d.results.forEach(function (h) {
          var tr = document.createElement("tr");
          keyCell(tr, h.key);
          cell(tr, h.f1 === null ? "\u2014" : h.f1.toFixed(3));
          cell(tr, sideFixed(h.predicted_max, d.fire_threshold, 2));
          cell(tr, h.true_max === undefined || h.true_max === null ? "\u2014" : sideFixed(h.true_max, d.fire_threshold, 2));
          var where = h.fires.map(function (i) { return shown(d.tokens[i]) + " " + sideFixed(h.predicted[i], d.fire_threshold, 2); });
          if (!where.length && h.true_fires) {
            where = ["none (truly fires at " + h.true_fires.map(function (i) { return shown(d.tokens[i]); }).join(", ") + ")"];
          }
          cell(tr, where.join(", ")).className = "l tok";
          body.appendChild(tr);
        });
        firesOut.hidden = d.results.length === 0;
        firesMsg.textContent = d.tokens.length + " tokens, split by " + d.tokenizer + ". " +
          (d.n_results ? d.n_results + " neuron(s)" + (d.n_results > d.results.length ? ", the " + d.results.length + " strongest shown" : "") +
           (truth ? " whose graph says they fire, or that truly fire." : " whose graph says they fire.")
           : "No neuron's graph says it fires on this text.") +
          (d.complete ? "" : " (Stopped at the time budget: more may fire.)");
      }).catch(function (e) { firesMsg.textContent = "prediction failed: " + e; });
  });
})();
"""


def _num_attr(v) -> str:
    return "" if v is None else repr(float(v))


def _top_activators(run_dir: Path) -> dict[str, list[str]]:
    """Up to 4 tokens each neuron's graph fires on, strongest first: its quiet activators (graded values below the
    run's fire threshold, never predicted to fire) are left out, as :func:`n2g.search.similar` leaves them out."""
    from n2g.search import _check_types, _open, _regular, _run_fire_threshold, _schema_problem

    threshold = _run_fire_threshold(run_dir)
    path = run_dir / INDEX_NAME
    out: dict[str, list[str]] = {}
    if not os.path.lexists(path):
        return out
    try:
        if not _regular(path):  # a FIFO's opening would wait for a writer for ever
            raise sqlite3.DatabaseError("it is not a regular file")
        con = _open(path)  # read-only, its queries stopped after SEARCH_SECONDS
        try:
            problem = _schema_problem(con)  # an index n2g did not write (a view may never end) is not read
            if problem:
                raise sqlite3.DatabaseError(problem)
            _check_types(con, path)
            for key, token in con.execute(
                "SELECT key, token FROM tokens WHERE role = 'activator' AND token_id IS NOT NULL AND weight >= ? "
                "ORDER BY key, weight DESC, token",
                (threshold,),
            ):
                lst = out.setdefault(key, [])
                if len(lst) < 4:
                    lst.append(token)
        finally:
            con.close()
    except sqlite3.Error as exc:  # a damaged index: the page lists no tokens (`n2g report` rebuilds it)
        log.warning("cannot read the activators of %s (%s); run `n2g report` to rebuild the index", path, exc)
        return {}
    return out


def index_page(run_dir: Path, results: list[NeuronResult], nonce: str) -> str:
    """The viewer's index (every neuron, sortable and filterable, with token search), from its template."""
    from n2g.pages import render_page

    acts = _top_activators(run_dir)
    rows = []
    for r in results:
        n = neuron_row(r)
        rows.append({**n, "page": page_name(n["key"]),
                     "f1": f1_text(n["n2g_f1"], n["score_status"]) if r.status != "dead" else "dead",
                     "toks": " ".join(display_token(t) for t in acts.get(n["key"], [])),
                     "v_f1": _num_attr(n["n2g_f1"]), "v_tok": _num_attr(n["token_lookup_f1"]),
                     "v_ngram": _num_attr(n["ngram_f1"]), "v_ceiling": _num_attr(n["ceiling_f1"]),
                     "v_pearson": _num_attr(n["pearson"]),
                     "v_rate": _num_attr(n["firing_rate"])})
    return render_page("index.html", css=Markup(CSS), script=Markup(INDEX_JS), nonce=nonce, rows=rows,
                       layers=sorted({r.neuron.layer for r in results}))


PAGES_PER_WORKER = 200
"""Neuron pages per worker process when a run's pages are written in parallel (fewer: one process)."""
PAGES_PER_TASK = 50
"""Pages a worker writes per task (small, so Ctrl-C waits for little)."""


def _write_pages(run_dir: Path, items: list[tuple[str, bytes | None]]) -> tuple[dict[str, int], dict[str, int]]:
    """Write the pages of ``(neuron folder, hash of its checked result.json)`` items, reading each
    whole result here, one at a time (a file changed since it was checked is checked again); returns the
    token texts and ids their excerpts show, and those their graphs hold (for ``viewer/vocabulary.json``)."""
    from n2g.search import read_result

    from n2g.search import _run_fire_threshold

    pages = run_dir / "viewer" / "neurons"
    tokens: dict[str, int] = {}
    graphs: dict[str, int] = {}
    threshold = _run_fire_threshold(run_dir)  # once for the chunk, not once a page
    sae_hook = _run_sae_hook(run_dir)
    for folder, checked in items:
        r = read_result(folder, checked)
        if r is not None:
            page = neuron_page(run_dir, r, threshold, sae_hook=sae_hook, graph_tokens=graphs)
            atomic_write(pages / page_name(r.neuron.key), page.encode("utf-8"))
            _add_tokens(tokens, r)
    return tokens, graphs


def write_viewer(run_dir: str | os.PathLike) -> Path:
    """Write the viewer pages of a run (building the search index if missing); returns index.html.

    Whole results are read one at a time for their pages; the index page needs only summaries."""
    from n2g.report import scan_run

    run_dir = Path(run_dir)
    found = scan_run(run_dir)
    if not (run_dir / INDEX_NAME).exists():
        build_index(run_dir)
    pages = run_dir / "viewer" / "neurons"
    for folder in (pages.parent, pages):
        if (folder.is_symlink() or folder.exists()) and not (folder.is_dir() and _inside(run_dir, folder)):
            raise N2GError(f"{folder} is not a directory of the run (a link out of it, or a file); "
                           f"remove it and run `n2g report {run_dir}` again")
    pages.mkdir(parents=True, exist_ok=True)
    items = [(str(folder), signature) for folder, _, signature in found]
    workers = min(os.cpu_count() or 1, len(items) // PAGES_PER_WORKER)
    if workers > 1:  # many neurons: pages are written by worker processes, a chunk of neurons at a time
        from n2g.engine import host_pool  # workers that leave Ctrl-C to this process and die with it

        chunks = [items[i : i + PAGES_PER_TASK] for i in range(0, len(items), PAGES_PER_TASK)]
        pool = host_pool(workers)
        try:
            seen = list(pool.map(_write_pages, [run_dir] * len(chunks), chunks))
        finally:  # Ctrl-C: the chunks not started are dropped, so it ends after one chunk per worker
            pool.shutdown(wait=True, cancel_futures=True)
    else:
        seen = [_write_pages(run_dir, items)]
    tokens: dict[str, int] = {}
    for part in seen:  # in neuron order, as RunVocabulary reads the results: the same first id for a text
        for tok, tid in part[0].items():
            tokens.setdefault(tok, tid)
    for part in seen:  # then the tokens a graph learned that no stored excerpt shows
        for tok, tid in part[1].items():
            tokens.setdefault(tok, tid)
    atomic_write(pages.parent / VOCABULARY_NAME, json.dumps({"kind": VOCABULARY_KIND, "tokens": tokens},
                                                            ensure_ascii=False).encode("utf-8"))
    out = run_dir / "viewer" / "index.html"
    results = [r for _, r, _ in found]
    atomic_write(out, index_page(run_dir, results, secrets.token_urlsafe(16)).encode("utf-8"))
    log.info("wrote viewer for %d %s under %s", len(results), plural(len(results), "neuron"), out.parent)
    return out


# ---------------------------------------------------------------------------------------------
# server


SERVED_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".dot": "text/plain; charset=utf-8",
}
"""The only file types ``serve`` hands out: what the report and the viewer link to."""

_NO_SCRIPT_CSP = ("default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; base-uri 'none'; "
                  "form-action 'none'; frame-ancestors 'self'")
# The index page's one script is fixed text, so the header can allow exactly it by hash; the page
# itself also carries a per-page nonce for when it is opened from disk. Both policies apply.
_INDEX_JS_HASH = base64.b64encode(hashlib.sha256(INDEX_JS.encode("utf-8")).digest()).decode("ascii")
_INDEX_CSP = _NO_SCRIPT_CSP + f"; script-src 'sha256-{_INDEX_JS_HASH}'; connect-src 'self'"
_NEURON_JS_HASH = base64.b64encode(hashlib.sha256(NEURON_JS.encode("utf-8")).digest()).decode("ascii")
_NEURON_CSP = _NO_SCRIPT_CSP + f"; script-src 'sha256-{_NEURON_JS_HASH}'; connect-src 'self'"
API_HEADER = "X-N2G-Request"
"""Header an API request must carry where the browser sends no ``Sec-Fetch-Site`` (the pages' scripts add it;
so must ``curl`` or Python: ``curl -H 'X-N2G-Request: 1' URL``)."""
CACHED_NEURONS = 256
"""Neurons (result and graph) the server keeps loaded, the most recently asked."""
PREDICT_SECONDS = 5.0
"""Time budget of one ``/api/predict`` request's graph walk (a graph n2g writes needs milliseconds)."""
MAX_TRY_CHARS = 2000
"""Longest text ``/api/predict`` accepts (the page's text box holds as much)."""
MAX_PAGE_BYTES = 64 << 20
"""Most bytes of a served viewer page read to check it is this version's."""
MAX_TOKEN_CHARS = 128
"""Longest token text :class:`RunVocabulary` splits with (longer ones in a run's pages are ignored)."""
MAX_VOCABULARY = 1 << 20
"""Most token texts :class:`RunVocabulary` splits with (every real vocabulary is smaller)."""
_UNKNOWN = -(2**31)
"""Token id of text the run's vocabulary cannot split (matches no graph node)."""


def _opened_inside(fd: int, run_dir: Path) -> bool:
    """Whether the file open as ``fd`` lies inside ``run_dir`` (what was opened, not what a path named a
    moment before); True where the system cannot tell (no /proc): the check made before opening stands."""
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return True
    return Path(real).is_relative_to(run_dir)  # run_dir is resolved when the server starts


VOCABULARY_NAME = "vocabulary.json"
"""The run's token texts and ids (``viewer/vocabulary.json``), written with the pages: what :class:`RunVocabulary`
splits typed text with, read without opening every result (a whole model's run holds 46,080)."""
VOCABULARY_KIND = "n2g.vocabulary"


def _add_tokens(ids: dict[str, int], r: NeuronResult) -> None:
    """Every token text and id of a result's stored excerpts, the first id seen for a text kept."""
    for e in r.examples + r.band_examples:
        if e.tokens:
            for tid, tok in zip(e.token_ids, e.tokens):
                if tok:
                    ids.setdefault(tok, int(tid))


def _add_graph_tokens(ids: dict[str, int], G) -> None:
    """Every token text and id a graph holds (activating and context tokens, as the search index lists them), the
    first id seen for a text kept: a graph learns tokens its stored excerpts never show (from the training partition,
    the model's variants and written text, the vocabulary in context), which ``n2g search`` finds, so typed text
    must split into them too."""
    from n2g.render import graph_token_rows

    for tid, tok, _, _ in graph_token_rows(G):
        if tid is not None and tok:
            ids.setdefault(tok, int(tid))


def _saved_vocabulary(run_dir: Path) -> dict[str, int] | None:
    """The token texts and ids of ``viewer/vocabulary.json``; None (a warning where it is damaged) when there
    is none to use: missing, not a regular file of the run, or not what :func:`write_viewer` writes."""
    path = run_dir / "viewer" / VOCABULARY_NAME
    if not os.path.lexists(path):
        return None
    try:
        if not _inside(run_dir, path):
            raise ValueError("a link that leads out of the run")
        d = read_json(path, MAX_PAGE_BYTES)
        tokens = d.get("tokens") if isinstance(d, dict) and d.get("kind") == VOCABULARY_KIND else None
        if not isinstance(tokens, dict) or not all(
                isinstance(t, str) and isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**31
                for t, i in tokens.items()):
            raise ValueError("not a token-to-id table n2g writes")
        return tokens
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("cannot use %s (%s); reading the tokens of every result instead (`n2g report` writes it again)",
                    path, str(exc)[:200])
        return None


class RunVocabulary:
    """A tokenizer made of the tokens a run's pages show, for serving without the model.

    Every token id and text in the run's stored excerpts and in its graphs is known; text is split greedily, longest
    known token first, so it reproduces the model's split for text made of familiar pieces. A
    stretch no known token covers becomes one unknown token (predicted 0).
    """

    def __init__(self, run_dir: Path):
        from n2g.search import iter_results

        self.ids = _saved_vocabulary(Path(run_dir))  # what `n2g report` wrote: one file, not every result
        if self.ids is None:
            self.ids = {}
            graphs: dict[str, int] = {}
            for folder, r in iter_results(run_dir):
                _add_tokens(self.ids, r)
                if (folder / "graph.json").exists():
                    with contextlib.suppress(N2GError):  # a damaged graph: the report names it
                        _add_graph_tokens(graphs, load_graph_json(folder / "graph.json", run_dir, check=True))
            for tok, tid in graphs.items():  # as write_viewer saves them: after every excerpt's
                self.ids.setdefault(tok, tid)
        self._index()

    @classmethod
    def of(cls, ids: dict[str, int]) -> "RunVocabulary":
        """A vocabulary of the given token texts and ids (no run)."""
        vocab = cls.__new__(cls)
        vocab.ids = dict(ids)
        vocab._index()
        return vocab

    def _index(self) -> None:
        # the tokens by length (none longer than MAX_TOKEN_CHARS: no tokenizer makes one, and a run's pages
        # are not trusted), so splitting costs one dict lookup per known length at each position
        self.by_length: dict[int, dict[str, int]] = {}
        kept = 0
        for tok, tid in self.ids.items():
            if len(tok) <= MAX_TOKEN_CHARS and kept < MAX_VOCABULARY:
                self.by_length.setdefault(len(tok), {})[tok] = tid
                kept += 1
        if kept < len(self.ids):
            log.warning("the run's pages show %d token texts; the %d longer than %d characters or past the first %d "
                        "are not used to split text", len(self.ids), len(self.ids) - kept, MAX_TOKEN_CHARS, MAX_VOCABULARY)
        self.lengths = sorted(self.by_length, reverse=True)

    def __len__(self) -> int:
        return len(self.ids)

    exact = False
    """Whether text is split as the model splits it (:class:`n2g.tokenizer.RunTokenizer` is)."""

    @property
    def how(self) -> str:
        return f"the run's own vocabulary ({len(self):,} token texts seen in its excerpts and graphs)"

    def _longest(self, text: str, i: int) -> tuple[int, int | None]:
        """(length, id) of the longest known token at ``text[i:]``; (0, None) when none is."""
        for n in self.lengths:
            if i + n <= len(text):
                tid = self.by_length[n].get(text[i : i + n])
                if tid is not None:
                    return n, tid
        return 0, None

    def split(self, text: str) -> tuple[list[int], list[str]]:
        ids, toks, i, unknown = [], [], 0, ""
        while i < len(text):
            n, tid = self._longest(text, i)
            if tid is None:
                unknown += text[i]
                i += 1
                continue
            if unknown:
                ids.append(_UNKNOWN)
                toks.append(unknown)
                unknown = ""
            ids.append(tid)
            toks.append(text[i : i + n])
            i += n
        if unknown:
            ids.append(_UNKNOWN)
            toks.append(unknown)
        return ids, toks


_rebuild_lock = threading.Lock()


class _Refused(Exception):
    """A request that gets a plain error status (never a file, never a listing)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def _is_loopback(host: str) -> bool:
    """Whether a host name or address is this machine's loopback (``localhost``, 127.0.0.0/8, ``::1``, and
    127.0.0.0/8 written as an IPv4-mapped IPv6 address, ``::ffff:127.0.0.1``)."""
    import ipaddress

    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def _hidden(name: str) -> bool:
    # dot files (the temporaries of atomic writes among them) and leftover temporaries are never served
    return name.startswith(".") or name.endswith(".tmp")


MAX_PREDICT_TOKENS = 512
"""Most tokens of typed text the model reads for try-your-own-text (the rest is not shown)."""


def _predict_room(model) -> int:
    """How many tokens of typed text the model can read in one forward: :data:`MAX_PREDICT_TOKENS`, or fewer
    where its context (one position of it for BOS) is shorter; a model with learned positions fails beyond it."""
    from n2g.models import context_room

    room = context_room(model)
    return MAX_PREDICT_TOKENS if room is None else max(1, min(MAX_PREDICT_TOKENS, room))


TRUE_CELLS = 1 << 24
"""Most (token, neuron) activations :func:`true_activations` has the model read in one forward pass (64 MiB of
float32): a whole small model's neurons on a short text in one pass, a long text in a few."""


def true_activations(model, neurons: list[dict], ids: list[int], cells: int = TRUE_CELLS) -> dict:
    """Each neuron's true activation on ``ids``, normalised (sign applied, divided by its maximum):
    key -> array, for the rows of :func:`n2g.search.run_neurons` that are fitted with a positive maximum.
    Each forward pass reads up to ``cells`` // len(ids) neurons (a neuron's two signs are read once), so a
    run's neurons take as few passes as that memory allows: each pass runs the model from its first layer."""
    import torch

    wanted = [r for r in neurons if r["status"] != "dead" and isinstance(r["max_activation"], (int, float))
              and r["max_activation"] > 0]
    pairs = sorted({(r["layer"], r["index"]) for r in wanted})
    for layer, index in pairs:
        model.check_neuron(layer, index)
    per_pass = max(1, cells // max(1, len(ids)))
    column = {}  # (layer, index) -> activation per token
    for start in range(0, len(pairs), per_pass):
        part = pairs[start:start + per_pass]
        with torch.no_grad():
            acts = model.activations(torch.tensor([ids]), None, part)[0].float().cpu().numpy()
        column.update((pair, acts[:, j]) for j, pair in enumerate(part))
    out = {}
    for r in wanted:
        sign = -1.0 if r["sign"] == "negative" else 1.0
        out[r["key"]] = column[(r["layer"], r["index"])] * sign / r["max_activation"]
    return out


FIRES_SECONDS = 30.0
"""Time budget of one ``/api/fires`` request's graph reading (a neuron's graph takes milliseconds)."""
FIRES_LIMIT = 50
"""Most neurons ``/api/fires`` answers with."""


class _Handler(BaseHTTPRequestHandler):
    """Serves regular files of the run directory (whitelisted types, no listings) and the search API."""

    run_dir: Path  # resolved; set on the subclass made per server
    subject = None  # the subject model (``serve --model``), or None
    vocabulary = None  # what splits typed text without a model (RunTokenizer or RunVocabulary), built when first asked
    vocabulary_stamp = (0, 0)  # the mtimes of the run's tokenizer.json and viewer/vocabulary.json it was built from
    cache: dict  # neuron key -> ((mtimes), result, graph); per server
    lock: threading.Lock  # one model call at a time; per server
    server_version = "n2g"
    _csp: str | None = None
    timeout = 30
    """Seconds a connection may sit idle (mid-request or between requests) before it is closed, so
    clients that open connections and send nothing cannot hold the server's threads."""

    def log_message(self, format, *args):  # noqa: A002 (stdlib signature)
        log.debug("%s - %s", self.address_string(), format % args)

    def end_headers(self) -> None:
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", self._csp or _NO_SCRIPT_CSP)
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")  # no <img> or <script> of another site
        super().end_headers()

    def _public(self, message: str) -> str:
        """An error message without the run directory's absolute path (only its name)."""
        return message.replace(str(self.run_dir), self.run_dir.name)

    def _json(self, status: int, payload, head: bool = False) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _query(self, fn):
        """Run a search-index query; a damaged index is rebuilt once (a missing one is built by search)."""
        try:
            return fn()
        except sqlite3.DatabaseError as exc:
            log.warning("the search index of %s is damaged (%s); rebuilding it", self.run_dir.name, exc)
        except OSError as exc:  # a missing index could not be built (read-only run, full disk)
            log.warning("cannot build the search index of %s (%s)", self.run_dir.name, exc.strerror or exc)
            raise _Refused(503, f"the search index is missing and cannot be written here ({exc.strerror or exc}); "
                                f"run `n2g report` on a writable copy of {self.run_dir.name}") from None
        try:
            with _rebuild_lock:
                build_index(self.run_dir)
            return fn()
        except (OSError, sqlite3.Error, N2GError) as exc:
            log.warning("cannot rebuild the search index of %s (%s)", self.run_dir.name, exc)
            raise _Refused(503, f"the search index is damaged and could not be rebuilt; run `n2g report "
                                f"{self.run_dir.name}` (on a writable copy if needed), then search again") from None

    @staticmethod
    def _limit(q: dict, default: str) -> int:
        text = q.get("limit", [default])[0]
        if not re.fullmatch(r"[0-9]{1,6}", text.strip()) or int(text) < 1:  # as `n2g search --limit`
            raise _Refused(400, f"limit {text[:20]!r} is not a whole number of at least 1; pass e.g. limit={default}")
        return int(text)

    def _api(self, path: str, query: str, head: bool) -> None:
        q = parse_qs(query, keep_blank_values=True)
        try:
            if path == "/api/search":
                try:
                    limit = self._limit(q, "50")
                    hits = self._query(lambda: search(self.run_dir, q.get("token", [""])[0],
                                                      role=q.get("role", [""])[0] or None, limit=limit))
                except (N2GError, ValueError) as e:
                    return self._json(400, {"error": self._public(str(e))}, head)
                return self._json(200, {"results": hits, "fire_threshold": _run_fire_threshold(self.run_dir)}, head)
            limit = self._limit(q, "10")
            try:
                sims = self._query(lambda: similar(self.run_dir, q.get("key", [""])[0], limit=limit))
            except (N2GError, ValueError) as e:
                return self._json(404, {"error": self._public(str(e))}, head)
            return self._json(200, {"results": [{"key": k, "jaccard": j} for k, j in sims]}, head)
        except _Refused as e:
            return self._json(e.status, {"error": str(e)}, head)

    def _file(self, url_path: str) -> Path:
        """The regular file a URL path names inside the run directory, or _Refused."""
        parts = [p for p in url_path.split("/") if p]
        if any(p in (".", "..") or _hidden(p) or "\\" in p for p in parts):
            raise _Refused(404, "not found")
        target = self.run_dir.joinpath(*parts)
        try:
            real = target.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a symlink loop
            raise _Refused(404, "not found") from None
        if not real.is_relative_to(self.run_dir):
            log.debug("refused %s: it resolves outside the run directory", url_path)
            raise _Refused(404, "not found")
        if real.is_dir():
            if (real / "index.html").is_file():
                raise _Refused(302, quote("/" + "/".join([*parts, "index.html"]), safe="/"))
            raise _Refused(404, "not found")  # never a directory listing
        if _hidden(real.name) or real.suffix.lower() not in SERVED_TYPES or target.suffix.lower() not in SERVED_TYPES:
            raise _Refused(404, "not found")
        return real

    def _page(self, real: Path, f) -> tuple[bytes | None, str]:
        """(body to send instead of the file, or None; its policy) of a viewer page.

        A page this version wrote runs its one fixed script, allowed by hash. A page another n2g
        version (or anyone) wrote is never trusted to name its own script: it is rendered again from
        the run's records, as this version writes it, and only if that fails is the file sent, with
        no script allowed at all (it still reads; sorting and "try your own text" need a refresh).
        """
        is_index = real == self.run_dir / "viewer" / "index.html"
        page = f.read(MAX_PAGE_BYTES).decode("utf-8", "replace")  # a longer one is rendered again
        f.seek(0)
        if (INDEX_JS if is_index else NEURON_JS) in page:
            return None, _INDEX_CSP if is_index else _NEURON_CSP
        log.warning("%s of %s was not written by this n2g version; it is shown as this version renders it "
                    "(run `n2g report` to refresh the files)", real.name, self.run_dir.name)
        try:
            if is_index:
                from n2g.report import scan_run

                body = index_page(self.run_dir, [r for _, r, _ in scan_run(self.run_dir)], secrets.token_urlsafe(16))
            else:
                result, _ = self._neuron(unquote(real.name[: -len(".html")]))
                body = neuron_page(self.run_dir, result)
        except Exception:  # any damage: the file as it is, without script
            log.warning("%s of %s cannot be rendered again; it is shown without script", real.name, self.run_dir.name)
            return None, _NO_SCRIPT_CSP
        return body.encode("utf-8"), _INDEX_CSP if is_index else _NEURON_CSP

    def _neuron(self, key: str):
        """(result, graph or None) of a neuron of the run, cached until its files change."""
        from n2g.graph import NeuronGraph
        from n2g.records import NeuronId
        from n2g.search import checked_result

        if not re.fullmatch(r"L[0-9]{1,6}\.N[0-9]{1,9}(\.neg)?", key):
            raise _Refused(404, f"no neuron {key[:40]!r}; keys look like L5.N123 or L5.N123.neg")
        folder = self.run_dir / "neurons" / NeuronId.from_key(key).key
        rpath, gpath = folder / "result.json", folder / "graph.json"
        if not _inside(self.run_dir, rpath) or (gpath.exists() and not _inside(self.run_dir, gpath)):
            raise _Refused(404, f"no readable result for neuron {key} in this run")  # a link out of the run
        stamp = (_mtime(rpath), _mtime(gpath))
        cached = self.cache.get(key)
        if cached is not None and cached[0] == stamp:
            with contextlib.suppress(KeyError):  # another thread may have just dropped it
                self.cache.move_to_end(key)
            return cached[1], cached[2]
        try:
            result = checked_result(NeuronResult.from_dict(read_json(rpath)))
            check_folder(result.neuron, folder.name)
        except Exception:  # any damage (wrong types, a JSON list, nesting too deep): no result
            raise _Refused(404, f"no readable result for neuron {key} in this run") from None
        try:
            graph = NeuronGraph.load(gpath) if gpath.exists() else None
        except Exception:  # N2GError, or whatever else a damaged file provokes in the loader
            raise _Refused(404, f"the graph of neuron {key} cannot be read; run `n2g report` to see which "
                                "files are damaged, and re-run `n2g run` to redo them") from None
        self.cache[key] = (stamp, result, graph)
        while len(self.cache) > CACHED_NEURONS:  # the least recently asked neuron goes
            with contextlib.suppress(KeyError):
                self.cache.popitem(last=False)
        return result, graph

    @staticmethod
    def _check_text(text: str) -> None:
        if not text.strip():
            raise _Refused(400, "no text given; type some text to predict on")
        if len(text) > MAX_TRY_CHARS:
            raise _Refused(400, f"the text is {len(text)} characters long; try at most {MAX_TRY_CHARS}")

    def _tokens(self, text: str) -> tuple[list[int], list[str], str]:
        """(ids, token texts, how it was split) of typed text: the model's tokenizer, else the one the run saved,
        else the run's tokens."""
        self._check_text(text)
        model = self.subject
        with self.lock:  # the model (and building the run's vocabulary) one request at a time
            if model is not None:
                ids = model.encode(text)[:_predict_room(model)]
                toks = model.token_strings(ids)
                how = f"the model's tokenizer ({model.spec})"
            else:
                stamp = (_mtime(self.run_dir / tokenizer.NAME), _mtime(self.run_dir / "viewer" / VOCABULARY_NAME))
                if self.vocabulary is None or stamp != self.vocabulary_stamp:  # `n2g report` wrote it again
                    self.__class__.vocabulary = tokenizer.splitter(self.run_dir)
                    self.__class__.vocabulary_stamp = stamp
                vocabulary = self.vocabulary
                how = vocabulary.how if vocabulary.exact else \
                    f"{vocabulary.how}; start the server with --model for the model's tokenizer"
        if model is None:
            ids, toks = vocabulary.split(text)
        if not ids:
            raise _Refused(400, "the text has no tokens; type some text to predict on")
        return ids, toks, how

    def _fires(self, query: str, head: bool) -> None:
        """``/api/fires?text=T``: the neurons whose graphs fire on the text (and, with a model, that truly do)."""
        from n2g.search import fires_on, run_neurons

        q = parse_qs(query, keep_blank_values=True)
        try:
            ids, toks, how = self._tokens(q.get("text", [""])[0])
            true = None
            if self.subject is not None:
                neurons = self._query(lambda: run_neurons(self.run_dir))
                with self.lock:
                    true = true_activations(self.subject, neurons, ids)
            deadline = time.monotonic() + FIRES_SECONDS
            results = self._query(lambda: fires_on(self.run_dir, ids, true, deadline=deadline))
        except _Refused as e:
            return self._json(e.status, {"error": str(e)}, head)
        except N2GError as e:
            return self._json(400, {"error": self._public(str(e))}, head)
        from n2g.search import _run_fire_threshold

        return self._json(200, {"tokens": toks, "token_ids": [None if i == _UNKNOWN else int(i) for i in ids],
                                "tokenizer": how, "unit": "normalised activation", "complete": time.monotonic() <= deadline,
                                "fire_threshold": _run_fire_threshold(self.run_dir),
                                "n_results": len(results), "results": results[:FIRES_LIMIT]}, head)

    def _predict(self, query: str, head: bool) -> None:
        """``/api/predict?key=K&text=T``: the graph's prediction per token, and the true activation with a model."""
        import numpy as np

        from n2g.search import _run_fire_threshold, shown_value

        q = parse_qs(query, keep_blank_values=True)
        key, text = q.get("key", [""])[0], q.get("text", [""])[0]
        try:
            self._check_text(text)  # before the key: an empty text is named first
            result, graph = self._neuron(key)
            model = self.subject
            ids, toks, how = self._tokens(text)
            try:  # outside the lock, with a time budget: one slow graph holds up no other request
                pred = graph.predict_sequence(ids, deadline=time.monotonic() + PREDICT_SECONDS) if graph is not None \
                    else np.zeros(len(ids), np.float32)
            except TimeoutError:
                raise _Refused(503, f"the graph of neuron {key} took more than {PREDICT_SECONDS:g} s to predict on "
                                    "this text; try a shorter text") from None
            except Exception:  # a damaged graph.json whose values the loader let through
                raise _Refused(500, f"the graph of neuron {key} is damaged; re-run `n2g run` to redo it") from None
            true = None
            threshold = _run_fire_threshold(self.run_dir)  # the page's (its script colours what fires at it)
            scale = result.stats.max_activation
            if model is not None and scale > 0:
                import torch

                n = result.neuron
                model.check_neuron(n.layer, n.index)
                with self.lock:
                    acts = model.activations(torch.tensor([ids]), None, [(n.layer, n.index)])[0, :, 0].float().cpu().numpy()
                true = [shown_value(v, threshold) if math.isfinite(v) else None  # JSON has no NaN: the page shows —
                        for v in acts * (1.0 if n.sign.value == "positive" else -1.0) / scale]
        except _Refused as e:
            return self._json(e.status, {"error": str(e)}, head)
        except N2GError as e:
            return self._json(400, {"error": self._public(str(e))}, head)
        return self._json(200, {"key": key, "tokens": toks, "token_ids": [None if i == _UNKNOWN else int(i) for i in ids],
                                "predicted": [shown_value(v, threshold) for v in pred], "true": true, "tokenizer": how,
                                "max_activation": result.stats.max_activation, "unit": "normalised activation"}, head)

    def _send_file(self, url_path: str, head: bool) -> None:
        real = self._file(url_path)
        try:  # non-blocking: a FIFO named like a page must not hold the thread (opening one waits for a writer)
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            raise _Refused(404, "not found") from None
        f = os.fdopen(fd, "rb")
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):  # a pipe, device or socket; or it changed under us
                raise _Refused(404, "not found")
            if not _opened_inside(fd, self.run_dir):  # a folder on the way was swapped for a link since the check
                log.warning("refused %s: it was replaced by a link out of the run while being opened", url_path)
                raise _Refused(404, "not found")
            os.set_blocking(fd, True)
            body = None
            if real == self.run_dir / "viewer" / "index.html" or (
                    real.parent == self.run_dir / "viewer" / "neurons" and real.suffix == ".html"):
                body, self._csp = self._page(real, f)
            self.send_response(200)
            self.send_header("Content-Type", SERVED_TYPES[real.suffix.lower()])
            self.send_header("Content-Length", str(st.st_size if body is None else len(body)))
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if not head:
                if body is None:
                    shutil.copyfileobj(f, self.wfile)
                else:
                    self.wfile.write(body)

    def _host_refused(self) -> bool:
        """Whether the request names a host other than this machine while the server listens on loopback
        only: a web page that points its own name at 127.0.0.1 (DNS rebinding) must not read the run."""
        host = self.headers.get("Host")
        if host is None or not _is_loopback(self.server.server_address[0]):
            return False  # no browser sends no Host; a server on another address was opened on purpose
        host = host.strip().lower()
        name = host[1:host.find("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
        return not _is_loopback(name.rstrip("."))

    def _cross_site(self) -> bool:
        """Whether the browser says a page of another origin sent the request (``Sec-Fetch-Site``, or
        ``Origin`` where it sends no such header): a web page, or another server on this machine, whose
        requests carry this server's own Host and so pass :meth:`_host_refused`."""
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None:
            return site.strip().lower() not in ("same-origin", "none")
        origin, host = self.headers.get("Origin"), (self.headers.get("Host") or "").strip().lower()
        return origin is not None and origin.strip().lower() not in (f"http://{host}", f"https://{host}")

    def _unmarked(self) -> bool:
        """Whether an API request says nothing of where it was sent from: no ``Sec-Fetch-Site``, no
        ``Origin`` (a foreign one is :meth:`_cross_site`) and no :data:`API_HEADER`, which the viewer's pages
        add. That is what an ``<img>`` of another site sends from a browser without ``Sec-Fetch-*``
        headers (Safari before 16.4); a page of another origin cannot add a header without the CORS
        preflight this server never grants."""
        return all(self.headers.get(h) is None for h in ("Sec-Fetch-Site", API_HEADER, "Origin"))

    def _get(self, head: bool) -> None:
        self._csp = None
        if self._host_refused():
            self.send_error(403, "this server answers only requests addressed to this machine "
                                 "(open it at the address `n2g serve` prints)")
            return
        try:
            url = urlsplit(self.path)
            path = unquote(url.path, errors="strict")
            if "\x00" in self.path or "\x00" in path or "\x00" in unquote(url.query):
                raise _Refused(400, "NUL byte in the request")
            if path in ("", "/"):
                raise _Refused(302, "/viewer/index.html")
            if path.startswith("/api/") and self._cross_site():  # it would run the model, or rebuild the index
                return self._json(403, {"error": "this server answers its API only to its own pages; open the "
                                                 "viewer at the address `n2g serve` prints"}, head)
            if path.startswith("/api/") and self._unmarked():
                return self._json(403, {"error": f"send the header `{API_HEADER}: 1` with API requests (the "
                                                 "viewer's pages do), or open the viewer at the address "
                                                 "`n2g serve` prints"}, head)
            if path in ("/api/search", "/api/similar"):
                return self._api(path, url.query, head)
            if path == "/api/predict":
                return self._predict(url.query, head)
            if path == "/api/fires":
                return self._fires(url.query, head)
            return self._send_file(path, head)
        except UnicodeDecodeError:
            self.send_error(400, "the request path is not valid UTF-8")
        except ValueError:  # e.g. a malformed IPv6 netloc in an absolute request target
            self.send_error(400, "malformed request path")
        except _Refused as e:
            if e.status == 302:
                self.send_response(302)
                self.send_header("Location", str(e))
                self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                self.send_error(e.status, str(e))

    def do_GET(self):  # noqa: N802 (stdlib name)
        self._get(head=False)

    def do_HEAD(self):  # noqa: N802 (stdlib name)
        self._get(head=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # the client went away: not our fault
            log.debug("client %s disconnected (%s)", client_address[0], exc)
            return
        log.warning("request from %s failed: %s: %s", client_address[0], type(exc).__name__, exc)
        log.debug("request failure", exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def check_port(port) -> int:
    """``port`` as an int in 0..65535 (0 picks a free one), else N2GError."""
    try:
        value = int(port)
    except (TypeError, ValueError, OverflowError):
        raise N2GError(f"port {port!r} is not a number; pass --port with a number from 1 to 65535") from None
    if isinstance(port, bool) or not 0 <= value <= 65535 or (isinstance(port, float) and port != value):
        raise N2GError(f"port {port} is out of range; pass --port with a number from 1 to 65535 (0 picks a free one)")
    return value


def make_server(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000,
                model=None) -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server for the run; port 0 picks a free port.

    With ``model`` (the run's subject model), try-your-own-text shows the neuron's true activation
    beside the graph's prediction and splits text with the model's tokenizer.
    """
    port = check_port(port)
    if not isinstance(host, str) or not host.strip():
        # the socket layer reads an empty host as every interface: never open the run to the network by accident
        raise N2GError(f"--host {host!r} names no address; pass the address to listen on, e.g. 127.0.0.1 "
                       "(the default; 0.0.0.0 opens the viewer to other machines)")
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # an IPv6 address as written in a URL
    run_dir = Path(run_dir).resolve()
    if not (run_dir / "viewer" / "index.html").exists():
        raise N2GError(f"no viewer in {run_dir}; run `n2g report {run_dir}` first")
    handler = type("N2GHandler", (_Handler,), {"run_dir": run_dir, "subject": model, "vocabulary": None,
                                               "cache": OrderedDict(), "lock": threading.Lock()})
    try:
        server = (_Server6 if ":" in host else _Server)((host, port), handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise N2GError(f"port {port} on {host} is already in use; pick another with --port") from None
        raise N2GError(f"cannot listen on {host}:{port} ({e.strerror or e}); check --host and --port") from None
    except (OverflowError, ValueError, UnicodeError, TypeError) as e:  # TypeError: a name IDNA cannot encode
        raise N2GError(f"cannot listen on {host!r}:{port} ({e}); check --host and --port") from None
    return server


def serve(run_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, model=None) -> None:
    """Serve the run's report, viewer and search API until interrupted (Ctrl-C)."""
    server = make_server(run_dir, host, port, model=model)
    h, p = server.server_address[:2]
    shown = f"[{h}]" if ":" in h else h
    if not _is_loopback(h):
        log.warning("listening on %s: anyone who can reach this machine on port %d can read the run "
                    "(the default --host 127.0.0.1 keeps it on this machine)", h, p)
    where = f"serving {run_dir} at http://{shown}:{p}/ (Ctrl-C to stop)"
    if log.isEnabledFor(logging.INFO):
        log.info("%s", where)
    else:  # -q: no progress, but the address is what the user came for (with --port 0 nothing else says it)
        print(f"n2g: {where}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
