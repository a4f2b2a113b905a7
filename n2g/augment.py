"""Augmentation: variants of the tokens that matter most.

For each pruned example, every token whose importance for the pivot is at least
``augment_threshold`` gets up to ``n_variants`` substitutes from a substitute source (by default the
subject model's own next-token distribution at that position, word shape kept; tests supply their
own). Every variant's activations are measured; variants that still fire get importance matrices and
add paths to the graph, and all variants (firing or not) are evidence for END calibration, which is
how a variant that stops firing teaches the graph which substitutes are not allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import DistillConfig
from .features import Candidates, Evaluate, Steps
from .importance import importance_steps


@dataclass
class Variant:
    """A pruned example with one important token substituted."""

    token_ids: list[int]
    activations: np.ndarray
    importance: np.ndarray | None
    """Importance matrix, measured only for variants that fire somewhere."""
    source: int
    """Index of the pruned example it came from."""
    position: int
    """The substituted position."""


def augment_steps(seqs: list[list[int]], acts: list[np.ndarray], imps: list[np.ndarray],
                  cfg: DistillConfig, occlusion_id: int) -> Steps:
    """Generator stage: make, measure and (when they fire) weigh variants of important tokens."""
    asks: list[tuple[int, int]] = []
    for e, (ids, imp) in enumerate(zip(seqs, imps)):
        pivot = len(ids) - 1
        for k in range(len(ids)):
            if imp[k, pivot] >= cfg.augment_threshold:
                asks.append((e, k))
    if not asks:
        return []
    answers = yield Candidates([list(seqs[e]) for e, _ in asks], [k for _, k in asks], cfg.n_candidates)
    variants: list[tuple[list[int], int, int]] = []
    for (e, k), cands in zip(asks, answers):
        original = seqs[e][k]
        chosen = [int(c) for c in cands if int(c) != original and int(c) != occlusion_id][: cfg.n_variants]
        for c in chosen:
            ids = list(seqs[e])
            ids[k] = c
            variants.append((ids, e, k))
    if not variants:
        return []
    values = yield Evaluate([v[0] for v in variants])
    firing = [i for i, v in enumerate(values) if float(np.max(v)) >= cfg.fire_threshold]
    matrices = yield from importance_steps([variants[i][0] for i in firing], [values[i] for i in firing], occlusion_id)
    by_index = dict(zip(firing, matrices))
    return [Variant(ids, np.asarray(values[i], np.float32), by_index.get(i), e, k)
            for i, (ids, e, k) in enumerate(variants)]


def same_shape(original: str, candidate: str) -> bool:
    """Word shape kept: the same leading-space status, and letters only if the original is letters only."""
    if original.startswith(" ") != candidate.startswith(" "):
        return False
    core_o, core_c = original.strip(), candidate.strip()
    if not core_c:
        return not core_o
    if core_o.isalpha():
        return core_c.isalpha()
    return True


class ModelSubstitutes:
    """Substitute source from the subject model's own next-token distribution at a position."""

    def __init__(self, model, batch_size: int = 256):
        self.model, self.batch_size = model, batch_size

    def __call__(self, seqs: list[list[int]], positions: list[int], k: int) -> list[list[int]]:
        import torch

        from .features import pad

        out: list[list[int]] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk, pos = seqs[start : start + self.batch_size], positions[start : start + self.batch_size]
            ids, mask = pad(chunk, int(self.model.occlusion_token_id))
            found = self.model.next_token_candidates(ids, mask, torch.tensor(pos), k)
            for row, p, cands in zip(chunk, pos, found.tolist()):
                original = self.model.token_strings([row[p]])[0]
                texts = self.model.token_strings(cands)
                out.append([c for c, t in zip(cands, texts) if c != row[p] and same_shape(original, t)])
        return out
