"""Validation report and search index on a synthesised run (tests/helpers_run.py)."""

from __future__ import annotations

import csv
import re
import json
import sqlite3

import pytest

from helpers_run import make_run
from n2g.errors import N2GError
from n2g.report import build_all, write_report
from n2g.search import build_index, search, similar


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("report"))
    build_all(run)
    return run


def test_report_json_numbers(run):
    rep = json.loads((run / "report.json").read_text())
    assert rep["kind"] == "n2g.report" and rep["methods"] == ["n2g", "token_lookup", "ngram", "zero"]
    l0, l1 = rep["layers"]
    assert (l0["layer"], l0["n_neurons"], l0["n_dead"], l0["n_no_firing_test_token"], l0["n_in_f1_mean"]) == (0, 2, 0, 1, 1)
    assert (l1["layer"], l1["n_neurons"], l1["n_dead"], l1["n_no_firing_test_token"], l1["n_in_f1_mean"]) == (1, 2, 1, 0, 1)
    # F1 means leave out L0.N2 (no firing test token), Pearson means keep it
    assert l0["methods"]["n2g"]["f1"] == pytest.approx(0.8)
    assert l0["methods"]["n2g"]["pearson"] == pytest.approx(0.45)
    assert l0["methods"]["n2g"]["nonfiring_f1"] == pytest.approx(0.95)
    assert l0["methods"]["token_lookup"]["f1"] == pytest.approx(0.6)
    assert l0["methods"]["zero"]["precision"] is None  # never fires: undefined, not 0 or 1
    assert l0["methods"]["zero"]["f1"] == 0.0
    assert l1["methods"]["n2g"]["f1"] == pytest.approx(0.5)
    assert l1["methods"]["ngram"]["f1"] == pytest.approx(0.3)
    o = rep["overall"]
    assert (o["layer"], o["n_neurons"], o["n_dead"], o["n_no_firing_test_token"]) == ("all", 4, 1, 1)
    assert o["methods"]["n2g"]["f1"] == pytest.approx(0.65)
    assert o["methods"]["n2g"]["pearson"] == pytest.approx(1.3 / 3)
    assert o["methods"]["token_lookup"]["f1"] == pytest.approx(0.5)
    assert rep["best"] == ["L0.N1", "L1.N4.neg"] and rep["worst"] == ["L1.N4.neg", "L0.N1"]
    page = (run / "report.html").read_text()  # two scored neurons: one table, not "best 2" and "worst 2"
    assert "<h2>The 2 scored neurons by N2G F1</h2>" in page and "Worst" not in page and "4 neurons, 1 dead" in page
    n2 = next(n for n in rep["neurons"] if n["key"] == "L0.N2")
    assert n2["n2g_f1"] is None and n2["score_status"] == "no_firing_test_token"


def test_report_csv_matches_json(run):
    rows = list(csv.DictReader((run / "report.csv").open()))
    assert len(rows) == 3 * 4
    row = next(r for r in rows if r["layer"] == "all" and r["method"] == "n2g")
    assert float(row["f1"]) == pytest.approx(0.65) and row["n_dead"] == "1"
    zero = next(r for r in rows if r["layer"] == "0" and r["method"] == "zero")
    assert zero["precision"] == ""


def test_report_html_is_self_contained(run):
    page = (run / "report.html").read_text()
    assert 'id="layer-table"' in page
    for text in ("0.800", "0.450", "0.650", "0.433", "0.500", "0.950"):
        assert f"<td>{text}</td>" in page, text
    assert page.count("data:image/png;base64,") == 3
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert 'href="viewer/neurons/L1.N4.neg.html"' in page
    # the run holds a negative side: normalised is not "activation / the neuron's maximum" for it
    assert "a negative side's (key <code>.neg</code>) is activation ÷ its most negative value, and each side counts" in page
    assert "synthetic &lt;test&gt; run" in page
    assert "1 dead" in page
    assert "<code>n2g predict synthetic &lt;test&gt; run \"TEXT\"</code> for those that fire on a text" in page


def test_empty_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(N2GError, match="no neuron results in .*run `n2g run` first"):
        write_report(tmp_path)
    with pytest.raises(N2GError, match="no neuron results"):
        build_all(tmp_path)


def test_build_all_renders_graphs(run):
    for key in ("L0.N1", "L0.N2", "L1.N4.neg"):
        assert (run / "neurons" / key / "graph.dot").exists()
    assert not (run / "neurons" / "L1.N3" / "graph.dot").exists()  # dead: no graph


