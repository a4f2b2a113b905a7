"""The n-gram lookups: exact values, backoff, and the shared fit equal to fitting each alone."""

import numpy as np
import pytest

from n2g.baselines import BASELINES, NGramLookup, fit_baselines


def brute_force(seqs, acts, n, statistic, query):
    """A dictionary lookup written the obvious way, to check the vectorised one against."""
    tables = [{} for _ in range(n)]
    for ids, a in zip(seqs, acts):
        for j in range(len(ids)):
            for m in range(1, n + 1):
                if j - m + 1 >= 0:
                    tables[m - 1].setdefault(tuple(ids[j - m + 1 : j + 1]), []).append(a[j])
    out = []
    for j in range(len(query)):
        value = 0.0
        for m in range(n, 0, -1):
            key = tuple(query[j - m + 1 : j + 1]) if j - m + 1 >= 0 else None
            if key is not None and key in tables[m - 1]:
                v = sorted(tables[m - 1][key])
                if statistic == "max":
                    value = v[-1]
                elif statistic == "mean":
                    value = float(np.mean(v))
                else:
                    value = v[int(np.floor(float(statistic) * (len(v) - 1) + 0.5))]
                break
        out.append(max(value, 0.0))
    return np.array(out, np.float32)


def test_backoff_and_statistics_exact():
    seqs = [np.array([1, 2, 3]), np.array([5, 2, 3]), np.array([2, 3])]
    acts = [np.array([0.0, 0.1, 0.9]), np.array([0.0, 0.2, 0.3]), np.array([0.0, 0.6])]
    query = [1, 2, 3, 7, 2, 3, 9, 3]
    three_max = NGramLookup(3, "max").fit_arrays(seqs, acts).predict(query)
    # [1 2] seen (0.1); [1 2 3] seen (0.9); "7" unseen -> 0; [7 2 3] unseen, [2 3] seen (max of 0.9, 0.3, 0.6); [9 3] unseen, [3] max 0.9
    assert three_max.tolist() == pytest.approx([0.0, 0.1, 0.9, 0.0, 0.2, 0.9, 0.0, 0.9])
    two_mean = NGramLookup(2, "mean").fit_arrays(seqs, acts).predict(query)
    assert two_mean[2] == pytest.approx((0.9 + 0.3 + 0.6) / 3)
    one_q = NGramLookup(1, "0.75").fit_arrays(seqs, acts).predict(query)
    assert one_q[2] == pytest.approx(0.9)  # values of token 3: 0.3, 0.6, 0.9 -> nearest rank of q0.75 is 0.9


@pytest.mark.parametrize("name", [n for n in BASELINES if n != "zero"])
def test_shared_fit_matches_brute_force(name):
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, 6, size=rng.integers(1, 12)) for _ in range(40)]
    acts = [rng.random(len(s)) * (s == 2) for s in seqs]  # token 2 fires, with context-dependent strength
    query = rng.integers(0, 7, size=200)
    shared = fit_baselines(seqs, acts)[name]
    alone = BASELINES[name]().fit_arrays(seqs, acts)
    expected = brute_force(seqs, acts, alone.n, alone.statistic, query)
    np.testing.assert_allclose(shared.predict(query), expected, rtol=1e-6)
    np.testing.assert_allclose(alone.predict(query), expected, rtol=1e-6)


def test_zero_and_empty():
    made = fit_baselines([], [])
    assert made["zero"].predict([1, 2]).tolist() == [0.0, 0.0]
    assert made["ngram"].predict([1, 2]).tolist() == [0.0, 0.0]


def test_large_token_ids_never_share_a_key():
    # Packed keys hold 21 bits per token: 2**21 + 5 after 0 and 5 after 0 would be one key if ids were packed as they are.
    big = 2**21 + 5
    seqs, acts = [np.array([0, big]), np.array([0, 5])], [np.array([0.0, 1.0]), np.array([0.0, 0.0])]
    for name in ("ngram2_max", "ngram"):
        alone = BASELINES[name]().fit_arrays(seqs, acts)
        shared = fit_baselines(seqs, acts, [name])[name]
        for m in (alone, shared):
            got = m.predict_sequences([np.array([0, 5]), np.array([0, big]), np.array([3, big]), np.array([0, 2**31 - 1])])
            assert [g.tolist() for g in got] == [[0.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]
    # Training ids that fit: an unseen large id at prediction time matches nothing either.
    small = NGramLookup(2, "max").fit_arrays([np.array([0, 5])], [np.array([0.0, 1.0])])
    assert small.predict_sequences([np.array([0, big]), np.array([0, 5])])[0].tolist() == [0.0, 0.0]
    assert small.predict_sequences([np.array([0, 5])])[0].tolist() == [0.0, 1.0]
