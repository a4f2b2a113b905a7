"""Scores, lookups and the token ceiling checked against plain-Python references written apart from n2g."""

from __future__ import annotations

import numpy as np
import pytest

from n2g.score import score_arrays


def _ref_pearson(t: list[float], p: list[float]) -> float | None:
    """Pearson r by its definition; None where a side has every value equal (no variance to correlate)."""
    if len(t) < 2 or len(set(t)) == 1 or len(set(p)) == 1:
        return None
    mt, mp = sum(t) / len(t), sum(p) / len(p)
    cov = sum((a - mt) * (b - mp) for a, b in zip(t, p))
    return cov / (sum((a - mt) ** 2 for a in t) * sum((b - mp) ** 2 for b in p)) ** 0.5


@pytest.mark.parametrize("value", [0.1, 0.3, 0.7, 1 / 3])
def test_a_constant_side_has_no_pearson_and_constant_true_values_no_explained_variance(value):
    # np.std of 0.1 repeated 3 times is 1.4e-17, not 0: the old check let that through, giving r ~ 1e-16
    # for a predictor that says one value everywhere, and explained variance -3e32 (or 1.0) for a constant truth
    rng = np.random.default_rng(0)
    for n in (3, 11, 37, 100):
        varied = rng.random(n)
        s = score_arrays([varied], [np.full(n, value)])
        assert s.pearson is None and _ref_pearson(varied.tolist(), [value] * n) is None
        s = score_arrays([np.full(n, value)], [varied])
        assert s.pearson is None and s.explained_variance is None
        s = score_arrays([np.full(n, value)], [np.full(n, 0.1)])  # a constant offset: was "explains all" (1.0)
        assert s.explained_variance is None and s.pearson is None


def _exact_pearson_and_ev(t: list[float], p: list[float]) -> tuple[float, float]:
    """Pearson r and explained variance in exact rational arithmetic (no overflow, no underflow)."""
    from fractions import Fraction

    t, p = [Fraction(x) for x in t], [Fraction(x) for x in p]
    n = len(t)
    mt, mp = sum(t) / n, sum(p) / n
    vt, vp = sum((a - mt) ** 2 for a in t), sum((b - mp) ** 2 for b in p)
    cov = sum((a - mt) * (b - mp) for a, b in zip(t, p))
    d = [a - b for a, b in zip(t, p)]
    vd = sum((x - sum(d) / n) ** 2 for x in d)
    return (1 if cov > 0 else -1) * float(cov * cov / (vt * vp)) ** 0.5, float(1 - vd / vt)


@pytest.mark.parametrize("scale", [1e-300, 1e-170, 1.0, 1e160, 1e300])
def test_pearson_and_explained_variance_at_any_magnitude(scale):
    # squares of values beyond 1e154 (or below 1e-162) leave float64: r and explained variance were NaN there
    rng = np.random.default_rng(7)
    for _ in range(5):
        t = rng.random(12) * scale
        p = (rng.random(12) + t / scale) * scale * 0.5
        s = score_arrays([t[:5], t[5:]], [p[:5], p[5:]])
        r, ev = _exact_pearson_and_ev(t.tolist(), p.tolist())
        assert s.pearson == pytest.approx(r, rel=1e-12, abs=1e-12)
        assert s.explained_variance == pytest.approx(ev, rel=1e-12, abs=1e-12)


def test_a_lookup_value_just_under_the_threshold_stays_under_it():
    # the tables were float32: a training value (or a mean) of 0.49999999 came back as 0.5, so the lookup
    # predicted firing where every training occurrence was quiet
    from n2g.baselines import NGramLookup

    for stat, acts in (("max", [0.49999999, 0.2]), ("mean", [0.49999999, 0.49999999]), ("0.75", [0.49999999, 0.1])):
        ids = [np.array([5, 5] if stat != "max" else [5, 6])]
        model = NGramLookup(1, stat).fit_arrays(ids, [np.array(acts)])
        assert model.predict([5])[0] < 0.5
        s = model.score([_example([5, 6, 7], [0.49999999, 0.2, 0.9])])
        assert s.n_predicted_firing == 0 and s.precision is None and s.recall == 0.0


