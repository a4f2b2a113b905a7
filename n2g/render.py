"""Draw a neuron graph with Graphviz in the published N2G look.

The graph reads right to left: the activating token sits on the right, filled red by its
activation, and the context that precedes it grows to the left, filled blue by importance;
wildcards are dashed and labelled ``*`` (a wildcard run of 0..k tokens ``*{0-k}``); a node where a path ends has a heavy border. Token text
comes from the corpus, so every label is an HTML-like label built from entity-escaped text and
every node gets a generated id: nothing a token contains can break or inject into the DOT source,
the SVG, or the HTML page the SVG is embedded in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path

import networkx as nx

from n2g.errors import N2GError
from n2g.fileio import replacing, write_bytes_atomic

log = logging.getLogger(__name__)

GRAPH_KIND = "n2g.graph"
FORMATS = ("dot", "svg", "png")
MAX_LABEL_CHARS = 48

_RED = (214, 39, 40)
_BLUE = (31, 119, 180)
_warned_no_dot = False


# ---------------------------------------------------------------------------------------------
# loading


def load_graph_json(path: str | os.PathLike) -> nx.DiGraph:
    """Read a ``graph.json`` written by the pipeline (kind ``n2g.graph``) into a DiGraph."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise N2GError(f"graph file {path} does not exist; run `n2g run` to create it") from None
    except (OSError, ValueError) as e:
        raise N2GError(f"cannot read graph file {path} ({e}); delete it and rerun `n2g run`") from None
    if not isinstance(d, dict) or d.get("kind") != GRAPH_KIND or "graph" not in d:
        raise N2GError(f"{path} is not an n2g graph file (kind={d.get('kind') if isinstance(d, dict) else None!r})")
    try:
        G = nx.node_link_graph(d["graph"], edges="edges", directed=True, multigraph=False)
    except Exception as e:  # networkx raises whatever a malformed node-link dict provokes
        raise N2GError(f"graph file {path} is damaged ({type(e).__name__}: {e}); delete it and rerun `n2g run`") from None
    problem = "it is not a directed graph" if not G.is_directed() or G.is_multigraph() else _node_problem(G)
    if problem:
        raise N2GError(f"graph file {path} is damaged ({problem}); delete it and rerun `n2g run`")
    G.graph.setdefault("fire_threshold", d.get("fire_threshold", 0.5))
    if d.get("neuron"):
        G.graph.setdefault("neuron", d["neuron"])
    return G


_NUMERIC_ATTRS = ("activation", "importance", "depth", "count")


def is_finite_number(v) -> bool:
    """A real int or float (not a bool) that converts to a finite float."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer too large for a float
        return False


def _node_problem(G: nx.DiGraph) -> str | None:
    """What is wrong with a loaded graph's node attributes (types the drawing code relies on), or None."""
    for n, a in G.nodes(data=True):
        if not isinstance(a.get("kind", ""), str):
            return f"node {n!r} has a kind that is not text"
        if not isinstance(a.get("token"), (str, type(None))):
            return f"node {n!r} has a token that is not text"
        tid = a.get("token_id")
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int)):
            return f"node {n!r} has a token id that is not an integer"
        for k in _NUMERIC_ATTRS:
            v = a.get(k)
            if v is not None and not is_finite_number(v):
                return f"node {n!r} has a {k} that is not a finite number"
    return None


# ---------------------------------------------------------------------------------------------
# token text


def display_token(token: str | None, token_id: int | None = None) -> str:
    """Visible, faithful text for a token: spaces at either end as ``·``, newline ``↵``, tab ``→``.

    Other control characters become ``\\xNN`` so they stay visible (and valid in XML).
    """
    if token is None:
        return "" if token_id is None else str(token_id)
    stripped = token.strip(" ")
    if stripped:
        lead = len(token) - len(token.lstrip(" "))
        trail = len(token) - len(token.rstrip(" "))
        text = "·" * lead + stripped + "·" * trail
    else:
        text = "·" * len(token)
    out = []
    for ch in text:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("→")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000 or ch in "\ufffe\uffff":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    text = "".join(out)
    if len(text) > MAX_LABEL_CHARS:
        text = text[: MAX_LABEL_CHARS - 1] + "…"
    return text


_ENTITIES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    '"': "&quot;",
    "'": "&#39;",
    "\\": "&#92;",
    "{": "&#123;",
    "}": "&#125;",
    "|": "&#124;",
    "[": "&#91;",
    "]": "&#93;",
}


def html_label_text(text: str) -> str:
    """Escape text for the inside of a Graphviz HTML-like label (entities for every special)."""
    return "".join(_ENTITIES.get(ch, ch) for ch in text)


# ---------------------------------------------------------------------------------------------
# DOT


