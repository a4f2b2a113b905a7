"""Pruning: the shortest context before the pivot that keeps the neuron firing.

For a causal model the pivot's activation depends only on the tokens before it, so every candidate
context length is one suffix window ending at the pivot, and all of them go through the feature in
one padded batch. The pruned example is the shortest window whose pivot activation stays at least
``prune_threshold`` times the original; if none does within ``max_context`` tokens, the longest
window considered is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DistillConfig
from .features import Evaluate, Steps


@dataclass
class Pruned:
    """A pruned training example: the window ending at the pivot and its activations."""

    token_ids: list[int]
    """The kept tokens; the pivot is the last one."""
    activations: np.ndarray
    """Normalised activation of every kept token, measured on the window alone."""
    source: int
    """Index of the training example it was pruned from."""
    start: int
    """Where the window starts in the original example."""
    original: float = 0.0
    """The pivot's activation in the whole original example."""
    pivot: int | None = None
    """Index of the pivot in ``token_ids`` when tokens follow it (None: the last token)."""
    window_max: float | None = None
    """The largest activation in the accepted window (published rescaling); None when not recorded."""

    @property
    def pivot_index(self) -> int:
        """Index of the pivot in ``token_ids``."""
        return len(self.token_ids) - 1 if self.pivot is None else self.pivot


def choose_pivots(acts: np.ndarray, cfg: DistillConfig) -> list[int]:
    """The example's maximum, then its other firing positions by activation, up to ``max_pivots``."""
    order = [int(i) for i in np.argsort(-np.asarray(acts), kind="stable")]
    firing = [i for i in order[1:] if acts[i] >= cfg.fire_threshold]
    return [order[0]] + firing[: cfg.max_pivots - 1]


COARSE_GRID = (0, 1, 2, 4, 8, 16, 30)
GRID_STEPS = ((0, 1, 2, 4), (8, 16), (30,))
"""The coarse grid measured a step at a time: a longer step runs only for examples no shorter window kept firing."""


def measure_windows(examples: list[tuple[list[int], np.ndarray, int]], contexts: list[list[int]]) -> Steps:
    """Generator stage: activations of every window ``ids[pivot - c : pivot + 1]`` for ``c`` in
    ``contexts[e]`` of example ``e``, in one request; returns ``(e, c, values)`` triples.

    A window that starts at the example's first token is the example's own prefix: for a causal
    feature its activations are the example's (already measured by the scan), so it is not re-run.
    """
    seqs, owners, out = [], [], []
    for e, (ids, acts, pivot) in enumerate(examples):
        for c in contexts[e]:
            if c == pivot and len(acts) > pivot:
                out.append((e, c, np.asarray(acts[: pivot + 1], np.float32)))
                continue
            seqs.append(list(ids[pivot - c : pivot + 1]))
            owners.append((e, c))
    answers = (yield Evaluate(seqs, "prune")) if seqs else []
    return out + [(e, c, values) for (e, c), values in zip(owners, answers)]


def prune_steps(examples: list[tuple[list[int], np.ndarray, int]], cfg: DistillConfig) -> Steps:
    """Generator stage: prune each ``(token_ids, activations, pivot)`` example around its pivot."""
    limits = [min(pivot, cfg.max_context) for _, _, pivot in examples]
    targets = [cfg.prune_threshold * float(acts[pivot]) for _, acts, pivot in examples]
    chosen: list[tuple[int, np.ndarray] | None] = [None] * len(examples)
    longest: list[tuple[int, np.ndarray] | None] = [None] * len(examples)
    tried: list[list[tuple[int, np.ndarray]]] = [[] for _ in examples]

    def take(measured):
        for e, c, values in measured:
            tried[e].append((c, values))
            if c == limits[e]:
                longest[e] = (c, values)

    if cfg.prune_search == "exhaustive":
        take((yield from measure_windows(examples, [list(range(limit + 1)) for limit in limits])))
    else:
        # Coarse grid, shortest step first: the shortest grid window that keeps firing is the same
        # as when the whole grid is measured at once, and longer windows of examples that already
        # have one are never run.
        open_ = list(range(len(examples)))
        for step_no, step in enumerate(GRID_STEPS):
            last = step_no == len(GRID_STEPS) - 1
            contexts = [[] for _ in examples]
            for e in open_:
                top = max(step) if not last else limits[e]
                contexts[e] = sorted({c for c in step if c <= limits[e]} | ({limits[e]} if limits[e] <= top else set()))
            take((yield from measure_windows(examples, contexts)))
            open_ = [e for e in open_ if limits[e] > max(step) and not any(v[-1] >= targets[e] for _, v in tried[e])]
            if not open_:
                break
        gaps: list[list[int]] = [[] for _ in examples]
        for e in range(len(examples)):
            passing = sorted(c for c, v in tried[e] if v[-1] >= targets[e])
            if passing:  # the shortest window may lie in the gap below the first grid length that holds
                below = [c for c, _ in tried[e] if c < passing[0]]
                gaps[e] = list(range(max(below, default=-1) + 1, passing[0]))
        if any(gaps):
            take((yield from measure_windows(examples, gaps)))
    for e in range(len(examples)):
        passing = [(c, v) for c, v in sorted(tried[e], key=lambda t: t[0]) if v[-1] >= targets[e]]
        if passing:
            chosen[e] = passing[0]
    pruned = []
    for e, (ids, acts, pivot) in enumerate(examples):
        c, values = chosen[e] if chosen[e] is not None else longest[e]
        start = pivot - c
        pruned.append(Pruned(list(ids[start : pivot + 1]), np.asarray(values, np.float32), e, start, float(acts[pivot])))
    return pruned
