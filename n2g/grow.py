"""Learning the graph from every training occurrence of its tokens.

Pruning, occlusion and variants propose contexts; this stage lets the training partition decide.
For every activator of the graph (every token that fires somewhere in training, and every pruned
pivot) it gathers all occurrences of that token in the training evidence and grows context
branches greedily, as a classification tree over "does it fire here" whose questions are trie
keys: *is the token d positions back Y* (an exact child, which may continue one position further
back) and *is Y anywhere among the next k tokens back* (a wildcard run of 0..k-1 tokens, then Y;
k is ``run_window``, then doubled up to ``run_max``, each doubling charged ``run_cost`` of G).
A question may also be a set: *is the token d positions back one of S*, where S gathers the
tokens after which X never (or always) fires (each seen ``min_count`` times; or, where that splits
the occurrences cleanly, every such token however rarely seen, see :meth:`Grower._clean_set`;
where one token, exact or in a run, splits the occurrences as purely, that one token is asked instead:
the set would list every token that happened to come before one side).
Occurrences that a proposed branch of wildcards alone ("* * [X]") matches are grown at X itself.
Where branches show one context token at several distances, a run joins them when the training
evidence agrees, reaching as far back as agreeing occurrences show it (:meth:`Grower._join_depths`;
an occurrence another context explains does not stretch it). Each step takes the question with the largest likelihood-ratio gain (the G statistic of the split,
at least ``min_gain``, or a clean split, see :meth:`Grower._clean`) among the occurrences not yet claimed by an earlier branch, so a node gains several children ("X fires unless the token before it is one
of S" is X with an END that fires and a non-firing child per member of S). After calibration on the
same evidence, :func:`prune_unchanged` removes every branch whose firing decision equals the one its
tokens would fall back to, so the trie keeps only what changes predictions on training data. Where
every occurrence fires (or none does), a *strength split* (:meth:`Grower._best_value`) may still add a
context token that changes how strongly ("0.3 two after Y, 0 elsewhere" among quiet ones too); such a
branch stays while its value differs. A strength run whose occurrences all hold Y at one distance is said
as "Y * * [X]", and one that would match an exact branch's occurrences beside it (a run is matched a level
deeper, so it would take them) gives way to Y's best single distance. Branches showing one context token
at several distances are not joined into a run where one distance is clearly stronger
(:meth:`Grower._stronger_distance`).
A run is a leaf: where it would leave its side mixed and an exact question selects the same occurrences,
the exact one is asked, and the wildcard positions it skips are split as a proposed branch's are. Where
no question is admissible, or where it is stronger than the best one that is, one step of lookahead
(:meth:`Grower._lookahead`) asks a token that a second one further back makes admissible ("after Z Y"
where Y alone is mixed, or "after Y, unless Z before Y"). :func:`add_context_activators`
adds rules with no activating token ("any token after Y", with exceptions, after a pair, or with Y within
a reach), and
:func:`drop_explained_activators` then removes exact activators those rules make redundant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from .graph import START, WILDCARD, NeuronGraph, run_key, run_span


def _impurity(n: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Deviance (-2 log-likelihood, nats) of "f of n tokens fire" under its own firing rate."""
    n = np.asarray(n, np.float64)
    f = np.asarray(f, np.float64)
    whole = np.maximum(n, 1)  # every log below is of a positive number: no warning to silence (called very often)
    a = np.where(f > 0, f * np.log(np.maximum(f, 1e-300) / whole), 0.0)
    rest = n - f
    b = np.where(rest > 0, rest * np.log(np.maximum(rest, 1e-300) / whole), 0.0)
    return -2.0 * (a + b)


def _split_gain(base, n, f, n1, f1):
    """G statistic of splitting ``n`` occurrences (``f`` firing, deviance ``base``) into ``n1`` (``f1`` firing)
    and the rest; arrays work element-wise."""
    return base - _impurity(n1, f1) - _impurity(n - n1, f - f1)


def _split_lr(a: np.ndarray, side: np.ndarray) -> float:
    """Gaussian likelihood ratio ``n ln(SS_total / SS_within)`` of splitting values ``a`` by the mask ``side``
    (0 when the values do not vary)."""
    total = float(((a - a.mean()) ** 2).sum())
    if total <= 1e-12:
        return 0.0
    within = float(((a[side] - a[side].mean()) ** 2).sum() + ((a[~side] - a[~side].mean()) ** 2).sum())
    return len(a) * float(np.log(total / max(within, 1e-9 * total)))


CLEAN_WINDOW = 8
"""Tokens (ending at an occurrence) that tell repeated text apart for :meth:`Grower._clean`."""
CLEAN_MIN = 3
"""Distinct occurrences each side of a clean split needs."""
JOIN_MIN_DEPTHS = 2
"""Distances a context token must show before :meth:`Grower._join_depths` joins them (at one
distance, "after Y" and "Y within 3" are equally consistent with the evidence; joining those cost
planted "X unless after one of 10" on real text)."""
JOIN_MAX = 8
"""Largest distance :meth:`Grower._join_depths` joins over (``run_max`` when that is larger)."""
VALUE_DELTA = 0.2
"""Least difference of mean activation (normalised) between the sides of a strength split."""


REFINE_TOKENS = 3
"""Of each run span's best tokens, how many have their reach refined within the span (:meth:`Grower._refined_reaches`)."""

SET_CHANCE = 0.2
"""A set question's member (a token after which X never fires, or always fires) must be that pure with
probability at most this by chance, given how often it is seen and X's firing share where it is asked."""


def _value_lr(a: np.ndarray, tok: np.ndarray, occ: np.ndarray, m: int) -> np.ndarray:
    """Per token (of ``m``): Gaussian likelihood ratio ``n ln(SS_total/SS_within)`` of splitting the activations
    ``a`` into the occurrences with it and the rest, for pairs (``tok``, ``occ``) of a token index and an index into
    ``a`` (each pair once); -inf where a side has fewer than ``CLEAN_MIN`` or the means differ by less than
    ``VALUE_DELTA``."""
    n, total_sum, total_sq = len(a), float(a.sum()), float((a * a).sum())
    total = total_sq - total_sum ** 2 / n
    if total <= 1e-12 or not len(tok):
        return np.full(m, -np.inf)
    counts = np.bincount(tok, minlength=m)
    sums = np.bincount(tok, weights=a[occ], minlength=m)
    sq = np.bincount(tok, weights=a[occ] ** 2, minlength=m)
    rest_n = n - counts
    with np.errstate(divide="ignore", invalid="ignore"):
        inside = sq - sums ** 2 / counts
        outside = (total_sq - sq) - (total_sum - sums) ** 2 / np.maximum(rest_n, 1)
        within = np.maximum(inside + outside, 1e-9 * total)
        lr = n * np.log(total / within)
        delta = np.abs(sums / counts - (total_sum - sums) / np.maximum(rest_n, 1))
    return np.where((counts >= CLEAN_MIN) & (rest_n >= CLEAN_MIN) & (delta >= VALUE_DELTA), lr, -np.inf)


