"""Scoring: pure functions from (true, predicted) normalised activations to a Scores record.

All real tokens of all test excerpts are pooled (never padding: examples are unpadded lists, so
only real tokens exist to be scored). True and predicted values are binarised at the fire threshold
for precision/recall/F1 of the firing and the non-firing class; the continuous values give Pearson
correlation (OpenAI's explanation score) and explained variance. A split with no firing token gets
``f1=None`` and status ``no_firing_test_token``: there is nothing to recall, so it is never perfect.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .records import Scores


def _prf(tp: int, fp: int, fn: int) -> tuple[float | None, float | None, float | None]:
    precision = tp / (tp + fp) if tp + fp else None
    recall = tp / (tp + fn) if tp + fn else None
    if precision is None or recall is None:
        f1 = None if recall is None else 0.0
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return precision, recall, f1


def _constant(x: np.ndarray) -> bool:
    """Every value equal (compared exactly: the standard deviation of 0.1 repeated 3 times is 1.4e-17, not 0)."""
    return bool(np.all(x == x[0]))


def pearson(true: np.ndarray, pred: np.ndarray) -> float | None:
    """Pearson correlation, None when either side is constant."""
    if len(true) < 2 or _constant(true) or _constant(pred):
        return None
    # r does not change when a side is shifted or scaled: each side less its first value (a side that varies by a
    # few floats' width around 0.5 keeps its shape), over its largest magnitude (values near 1e-160 or 1e160,
    # whose squares leave float64, give r, not NaN)
    true, pred = true - true[0], pred - pred[0]
    return float(np.corrcoef(true / np.max(np.abs(true)), pred / np.max(np.abs(pred)))[0, 1])


def explained_variance(true: np.ndarray, pred: np.ndarray) -> float | None:
    """1 - var(true - pred) / var(true); None with no token or constant true values."""
    if not len(true) or _constant(true):
        return None
    # both sides less the same value and over the same factor: the ratio stays, a true side that varies by a few
    # floats' width keeps its shape, and squares stay in float64
    true, pred = true - true[0], pred - true[0]
    scale = float(np.max(np.abs(true)))
    true, pred = true / scale, pred / scale
    var = float(np.var(true))
    if var == 0:
        return None
    return 1.0 - float(np.var(true - pred)) / var


def score_arrays(true: Sequence[np.ndarray], pred: Sequence[np.ndarray], threshold: float = 0.5) -> Scores:
    """Scores of predictions against true normalised activations, pooled over every token."""
    t = np.concatenate([np.asarray(a, np.float64).ravel() for a in true]) if len(true) else np.zeros(0)
    p = np.concatenate([np.asarray(a, np.float64).ravel() for a in pred]) if len(pred) else np.zeros(0)
    if t.shape != p.shape:
        raise ValueError(f"true and predicted activations differ in size ({t.shape} vs {p.shape})")
    tf, pf = t >= threshold, p >= threshold
    tp, fp = int(np.sum(tf & pf)), int(np.sum(~tf & pf))
    fn, tn = int(np.sum(tf & ~pf)), int(np.sum(~tf & ~pf))
    precision, recall, f1 = _prf(tp, fp, fn)
    nf_precision, nf_recall, nf_f1 = _prf(tn, fn, fp)
    return Scores(
        precision=precision, recall=recall, f1=f1,
        nonfiring_precision=nf_precision, nonfiring_recall=nf_recall, nonfiring_f1=nf_f1,
        pearson=pearson(t, p), explained_variance=explained_variance(t, p),
        n_tokens=int(t.size), n_firing=int(tf.sum()), n_predicted_firing=int(pf.sum()),
        status="ok" if tf.any() else "no_firing_test_token",
    )


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = 0.95, reps: int = 10_000,
                      seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``a - b`` over paired items (e.g. one method's F1 and another's, neuron by neuron) and a
    percentile bootstrap interval at ``level`` over the items (``reps`` resamples, seeded): how far the
    mean difference could move with another sample of neurons. NaN for no items."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a and b must be flat sequences of the same length (got shapes {a.shape} and {b.shape})")
    d = a - b
    if not d.size:
        return float("nan"), float("nan"), float("nan")
    if not 0.0 < level < 1.0 or reps < 1:
        raise ValueError(f"level must be in (0, 1) and reps at least 1 (got {level}, {reps})")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, (int(reps), d.size))].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(d.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1.0 - tail))
