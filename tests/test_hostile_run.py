"""A run folder someone else made: graphs that are not tries, text that is not Unicode, a search index
made by hand, drawings that never finish, links swapped in while the viewer serves (found by an audit
of `report`, `search` and `serve`; each case once cost a traceback, a hang, minutes or gigabytes)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.request

import pytest

from helpers_run import api, make_run
from n2g.errors import N2GError
from n2g.fileio import loads_json
from n2g.graph import MAX_GRAPH_DEPTH, NeuronGraph
from n2g.render import load_graph_json


def _graph_file(run, key="L0.N1"):
    return run / "neurons" / key / "graph.json"


def _edit_graph(path, edit):
    d = json.loads(path.read_text())
    edit(d["graph"])
    path.write_text(json.dumps(d))


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "run")


def _cycle(g):  # a node that hangs from two parents, one of them below it
    nodes = [n["id"] for n in g["nodes"] if n.get("kind") == "context"]
    activator = next(n["id"] for n in g["nodes"] if n.get("kind") == "activator")
    g["edges"].append({"source": nodes[0], "target": activator})


def _deep(g):  # a chain of wildcards deeper than any graph n2g writes
    top = next(n["id"] for n in g["nodes"] if n.get("kind") == "activator")
    for i in range(MAX_GRAPH_DEPTH + 5):
        g["nodes"].append({"id": f"w{i}", "kind": "wildcard", "token_id": None, "token": "*", "depth": i + 1,
                           "importance": 0.5, "activation": 0.0, "count": 1, "run": 0})
        g["edges"].append({"source": top, "target": f"w{i}"})
        top = f"w{i}"


def _huge_id(g):
    next(n for n in g["nodes"] if n.get("kind") == "activator")["token_id"] = 2**64


@pytest.mark.parametrize("edit, what", [(_cycle, "hangs from 2 nodes"), (_deep, "deeper than"),
                                        (_huge_id, "token id")])
def test_a_graph_that_is_not_an_n2g_trie_is_refused_when_loaded(run, edit, what):
    path = _graph_file(run)
    _edit_graph(path, edit)
    with pytest.raises(N2GError, match=what):
        load_graph_json(path, run)
    with pytest.raises(N2GError, match="cannot read graph"):
        NeuronGraph.load(path)


def test_text_with_a_lone_surrogate_is_refused_and_a_pair_is_kept():
    assert loads_json(b'{"t": "\\ud83d\\ude00"}') == {"t": "\U0001F600"}  # an escaped pair: one emoji
    assert loads_json(b'{"t": "\\\\ud800"}') == {"t": "\\ud800"}  # an escaped backslash: plain text
    with pytest.raises(ValueError, match="lone surrogate"):
        loads_json(b'{"t": ["ok", {"k": "x\\ud800"}]}')


def test_report_and_search_skip_results_and_graphs_that_hold_a_lone_surrogate(run, caplog):
    from n2g.report import build_all
    from n2g.search import search

    result = run / "neurons" / "L0.N2" / "result.json"
    result.write_text(result.read_text().replace('"top"', '"top\\udc80"', 1))
    _edit_graph(_graph_file(run, "L1.N4.neg"), lambda g: g["nodes"][1].update(token="x\udc80"))
    with caplog.at_level(logging.WARNING):
        build_all(run)
    assert "L0.N2" in caplog.text and "lone surrogate" in caplog.text
    assert [h["key"] for h in search(run, "Paris", role="activator")] == ["L0.N1"]  # L1.N4.neg's graph is skipped


def test_a_ceiling_with_no_firing_token_but_an_f1_is_damage_not_a_division_by_zero(run, caplog):
    from n2g.report import build_all

    for folder in (run / "neurons").iterdir():
        d = json.loads((folder / "result.json").read_text())
        d["ceiling"] = {"n_firing": 0, "n_seen": 0, "f1": 0.5}
        (folder / "result.json").write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING), pytest.raises(N2GError, match="none of the 4 neuron results .* can be read"):
        build_all(run)  # one line (the CLI's message), not a ZeroDivisionError
    assert "ceiling has a field of the wrong type" in caplog.text


def _hostile_index(path):
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT); INSERT INTO meta VALUES ('schema_version', '3');
        CREATE VIEW neurons AS SELECT 'L0.N1' key, 0 layer, 1 idx, 'positive' sign, 'fitted' status, .5 f1,
            .5 pearson, .1 firing_rate, 1.0 max_activation, .5 token_lookup_f1, .5 ngram_f1, 'ok' score_status;
        CREATE VIEW tokens AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
            SELECT x token_id, 'tok' token, 'L0.N1' key, 'activator' role, .5 weight, 'tok' folded FROM c;""")
    con.commit()
    con.close()


@pytest.mark.parametrize("plant", [_hostile_index, lambda p: (p.unlink(missing_ok=True), os.mkfifo(p))],
                         ids=["a view that never ends", "a FIFO"])