def _with_start(ids: np.ndarray, acts: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Evidence arrays with a first column: ``START`` where the row starts a text (``starts``), else -1
    (padding: no token, as before single-token evidence, whose text went on before it); activation 0 there."""
    lead = np.where(np.asarray(starts, bool), START, -1).astype(ids.dtype)
    return (np.concatenate([lead[:, None], ids], axis=1),
            np.concatenate([np.zeros((len(acts), 1), acts.dtype), acts], axis=1))


def _mixed(fires: np.ndarray) -> bool:
    """Whether some of these occurrences fire and some do not."""
    return bool(fires.any() and not fires.all())


def run_spans(run_window: int, run_max: int | None = None) -> list[int]:
    """Reaches of the run questions: ``run_window``, then doubled up to ``run_max`` (3, 6, 12, ...)."""
    top = max(run_window, run_max or run_window)
    spans = [run_window]
    while spans[-1] < top:
        spans.append(min(2 * spans[-1], top))
    return spans


class Grower:
    """Grows context branches of a graph from evidence arrays ``ids``/``acts`` (``[n, length]``)."""

    def __init__(self, graph: NeuronGraph, ids: np.ndarray, acts: np.ndarray, sources: np.ndarray, *,
                 min_count: int = 3, max_depth: int = 2, max_children: int = 12, run_window: int = 3,
                 min_gain: float = 10.0, skip_questions: bool = False, skip_cost: float = 2.0,
                 split_wildcards: bool = False, set_cost: float = 2.0, clean_gain: float = 0.0,
                 grow_below: bool = False, value_gain: float = 0.0, join_depths: bool = False,
                 run_max: int | None = None, run_cost: float = 2.0, starts: np.ndarray | None = None):
        # With ``starts`` (per row: whether it starts a text) the arrays gain a first column holding the start
        # of the text (``START``, a token to every question) or padding, so "is the position d back the start"
        # is asked like any token; rows handed to the graph's matching leave it out (``shift``).
        self.shift = 0 if starts is None else 1
        if starts is not None:
            ids, acts = _with_start(ids, acts, starts)
        self.graph, self.ids, self.acts, self.sources = graph, ids, acts, sources
        self.fires = acts >= graph.fire_threshold
        self.min_count, self.max_depth, self.max_children = min_count, max_depth, max_children
        self.run_window, self.min_gain = run_window, min_gain
        self.skip_questions, self.skip_cost = skip_questions, skip_cost
        self.split_wildcards = split_wildcards
        self.set_cost = set_cost
        self.clean_gain = clean_gain
        self.grow_below = grow_below
        self.value_gain = value_gain
        self.join_depths = join_depths
        # Runs are asked at run_window, then doubled up to run_max ("Y within 3", 6, 12, ... before X);
        # each doubling costs run_cost of G, as more tokens in reach give more chances to fit noise.
        self.run_spans = run_spans(run_window, run_max)
        self.run_cost = run_cost

    def grow(self, only: Iterable[int] | None = None) -> int:
        """Grow every activator (or the activators of the tokens ``only``); returns how many nodes were added."""
        before = len(self.graph.nodes)
        roots = self.graph.nodes[0].children
        if not roots:
            return 0
        wanted = None if only is None else set(only)
        keys = np.fromiter((k for k in roots if k != WILDCARD and (wanted is None or k in wanted)), np.int64)
        rows, cols = np.nonzero(np.isin(self.ids, keys))
        tokens = self.ids[rows, cols]
        order = np.argsort(tokens, kind="stable")
        rows, cols, tokens = rows[order], cols[order], tokens[order]
        bounds = np.flatnonzero(np.diff(tokens)) + 1
        lists, parent = {}, []
        deepest_of = lambda r, c: np.fromiter((self.graph.deepest_node(self._row(lists, rr), cc - self.shift)
                                               for rr, cc in zip(r, c)), np.int64, len(r))
        for r, c in zip(np.split(rows, bounds), np.split(cols, bounds)):
            if not len(r):
                continue
            node = roots[int(self.ids[r[0], c[0]])]
            if len(self.graph.nodes[node].children):  # occurrences a proposed branch explains stay with it
                deepest = deepest_of(r, c)
                if len(parent) != len(self.graph.nodes):  # nodes are only appended while growing
                    parent = self.graph._parents()
                if self.split_wildcards:
                    for at in np.unique(deepest).tolist():
                        if at != node:
                            self._split_wildcards(at, parent, r[deepest == at], c[deepest == at])
                if self.grow_below:  # a proposed branch is grown further back from the occurrences it explains
                    if len(parent) != len(self.graph.nodes):  # new wildcard siblings may explain some of them now
                        parent, deepest = self.graph._parents(), deepest_of(r, c)
                    for at in np.unique(deepest).tolist():
                        depth = self._fixed_depth(at, parent)
                        # not below a proposed chain of two or more wildcards alone ("* * [X]"): it holds every
                        # occurrence of X, about whose earlier tokens X's own questions (charged) already ask
                        wild_only = depth is not None and depth >= 2 and self.graph.nodes[at].rank[0] == 0
                        if at != node and depth is not None and depth < self.max_depth and not wild_only:
                            self._grow(at, r[deepest == at], c[deepest == at], depth + 1, self.max_depth - depth)
                # a proposed chain of wildcards alone ("* * [X]") says nothing the activator does not
                keep = (deepest == node) | np.fromiter((self.graph.nodes[at].rank[0] == 0 for at in deepest.tolist()),
                                                      bool, len(deepest))
                r, c = r[keep], c[keep]
            if len(r):
                self._grow(node, r, c, 1, self.max_depth)
        if self.join_depths:
            dropped: set[int] = set()
            for token, node in list(roots.items()):
                if token != WILDCARD and (wanted is None or token in wanted):
                    dropped |= self._join_depths(node)
            if dropped:
                self.graph.compact(set(range(len(self.graph.nodes))) - dropped)
                return len(self.graph.nodes) - before + len(dropped)  # nodes added (some replaced others)
        return len(self.graph.nodes) - before

    def _join_depths(self, node: int) -> set[int]:
        """Say "Y anywhere in the D tokens before X" where branches show Y at two or more distances.

        Pruning and growing see each occurrence at its own distance, so "X fires when Y is within 6"
        comes out as "Y * * [X]" and "Y * * * * * [X]" and a held-out Y four back is missed. Where
        every training occurrence of X with Y among the D tokens before it (D the largest of those
        distances, at most ``JOIN_MAX``; widened to ``run_window`` when the evidence there agrees too;
        with ``run_max`` set, as far as :meth:`_widest_agreeing` finds support, so "X when X occurred in
        the 20 tokens before" is one run) fires, or none does, and at least ``CLEAN_MIN`` distinct ones
        do, a wildcard run "Y *{0..D-1} [X]" replaces them (exact branches with no branches of their
        own are unlinked; returns their indices, for the caller to compact the graph). With ``value_gain``,
        not where one distance is clearly stronger than the others (:meth:`_stronger_distance`): one run
        would hold their mean.
        """
        depths: dict[int, set[int]] = {}
        leaves: dict[int, list[tuple[int, int]]] = {}  # Y -> (parent, node) of exact branches that end at Y
        stack = [(node, 0)]
        while stack:  # branches "Y * ... * [X]": wildcards, then one token
            at, d = stack.pop()
            for key, child in self.graph.nodes[at].children.items():
                if key == WILDCARD:
                    stack.append((child, d + 1))
                elif key >= 0 and d + 1 <= max(JOIN_MAX, self.run_spans[-1]):
                    depths.setdefault(key, set()).add(d + 1)
                    if not self.graph.nodes[child].children:
                        leaves.setdefault(key, []).append((at, child))
        joinable = sorted((y, ds) for y, ds in depths.items() if len(ds) >= JOIN_MIN_DEPTHS)
        dropped: set[int] = set()
        if not joinable:
            return dropped
        rows, cols = np.nonzero(self.ids == self.graph.nodes[node].token_id)
        contexts = self._context_tokens(node, rows, cols)
        for y_token, ds in joinable:
            if len(self.run_spans) > 1:
                # an occurrence another context explains ("Z [X]" of "X after Z, or Y within 6") does not
                # stretch the run: it agrees for its own reason (it may still stop the run)
                others = np.fromiter((bool(t) and y_token not in t for t in contexts), bool, len(rows))
                found = self._widest_agreeing(rows, cols, y_token, max(ds), others)
                if found is None:
                    continue  # some fire and some do not: the distance matters
                span, r, c = found
            else:
                # as wide as a grown run, if the evidence agrees there too
                for span in dict.fromkeys((max(max(ds), self.run_window), max(ds))):
                    if span < 2:
                        continue
                    near = self._seen(rows, cols, y_token, range(1, span + 1))
                    r, c = rows[near], cols[near]
                    fired = self.fires[r, c]
                    if near.any() and fired.all() == fired.any() and len(self._distinct(r, c)) >= CLEAN_MIN:
                        break
                else:
                    continue  # some fire and some do not: the distance matters
            if self.value_gain and self._stronger_distance(r, c, span, y_token) is not None:
                continue  # the distances agree on firing, not on strength: each keeps its own branch
            sources = set(self.sources[r].tolist())
            run = self.graph.add_child(node, run_key(span - 1), sources)
            self.graph.add_child(run, y_token, sources)
            for parent, leaf in leaves.get(y_token, ()):
                del self.graph.nodes[parent].children[y_token]
                dropped.add(leaf)
            for key, other in list(self.graph.nodes[node].children.items()):
                # a grown run of another reach for the same Y would shadow this one, whose reach the
                # evidence checked: it goes (and its run node with it, left without children)
                leaf = self.graph.nodes[other].children.get(y_token)
                if key < WILDCARD and other != run and leaf is not None and not self.graph.nodes[leaf].children:
                    del self.graph.nodes[other].children[y_token]
                    dropped.add(leaf)
                    if not self.graph.nodes[other].children:
                        del self.graph.nodes[node].children[key]
                        dropped.add(other)
        return dropped

    def _seen(self, rows: np.ndarray, cols: np.ndarray, token: int, distances) -> np.ndarray:
        """Per occurrence: whether ``token`` is at one of ``distances`` before it (1 = right before)."""
        near = np.zeros(len(rows), bool)
        for d in distances:
            ok = cols - d >= 0
            near[ok] |= self.ids[rows[ok], cols[ok] - d] == token
        return near

    def _context_tokens(self, node: int, rows: np.ndarray, cols: np.ndarray) -> list[frozenset]:
        """Per occurrence of ``node``'s token: the context tokens on the path to the deepest node it reaches
        below ``node`` (empty where it reaches none, or only wildcards)."""
        parent = self.graph._parents()
        cache: dict = {}
        out = []
        for r, c in zip(rows.tolist(), cols.tolist()):
            at = self.graph.deepest_node(self._row(cache, r), c - self.shift)
            tokens = set()
            while at is not None and at > 0 and at != node:
                key = self.graph.nodes[at].token_id
                if key is not None and key > WILDCARD:
                    tokens.add(key)
                at = parent[at]
            out.append(frozenset(tokens) if at == node else frozenset())
        return out

    def _widest_agreeing(self, rows, cols, y_token: int, seen: int, others: np.ndarray | None = None):
        """(D, rows, cols) of the run "Y within D before X" the evidence supports, or None.

        ``seen`` is the largest distance a branch showed Y at. Every occurrence of X whose nearest Y is
        within ``seen`` must agree (all fire, or none does). The run then reaches as far as the
        agreeing occurrences show Y (at least ``seen``), widened to the narrowest grown run span
        covering that, and stops short of the nearest Y of the first occurrence that disagrees. At
        least ``CLEAN_MIN`` distinct occurrences at ``JOIN_MIN_DEPTHS`` distances must agree. Occurrences
        flagged in ``others`` (another context explains them) can stop the run but do not stretch it.
        """
        top = self.run_spans[-1]
        nearest = np.full(len(rows), top + 1)
        for d in range(top, 0, -1):  # the nearest Y wins: written last
            ok = cols - d >= 0
            hit = np.zeros(len(rows), bool)
            hit[ok] = self.ids[rows[ok], cols[ok] - d] == y_token
            nearest[hit] = d
        fires = self.fires[rows, cols]
        inside = nearest <= seen
        if not inside.any() or fires[inside].all() != fires[inside].any():
            return None
        side = fires[inside][0]
        wrong = (nearest <= top) & (fires != side)
        limit = int(nearest[wrong].min()) - 1 if wrong.any() else top
        agree = (nearest <= limit) & (fires == side) & (True if others is None else ~others)
        shown = max(seen, int(nearest[agree].max())) if agree.any() else seen
        span = min(limit, next((w for w in self.run_spans if w >= shown), shown))
        keep = nearest <= span
        r, c = rows[keep], cols[keep]
        if span < 2 or len(self._distinct(r, c)) < CLEAN_MIN or len(np.unique(nearest[keep])) < JOIN_MIN_DEPTHS:
            return None
        return span, r, c

    def _split_wildcards(self, node: int, parent: list[int], rows: np.ndarray, cols: np.ndarray,
                         grown: bool = False) -> None:
        """Ask about the wildcard positions of a proposed branch, from the occurrences it explains.

        A branch such as "Y * [X]" made by pruning may cover occurrences that fire and others that do
        not, told apart by the token the wildcard stands for. The best question "is the token there one
        of S" becomes a sibling branch per member ("Y Z [X]"), which matching prefers to the wildcard
        (more exact context tokens), so calibration values the two apart.
        """
        keys = []
        at = node
        while at > 0:
            keys.append(self.graph.nodes[at].token_id)
            at = parent[at]
        keys.reverse()  # activator first, then 1, 2, ... positions back
        if any(k < WILDCARD for k in keys[1:]):
            return  # a run: positions below it are not fixed
        holes = [d for d, k in enumerate(keys) if d > 0 and k == WILDCARD]
        if not holes or (self.graph.nodes[node].end is None and not grown):
            return
        remaining = np.ones(len(rows), bool)
        for _ in range(self.max_children):
            idx = np.flatnonzero(remaining)
            r, c = rows[idx], cols[idx]
            y = self.fires[r, c]
            n, f = len(idx), int(y.sum())
            if n < 2 * self.min_count or f == 0 or f == n:
                return
            base = float(_impurity(n, f))
            best, hole = None, 0
            for d in holes:
                found = self._best_exact(r, c, y, d, n, f, base)
                if found is not None and (best is None or found[1] > best[1] + 1e-9):
                    best, hole = found, d
            if best is None or (best[1] < self.min_gain and not self._clean(r, c, y, best)):
                return
            kind, _, token, member = best
            chosen = idx[member]
            members = [token] if kind == "exact" else token
            there = self.ids[rows[chosen], cols[chosen] - hole]
            for t in members:
                mine = chosen[there == t]
                excerpt_ids = set(self.sources[rows[mine]].tolist())
                at = self.graph.nodes[0].children[keys[0]]
                for d, k in enumerate(keys[1:], start=1):
                    at = self.graph.add_child(at, t if d == hole else k, excerpt_ids)
            remaining[chosen] = False

    def _fixed_depth(self, node: int, parent: list[int]) -> int | None:
        """Positions back of ``node``'s token when every key above it is a token or a single wildcard
        (None below a wildcard run, whose length varies)."""
        at = node
        while at > 0:
            if self.graph.nodes[at].token_id < WILDCARD:
                return None
            at = parent[at]
        return self.graph.nodes[node].depth

    def _row(self, cache: dict, r: int) -> list[int]:
        """Row ``r`` as the graph matches it (without the start column; a column there is ``c - shift``)."""
        if r not in cache:
            cache[r] = self.ids[r, self.shift:].tolist()
        return cache[r]

    def _grow(self, node: int, rows: np.ndarray, cols: np.ndarray, offset: int, depth_left: int) -> None:
        remaining = np.ones(len(rows), bool)
        peeled = []  # (token, occurrences) of each exact or set question about the position right before
        for _ in range(self.max_children):
            idx = np.flatnonzero(remaining)
            r, c = rows[idx], cols[idx]
            y = self.fires[r, c]
            n, f = len(idx), int(y.sum())
            if n < 2 * self.min_count:
                return
            if f == 0 or f == n:  # every occurrence fires (or none does): only a strength can differ
                best = self._best_value(r, c, offset, (node, rows, cols)) if self.value_gain else None
                if best is None:
                    return
                kind, _, token, member = best
                chosen = idx[member]
                excerpt_ids = set(self.sources[rows[chosen]].tolist())
                if kind == "exact":
                    child = self.graph.add_child(node, token, excerpt_ids)
                    if depth_left > 1:
                        self._grow(child, rows[chosen], cols[chosen], offset + 1, depth_left - 1)
                elif kind[0] == "skip":  # "Y * * [X]": the token at one distance, past wildcards; a leaf
                    at = node
                    for _ in range(kind[1]):
                        at = self.graph.add_child(at, WILDCARD, excerpt_ids)
                    child = self.graph.add_child(at, token, excerpt_ids)
                else:  # ("run", span): a leaf, as a grown run is
                    child = self.graph.add_child(self.graph.add_child(node, run_key(kind[1] - 1), excerpt_ids),
                                                 token, excerpt_ids)
                self.graph.nodes[child].strength = True
                remaining[chosen] = False
                continue
            base = float(_impurity(n, f))
            # Every question: (gain after costs, question, wildcards skipped, clean set). One is admissible
            # with a gain of at least min_gain, or when it splits cleanly; the best admissible one wins.
            questions, cleans = [], []
            for s in range(depth_left if self.skip_questions else 1):  # the token s+1 positions back, s wildcards between
                tally = self._tally(r, c, y, offset + s)
                found = self._best_exact(r, c, y, offset + s, n, f, base, tally)
                if found is not None:
                    questions.append((found[1] - self.skip_cost * s, found, s, False))
                clean = self._clean_set(r, c, y, base, tally)  # every member, seen once or more
                if clean is not None:
                    cleans.append((clean[1] - self.skip_cost * s, clean, s, True))
            if self.run_window > 1:
                for i, run in enumerate(self._best_runs(r, c, y, offset, n, f, base)):
                    if run is not None:
                        questions.append((run[1] - self.run_cost * i, run, 0, False))
            questions += cleans  # last: a tie goes to a single token
            pick = None
            for q in questions:
                if (pick is None or q[0] > pick[0] + 1e-9) and (q[3] or q[0] >= self.min_gain or self._clean(r, c, y, q[1], runs=True)):
                    pick = q
            if depth_left > 1:  # a token that a second one further back makes stronger than any question alone
                ahead = self._lookahead(r, c, y, offset, n, f, base, questions)
                if ahead is not None and (pick is None or ahead[1] > pick[0] + 1e-9):
                    pick = ahead[0]
            if pick is None:
                return
            if pick[3]:  # a clean set lists every token seen before one side; one token that splits as purely says it
                for q in questions:
                    if (not q[3] and self._pure(y, q[1][3]) and (pick[3] or q[0] > pick[0] + 1e-9)
                            and (q[0] >= self.min_gain or self._clean(r, c, y, q[1], runs=True))):
                        pick = q
            if pick[1][0][0] == "run" and _mixed(y[pick[1][3]]):
                # a run is a leaf: where it leaves its side mixed, an exact question on the same occurrences
                # ("Y * [X]" for "Y within 3") can still be refined, so it is asked instead
                exact = [q for q in questions if not q[3] and q[1][0] == "exact"]
                same = [q for q in exact if np.array_equal(np.sort(q[1][3]), pick[1][3])]
                if not same:  # else the best exact question that is admissible on its own: it can be refined
                    same = [q for q in exact if q[0] >= self.min_gain or self._clean(r, c, y, q[1], runs=True)]
                if same:
                    pick = max(same, key=lambda q: q[0])
            gain, found, skip, _ = pick
            best = (found[0], gain, found[2], found[3])
            kind, _, token, member = best
            chosen = idx[member]
            if kind in ("exact", "set"):
                members = [token] if kind == "exact" else token
                prev = self.ids[rows[chosen], cols[chosen] - offset - skip]
                at = node
                for _ in range(skip):  # positions the question skips are wildcards
                    at = self.graph.add_child(at, WILDCARD, set(self.sources[rows[chosen]].tolist()))
                for t in members:
                    mine = chosen[prev == t]
                    if not skip:
                        peeled.append((t, mine))
                    child = self.graph.add_child(at, t, set(self.sources[rows[mine]].tolist()))
                    if len(mine) < self.min_count and self.graph.nodes[child].end is None:
                        # a member of a clean set seen once: an END now, so calibration values it from one token
                        self.graph.nodes[child].end = float(np.mean(self.acts[rows[mine], cols[mine]]))
                    if depth_left - skip > 1:
                        self._grow(child, rows[mine], cols[mine], offset + skip + 1, depth_left - skip - 1)
                    if skip and self.split_wildcards and _mixed(self.fires[rows[mine], cols[mine]]):
                        self._split_wildcards(child, self.graph._parents(), rows[mine], cols[mine], grown=True)
            else:  # kind is ("run", span)
                excerpt_ids = set(self.sources[rows[chosen]].tolist())
                run_node = self.graph.add_child(node, run_key(kind[1] - 1), excerpt_ids)
                self.graph.add_child(run_node, token, excerpt_ids)
                for z, earlier in peeled:
                    self._keep_peeled(node, rows[earlier], cols[earlier], offset, kind[1], token, z)
            remaining[chosen] = False

    def _keep_peeled(self, node, rows, cols, offset, span, y_token, z):
        """A run "Y within k" grown after an exact question "Z [X]" (whose occurrences it no longer saw) would
        outrank it where both match: a run counts one level deeper. Where some of Z's occurrences have Y within
        reach, "Y *{0..k-2} Z [X]" keeps them with Z ("X with Y within 3, unless Z right before X"); branch
        pruning removes it where it changes no prediction."""
        near = self._seen(rows, cols, y_token, range(offset + 1, offset + span))
        if not near.any():
            return
        excerpt_ids = set(self.sources[rows[near]].tolist())
        at = self.graph.nodes[node].children[z]
        if span > 2:
            at = self.graph.add_child(at, run_key(span - 2), excerpt_ids)
        self.graph.add_child(at, y_token, excerpt_ids)

    def _lookahead(self, r, c, y, offset, n, f, base, questions, top: int = 3):
        """A question that a second token further back makes strong: "X fires after Z Y" where Y alone (after
        Z or not) is mixed, or "X fires after Y, unless Z before Y". Of the ``top`` best exact questions, the
        first whose side a second exact question (one more position back) splits so that the two together, or
        Y's side without the second token, would be admissible (gain against every other occurrence, less
        ``skip_cost`` for the second token, at least ``min_gain``, or clean): (that question, the gain); None
        if none. Asked where no question is admissible alone, and taken over one that is where its gain is
        higher (a set of background tokens that happen to fire is then not listed instead)."""
        exact = sorted((q for q in questions if not q[3] and q[2] == 0 and q[1][0] == "exact"), key=lambda q: -q[0])
        for q in exact[:top]:
            side = q[1][3]
            y2 = y[side]
            n2, f2 = len(side), int(y2.sum())
            if n2 < 2 * self.min_count or f2 in (0, n2):
                continue
            found = self._best_exact(r[side], c[side], y2, offset + 1, n2, f2, float(_impurity(n2, f2)))
            if found is None or found[0] != "exact":
                continue
            pair = side[found[3]]
            # the pair, or the rest of Y's side: "X after Y, unless Z before Y" is Y's side without the pair
            for group in (pair, np.setdiff1d(side, pair)):
                n1, f1 = len(group), int(y[group].sum())
                if not n1:
                    continue
                g = float(_split_gain(base, n, f, n1, f1)) - self.skip_cost
                if g >= self.min_gain or self._clean(r, c, y, ("exact", g, found[2], group)):
                    return q, g
        return None

    def _distinct(self, r: np.ndarray, c: np.ndarray) -> np.ndarray:
        """Indices of the first occurrence per distinct window of ``CLEAN_WINDOW`` tokens ending at it:
        repeated text (the same passage twice in a corpus) is one piece of evidence, not several."""
        first: dict[tuple, int] = {}
        for k, (rr, cc) in enumerate(zip(r.tolist(), c.tolist())):
            first.setdefault(tuple(self.ids[rr, max(0, cc - CLEAN_WINDOW + 1): cc + 1].tolist()), k)
        return np.fromiter(first.values(), np.int64, len(first))

    def _best_value(self, r, c, offset, where=None):
        """Among occurrences that all fire (or that none do): the token ``offset`` back after which the activation is
        clearly stronger or weaker ("X at 1.0 after Y Y, 0.6 after Y"), or with runs (``run_window`` > 1) the
        token anywhere among the ``k`` tokens from there back ("X at 1.0, at 0.5 with Y within 3"; each doubling of
        ``k`` past ``run_window`` charged ``run_cost``): the split's Gaussian likelihood ratio
        ``n ln(SS_total/SS_within)`` at least ``value_gain``, means at least ``VALUE_DELTA`` apart, at least
        ``CLEAN_MIN`` distinct occurrences (repeated text counts once) on each side. An exact token wins a tie.
        A run whose occurrences hold Y at one distance only, where no other occurrence holds it, is returned
        as ``(("skip", d), ...)``: Y exactly ``d`` wildcards further back. With ``where`` (the node and all its
        occurrences), a run that would match occurrences of an exact child of the node (:meth:`_shadows`)
        gives way to the best single distance of Y among its occurrences, or to nothing."""
        keep = self._distinct(r, c)
        if len(keep) < 2 * CLEAN_MIN:
            return None
        a = self.acts[r[keep], c[keep]].astype(np.float64)
        ok = c[keep] - offset >= 0
        prev = np.where(ok, self.ids[r[keep], np.maximum(c[keep] - offset, 0)], -1)
        ok &= prev >= 0
        uniq, inv = np.unique(prev[ok], return_inverse=True)
        lr = _value_lr(a[ok], inv, np.arange(len(inv)), len(uniq)) if ok.sum() >= 2 * CLEAN_MIN else np.zeros(0)
        best = None
        if len(lr) and np.isfinite(lr.max()):
            j = int(np.argmax(lr))
            member = np.flatnonzero((c - offset >= 0) & (self.ids[r, np.maximum(c - offset, 0)] == uniq[j]))
            best = ("exact", float(lr[j]), int(uniq[j]), member)
        found = self._nearest(r, c, offset) if self.run_window > 1 else None
        if found is not None:
            tokens, pair_tok, pair_occ, dist = found
            pos = np.full(len(r), -1)
            pos[keep] = np.arange(len(keep))  # an occurrence's index into ``a``; -1: repeated text
            for i, span in enumerate(self.run_spans):
                near = (dist < span) & (pos[pair_occ] >= 0)
                lr = _value_lr(a, pair_tok[near], pos[pair_occ[near]], len(tokens)) - self.run_cost * i
                j = int(np.argmax(lr))
                if np.isfinite(lr[j]) and (best is None or lr[j] > best[1] + 1e-9):
                    best = (("run", span), float(lr[j]), int(tokens[j]), np.sort(pair_occ[(pair_tok == j) & (dist < span)]))
        if best is None or best[1] < self.value_gain:
            return None
        if best[0] != "exact":
            # a run whose occurrences all hold Y at one distance, and that no other occurrence holds there,
            # is said as "Y * * [X]": a run is matched one level deeper than the exact branches beside it
            # ("Y [X]" at 1.0, "Y * [X]" at 0.7) and would take their occurrences from them
            member = best[3]
            at = np.unique(dist[(pair_tok == np.searchsorted(tokens, best[2])) & np.isin(pair_occ, member)])
            if len(at) == 1 and at[0] > 0:
                there = np.flatnonzero(self._seen(r, c, best[2], [offset + int(at[0])]))
                if np.array_equal(there, member):
                    return (("skip", int(at[0])), best[1], best[2], member)
            if where is not None and self._shadows(*where, offset, best[0][1], best[2]):
                # the run would outrank an exact branch beside it on that branch's own occurrences: the
                # best single distance of Y instead ("Y * [X]" at 0.45, then "Y * * [X]" at 0.2)
                pick = None
                for d in at.tolist():
                    side = self._seen(r[keep], c[keep], best[2], [offset + d])
                    if min(side.sum(), (~side).sum()) < CLEAN_MIN or abs(a[side].mean() - a[~side].mean()) < VALUE_DELTA:
                        continue
                    lr = _split_lr(a, side)
                    if lr >= self.value_gain and (pick is None or lr > pick[1] + 1e-9):
                        mem = np.flatnonzero(self._seen(r, c, best[2], [offset + d]))
                        pick = (("skip", d) if d else "exact", lr, best[2], mem)
                return pick
        return best

    def _shadows(self, node, rows, cols, offset, span, token) -> bool:
        """Whether a run "``token`` within ``span``" below ``node`` would match occurrences of an exact child
        of ``node`` (the token ``offset`` back): matched a level deeper, it would take them from that child."""
        kids = [k for k in self.graph.nodes[node].children if k >= 0]
        if token in kids:
            return True
        if not kids:
            return False
        ok = cols - offset >= 0
        mine = ok & np.isin(np.where(ok, self.ids[rows, np.maximum(cols - offset, 0)], -1), kids)
        return bool(self._seen(rows[mine], cols[mine], token, range(offset + 1, offset + span)).any())

    def _stronger_distance(self, r: np.ndarray, c: np.ndarray, span: int, token: int) -> int | None:
        """Among occurrences of X with ``token`` within ``span`` before it: the distance (1 = right before)
        at which the activation is clearly stronger or weaker than at the others ("X at 1.0 right after Y,
        0.6 two after"), tested as :meth:`_best_value` tests a token; None if no distance is."""
        lag = 1 + np.arange(span)
        cols = c[:, None] - lag[None, :]
        hit = (cols >= 0) & (self.ids[r[:, None], np.maximum(cols, 0)] == token)
        keep = self._distinct(r, c)
        keep = keep[hit[keep].any(1)]
        dist = hit.argmax(1)[keep]  # to the nearest ``token``, less one
        a = self.acts[r[keep], c[keep]].astype(np.float64)
        if len(a) < 2 * CLEAN_MIN:
            return None
        best = None
        for d in np.unique(dist).tolist():
            side = dist == d
            if side.sum() < CLEAN_MIN or (~side).sum() < CLEAN_MIN or abs(a[side].mean() - a[~side].mean()) < VALUE_DELTA:
                continue
            lr = _split_lr(a, side)
            if lr >= self.value_gain and (best is None or lr > best[0]):
                best = (lr, d + 1)
        return None if best is None else best[1]

    def _clean(self, r, c, y, best, runs: bool = False) -> bool:
        """Whether a question too weak for ``min_gain`` still splits the occurrences cleanly: every
        one on one side fires and none on the other, and the activations on each side are so alike
        that the split explains all but a sliver of their variance (Gaussian likelihood ratio
        ``n ln(SS_total / SS_within)`` at least ``clean_gain``). A few occurrences then suffice,
        as for a deterministic rule; a noisy neuron's pure split of a handful rarely passes. A run
        question is judged so only with ``runs`` (where it would replace a clean set)."""
        if not self.clean_gain or (best[0] not in ("exact", "set") and not runs):
            return False
        if not self._pure(y, best[3]):
            return False
        side = np.zeros(len(r), bool)
        side[best[3]] = True
        keep = self._distinct(r, c)
        side, r, c = side[keep], r[keep], c[keep]
        if side.sum() < CLEAN_MIN or (~side).sum() < CLEAN_MIN:
            return False
        return _split_lr(self.acts[r, c].astype(np.float64), side) >= self.clean_gain

    @staticmethod
    def _pure(y: np.ndarray, member: np.ndarray) -> bool:
        """Whether the occurrences ``member`` (indices into ``y``) all fire and the rest never do, or the mirror."""
        side = np.zeros(len(y), bool)
        side[member] = True
        return bool(side.any() and (~side).any()
                    and ((y[side].all() and not y[~side].any()) or (y[~side].all() and not y[side].any())))

    def _clean_set(self, r, c, y, base, tally):
        """A set question that takes members seen once: every token ``offset`` back after which X never
        fires, when X fires after every other token (or the mirror: always fires / never fires).

        ``_best_exact`` needs ``min_count`` occurrences per member, so in text where the blockers of
        "X unless the token before is one of S" are rare (each seen once or twice) the pure set covers
        only some of them and the split is neither strong nor clean. Taking every never-firing token
        makes the split clean whenever the rule is deterministic; it is then kept only if
        :meth:`_clean` passes (a few distinct occurrences a side, activations alike within each side),
        which a noisy neuron's handful of occurrences rarely does. Not where the set holds more tokens seen once
        than the other side does: a token never seen here is then likelier to be of the set's kind, and the
        set would only list the tokens it was shown.
        """
        if not self.clean_gain or tally is None:
            return None
        at, uniq, inv, counts, fired = tally
        n, f = len(r), int(y.sum())
        for pure, rest_fires in ((fired == 0, True), (fired == counts, False)):
            members = np.flatnonzero(pure)
            if not len(members) or counts[members].max() < self.min_count:
                continue  # no member seen twice: each occurrence its own explanation (memorising, not a rule)
            n1, f1 = int(counts[members].sum()), int(fired[members].sum())
            if f - f1 != ((n - n1) if rest_fires else 0):
                continue  # the other occurrences are not all on the other side
            if (counts[members] == 1).sum() > (counts[~pure] == 1).sum():
                continue  # a token never seen here is likelier one of the set's kind than the rest's: no rule
            member = at[pure[inv]]
            found = ("set", base - self.set_cost * (len(members) - 1), [int(t) for t in uniq[members]], member)
            if self._clean(r, c, y, found):
                return found
        return None

    def _score(self, counts, fired, n, f, base):
        gain = _split_gain(base, n, f, counts, fired)
        gain = np.where((counts >= self.min_count) & (n - counts >= self.min_count), gain, -np.inf)
        return gain

    def _tally(self, r, c, y, offset):
        """The tokens ``offset`` back of the occurrences that have one: (their indices into ``r``, the
        distinct tokens, each occurrence's token index, occurrences and firings per token); None if none."""
        ok = c - offset >= 0
        ok[ok] = self.ids[r[ok], c[ok] - offset] >= 0  # padding (-1) is no token
        if not ok.any():
            return None
        uniq, inv = np.unique(self.ids[r[ok], c[ok] - offset], return_inverse=True)
        return np.flatnonzero(ok), uniq, inv, np.bincount(inv), np.bincount(inv, weights=y[ok].astype(np.float64))

    def _best_exact(self, r, c, y, offset, n, f, base, tally=None):
        tally = self._tally(r, c, y, offset) if tally is None else tally
        if tally is None:
            return None
        at, uniq, inv, counts, fired = tally
        gain = self._score(counts, fired, n, f, base)
        j = int(np.argmax(gain))
        best = None
        if np.isfinite(gain[j]):
            best = ("exact", float(gain[j]), int(uniq[j]), at[inv == j])
        # A set of tokens that never (or always) fire here, taken together: "X unless after one of S".
        for side, pure in enumerate((fired == 0, fired == counts)):
            # A member is pure past chance: a token seen k times here is all quiet (all firing) with probability
            # (share of quiet (firing) occurrences)^k; one background token seen twice with X quiet each time,
            # where half of X's occurrences are quiet, says nothing, and many such would join the set.
            rate = (f / n) if side else (1 - f / n)
            chosen = pure & (counts >= self.min_count) & (rate ** counts <= SET_CHANCE)
            n1, f1 = int(counts[chosen].sum()), int(fired[chosen].sum())
            if chosen.sum() < 2 or n - n1 < self.min_count:
                continue
            # Each member past the first costs ``set_cost`` (as in AIC): a set picked for being pure is not free.
            g = float(_split_gain(base, n, f, n1, f1)) - self.set_cost * (int(chosen.sum()) - 1)
            if best is None or g > best[1] + 1e-9:
                best = ("set", g, [int(t) for t in uniq[chosen]], at[chosen[inv]])
        return best

    def _nearest(self, r, c, offset):
        """Every (token, occurrence) pair within the widest run span, ``offset`` positions back and more, once,
        at its nearest distance: (distinct tokens, each pair's token index, occurrence index (into ``r``)
        and distance (0 = ``offset`` back)); None where no occurrence has a token there."""
        n = len(r)
        lag = offset + np.arange(self.run_spans[-1])
        cols = c[:, None] - lag[None, :]
        ok = cols >= 0
        tok = np.where(ok, self.ids[r[:, None], np.maximum(cols, 0)], -1)
        occ, dist = np.nonzero(tok >= 0)
        if not len(occ):
            return None
        key = tok[occ, dist] * (n + 1) + occ
        order = np.lexsort((dist, key))
        key, dist = key[order], dist[order]
        first = np.r_[True, key[1:] != key[:-1]]  # each (token, occurrence) once, at its nearest distance
        key, dist = key[first], dist[first]
        tok, occ = key // (n + 1), key % (n + 1)
        uniq, inv = np.unique(tok, return_inverse=True)
        return uniq, inv, occ, dist

    def _best_runs(self, r, c, y, offset, n, f, base) -> list:
        """The best "is Y anywhere among the next k tokens back" question for every k of ``run_spans``.

        Each (token, occurrence) pair is found once, at its nearest distance, over the widest reach;
        a reach of k then counts the pairs nearer than k. Returns one question (or None) per k."""
        found = self._nearest(r, c, offset)
        if found is None:
            return [None] * len(self.run_spans)
        uniq, inv, occ, dist = found
        fires = y[occ].astype(np.float64)
        out = []
        for i, span in enumerate(self.run_spans):
            near = dist < span
            counts = np.bincount(inv[near], minlength=len(uniq))
            fired = np.bincount(inv[near], weights=fires[near], minlength=len(uniq))
            gain = self._score(counts, fired, n, f, base)
            j = int(np.argmax(gain))
            if not np.isfinite(gain[j]):
                out.append(None)
                continue
            best = (float(gain[j]), span, j)
            if i:  # a reach between the previous span and this one, where the evidence stops the rule there
                top = [j for j in np.argsort(-gain)[:REFINE_TOKENS].tolist() if np.isfinite(gain[j])]
                reaches = self._refined_reaches(dist, fires, inv, top, self.run_spans[i - 1], span, n, f, base)
                for j, (g, k) in zip(top, reaches):
                    if g > best[0] + 1e-9 or (g > best[0] - 1e-9 and k > best[1]):
                        best = (g, k, j)
            g, span, j = best
            out.append((("run", span), g, int(uniq[j]), np.sort(occ[(dist < span) & (inv == j)])))
        return out

    def _refined_reaches(self, dist, fires, inv, tokens, lo, hi, n, f, base) -> list[tuple[float, int]]:
        """(gain, k) of the best reach k in (``lo``, ``hi``] for each of ``tokens`` (indices into the distinct
        tokens that ``inv`` maps each (token, occurrence) pair to; ``dist`` its nearest distance, 0 right before,
        ``fires`` its firing); a tie goes to the widest k.

        A doubling span says "Y within 48" where the evidence says "Y within 40": the occurrences with Y
        41-48 back that fire (or do not) the other way leave the side mixed. The reach is cut where the
        evidence turns, at no extra cost: the span's doubling has been charged."""
        if not tokens:
            return []
        row = np.full(max(int(inv.max(initial=0)), max(tokens)) + 1, -1, np.int64)
        row[tokens] = np.arange(len(tokens))
        pick = (row[inv] >= 0) & (dist < hi)
        cell = row[inv[pick]] * hi + dist[pick]
        size = len(tokens) * hi
        # occurrences (and firings) of each token nearer than k, for every k up to hi
        near = np.cumsum(np.bincount(cell, minlength=size).reshape(len(tokens), hi), axis=1)
        fired = np.cumsum(np.bincount(cell, weights=fires[pick], minlength=size).reshape(len(tokens), hi), axis=1)
        ks = np.arange(lo + 1, hi + 1)
        gain = self._score(near[:, lo:hi], fired[:, lo:hi], n, f, base)
        best = gain >= gain.max(axis=1, keepdims=True) - 1e-9
        last = hi - lo - 1 - np.argmax(best[:, ::-1], axis=1)
        return [(float(gain[t, at]), int(ks[at])) for t, at in enumerate(last.tolist())]


def prune_unchanged(graph: NeuronGraph, sequences=None) -> int:
    """Remove branches that change no prediction on the training tokens ``sequences``, or change only
    wrong ones.

    Bottom-up over leaves (a node whose children are all gone becomes one): a leaf without an END
    goes; a leaf with one is unlinked, the training tokens whose prediction came from it are
    matched again, and it stays unlinked when every one of them still fires, or still does not,
    as before, or where one does not, it now fires as its true activation does (a branch that only
    takes tokens from better branches: "54 * * [8]", valued 0.8 from tokens that "9 *{0-2} [8]" also
    says fire, firing without 9 on new text); a leaf no training token reaches goes too. Without ``sequences`` the tokens are
    assumed to fall back to the nearest ancestor END. Rules for any token (the wildcard activator's
    subtree) are tried after every other branch, so a rule outlasts the single-token paths it generalises.
    A leaf a strength split grew (``Node.strength``) also stays when its tokens' values would move by at
    least ``VALUE_DELTA`` on average. Returns how many nodes were removed; calibrate again afterwards,
    since removed nodes' tokens now count elsewhere.
    """
    thr = graph.fire_threshold
    parent = graph._parents()
    users: dict[int, list[tuple[list[int], int, bool]]] = {}  # END -> (token ids, position, truly fires)
    if sequences is not None:
        roots = graph.nodes[0].children
        anywhere = WILDCARD in roots
        for ids, acts in sequences:
            ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
            for i, t in enumerate(ids):
                if t in roots or anywhere:
                    end = graph.match_end(ids, i)
                    if end is not None:
                        users.setdefault(end, []).append((ids, i, bool(acts[i] >= thr)))
    removed: set[int] = set()
    live_children = [len(n.children) for n in graph.nodes]
    # A rule for any token (under the wildcard activator) is tried last: where it and exact paths of single
    # tokens say the same, the exact paths go (they are what it generalises), not the rule.
    general = set()
    wild = graph.nodes[0].children.get(WILDCARD)
    stack = [] if wild is None else [wild]
    while stack:
        at = stack.pop()
        general.add(at)
        stack.extend(graph.nodes[at].children.values())
    order = [i for i in range(len(graph.nodes) - 1, 0, -1) if i not in general] + sorted(general, reverse=True)
    for idx in order:
        n = graph.nodes[idx]
        if live_children[idx] > 0:
            continue
        up = parent[idx]
        key = n.token_id
        if n.end is None:
            drop = True
        elif sequences is None:
            anc = up
            while anc > 0 and graph.nodes[anc].end is None:
                anc = parent[anc]
            fallback = graph.nodes[anc].end if anc > 0 else 0.0
            drop = (n.end >= thr) == (fallback >= thr)
        else:
            fires = n.end >= thr
            del graph.nodes[up].children[key]  # try without it
            moved = []
            drop = True
            shift = 0.0
            righted = False  # a decision that moves, moves to the token's true side
            for ids, i, truly in users.get(idx, ()):
                end = graph.match_end(ids, i)
                value = graph.nodes[end].end if end is not None else 0.0
                if (value >= thr) != fires:
                    if (value >= thr) != truly:
                        drop = False
                        break
                    righted = True
                shift += abs(value - n.end)
                moved.append((end, ids, i, truly))
            if drop and not righted and n.strength and moved and shift / len(moved) >= VALUE_DELTA:
                drop = False  # a strength split: the same decision, at a clearly different strength
            if drop:
                for end, ids, i, truly in moved:
                    if end is not None:
                        users.setdefault(end, []).append((ids, i, truly))
            else:
                graph.nodes[up].children[key] = idx
        if drop:
            graph.nodes[up].children.pop(key, None)
            removed.add(idx)
            live_children[up] -= 1
    if removed:
        graph.compact(set(range(len(graph.nodes))) - removed)
    return len(removed)


def add_context_activators(graph: NeuronGraph, ids: np.ndarray, acts: np.ndarray, *, max_depth: int = 2,
                           min_count: int = 2, min_distinct: int = 3, min_gain: float = 10.0,
                           limit: int = 12, quiet: bool = True, run_spans: Sequence[int] = (),
                           run_cost: float = 2.0, pair_cost: float = 2.0,
                           exception_cost: float = 2.0, starts: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Add rules with no activating token where they fix training predictions the graph gets wrong.

    A candidate says "any token fires when the token d positions back is Y" (d up to ``max_depth``,
    wildcards between): a Y after which more tokens fire than not, at least ``min_count`` of them,
    on at least ``min_distinct`` different tokens (fewer are said by exact activators), with a split
    gain of at least ``min_gain`` over every position of the evidence arrays ``ids``/``acts``
    (``[n, length]``, -1 pads). Best gain first, each is added under the graph's wildcard activator
    (``[*]``) with the END value its tokens give at the graph's END quantile, and kept only when the
    tokens it now predicts are right at least ``min_count`` more times than before, where before is
    judged as on unseen text (each excerpt matched without the paths only it made); matching prefers
    an exact activator's equally specific branch, so what the graph says about a token stays.
    With ``run_spans`` (reaches k of 2 or more), a candidate may also say "any token fires when Y is
    among the k tokens before it" (``Y *{0-(k-1)} [*]``), each reach past the first charged ``run_cost``
    of gain more, as in :class:`Grower`; a reach that only repeats an exact distance's rule fixes nothing
    more and is not kept.
    A candidate "any token d back of Y fires" may come with exceptions: the tokens seen there at least
    ``min_count`` times that never fire, set apart (each charged ``exception_cost`` of gain) so that more of
    the rest fire than not; each becomes a quiet branch "Y [X]" of its own activator.
    With ``max_depth`` of 2 or more, a candidate may also be a pair, "any token fires right after Y2 Y1"
    (``Y2 Y1 [*]``, where Y1 alone and Y2 two back are mixed), charged ``pair_cost`` of gain more.
    With ``quiet``, a candidate may also say "any token is quiet when the token d back is Y": a Y
    after which most tokens do not fire, while the graph predicts firing for most of them (at least
    ``min_count`` more wrongly than rightly, on ``min_distinct`` different tokens), as for a neuron
    that fires nearly everywhere; it is kept by the same test. Where any token fires (``[*]`` does), a quiet
    rule may also be a run ("any token is quiet with Y among the k tokens before it").
    With ``starts`` (per row: whether it starts a text, as :class:`Grower` takes it), Y may also be the start of
    the text ("any token at the text's first position": ``⟨start⟩ [*]``), at an exact distance or in a pair.
    Returns the rules kept as (d, Y): d the distance, or -k for a reach of k (Y a token), or 0 for a pair
    (Y the tokens right before and two before).
    """
    thr = graph.fire_threshold
    shift = 0 if starts is None else 1
    if starts is not None:
        ids, acts = _with_start(ids, acts, starts)
    fires = acts >= thr
    valid = ids >= 0
    valid[:, :shift] = False  # the start of the text is context, never a token that fires or not
    n, f = int(valid.sum()), int(fires[valid].sum())
    if f < min_count or f == n:
        return []
    base = float(_impurity(n, f))
    found = []
    predicted = None  # the graph's firing decision at every evidence position, when a quiet rule needs it
    for d in range(1, max_depth + 1):
        if d >= ids.shape[1]:
            break
        here = valid[:, d:] & (ids[:, :-d] >= 0)
        prev, y, tok = ids[:, :-d][here], fires[:, d:][here], ids[:, d:][here]
        uniq, inv = np.unique(prev, return_inverse=True)
        counts = np.bincount(inv)
        fired = np.bincount(inv, weights=y.astype(np.float64))
        gain = _split_gain(base, n, f, counts, fired)
        found += [(float(gain[j]), d, int(uniq[j]))
                  for j in _firing_keys(inv, y, tok, counts, fired, gain, min_count, min_distinct, min_gain)]
        found += _with_exceptions(inv, uniq, tok, y, counts, fired, d, n, f, base, min_count, min_distinct,
                                  min_gain, exception_cost)
        if quiet:  # "any token after Y is quiet", where the graph says most of them fire (a dense neuron)
            quiet_ok = (counts - fired >= min_count) & (2 * fired < counts) & (gain >= min_gain)
            if quiet_ok.any():
                if predicted is None:
                    predicted, done = np.zeros(ids.shape, bool), np.zeros(ids.shape[0], bool)
                need = np.flatnonzero(~done & np.isin(ids[:, :-d], uniq[quiet_ok]).any(axis=1))
                for r in need.tolist():  # only excerpts that show a candidate Y are predicted
                    row = ids[r, shift:][ids[r, shift:] >= 0].tolist()
                    predicted[r, shift: shift + len(row)] = graph.predict_sequence(row) >= thr
                done[need] = True
                said = predicted[:, d:][here]
                wrong = np.bincount(inv, weights=(said & ~y).astype(np.float64), minlength=len(uniq))
                right = np.bincount(inv, weights=(said & y).astype(np.float64), minlength=len(uniq))
                for j in np.flatnonzero(quiet_ok & (wrong - right >= min_count) & (2 * wrong > counts)).tolist():
                    if len(np.unique(tok[(inv == j) & said & ~y])) >= min_distinct:
                        found.append((float(gain[j]), d, int(uniq[j])))
    wild = graph.nodes[0].children.get(WILDCARD)
    any_fires = quiet and wild is not None and graph.nodes[wild].end is not None and graph.nodes[wild].end >= thr
    occurrences = _Occurrences(ids, valid) if len(run_spans) and run_spans[0] < ids.shape[1] else None
    for j, span in enumerate(run_spans):  # "any token fires with Y within span"
        if span >= ids.shape[1]:
            break
        found += _context_runs(ids, fires, valid, span, n, f, base, min_count, min_distinct, min_gain + run_cost * j,
                               occurrences)
        if any_fires:  # "any token is quiet with Y within span"
            found += _context_runs(ids, ~fires & valid, valid, span, n, n - f, base, min_count, min_distinct,
                                   min_gain + run_cost * j, occurrences)
    if max_depth >= 2:
        found += _context_pairs(ids, fires, valid, n, f, base, min_count, min_distinct, min_gain + pair_cost)
    # exact distances before runs and pairs on equal gain (d: distance; -span for a run; 0 for a pair)
    found.sort(key=lambda t: (-t[0], t[1] <= 0, abs(t[1]), t[2]))
    q = graph.end_quantile
    kept = []
    said: set[tuple[int, ...]] = set()
    for _, d, token, *rest in found[:limit]:
        exceptions = rest[0] if rest else ()
        if d > 0:
            keys = [WILDCARD] * (d - 1) + [token]
        elif d < 0:
            keys = [run_key(-d - 1), token]
        else:
            keys = list(token)  # (right before, two before)
        last = keys[-1]
        if tuple(keys) in said:
            continue  # the same rule, kept with exceptions (or without)
        rows = np.flatnonzero(np.any(ids[:, : ids.shape[1] - 1] == last, axis=1))
        seqs = [ids[r, shift:][ids[r, shift:] >= 0].tolist() for r in rows]  # as the graph matches them
        first = 0 if shift else 1  # the first token has context only where the start of the text is one
        before = {}  # as unseen text: each excerpt matched without the paths only it made
        for k, s in enumerate(seqs):
            for i in range(first, len(s)):
                if _rule_matches(keys, s, i):
                    end = graph.match_end(s, i, exclude=int(rows[k]))
                    before[(k, i)] = graph.nodes[end].end if end is not None else 0.0
        at = graph.add_child(0, WILDCARD)
        for key in keys[:-1]:
            at = graph.add_child(at, key)
        leaf = graph.add_child(at, last)
        graph.nodes[leaf].end = 1.0  # a placeholder, so matching reaches the leaf
        made = []  # "X after Y is quiet" for each exception X: (parent, key) of every node added for them
        for x in exceptions:
            at = 0
            for key in [x] + keys:
                if key not in graph.nodes[at].children:
                    made.append((at, key))
                at = graph.add_child(at, key)
            graph.nodes[at].end = 0.0  # quiet: calibration values it
        values, hits = [], []
        for k, s in enumerate(seqs):
            for i in range(first, len(s)):
                if (k, i) in before and graph.match_end(s, i, exclude=int(rows[k])) == leaf:
                    values.append(float(acts[rows[k], i + shift]))
                    hits.append((k, i + shift))
        value = None
        if len(values) >= min_count:
            value = float(np.quantile(values, q)) if q is not None else float(np.mean(values))
            now = value >= thr
            gain = sum(int(now == fires[rows[k], c]) - int((before[(k, c - shift)] >= thr) == fires[rows[k], c])
                       for k, c in hits)
        if value is None or gain < min_count:  # undo: the leaf, then wildcards that lead to no END
            graph.nodes[leaf].end = None
            gone = set()
            for parent, key in reversed(made):  # the exceptions' branches, deepest first
                gone.add(graph.nodes[parent].children.pop(key))
            if gone:
                graph.compact(set(range(len(graph.nodes))) - gone)
            _drop_dead_context_branches(graph)
            continue
        graph.nodes[leaf].end = value
        graph.nodes[leaf].end_values = [value] * len(values)
        kept.append((d, token))
        said.add(tuple(keys))
        if d >= 0:
            _drop_said_by_rule(graph, keys, value >= thr)
    return kept


def drop_explained_activators(graph: NeuronGraph, sequences) -> int:
    """Remove exact activators, branches and all, that the rules for any token make redundant: every training
    occurrence of the token in ``sequences`` (``(ids, acts)`` pairs) gets the same firing decision without
    them, and some occurrence is matched by a rule. Such an activator was grown before the rules existed
    ("53 fires after 9, 21 or 22, and not after these 48 tokens" where "any token after 9, 21 or 22" says it);
    kept, its END fires on the token after contexts it never saw. Returns how many activators went; calibrate
    again afterwards."""
    roots = graph.nodes[0].children
    if WILDCARD not in roots:
        return 0
    thr = graph.fire_threshold
    where: dict[int, list[tuple[list[int], int]]] = {}
    for ids, _ in sequences:
        ids = ids.tolist() if isinstance(ids, np.ndarray) else list(ids)
        for i, t in enumerate(ids):
            if t in roots and t != WILDCARD:
                where.setdefault(t, []).append((ids, i))
    value = lambda end: graph.nodes[end].end if end is not None else 0.0
    drop = []
    for token, occ in where.items():
        node = roots[token]
        before = [value(graph.match_end(ids, i)) >= thr for ids, i in occ]
        del roots[token]
        ends = [graph.match_end(ids, i) for ids, i in occ]
        roots[token] = node
        if any(e is not None for e in ends) and before == [value(e) >= thr for e in ends]:
            drop.append(token)
    if drop:
        nodes = {roots.pop(t) for t in drop}
        graph.compact(set(range(len(graph.nodes))) - nodes)
    return len(drop)


def _rule_matches(keys: Sequence[int], s: Sequence[int], i: int) -> bool:
    """Whether the context keys of a rule for any token (below ``[*]``, nearest first: tokens, single
    wildcards, or a run followed by its token) hold before position ``i`` of ``s``."""
    pos = i - 1
    k = 0
    while k < len(keys):
        key = keys[k]
        if key == START:  # the start of the text: one step before the first token, nothing further back
            return pos == -1 and k + 1 == len(keys)
        if pos < 0:
            return False
        if key == WILDCARD:
            pos -= 1
        elif key < WILDCARD:  # a run of 0..span tokens, then the next key's token
            token, reach = keys[k + 1], run_span(key)
            window = s[max(0, pos - reach): pos + 1]
            if token not in window:
                return False
            return k + 2 == len(keys)  # a run ends a rule's keys
        else:
            if s[pos] != key:
                return False
            pos -= 1
        k += 1
    return True


def _with_exceptions(inv, uniq, tok, y, counts, fired, d, n, f, base, min_count, min_distinct, min_gain,
                     cost) -> list[tuple[float, int, int, tuple[int, ...]]]:
    """Candidates "any token d after Y fires, except X1, X2, ...": a Y after which more tokens fire than not
    once the tokens seen there at least ``min_count`` times and never firing are set apart (each charged
    ``cost`` of gain). (gain, d, Y, exceptions) for each."""
    near = fired >= min_count
    if not near.any():
        return []
    sel = np.isin(inv, np.flatnonzero(near))
    width = np.int64(max(int(tok.max()), 0) + 1)
    pairs, pinv, pcount = np.unique(inv[sel].astype(np.int64) * width + tok[sel], return_inverse=True, return_counts=True)
    pfired = np.bincount(pinv, weights=y[sel].astype(np.float64), minlength=len(pairs))
    owner = pairs // width  # sorted: each key's pairs are one slice
    bounds = np.searchsorted(owner, np.arange(len(counts) + 1))
    out = []
    for j in np.flatnonzero(near).tolist():
        exc = np.zeros(len(pairs), bool)
        mine = slice(bounds[j], bounds[j + 1])
        exc[mine] = (pcount[mine] >= min_count) & (pfired[mine] == 0)
        if not exc.any():
            continue
        c = int(counts[j] - pcount[exc].sum())
        if 2 * fired[j] <= c:
            continue
        g = float(_split_gain(base, n, f, c, fired[j])) - cost * int(exc.sum())
        if g >= min_gain and len(np.unique(tok[(inv == j) & y])) >= min_distinct:
            out.append((g, d, int(uniq[j]), tuple(int(x) for x in pairs[exc] % width)))
    return out


def _context_pairs(ids: np.ndarray, fires: np.ndarray, valid: np.ndarray, n: int, f: int, base: float,
                   min_count: int, min_distinct: int, min_gain: float) -> list[tuple[float, int, tuple[int, int]]]:
    """Candidates "any token fires right after Y2 Y1": (gain, 0, (Y1, Y2)) for every pair after which more
    tokens fire than not, on ``min_distinct`` different tokens, with a split gain of at least ``min_gain``."""
    if ids.shape[1] < 3:
        return []
    here = valid[:, 2:] & (ids[:, 1:-1] >= 0) & (ids[:, :-2] >= 0)
    y1, y2 = ids[:, 1:-1][here].astype(np.int64), ids[:, :-2][here].astype(np.int64)
    y, tok = fires[:, 2:][here], ids[:, 2:][here]
    width = np.int64(max(int(ids.max()), 0) + 1)
    uniq, inv, counts = np.unique(y1 * width + y2, return_inverse=True, return_counts=True)
    fired = np.bincount(inv, weights=y.astype(np.float64), minlength=len(uniq))
    gain = _split_gain(base, n, f, counts, fired)
    return [(float(gain[j]), 0, (int(uniq[j] // width), int(uniq[j] % width)))
            for j in _firing_keys(inv, y, tok, counts, fired, gain, min_count, min_distinct, min_gain)]


def _firing_keys(inv, y, tok, counts, fired, gain, min_count, min_distinct, min_gain) -> list[int]:
    """Indices of the context keys (``inv`` maps each position to one) after which more tokens fire than not, at
    least ``min_count`` of them, on ``min_distinct`` different tokens, with a split gain of at least ``min_gain``."""
    return [j for j in np.flatnonzero((fired >= min_count) & (2 * fired > counts) & (gain >= min_gain)).tolist()
            if len(np.unique(tok[(inv == j) & y])) >= min_distinct]


class _Occurrences:
    """Every token occurrence of evidence arrays ``ids`` (``[n, length]``, -1 pads), grouped by token: what
    :func:`_context_runs` needs for any reach, found once for all its reaches."""

    def __init__(self, ids: np.ndarray, valid: np.ndarray):
        self.shape = ids.shape
        width = ids.shape[1]
        at = np.flatnonzero(valid.ravel())
        y = ids.ravel()[at]
        order = np.lexsort((at, y))
        self.at, self.y = at[order], y[order]
        self.row, self.col = self.at // width, self.at % width
        # the column of the same token's next occurrence in the row (width where there is none)
        same = (self.y[1:] == self.y[:-1]) & (self.row[1:] == self.row[:-1])
        self.next = np.full(len(self.at), width, np.int64)
        self.next[:-1][same] = self.col[1:][same]
        self.tokens = np.unique(self.y)
        self.group = np.searchsorted(self.tokens, self.y)
        self.valid_running = self.running(valid)
        # every occurrence of Y covers the position right after it (when that holds a token)
        inner = self.col + 1 < width
        self.after = np.bincount(self.group[inner], weights=valid.ravel()[self.at[inner] + 1],
                                 minlength=len(self.tokens))

    def running(self, mask: np.ndarray) -> np.ndarray:
        """``[n, length + 1]`` running counts of ``mask`` along each row (0 first)."""
        out = np.zeros((self.shape[0], self.shape[1] + 1), np.int64)
        np.cumsum(mask, axis=1, out=out[:, 1:])
        return out


def _context_runs(ids: np.ndarray, fires: np.ndarray, valid: np.ndarray, span: int, n: int, f: int, base: float,
                  min_count: int, min_distinct: int, min_gain: float,
                  occurrences: _Occurrences | None = None) -> list[tuple[float, int, int]]:
    """Candidates "any token fires when Y is among the ``span`` tokens before it": (gain, -span, Y) for
    every Y after which more tokens fire than not within that reach, on ``min_distinct`` different
    tokens, with a split gain of at least ``min_gain``. ``valid`` marks the positions that hold a
    token (``ids >= 0``); ``occurrences`` is theirs, when found already. With ``fires`` the quiet positions
    (and ``f`` their count), the candidates say "any token is quiet with Y within reach"."""
    o = _Occurrences(ids, valid) if occurrences is None else occurrences
    width = ids.shape[1]
    # Each occurrence of a token Y reaches the positions after it, up to span on, cut at Y's next occurrence
    # in that row (which starts its own reach), so the reaches of one Y never overlap; the positions within
    # reach of Y are counted per occurrence from running counts along its row.
    last = np.minimum(np.minimum(o.col + span, width - 1), o.next)
    first = np.minimum(o.col + 1, width)
    running = o.running(fires & valid)
    firing_reach = running[o.row, last + 1] - running[o.row, first]
    fi = np.bincount(o.group, weights=firing_reach, minlength=len(o.tokens)).astype(np.int64)
    within = np.bincount(o.group, weights=o.valid_running[o.row, last + 1] - o.valid_running[o.row, first],
                         minlength=len(o.tokens)).astype(np.int64)
    # the most a Y can gain: every position in its reach fires (a pure split); more of the positions right
    # after its occurrences must fire than not
    bound = _split_gain(base, n, f, fi, fi)
    ok = (fi > 0) & (fi >= min_count) & (bound >= min_gain) & (2 * fi > o.after) & (2 * fi > within)
    if ok.any():  # tokens fired on within reach, at least min_distinct different ones
        pick = ok[o.group] & (firing_reach > 0)
        lengths = (last - o.col)[pick]
        pos = np.repeat(o.at[pick] + 1 - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
        keep = fires.ravel()[pos] & valid.ravel()[pos]
        wide = np.int64(ids.max() + 1)
        pair = np.unique(np.repeat(o.y[pick], lengths)[keep] * wide + ids.ravel()[pos][keep])
        yy, distinct = np.unique(pair // wide, return_counts=True)
        ok &= np.isin(o.tokens, yy[distinct >= min_distinct])
    out = []
    for j in np.flatnonzero(ok).tolist():
        gain = float(_split_gain(base, n, f, int(within[j]), int(fi[j])))
        if gain >= min_gain:
            out.append((gain, -span, int(o.tokens[j])))
    return out


def _drop_said_by_rule(graph: NeuronGraph, keys: Sequence[int], fires: bool) -> None:
    """Remove exact activators' leaf branches with the context ``keys`` of a new rule for any token (tokens
    and single wildcards, nearest first) whose firing decision the rule makes anyway, so their tokens now
    count at the rule (one rule instead of a branch per token)."""
    drop = set()
    for key, at in graph.nodes[0].children.items():
        if key == WILDCARD:
            continue
        for k in keys[:-1]:
            at = graph.nodes[at].children.get(k)
            if at is None:
                break
        if at is None:
            continue
        leaf = graph.nodes[at].children.get(keys[-1])
        if leaf is not None and not graph.nodes[leaf].children and graph.nodes[leaf].end is not None \
                and (graph.nodes[leaf].end >= graph.fire_threshold) == fires:
            del graph.nodes[at].children[keys[-1]]
            drop.add(leaf)
    if drop:
        graph.compact(set(range(len(graph.nodes))) - drop)


def _drop_dead_context_branches(graph: NeuronGraph) -> None:
    """Remove the nodes below the wildcard activator (and it) that lead to no END."""
    wild = graph.nodes[0].children.get(WILDCARD)
    if wild is None:
        return
    below = {wild}
    for idx in range(wild, len(graph.nodes)):  # children have larger indices than their parent
        if idx in below:
            below.update(graph.nodes[idx].children.values())
    live = set()
    for idx in sorted(below, reverse=True):
        nd = graph.nodes[idx]
        if nd.end is not None or any(c in live for c in nd.children.values()):
            live.add(idx)
    if len(live) < len(below):
        graph.compact(set(range(len(graph.nodes))) - (below - live))


__all__ = ["Grower", "prune_unchanged", "add_context_activators", "drop_explained_activators", "WILDCARD"]