def _mix(rgb: tuple[int, int, int], t: float) -> str:
    """Colour between white (t=0) and ``rgb`` (t=1) as ``#rrggbb``."""
    t = 0.0 if t != t else min(1.0, max(0.0, float(t)))  # NaN -> 0
    r, g, b = (round(255 + (c - 255) * t) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def _num(value, default: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if v == v else default


def _ordered_nodes(G: nx.DiGraph) -> list:
    """Nodes in a stable breadth-first order from the root, strongest children first."""

    def strength(n):
        a = G.nodes[n]
        return -_num(a.get("activation") if a.get("kind") == "activator" else a.get("importance"))

    roots = [n for n in G.nodes if G.nodes[n].get("kind") == "root"] or (["root"] if "root" in G else [])
    order: list = []
    seen: set = set()
    queue = deque(roots)
    seen.update(queue)
    while queue:
        n = queue.popleft()
        order.append(n)
        for c in sorted(G.successors(n), key=lambda c: (strength(c), str(G.nodes[c].get("token", "")), str(c))):
            if c not in seen:
                seen.add(c)
                queue.append(c)
    order.extend(n for n in G.nodes if n not in seen)
    return order


def _dot_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _legend() -> list[str]:
    return [
        "  subgraph cluster_legend {",
        '    label=<<B>legend</B>>; fontsize=10; color="#bbbbbb"; style=rounded;',
        '    node [fontsize=10, width=0, height=0, margin="0.08,0.03"];',
        f'    lg_act [label=<activating token>, fillcolor="{_mix(_RED, 0.8)}", fontcolor="white"];',
        f'    lg_ctx [label=<context token>, fillcolor="{_mix(_BLUE, 0.6)}"];',
        '    lg_any [label=<* any token>, style="dashed,rounded", fillcolor="white"];',
        f'    lg_end [label=<path ends here>, penwidth=3, fillcolor="{_mix(_BLUE, 0.2)}"];',
        "    lg_act -> lg_ctx -> lg_any -> lg_end [style=invis];",
        "  }",
    ]


def to_dot(G: nx.DiGraph, title: str | None = None, legend: bool = True) -> str:
    """Graphviz source for a neuron graph (see the module docstring for the look).

    Node ids in the output are generated (``n0``, ``n1``, ...); every label is an HTML-like label
    of entity-escaped text, so any corpus token is safe. ``end`` nodes and the root are not drawn;
    a node with an ``end`` child gets ``penwidth=3``.
    """
    ids: dict = {}
    lines = [
        "digraph n2g {",
        "  rankdir=RL;",
        '  graph [fontname="Helvetica", nodesep=0.15, ranksep=0.35, bgcolor="white"];',
        '  node [shape=box, style="filled,rounded", fontname="Helvetica", fontsize=12, '
        'penwidth=1, color="#555555", margin="0.08,0.04", height=0.3];',
        '  edge [dir=back, color="#777777", arrowsize=0.6];',
    ]
    if title:
        lines.append(f"  labelloc=t; label=<<B>{html_label_text(display_token(title))}</B>>;")
    if legend:
        lines.extend(_legend())

    drawn = []
    for n in _ordered_nodes(G):
        kind = G.nodes[n].get("kind", "context")
        if kind in ("root", "end"):
            continue
        ids[n] = f"n{len(ids)}"
        drawn.append(n)

    for n in drawn:
        a = G.nodes[n]
        kind = a.get("kind", "context")
        ends = [c for c in G.successors(n) if G.nodes[c].get("kind") == "end"]
        attrs: dict[str, str] = {}
        if kind == "wildcard":
            span = int(_num(a.get("run"), 0.0))
            label = "*" if span == 0 else html_label_text(f"*{{0-{span}}}")
            attrs["style"] = '"dashed,rounded,filled"'
            attrs["fillcolor"] = '"white"'
            tip = (f"any token; importance {_num(a.get('importance')):.2f}" if span == 0
                   else f"any 0 to {span} tokens, then the token to its left")
        elif kind == "activator":
            label = html_label_text(display_token(a.get("token"), a.get("token_id")))
            act = _num(a.get("activation"), 1.0)
            attrs["fillcolor"] = f'"{_mix(_RED, 0.15 + 0.85 * act)}"'
            if act > 0.55:
                attrs["fontcolor"] = '"white"'
            tip = f"activating token id {a.get('token_id')}; activation {act:.2f}"
        else:
            label = html_label_text(display_token(a.get("token"), a.get("token_id")))
            imp = _num(a.get("importance"))
            attrs["fillcolor"] = f'"{_mix(_BLUE, 0.1 + 0.8 * imp)}"'
            if imp > 0.7:
                attrs["fontcolor"] = '"white"'
            tip = f"context token id {a.get('token_id')}, {int(_num(a.get('depth')))} before; importance {imp:.2f}"
        if ends:
            attrs["penwidth"] = "3"
            best = max(_num(G.nodes[e].get("activation")) for e in ends)
            tip += f"; path ends here, predicts {best:.2f}"
        # tooltip text is built from numbers only, never from token text
        attrs["tooltip"] = _dot_quote(tip)
        attrs["label"] = f"<{label}>" if label else '""'
        attrs["class"] = f'"{kind}{" end" if ends else ""}"'
        body = ", ".join(f"{k}={v}" for k, v in attrs.items())
        lines.append(f"  {ids[n]} [{body}];")

    for u, v in G.edges:
        if u in ids and v in ids:
            lines.append(f"  {ids[u]} -> {ids[v]};")
    # activators share the right-most rank
    acts = [ids[n] for n in drawn if G.nodes[n].get("kind") == "activator"]
    if acts:
        lines.append("  { rank=same; " + "; ".join(acts) + "; }")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Graphviz execution


def dot_available() -> bool:
    """Whether the Graphviz ``dot`` program is on PATH."""
    return shutil.which("dot") is not None


def _warn_no_dot() -> None:
    global _warned_no_dot
    if not _warned_no_dot:
        _warned_no_dot = True
        log.warning("Graphviz `dot` not found on PATH: writing DOT only; install graphviz for SVG/PNG")


def _run_dot(source: str, fmt: str) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise N2GError("Graphviz `dot` is not installed; install graphviz (e.g. `apt-get install graphviz`)")
    proc = subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise N2GError(f"Graphviz failed to render the graph: {proc.stderr.decode('utf-8', 'replace').strip()}")
    return proc.stdout


def _run_dot_to(source: str, outputs: dict[str, Path]) -> None:
    """Render ``source`` into every ``{format: path}`` with one Graphviz process (one layout)."""
    exe = shutil.which("dot")
    if exe is None:
        raise N2GError("Graphviz `dot` is not installed; install graphviz (e.g. `apt-get install graphviz`)")
    args = [exe] + [a for fmt, path in outputs.items() for a in (f"-T{fmt}", f"-o{path}")]
    proc = subprocess.run(args, input=source.encode("utf-8"), capture_output=True, timeout=120)
    if proc.returncode != 0:
        raise N2GError(f"Graphviz failed to render the graph: {proc.stderr.decode('utf-8', 'replace').strip()}")


def _strip_prolog(svg: str) -> str:
    i = svg.find("<svg")
    return svg[i:] if i >= 0 else svg


def svg_of(G: nx.DiGraph, title: str | None = None) -> str:
    """The graph rendered as an SVG element (no XML prolog), ready to inline in HTML or a notebook.

    Raises N2GError when Graphviz is not installed. Pipeline graph objects can use it as
    ``def _repr_svg_(self): return svg_of(self.G)``.
    """
    return _strip_prolog(_run_dot(to_dot(G, title=title), "svg").decode("utf-8"))


def atomic_write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)


def render(
    G: nx.DiGraph,
    out_stem: str | os.PathLike,
    formats: Sequence[str] = FORMATS,
    title: str | None = None,
) -> list[Path]:
    """Write ``<out_stem>.dot`` always, and ``.svg`` / ``.png`` when ``dot`` is installed.

    ``out_stem`` is a path without extension (``neurons/L5.N123/graph``); a dot in the stem is
    kept. Every file is written atomically. Returns the paths written.
    """
    bad = set(formats) - set(FORMATS)
    if bad:
        raise N2GError(f"unknown graph format(s) {sorted(bad)}; choose from {list(FORMATS)}")
    out_stem = Path(out_stem)
    source = to_dot(G, title=title)
    dot_path = out_stem.parent / f"{out_stem.name}.dot"
    atomic_write(dot_path, source.encode("utf-8"))
    written = [dot_path]
    images = [f for f in formats if f != "dot"]
    if images and not dot_available():
        _warn_no_dot()
        return written
    # One dot process lays the graph out once and writes every format (each atomically).
    paths = {fmt: out_stem.parent / f"{out_stem.name}.{fmt}" for fmt in images}
    with contextlib.ExitStack() as stack:
        temps = {fmt: stack.enter_context(replacing(path)) for fmt, path in paths.items()}
        _run_dot_to(source, temps)
    return written + list(paths.values())


class GraphView:
    """Wraps a neuron graph so a notebook draws it inline as SVG: ``GraphView(G)`` or ``display_graph(G)``."""

    def __init__(self, G: nx.DiGraph, title: str | None = None):
        self.G = G
        self.title = title

    def to_dot(self) -> str:
        return to_dot(self.G, title=self.title)

    def _repr_svg_(self) -> str | None:
        if not dot_available():
            _warn_no_dot()
            return None  # the notebook falls back to __repr__
        return svg_of(self.G, title=self.title)

    def __repr__(self) -> str:
        kinds: dict[str, int] = {}
        for _, k in self.G.nodes(data="kind"):
            kinds[k] = kinds.get(k, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()) if k not in ("root",))
        return f"<n2g graph{' ' + repr(self.title) if self.title else ''}: {parts}>"


def display_graph(G: nx.DiGraph, title: str | None = None) -> GraphView:
    """Return an object that a notebook displays inline as the rendered graph."""
    return GraphView(G, title=title)


def graph_token_rows(G: nx.DiGraph) -> Iterable[tuple[int | None, str, str, float]]:
    """``(token_id, token, role, weight)`` for every activator and context node of a graph.

    weight is the activation for activators and the importance for context tokens.
    """
    for _, a in G.nodes(data=True):
        kind = a.get("kind")
        if kind == "activator":
            yield a.get("token_id"), a.get("token") or "", "activator", _num(a.get("activation"), 1.0)
        elif kind == "context":
            yield a.get("token_id"), a.get("token") or "", "context", _num(a.get("importance"))
