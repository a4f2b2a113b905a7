"""`n2g predict`, `n2g.search.fires_on` and `/api/fires` given hostile or unusual input: hand-made indexes,
runs fitted at another fire threshold, many neurons, and what --json holds."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from helpers_run import add_dense_neuron, make_run
from n2g import cli
from n2g.report import build_all
from n2g.search import fires_on, search


def main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("predict"))
    build_all(run)
    return run


@pytest.fixture
def run(built, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(built, copy, symlinks=True)
    return copy


def test_index_keys_that_are_not_their_neurons_key_are_not_read_as_folders(run, capsys, caplog):
    # a hand-made index: keys with path pieces lead to another neuron's graph, and a key naming another
    # neuron than its numbers would be read at the wrong neuron of the model
    con = sqlite3.connect(run / "index.sqlite")
    for key in ("L0.N2/../L0.N1", "../neurons/L0.N1", "L7.N7"):
        con.execute("INSERT INTO neurons (key, layer, idx, sign, status, f1, max_activation) VALUES (?,?,?,?,?,?,?)",
                    (key, 0, 2, "positive", "fitted", 0.99, 1.0))
        con.execute("INSERT INTO tokens VALUES (?,?,?,?,?,?)", (100, " Paris", key, "activator", 0.9, "paris"))
    con.commit()
    con.close()
    assert [h["key"] for h in fires_on(run, [101, 100])] == ["L0.N1"]
    code, out, err = main(["predict", run, " in Paris", "--json"], capsys)
    assert code == 0 and [h["key"] for h in json.loads(out)["results"]] == ["L0.N1"]
    assert "names 3 neurons whose key is not its layer, index and sign" in caplog.text


class _CountingModel:
    """A stand-in for a 30-layer model of 1,536 neurons a layer (SmolLM2's shape) that counts its forward
    passes; neuron (l, i) reads l + i / 10,000 + position."""

    def __init__(self):
        self.passes = 0

    def check_neuron(self, layer, index):
        assert 0 <= layer < 30 and 0 <= index < 1536

    def activations(self, token_ids, mask, neurons):
        import torch

        self.passes += 1
        pos = torch.arange(token_ids.shape[1], dtype=torch.float32)[:, None]
        cols = torch.tensor([l + i / 10_000 for l, i in neurons], dtype=torch.float32)[None, :]
        return (pos + cols)[None]


def test_the_true_activations_of_a_whole_run_take_one_forward_pass_on_a_short_text():
    # the server holds its model lock for these passes: a pass per 4,096 neurons (and each sign counted apart)
    # ran SmolLM2 from its first layer 23 times for its 92,160 keys, where one pass reads them all
    from n2g.viewer import true_activations

    rows = [{"key": f"L{l}.N{i}{s}", "layer": l, "index": i, "sign": "negative" if s else "positive",
             "status": "fitted", "max_activation": 2.0} for l in range(30) for i in range(1536) for s in ("", ".neg")]
    model = _CountingModel()
    true = true_activations(model, rows, list(range(12)))
    assert model.passes == 1 and len(true) == len(rows)
    assert true["L29.N1535"].tolist() == pytest.approx([(29.1535 + p) / 2 for p in range(12)])
    assert true["L3.N7.neg"].tolist() == pytest.approx([-(3.0007 + p) / 2 for p in range(12)])
    model = _CountingModel()  # a long text: as many passes as the memory budget needs, each value still right
    true = true_activations(model, rows, list(range(12)), cells=12 * 10_000)
    assert model.passes == 5 and true["L29.N1535"].tolist() == pytest.approx([(29.1535 + p) / 2 for p in range(12)])


def _fit_at(run, threshold):
    """The run as if fitted at another fire threshold (run.json's config and every graph say so)."""
    made = json.loads((run / "run.json").read_text())
    made["identity"]["config"]["fire_threshold"] = threshold
    (run / "run.json").write_text(json.dumps(made))
    for gpath in (run / "neurons").glob("*/graph.json"):
        d = json.loads(gpath.read_text())
        d["fire_threshold"] = threshold
        gpath.write_text(json.dumps(d))


def test_a_neuron_that_truly_fires_at_the_runs_lower_threshold_is_listed(run):
    # fitted at 0.3: L0.N2 truly at 0.4 fires, though its graph holds none of the text's tokens ("\n", ".")
    # and so says it does not -- the miss the listing is there to show; L1.N3 (dead, no graph) fires at 0.35
    import numpy as np

    _fit_at(run, 0.3)
    true = {"L0.N2": np.array([0.0, 0.4], np.float32), "L0.N1": np.array([0.2, 0.1], np.float32),
            "L1.N3": np.array([0.35, np.nan], np.float32)}
    hits = {h["key"]: h for h in fires_on(run, [105, 106], true)}
    assert sorted(hits) == ["L0.N2", "L1.N3"]
    assert hits["L0.N2"]["fires"] == [] and hits["L0.N2"]["true_fires"] == [1]
    assert hits["L1.N3"]["true_fires"] == [0] and hits["L1.N3"]["true"] == [0.35, None]


def test_json_says_how_many_neurons_fire_beyond_the_limit(run, capsys):
    # the table ends "... and 1 more (--limit)"; --json cut the list at --limit and said nothing of the rest
    code, out, _ = main(["predict", run, " in the London Paris", "--limit", "1"], capsys)
    assert code == 0 and out.splitlines()[-1] == "... and 1 more (--limit)"
    code, out, _ = main(["predict", run, " in the London Paris", "--limit", "1", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["n_results"] == 2 and [h["key"] for h in data["results"]] == ["L0.N1"]


def test_a_graph_too_slow_for_its_budget_is_left_out_not_called_damaged(run, caplog, monkeypatch):
    # " in the London Paris": L0.N1 and L0.N2 fire; L0.N2's walk runs past its budget
    from n2g.graph import NeuronGraph

    real = NeuronGraph.predict_sequence

    def slow(self, ids, deadline=None):
        if self.neuron is not None and self.neuron.key == "L0.N2":
            raise TimeoutError("past its deadline")
        return real(self, ids, deadline=deadline)

    monkeypatch.setattr(NeuronGraph, "predict_sequence", slow)
    assert [h["key"] for h in fires_on(run, [101, 104, 102, 100])] == ["L0.N1"]
    assert "left out L0.N2: its graph took more than 5 s to predict on this text" in caplog.text
    assert "re-run `n2g run`" not in caplog.text


def test_the_graphs_likeliest_to_fire_are_read_first(run, monkeypatch):
    # a reading the server stops at its time budget keeps the strongest activators of the text, whatever their layer
    from n2g.graph import NeuronGraph

    read = []
    real = NeuronGraph.load.__func__

    def load(cls, path):
        read.append(path.parent.name)
        return real(cls, path)

    monkeypatch.setattr(NeuronGraph, "load", classmethod(load))
    fires_on(run, [101, 104, 102, 100])  # " in the London Paris"
    assert read == ["L1.N4.neg", "L0.N1", "L0.N2"]  # activators " Paris" 1.0 and 0.9, " London" 0.6


def test_a_graph_that_fires_on_any_token_is_read_whatever_the_texts_tokens(run, capsys):
    # a dense neuron's graph: "*" fires (0.9) but right after " in" (0.1); it holds no activating token, and its
    # one context token is not in the text, so which neurons fire on " the." left it out (the index listed no row
    # for the wildcard activator), though its graph fires on both tokens
    add_dense_neuron(run)
    build_all(run)
    assert [(e["key"], e["fires"]) for e in fires_on(run, [104, 106]) if e["key"] == "L1.N6"] == [("L1.N6", [0, 1])]
    assert [(e["key"], e["fires"]) for e in fires_on(run, [101, 104]) if e["key"] == "L1.N6"] == [("L1.N6", [0])]
    code, out, _ = main(["predict", run, " the."], capsys)
    assert code == 0 and "L1.N6" in out
    # the row that says so is no token: no search finds it, and the viewer lists no activating token for it
    assert search(run, "*") == [] and all(h["key"] != "L1.N6" for h in search(run, "the"))
    index = (run / "viewer" / "index.html").read_text()
    row = index[index.index('href="neurons/L1.N6.html"'):]
    assert '<td class="l tok" data-v=""></td></tr>' in row[:row.index("</tr>") + 5]


@pytest.mark.parametrize("command", ["predict", "serve"])
def test_an_sae_given_for_a_run_of_mlp_neurons_is_one_line_before_any_model_loads(run, capsys, tmp_path, command):
    # the latents' activations would be shown as the MLP neurons' true activations
    argv = [command, run, *(["x = 1"] if command == "predict" else ["--port", "0"]), "--model", tmp_path / "no-model",
            "--sae", tmp_path / "no-sae"]
    code, out, err = main(argv, capsys)
    assert code == 2 and err.strip().endswith("holds the model's MLP neurons, not an SAE's latents; "
                                              f"{'predict on' if command == 'predict' else 'serve'} it without --sae"), err


def test_a_value_just_below_the_threshold_is_not_shown_as_firing(run, capsys):
    # a graph keeps an END its quantile called quiet just below the threshold (the float32 below 0.5): the JSON
    # of `n2g predict`, /api/fires and /api/predict rounded it to 0.5, which the page's script (and anyone reading
    # the JSON) takes for firing, though "fires" said it does not; a true 0.49996 was listed in true_fires,
    # though scores and the neuron page count it quiet
    import numpy as np

    from helpers_run import serving

    below = float(np.nextafter(np.float32(0.5), np.float32(0)))
    gpath = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(gpath.read_text())
    for node in d["graph"]["nodes"]:
        if node["id"] == "root/100/END":  # " Paris" alone
            node["activation"] = below
    gpath.write_text(json.dumps(d))
    true = {"L0.N1": np.array([0.49996, 0.5], np.float32)}
    (hit,) = fires_on(run, [100, 100], true, neurons=["L0.N1"])
    assert hit["predicted"][0] < 0.5 and hit["predicted_max"] < 0.5 and hit["fires"] == []
    assert hit["true"][0] < 0.5 and hit["true_fires"] == [1]
    with serving(run) as port:
        import urllib.request

        from helpers_run import api

        with urllib.request.urlopen(api(f"http://127.0.0.1:{port}/api/predict?key=L0.N1&text=+Paris")) as r:
            got = json.loads(r.read())
    assert got["token_ids"] == [100] and got["predicted"][0] < 0.5
    # the terminal's table printed it with 2 decimals: 0.50, beside a graph that it says does not fire
    code, out, _ = main(["predict", run, " Paris", "--neuron", "L0.N1"], capsys)
    assert code == 0 and "0.50" not in out and "0.49" in out, out