def _example(ids, acts):
    from n2g.records import Example

    return Example(list(ids), [float(a) for a in acts], split="test", source="top", excerpt_index=0)


def test_the_lookups_are_scored_at_the_run_fire_threshold():
    # with fire_threshold 0.3 the graph and the ceiling counted 13 firing test tokens and every lookup 8:
    # the lookups were scored at their class default of 0.5, so their F1 was of another task
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from planted import text

    from n2g.distill import distill

    x = text(0, [[7], [8]], n=40, length=24)
    model = distill(lambda t: (t == 7).float() + (t == 8).float() * 0.4, x.tolist(), preset_name="paper",
                    fire_threshold=0.3, refit=False)
    test = [e for e in model.examples_ if e.split == "test"]
    firing = sum(a >= 0.3 for e in test for a in e.activations)
    assert firing > sum(a >= 0.5 for e in test for a in e.activations)  # the threshold matters here
    assert model.ceiling_["n_firing"] == firing
    assert {name: s.n_firing for name, s in model.scores_.items()} == {name: firing for name in model.scores_}


def test_the_report_states_the_fire_threshold_the_run_was_scored_at(tmp_path):
    # report.json and the page said "fire threshold 0.5" whatever run.json's config held; then the threshold was
    # read from a top-level config (as the tests' synthetic run had it), while n2g writes it with the run's identity
    import json

    from helpers_run import make_run
    from n2g.report import write_report

    run = make_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["identity"]["config"]["fire_threshold"] = 0.3
    (run / "run.json").write_text(json.dumps(info))
    write_report(run)
    assert json.loads((run / "report.json").read_text())["fire_threshold"] == 0.3
    assert "fire threshold 0.3 " in (run / "report.html").read_text()


def test_a_layer_without_a_token_ceiling_beside_one_with_it(tmp_path):
    # a layer whose neurons have no ceiling (all dead, none with a firing test token, or results from before
    # ceilings) beside one that has it: the page's template read row.ceiling and write_report raised
    import json

    from helpers_run import make_run
    from n2g.report import write_report

    run = make_run(tmp_path)
    path = run / "neurons" / "L0.N1" / "result.json"
    d = json.loads(path.read_text())
    d["ceiling"] = {"n_firing": 10, "n_seen": 5, "f1": 2 * 0.5 / 1.5}
    path.write_text(json.dumps(d))
    write_report(run)
    rep = json.loads((run / "report.json").read_text())
    assert rep["layers"][0]["ceiling"]["f1"] == pytest.approx(2 / 3) and "ceiling" not in rep["layers"][1]
    page = (run / "report.html").read_text()
    row = page[page.index('data-layer="1"'):]
    row = row[: row.index("</tr>")]
    assert '<td class="ceiling">—</td><td>—</td>' in row
    assert '<td class="ceiling">0.667</td><td>50.00 %</td>' in page


# ---------------------------------------------------------------------------------------------
# References that agree today, on what the other tests leave unchecked


