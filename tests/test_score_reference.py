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
    # report.json and the page said "fire threshold 0.5" whatever run.json's config held
    import json

    from helpers_run import make_run
    from n2g.report import write_report

    run = make_run(tmp_path)
    info = json.loads((run / "run.json").read_text())
    info["config"]["fire_threshold"] = 0.3
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