def test_drawings_of_an_older_n2g_are_drawn_again_and_this_versions_are_kept(run, tmp_path):
    # `n2g report` redrew a graph only where its drawing was missing or older than graph.json, so a run made before
    # an upgrade kept its old drawings (old path order, legend and labels) beside the new pages' path tables
    import os
    import shutil

    from n2g.render import DRAWING_MARK
    from n2g.report import render_missing_graphs

    copy = tmp_path / "run"
    shutil.copytree(run, copy, symlinks=True)
    old = copy / "neurons" / "L0.N1" / "graph.dot"
    old.write_text(old.read_text().replace(f'  comment="{DRAWING_MARK}";\n', ""))  # as an older n2g drew it
    later = old.stat().st_mtime + 60
    for f in old.parent.glob("graph.*"):
        if f.name != "graph.json":
            os.utime(f, (later, later))  # newer than graph.json, as drawings are
    redrawn = render_missing_graphs(copy)
    assert {p.parent.name for p in redrawn} == {"L0.N1"} and DRAWING_MARK in old.read_text()
    assert render_missing_graphs(copy) == []


def test_index_tables(run):
    con = sqlite3.connect(run / "index.sqlite")
    rows = con.execute("SELECT key, layer, idx, sign, status, f1, ngram_f1 FROM neurons ORDER BY key").fetchall()
    assert rows == [("L0.N1", 0, 1, "positive", "fitted", 0.8, 0.7), ("L0.N2", 0, 2, "positive", "fitted", None, None),
                    ("L1.N3", 1, 3, "positive", "dead", None, None), ("L1.N4.neg", 1, 4, "negative", "fitted", 0.5, 0.3)]
    roles = con.execute("SELECT token, role, weight FROM tokens WHERE key = 'L0.N1' ORDER BY role, weight DESC").fetchall()
    assert roles == [(" Paris", "activator", 0.9), ("\n", "activator", 0.1), (".", "activator", -0.2), (" in", "context", 0.8)]
    con.close()


def test_search(run):
    hits = search(run, "Paris")
    assert [h["key"] for h in hits] == ["L1.N4.neg", "L0.N1", "L0.N2"]  # " Paris" 1.0, 0.9; "Paris" 0.5
    assert hits[0]["token"] == " Paris" and hits[2]["token"] == "Paris"
    # " Paris" matches " Paris" exactly and "Paris" ignoring case and spaces, exact first
    assert [(h["key"], h["match"]) for h in search(run, " Paris")] == [
        ("L1.N4.neg", "exact"), ("L0.N1", "exact"), ("L0.N2", "case-insensitive")]
    # " in" exactly, then "'single'" which contains "in"
    assert [(h["key"], h["match"]) for h in search(run, "in", role="context")] == [
        ("L0.N2", "exact"), ("L0.N1", "exact"), ("L1.N4.neg", "substring")]
    assert search(run, "in", role="activator") == []
    assert [h["key"] for h in search(run, "<script>alert(1)</script>")] == ["L1.N4.neg"]
    assert search(run, "' OR 1=1 --") == []
    assert len(search(run, "Paris", limit=1)) == 1
    with pytest.raises(N2GError, match="unknown role"):
        search(run, "Paris", role="bogus")


def test_similar(run):
    sims = similar(run, "L0.N1")
    assert [k for k, _ in sims] == ["L1.N4.neg", "L0.N2"]
    assert sims[0][1] == pytest.approx(2 / 6) and sims[1][1] == pytest.approx(1 / 7)
    assert similar(run, "L1.N3") == []
    with pytest.raises(N2GError, match="no neuron"):
        similar(run, "L9.N9")


def test_build_index_is_atomic_and_rebuildable(run):
    before = (run / "index.sqlite").stat().st_ino
    build_index(run)
    assert (run / "index.sqlite").stat().st_ino != before
    assert not list(run.glob(".index.*"))


def test_end_of_run_checks_each_result_once_and_keeps_only_summaries(tmp_path, monkeypatch):
    """Index, viewer and report go over every result: each file is parsed and checked once for all
    three (pages read it again, one at a time, without checking it again), and what stays in memory
    is a summary without the examples."""
    import n2g.search as search

    run = make_run(tmp_path)
    checks = []
    real = search.result_problem
    monkeypatch.setattr(search, "result_problem", lambda r: checks.append(r.neuron.key) or real(r))
    monkeypatch.setattr(search, "_loaded", {})
    build_all(run)
    keys = sorted(p.parent.name for p in run.glob("neurons/*/result.json"))
    assert sorted(checks) == keys
    assert all(not r.examples and not r.band_examples and not r.histogram for _, r in search._loaded.values())
    assert len(list((run / "viewer" / "neurons").glob("*.html"))) == len(keys)