@pytest.mark.parametrize("threshold", [0.5, 0.3, 1 / 3])
def test_scores_match_scikit_learn_with_ties_at_the_threshold(threshold):
    """Values exactly at the threshold fire (">="), on both sides, in every count; excerpts of any length pool."""
    import sklearn.metrics as skm  # the [test] extra installs scikit-learn

    rng = np.random.default_rng(11)
    below = np.nextafter(threshold, 0.0)
    for _ in range(200):
        lengths = rng.integers(0, 6, size=rng.integers(1, 5))
        true = [rng.choice([0.0, below, threshold, 1.0], n) for n in lengths]
        pred = [rng.choice([0.0, below, threshold, 0.9], n) for n in lengths]
        s = score_arrays(true, pred, threshold)
        t, p = np.concatenate(true), np.concatenate(pred)
        yt, yp = [int(v >= threshold) for v in t], [int(v >= threshold) for v in p]
        assert (s.n_tokens, s.n_firing, s.n_predicted_firing) == (len(yt), sum(yt), sum(yp))
        assert s.status == ("ok" if sum(yt) else "no_firing_test_token")
        if not len(yt):
            continue
        prec, rec, f1, _ = skm.precision_recall_fscore_support(yt, yp, labels=[1, 0], zero_division=np.nan)
        for got, want in zip((s.precision, s.recall, s.nonfiring_precision, s.nonfiring_recall),
                             (prec[0], rec[0], prec[1], rec[1])):
            assert (got is None and np.isnan(want)) or got == pytest.approx(want)
        for got, r, want in ((s.f1, rec[0], f1[0]), (s.nonfiring_f1, rec[1], f1[1])):
            # undefined only with nothing to recall; 0 where nothing is predicted (scikit-learn's zero_division)
            assert got is None if np.isnan(r) else got == pytest.approx(0.0 if np.isnan(want) else want)
        if _ref_pearson(t.tolist(), p.tolist()) is None:
            assert s.pearson is None
        elif min(np.ptp(t), np.ptp(p)) > 1e-6:  # (a side spread over one float's width is too ill-conditioned to compare)
            r, ev = _exact_pearson_and_ev(t.tolist(), p.tolist())
            assert (s.pearson, s.explained_variance) == pytest.approx((r, ev), rel=1e-9, abs=1e-12)


