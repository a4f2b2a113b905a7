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


def choose_pivots(acts: np.ndarray, cfg: DistillConfig) -> list[int]:
    """The example's maximum, then its other firing positions by activation, up to ``max_pivots``."""
    order = [int(i) for i in np.argsort(-np.asarray(acts), kind="stable")]
    firing = [i for i in order[1:] if acts[i] >= cfg.fire_threshold]
    return [order[0]] + firing[: cfg.max_pivots - 1]


def prune_steps(examples: list[tuple[list[int], np.ndarray, int]], cfg: DistillConfig) -> Steps:
    """Generator stage: prune each ``(token_ids, activations, pivot)`` example around its pivot."""
    seqs: list[list[int]] = []
    owners: list[tuple[int, int]] = []  # (example, window start)
    pivots = []
    for e, (ids, acts, pivot) in enumerate(examples):
        pivots.append(pivot)
        for context in range(0, min(pivot, cfg.max_context) + 1):
            seqs.append(list(ids[pivot - context : pivot + 1]))
            owners.append((e, pivot - context))
    answers = yield Evaluate(seqs)
    best: dict[int, tuple[int, np.ndarray]] = {}
    longest: dict[int, tuple[int, np.ndarray]] = {}
    for (e, start), values in zip(owners, answers):
        target = cfg.prune_threshold * float(examples[e][1][pivots[e]])
        # Windows were generated from the shortest context up, so the first that holds is the shortest.
        if e not in best and values[-1] >= target:
            best[e] = (start, values)
        longest[e] = (start, values)
    pruned = []
    for e, (ids, _, _) in enumerate(examples):
        start, values = best.get(e, longest[e])
        original = float(examples[e][1][pivots[e]])
        pruned.append(Pruned(list(ids[start : pivots[e] + 1]), np.asarray(values, np.float32), e, start, original))
    return pruned