def test_similar_equals_the_pairwise_definition(run):
    """similar() in two queries gives exactly the weighted Jaccard computed pair by pair."""
    con = sqlite3.connect(run / "index.sqlite")
    weights = {}
    rows = "token_id IS NOT NULL AND NOT (role = 'activator' AND weight < 0.5)"  # quiet activators do not count
    for key, tid, role in con.execute(f"SELECT key, token_id, role FROM tokens WHERE {rows}"):
        w = weights.setdefault(key, {})
        w[tid] = max(w.get(tid, 0.0), 2.0 if role == "activator" else 1.0)
    keys = [k for (k,) in con.execute("SELECT key FROM neurons")]
    con.close()
    for key in keys:
        mine, want = weights.get(key, {}), []
        for other, theirs in weights.items():
            if other == key or not mine:
                continue
            ids = mine.keys() | theirs.keys()
            inter = sum(min(mine.get(t, 0.0), theirs.get(t, 0.0)) for t in ids)
            if inter > 0:
                want.append((other, inter / sum(max(mine.get(t, 0.0), theirs.get(t, 0.0)) for t in ids)))
        want.sort(key=lambda kv: (-kv[1], kv[0]))
        assert similar(run, key, limit=100) == want


def test_similar_leaves_out_quiet_activators(tmp_path):
    """A token two graphs share only as a quiet activator (graded, never predicted to fire) does
    not make them similar; search still finds it."""
    run = make_run(tmp_path)
    for key in ("L0.N1", "L0.N2"):
        path = run / "neurons" / key / "graph.json"
        doc = json.loads(path.read_text())
        g = doc["graph"]
        g["nodes"] += [{"id": "q", "kind": "activator", "token": " the", "token_id": 555, "depth": 0,
                        "importance": 1.0, "activation": 0.2, "count": 1},
                       {"id": "q.end", "kind": "end", "token": "", "token_id": None, "depth": 0,
                        "importance": 0.0, "activation": 0.2, "count": 1}]
        g["edges"] += [{"source": "root", "target": "q"}, {"source": "q", "target": "q.end"}]
        path.write_text(json.dumps(doc))
    build_index(run)
    sims = dict(similar(run, "L0.N1"))
    assert sims["L0.N2"] == pytest.approx(1 / 7) and sims["L1.N4.neg"] == pytest.approx(2 / 6)  # as without it
    assert {h["key"] for h in search(run, " the", role="activator")} >= {"L0.N1", "L0.N2"}
    info = json.loads((run / "run.json").read_text())  # a run fitted at 0.15: " the" at 0.2 fires in both graphs
    info["identity"]["config"]["fire_threshold"] = 0.15
    (run / "run.json").write_text(json.dumps(info))
    sims = dict(similar(run, "L0.N1"))  # (it was quiet at 0.5, whatever the run's threshold)
    assert sims["L0.N2"] == pytest.approx(3 / 9) and sims["L1.N4.neg"] == pytest.approx(2 / 8)


def test_report_shows_the_token_ceiling_per_layer_when_results_have_one(run, tmp_path):
    assert "token ceiling" not in (run / "report.html").read_text()  # results from before: no empty columns
    other = make_run(tmp_path)
    for key, (n_firing, n_seen) in {"L0.N1": (10, 5), "L1.N4.neg": (4, 4)}.items():
        path = other / "neurons" / key / "result.json"
        d = json.loads(path.read_text())
        share = n_seen / n_firing
        d["ceiling"] = {"n_firing": n_firing, "n_seen": n_seen, "f1": 2 * share / (1 + share)}
        path.write_text(json.dumps(d))
    write_report(other)
    rep = json.loads((other / "report.json").read_text())
    l0, l1 = rep["layers"]
    assert l0["ceiling"] == {"f1": pytest.approx(2 / 3), "n_neurons": 1, "unseen_share": 0.5}
    assert l1["ceiling"] == {"f1": 1.0, "n_neurons": 1, "unseen_share": 0.0}
    assert rep["overall"]["ceiling"] == {"f1": pytest.approx(5 / 6), "n_neurons": 2, "unseen_share": pytest.approx(5 / 14)}
    page = (other / "report.html").read_text()
    table = page[page.index('id="layer-table"'):page.index("</table>", page.index('id="layer-table"'))]
    assert "max F1" in table and '<td class="ceiling">0.667</td><td>50.00 %</td>' in table
    rows = list(csv.DictReader((other / "report.csv").open()))
    layer0 = [r for r in rows if r["layer"] == "0"]
    assert layer0 and all(float(r["ceiling_f1"]) == pytest.approx(2 / 3) and float(r["ceiling_unseen_share"]) == 0.5
                          for r in layer0)
    assert all(r["ceiling_f1"] == "" for r in csv.DictReader((run / "report.csv").open()))  # results from before