def _dict_lookup(seqs, acts, n, statistic):
    """A lookup as dictionaries of tuples: every context of 1..n tokens ending at a training token."""
    tables = {}
    for ids, a in zip(seqs, acts):
        for j in range(len(ids)):
            for m in range(1, min(n, j + 1) + 1):
                tables.setdefault(tuple(int(x) for x in ids[j - m + 1 : j + 1]), []).append(float(a[j]))

    def value(v):
        v = sorted(v)
        if statistic == "max":
            return v[-1]
        if statistic == "mean":
            return sum(v) / len(v)
        return v[-(-int(float(statistic) * len(v) * 4) // 4) - 1]  # nearest rank: the ceil(q * n)-th value

    def predict(seq):
        out = []
        for j in range(len(seq)):
            keys = [tuple(int(x) for x in seq[j - m + 1 : j + 1]) for m in range(min(n, j + 1), 0, -1)]
            hit = next((k for k in keys if k in tables), None)  # the longest context seen, else 0
            out.append(0.0 if hit is None else max(value(tables[hit]), 0.0))
        return out

    return predict


def test_lookups_match_a_dictionary_reference():
    """Back-off from the longest seen context, short contexts at a sequence's start, unseen tokens, ids near
    the packing limit, negative activations (clipped at 0), the mean, 0.75 quantile and maximum."""
    from n2g.baselines import fit_baselines

    rng = np.random.default_rng(5)
    for trial in range(40):
        vocab = int(rng.integers(1, 5))
        offset = 2**21 - 2 - vocab if trial % 5 == 0 else 0  # the largest ids a packed key holds
        seqs = [rng.integers(0, vocab, int(rng.integers(0, 9))) + offset for _ in range(int(rng.integers(0, 10)))]
        acts = [rng.choice([-0.3, 0.0, 0.25, 0.5, 0.75, 1.0], len(s)) if trial % 2 else rng.normal(0.3, 0.5, len(s))
                for s in seqs]
        queries = [rng.integers(0, vocab + 1, int(rng.integers(0, 9))) + offset for _ in range(3)]
        for name, model in fit_baselines(seqs, acts).items():
            if name == "zero":
                continue
            ref = _dict_lookup(seqs, acts, model.n, model.statistic)
            for q, got in zip(queries, model.predict_sequences(queries)):
                np.testing.assert_allclose(got, ref(q), rtol=1e-12, atol=0, err_msg=name)


def test_the_lookup_quantile_is_the_nearest_rank_not_numpy_interpolation():
    """ngram*_0.75 takes the ceil(0.75 n)-th smallest value: numpy's method="inverted_cdf", an observed value,
    not numpy's default linear interpolation."""
    from n2g.baselines import NGramLookup

    for n in range(1, 40):
        v = np.random.default_rng(n).random(n)
        got = NGramLookup(1, "0.75").fit_arrays([np.zeros(n, np.int64)], [v]).predict([0])[0]
        assert got == np.quantile(v, 0.75, method="inverted_cdf")
        assert got in v
    v = np.arange(4) / 10
    assert NGramLookup(1, "0.75").fit_arrays([np.zeros(4, np.int64)], [v]).predict([0])[0] != np.quantile(v, 0.75)


def test_the_token_ceiling_is_the_f1_of_the_predictor_it_describes():
    """Exact on every held-out token whose token fires somewhere in training, silent on the rest, scored."""
    from n2g.distill import token_ceiling

    rng = np.random.default_rng(9)
    for _ in range(100):
        threshold = float(rng.choice([0.5, 0.3]))
        levels = [0.0, 0.2, np.nextafter(threshold, 0.0), threshold, 0.9]
        train_ids = [rng.integers(0, 6, int(rng.integers(0, 9))) for _ in range(int(rng.integers(0, 5)))]
        train_acts = [rng.choice(levels, len(s)) for s in train_ids]
        test = [_example(rng.integers(0, 8, int(rng.integers(0, 9))), []) for _ in range(int(rng.integers(0, 5)))]
        for e in test:
            e.activations = [float(a) for a in rng.choice(levels, len(e.token_ids))]
        fired = {int(t) for ids, a in zip(train_ids, train_acts) for t, v in zip(ids, a) if v >= threshold}
        preds = [[a if t in fired else 0.0 for t, a in zip(e.token_ids, e.activations)] for e in test]
        s = score_arrays([e.activations for e in test], preds, threshold)
        c = token_ceiling(train_ids, train_acts, test, threshold)
        assert (c["n_firing"], c["n_seen"]) == (s.n_firing, s.n_predicted_firing)
        assert c["f1"] is None if s.f1 is None else c["f1"] == pytest.approx(s.f1)


def test_report_means_match_a_reference_in_json_csv_and_html(tmp_path):
    """Per-layer and overall means: dead neurons counted, not scored; firing precision/recall/F1 and the
    ceiling over neurons with a firing test token; the rest over every scored neuron; undefined values skipped."""
    import csv
    import io
    import json
    import random
    import re
    import shutil

    from helpers_run import make_run
    from n2g.records import NeuronId, NeuronResult, NeuronStats, Scores
    from n2g.report import GROUPS, METRICS, _csv, compute_report, fmt, report_html

    def mean(v):
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else None

    for seed in range(3):
        rng = random.Random(seed)
        run = make_run(tmp_path / str(seed))
        for d in (run / "neurons").iterdir():
            shutil.rmtree(d)
        results = []
        for i in range(30):
            dead, ok = rng.random() < 0.15, rng.random() < 0.8
            v = lambda: None if rng.random() < 0.15 else rng.random()
            scores = {} if dead else {m: Scores(
                precision=v() if ok else None, recall=v() if ok else None, f1=rng.random() if ok else None,
                nonfiring_precision=v(), nonfiring_recall=v(), nonfiring_f1=v(), pearson=v(), explained_variance=v(),
                status="ok" if ok else "no_firing_test_token") for m in ("n2g", "token_lookup", "ngram", "zero")}
            nf = rng.randint(1, 9) if ok else 0
            seen = rng.randint(0, nf)
            ceiling = {} if dead or rng.random() < 0.3 else {"n_firing": nf, "n_seen": seen,
                                                             "f1": 2 * seen / (nf + seen) if nf else None}
            r = NeuronResult(NeuronId(rng.choice([0, 2, 5]), i), "dead" if dead else "fitted",
                             NeuronStats(max_activation=1.0, firing_rate=0.01, n_sampled_tokens=10), scores=scores,
                             ceiling=ceiling)
            (run / "neurons" / r.neuron.key).mkdir()
            (run / "neurons" / r.neuron.key / "result.json").write_text(json.dumps(r.to_dict()))
            results.append(r)
        rep = compute_report(run)
        groups = [(layer, [r for r in results if r.neuron.layer == layer]) for layer in sorted({0, 2, 5} & {r.neuron.layer for r in results})]
        rows = rep["layers"] + [rep["overall"]]
        assert [row["layer"] for row in rows] == [g for g, _ in groups] + ["all"]
        csv_rows = iter(csv.DictReader(io.StringIO(_csv(rep))))
        page = report_html(rep, [])
        table = page[page.index('id="layer-table"'):page.index("</table>", page.index('id="layer-table"'))]
        html_rows = re.findall(r'<tr(?: class="all")? data-layer="[^"]*">(.*?)</tr>', table, re.S)
        for row, (_, rs), html in zip(rows, groups + [("all", results)], html_rows):
            scored = [r for r in rs if r.status != "dead"]
            firing = [r for r in scored if r.scores["n2g"].status == "ok"]
            assert (row["n_neurons"], row["n_dead"], row["n_no_firing_test_token"], row["n_in_f1_mean"]) == (
                len(rs), len(rs) - len(scored), len(scored) - len(firing), len(firing))
            cells = [str(row["layer"]), str(len(rs)), str(len(rs) - len(scored)), str(len(scored) - len(firing))]
            ceilings = [r.ceiling for r in firing if r.ceiling.get("f1") is not None]
            for _, metric in GROUPS:
                for m in rep["methods"]:
                    want = mean([getattr(r.scores[m], metric) for r in (firing if metric in ("precision", "recall", "f1") else scored)])
                    got = row["methods"][m][metric]
                    assert got is None if want is None else got == pytest.approx(want, rel=1e-12)
                    cells.append(fmt(want))
                if metric == "f1":
                    c = {"f1": mean([c["f1"] for c in ceilings]), "n_neurons": len(ceilings), "unseen_share":
                         sum(c["n_firing"] - c["n_seen"] for c in ceilings) / sum(c["n_firing"] for c in ceilings)} if ceilings else None
                    assert row.get("ceiling") == (None if c is None else pytest.approx(c, rel=1e-12))
                    cells += [fmt(c["f1"]), f"{100 * c['unseen_share']:.2f} %"] if c else ["—", "—"]
            assert re.findall(r"<td[^>]*>(.*?)</td>", html) == cells
            for m in rep["methods"]:
                line = next(csv_rows)
                assert (line["layer"], line["method"]) == (str(row["layer"]), m)
                assert [line[k] for k in METRICS] == ["" if row["methods"][m][k] is None else repr(row["methods"][m][k]) for k in METRICS]


def test_pearson_and_explained_variance_of_sides_that_vary_by_a_few_floats():
    # [0, 1] against [0.5 - 1 ulp, 0.5]: exactly r = 1; a true side of two neighbouring floats
    from n2g.score import explained_variance, pearson

    below = np.nextafter(0.5, 0.0)
    assert pearson(np.array([0.0, 1.0]), np.array([below, 0.5])) == pytest.approx(1.0, abs=1e-12)
    assert pearson(np.array([below, 0.5, below]), np.array([0.0, 1.0, 0.0])) == pytest.approx(1.0, abs=1e-12)
    assert explained_variance(np.array([below, 0.5]), np.array([below, 0.5])) == 1.0


def test_a_run_json_that_links_out_of_the_run_gives_no_fire_threshold(tmp_path):
    # the report refuses to read such a run.json; its threshold was still read from wherever the link led
    import json

    from helpers_run import make_run
    from n2g.search import _run_fire_threshold

    run = make_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["identity"]["config"]["fire_threshold"] = 0.3
    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps(info))
    (run / "run.json").unlink()
    (run / "run.json").symlink_to(outside)
    assert _run_fire_threshold(run) == 0.5
    (run / "run.json").unlink()
    (run / "run.json").write_text(json.dumps(info))
    assert _run_fire_threshold(run) == 0.3
