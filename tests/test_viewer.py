"""Viewer pages and the local server, on a synthesised run with hostile corpus text."""

from __future__ import annotations

import json
import shutil
import re
import socket
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from helpers_run import QUOTED, SCRIPT, SPECIALS, add_histogram, add_large_neuron, api, make_run
from n2g.errors import N2GError
from n2g.report import METHOD_NAMES, build_all
from n2g.viewer import NEURON_JS, make_server


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("viewer"))
    add_histogram(run)
    add_large_neuron(run)
    build_all(run)
    return run


class Collect(HTMLParser):
    """Text content and tags of a page, as a browser's parser sees them."""

    def __init__(self):
        super().__init__()
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []
        self.titles: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "title" in a:
            self.titles.append(a["title"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path):
    p = Collect()
    p.feed(path.read_text())
    return p


def test_pages_exist(run):
    assert (run / "viewer" / "index.html").exists()
    for key in ("L0.N1", "L0.N2", "L1.N3", "L1.N4.neg"):
        assert (run / "viewer" / "neurons" / f"{key}.html").exists()


def scripts(raw: str) -> list[tuple[str, str]]:
    return re.findall(r'<script nonce="([^"]+)">(.*?)</script>', raw, re.S)


def test_neuron_page_escapes_corpus_text(run):
    page_path = run / "viewer" / "neurons" / "L1.N4.neg.html"
    raw = page_path.read_text()
    assert "<script>alert" not in raw and "<b>x</b>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    p = parse(page_path)
    # the one script is the fixed try-your-own-text script, allowed by the page's nonce
    assert sum(tag == "script" for tag, _ in p.tags) == 1
    ((nonce, body),) = scripts(raw)
    assert body == NEURON_JS and f"script-src 'nonce-{nonce}'" in raw
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    text = "".join(p.text)
    assert SCRIPT in text and QUOTED in text and SPECIALS in text  # shown literally
    assert any(SCRIPT in t for t in p.titles)  # hover titles keep the text too
    assert "<svg" in raw  # graph inline
    assert "Similar neurons" in text and 'href="L0.N1.html"' in raw
    summary = raw[raw.index('<p id="summary"'):raw.index("</p>", raw.index('<p id="summary"'))]
    assert "&lt;script&gt;" in summary and "<script" not in summary, "the summary escapes token text"


def test_neuron_page_contents(run):
    raw = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    p = parse(run / "viewer" / "neurons" / "L0.N1.html")
    text = "".join(p.text)
    assert 'id="train-excerpts"' in raw and 'id="test-excerpts"' in raw
    assert "true activation (normalised)" in text and "graph prediction (normalised)" in text
    # per-token colouring with the value in the title
    assert 'style="background:rgba(214,39,40,1.000);color:#fff" title="␣Paris  true 1.000"' in raw
    assert 'title="␣Paris  predicted 0.700"' in raw
    assert "[104]" in text  # an excerpt without token strings falls back to ids
    assert "0.800" in text and METHOD_NAMES["token_lookup"] in text and METHOD_NAMES["ngram"] in text
    assert "␣France" in text and "␣Texas" in text
    assert "firing rate 1.00 % of 1000 sampled tokens" in text
    # units labelled: raw maximum, normalised excerpt maxima with their raw value, output-token effect unit
    assert "maximum activation 5.0000 (raw)" in text
    assert "max 1.00 norm.(5.000 raw)" in text
    assert "effect (logit per unit of raw activation)" in text
    # graph_stats {"activator": 3, ..., "end": 4, "paths": 6}: "paths" counts training tokens, not paths; two of
    # the activators (newline at 0.1, "." at -0.2) hold graded values and never fire, and the header says so
    assert ("graph: 3 activating tokens (2 of them quiet: never predicted to fire), 1 context node, 0 wildcard nodes, "
            "4 paths ·") in text and "6 paths" not in text
    n2 = "".join(parse(run / "viewer" / "neurons" / "L0.N2.html").text)
    assert "no firing test token" in n2
    dead = "".join(parse(run / "viewer" / "neurons" / "L1.N3.html").text)
    assert "dead" in dead and "no graph" in dead and "never fires" in dead


def test_negative_neuron_page_shows_raw_values_as_the_model_computes_them(run):
    # L1.N4.neg: stats on its side (maximum 3.0 of the negated activation, quantile 0.99 of it 0.5); the model's
    # own values are negative there: its extreme is -3, an excerpt peaking at 0.8 normalised is -2.4 raw, and the
    # quantile 0.99 of the side (0.5 / 3 normalised) is -0.5 raw. The summary names the same extreme.
    raw = (run / "viewer" / "neurons" / "L1.N4.neg.html").read_text()
    text = "".join(parse(run / "viewer" / "neurons" / "L1.N4.neg.html").text)
    assert "most negative activation -3.0000 (raw)" in text and "maximum activation" not in text
    assert "most negative value (this is its negative side) on the scanned corpus (-3.0000 raw)" in text
    assert "max 0.80 norm.(-2.400 raw)" in text
    assert '<td class="l">0.99</td><td>-0.5000</td><td>0.1667</td>' in raw
    assert "effect (logit per unit of fall in raw activation)" in text
    summary = text[text.index("L1.N4.neg"):text.index("Units:")]
    assert "most negative activation on the corpus is -3 (raw)" in summary and "strongest activation" not in summary
    positive = "".join(parse(run / "viewer" / "neurons" / "L0.N1.html").text)
    assert "maximum activation 5.0000 (raw)" in positive and "most negative" not in positive


def test_neuron_page_explains_first(run):
    raw = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    text = "".join(parse(run / "viewer" / "neurons" / "L0.N1.html").text)
    summary = text[text.index("L0.N1 fires on"):text.index("Units:")]
    assert "␣Paris (0.90)" in summary and "␣in right before it" in summary and "␣in [␣Paris]: 0.70" in summary
    assert "strongest activation on the corpus is 5 (raw)" in summary and "F1 0.80 (token lookup 0.60)" in summary
    order = [raw.index(s) for s in ('id="summary"', 'id="test-excerpts"', 'id="graph"', 'id="try-form"',
                                    'id="scores"', 'id="histogram"', 'id="train-excerpts"')]
    assert order == sorted(order), "summary, then true-vs-predicted excerpts, then graph, then scores"


def test_neuron_page_histogram_and_bands(run):
    raw = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    bars = re.findall(r'<rect class="bar" x="[^"]+" y="([^"]+)" width="[^"]+" height="([^"]+)" fill="(#[0-9a-f]+)"', raw)
    assert len(bars) == 11, "one bar per non-empty bin"
    heights = [float(h) for _, h, _ in bars]
    assert heights[2] == max(heights), "the bin holding 900 of 1000 tokens is the tallest"
    assert 0 < min(heights) < heights[2] / 3, "log scale: a 1-token bin is still visible but much lower"
    assert [f for _, _, f in bars][-4:] == ["#d62728"] * 4, "bins at or above the fire threshold are red"
    assert "density (log scale)" in raw and "1000 stored by the scan" in raw
    assert 'id="band-0.9"' in raw and 'id="band-0"' in raw
    text = "".join(parse(run / "viewer" / "neurons" / "L0.N1.html").text)
    assert "90th–99th percentile (9 stored excerpts, peaks 0.40–0.85 normalised)" in text
    assert "bottom half (50 stored excerpts" in text
    assert "top 1 % (1 stored excerpts, peaks 0.90–1.00 normalised)" in text and "no excerpt of this band stored" in text
    no_hist = "".join(parse(run / "viewer" / "neurons" / "L0.N2.html").text)
    assert "no histogram stored" in no_hist


def test_large_graph_page_lists_every_path(run):
    raw = (run / "viewer" / "neurons" / "L1.N5.html").read_text()
    rows = re.findall(r"<tr><td>(\d+)</td><td class=\"l tok\">([^<]*)</td>", raw)
    assert len(rows) == 90 + 23, "every path in the table"
    assert rows[0] == ("1", "[␣strongest]")
    assert '<details id="paths-box" open>' in raw and "(the drawing shows the 14 strongest)" in raw
    svg = (run / "neurons" / "L1.N5" / "graph.dot").read_text()
    assert "+99 more paths" in svg


def test_index_page(run):
    raw = (run / "viewer" / "index.html").read_text()
    p = parse(run / "viewer" / "index.html")
    links = [a.get("href") for t, a in p.tags if t == "a"]
    for key in ("L0.N1", "L0.N2", "L1.N3", "L1.N4.neg"):
        assert f"neurons/{key}.html" in links
    assert 'data-sort="num"' in raw and 'id="q"' in raw and "n2g serve RUN" in raw
    (nonce,) = re.findall(r"<script nonce=\"([^\"]+)\">", raw)
    assert f"'nonce-{nonce}'" in raw
    assert raw.count("<script") == 1
    # the offline message points at the filter box where it is: below the search, in the Browse section
    assert raw.index('id="search-msg"') < raw.index('id="filter"') and "filter box below" in raw and "box above" not in raw


def test_index_page_lists_the_tokens_a_graph_fires_on_not_its_quiet_activators(run):
    # L0.N1's graph fires on " Paris" and holds quiet activators "\n" (0.1) and "." (-0.2), as every real graph holds
    # graded values of common tokens; the column "activating tokens" listed them too (up to 4 activators by weight)
    raw = (run / "viewer" / "index.html").read_text()
    row = raw[raw.index('href="neurons/L0.N1.html"'):]
    row = row[:row.index("</tr>")]
    assert re.findall(r'<td class="l tok" data-v="([^"]*)">', row) == ["\u2423Paris"]


def test_index_page_has_a_sortable_token_ceiling_column(tmp_path):
    from n2g.viewer import write_viewer

    run = make_run(tmp_path)
    path = run / "neurons" / "L0.N1" / "result.json"
    d = json.loads(path.read_text())
    d["ceiling"] = {"n_firing": 8, "n_seen": 6, "f1": 12 / 14}
    path.write_text(json.dumps(d))
    write_viewer(run)
    raw = (run / "viewer" / "index.html").read_text()
    head = re.findall(r"<th [^>]*>([^<]+)</th>", raw[raw.index('<table id="neurons"'):])
    assert head[head.index("n-gram F1") + 1] == "max F1"
    row = raw[raw.index('href="neurons/L0.N1.html"'):]
    row = row[:row.index("</tr>")]
    cells = re.findall(r'<td data-v="([^"]*)">([^<]*)</td>', row)
    assert (repr(12 / 14), "0.857") in cells
    other = raw[raw.index('href="neurons/L0.N2.html"'):]
    assert '<td data-v="">—</td>' in other[:other.index("</tr>")]  # a result without a ceiling


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_api_and_static(run):
    server = make_server(run, "127.0.0.1", 0)
    port = server.server_address[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(api(base + "/api/search?token=Paris&role=activator")) as r:
            assert r.headers["Content-Type"].startswith("application/json")
            keys = [h["key"] for h in json.load(r)["results"]]
        assert keys == ["L1.N4.neg", "L0.N1", "L0.N2"]
        with urllib.request.urlopen(api(base + "/api/search?token=.")) as r:  # L0.N1's "." at -0.2 never fires
            assert [(h["key"], h["role"], h["quiet"]) for h in json.load(r)["results"]] == [("L0.N1", "activator", True)]
        with urllib.request.urlopen(api(base + "/api/search?token=%3Cscript%3Ealert(1)%3C%2Fscript%3E")) as r:
            assert [h["key"] for h in json.load(r)["results"]] == ["L1.N4.neg"]
        with urllib.request.urlopen(api(base + "/api/similar?key=L0.N1")) as r:
            assert json.load(r)["results"][0]["key"] == "L1.N4.neg"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(api(base + "/api/search?token=x&role=bogus"))
        assert e.value.code == 400 and "unknown role" in json.load(e.value)["error"]
        with urllib.request.urlopen(base + "/") as r:  # redirected to the viewer
            assert r.url.endswith("/viewer/index.html") and b'id="neurons"' in r.read()
        with urllib.request.urlopen(base + "/report.html") as r:
            assert b"layer-table" in r.read()
        # port in use -> user-facing error
        with pytest.raises(N2GError, match="--port"):
            make_server(run, "127.0.0.1", port)
    finally:
        server.shutdown()
        server.server_close()


def test_server_needs_a_viewer(tmp_path):
    with pytest.raises(N2GError, match="n2g report"):
        make_server(tmp_path, "127.0.0.1", _free_port())


def test_search_is_case_insensitive_by_prefix_and_substring(run):
    from n2g.search import search

    exact = search(run, "Paris", role="activator")
    assert [h["key"] for h in exact] == ["L1.N4.neg", "L0.N1", "L0.N2"] and {h["match"] for h in exact} == {"exact"}
    lower = search(run, "paris", role="activator")
    assert [h["key"] for h in lower] == ["L1.N4.neg", "L0.N1", "L0.N2"]
    assert {h["match"] for h in lower} == {"case-insensitive"}
    assert {h["key"] for h in search(run, "PAR")} == {"L0.N1", "L0.N2", "L1.N4.neg"}
    assert {h["match"] for h in search(run, "PAR")} == {"prefix"}
    sub = search(run, "ari")
    assert {h["match"] for h in sub} == {"substring"} and {h["token"] for h in sub} == {" Paris", "Paris"}
    (hit,) = search(run, "WORD17", role="activator")
    assert hit["key"] == "L1.N5" and hit["token"] == " word17" and hit["match"] == "case-insensitive"
    (hit,) = search(run, "word1", role="activator")
    assert hit["token"] == " word1", "an exact (case-insensitive) match beats a longer prefix match"
    assert search(run, "%") == [] and search(run, "_") == [], "LIKE wildcards are searched literally"
    assert search(run, "lon")[0]["token"] == " London"


def test_search_rebuilds_an_index_of_an_older_schema(tmp_path):
    import sqlite3

    from n2g.search import INDEX_NAME, search

    run = make_run(tmp_path)
    build_all(run)
    con = sqlite3.connect(run / INDEX_NAME)
    con.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
    con.execute("DELETE FROM tokens")
    con.commit()
    con.close()
    assert [h["key"] for h in search(run, "paris", role="activator")] == ["L1.N4.neg", "L0.N1", "L0.N2"]


def _get_json(url):
    try:
        with urllib.request.urlopen(api(url)) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_try_your_own_text_without_a_model_uses_the_runs_vocabulary(run):
    from urllib.parse import quote

    from n2g.graph import NeuronGraph

    server = make_server(run, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/api/predict"
        status, d = _get_json(base + "?key=L0.N1&text=" + quote(" in Paris. xyz Paris"))
        assert status == 200, d
        assert d["tokens"] == [" in", " Paris", ".", " xyz", " Paris"]
        assert d["token_ids"] == [101, 100, 106, None, 100]
        graph = NeuronGraph.load(run / "neurons" / "L0.N1" / "graph.json")
        expect = graph.predict_sequence([101, 100, 106, -(2**31), 100])
        assert d["predicted"] == pytest.approx(expect.tolist(), abs=1e-4)
        assert d["predicted"][1] > 0.5 and d["predicted"][0] == 0.0
        assert d["true"] is None and "run's own vocabulary" in d["tokenizer"]
        for query, code, message in (("?key=L0.N1&text=", 400, "no text given"),
                                     ("?key=L0.N1&text=" + "a" * 2001, 400, "at most 2000"),
                                     ("?key=L9.N9&text=x", 404, "no readable result"),
                                     ("?key=../../etc&text=x", 404, "keys look like")):
            status, d = _get_json(base + query)
            assert status == code and message in d["error"], (query, d)
        status, d = _get_json(base + "?key=L1.N3&text=" + quote(" Paris"))  # dead: no graph, predicts 0
        assert status == 200 and d["predicted"] == [0.0]
    finally:
        server.shutdown()
        server.server_close()


def test_which_neurons_fire_on_a_text_is_answered_by_the_api(run):
    from urllib.parse import quote

    from helpers_run import serving

    with serving(run) as port:
        base = f"http://127.0.0.1:{port}/api/fires?text="
        status, d = _get_json(base + quote(" in Paris. the London"))
        assert status == 200, d
        assert d["tokens"] == [" in", " Paris", ".", " the", " London"] and d["complete"] is True
        assert [(h["key"], h["fires"], h["predicted_max"]) for h in d["results"]] == [("L0.N1", [1], 0.7)]
        status, d = _get_json(base + quote(" in the London Paris"))  # " London" two tokens after " in"; " Paris" alone
        assert [(h["key"], h["fires"]) for h in d["results"]] == [("L0.N1", [3]), ("L0.N2", [2])]
        assert d["n_results"] == 2 and "true" not in d["results"][0]
        status, d = _get_json(base + "a" * 2001)
        assert status == 400 and "at most 2000" in d["error"]
        status, d = _get_json(base)
        assert status == 400 and "no text given" in d["error"]


def test_which_neurons_fire_on_a_text_with_a_model_lists_those_that_truly_fire(tmp_path, tiny_llama):
    # L0.N1's maximum set to the model's on this text: it truly fires there, though its graph (" Paris") says not
    import torch
    from urllib.parse import quote

    from helpers_run import serving

    run = make_run(tmp_path)
    raw = tiny_llama.activations(torch.tensor([[4, 5, 6]]), None, [(0, 1)])[0, :, 0].numpy()
    d = json.loads((run / "neurons" / "L0.N1" / "result.json").read_text())
    d["stats"]["max_activation"] = float(raw.max())
    (run / "neurons" / "L0.N1" / "result.json").write_text(json.dumps(d))
    build_all(run)
    with serving(run, model=tiny_llama) as port:
        status, d = _get_json(f"http://127.0.0.1:{port}/api/fires?text=" + quote("the cat sat"))
    assert status == 200 and d["tokens"] == ["the", "cat", "sat"], d
    (hit,) = d["results"]
    assert (hit["key"], hit["fires"], hit["true_fires"]) == ("L0.N1", [], [int(raw.argmax())])
    assert hit["true"] == pytest.approx((raw / raw.max()).tolist(), abs=1e-4) and hit["true_max"] == 1.0


def test_try_your_own_text_with_a_model_shows_the_true_activation(run, tiny_llama):
    import torch

    server = make_server(run, "127.0.0.1", 0, model=tiny_llama)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/api/predict"
        status, d = _get_json(base + "?key=L0.N1&text=the+cat+sat")
        assert status == 200, d
        assert d["tokens"] == ["the", "cat", "sat"] and "model's tokenizer" in d["tokenizer"]
        raw = tiny_llama.activations(torch.tensor([[4, 5, 6]]), None, [(0, 1)])[0, :, 0].numpy()
        assert d["true"] == pytest.approx((raw / 5.0).tolist(), abs=1e-4), "true activation / the neuron's maximum"
        status, d = _get_json(base + "?key=L1.N4.neg&text=the+cat")
        raw = tiny_llama.activations(torch.tensor([[4, 5]]), None, [(1, 4)])[0, :, 0].numpy()
        assert d["true"] == pytest.approx((-raw / 3.0).tolist(), abs=1e-4), "the negative side is sign-flipped"
    finally:
        server.shutdown()
        server.server_close()


def test_a_model_that_gives_nan_is_answered_in_valid_json_with_the_value_missing(run, tiny_llama, monkeypatch):
    import torch

    real = tiny_llama.activations

    def with_nan(ids, mask, pairs):
        acts = real(ids, mask, pairs).clone()
        acts[0, 1, 0] = float("nan")
        acts[0, 2, 0] = float("inf")
        return acts

    monkeypatch.setattr(tiny_llama, "activations", with_nan)
    server = make_server(run, "127.0.0.1", 0, model=tiny_llama)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/predict?key=L0.N1&text=the+cat+sat"
        with urllib.request.urlopen(api(url)) as r:
            body = r.read().decode("utf-8")
        d = json.loads(body, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
        raw = real(torch.tensor([[4, 5, 6]]), None, [(0, 1)])[0, :, 0].numpy()
        assert d["true"][0] == pytest.approx(raw[0] / 5.0, abs=1e-4) and d["true"][1:] == [None, None]
    finally:
        server.shutdown()
        server.server_close()


def test_strongest_held_out_excerpts_come_first_and_the_rest_fold_away(run):
    import copy

    from n2g.report import load_results
    from n2g.viewer import neuron_page

    result = next(r for r in load_results(run) if r.neuron.key == "L0.N1")
    base = next(e for e in result.examples if e.split == "test" and e.source == "top")
    extra = []
    for peak in (0.55, 0.95, 0.7, 0.8, 0.65):
        e = copy.deepcopy(base)
        e.activations = [0.0, peak, 0.0]
        extra.append(e)
    result.examples = [e for e in result.examples if e.split != "test" or e.source == "random"] + extra
    raw = neuron_page(run, result)
    first = raw[raw.index('id="test-excerpts"'):raw.index("</table>", raw.index('id="test-excerpts"'))]
    more = raw[raw.index('id="test-excerpts-more"'):raw.index("</table>", raw.index('id="test-excerpts-more"'))]
    assert re.findall(r"max ([0-9.]+) norm", first) == ["0.95", "0.80", "0.70", "0.65"]
    assert re.findall(r"max ([0-9.]+) norm", more) == ["0.55", "0.00"], "the random excerpt comes last"
    assert "2 more held-out excerpts" in raw


def test_pages_written_by_worker_processes_match_one_process(tmp_path, monkeypatch):
    import n2g.viewer as viewer

    one = make_run(tmp_path / "one")
    many = make_run(tmp_path / "many")
    viewer.write_viewer(one)
    monkeypatch.setattr(viewer, "PAGES_PER_WORKER", 1)  # every neuron counts as many: two worker processes
    monkeypatch.setattr(viewer.os, "cpu_count", lambda: 2)
    viewer.write_viewer(many)
    strip = lambda text: re.sub(r'nonce-[A-Za-z0-9_-]+|nonce="[A-Za-z0-9_-]+"', "NONCE", text)
    names = sorted(p.name for p in (one / "viewer" / "neurons").iterdir())
    assert names and names == sorted(p.name for p in (many / "viewer" / "neurons").iterdir())
    for name in names:
        a = strip((one / "viewer" / "neurons" / name).read_text()).replace(str(one), "RUN")
        b = strip((many / "viewer" / "neurons" / name).read_text()).replace(str(many), "RUN")
        assert a == b


def test_summary_names_quiet_activators_with_their_graded_values():
    from helpers_run import _graph, scores
    from n2g.explain import summary_text
    from n2g.records import NeuronId, NeuronResult, NeuronStats

    result = NeuronResult(
        neuron=NeuronId(0, 1), status="fitted",
        stats=NeuronStats(max_activation=5.0, quantiles={"0.5": 0.01}, firing_rate=0.01, n_sampled_tokens=1000),
        scores={"n2g": scores(0.8, 0.8, 0.8, 0.9, 0.9, 0.7)}, examples=[], promoted=[], suppressed=[],
        graph_stats={}, seconds=1.0)
    G = _graph([([(100, 1.0)], 0.9), ([(104, 1.0)], 0.3), ([(102, 1.0)], 0.12), ([(105, 1.0)], -0.2)])
    text = summary_text(result, G)
    assert "L0.N1 fires on ␣Paris (0.90)" in text
    assert "graded values: mildly active on ␣the (0.30) and ␣London (0.12); below zero on ↵ (-0.20)." in text
    plain = summary_text(result, _graph([([(100, 1.0)], 0.9)]))
    assert "graded values" not in plain


def test_summary_calls_a_graded_value_below_zero_only_where_it_reads_below_zero():
    # an END of -0.0001 reads 0.00 (never -0.00), and the summary said "below zero on ↵ (0.00)"; one of 0.0001
    # "mildly active on ↵ (0.00)"
    from helpers_run import _graph, scores
    from n2g.explain import summary_text
    from n2g.records import NeuronId, NeuronResult, NeuronStats

    result = NeuronResult(
        neuron=NeuronId(0, 1), status="fitted",
        stats=NeuronStats(max_activation=5.0, quantiles={"0.5": 0.01}, firing_rate=0.01, n_sampled_tokens=1000),
        scores={"n2g": scores(0.8, 0.8, 0.8, 0.9, 0.9, 0.7)})
    for tiny in (-0.0001, 0.0001):
        text = summary_text(result, _graph([([(100, 1.0)], 0.9), ([(105, 1.0)], tiny), ([(106, 1.0)], -0.2)]))
        assert "(0.00)" not in text and "graded values: below zero on . (-0.20)." in text, text


def test_summary_describes_a_graph_at_its_own_fire_threshold():
    # a graph fitted at 0.3 (load_graph_json and NeuronGraph.drawable put it in G.graph): summary_text(result, G)
    # described it at 0.5, its " the" path at 0.4 as a graded value below the threshold
    from helpers_run import _graph, scores
    from n2g.explain import summary_text
    from n2g.records import NeuronId, NeuronResult, NeuronStats

    result = NeuronResult(
        neuron=NeuronId(0, 1), status="fitted",
        stats=NeuronStats(max_activation=5.0, quantiles={"0.5": 0.01}, firing_rate=0.01, n_sampled_tokens=1000),
        scores={"n2g": scores(0.8, 0.8, 0.8, 0.9, 0.9, 0.7)})
    G = _graph([([(100, 1.0)], 0.9), ([(104, 1.0)], 0.4)])
    G.graph["fire_threshold"] = 0.3
    text = summary_text(result, G)
    assert "L0.N1 fires on ␣Paris (0.90) and ␣the (0.40)" in text and "normalised activation ≥ 0.3)" in text
    assert "graded values" not in text
    assert "normalised activation ≥ 0.5)" in summary_text(result, G, 0.5)  # a threshold given still wins
    for bad in (0, -0.3, 2, "0.3", float("nan"), None, [0.3]):  # a hand-made graph's: the default 0.5
        G.graph["fire_threshold"] = bad
        assert "graded values: mildly active on ␣the (0.40)" in summary_text(result, G)


def test_summary_says_how_many_held_out_firing_tokens_training_never_shows_firing():
    from helpers_run import _graph, scores
    from n2g.explain import summary_text
    from n2g.records import NeuronId, NeuronResult, NeuronStats

    def result(ceiling):
        return NeuronResult(
            neuron=NeuronId(0, 1), status="fitted",
            stats=NeuronStats(max_activation=5.0, quantiles={"0.5": 0.01}, firing_rate=0.01, n_sampled_tokens=1000),
            scores={"n2g": scores(0.8, 0.5, 0.6, 0.9, 0.9, 0.7)}, ceiling=ceiling)

    G = _graph([([(100, 1.0)], 0.9)])
    text = summary_text(result({"n_firing": 10, "n_seen": 6, "f1": 0.75}), G)
    assert text.endswith("4 of its 10 held-out firing tokens are tokens that never fire in the training text, which no "
                         "rule learned from that text alone recalls: a lookup keyed on its tokens scores at most F1 0.75 "
                         "here (the graph passes that only where the model's variants or written text showed such a "
                         "token firing).")
    assert "1 of its 10 held-out firing tokens is a token that never fires in the training text" in \
        summary_text(result({"n_firing": 10, "n_seen": 9, "f1": 0.95}), G)
    for seen_all in ({"n_firing": 10, "n_seen": 10, "f1": 1.0}, {}):  # nothing to say, or a result from before
        assert "never fire in the training text" not in summary_text(result(seen_all), G)


def test_run_vocabulary_splits_longest_first_and_ignores_tokens_no_tokenizer_makes():
    from n2g.viewer import MAX_TOKEN_CHARS, RunVocabulary

    vocab = RunVocabulary.of({" Par": 1, " Paris": 2, "is": 3, ".": 4, "a" * (MAX_TOKEN_CHARS + 1): 5, "a": 6})
    assert vocab.split(" Paris. Paris") == ([2, 4, 2], [" Paris", ".", " Paris"])
    assert vocab.split(" Parx.") == ([1, -(2**31), 4], [" Par", "x", "."])  # an unknown stretch is one token
    long = "a" * (MAX_TOKEN_CHARS + 1)
    assert vocab.split(long) == ([6] * len(long), ["a"] * len(long))  # the over-long token is never used


def test_server_never_predicts_with_another_neurons_result(run, tmp_path):
    """neurons/L0.N2 holding a copy of L0.N1's result (a copied or renamed folder) is not L0.N2's (audit 34)."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "neurons" / "L0.N2")
    shutil.copytree(copy / "neurons" / "L0.N1", copy / "neurons" / "L0.N2")
    server = make_server(copy, "127.0.0.1", 0)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}/api/predict?text=Paris&key="
        with urllib.request.urlopen(api(base + "L0.N1")) as r:
            assert r.status == 200
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(api(base + "L0.N2"))
        assert err.value.code == 404 and "no readable result for neuron L0.N2" in json.load(err.value)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_a_running_server_splits_text_with_the_vocabulary_the_last_report_wrote(run):
    # `n2g run` adds neurons and `n2g report` writes their pages and tokens while `n2g serve` runs: the server
    # kept splitting typed text with the vocabulary it read first, so the new neurons' tokens stayed unknown
    import os
    from urllib.parse import quote

    server = make_server(run, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/predict?key=L0.N1&text=" + quote(" in xyz")
        status, d = _get_json(url)
        assert status == 200 and d["token_ids"] == [101, None], d
        path = run / "viewer" / "vocabulary.json"
        saved = json.loads(path.read_text())
        saved["tokens"][" xyz"] = 300  # as `n2g report` writes it for a run with a neuron more
        path.write_text(json.dumps(saved))
        later = path.stat().st_mtime + 5
        os.utime(path, (later, later))
        status, d = _get_json(url)
        assert status == 200 and d["token_ids"] == [101, 300], d
    finally:
        server.shutdown()
        server.server_close()


def test_the_runs_vocabulary_is_written_with_the_pages_and_read_without_the_results(tmp_path, monkeypatch, caplog):
    # a whole model's run holds 46,080 results: splitting a typed text must not read every one of them
    import n2g.search
    from n2g.report import build_all
    from n2g.search import iter_results
    from n2g.viewer import RunVocabulary, _add_tokens

    run = make_run(tmp_path)
    add_large_neuron(run)
    build_all(run)
    expect: dict[str, int] = {}
    for _, r in iter_results(run):
        _add_tokens(expect, r)
    # and the tokens only graphs hold: L0.N2's "Paris", the large graph's activators
    expect |= {"Paris": 103, **{f" word{i}": 300 + i for i in range(90) if i != 45}, " strongest": 345}
    saved = json.loads((run / "viewer" / "vocabulary.json").read_text())
    assert saved == {"kind": "n2g.vocabulary", "tokens": expect} and expect[" Paris"] == 100
    monkeypatch.setattr(n2g.search, "iter_results", lambda *a: pytest.fail("read the results"))
    assert RunVocabulary(run).ids == expect
    assert RunVocabulary(run).split(" in Paris.") == ([101, 100, 106], [" in", " Paris", "."])
    monkeypatch.undo()
    (run / "viewer" / "vocabulary.json").write_text('{"kind": "n2g.vocabulary", "tokens": {" Paris": "x"}}')
    assert RunVocabulary(run).ids == expect  # damaged: read from the results, with a warning
    assert "reading the tokens of every result instead" in caplog.text


def test_neuron_pages_mark_firing_tokens_at_the_runs_fire_threshold(tmp_path):
    # a run fitted at 0.3: L0.N1's train excerpt " in" at 0.1 stays quiet, its test " Paris" at 0.6 fires either way,
    # and the page says 0.3 (it said, and outlined at, 0.5 whatever the run)
    run = make_run(tmp_path)
    made = json.loads((run / "run.json").read_text())
    made["identity"]["config"]["fire_threshold"] = 0.3
    (run / "run.json").write_text(json.dumps(made))
    d = json.loads((run / "neurons" / "L0.N1" / "result.json").read_text())
    d["examples"][0]["activations"] = [0.0, 0.4, 1.0, 0.0]  # " in" at 0.4: fires at 0.3, not at 0.5
    (run / "neurons" / "L0.N1" / "result.json").write_text(json.dumps(d))
    build_all(run)
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert 'data-threshold="0.3"' in page and "it <i>fires</i> at ≥ 0.3" in page
    assert '<span class="fire" style="background:rgba(214,39,40,0.400)" title="␣in  true 0.400"> in</span>' in page


def test_text_without_a_model_splits_into_the_tokens_the_graphs_hold(tmp_path, capsys):
    # a graph learns tokens its stored excerpts never show (the partition, variants, the vocabulary in context):
    # `n2g search strongest` found L1.N5 by its activator " strongest" (1.0), but `n2g predict RUN " strongest"`
    # and the server split the text with the excerpts' tokens alone, so the token was unknown and nothing fired
    from urllib.parse import quote

    from helpers_run import serving
    from n2g import cli
    from n2g.search import search

    run = make_run(tmp_path)
    add_large_neuron(run)
    build_all(run)
    assert [(h["key"], h["token_id"]) for h in search(run, "strongest")] == [("L1.N5", 345)]
    assert cli.main(["predict", str(run), " in strongest", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["token_ids"] == [101, 345] and [(h["key"], h["fires"]) for h in d["results"]] == [("L1.N5", [1])]
    (run / "viewer" / "vocabulary.json").unlink()  # read from the results and the index instead
    assert cli.main(["predict", str(run), " strongest", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == [345]
    with serving(run) as port:
        status, d = _get_json(f"http://127.0.0.1:{port}/api/predict?key=L1.N5&text=" + quote(" strongest"))
    assert status == 200 and d["token_ids"] == [345] and d["predicted"] == [1.0]


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the pages' script")
def test_the_pages_scripts_show_control_and_bidi_characters_never_obey_them():
    # typed text's tokens (try your own text) and searched tokens reach the page through these scripts, not
    # through the autoescaping templates: a right-to-left override in a token must not reorder the row
    import subprocess

    from n2g.viewer import INDEX_JS, NEURON_JS

    text = "a\u202eb\u2066c\x1bd\x7fe\x00f\tg\nh"
    for script in (INDEX_JS, NEURON_JS):
        (fn,) = [line.split("  //")[0] for line in script.splitlines() if "function visibleChars(t)" in line]
        probe = f"new Function({json.dumps(script)});\n{fn}\nprocess.stdout.write(JSON.stringify(visibleChars({json.dumps(text)})));"
        res = subprocess.run(["node", "-e", probe], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr  # the whole script parses, and the function runs
        assert json.loads(res.stdout) == "a\\u202eb\\u2066c\\x1bd\\x7fe\\x00f\tg\nh"


def test_the_pages_scripts_show_a_value_on_its_own_side_of_the_threshold():
    # try-your-own-text's hover titles (toFixed(3)) and "which neurons fire"'s columns (toFixed(2)) showed a quiet
    # 0.49999997 as 0.500 / 0.50, beside a token not outlined and a graph that does not fire
    import subprocess

    from n2g.viewer import INDEX_JS, NEURON_JS

    cases = [[0.49999997, 0.5, 3], [0.49999997, 0.5, 2], [0.5, 0.5, 2], [0.7, 0.5, 2], [0.2999, 0.3, 3], [0.25, None, 2]]
    for script in (INDEX_JS, NEURON_JS):
        start = script.index("  function sideFixed(")
        fn = script[start: script.index("\n  }\n", start) + 4]
        probe = (f"new Function({json.dumps(script)});\n{fn}\n"
                 f"process.stdout.write(JSON.stringify({json.dumps(cases)}.map(function (c) {{ return sideFixed(c[0], c[1], c[2]); }})));")
        res = subprocess.run(["node", "-e", probe], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == ["0.499", "0.49", "0.50", "0.70", "0.299", "0.25"]
    assert "sideFixed(v, threshold, 3)" in NEURON_JS and INDEX_JS.count("sideFixed(h.") == 3
    # and the excerpt tables' titles, written by the page itself
    from n2g.records import Example
    from n2g.viewer import _token_cells

    ex = Example(token_ids=[5, 6], activations=[0.49999997, 0.5], tokens=["a", "b"], source="top", split="test")
    cells = str(_token_cells(ex, [0.49999997, 0.5], "true", 0.5))
    assert 'title="a  true 0.499"' in cells and 'class="fire" style="background:' in cells and 'title="b  true 0.500"' in cells


def test_pages_fit_a_phones_screen_not_a_desktop_shrunk(run):
    # without a viewport tag a phone lays each page out 980 px wide and shrinks it to its screen (13 px text at 5 px)
    for page in (run / "report.html", run / "viewer" / "index.html",
                 *sorted((run / "viewer" / "neurons").glob("*.html"))):
        metas = [a for t, a in parse(page).tags if t == "meta" and a.get("name") == "viewport"]
        assert [m.get("content") for m in metas] == ["width=device-width, initial-scale=1"], page.name


def test_form_controls_are_named_and_sort_headers_take_the_keyboard(run):
    # the search box, its role menu, the layer menu, the filter and the text boxes had a placeholder only (a screen
    # reader names no such field), and the sortable headers could be clicked but never reached by Tab
    for page in (run / "viewer" / "index.html", run / "viewer" / "neurons" / "L0.N1.html"):
        p = parse(page)
        labelled = {a.get("for") for t, a in p.tags if t == "label"}
        controls = [(t, a) for t, a in p.tags if t in ("input", "select", "textarea")]
        assert controls
        for t, a in controls:
            assert (a.get("aria-label") or "").strip() or a.get("id") in labelled, (page.name, t, a.get("id"))
    heads = [a for t, a in parse(run / "viewer" / "index.html").tags if t == "th" and "data-sort" in a]
    assert len(heads) == 12 and all(a.get("tabindex") == "0" for a in heads)



def _contrast_on_white(text: str, rgba: str) -> float:
    """WCAG contrast of a text colour (#rgb or #rrggbb) on an rgba() background laid over white, computed here."""
    def lum(rgb):
        c = [x / 255 for x in rgb]
        c = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2]
    r, g, b, a = (float(x) for x in re.fullmatch(r"rgba\((\d+),(\d+),(\d+),([\d.]+)\)", rgba).groups())
    bg = [255 + (c - 255) * a for c in (r, g, b)]
    t = text.lstrip("#")
    t = "".join(ch * 2 for ch in t) if len(t) == 3 else t
    hi, lo = sorted((lum(bg), lum([int(t[i:i + 2], 16) for i in (0, 2, 4)])), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_token_text_reads_on_every_activation_colour(run):
    # the page's text colour (#222) on a token at activation 1 (the neuron's strongest) read at 3.2 to 1
    spans = 0
    for page in sorted((run / "viewer" / "neurons").glob("*.html")):
        for m in re.finditer(r'<span(?: class="fire")? style="background:(rgba\([^)]*\))(?:;color:(#[0-9a-f]+))?"',
                             page.read_text()):
            assert _contrast_on_white(m.group(2) or "#222", m.group(1)) >= 4.5, (page.name, m.group(0))
            spans += 1
    assert spans > 20
    for v in [i / 100 for i in range(-100, 101)]:  # every value a page can show, as the try-your-own-text script does
        from n2g.viewer import _bg, _fg
        colour = _fg(v)[len(";color:"):] or "#222"
        assert _contrast_on_white(colour, _bg(v)) >= 4.5, v


def test_a_dead_neurons_page_explains_no_units_and_no_graph_it_does_not_have(run):
    # a dead neuron's page said "activation ÷ the neuron's maximum (0.0000 raw), so 1 is its strongest token" and
    # explained how to read a drawing it does not have
    text = " ".join(parse(run / "viewer" / "neurons" / "L1.N3.html").text)
    assert "never fires" in text and "no graph (dead neurons have none)" in text
    assert "Units:" not in text and "Reads right to left" not in text
    live = " ".join(parse(run / "viewer" / "neurons" / "L0.N1.html").text)
    assert "Units:" in live and "Reads right to left" in live


def test_a_neuron_page_states_the_graphs_scores_before_the_summary(run):
    # how well the graph predicts the neuron was a clause deep in the summary paragraph and a table below the graph
    raw = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    head = raw[raw.index('id="headline"'):raw.index('id="summary"')]
    text = re.sub(r"<[^>]+>", "", head)
    assert "N2G F1 0.800 (token lookup 0.600) · N2G Pearson r 0.700 · firing rate 1.00 %" in text
    assert 'href="#scores"' in head and raw.index('id="headline"') < raw.index('id="test-excerpts"')
    none = (run / "viewer" / "neurons" / "L0.N2.html").read_text()
    assert "N2G F1 <b>no firing test token</b>" in none
    assert 'id="headline"' not in (run / "viewer" / "neurons" / "L1.N3.html").read_text()  # dead: no scores


def test_search_and_describe_call_an_activator_quiet_only_where_no_prediction_fires_on_it(tmp_path):
    # a graph.json not written by n2g holds " Paris" at 0.49999999: below 0.5 as a double, but predictions are float32
    # (0.5) and fire; `n2g search` listed it "quiet 0.50" and describe() counted it among the activators "never
    # predicted to fire" beside its path "[␣Paris] 0.50"
    from n2g.graph import NeuronGraph
    from n2g.search import search

    run = make_run(tmp_path)
    path = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(path.read_text())
    for node in d["graph"]["nodes"]:
        if node["id"] in ("root/100", "root/100/END"):
            node["activation"] = 0.49999999
        elif node["id"] == "root/100/101/END":
            node["activation"] = 0.3
    path.write_text(json.dumps(d))
    build_all(run)
    graph = NeuronGraph.load(path)
    assert (graph.predict_sequence([100]) >= 0.5).tolist() == [True]
    hit = next(h for h in search(run, " Paris") if h["key"] == "L0.N1" and h["role"] == "activator")
    assert hit["quiet"] is False
    head = graph.describe().splitlines()[0]
    assert "(2 quiet" in head, head


def test_index_search_never_rounds_a_quiet_activator_up_to_a_firing_looking_value():
    # `n2g search` reads a quiet activator kept just below the threshold (0.49999997) as 0.49; the index page's token
    # search (the same hits, from /api/search) wrote it with toFixed(3): "quiet 0.500"
    import subprocess

    from n2g.viewer import INDEX_JS

    node = shutil.which("node")
    if node is None:
        pytest.skip("needs node")
    line = next(ln for ln in INDEX_JS.splitlines() if "function weightText(" in ln)
    cases = [{"weight": 0.49999997, "quiet": True, "role": "activator"}, {"weight": 0.29, "quiet": True, "role": "activator"},
             {"weight": 0.7, "quiet": False, "role": "activator"}, {"weight": 0.8996, "quiet": False, "role": "context"},
             {"weight": None, "quiet": False, "role": "context"}, {"weight": -0.0004, "quiet": True, "role": "activator"}]  # (as toFixed writes it)
    script = (line.strip() + "\nconsole.log(JSON.stringify(" + json.dumps(cases) + ".map(function (h) { return weightText(h, 0.5); })"
              ".concat([weightText({weight: 0.5004, quiet: false, role: 'activator'}, 0.5005)])));")
    out = subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == ["0.499", "0.290", "0.700", "0.900", "\u2014", "-0.000", "0.501"]


def test_page_path_table_end_times_count_reads_as_its_end_where_the_count_is_one(tmp_path):
    # END read 0.49 (kept below the threshold) and 0.00, END x count beside them 0.50 and -0.00 on a real run's page
    run = make_run(tmp_path)
    path = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(path.read_text())
    for node in d["graph"]["nodes"]:
        if node["id"] in ("root/105", "root/105/END"):
            node["activation"] = 0.49999997
        elif node["id"] in ("root/106", "root/106/END"):
            node["activation"] = -0.0001
    path.write_text(json.dumps(d))
    build_all(run)
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    rows = re.findall(r'<tr><td>\d+</td><td class="l tok">([^<]*)</td><td>([^<]*)</td><td>1</td><td>([^<]*)</td></tr>', page)
    by = {tok: (end, strength) for tok, end, strength in rows}
    assert by["[↵]"] == ("0.49", "0.49") and by["[.]"] == ("0.00", "0.00"), rows