def test_a_search_index_n2g_did_not_write_is_rebuilt_not_run(run, plant):
    from n2g.search import INDEX_NAME, build_index, search

    build_index(run)
    plant(run / INDEX_NAME)
    started = time.monotonic()
    assert [h["key"] for h in search(run, "Paris", role="activator")] == ["L1.N4.neg", "L0.N1", "L0.N2"]
    assert time.monotonic() - started < 20
    assert (run / INDEX_NAME).is_file() and not (run / INDEX_NAME).is_symlink()


def test_a_query_past_its_time_budget_is_one_line(run, monkeypatch):
    from n2g import search as s

    s.build_index(run)
    monkeypatch.setattr(s, "SEARCH_SECONDS", 0.2)
    con = s._open(run / s.INDEX_NAME)
    try:
        with pytest.raises(N2GError, match="took more than 0.2 s"):
            s._execute(con, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c")
    finally:
        con.close()


def test_a_prediction_stops_at_its_deadline():
    g = NeuronGraph()
    g.add_path([(5, 1.0)], 0.9)
    assert g.predict_sequence([5, 6, 5])[0] == pytest.approx(0.9)
    with pytest.raises(TimeoutError):
        g.predict_sequence([5, 6, 5], deadline=time.monotonic() - 1)


def test_a_drawing_graphviz_cannot_finish_leaves_that_graph_undrawn_and_the_report_whole(run, monkeypatch, caplog):
    from n2g import render
    from n2g.report import build_all

    if not render.dot_available():
        pytest.skip("Graphviz is not installed")
    monkeypatch.setattr(render, "DOT_SECONDS", 1e-4)  # every drawing "takes too long"
    with caplog.at_level(logging.WARNING):
        artifacts = build_all(run)
    assert "took more than" in caplog.text
    assert (run / "report.html").exists() and artifacts


def test_page_text_from_the_run_cannot_reorder_or_hide_what_the_page_shows(run):
    from n2g.viewer import neuron_page
    from n2g.search import read_result

    path = run / "neurons" / "L0.N1" / "result.json"
    d = json.loads(path.read_text())
    d["examples"][0]["source"] = "top\u202eevil"
    d["steering"] = {"prompt": "safe \u202eexe.txt\u202c x\x1b[31m", "before": "b\u202e", "after": "a", "gainers": [],
                     "losers": [], "layer": 0, "neuron": 1, "value": 1.0}
    path.write_text(json.dumps(d))
    page = neuron_page(run, read_result(path.parent))
    assert "\u202e" not in page and "\x1b" not in page
    assert "top\\u202eevil" in page and "exe.txt\\u202c x\u241b[31m" in page


def test_a_control_run_that_is_a_link_out_of_the_run_is_not_read(run, tmp_path):
    from n2g.report import build_all

    other = make_run(tmp_path / "other")
    (run / "control-random").symlink_to(other, target_is_directory=True)
    build_all(run)
    assert json.loads((run / "report.json").read_text()).get("control") is None


def test_the_server_never_sends_a_file_a_swapped_in_link_leads_to(run, tmp_path):
    """A folder of the run and a link out of it swap names (renameat2) while the server opens a file under
    that name: it sends the run's file or 404, never the file outside."""
    import ctypes

    from n2g.report import build_all
    from n2g.viewer import make_server

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("no renameat2 to swap names atomically")
    build_all(run)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.json").write_text('{"secret": "OUTSIDE"}')
    inside = run / "neurons" / "swap"
    inside.mkdir()
    (inside / "data.json").write_text('{"decoy": "inside"}')
    (run / "neurons" / "swap_link").symlink_to(outside, target_is_directory=True)
    server = make_server(run, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stop = threading.Event()

    def swap():
        a, b = str(inside).encode(), str(run / "neurons" / "swap_link").encode()
        while not stop.is_set():
            libc.renameat2(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    bodies = []
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{server.server_address[1]}/neurons/swap/data.json") as r:
                    bodies.append(r.read())
            except urllib.error.HTTPError as e:
                assert e.code == 404
    finally:
        stop.set()
        swapper.join()
        server.shutdown()
        server.server_close()
    assert bodies and all(b"OUTSIDE" not in b for b in bodies)


def test_the_server_keeps_only_the_most_recently_asked_neurons_loaded(run, monkeypatch):
    from n2g import viewer
    from n2g.report import build_all

    build_all(run)
    monkeypatch.setattr(viewer, "CACHED_NEURONS", 2)
    server = viewer.make_server(run, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        for key in ("L0.N1", "L0.N2", "L1.N4.neg", "L0.N2"):
            with urllib.request.urlopen(api(f"{base}/api/predict?key={key}&text=%20Paris")) as r:
                assert json.load(r)["key"] == key
        assert list(server.RequestHandlerClass.cache) == ["L1.N4.neg", "L0.N2"]
    finally:
        server.shutdown()
        server.server_close()


def test_json_in_another_encoding_cannot_carry_a_lone_surrogate_past_the_check():
    for encoding in ("utf-16-le", "utf-32"):
        with pytest.raises(ValueError):
            loads_json(json.dumps({"token": "sat\ud800"}).encode(encoding))
