"""Example selection and the train/test split.

From a neuron's top-activating excerpts (ranked by maximum activation) the first ``n_top`` are
shuffled with a fixed seed and split in half: train and test. Extra top excerpts (later ranks) may
go to training only, and random excerpts go to test (so false positives are measured) and
optionally to training. The split depends only on the ranking, the random pool and the seed, so
two presets evaluated on one neuron share the same test excerpts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import DistillConfig


@dataclass
class Split:
    """Excerpt indices of each role."""

    train_top: list[int]
    """Top excerpts used for training (first half of the shuffled top ``n_top``, then extra ranks)."""
    test_top: list[int]
    """Top excerpts held out for testing."""
    train_random: list[int]
    """Random excerpts used for training (calibration and baselines)."""
    test_random: list[int]
    """Random excerpts held out for testing."""


def split_examples(ranked: Sequence[int], random_pool: Sequence[int], cfg: DistillConfig,
                   is_train: Sequence[bool] | np.ndarray | None = None) -> Split:
    """Split ranked top excerpt indices and a random pool into train and test roles.

    With ``is_train`` (the run's corpus-level partition) the training top excerpts are the best
    ``ceil(n_top / 2) + n_extra_train`` ranked excerpts of the training partition and the test top
    excerpts the best ``n_top // 2`` of the held-out partition; random excerpts come from the
    matching side of the pool. Without it the first ``n_top`` are shuffled and halved (legacy).
    """
    ranked = [int(i) for i in ranked]
    if is_train is not None:
        train_ranked = [i for i in ranked if is_train[i]]
        test_ranked = [i for i in ranked if not is_train[i]]
        train_top = train_ranked[: (cfg.n_top + 1) // 2 + cfg.n_extra_train]
        test_top = test_ranked[: cfg.n_top // 2]
        used = set(train_top) | set(test_top)
        test_random = [int(i) for i in random_pool if not is_train[int(i)] and int(i) not in used][: cfg.n_random_test]
        train_random = [int(i) for i in random_pool if is_train[int(i)] and int(i) not in used][: cfg.n_random_train]
        return Split(train_top, test_top, train_random, test_random)
    top = ranked[: cfg.n_top]
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(top))
    half = (len(top) + 1) // 2
    train_top = [top[i] for i in order[:half]]
    test_top = [top[i] for i in order[half:]]
    train_top += ranked[cfg.n_top : cfg.n_top + cfg.n_extra_train]
    # Random excerpts never repeat a top excerpt: those are scored already.
    used = set(ranked[: cfg.n_top + cfg.n_extra_train])
    pool = [int(i) for i in random_pool if int(i) not in used]
    test_random = pool[: cfg.n_random_test]
    train_random = pool[cfg.n_random_test : cfg.n_random_test + cfg.n_random_train]
    return Split(train_top, test_top, train_random, test_random)


def random_pool(n_excerpts: int, size: int, seed: int = 0) -> list[int]:
    """A seeded sample of distinct excerpt indices (shared by every neuron of a run).

    A prefix of one seeded permutation, so a larger pool extends a smaller one: asking for more
    random training excerpts leaves the test excerpts as they were.
    """
    rng = np.random.default_rng(seed + 7919)
    return [int(i) for i in rng.permutation(n_excerpts)[: max(0, size)]]