def test_a_run_without_any_f1_still_gets_its_plots_and_no_warning(tmp_path):
    import shutil
    import warnings

    from n2g.report import _plots

    run = make_run(tmp_path)
    for result in list((run / "neurons").glob("*/result.json")):  # keep the dead and the never-firing neurons
        if (json.loads(result.read_text()).get("scores") or {}).get("n2g", {}).get("f1") is not None:
            shutil.rmtree(result.parent)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found" was printed to the user
        write_report(run)
    rep = json.loads((run / "report.json").read_text())
    assert rep["neurons"] and all(n["n2g_f1"] is None for n in rep["neurons"])
    plots = _plots(rep)
    assert len(plots) == 3 and all(len(png) > 1000 for _, png in plots)
    page = (run / "report.html").read_text()
    assert "scored neuron" not in page and "Best" not in page and "Worst" not in page  # no empty tables


def test_best_and_worst_tables_once_there_are_more_scored_neurons_than_one_table_holds(tmp_path):
    from n2g.report import N_BEST

    run = make_run(tmp_path)
    source = run / "neurons" / "L0.N1"
    for i in range(100, 100 + N_BEST):  # copies of L0.N1 under other indices, F1 falling with the index
        result = json.loads((source / "result.json").read_text())
        result["neuron"]["index"] = i
        result["scores"]["n2g"]["f1"] = 1.0 - (i - 100) / 100
        (run / "neurons" / f"L0.N{i}").mkdir()
        (run / "neurons" / f"L0.N{i}" / "result.json").write_text(json.dumps(result))
    write_report(run)
    page = (run / "report.html").read_text()
    assert f"<h2>Best {N_BEST} neurons by N2G F1</h2>" in page and f"<h2>Worst {N_BEST} neurons by N2G F1</h2>" in page


def test_a_result_in_another_neurons_folder_is_skipped(run, tmp_path, caplog):
    """A copied or renamed neuron folder (``neurons/<b>x`` holding L0.N1's result) was a second L0.N1 in the
    index and viewer, with the other folder's graph beside it (audit 34)."""
    import shutil

    from n2g.search import scan_results

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copytree(copy / "neurons" / "L0.N1", copy / "neurons" / "<b>x")
    keys = [r.neuron.key for _, r, _ in scan_results(copy)]
    assert keys == sorted(set(keys), key=keys.index) and keys.count("L0.N1") == 1
    assert "holds the result of L0.N1, not of its folder's neuron" in caplog.text


def test_a_run_never_takes_a_result_from_another_neurons_folder(run, tmp_path):
    """Resuming: neurons/L0.N2 holding L0.N1's result is redone, not counted done; the scores table has L0.N1
    once (audit 34)."""
    import shutil

    from n2g.records import NeuronId
    from n2g.store import RunStore

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "neurons" / "L0.N2")
    shutil.copytree(copy / "neurons" / "L0.N1", copy / "neurons" / "L0.N2")
    store = RunStore(copy)
    assert store.load_result(NeuronId(0, 2)) is None and store.load_result(NeuronId(0, 1)) is not None
    keys = [r.neuron.key for r in store.results()]
    assert keys.count("L0.N1") == 1 and "L0.N2" not in keys


def test_the_report_opens_with_the_graph_beside_the_best_lookup_per_layer(run):
    rep = json.loads((run / "report.json").read_text())
    # token lookup and 3-gram lookup tie at 0.5 over every layer: the first in the report's order is named
    assert rep["overall"]["methods"]["token_lookup"]["f1"] == rep["overall"]["methods"]["ngram"]["f1"] == pytest.approx(0.5)
    assert rep["lookup"] == "token_lookup"
    assert [row["graph_nodes"] for row in rep["layers"] + [rep["overall"]]] == [4.0, 4.0, 4.0]
    page = (run / "report.html").read_text()
    assert page.index('id="glance-table"') < page.index('id="layer-table"')
    table = page[page.index('id="glance-table"'):page.index("</table>", page.index('id="glance-table"'))]
    cells = [re.findall(r"<td[^>]*>([^<]*)</td>", row) for row in table.split("<tr")[2:]]
    assert cells[0] == ["0", "2", "0.800", "0.600", "+0.200", "0.450", "4"]
    assert cells[-1][:5] == ["all", "4", "0.650", "0.500", "+0.150"] and cells[-1][-1] == "4"
    assert "<b>token lookup</b>, the lookup with the highest F1 over every layer" in page


def test_the_pages_small_grey_text_reads_at_wcag_aa():
    # the explanations of every number (.muted, 13 px) were #777 on white: 4.48 to 1, under AA's 4.5
    from n2g import report, viewer

    for css in (report.CSS, viewer.CSS):
        (colour,) = re.findall(r"\.muted\{color:#([0-9a-f]{3,6});", css)
        colour = "".join(c * 2 for c in colour) if len(colour) == 3 else colour
        c = [int(colour[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        luminance = 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
        assert 1.05 / (luminance + 0.05) >= 4.5, colour
