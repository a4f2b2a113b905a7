"""Input from other people (third audit): a web page on another site visiting the local server, and a
run folder, graph JSON or search index someone sent. Each test failed before its fix."""

from __future__ import annotations

import http.client
import json

import pytest

from helpers_run import make_run, serving
from n2g.report import build_all


@pytest.fixture
def run(tmp_path):
    """A fresh synthetic run with its report and viewer built (each test may change it)."""
    run = make_run(tmp_path)
    build_all(run)
    return run


def get(port: int, path: str, headers: dict | None = None):
    """(status, headers, body) of a GET of ``path`` with ``headers`` added (as a browser would send them;
    by default the header the viewer's pages add to an API request)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.putrequest("GET", path, skip_accept_encoding=True)
        if headers is None and path.startswith("/api/"):
            headers = {"X-N2G-Request": "1"}
        for name, value in (headers or {}).items():
            con.putheader(name, value)
        con.endheaders()
        r = con.getresponse()
        return r.status, r.headers, r.read()
    finally:
        con.close()


# ---------------------------------------------------------------------------------------------
# the server, visited by a page of another site


API = ["/api/predict?key=L0.N1&text=the%20cat", "/api/search?token=cat", "/api/similar?key=L0.N1"]


@pytest.mark.parametrize("path", API)
@pytest.mark.parametrize("headers", [
    {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"},  # <img src> or fetch(no-cors) from a web page
    {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"},  # another server on this machine (another port)
    {"Origin": "http://evil.example"},  # a browser that sends no Sec-Fetch-* headers
    {"Origin": "null"},  # a sandboxed frame or a file on disk
], ids=["cross-site", "same-site", "origin", "null-origin"])
def test_a_page_of_another_site_cannot_make_the_api_work_or_read_it(path, headers, run):
    # the Host header is the server's own (127.0.0.1): the loopback check lets it through; the page is not ours
    with serving(run) as port:
        status, h, body = get(port, path, headers)
        assert status == 403, body
        assert h["Content-Type"] == "application/json; charset=utf-8"
        assert json.loads(body) == {"error": "this server answers its API only to its own pages; open the "
                                             "viewer at the address `n2g serve` prints"}
        assert "Access-Control-Allow-Origin" not in h
        # the server's own pages (same-origin fetch), and a person typing the address, are answered
        assert get(port, path, {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"})[0] == 200
        assert get(port, path, {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"})[0] == 200
        assert get(port, path, {"Origin": f"http://127.0.0.1:{port}"})[0] == 200
        # where the browser says same-origin, that is what counts (an Origin may name the https of a proxy)
        assert get(port, path, {"Sec-Fetch-Site": "same-origin", "Origin": "https://proxy.example"})[0] == 200
        assert get(port, path)[0] == 200  # curl, scripts: with the header the pages add


@pytest.mark.parametrize("path", API)
def test_a_request_that_says_nothing_of_its_origin_must_carry_the_api_header(path, run):
    # Safari before 16.4 sends no Sec-Fetch-* headers, and an <img src> of another site's page no Origin:
    # without a header of our own the request could come from anywhere
    from n2g.viewer import API_HEADER

    with serving(run) as port:
        status, h, body = get(port, path, {"Accept": "image/webp,*/*", "User-Agent": "Safari/605.1.15"})
        assert status == 403
        assert json.loads(body) == {"error": "send the header `X-N2G-Request: 1` with API requests (the viewer's "
                                             "pages do), or open the viewer at the address `n2g serve` prints"}
        assert get(port, path, {API_HEADER: "1"})[0] == 200
        # the pages' scripts send it (a same-origin fetch with a header of its own needs no preflight)
        for page in ("/viewer/index.html", "/viewer/neurons/L0.N1.html"):
            assert b'{headers: {"X-N2G-Request": "1"}}' in get(port, page)[2], page


def test_files_of_the_run_are_not_embeddable_by_another_site(run):
    # an <img> of another site could otherwise read a drawing's size, or learn which neurons a run holds
    with serving(run) as port:
        for path in ("/neurons/L0.N1/graph.png", "/neurons/L0.N1/graph.json", "/viewer/index.html", "/nothing.png"):
            status, h, _ = get(port, path)
            assert h["Cross-Origin-Resource-Policy"] == "same-origin", path


# ---------------------------------------------------------------------------------------------
# a graph JSON someone sent


@pytest.mark.parametrize("token", [5, 1.5, True, ["a"], {"a": 1}])
def test_a_graph_whose_token_is_not_text_is_refused_when_loaded(token, run, tmp_path):
    # it loaded, and then printing it, drawing it or saving it again was a TypeError traceback
    from n2g.errors import N2GError
    from n2g.graph import NeuronGraph

    d = json.loads((run / "neurons" / "L0.N1" / "graph.json").read_text())
    node = next(n for n in d["graph"]["nodes"] if n.get("kind") == "activator" and n.get("token_id") is not None)
    node["token"] = token
    path = tmp_path / "sent.json"
    path.write_text(json.dumps(d))
    with pytest.raises(N2GError) as e:
        NeuronGraph.load(path)
    assert str(e.value) == (f"cannot read graph {path}: ValueError: node {node['id']!r}: token {token!r} is not text; "
                            "re-run n2g to regenerate it")


# ---------------------------------------------------------------------------------------------
# a search index someone made


ENDLESS_VIEW = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT);
INSERT INTO meta VALUES ('schema_version', '3');
CREATE VIEW tokens AS WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c)
  SELECT x AS token_id, 'a' || x AS token, 'L0.N1' AS key, 'activator' AS role, 1.0 AS weight, 'a' AS folded FROM c;
"""


