"""Baselines with the neuron model's fit/predict/score contract: token lookup, n-gram lookup, zero.

Token lookup predicts, for each token, the largest training activation seen on that token id; the
n-gram lookup does the same for the n tokens ending at a position (n = 5; near a sequence start,
the shorter prefix); all-zero predicts nothing ever fires. They are fitted on the same training
excerpts as the graph and scored with the same pooled-token scoring.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .records import Example, Scores
from .score import score_arrays


class _Lookup:
    threshold = 0.5

    def predict_sequences(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        return [self._predict_one(list(s)) for s in seqs]

    def predict(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        return np.stack([self._predict_one(row.tolist()) for row in ids]) if ids.ndim == 2 else self._predict_one(ids.tolist())

    def score(self, examples: Sequence[Example]) -> Scores:
        preds = self.predict_sequences([e.token_ids for e in examples])
        return score_arrays([e.activations for e in examples], preds, self.threshold)

    def _predict_one(self, ids: list[int]) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class TokenLookup(_Lookup):
    """Max training activation per token id."""

    def fit(self, examples: Sequence[Example]) -> "TokenLookup":
        table: dict[int, float] = {}
        for e in examples:
            for t, a in zip(e.token_ids, e.activations):
                if a > table.get(t, -np.inf):
                    table[t] = float(a)
        self.table_ = table
        return self

    def _predict_one(self, ids: list[int]) -> np.ndarray:
        return np.array([max(self.table_.get(t, 0.0), 0.0) for t in ids], np.float32)


class NGramLookup(_Lookup):
    """Max training activation per n-gram ending at the position."""

    def __init__(self, n: int = 5):
        self.n = n

    def _keys(self, ids: list[int]) -> list[tuple[int, ...]]:
        return [tuple(ids[max(0, i - self.n + 1) : i + 1]) for i in range(len(ids))]

    def fit(self, examples: Sequence[Example]) -> "NGramLookup":
        table: dict[tuple[int, ...], float] = {}
        for e in examples:
            for key, a in zip(self._keys(list(e.token_ids)), e.activations):
                if a > table.get(key, -np.inf):
                    table[key] = float(a)
        self.table_ = table
        return self

    def _predict_one(self, ids: list[int]) -> np.ndarray:
        return np.array([max(self.table_.get(k, 0.0), 0.0) for k in self._keys(ids)], np.float32)


class Zero(_Lookup):
    """Predicts 0 everywhere."""

    def fit(self, examples: Sequence[Example]) -> "Zero":
        self.fitted_ = True
        return self

    def _predict_one(self, ids: list[int]) -> np.ndarray:
        return np.zeros(len(ids), np.float32)


BASELINES = {"token_lookup": TokenLookup, "ngram": NGramLookup, "zero": Zero}
"""Registry of baseline methods by name."""
