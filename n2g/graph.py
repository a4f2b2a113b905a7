"""The neuron graph: a token trie rooted at the activating token, growing back through context.

Each path starts at a firing token (the activator) and walks backwards: a context token is kept if
its importance for the activator is at least the threshold, otherwise it becomes a wildcard that
matches any one token; the path stops after the furthest important token and ends in an END that
holds the normalised activation. Paths are merged into a trie keyed by token id (display strings
are attributes); a grown path may also reach the start of the text (:data:`START`, drawn ``⟨start⟩``).
The trie lives in plain lists for fast prediction and converts to a networkx DiGraph for saving
(versioned node-link JSON), rendering and search.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np

from .errors import N2GError, is_whole
from .fileio import read_json, write_json_atomic
from .records import SCHEMA_VERSION, NeuronId, plural

WILDCARD = -1
"""Trie key of a wildcard (any single token)."""
START = 2**31
"""Trie key of the start of the text: matched where a walk steps back past the text's first token (no token
id is this large, see :data:`MAX_TOKEN_ID`). It compares as a token key (``> WILDCARD``): an exact context.
Token-id arrays never hold it; a walk derives it from the position."""
GRAPH_SCHEMA_VERSION = 2
"""The newest graph.json this n2g reads. 2: a graph may hold a start node (kind "start"), which an n2g reading up
to 1 would misread; a graph without one is still written as 1 (:data:`n2g.records.SCHEMA_VERSION`), so an older
n2g reads it, and one with a start node tells that n2g to upgrade."""
START_TEXT = "\u27e8start\u27e9"
"""How the start of the text is shown (``⟨start⟩``): not a token's text (a token holding it is shown escaped)."""


def linear_quantiles(groups: list[np.ndarray], qs: Sequence[float]) -> list[np.ndarray]:
    """``[np.quantile(g, qs) for g in groups]`` (the default ``linear`` method), bit for bit, in a
    few array operations for all groups at once: one sort, numpy's own index, weight and
    interpolation formulas. Groups that are empty or hold a NaN go through ``np.quantile``."""
    q = np.asarray(qs, np.float64)
    lens = np.fromiter(map(len, groups), np.intp, len(groups))
    flat = np.concatenate(groups).astype(np.float64, copy=False) if groups else np.zeros(0)
    if not groups or not lens.all() or not np.isfinite(flat).all() or any(np.asarray(g).ndim != 1 for g in groups):
        return [np.quantile(g, qs) for g in groups]
    owner = np.repeat(np.arange(len(groups)), lens)
    ordered = flat[np.lexsort((flat, owner))]
    starts = (np.cumsum(lens) - lens)[:, None]
    n = lens[:, None]
    virtual = (n - 1) * q[None, :]  # numpy: (n - 1) * quantiles
    previous = np.floor(virtual)
    nxt = previous + 1
    above = virtual >= n - 1  # numpy takes the last value there (index -1)
    previous[above] = -1
    nxt[above] = -1
    gamma = virtual - previous.astype(np.intp)
    last = starts + n - 1
    a = ordered[np.where(above, last, starts + previous.astype(np.intp))]
    b = ordered[np.where(above, last, starts + nxt.astype(np.intp))]
    diff = b - a
    out = a + diff * gamma
    out = np.where(gamma >= 0.5, b - diff * (1 - gamma), out)  # numpy's _lerp
    return list(out)


def run_key(k: int) -> int:
    """Trie key of a wildcard run of 0..k tokens (k >= 1): its children match up to k tokens further back."""
    if k < 1:
        raise ValueError("a wildcard run spans at least 0..1 tokens")
    return -1 - k


def run_span(key: int) -> int:
    """k of a wildcard-run key (0 for any other key)."""
    return -1 - key if key < WILDCARD else 0

GRAPH_KIND = "n2g.graph"
MAX_END_COUNT = 1 << 26
"""Most END values a loaded graph may claim in all (held as counts, :class:`SameValues`): far above any fit's evidence."""


class SameValues(Sequence):
    """``n`` copies of one END value, held as one: the evidence a saved graph's END claims (its count),
    read back without a list of ``n`` entries (a file may claim millions). Adding a path to that END
    turns it back into a list."""

    __slots__ = ("value", "n")

    def __init__(self, value: float, n: int):
        self.value, self.n = float(value), int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        picked = range(self.n)[i]  # an IndexError past the end, as a list gives
        return [self.value] * len(picked) if isinstance(i, slice) else self.value

    def __iter__(self):
        return iter([self.value] * self.n) if self.n < 4096 else (self.value for _ in range(self.n))

    def __eq__(self, other) -> bool:
        if isinstance(other, SameValues):
            return (self.n, self.value) == (other.n, other.value) or self.n == other.n == 0
        return isinstance(other, Sequence) and len(other) == self.n and all(v == self.value for v in other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"[{self.value!r}] * {self.n}"


MAX_GRAPH_NODES = 200_000
"""Most nodes a loaded graph may hold: n2g's largest real graphs hold a few thousand (each node costs
memory to load, and predicting walks them)."""
MAX_GRAPH_DEPTH = 512
"""Deepest path a loaded graph may hold (prediction recurses once per level): above any graph n2g writes,
whose paths are at most ``max_context`` (<= 256) tokens plus grown ones (``grow_depth`` <= 64)."""
MAX_PATH_TOKENS = 1 << 21
"""Most tokens all paths of a loaded graph may hold together (each END's depth, summed): the drawing and the
neuron page build every path's text, so a few thousand deep paths from a small file would take gigabytes. n2g's
graphs hold far fewer (a few thousand nodes, most paths a handful of tokens)."""
MAX_TOKEN_ID = 2**31 - 1
"""Largest token id a graph may hold (every tokenizer's ids are far below it)."""


def tree_problem(g: nx.DiGraph) -> str | None:
    """What keeps a loaded node-link graph from being an n2g trie, or None: one ``root``, every other node
    hanging from exactly one parent and reached from the root (no cycle), at most :data:`MAX_GRAPH_NODES`
    nodes, :data:`MAX_GRAPH_DEPTH` levels and :data:`MAX_PATH_TOKENS` tokens in its paths. A graph that is not
    a tree can make drawing and the page's path list cost time and memory quadratic in its size."""
    if g.number_of_nodes() > 2 * MAX_GRAPH_NODES:  # every node may have an END leaf
        return f"it has {g.number_of_nodes():,} nodes, more than the {2 * MAX_GRAPH_NODES:,} n2g loads"
    roots = [n for n, a in g.nodes(data=True) if a.get("kind") == "root"]
    if len(roots) != 1 or g.in_degree(roots[0]) != 0:
        return "it has no single root node"
    for n in g.nodes:
        if n != roots[0] and g.in_degree(n) != 1:
            return f"node {str(n)[:40]!r} hangs from {g.in_degree(n)} nodes, not one"
    depth, queue = {roots[0]: 0}, [roots[0]]
    while queue:
        n = queue.pop()
        for child in g.successors(n):
            if child in depth:
                return "it has a cycle"
            depth[child] = depth[n] + 1
            if depth[child] > MAX_GRAPH_DEPTH + 1:  # + 1: an END leaf below the deepest node
                return f"a path is deeper than the {MAX_GRAPH_DEPTH} levels n2g loads"
            queue.append(child)
    if len(depth) != g.number_of_nodes():
        return "some nodes are not reached from its root (a cycle)"
    tokens = sum(depth[n] - 1 for n, a in g.nodes(data=True) if a.get("kind") == "end")
    if tokens > MAX_PATH_TOKENS:
        return f"its paths hold {tokens:,} tokens in all, more than the {MAX_PATH_TOKENS:,} n2g loads"
    return None


AUTO_QUANTILES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)
"""Quantiles ``calibrate(statistic="auto")`` chooses among."""


