"""Baselines with the neuron model's fit/predict/score contract: n-gram lookups and all-zero.

An n-gram lookup keys every training token by the ``n`` tokens ending at it (the token itself and
the ``n - 1`` before it) and predicts, for a position of new text, the value of the longest context
it has seen, backing off to shorter ones (a 3-gram lookup tries the last three tokens, then two,
then the token alone; unseen tokens get 0). The value per key is the ``mean``, the ``max`` or a
quantile of its training activations. ``token_lookup`` (n = 1, max) is the classic baseline of the
published method. They are fitted on every token of the training partition the graph learns from
and scored with the same pooled-token scoring. Fitting and prediction are vectorised: keys are the
token ids packed into one integer, looked up with a sorted search.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .records import Example, Scores
from .score import score_arrays

_BITS = 21
"""Bits per token in a packed key (three tokens fit in 63 bits)."""

_UNKNOWN = (1 << _BITS) - 1
"""The key part of a token no training key holds, so a context with it matches nothing."""


def _flatten(seqs: Sequence[np.ndarray], vocab: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every token's key part in one array, and each one's position in its sequence.

    A token's key part is its id + 1 (so id 0 differs from 'none'), or, where the training ids do not all fit
    in :data:`_BITS` bits, 1 + its rank among the training ids ``vocab`` (:func:`_vocabulary`); a token that
    would not fit, or that ``vocab`` lacks, is :data:`_UNKNOWN`, so two different contexts never share a key."""
    arrays = [np.asarray(s, np.int64).ravel() for s in seqs]
    if not arrays or not sum(len(a) for a in arrays):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    raw = np.concatenate(arrays)
    if vocab is None:
        ids = np.minimum(raw + 1, _UNKNOWN)
    else:
        at = np.minimum(np.searchsorted(vocab, raw), max(len(vocab) - 1, 0))
        known = (vocab[at] == raw) if len(vocab) else np.zeros(len(raw), bool)
        ids = np.where(known, at + 1, _UNKNOWN)
    lengths = np.array([len(a) for a in arrays])
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return ids, np.arange(len(ids)) - starts


def _vocabulary(seqs: Sequence[np.ndarray]) -> np.ndarray | None:
    """None where every training id + 1 fits below :data:`_UNKNOWN` (keys are the ids themselves); else the
    sorted distinct training ids, whose ranks make the keys."""
    top = max((int(np.max(s)) for s in (np.asarray(s, np.int64).ravel() for s in seqs) if len(s)), default=-1)
    if top + 1 < _UNKNOWN:
        return None
    vocab = np.unique(np.concatenate([np.asarray(s, np.int64).ravel() for s in seqs]))
    if len(vocab) + 1 >= _UNKNOWN:
        raise ValueError(f"a lookup keys at most {_UNKNOWN - 2:,} distinct training tokens (got {len(vocab):,})")
    return vocab