@pytest.mark.parametrize("index", ["endless view", "pipe"])
def test_an_index_page_rendered_again_beside_an_index_n2g_did_not_write_is_answered(index, run, caplog):
    # the server renders an index page another version wrote again, reading each neuron's activating tokens from
    # index.sqlite: a view that never ends (or a FIFO in its place) held the request, and a CPU, for ever
    import os
    import sqlite3

    from n2g.viewer import INDEX_JS

    (run / "index.sqlite").unlink()
    if index == "pipe":
        os.mkfifo(run / "index.sqlite")
    else:
        con = sqlite3.connect(run / "index.sqlite")
        con.executescript(ENDLESS_VIEW)
        con.close()
    (run / "viewer" / "index.html").write_text("<html>a page of an older n2g</html>")
    with serving(run) as port:
        status, _, body = get(port, "/viewer/index.html")  # the helper gives up after 10 s
    assert status == 200 and INDEX_JS in body.decode()
    assert "L0.N1" in body.decode() and "a1" not in body.decode()  # every neuron, no token of the made-up index
    assert "cannot read the activators of" in caplog.text and "run `n2g report` to rebuild the index" in caplog.text


# ---------------------------------------------------------------------------------------------
# text of a run folder in messages on the terminal


ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x9b31m\u202e"
"""Set the terminal's title, clear the screen, an 8-bit CSI, a right-to-left override."""


def _n2g(*argv):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-m", "n2g", *map(str, argv)], capture_output=True, env=env, timeout=300)


def test_names_from_a_run_folder_reach_warnings_as_text_never_as_terminal_escapes(run):
    # a neuron folder's name and a graph node's id were written to stderr as they were: the run's maker drove the terminal
    import shutil

    shutil.copytree(run / "neurons" / "L0.N1", run / "neurons" / f"L0.N1{ESCAPES}")
    path = run / "neurons" / "L0.N2" / "graph.json"
    d = json.loads(path.read_text())
    node = next(n for n in d["graph"]["nodes"] if n.get("kind") == "activator")
    old, node["id"], node["token_id"] = node["id"], f"n{ESCAPES}", "x"
    for e in d["graph"]["edges"]:
        e["source"] = node["id"] if e["source"] == old else e["source"]
        e["target"] = node["id"] if e["target"] == old else e["target"]
    path.write_text(json.dumps(d))
    p = _n2g("report", run)
    err = p.stderr.decode("utf-8", "surrogateescape")
    assert p.returncode == 0 and "Traceback" not in err, err
    assert "skipping damaged neuron result" in err and "skipping graph of L0.N2" in err
    for ch in "\x1b\x07\x9b\u202e":
        assert ch not in err
    assert "L0.N1\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e" in err


def test_text_of_a_run_json_reaches_an_error_as_text_never_as_terminal_escapes(run):
    d = json.loads((run / "run.json").read_text())
    d["model"]["sae"] = {"hook_name": ESCAPES}
    (run / "run.json").write_text(json.dumps(d))
    p = _n2g("serve", run, "--model", "tiny")  # refused before any model is loaded
    err = p.stderr.decode("utf-8", "surrogateescape")
    assert p.returncode == 2 and err.count("\n") == 1, err
    assert err == (f"n2g: error: {run} holds SAE latents (\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\u202e); give its SAE with "
                   "--sae SAE_PATH beside --model, or serve it without --model (the graphs' predictions)\n")


