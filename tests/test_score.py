"""The metrics cross-checked against scikit-learn (and numpy) on random and edge-case inputs."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics as sklearn_metrics  # the [test] extra installs scikit-learn

from n2g.score import paired_difference, score_arrays


@pytest.mark.parametrize("seed", range(8))
def test_scores_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    rows = [rng.uniform(-0.3, 1.0, size=int(n)) for n in rng.integers(3, 40, size=6)]
    preds = [np.clip(r + rng.normal(0, 0.3, size=r.size), -0.2, 1.0) for r in rows]
    s = score_arrays(rows, preds, 0.5)
    t, p = np.concatenate(rows), np.concatenate(preds)
    yt, yp = (t >= 0.5).astype(int), (p >= 0.5).astype(int)
    prec, rec, f1, _ = sklearn_metrics.precision_recall_fscore_support(yt, yp, labels=[1, 0], zero_division=0)
    assert (s.precision, s.recall, s.f1) == pytest.approx((prec[0], rec[0], f1[0]))
    assert (s.nonfiring_precision, s.nonfiring_recall, s.nonfiring_f1) == pytest.approx((prec[1], rec[1], f1[1]))
    assert s.explained_variance == pytest.approx(sklearn_metrics.explained_variance_score(t, p))
    assert s.pearson == pytest.approx(np.corrcoef(t, p)[0, 1])
    assert (s.n_tokens, s.n_firing, s.n_predicted_firing) == (t.size, yt.sum(), yp.sum())


def test_undefined_values_where_scikit_learn_would_divide_by_zero():
    # nothing fires and nothing is predicted to fire: F1 is undefined, never 1.0 or 0.0
    s = score_arrays([np.zeros(5)], [np.zeros(5)], 0.5)
    assert s.f1 is None and s.precision is None and s.recall is None and s.status == "no_firing_test_token"
    assert s.pearson is None and s.explained_variance is None
    # fires, never predicted: recall 0, precision undefined (scikit-learn's zero_division case), F1 0
    s = score_arrays([np.array([0.0, 0.9, 0.1])], [np.zeros(3)], 0.5)
    _, rec, f1, _ = sklearn_metrics.precision_recall_fscore_support([0, 1, 0], [0, 0, 0], labels=[1], zero_division=0)
    assert s.precision is None and s.recall == rec[0] == 0.0 and s.f1 == f1[0] == 0.0


def test_no_token_at_all_has_no_explained_variance_and_no_warning():
    """An empty split (a single excerpt, all of it training) scores None everywhere, not NaN."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = score_arrays([np.zeros(0)], [np.zeros(0)])
    assert s.explained_variance is None and s.pearson is None and s.n_tokens == 0


def test_paired_difference_interval():
    # a constant difference has no spread: the interval is the point
    assert paired_difference([0.5, 0.7, 0.9], [0.4, 0.6, 0.8]) == pytest.approx((0.1, 0.1, 0.1))
    # the mean of the differences, and an interval around it that the resampling makes
    a = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0]
    b = [0.0] * 8
    mean, lo, hi = paired_difference(a, b, reps=4000, seed=3)
    assert mean == pytest.approx(0.625)
    assert 0.0 < lo < mean < hi <= 1.0
    # the percentile interval of the bootstrap means of 0/1 items: close to the normal one (sd of the mean 0.171)
    assert hi - lo == pytest.approx(2 * 1.96 * np.sqrt(0.625 * 0.375 / 8), abs=0.08)
    assert paired_difference(a, b, reps=4000, seed=3) == (mean, lo, hi)  # seeded
    narrow = paired_difference(a, b, level=0.5, reps=4000, seed=3)
    assert lo < narrow[1] <= narrow[2] < hi
    assert all(np.isnan(paired_difference([], [])))
    with pytest.raises(ValueError):
        paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_difference([1.0], [0.0], level=1.5)