def _pack_flat(ids: np.ndarray, pos: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Packed keys of the ``n`` tokens ending at each position, and whether the full context
    exists (positions ``< n - 1`` of a sequence have no n-gram)."""
    key = ids.copy()
    for d in range(1, n):
        prev = np.zeros(len(ids), np.int64)
        prev[d:] = ids[: len(ids) - d]
        key |= prev << (_BITS * d)
    return key, pos >= n - 1


def _tables(seqs: Sequence[np.ndarray], acts: Sequence[np.ndarray], n: int, statistics: Sequence[str],
            vocab: np.ndarray | None = None) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """Per statistic, the lookup tables of contexts 1..n: keys packed and sorted once for all statistics."""
    values = np.concatenate([np.asarray(a, np.float64).ravel() for a in acts]) if len(acts) else np.zeros(0)
    ids, pos = _flatten(seqs, vocab)
    out: dict[str, list] = {s: [] for s in statistics}
    for m in range(1, n + 1):
        keys, full = _pack_flat(ids, pos, m)
        k, v = keys[full], values[full]
        order = np.lexsort((v, k))
        k, v = k[order], v[order]
        uniq, start, counts = np.unique(k, return_index=True, return_counts=True)
        for statistic in statistics:
            out[statistic].append((uniq, _statistic(v, start, counts, statistic)))
    return out


def _statistic(v: np.ndarray, start: np.ndarray, counts: np.ndarray, statistic: str) -> np.ndarray:
    """The statistic of each key's values (``v`` sorted by key, then value)."""
    if statistic == "max":
        stat = v[start + counts - 1]
    elif statistic == "mean":
        stat = np.add.reduceat(v, start) / counts if len(v) else np.zeros(0)
    else:  # a quantile, nearest rank on the sorted values of each key
        q = float(statistic)
        stat = v[start + np.floor(q * (counts - 1) + 0.5).astype(np.int64)]
    return stat.astype(np.float64)  # not float32: 0.49999999 (or a mean just under the threshold) would round to 0.5 and fire


class NGramLookup:
    """Longest-seen-context lookup over the last ``n`` tokens; the value per key is ``statistic``."""

    threshold = 0.5

    def __init__(self, n: int = 3, statistic: str = "max"):
        if n < 1 or n > 3:
            raise ValueError("n must be 1, 2 or 3")
        self.n, self.statistic = n, statistic

    def fit(self, examples: Sequence[Example]) -> "NGramLookup":
        return self.fit_arrays([np.asarray(e.token_ids) for e in examples], [np.asarray(e.activations) for e in examples])

    def fit_arrays(self, seqs: Sequence[np.ndarray], acts: Sequence[np.ndarray]) -> "NGramLookup":
        self.vocab_ = _vocabulary(seqs)
        self.tables_ = _tables(seqs, acts, self.n, [self.statistic], self.vocab_)[self.statistic]
        return self

    def predict_sequences(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        arrays = [np.asarray(s, np.int64) for s in seqs]
        flat = np.zeros(sum(len(a) for a in arrays), np.float64)
        done = np.zeros(len(flat), bool)
        ids, pos = _flatten(arrays, getattr(self, "vocab_", None))
        for m in range(self.n, 0, -1):  # longest context first
            keys, full = _pack_flat(ids, pos, m)
            uniq, stat = self.tables_[m - 1]
            if not len(uniq):
                continue
            at = np.minimum(np.searchsorted(uniq, keys), len(uniq) - 1)
            hit = full & ~done & (uniq[at] == keys)
            flat[hit] = np.maximum(stat[at[hit]], 0.0)
            done |= hit
        out, start = [], 0
        for a in arrays:
            out.append(flat[start : start + len(a)])
            start += len(a)
        return out

    def predict(self, token_ids) -> np.ndarray:
        ids = np.asarray(token_ids)
        if ids.ndim == 1:
            return self.predict_sequences([ids])[0]
        return np.stack(self.predict_sequences(list(ids)))

    def score(self, examples: Sequence[Example], threshold: float | None = None) -> Scores:
        """Scores on ``examples`` at ``threshold`` (the fire threshold of the run; default :attr:`threshold`)."""
        preds = self.predict_sequences([e.token_ids for e in examples])
        return score_arrays([e.activations for e in examples], preds, self.threshold if threshold is None else threshold)


class Zero(NGramLookup):
    """Predicts 0 everywhere."""

    def __init__(self):
        super().__init__(1, "max")

    def fit_arrays(self, seqs, acts) -> "Zero":
        self.tables_ = [(np.zeros(0, np.int64), np.zeros(0, np.float64))]
        self.vocab_ = None
        return self


BASELINES = {
    "token_lookup": lambda: NGramLookup(1, "max"),
    "ngram": lambda: NGramLookup(3, "max"),
    **{f"ngram{n}_{stat}": (lambda n=n, stat=stat: NGramLookup(n, stat))
       for n, stat in [(1, "mean"), (1, "0.75"), (2, "mean"), (2, "0.75"), (2, "max"), (3, "mean"), (3, "0.75")]},
    "zero": Zero,
}
"""Registry of baseline methods by name: ``token_lookup`` (1-gram max), ``ngram`` (3-gram backoff,
max), the other contexts and statistics as ``ngram{N}_{mean|0.75|max}``, and ``zero``."""


def fit_baselines(seqs: Sequence[np.ndarray], acts: Sequence[np.ndarray], names: Sequence[str] | None = None) -> dict:
    """Every baseline in ``names`` (default: all) fitted on the same data, keys packed and sorted
    once: the same tables as fitting each alone."""
    made = {name: BASELINES[name]() for name in (names if names is not None else BASELINES)}
    lookups = {name: m for name, m in made.items() if type(m) is NGramLookup}
    if lookups:
        n = max(m.n for m in lookups.values())
        vocab = _vocabulary(seqs)
        tables = _tables(seqs, acts, n, sorted({m.statistic for m in lookups.values()}), vocab)
        for m in lookups.values():
            m.tables_, m.vocab_ = tables[m.statistic][: m.n], vocab
    for name, m in made.items():
        if name not in lookups:
            m.fit_arrays(seqs, acts)
    return made
