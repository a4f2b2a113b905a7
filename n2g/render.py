"""Draw a neuron graph with Graphviz in the published N2G look.

The graph reads right to left: the activating token sits on the right, filled red by its
activation, and the context that precedes it grows to the left, filled blue by importance;
wildcards are dashed and labelled ``*`` (a wildcard run of 0..k tokens ``*{0-k}``); a node where a path ends has a heavy border.
Numbers are printed on the nodes (activation, importance, END value), the legend with both colour
scales sits at the top, the strongest paths are drawn at the top, and a large graph is drawn as
its strongest paths plus a ``+k more`` node. Whitespace is shown countably (``␣x4``, ``↵``). Token text
comes from the corpus, so every label is an HTML-like label built from entity-escaped text and
every node gets a generated id: nothing a token contains can break or inject into the DOT source,
the SVG, or the HTML page the SVG is embedded in.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import networkx as nx

from n2g.errors import BIDI_CONTROLS, N2GError
from n2g.fileio import inside, read_json, replacing, write_bytes_atomic
from n2g.graph import MAX_TOKEN_ID, START_TEXT, NeuronGraph, fires, shown_fixed, token_value_count, tree_problem

log = logging.getLogger(__name__)

GRAPH_KIND = "n2g.graph"
FORMATS = ("dot", "svg", "png")
MAX_LABEL_CHARS = 48

_RED = (214, 39, 40)
_BLUE = (31, 119, 180)
_warned_no_dot = False


# ---------------------------------------------------------------------------------------------
# loading


def load_graph_json(path: str | os.PathLike, root: str | os.PathLike | None = None, check: bool = False) -> nx.DiGraph:
    """Read a ``graph.json`` written by the pipeline (kind ``n2g.graph``) into a DiGraph.

    ``root``: the run directory the file belongs to; a file that resolves outside it (a link, or a
    folder that is one, leading out of the run) is refused, never read. ``check``: also refuse a file
    :meth:`n2g.graph.NeuronGraph.load` (what ``n2g serve`` and the API predict with) would refuse, so the
    report names every graph the server cannot use (a drawing alone takes any well-formed node-link graph).
    """
    path = Path(path)
    if root is not None and not inside(root, path):
        raise N2GError(f"graph file {path} is a link that leads out of the run directory; "
                       "delete it and rerun `n2g run`")
    try:
        version = _file_version(path) if check else None  # before reading: the verdict is this version's
        d = read_json(path)
    except FileNotFoundError:
        raise N2GError(f"graph file {path} does not exist; run `n2g run` to create it") from None
    except PermissionError:
        raise N2GError(f"cannot read graph file {path}: permission denied; make it readable") from None
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested too deep to decode
        raise N2GError(f"cannot read graph file {path} ({e}); delete it and rerun `n2g run`") from None
    if not isinstance(d, dict) or d.get("kind") != GRAPH_KIND or "graph" not in d:
        raise N2GError(f"{path} is not an n2g graph file (kind={d.get('kind') if isinstance(d, dict) else None!r})")
    if check:  # what `n2g serve` and the API load: a file they refuse is refused (and named) here too
        problem = _server_problem(version, d)
        if problem:
            raise N2GError(f"graph file {path} is damaged ({problem}); delete it and rerun `n2g run`")
    try:
        G = nx.node_link_graph(d["graph"], edges="edges", directed=True, multigraph=False)
    except Exception as e:  # networkx raises whatever a malformed node-link dict provokes
        raise N2GError(f"graph file {path} is damaged ({type(e).__name__}: {e}); delete it and rerun `n2g run`") from None
    problem = "it is not a directed graph" if not G.is_directed() or G.is_multigraph() else \
        (_node_problem(G) or tree_problem(G))
    if problem:
        raise N2GError(f"graph file {path} is damaged ({problem}); delete it and rerun `n2g run`")
    # the file's own fields, never what its node-link "graph" attributes say (n2g writes only token_values there)
    G.graph["fire_threshold"] = d.get("fire_threshold", 0.5)
    G.graph.pop("neuron", None)
    if d.get("neuron"):
        G.graph["neuron"] = d["neuron"]
    return G


_SERVER_PROBLEMS: dict[tuple, str | None] = {}
"""Verdicts of :func:`_server_problem` by file version: a report loads each graph three times (index, drawing,
page), and building a NeuronGraph costs milliseconds."""


def _file_version(path: Path) -> tuple:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_mtime_ns, st.st_size)


def _server_problem(version: tuple, d: dict) -> str | None:
    """Why :meth:`n2g.graph.NeuronGraph.from_dict` refuses this graph file's contents (None: it loads them),
    decided once per file version."""
    if version not in _SERVER_PROBLEMS:
        try:
            NeuronGraph.from_dict(d)
            problem = None
        except N2GError as e:
            problem = str(e)
        except Exception as e:  # whatever a hand-made or damaged file provokes in the loader
            problem = f"{type(e).__name__}: {str(e)[:200]}"
        _SERVER_PROBLEMS[version] = problem
    return _SERVER_PROBLEMS[version]


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
        if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid <= MAX_TOKEN_ID):
            return f"node {n!r} has a token id that is not a whole number from 0 to {MAX_TOKEN_ID}"
        for k in _NUMERIC_ATTRS:
            v = a.get(k)
            if v is not None and not is_finite_number(v):
                return f"node {n!r} has a {k} that is not a finite number"
    return None


# ---------------------------------------------------------------------------------------------
# token text


_WS_MARK = {" ": "\u2423", "\n": "\u21b5", "\t": "\u2192", "\r": "\u240d"}
"""How whitespace is shown in labels: space ␣, newline ↵, tab →, carriage return ␍."""


def _ws_run(ch: str, n: int) -> str:
    """A run of ``n`` whitespace characters, countable: ``␣``, ``␣␣``, then ``␣x3``, ``␣x4`` ..."""
    mark = _WS_MARK[ch]
    return mark * n if n <= 2 else f"{mark}x{n}"




@functools.lru_cache(maxsize=1 << 16)
def display_token(token: str | None, token_id: int | None = None) -> str:
    """Visible, countable text for a token (a BPE piece shown as the text it stands for).

    Spaces at either end become ``␣`` (a run of 3 or more ``␣x4``), as do runs of 2 or more
    inside; newlines ``↵`` (``↵x3``), tabs ``→``. Other control characters become ``\\xNN`` so
    they stay visible (and valid in XML), and bidirectional controls ``\\u202e`` (they would reorder
    the text around the token). Long tokens are cut with ``…``.
    """
    if token is None:
        return "" if token_id is None else str(token_id)
    if token == START_TEXT:  # a token whose text reads as the start of the text is shown escaped
        return token.encode("ascii", "backslashreplace").decode("ascii")
    out = []
    i, n = 0, len(token)
    while i < n:
        ch = token[i]
        if ch in _WS_MARK:
            j = i
            while j < n and token[j] == ch:
                j += 1
            if ch == " " and j - i == 1 and 0 < i and j < n:
                out.append(" ")  # one space between two words reads as a space
            else:
                out.append(_ws_run(ch, j - i))
            i = j
            continue
        if ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 or 0xD800 <= ord(ch) < 0xE000 or ch in "\ufffe\uffff":
            out.append(f"\\x{ord(ch):02x}")
        elif ch in BIDI_CONTROLS:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
        i += 1
    text = "".join(out)
    if len(text) > MAX_LABEL_CHARS:
        text = text[: MAX_LABEL_CHARS - 1] + "\u2026"
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


def luminance(colour: str) -> float:
    """WCAG relative luminance of ``#rrggbb`` (0 black, 1 white)."""
    def lin(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (lin(int(colour[i : i + 2], 16) / 255) for i in (1, 3, 5))
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a: str, b: str) -> float:
    """WCAG contrast ratio of two ``#rrggbb`` colours (1 to 21)."""
    la, lb = sorted((luminance(a), luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def white_text_on(fill: str) -> bool:
    """Whether white text reads better than black on ``fill`` (the higher WCAG contrast: at least 4.5 to 1 on
    every colour of the activation and importance scales)."""
    return contrast(fill, "#ffffff") > contrast(fill, "#000000")


def _num(value, default: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return default
    return v if v == v else default


def _dot_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


MAX_DRAWN_PATHS = 14
"""A graph with more paths is drawn summarised: its strongest paths and a ``+k more`` node."""


QUIET_BELOW = 0.5
"""An activator whose strongest END is below this (the default fire threshold) is quiet: it holds a graded
value (``quiet_tokens``) but is never predicted to fire."""


def graph_fire_threshold(G: nx.DiGraph | None) -> float:
    """The fire threshold a drawn graph was fitted at (``G.graph["fire_threshold"]``, set by :func:`load_graph_json`
    and :meth:`n2g.graph.NeuronGraph.drawable`); :data:`QUIET_BELOW` where it holds no number in (0, 1]."""
    value = G.graph.get("fire_threshold") if G is not None else None
    return float(value) if is_finite_number(value) and 0 < value <= 1 else QUIET_BELOW


def is_quiet(attrs: dict, threshold: float = QUIET_BELOW) -> bool:
    """Whether an activator node (its attributes) is quiet: no END on or below it fires (reaches ``threshold``,
    the graph's fire threshold)."""
    return attrs.get("kind") == "activator" and not fires(_num(attrs.get("activation")), threshold)


def graph_paths(G: nx.DiGraph) -> list[dict]:
    """Every path of a graph that ends in an END, strongest first.

    Each path is a dict: ``nodes`` (graph node ids, activator first, walking back through the
    context), ``tokens`` (their display text; ``*`` for a wildcard), ``kinds``, ``end`` (the
    normalised activation the END predicts), ``count`` (training paths that ended there) and
    ``strength`` (``end x count``). Paths that fire (END at or above the graph's fire threshold) come first,
    then the graded ones, then the background value of "any other token"; by strength within each: how the
    drawing and the tables rank paths.
    """
    parent = {}
    for u, v in G.edges:
        parent.setdefault(v, u)
    out = []
    for n, a in G.nodes(data=True):
        if a.get("kind") != "end":
            continue
        owner = parent.get(n)
        chain = []
        while owner is not None and G.nodes[owner].get("kind") not in ("root", None):
            chain.append(owner)
            owner = parent.get(owner)
            if len(chain) > 10_000:  # a damaged graph with a cycle
                break
        if not chain:
            continue
        chain.reverse()  # activator first
        end, count = _num(a.get("activation")), max(int(_num(a.get("count"), 1.0)), 1)
        out.append({
            "nodes": chain,
            "tokens": [_node_text(G.nodes[c]) for c in chain],
            "kinds": [G.nodes[c].get("kind", "context") for c in chain],
            "end": end, "count": count, "strength": end * count,
        })
    # what makes the neuron fire comes first: paths that fire, strongest first, then the graded ones (quiet
    # activators, and last the background value of "any other token", whose count is every token it covers)
    threshold = graph_fire_threshold(G)
    out.sort(key=lambda p: (not fires(p["end"], threshold), p["kinds"][0] == "activator" and G.nodes[p["nodes"][0]].get("token_id") is None,
                            -p["strength"], -p["end"], len(p["nodes"]), p["tokens"]))
    return out


def _node_text(a: dict) -> str:
    if a.get("kind") == "wildcard":
        span = int(_num(a.get("run"), 0.0))
        return "*" if span == 0 else f"*{{0-{span}}}"
    if a.get("kind") == "start":
        return START_TEXT
    return display_token(a.get("token"), a.get("token_id"))


def path_text(path: dict) -> str:
    """A path as text in reading order, the activator in brackets: ``␣in * [␣Paris]``."""
    toks = list(reversed(path["tokens"]))
    toks[-1] = f"[{toks[-1]}]"
    return " ".join(toks)


def _legend_label(title: str | None, summary: str | None, start: bool = False, negative: bool = False) -> str:
    """The graph's label: title, colour scales and key (with ``start``, what the start node means; with
    ``negative``, that a negative side's activations are normalised to its most negative value), drawn at
    the top of the image."""
    stops = (0.0, 0.25, 0.5, 0.75, 1.0)

    def scale(rgb, lo, span, name):
        white = ' COLOR="white"'
        cells = "".join(
            f'<TD BGCOLOR="{_mix(rgb, lo + span * t)}" WIDTH="26"><FONT POINT-SIZE="9"'
            f'{white if white_text_on(_mix(rgb, lo + span * t)) else ""}>{t:g}</FONT></TD>' for t in stops)
        return f'<TD ALIGN="RIGHT"><FONT POINT-SIZE="10">{name}</FONT></TD>{cells}'

    rows = []
    if title:
        rows.append(f'<TR><TD COLSPAN="13" ALIGN="LEFT"><B>{html_label_text(display_token(title))}</B></TD></TR>')
    rows.append("<TR>" + scale(_RED, 0.15, 0.85, "activating token: activation") + "<TD> </TD>"
                + scale(_BLUE, 0.1, 0.8, "context token: importance") + "</TR>")
    key = ("reads right to left: activating token on the right, the tokens before it to its left",
           "* any one token \u00b7 heavy border: a path ends there, end = its predicted activation",
           *([f"{START_TEXT} (italic, grey): the start of the text, before its first token"] if start else []),
           "activations are normalised to the neuron's most negative value on the scanned corpus (its negative side: "
           "1 = the most negative; tokens the corpus seldom shows may go past 1)"
           if negative else "activations are normalised to the neuron's maximum on the scanned corpus (1 = the strongest "
           "excerpt; tokens the corpus seldom shows may go past 1)")
    key_text = "<BR ALIGN=\"LEFT\"/>".join(html_label_text(k) for k in key) + "<BR ALIGN=\"LEFT\"/>"
    rows.append(f'<TR><TD COLSPAN="13" ALIGN="LEFT"><FONT POINT-SIZE="9" COLOR="#555555">{key_text}</FONT></TD></TR>')
    if summary:
        rows.append(f'<TR><TD COLSPAN="13" ALIGN="LEFT"><FONT POINT-SIZE="10">{html_label_text(summary)}</FONT></TD></TR>')
    return '<<TABLE BORDER="0" CELLBORDER="0" CELLSPACING="1" CELLPADDING="2">' + "".join(rows) + "</TABLE>>"


def _value_line(text: str, white: bool) -> str:
    """The node's numbers, small, on the token's line (one line per node keeps 15 paths on one screen), in the
    token's text colour (black or white, whichever reads better on the fill)."""
    colour = ' COLOR="white"' if white else ' COLOR="black"'
    return f'<FONT POINT-SIZE="9"{colour}>&#160;{html_label_text(text)}</FONT>'


DRAWING_VERSION = 2
"""Raise it when drawings change (order, labels, legend, colours): ``n2g report`` then draws a run's graphs again,
so a run made by an older n2g does not keep its old drawings beside pages and tables of the new."""
DRAWING_MARK = f"n2g drawing {DRAWING_VERSION}"
"""The graph comment (second line of every graph.dot, and a comment in the SVG) that says which drawing made it."""


def drawn_by_this_version(dot_path: str | os.PathLike) -> bool:
    """Whether ``graph.dot`` (and the images drawn with it) was written by this version's drawing."""
    try:
        with open(dot_path, "rb") as f:
            head = f.read(128)
    except OSError:
        return False
    return f'comment="{DRAWING_MARK}";'.encode() in head


def to_dot(G: nx.DiGraph, title: str | None = None, legend: bool = True,
           max_paths: int | None = MAX_DRAWN_PATHS) -> str:
    """Graphviz source for a neuron graph (see the module docstring for the look).

    Paths that fire are drawn at the top, strongest (END activation x count) first, then the graded ones
    (:func:`graph_paths`); every activator shows its
    activation, every context token its importance, and a node where a path ends its END value.
    A graph with more than ``max_paths`` paths is summarised: its ``max_paths`` strongest paths and
    one ``+k more`` node (the viewer page lists every path in a table). Node ids in the output are
    generated (``n0``, ``n1``, ...); every label is an HTML-like label of entity-escaped text, so any
    corpus token is safe. ``end`` nodes and the root are not drawn.
    """
    paths = graph_paths(G)
    keep: set | None = None
    summary = None
    threshold = graph_fire_threshold(G)
    if max_paths is not None and len(paths) > max_paths:
        shown = paths[:max_paths]
        keep = {n for p in shown for n in p["nodes"]}
        acts = [n for n in G.nodes if G.nodes[n].get("kind") == "activator"]
        quiet = {n for n in acts if is_quiet(G.nodes[n], threshold)}
        drawn = {p["nodes"][0] for p in shown}
        hidden_acts, hidden_quiet = len(acts) - len(drawn), len(quiet - drawn)
        summary = (f"summary: the {max_paths} strongest of {len(paths)} paths ({len(acts)} activating tokens"
                   + (f", {len(quiet)} of them quiet: never predicted to fire" if quiet else "")
                   + "); all are listed on the neuron page")
        more = (f"+{len(paths) - max_paths} more {'path' if len(paths) - max_paths == 1 else 'paths'}"
                + (f" ({hidden_acts} more activating {'token' if hidden_acts == 1 else 'tokens'}" + (f", {hidden_quiet} quiet" if hidden_quiet else "") + ")"
                   if hidden_acts else ""))
    rank = {}
    for r, p in enumerate(paths):  # each node sorts by the strongest path through it
        for n in p["nodes"]:
            rank.setdefault(n, r)
    ids: dict = {}
    lines = [
        "digraph n2g {",
        f'  comment="{DRAWING_MARK}";',
        "  rankdir=RL;",
        '  graph [fontname="Helvetica", nodesep=0.1, ranksep=0.3, bgcolor="white", labelloc=t, labeljust=l];',
        '  node [shape=box, style="filled,rounded", fontname="Helvetica", fontsize=12, '
        'penwidth=1, color="#555555", margin="0.08,0.03", height=0.3];',
        '  edge [dir=back, color="#777777", arrowsize=0.6];',
    ]
    if legend:
        start = any(a.get("kind") == "start" for _, a in G.nodes(data=True))
        neuron = G.graph.get("neuron")  # as graph.json records it (load_graph_json)
        negative = isinstance(neuron, dict) and neuron.get("sign") == "negative"
        lines.append(f"  label={_legend_label(title, summary, start, negative)};")
    elif title:
        lines.append(f"  label=<<B>{html_label_text(display_token(title))}</B>>;")

    order = sorted((n for n in G.nodes if G.nodes[n].get("kind") not in ("root", "end")),
                   key=lambda n: (rank.get(n, len(paths)), int(_num(G.nodes[n].get("depth"))),
                                  -_num(G.nodes[n].get("activation")), str(n)))
    drawn = [n for n in order if keep is None or n in keep]
    # rankdir=RL lays out the DOT order bottom to top: declare the weakest first so the strongest is on top
    for n in drawn:
        ids[n] = f"n{len(ids)}"

    node_lines = []
    for n in drawn:
        a = G.nodes[n]
        kind = a.get("kind", "context")
        ends = [c for c in G.successors(n) if G.nodes[c].get("kind") == "end"]
        best_end = max((_num(G.nodes[e].get("activation")) for e in ends), default=None)
        attrs: dict[str, str] = {}
        white = False
        if kind == "wildcard":
            span = int(_num(a.get("run"), 0.0))
            label = "*" if span == 0 else html_label_text(f"*{{0-{span}}}")
            attrs["style"] = '"dashed,rounded,filled"'
            attrs["fillcolor"] = '"white"'
            tip = (f"any token; importance {_num(a.get('importance')):.2f}" if span == 0
                   else f"any 0 to {span} tokens, then the token to its left")
            value = ""
        elif kind == "start":  # drawn apart from tokens: italic on grey, as no token's text is
            label = f"<I>{html_label_text(START_TEXT)}</I>"
            attrs["style"] = '"rounded,filled,bold"'
            attrs["fillcolor"] = '"#e0e0e0"'
            tip = "the start of the text: the path reaches back past the text's first token"
            value = ""
        elif kind == "activator":
            label = html_label_text(display_token(a.get("token"), a.get("token_id")))
            act = _num(a.get("activation"), 1.0)
            fill = _mix(_RED, 0.15 + 0.85 * act)
            attrs["fillcolor"] = f'"{fill}"'
            white = white_text_on(fill)  # white only on the darkest reds: on mid reds it read at under 3 to 1
            if white:
                attrs["fontcolor"] = '"white"'
            tip = f"activating token id {a.get('token_id')}; activation {shown_fixed(act, threshold)}"
            value = f"act {shown_fixed(act, threshold)}"
            own = token_value_count(G)
            if a.get("token_id") is None and own:
                tip = f"any other token: its own training mean where it has one ({own} tokens), else {shown_fixed(act, threshold)}"
                value = f"{own} own values, else {shown_fixed(act, threshold)}"
        else:
            label = html_label_text(display_token(a.get("token"), a.get("token_id")))
            imp = _num(a.get("importance"))
            fill = _mix(_BLUE, 0.1 + 0.8 * imp)
            attrs["fillcolor"] = f'"{fill}"'
            white = white_text_on(fill)
            if white:
                attrs["fontcolor"] = '"white"'
            tip = f"context token id {a.get('token_id')}, {int(_num(a.get('depth')))} before; importance {imp:.2f}"
            value = f"imp {imp:.2f}"
            if (a.get("count") is not None and _num(a.get("count"), 1.0) == 0) or imp == 0.0:
                # grown from training occurrences, or on paths that cover firing training tokens the graph missed
                # (importance 0 on each): no occlusion measured it, so it has no importance to print
                tip = f"context token id {a.get('token_id')}, {int(_num(a.get('depth')))} before; learned from training occurrences (no occlusion importance)"
                value = "grown"
        if ends:
            attrs["penwidth"] = "3"
            tip += f"; path ends here, predicts {shown_fixed(best_end, threshold)}"
            if kind != "activator" or abs(best_end - _num(a.get("activation"), 1.0)) > 5e-3:
                value = (value + " \u00b7 " if value else "") + f"end {shown_fixed(best_end, threshold)}"
        # tooltip text is built from numbers only, never from token text
        attrs["tooltip"] = _dot_quote(tip)
        attrs["label"] = f"<{label}{_value_line(value, white) if value else ''}>" if label else '""'
        # the node's kind is text from graph.json: only the kinds n2g draws become a class, never raw text in DOT
        css = kind if kind in ("activator", "wildcard", "start") else "context"
        attrs["class"] = f'"{css}{" end" if ends else ""}"'
        body = ", ".join(f"{k}={v}" for k, v in attrs.items())
        node_lines.append(f"  {ids[n]} [{body}];")
    if summary:
        node_lines.append(f'  more [label=<{html_label_text(more)}>, shape=note, style="filled", fillcolor="#f4f4f4", '
                          'color="#999999", fontsize=11, class="more", tooltip="the full list is on the neuron page"];')
    lines.extend(reversed(node_lines))  # see above: RL draws the last declared at the top

    edges = [(u, v) for u, v in G.edges if u in ids and v in ids]
    edges.sort(key=lambda e: (ids[e[0]], ids[e[1]]))
    for u, v in reversed(edges):
        lines.append(f"  {ids[u]} -> {ids[v]};")
    # activators share the right-most rank
    acts = [ids[n] for n in drawn if G.nodes[n].get("kind") == "activator"]
    if acts:
        column = acts + (["more"] if summary else [])
        lines.append("  { rank=same; " + "; ".join(column) + "; }")
        # invisible edges down the activator column fix its order: strongest on top
        for u, v in zip(column, column[1:]):
            lines.append(f"  {u} -> {v} [style=invis];")
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


class DrawingFailed(N2GError):
    """Graphviz could not draw one graph (it failed on it, or took too long): that graph goes undrawn."""


DOT_SECONDS = 120
"""Longest Graphviz may take to draw one graph (n2g's drawings take well under a second)."""


def _dot_process(args: list[str], source: str) -> subprocess.CompletedProcess:
    # In a session of its own: a terminal's Ctrl-C reaches n2g alone. dot catches SIGINT, writes what it has
    # drawn so far and exits 0, so a drawing cut short would be put in place as whole (and, newer than its
    # graph.json, never drawn again); n2g stops after the drawings under way are finished.
    try:
        return subprocess.run(args, input=source.encode("utf-8"), capture_output=True, timeout=DOT_SECONDS,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise DrawingFailed(f"Graphviz took more than {DOT_SECONDS} s to draw the graph and was stopped; the graph "
                       "file may be damaged: delete it and re-run `n2g run`") from None


def _run_dot(source: str, fmt: str) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise N2GError("Graphviz `dot` is not installed; install graphviz (e.g. `apt-get install graphviz`)")
    proc = _dot_process([exe, f"-T{fmt}"], source)
    if proc.returncode != 0:
        raise DrawingFailed(f"Graphviz failed to render the graph: {proc.stderr.decode('utf-8', 'replace').strip()[:300]}")
    return proc.stdout


def _run_dot_to(source: str, outputs: dict[str, Path]) -> None:
    """Render ``source`` into every ``{format: path}`` with one Graphviz process (one layout)."""
    exe = shutil.which("dot")
    if exe is None:
        raise N2GError("Graphviz `dot` is not installed; install graphviz (e.g. `apt-get install graphviz`)")
    args = [exe] + [a for fmt, path in outputs.items() for a in (f"-T{fmt}", f"-o{path}")]
    proc = _dot_process(args, source)
    if proc.returncode != 0:
        said = " ".join(proc.stderr.decode("utf-8", "replace").split())[:300]
        folder = next(iter(outputs.values())).parent
        try:
            full = shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            full = False
        if full:  # dot says only "gvwrite_no_z problem 7" when it cannot write
            raise N2GError(f"Graphviz could not write the drawing into {folder}: the disk is full ({said}); "
                           "free some space or choose another --out, then re-run the same command")
        raise DrawingFailed(f"Graphviz failed to render the graph: {said}")


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
    if not images:
        return written
    if not dot_available():
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
        if kind == "activator" and a.get("token_id") is None and a.get("token") == "*":
            continue  # the wildcard activator (context rules, the background value) is no token to search for
        if kind == "activator":
            yield a.get("token_id"), a.get("token") or "", "activator", _num(a.get("activation"), 1.0)
        elif kind == "context":
            yield a.get("token_id"), a.get("token") or "", "context", _num(a.get("importance"))
