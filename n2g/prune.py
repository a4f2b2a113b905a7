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


def measure_windows(examples: list[tuple[list[int], np.ndarray, int]], contexts: list[list[int]]) -> Steps:
    """Generator stage: activations of every window ``ids[pivot - c : pivot + 1]`` for ``c`` in
    ``contexts[e]`` of example ``e``, in one request; returns ``(e, c, values)`` triples."""
    seqs, owners = [], []
    for e, (ids, _, pivot) in enumerate(examples):
        for c in contexts[e]:
            seqs.append(list(ids[pivot - c : pivot + 1]))
            owners.append((e, c))
    answers = yield Evaluate(seqs)
    return [(e, c, values) for (e, c), values in zip(owners, answers)]


def prune_steps(examples: list[tuple[list[int], np.ndarray, int]], cfg: DistillConfig) -> Steps:
    """Generator stage: prune each ``(token_ids, activations, pivot)`` example around its pivot."""
    limits = [min(pivot, cfg.max_context) for _, _, pivot in examples]
    targets = [cfg.prune_threshold * float(acts[pivot]) for _, acts, pivot in examples]
    if cfg.prune_search == "exhaustive":
        rounds = [[list(range(limit + 1)) for limit in limits]]
    else:
        rounds = [[sorted({c for c in COARSE_GRID if c <= limit} | {limit}) for limit in limits]]
    chosen: list[tuple[int, np.ndarray] | None] = [None] * len(examples)
    longest: list[tuple[int, np.ndarray] | None] = [None] * len(examples)
    for round_no in range(2):
        measured = yield from measure_windows(examples, rounds[round_no])
        found: dict[int, list[tuple[int, np.ndarray]]] = {}
        for e, c, values in measured:
            found.setdefault(e, []).append((c, values))
            if c == limits[e]:
                longest[e] = (c, values)
        nxt: list[list[int]] = [[] for _ in examples]
        for e, tried in found.items():
            passing = [(c, v) for c, v in sorted(tried, key=lambda t: t[0]) if v[-1] >= targets[e]]
            if passing and (chosen[e] is None or passing[0][0] < chosen[e][0]):
                chosen[e] = passing[0]
            if round_no == 0 and cfg.prune_search == "coarse" and passing:
                # The shortest window may lie in the gap below the first grid length that holds.
                below = [c for c, _ in sorted(tried) if c < passing[0][0]]
                lo = below[-1] if below else -1
                nxt[e] = list(range(lo + 1, passing[0][0]))
        if cfg.prune_search == "exhaustive" or not any(nxt):
            break
        rounds.append(nxt)
    pruned = []
    for e, (ids, acts, pivot) in enumerate(examples):
        c, values = chosen[e] if chosen[e] is not None else longest[e]
        start = pivot - c
        pruned.append(Pruned(list(ids[start : pivot + 1]), np.asarray(values, np.float32), e, start, float(acts[pivot])))
    return pruned