MAX_TOKEN_VALUES = 1 << 20
"""At most this many background token values in a graph file."""


def token_value_count(G) -> int:
    """How many tokens hold a background value of their own in a drawn graph (``G.graph["token_values"]``,
    set by :meth:`NeuronGraph.to_networkx`); 0 where absent or not a count n2g could write (a hand-made file)."""
    own = G.graph.get("token_values") if G is not None else None
    return own if isinstance(own, int) and not isinstance(own, bool) and 0 < own <= MAX_TOKEN_VALUES else 0


def _saved_value(value: float, fire_threshold: float) -> float:
    """``value`` rounded to 6 decimals for graph.json, unless that moves it across ``fire_threshold`` (as a
    float32 prediction meets it): a value calibration keeps just below the threshold must stay quiet once saved."""
    rounded = round(value, 6)
    return rounded if (np.float32(rounded) >= fire_threshold) == (np.float32(value) >= fire_threshold) else value


def fires(value: float, threshold: float) -> bool:
    """Whether ``value`` (an END, a normalised activation) fires at ``threshold`` as a prediction does: predictions
    are float32, so a graph.json END of 0.49999999 (a double below 0.5) is predicted 0.5 and fires."""
    v = float(value)
    if not -3.4e38 < v < 3.4e38:  # past float32's range, or NaN: as the double (no overflow warning)
        return v >= threshold
    return bool(np.float32(v) >= threshold)


def shown_fixed(value: float, threshold: float, digits: int = 2) -> str:
    """``value`` with ``digits`` decimals for a text table or a drawing, on the same side of ``threshold`` as the
    value itself (:func:`fires`): an END kept just below the threshold (0.49999997) reads 0.49, never a
    firing-looking 0.50."""
    value = float(value)
    text = f"{value:.{digits}f}"
    if math.isfinite(value) and fires(float(text), threshold) != fires(value, threshold):
        scale = 10 ** digits  # round toward the value's own side instead
        text = f"{(math.ceil(value * scale) if fires(value, threshold) else math.floor(value * scale)) / scale:.{digits}f}"
    elif text.startswith("-") and float(text) == 0.0:
        text = text[1:]  # -0.0001 reads 0.00, not -0.00
    return text


