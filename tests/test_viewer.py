"""Viewer pages and the local server, on a synthesised run with hostile corpus text."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from helpers_run import QUOTED, SCRIPT, SPECIALS, make_run
from n2g.errors import N2GError
from n2g.report import METHOD_NAMES, build_all
from n2g.viewer import make_server


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("viewer"))
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


def test_neuron_page_escapes_corpus_text(run):
    page_path = run / "viewer" / "neurons" / "L1.N4.neg.html"
    raw = page_path.read_text()
    assert "<script>alert" not in raw and "<b>x</b>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    p = parse(page_path)
    assert not any(tag == "script" for tag, _ in p.tags)
    assert not any(k.startswith("on") for _, a in p.tags for k in a)
    text = "".join(p.text)
    assert SCRIPT in text and QUOTED in text and SPECIALS in text  # shown literally
    assert any(SCRIPT in t for t in p.titles)  # hover titles keep the text too
    assert "<svg" in raw  # graph inline
    assert "Similar neurons" in text and 'href="L0.N1.html"' in raw


def test_neuron_page_contents(run):
    raw = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    p = parse(run / "viewer" / "neurons" / "L0.N1.html")
    text = "".join(p.text)
    assert 'id="train-excerpts"' in raw and 'id="test-excerpts"' in raw
    assert "true activation" in text and "graph prediction" in text
    # per-token colouring with the value in the title
    assert 'style="background:rgba(214,39,40,1.000)" title="·Paris  true 1.000"' in raw
    assert 'title="·Paris  predicted 0.700"' in raw
    assert "[104]" in text  # an excerpt without token strings falls back to ids
    assert "0.800" in text and METHOD_NAMES["token_lookup"] in text and METHOD_NAMES["ngram"] in text
    assert "·France" in text and "·Texas" in text
    assert "firing rate 0.01000" in text
    n2 = "".join(parse(run / "viewer" / "neurons" / "L0.N2.html").text)
    assert "no firing test token" in n2
    dead = "".join(parse(run / "viewer" / "neurons" / "L1.N3.html").text)
    assert "dead" in dead and "no graph" in dead


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
        with urllib.request.urlopen(base + "/api/search?token=Paris&role=activator") as r:
            assert r.headers["Content-Type"].startswith("application/json")
            keys = [h["key"] for h in json.load(r)["results"]]
        assert keys == ["L1.N4.neg", "L0.N1", "L0.N2"]
        with urllib.request.urlopen(base + "/api/search?token=%3Cscript%3Ealert(1)%3C%2Fscript%3E") as r:
            assert [h["key"] for h in json.load(r)["results"]] == ["L1.N4.neg"]
        with urllib.request.urlopen(base + "/api/similar?key=L0.N1") as r:
            assert json.load(r)["results"][0]["key"] == "L1.N4.neg"
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/api/search?token=x&role=bogus")
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