def test_search_json_on_a_terminal_carries_no_8_bit_control_or_bidi_override_from_a_tampered_index(run):
    # JSON escapes the C0 controls (ESC among them) but not the C1 ones (an 8-bit CSI) or a right-to-left override
    import sqlite3

    con = sqlite3.connect(run / "index.sqlite")
    with con:
        con.execute("UPDATE tokens SET token = token || ? WHERE folded LIKE '%paris%'", ("\x9b2J\u202e",))
    con.close()
    p = _n2g("search", run, "Paris", "--json")
    out = p.stdout.decode("utf-8")
    assert p.returncode == 0 and "\x9b" not in out and "\u202e" not in out, p.stderr
    assert any(h["token"].endswith("\x9b2J\u202e") for h in json.loads(out)["results"])  # the same text, escaped


# ---------------------------------------------------------------------------------------------
# a run folder named as people name folders


@pytest.mark.parametrize("name", ["run #3", "run?x=1", "run%3F", "50% done"])
def test_a_run_folder_whose_name_is_special_in_a_uri_is_searched_and_served(name, tmp_path, capsys):
    # the index was opened as the URI file:{path}?mode=ro: a '#' cut the path short (SQLite then created an empty
    # database beside the run, read-write), a '?' or '%' named another file; search failed after "rebuilding"
    from n2g import cli

    made = make_run(tmp_path / "made")
    run = tmp_path / name
    made.rename(run)
    build_all(run)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert cli.main(["search", str(run), "Paris"]) == 0
    out, err = capsys.readouterr()
    assert "L0.N1" in out and "rebuilding" not in err, err
    with serving(run) as port:
        status, _, body = get(port, "/api/search?token=Paris")
        assert status == 200 and json.loads(body)["results"], body
        status, _, body = get(port, "/api/similar?key=L0.N1")
        assert status == 200 and json.loads(body)["results"], body
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no database made beside the run


# ---------------------------------------------------------------------------------------------
# a run.json someone made


@pytest.mark.parametrize("where", ["corpus", "model", "name"])
def test_a_run_json_nested_deeper_than_n2g_writes_is_named_and_the_report_is_written(where, run, caplog):
    # JSON nested 900 deep parses, but the report's own walk of it (report.json) then ran out of stack: a traceback
    from n2g.report import build_all

    d = json.loads((run / "run.json").read_text())
    d[where] = json.loads("[" * 900 + "]" * 900)
    (run / "run.json").write_text(json.dumps(d))
    (run / "report.html").unlink()
    build_all(run)
    assert f"{run / 'run.json'} cannot be read (it nests lists and objects more than 32 deep" in caplog.text
    assert "synthetic" not in (run / "report.html").read_text()  # the run's sections are left out, as of a damaged file
    assert json.loads((run / "report.json").read_text())["run"] == {}


def _broom(trunk: int, leaves: int) -> dict:
    """A graph that is a tree of few nodes but long paths: a chain of ``trunk`` nodes, then ``leaves`` paths ending below it."""
    nodes = [{"id": "root", "kind": "root", "token_id": None, "token": "", "depth": -1, "importance": 0.0,
              "activation": 0.0, "count": 0}]
    edges, prev = [], "root"
    for i in range(trunk):
        nodes.append({"id": f"t{i}", "kind": "activator" if i == 0 else "context", "token_id": 5 + i % 50,
                      "token": f"tok{i % 50}", "depth": i, "importance": 0.5, "activation": 0.9, "count": 1})
        edges.append({"source": prev, "target": f"t{i}"})
        prev = f"t{i}"
    for j in range(leaves):
        nodes += [{"id": f"l{j}", "kind": "context", "token_id": 1000 + j, "token": f"leaf{j}", "depth": trunk,
                   "importance": 0.5, "activation": 0.9, "count": 1},
                  {"id": f"l{j}.end", "kind": "end", "token_id": None, "token": "", "depth": trunk, "importance": 0.0,
                   "activation": 0.9, "count": 1}]
        edges += [{"source": prev, "target": f"l{j}"}, {"source": f"l{j}", "target": f"l{j}.end"}]
    return {"directed": True, "multigraph": False, "graph": {}, "nodes": nodes, "edges": edges}