def _token_values(pairs, fire_threshold: float) -> dict[int, float]:
    """A graph file's ``token_values`` ([[token id, value], ...]) checked: token ids, finite values below
    the firing threshold (a background value never fires), at most :data:`MAX_TOKEN_VALUES`."""
    if not isinstance(pairs, list) or len(pairs) > MAX_TOKEN_VALUES:
        raise ValueError(f"token_values is not a list of at most {MAX_TOKEN_VALUES:,} [token id, value] pairs")
    out: dict[int, float] = {}
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"token_values holds {str(pair)[:40]!r}, not a [token id, value] pair")
        t, v = pair
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= MAX_TOKEN_ID:
            raise ValueError(f"token_values: {t!r} is not a token id (a whole number from 0 to {MAX_TOKEN_ID})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v >= fire_threshold:
            raise ValueError(f"token_values: token {t}'s value {v!r} is not a finite number below the firing threshold")
        out[t] = float(v)
    return out


@dataclass
class Node:
    """One trie node."""

    token_id: int | None
    """Token id, ``WILDCARD``, or None for the root."""
    depth: int
    """0 for an activator, d for the token d positions before it; -1 for the root."""
    children: dict[int, int] = field(default_factory=dict)
    """Child key (token id or WILDCARD) -> node index."""
    importance_sum: float = 0.0
    count: int = 0
    end_values: list[float] = field(default_factory=list)
    """Activations of the paths inserted that end here."""
    end: float | None = None
    """The END activation a prediction reaching this node returns (None: no END here)."""
    sources: set[int] = field(default_factory=set)
    """Training excerpts whose paths pass through this node (fitting only; not saved)."""
    strength: bool = False
    """Grown by a strength split (fitting only; not saved): kept while its value differs, though its
    firing decision may equal its parent's (see :func:`n2g.grow.prune_unchanged`)."""
    rank: tuple[int, int] = (0, 0)
    """How specific a match ending here is: (exact context tokens on the path, depth). Matching
    prefers the most specific END, so a wildcard-only branch never shadows a matched context token."""


def path_from(ids: Sequence[int], acts: np.ndarray, imp: np.ndarray, j: int,
              threshold: float) -> list[tuple[int, float]]:
    """The backward path for firing position ``j``: (key, importance) from the activator back."""
    path = [(int(ids[j]), 1.0)]
    furthest = j
    for k in range(j - 1, -1, -1):
        if imp[k, j] >= threshold:
            furthest = k
    for k in range(j - 1, furthest - 1, -1):
        key = int(ids[k]) if imp[k, j] >= threshold else WILDCARD
        path.append((key, float(imp[k, j])))
    return path


class NeuronGraph:
    """A token trie that predicts a neuron's normalised activation from the tokens before it."""

    def __init__(self, end_activation: str = "first", match: str = "greedy", fire_threshold: float = 0.5):
        self.end_activation = end_activation
        self.match = match
        self.fire_threshold = fire_threshold
        self.nodes: list[Node] = [Node(None, -1)]
        self.token_text: dict[int, str] = {}
        self.neuron: NeuronId | None = None
        self.end_quantile: float | None = None
        self.run_parents: set[int] = set()
        """Nodes with a wildcard-run child (matching looks for runs only there)."""
        self.support: dict[int, int] | None = None
        """Training tokens counted at each node by the last calibration (fitting only; not saved)."""
        self.token_values: dict[int, float] = {}
        """Background values of single tokens: a token no path matches is predicted at its value here,
        else at the wildcard activator's END (the background value). All below ``fire_threshold``."""

    # -- building -------------------------------------------------------------------------
    def add_path(self, path: Sequence[tuple[int, float]], activation: float, source: int | None = None) -> int:
        """Insert one path (activator first) ending in an END with ``activation``; returns the end node.

        ``source`` names the training excerpt the path came from (see ``calibrate(sources=...)``).
        """
        at = 0
        for depth, (key, importance) in enumerate(path):
            child = self.nodes[at].children.get(key)
            if child is None:
                child = len(self.nodes)
                self.nodes.append(self._new_node(at, key))
                self.nodes[at].children[key] = child
            at = child
            node = self.nodes[at]
            node.importance_sum += importance
            node.count += 1
            if source is not None:
                node.sources.add(source)
        node = self.nodes[at]
        if not isinstance(node.end_values, list):  # a loaded END's claimed evidence (SameValues)
            node.end_values = list(node.end_values)
        node.end_values.append(float(activation))
        node.end = self._end_value(node.end_values)
        return at

    def _new_node(self, parent: int, key: int) -> Node:
        up = self.nodes[parent]
        depth = up.depth + 1
        exact = up.rank[0] + (1 if key > WILDCARD and parent != 0 else 0)
        return Node(key, depth, rank=(exact, depth))

    def add_child(self, at: int, key: int, sources=()) -> int:
        """The child of ``at`` under ``key``, created if missing (a run child counts as one level deeper)."""
        child = self.nodes[at].children.get(key)
        if child is None:
            child = len(self.nodes)
            self.nodes.append(self._new_node(at, key))
            self.nodes[at].children[key] = child
            if key < WILDCARD:
                self.run_parents.add(at)
        self.nodes[child].sources.update(sources)
        return child

    def compact(self, keep: set[int]) -> None:
        """Drop every node not in ``keep`` (and everything below it); indices are renumbered in order."""
        reach = {0}
        for idx in range(len(self.nodes)):  # children have larger indices than their parent
            if idx in reach:
                for child in self.nodes[idx].children.values():
                    if child in keep:
                        reach.add(child)
        alive = sorted(reach)
        new = {old: k for k, old in enumerate(alive)}
        nodes = []
        for old in alive:
            n = self.nodes[old]
            n.children = {key: new[c] for key, c in n.children.items() if c in new}
            nodes.append(n)
        self.nodes = nodes
        self.support = None  # indices changed: the next calibration counts again
        self.run_parents = {new[a] for a in self.run_parents if a in new
                            and any(k < WILDCARD for k in self.nodes[new[a]].children)}

    def _parents(self) -> list[int]:
        parent = [-1] * len(self.nodes)
        for idx, n in enumerate(self.nodes):
            for child in n.children.values():
                parent[child] = idx
        return parent

    def _end_value(self, values: list[float]) -> float:
        if self.end_activation == "first":
            return values[0]
        if self.end_activation == "max":
            return max(values)
        return float(np.mean(values))

    def add_example(self, ids: Sequence[int], acts: np.ndarray, imp: np.ndarray, threshold: float,
                    source: int | None = None) -> int:
        """Insert a path for every firing position of one example; returns how many were added."""
        added = 0
        for j in range(len(ids)):
            if acts[j] >= self.fire_threshold:
                self.add_path(path_from(ids, acts, imp, j, threshold), float(acts[j]), source)
                added += 1
        return added

    # -- matching -------------------------------------------------------------------------
    def _child(self, at: int, key: int, exclude: int | None) -> int | None:
        """Child of ``at`` under ``key``; with ``exclude``, None when only that excerpt made it."""
        child = self.nodes[at].children.get(key)
        if exclude is not None and child is not None and self.nodes[child].sources == {exclude}:
            return None
        return child

    def match_path(self, ids: Sequence[int], i: int, exclude: int | None = None) -> list[int]:
        """Trie nodes matched walking back from position ``i`` (activator first); [] if none.

        ``greedy`` follows the exact-token child before the wildcard; ``search`` tries every branch
        (exact, wildcard, wildcard run) and keeps the path to the most specific node that holds an
        END: the most exact context tokens, then the deepest (exact wins ties). ``exclude`` matches as if
        the paths of that training excerpt had never been added.
        """
        start = self._child(0, int(ids[i]), exclude)
        if start is None:
            if self.match == "greedy" or WILDCARD not in self.nodes[0].children:
                return []
        if self.match == "greedy":
            path = [start]
            for d in range(1, i + 1):
                nxt = self._child(path[-1], int(ids[i - d]), exclude)
                if nxt is None:
                    nxt = self._child(path[-1], WILDCARD, exclude)
                if nxt is None:
                    break
                path.append(nxt)
            else:  # every token before i matched: one step further back is the start of the text
                nxt = self._child(path[-1], START, exclude)
                if nxt is not None:
                    path.append(nxt)
            return path
        best = self._search(ids, i, start, 1, exclude) if start is not None else None
        wild = self._child(0, WILDCARD, exclude)
        if wild is not None:  # a context activator ("any token after Y"): an exact activator wins ties
            found = self._search(ids, i, wild, 1, exclude)
            if found is not None and (best is None or found[0] > best[0]):
                best = found
        if best is not None:
            return best[1]
        return [start] if start is not None else []

    def _search(self, ids: Sequence[int], i: int, at: int, d: int, exclude: int | None = None):
        """(depth, path) of the deepest END at or below ``at`` over exact, wildcard and run branches."""
        node = self.nodes[at]
        best = (node.rank, [at]) if node.end is not None else None
        if d <= i + 1 and node.children:
            children = node.children
            # one step past the text's first token, only the start of the text is there
            for key in ((int(ids[i - d]), WILDCARD) if d <= i else (START,)):
                child = children.get(key)  # inline lookup: this loop is prediction's hot path
                if child is None or (exclude is not None and self.nodes[child].sources == {exclude}):
                    continue
                found = self._search(ids, i, child, d + 1, exclude)
                if found is not None and (best is None or found[0] > best[0]):
                    best = (found[0], [at] + found[1])
            if at in self.run_parents:
                for key, run in children.items():
                    if key >= WILDCARD:
                        continue
                    for inner, at_d in self._run_matches(ids, i, run, d, run_span(key), exclude):
                        found = self._search(ids, i, inner, at_d + 1, exclude)
                        if found is not None and (best is None or found[0] > best[0]):
                            best = (found[0], [at, run] + found[1])
        return best

    def _run_matches(self, ids: Sequence[int], i: int, run: int, d: int, k: int, exclude: int | None = None):
        """(child, offset) pairs of a run node: a child token found 0..k tokens further back, nearest first."""
        children = self.nodes[run].children
        out = []
        for s in range(k + 1):
            if d + s > i:  # the run reaches past the text's first token: the start of the text may follow
                child = children.get(START) if d + s == i + 1 else None
                if child is not None and not (exclude is not None and self.nodes[child].sources == {exclude}):
                    out.append((child, d + s))
                break
            child = children.get(int(ids[i - d - s]))
            if child is not None and not (exclude is not None and self.nodes[child].sources == {exclude}):
                if all(c != child for c, _ in out):
                    out.append((child, d + s))
        return out

    def deepest_node(self, ids: Sequence[int], i: int) -> int | None:
        """The deepest trie node position ``i`` reaches over exact, wildcard and run branches (exact wins ties)."""
        roots = self.nodes[0].children
        start = roots.get(int(ids[i]))
        wild = roots.get(WILDCARD)
        if wild is None and (start is None or not self.nodes[start].children):
            return start  # no path, or an activator alone: nothing to walk
        best, best_rank = start, self.nodes[start].rank if start is not None else None
        # Below a context activator ("*") only a node with a context token counts: "*" or "* *" alone
        # would match every token. Its branch is explored last, so an exact activator wins ties.
        stack = [] if wild is None else [(wild, 1, False)]
        if start is not None:
            stack.append((start, 1, True))
        while stack:
            at, d, exact_start = stack.pop()
            rank = self.nodes[at].rank
            if (exact_start or rank[0] >= 1) and (best_rank is None or rank > best_rank):
                best, best_rank = at, rank
            if d <= i + 1:
                children = self.nodes[at].children
                if at in self.run_parents:  # runs first on the stack: explored last, lose ties
                    for key, run in children.items():
                        if key < WILDCARD:
                            for inner, at_d in self._run_matches(ids, i, run, d, run_span(key)):
                                stack.append((inner, at_d + 1, exact_start))
                # Pushed wildcard before exact so the exact branch is explored first and wins ties; one step
                # past the text's first token only the start of the text is there.
                for key in ((WILDCARD, int(ids[i - d])) if d <= i else (START,)):
                    child = children.get(key)
                    if child is not None:
                        stack.append((child, d + 1, exact_start))
        if best is None and wild is not None and self.nodes[wild].end is not None:
            return wild  # "any token" with a value of its own (a dense neuron's base, or the background)
        return best

    def match_end(self, ids: Sequence[int], i: int, exclude: int | None = None) -> int | None:
        """Index of the deepest END node on the matched path of position ``i``, or None."""
        roots = self.nodes[0].children
        if WILDCARD not in roots:  # an activator alone (most of them) needs no walk
            start = roots.get(int(ids[i]))
            if start is None:
                return None
            node = self.nodes[start]
            if not node.children:
                if node.end is None or (exclude is not None and node.sources == {exclude}):
                    return None
                return start
        for node in reversed(self.match_path(ids, i, exclude)):
            if self.nodes[node].end is not None:
                return node
        return None

    def predict_sequence(self, ids: Sequence[int], deadline: float | None = None) -> np.ndarray:
        """Normalised prediction for every position of one sequence.

        ``deadline`` (a ``time.monotonic()`` value): raise :class:`TimeoutError` once it has passed, checked
        at each position (a server's budget per request; a graph n2g writes needs microseconds a token)."""
        arr = np.asarray(ids)  # a tensor or array too
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):  # 9.7 was read as token 9, [[...]] a TypeError
            raise N2GError(f"predict_sequence takes one sequence of integer token ids (got {arr.dtype} of shape "
                           f"{arr.shape}); for a batch call NeuronModel.predict or predict_sequence on each row")
        out = np.zeros(len(arr), np.float32)
        roots = self.nodes[0].children
        if not roots or not len(arr):
            return out
        ids = arr.astype(np.int64, copy=False).tolist()
        wild = roots.get(WILDCARD)
        table = self.token_values  # a token no path matches: its own background value, else [*]'s
        if wild is not None and self.nodes[wild].children:  # a context rule: a path may start at any token
            starts = range(len(ids))
        else:  # tokens a path starts at (a dict lookup per token: cheaper than np.isin on a short row)
            starts = [i for i, t in enumerate(ids) if t != WILDCARD and t in roots]
            if wild is not None and self.nodes[wild].end is not None:
                out[:] = self.nodes[wild].end  # [*] alone: every token no path matches
                for i, t in enumerate(ids if table else ()):
                    v = table.get(t)
                    if v is not None:
                        out[i] = v
        for i in starts:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the prediction took longer than its time budget")
            end = self.match_end(ids, i)
            if end is not None:
                out[i] = table.get(ids[i], self.nodes[end].end) if end == wild else self.nodes[end].end
        return out

    def calibrate(self, sequences: Sequence[tuple[Sequence[int], np.ndarray]], backoff: bool = False,
                  statistic: str | float = "mean", min_count: int = 1,
                  sources: Sequence[int | None] | None = None, end_value: str = "quantile",
                  select: Sequence[int] | None = None, subtree: bool = False) -> int:
        """Re-estimate END activations from training tokens; returns how many nodes were set.

        Without ``backoff`` each END reached by training tokens gets the ``statistic`` (mean, or a
        quantile) of their true activations. With ``backoff`` each token counts at the deepest node it
        reaches, and every node that at least ``min_count`` tokens reach becomes an END: a node's value
        then describes the tokens whose context goes no further, and a token whose longer context is
        not matched falls back to what its shorter match predicts. ``statistic="auto"`` picks, from
        :data:`AUTO_QUANTILES`, the quantile whose predictions give the best firing F1 on these same
        tokens (a neuron whose contexts fire only sometimes is then still predicted to fire where
        that pays); the choice is kept in ``end_quantile``. ``sources`` (the training excerpt each
        sequence is, or None) score that F1 out of sample: each token is matched as if the paths its
        own excerpt made were not in the graph, as a token of new text would be; ``select`` (indices
        into ``sequences``) restricts that F1 to some sequences. With ``subtree`` (and ``backoff``), a node
        that fewer than ``min_count`` tokens stop at is valued from every token whose match passes
        through it and matched no further context token (only wildcards below), so a token whose
        contexts were all absorbed by wildcard branches still has a value, while a token seen only
        with a given context token (occlusion found it important) gets none without it. ``end_value="mean"``
        (with ``auto``) stores each node's mean activation instead of the quantile, moved to the
        threshold when the quantile and the mean disagree about firing, so values keep their strength
        and decisions stay those the quantile chose. With ``backoff``, a node reached from an exact
        activator through wildcards alone ("* * [X]") holds no END: its tokens count at the activator.
        """
        roots = self.nodes[0].children
        anywhere = WILDCARD in roots
        chains = self._wildcard_chains() if backoff else {}
        for node in chains:  # "* * [X]" says what X alone says: its tokens count at X
            self.nodes[node].end = None
        reached: dict[int, list[float]] = {}
        shown: dict[int, set[int]] = {}  # node -> training excerpts with a firing token counted there
        for j, (ids, acts) in enumerate(sequences):
            ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
            source = None if sources is None else sources[j]
            for i, t in enumerate(ids):
                if t not in roots and not anywhere:  # reaches no node
                    continue
                node = self.deepest_node(ids, i) if backoff else self.match_end(ids, i)
                node = chains.get(node, node)
                if node is not None:
                    reached.setdefault(node, []).append(float(acts[i]))
                    if source is not None and acts[i] >= self.fire_threshold:
                        shown.setdefault(node, set()).add(source)
        self.support = {node: len(vals) for node, vals in reached.items()}
        if backoff and subtree:  # a node its own tokens cannot value falls back to every token through it
            parent = self._parents()
            through: dict[int, list[float]] = {}
            for node, vals in reached.items():
                up, exact = node, self.nodes[node].rank[0]
                while up > 0 and self.nodes[up].rank[0] == exact:  # only through wildcards: no context token
                    through.setdefault(up, []).extend(vals)  # matched below decides anything
                    up = parent[up]
            for node, vals in through.items():
                if len(reached.get(node, ())) < min_count and len(vals) >= min_count:
                    reached[node] = vals
        chosen = [n for n, values in reached.items() if len(values) >= min_count or self.nodes[n].end is not None]
        values = {n: np.asarray(reached[n]) for n in chosen}
        if statistic == "auto":
            grid = dict(zip(values, linear_quantiles(list(values.values()), AUTO_QUANTILES)))
            if select is not None:  # choose on these sequences only (e.g. a mix shaped like the test split)
                chosen_seqs = [sequences[j] for j in select]
                chosen_src = None if sources is None else [sources[j] for j in select]
                k = self._best_quantile(chosen_seqs, grid, chosen_src, shown)
            else:
                k = self._best_quantile(sequences, grid, sources, shown)
            self.end_quantile = AUTO_QUANTILES[k]
            for node, qs in grid.items():
                value = float(qs[k])
                if end_value == "mean":  # the mean, on the side of the threshold the quantile chose
                    mean = float(np.mean(values[node]))
                    below = float(np.nextafter(np.float32(self.fire_threshold), np.float32(0)))
                    value = max(mean, self.fire_threshold) if value >= self.fire_threshold else min(mean, below)
                self.nodes[node].end = value
            return len(values)
        for node, v in values.items():
            self.nodes[node].end = float(np.mean(v) if statistic == "mean" else np.quantile(v, float(statistic)))
        return len(values)

    def _wildcard_chains(self) -> dict[int, int]:
        """Nodes below an exact activator whose path to it holds wildcards only ("* * [X]"), each
        mapped to that activator: such a node matches every occurrence of X with enough tokens before
        it, so an END there only splits X's evidence by position in the excerpt."""
        parent, out = self._parents(), {}
        for idx in range(1, len(self.nodes)):
            node = self.nodes[idx]
            if node.depth > 0 and node.rank[0] == 0:
                up = idx
                while self.nodes[up].depth > 0:
                    up = parent[up]
                if self.nodes[up].token_id >= 0:
                    out[idx] = up
        return out

    def _best_quantile(self, sequences, grid: dict[int, np.ndarray], sources: Sequence[int | None] | None = None,
                       shown: dict[int, set[int]] | None = None) -> int:
        """Index into AUTO_QUANTILES of the best training firing F1 (ties: the higher quantile).

        ``grid`` holds each calibrated node's value at every quantile of AUTO_QUANTILES. Out of sample
        (``sources``), a node only the token's own excerpt made is skipped, unless ``shown`` (node -> the
        training excerpts with a firing token counted at it) names another excerpt: new text with that
        context is then text the graph knows (pruning put the context in a path from one excerpt, but the
        training text shows it firing elsewhere too).
        """
        if shown and sources is not None:
            made = {node: set(self.nodes[node].sources) for node in shown if self.nodes[node].sources}
            try:
                for node in made:  # (a node no excerpt made is never skipped: it stays so)
                    self.nodes[node].sources |= shown[node]
                return self._best_quantile(sequences, grid, sources)
            finally:
                for node, src in made.items():
                    self.nodes[node].sources = src
        for node in grid:  # the set of ENDs is fixed now; only their values depend on the quantile
            if self.nodes[node].end is None:
                self.nodes[node].end = 0.0
        sources = [None] * len(sequences) if sources is None else sources
        fires: dict[int, list[int]] = {}
        total = 0
        roots = self.nodes[0].children
        anywhere = WILDCARD in roots
        for (ids, acts), source in zip(sequences, sources):
            ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
            fired = np.asarray(acts) >= self.fire_threshold
            total += int(fired.sum())
            for i, t in enumerate(ids):
                if t not in roots and not anywhere:
                    continue
                node = self.match_end(ids, i, source)
                if node is not None:
                    counts = fires.setdefault(node, [0, 0])
                    counts[0 if fired[i] else 1] += 1
        best, best_f1 = len(AUTO_QUANTILES) - 1, -1.0
        for k in reversed(range(len(AUTO_QUANTILES))):  # AUTO_QUANTILES ascends: try the highest first
            tp = fp = 0
            for node, (n_fire, n_quiet) in fires.items():
                value = grid[node][k] if node in grid else self.nodes[node].end
                if value >= self.fire_threshold:
                    tp, fp = tp + n_fire, fp + n_quiet
            f1 = 2 * tp / (2 * tp + fp + (total - tp)) if tp else 0.0
            if f1 > best_f1 + 1e-12:
                best, best_f1 = k, f1
        return best

    # -- inspection -----------------------------------------------------------------------
    def activators(self) -> list[int]:
        """Token ids that start a path (the wildcard activator ``[*]``, which starts at any token, is not one)."""
        return [k for k in self.nodes[0].children if k != WILDCARD]

    def n_paths(self) -> int:
        """Training paths behind the ENDs: how many occurrences were added or counted at them (the ``xN``
        of :meth:`describe`, summed), not how many paths the graph has (that is ``stats()["end"]``)."""
        return sum(len(n.end_values) for n in self.nodes)

    def stats(self) -> dict[str, int]:
        """Node counts by kind (``activator``, ``context``, ``wildcard``), ``end``: the paths a reader sees
        (nodes holding an END), and ``paths``: the training paths behind them (:meth:`n_paths`)."""
        kinds = {"activator": 0, "context": 0, "wildcard": 0, "end": 0}
        for n in self.nodes[1:]:
            if n.depth == 0:
                kinds["activator"] += 1
            elif n.token_id <= WILDCARD:
                kinds["wildcard"] += 1
            else:
                kinds["context"] += 1
            if n.end is not None:
                kinds["end"] += 1
        kinds["paths"] = self.n_paths()
        return kinds

    def tokens(self) -> set[int]:
        """Every concrete token id in the graph (not the start of the text)."""
        return {n.token_id for n in self.nodes[1:] if n.token_id is not None and WILDCARD < n.token_id < START}

    def describe_token(self, token_id: int) -> str:
        return START_TEXT if token_id == START else self.token_text.get(token_id, str(token_id))

    # -- networkx and JSON ----------------------------------------------------------------
    def to_networkx(self) -> nx.DiGraph:
        """DiGraph: root -> activator -> context/wildcard ... with "end" leaf nodes holding activations."""
        g = nx.DiGraph()
        g.add_node("root", kind="root", token_id=None, token="", depth=-1, importance=0.0, activation=0.0, count=0)
        max_end_below = self._max_end_below()
        for idx, n in enumerate(self.nodes[1:], start=1):
            if n.depth == 0:
                kind = "activator"
            elif n.token_id <= WILDCARD:
                kind = "wildcard"
            elif n.token_id == START:
                kind = "start"
            else:
                kind = "context"
            span = run_span(n.token_id)
            g.add_node(
                str(idx), kind=kind, run=span,
                token_id=None if n.token_id <= WILDCARD or n.token_id == START else int(n.token_id),
                token=(("*" if span == 0 else f"*{{0-{span}}}") if n.token_id <= WILDCARD
                       else START_TEXT if n.token_id == START else self.describe_token(int(n.token_id))),
                depth=n.depth,
                importance=1.0 if n.depth == 0 else round(n.importance_sum / max(n.count, 1), 6),
                activation=_saved_value(float(max_end_below[idx]), self.fire_threshold),
                count=n.count,
            )
            if n.end is not None:
                g.add_node(f"{idx}.end", kind="end", token_id=None, token="", depth=n.depth,
                           importance=0.0, activation=_saved_value(float(n.end), self.fire_threshold), count=len(n.end_values))
                g.add_edge(str(idx), f"{idx}.end")
        for idx, n in enumerate(self.nodes):
            for child in n.children.values():
                g.add_edge("root" if idx == 0 else str(idx), str(child))
        if self.token_values:  # how many tokens hold a background value of their own (the summary says so)
            g.graph["token_values"] = len(self.token_values)
        return g

    def _max_end_below(self) -> list[float]:
        best = [0.0] * len(self.nodes)
        for idx in range(len(self.nodes) - 1, -1, -1):  # children always have larger indices
            n = self.nodes[idx]
            values = [best[c] for c in n.children.values()]
            if n.end is not None:
                values.append(n.end)
            best[idx] = max(values, default=0.0)
        return best

    @classmethod
    def from_networkx(cls, g: nx.DiGraph, **kwargs) -> "NeuronGraph":
        problem = tree_problem(g)
        if problem:
            raise ValueError(f"not an n2g trie: {problem}")
        graph = cls(**kwargs)
        index = {"root": 0}
        order = sorted((n for n in g.nodes if g.nodes[n]["kind"] not in ("root", "end")),
                       key=lambda n: (g.nodes[n]["depth"], int(n) if str(n).isdigit() else -1, str(n)))
        for name in order:
            attrs = g.nodes[name]
            parents = list(g.predecessors(name))
            if attrs["kind"] == "wildcard" or (attrs["kind"] == "activator" and attrs.get("token_id") is None):
                key = run_key(int(attrs["run"])) if int(attrs.get("run", 0) or 0) > 0 else WILDCARD
            elif attrs["kind"] == "start":
                if parents[0] == "root":
                    raise ValueError(f"node {str(name)[:40]!r}: the start of the text cannot be an activating token")
                key = START
            else:
                key = attrs["token_id"]
                if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key <= MAX_TOKEN_ID:  # a negative key is a wildcard run
                    raise ValueError(f"node {str(name)[:40]!r}: token_id {key!r} is not a token id (a whole number from 0 to {MAX_TOKEN_ID})")
            node = graph._new_node(index[parents[0]], key)
            node.count, node.importance_sum = int(attrs["count"]), float(attrs["importance"]) * int(attrs["count"])
            index[name] = len(graph.nodes)
            graph.nodes.append(node)
            graph.nodes[index[parents[0]]].children[key] = index[name]
            if key < WILDCARD:
                graph.run_parents.add(index[parents[0]])
            if WILDCARD < key < START:
                if not isinstance(attrs["token"], str):  # printing, drawing and saving the graph read it as text
                    raise ValueError(f"node {str(name)[:40]!r}: token {attrs['token']!r:.40} is not text")
                graph.token_text[key] = attrs["token"]
        total = 0
        for name in g.nodes:
            if g.nodes[name]["kind"] == "end":
                owner = graph.nodes[index[next(iter(g.predecessors(name)))]]  # one parent: tree_problem said so
                owner.end = float(g.nodes[name]["activation"])
                if not math.isfinite(owner.end):
                    raise ValueError(f"END activation {owner.end} is not a finite number")
                count = g.nodes[name]["count"]
                total += count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0
                if isinstance(count, bool) or not isinstance(count, int) or count < 0 or total > MAX_END_COUNT:
                    raise ValueError(f"END node {str(name)[:40]!r}: count {count!r} is not a token count from 0 to {MAX_END_COUNT} "
                                     "(summed over the graph)")
                owner.end_values = SameValues(owner.end, count)
        return graph

    def to_dict(self) -> dict:
        return {
            "kind": GRAPH_KIND,
            "schema_version": GRAPH_SCHEMA_VERSION if any(n.token_id == START for n in self.nodes) else SCHEMA_VERSION,
            "neuron": self.neuron.to_dict() if self.neuron else None,
            "fire_threshold": self.fire_threshold,
            "end_activation": self.end_activation,
            "match": self.match,
            "graph": nx.node_link_data(self.to_networkx(), edges="edges"),
            **({"token_values": [[t, round(v, 6) if round(v, 6) < self.fire_threshold else v]
                                 for t, v in sorted(self.token_values.items())]} if self.token_values else {}),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronGraph":
        if not isinstance(d, dict) or d.get("kind") != GRAPH_KIND:
            what = f"kind={d.get('kind')!r}" if isinstance(d, dict) else f"a JSON {type(d).__name__}"
            raise N2GError(f"not an n2g graph file ({what}); pass a graph.json written by n2g")
        if int(d.get("schema_version", 0)) > GRAPH_SCHEMA_VERSION:
            raise N2GError(f"graph schema {d['schema_version']} is newer than this n2g ({GRAPH_SCHEMA_VERSION}); upgrade n2g")
        end_activation, match = d.get("end_activation", "first"), d.get("match", "greedy")
        fire = d.get("fire_threshold", 0.5)
        if end_activation not in ("first", "mean", "max") or match not in ("greedy", "search"):
            raise ValueError(f"end_activation {end_activation!r} or match {match!r} is not one n2g writes")
        if isinstance(fire, bool) or not isinstance(fire, (int, float)) or not 0 < fire <= 1:
            raise ValueError(f"fire_threshold {fire!r} is not a number in (0, 1]")
        g = nx.node_link_graph(d["graph"], directed=True, edges="edges")
        graph = cls.from_networkx(g, end_activation=end_activation, match=match, fire_threshold=float(fire))
        graph.neuron = NeuronId.from_dict(d["neuron"]) if d.get("neuron") else None
        graph.token_values = _token_values(d.get("token_values", []), graph.fire_threshold)
        return graph

    def save(self, path: str | Path) -> Path:
        if not isinstance(path, (str, os.PathLike)):
            raise N2GError(f"save needs a file path, not {type(path).__name__}; e.g. graph.save('graph.json')")
        if Path(path).is_dir():  # as load says: os.replace onto a folder was an IsADirectoryError traceback
            raise N2GError(f"cannot save the graph to {path}: it is a directory; give the path of a JSON file "
                           "(e.g. graph.json inside it)")
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "NeuronGraph":
        try:
            if Path(path).is_dir():  # not a damaged graph: regenerating would not help
                raise N2GError(f"cannot read graph {path}: it is a directory; give the path of a graph's JSON file "
                               "(a run keeps them as neurons/<key>/graph.json)")
            return cls.from_dict(read_json(path))
        except N2GError:
            raise
        except (OSError, KeyError, ValueError, TypeError, AttributeError, OverflowError, RecursionError,
                IndexError, StopIteration, nx.NetworkXError) as exc:  # a damaged or hand-made file: one line, no traceback
            raise N2GError(f"cannot read graph {path}: {type(exc).__name__}: {str(exc)[:200]}; "
                           "re-run n2g to regenerate it") from None

    def paths(self) -> list[dict]:
        """Every path that ends in an END: those that fire first, then the graded ones, each strongest (END value x
        count) first; see :func:`n2g.render.graph_paths`."""
        from .render import graph_paths

        return graph_paths(self.drawable())  # (its fire threshold: what fires comes first)

    def describe(self, limit: int | None = 20) -> str:
        """The graph as text: a header, then one line per path in reading order, strongest first.

        ``␣in * [␣Paris]  0.92  x12`` reads: " Paris" one token after " in" is predicted 0.92 (of the
        neuron's maximum), from 12 training paths. ``limit`` caps the lines (None: all).
        """
        from .render import path_text

        if limit is not None and (not is_whole(limit) or limit < 0):
            raise N2GError(f"limit must be a whole number of 0 or more, or None for every path (got {limit!r})")
        paths = self.paths()
        st = self.stats()
        name = self.neuron.key if self.neuron else "graph"
        best = self._max_end_below()
        quiet = sum(1 for c in self.nodes[0].children.values() if not fires(best[c], self.fire_threshold))
        acts = f"{st['activator']} activating {plural(st['activator'], 'token')}" + (f" ({quiet} quiet: never predicted to fire)" if quiet else "")
        head = (f"NeuronGraph {name}: {acts}, {st['context']} context, "
                f"{st['wildcard']} wildcard {plural(st['wildcard'], 'node')}, {len(paths)} {plural(len(paths), 'path')} "
                f"(fires at >= {self.fire_threshold:g})")
        if not paths:
            return head + "\n  (no paths: the graph predicts 0 everywhere)"
        shown = paths if limit is None else paths[:limit]
        texts = [path_text(p) for p in shown]
        width = min(max((len(t) for t in texts), default=0), 60)
        lines = [head, "  path in reading order, [activating token]; END value (normalised); training paths"]
        lines += [f"  {t:<{width}}  {shown_fixed(p['end'], self.fire_threshold)}  x{p['count']}" for t, p in zip(texts, shown)]
        if len(paths) > len(shown):
            more = len(paths) - len(shown)
            lines.append(f"  ... {more} more {plural(more, 'path')} (graph.describe(limit=None) lists all)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.describe(limit=None)

    def __repr__(self) -> str:
        return self.describe(limit=5)

    def drawable(self) -> nx.DiGraph:
        """:meth:`to_networkx` with the graph's fire threshold, which the drawing marks quiet activators by."""
        g = self.to_networkx()
        g.graph["fire_threshold"] = self.fire_threshold
        return g

    def _repr_svg_(self) -> str | None:  # notebooks show the graph inline (nothing without Graphviz)
        from .render import dot_available, svg_of

        return svg_of(self.drawable()) if dot_available() else None

    def set_token_text(self, to_text: Callable[[list[int]], list[str]]) -> None:
        ids = sorted(self.tokens())
        self.token_text.update(zip(ids, to_text(ids)))

    def merge_wildcards(self) -> int:
        """Generalise exact contexts to the wildcard beside them (the published ``_merge_ignores``).

        Breadth first from the root: at a node with a wildcard child ``w``, every other child ``c``
        has each of its branches that reach an END (below ``c`` itself) copied under ``w``, following
        nodes already there; a copied END is set only where none is (the first value stays). ``c`` is
        then removed unless it holds an END itself. Copies are visited later, so merges cascade.
        Returns how many children were removed; unreachable nodes are compacted away.
        """
        from collections import deque

        removed = 0
        queue = deque([0])
        while queue:
            at = queue.popleft()
            children = self.nodes[at].children
            wild = children.get(WILDCARD)
            if wild is not None:
                for key, child in list(children.items()):
                    if key == WILDCARD:
                        continue
                    for chain in self._end_chains(child):
                        target = wild
                        for src in chain:
                            node = self.nodes[src]
                            size = len(self.nodes)
                            target = self.add_child(target, node.token_id, node.sources)
                            if len(self.nodes) > size:  # a new copy carries the statistics it stands for
                                self.nodes[target].count = node.count
                                self.nodes[target].importance_sum = node.importance_sum
                        end = self.nodes[chain[-1]].end
                        if self.nodes[target].end is None:
                            self.nodes[target].end = end
                            self.nodes[target].end_values = [float(end)]
                    if self.nodes[child].end is None:
                        del children[key]
                        removed += 1
            queue.extend(self.nodes[at].children.values())
        if removed:
            self.compact(set(range(len(self.nodes))))
        return removed

    def _end_chains(self, at: int) -> list[list[int]]:
        """Node chains from a child of ``at`` down to each descendant that holds an END (pre-order)."""
        chains: list[list[int]] = []
        stack = [(child, [child]) for child in reversed(list(self.nodes[at].children.values()))]
        while stack:
            node, chain = stack.pop()
            if self.nodes[node].end is not None:
                chains.append(chain)
            for child in reversed(list(self.nodes[node].children.values())):
                stack.append((child, chain + [child]))
        return chains