def test_a_graph_whose_paths_hold_more_tokens_than_n2g_writes_is_refused_not_listed(run):
    # 4,300 paths of 500 tokens from a 2 MB file: every path's text was built for the drawing and listed on the page
    # (a 36 MB file of this shape, under every other limit, made a 2 GB page and some 10 GB of memory)
    from n2g.errors import N2GError
    from n2g.graph import MAX_PATH_TOKENS, NeuronGraph
    from n2g.render import load_graph_json

    path = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(path.read_text())
    d["graph"] = _broom(500, 4300)
    path.write_text(json.dumps(d))
    said = f"its paths hold 2,154,300 tokens in all, more than the {MAX_PATH_TOKENS:,} n2g loads"
    with pytest.raises(N2GError, match=said):
        load_graph_json(path, run, check=True)
    with pytest.raises(N2GError, match=said):
        NeuronGraph.load(path)
    for stale in ("svg", "png", "dot"):
        (path.parent / f"graph.{stale}").unlink()
    build_all(run)
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert f"cannot draw the graph: graph file {path} is damaged (" in page and len(page) < 200_000
    d["graph"] = _broom(400, 4300)  # 1.7 million tokens: loaded
    path.write_text(json.dumps(d))
    assert len(NeuronGraph.load(path).paths()) == 4300


def test_info_on_a_model_folder_someone_sent_prints_its_tokens_as_text(tmp_path, capsys):
    # the BOS token of a model folder's tokenizer was printed as it is: its maker drove the terminal
    from conftest import tiny_model, tiny_tokenizer
    from n2g import cli

    folder, bos = tmp_path / "m", "<bos>\x1b]0;pwned\x07\x1b[2J"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.exists():
            path.write_text(path.read_text().replace('"<bos>"', json.dumps(bos)))
    assert cli.main(["info", "--model", str(folder), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bos_token     <bos>\\x1b]0;pwned\\x07\\x1b[2J\n" in out and "\x1b" not in out


HOT_JOURNAL = """
import os, sqlite3, sys
con = sqlite3.connect(sys.argv[1], isolation_level=None)
con.execute("PRAGMA cache_size=1")  # spill the change to the file mid-transaction
con.execute("BEGIN")
con.execute("UPDATE tokens SET token = 'X' || token, folded = 'x' || folded")
con.execute("CREATE TABLE filler(x)")
con.execute("INSERT INTO filler SELECT randomblob(4000) FROM (WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c LIMIT 200) SELECT i FROM c)")
os._exit(0)  # a writer killed with its transaction open: its journal is left beside the file
"""


def test_a_journal_left_beside_the_index_goes_with_the_index_it_belonged_to(run, capsys):
    # SQLite opens an index with a hot journal beside it only to roll the journal back, which a read-only connection
    # may not: search failed and said "run n2g report", and n2g report rebuilt the index but left the journal
    import subprocess
    import sys

    from n2g import cli
    from n2g.search import search

    subprocess.run([sys.executable, "-c", HOT_JOURNAL, str(run / "index.sqlite")], check=True, timeout=60)
    assert (run / "index.sqlite-journal").stat().st_size > 0
    build_all(run)
    assert not (run / "index.sqlite-journal").exists()
    assert {h["key"] for h in search(run, "Paris")} >= {"L0.N1"}
    assert cli.main(["search", str(run), "Paris"]) == 0 and "L0.N1" in capsys.readouterr().out
    assert "Paris" in (run / "viewer" / "index.html").read_text()  # the page's activating tokens were read


def test_a_run_json_linking_out_of_the_run_is_not_read_into_the_report(run, tmp_path, caplog):
    # every other file of a run that leads out of it is refused; run.json's fields went into report.html and report.json
    import os

    outside = tmp_path / "elsewhere.json"
    outside.write_text(json.dumps({"name": "a file of the user's, elsewhere", "model": {"spec": "private/path"}}))
    (run / "run.json").unlink()
    os.symlink(outside, run / "run.json")
    build_all(run)
    assert f"{run / 'run.json'} cannot be read (it is a link that leads out of the run directory)" in caplog.text
    for name in ("report.html", "report.json"):
        text = (run / name).read_text()
        assert "elsewhere" not in text and "private/path" not in text
