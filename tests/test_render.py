"""Rendering: DOT in the published look, and corpus text that can neither break nor inject."""

from __future__ import annotations

import re
import shutil
import subprocess
import xml.etree.ElementTree as ET

import networkx as nx
import pytest

from n2g import render as R
from n2g.errors import N2GError

HOSTILE = [
    "<script>alert(1)</script>",
    '"quoted" \'single\'',
    "back\\slash\\",
    "{brace} | [x]",
    "AT&T &amp; &lt;",
    "\n",
    " leading",
    "\ttab",
    '"];\nevil [label="x',
    "}\ndigraph x {",
]
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")


def hostile_graph() -> nx.DiGraph:
    G = nx.DiGraph()
    G.add_node("root", kind="root", token="", token_id=None, depth=None)
    G.add_node("a", kind="activator", token=HOSTILE[0], token_id=1, depth=0, importance=1.0, activation=0.9, count=2)
    G.add_edge("root", "a")
    G.add_node("a_end", kind="end", token="", token_id=None, activation=0.9)
    G.add_edge("a", "a_end")
    parent = "a"
    for i, tok in enumerate(HOSTILE[1:], start=1):
        node = f'node "{i}" <{tok}>'  # node ids are hostile too
        G.add_node(node, kind="context", token=tok, token_id=10 + i, depth=i, importance=0.8, count=1)
        G.add_edge(parent, node)
        parent = node
    G.add_node("w", kind="wildcard", token="*", token_id=None, depth=len(HOSTILE), importance=0.1)
    G.add_edge(parent, "w")
    G.add_node("c_last", kind="context", token=" the", token_id=99, depth=len(HOSTILE) + 1, importance=0.4)
    G.add_edge("w", "c_last")
    G.add_node("end2", kind="end", token="", activation=0.6)
    G.add_edge("c_last", "end2")
    return G


def node_lines(dot: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r"^\s+(n\d+) \[(.*)\];$", dot, re.M)}


def test_display_token_makes_whitespace_visible_and_countable():
    assert R.display_token(" the") == "␣the"
    assert R.display_token("\n") == "↵"
    assert R.display_token("\n\n\n") == "↵x3"
    assert R.display_token("    ") == "␣x4"
    assert R.display_token("  x") == "␣␣x"
    assert R.display_token("a b") == "a b"  # one space between words stays a space
    assert R.display_token("a   b ") == "a␣x3b␣"
    assert R.display_token("\t") == "→"
    assert R.display_token("a\x00b") == "a\\x00b"
    assert R.display_token(None, 42) == "42"


def test_dot_look_and_attributes():
    G = hostile_graph()
    dot = R.to_dot(G, title="L1.N2")
    assert "rankdir=RL" in dot
    assert "labelloc=t" in dot and "activating token: activation" in dot, "legend with colour scales at the top"
    nodes = node_lines(dot)
    # root and end nodes are not drawn: 1 activator + 9 hostile context + wildcard + " the"
    assert len(nodes) == 1 + len(HOSTILE) - 1 + 2
    by_class = {}
    for line in nodes.values():
        by_class.setdefault(re.search(r'class="([^"]*)"', line).group(1), []).append(line)
    (act,) = by_class["activator end"]
    fill = re.search(r'fillcolor="#(..)(..)(..)"', act).groups()
    r, g, b = (int(x, 16) for x in fill)
    assert r > 200 and g < 100 and b < 100, "activator is filled red"
    assert "penwidth=3" in act, "a path ends at the activator"
    for line in by_class["context"]:
        r, g, b = (int(x, 16) for x in re.search(r'fillcolor="#(..)(..)(..)"', line).groups())
        assert b > r, "context is filled blue"
        assert "penwidth=3" not in line
    (wild,) = by_class["wildcard"]
    assert "dashed" in wild and "label=<*>" in wild
    (last,) = by_class["context end"]
    assert "penwidth=3" in last and "␣the" in last
    assert "imp 0.40 · end 0.60" in last, "importance and END value printed on the node"
    assert "act 0.90" in act, "activation printed on the activator"
    # no raw special character from the corpus reaches the DOT source
    for line in nodes.values():
        label = re.search(r"label=<(.*)>, class=", line).group(1)
        label = re.sub(r'<FONT POINT-SIZE="9" COLOR="[#a-z0-9]+">&#160;([^<]*)</FONT>$', r"\1", label)
        assert not set(label) & set('<>"{}|[]\\'), label
    assert "<script>" not in dot and "evil [" not in dot
    assert dot.count("{") == dot.count("}") == 2  # graph, rank=same


def test_activator_intensity_follows_activation():
    G = nx.DiGraph()
    G.add_node("root", kind="root")
    G.add_node("a", kind="activator", token="x", token_id=1, activation=0.3)
    G.add_node("b", kind="activator", token="y", token_id=2, activation=1.0)
    G.add_edges_from([("root", "a"), ("root", "b")])
    nodes = node_lines(R.to_dot(G, legend=False))
    # b (stronger) is drawn first and darker: its green channel is lower
    assert int(re.search(r'fillcolor="#..(..)', nodes["n0"]).group(1), 16) < int(
        re.search(r'fillcolor="#..(..)', nodes["n1"]).group(1), 16)



def _wcag(a: str, b: str) -> float:
    """WCAG contrast ratio, computed here (not with n2g's own helper)."""
    def lum(c):
        ch = [int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)]
        ch = [x / 12.92 if x <= 0.03928 else ((x + 0.055) / 1.055) ** 2.4 for x in ch]
        return 0.2126 * ch[0] + 0.7152 * ch[1] + 0.0722 * ch[2]
    hi, lo = sorted((lum(a), lum(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_node_and_legend_text_is_readable_on_every_fill():
    # white text was used from activation 0.55 and importance 0.7 up: on those mid reds and blues it read at
    # 2.9 and 2.7 to 1 (the token and its "act 0.57" both); every label must reach WCAG AA, 4.5 to 1
    names = {"white": "#ffffff", "black": "#000000"}
    G = nx.DiGraph()
    G.add_node("root", kind="root")
    for i in range(101):
        G.add_node(f"a{i}", kind="activator", token=f"a{i}", token_id=i, depth=0, activation=i / 100, count=1)
        G.add_edge("root", f"a{i}")
        G.add_node(f"c{i}", kind="context", token=f"c{i}", token_id=200 + i, depth=1, importance=i / 100, count=1)
        G.add_edge(f"a{i}", f"c{i}")
        G.add_node(f"e{i}", kind="end", activation=i / 100)
        G.add_edge(f"c{i}", f"e{i}")
    dot = R.to_dot(G, title="L0.N0", max_paths=None)
    checked = 0
    for line in node_lines(dot).values():
        fill = re.search(r'fillcolor="(#[0-9a-f]{6})"', line).group(1)
        text = names[re.search(r'fontcolor="(\w+)"', line).group(1) if "fontcolor=" in line else "black"]
        assert _wcag(fill, text) >= 4.5, line
        value = re.search(r'<FONT POINT-SIZE="9" COLOR="(\w+)">', line)
        assert value and _wcag(fill, names[value.group(1)]) >= 4.5, line
        checked += 1
    assert checked == 202
    cells = re.findall(r'<TD BGCOLOR="(#[0-9a-f]{6})" WIDTH="26"><FONT POINT-SIZE="9"( COLOR="white")?>', dot)
    assert len(cells) == 10
    for fill, white in cells:
        assert _wcag(fill, "#ffffff" if white else "#000000") >= 4.5, fill


def test_a_negative_sides_legend_says_its_activations_are_normalised_to_its_most_negative_value(tmp_path):
    # the legend said "normalised to the neuron's maximum" on a .neg side's drawing too, where the page above it
    # says activation ÷ its most negative value
    G = hostile_graph()
    assert "maximum on the scanned corpus (1 = the strongest excerpt; tokens the corpus seldom shows may go past 1)" \
        in R.to_dot(G)  # L0.N2's graph holds 1.81 for a token the corpus shows once
    G.graph["neuron"] = {"layer": 1, "index": 4, "sign": "negative"}
    dot = R.to_dot(G, title="L1.N4.neg")
    assert "most negative value" in dot and "maximum" not in dot


@needs_dot
def test_dot_parses_and_svg_shows_text_literally():
    G = hostile_graph()
    dot = R.to_dot(G, title='title "<b>" & {x}')
    proc = subprocess.run(["dot", "-Tsvg"], input=dot.encode(), capture_output=True, check=True)
    assert proc.stderr.strip() == b""
    svg = proc.stdout.decode()
    root = ET.fromstring(svg)  # well-formed XML
    texts = ["".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text")]
    for tok in HOSTILE:
        assert R.display_token(tok) in texts, tok
    assert 'title "<b>" & {x}' in texts
    assert "*" in texts
    # nothing from the corpus became markup
    assert "<script" not in svg
    assert not any(el.tag.endswith("script") for el in root.iter())
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in svg


@needs_dot
def test_render_writes_files_atomically(tmp_path):
    G = hostile_graph()
    paths = R.render(G, tmp_path / "L1.N2" / "graph", title="L1.N2")
    assert [p.name for p in paths] == ["graph.dot", "graph.svg", "graph.png"]
    assert (tmp_path / "L1.N2" / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "L1.N2").glob("*.tmp"))
    svg = R.svg_of(G)
    assert svg.startswith("<svg")
    assert R.GraphView(G)._repr_svg_().startswith("<svg")


def test_render_without_dot_writes_dot_only(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(R.shutil, "which", lambda name: None)
    monkeypatch.setattr(R, "_warned_no_dot", False)
    with caplog.at_level("WARNING"):
        paths = R.render(hostile_graph(), tmp_path / "g")
        R.render(hostile_graph(), tmp_path / "h")
    assert [p.name for p in paths] == ["g.dot"]
    assert sum("dot" in r.message for r in caplog.records) == 1, "warned once"
    assert R.GraphView(hostile_graph())._repr_svg_() is None
    with pytest.raises(N2GError, match="install graphviz"):
        R.svg_of(hostile_graph())


def test_load_graph_json_roundtrip(tmp_path):
    import json

    G = hostile_graph()
    p = tmp_path / "graph.json"
    p.write_text(json.dumps({"kind": "n2g.graph", "schema_version": 1, "neuron": None, "fire_threshold": 0.5,
                             "graph": nx.node_link_data(G, edges="edges")}))
    H = R.load_graph_json(p)
    assert set(H.nodes) == set(G.nodes) and set(H.edges) == set(G.edges)
    assert H.nodes["a"]["token"] == HOSTILE[0]
    p.write_text('{"kind": "other"}')
    with pytest.raises(N2GError, match="not an n2g graph"):
        R.load_graph_json(p)
    with pytest.raises(N2GError, match="does not exist"):
        R.load_graph_json(tmp_path / "missing.json")


def large_graph(n_act: int = 90) -> nx.DiGraph:
    """``n_act`` activators with known strengths; every third has a context token before it."""
    G = nx.DiGraph()
    G.add_node("root", kind="root", token="", token_id=None, depth=-1)
    for i in range(n_act):
        act = round(0.2 + 0.8 * ((i * 37) % n_act) / n_act, 4)  # a shuffled spread of strengths
        a = f"a{i}"
        G.add_node(a, kind="activator", token=f" tok{i}", token_id=i, depth=0, importance=1.0, activation=act, count=1)
        G.add_node(f"{a}.end", kind="end", activation=act, count=1)
        G.add_edges_from([("root", a), (a, f"{a}.end")])
        if i % 3 == 0:
            G.add_node(f"c{i}", kind="context", token=" in", token_id=1000 + i, depth=1, importance=0.9, count=1)
            G.add_node(f"c{i}.end", kind="end", activation=act, count=1)
            G.add_edges_from([(a, f"c{i}"), (f"c{i}", f"c{i}.end")])
    return G


def test_graph_paths_rank_by_activation_times_count():
    G = large_graph(10)
    G.nodes["a2.end"]["count"] = 5  # a weaker END (0.52) seen five times outranks every single-count path
    paths = R.graph_paths(G)
    assert len(paths) == 10 + 4
    assert paths[0]["nodes"] == ["a2"] and paths[0]["strength"] == pytest.approx(5 * G.nodes["a2"]["activation"])
    firing = [p["end"] >= 0.5 for p in paths]
    assert firing == sorted(firing, reverse=True)  # what fires first, then the graded paths
    for group in (True, False):
        strengths = [p["strength"] for p in paths if (p["end"] >= 0.5) == group]
        assert strengths == sorted(strengths, reverse=True)
    ctx = next(p for p in paths if p["nodes"] == ["a0", "c0"])
    assert ctx["tokens"] == ["␣tok0", "␣in"] and R.path_text(ctx) == "␣in [␣tok0]"


def test_graph_paths_put_quiet_paths_and_the_background_value_after_those_that_fire():
    # a quiet activator seen often (0.28 x 5) and the background value of any other token (its count: every token
    # it covered) outranked firing paths by END x count: `n2g show` and describe listed "[*] 0.09 x11143" first
    G = large_graph(10)
    G.nodes["a3.end"]["count"] = 5
    G.add_node("bg", kind="activator", token="", token_id=None, depth=0, importance=1.0, activation=0.09, count=11143)
    G.add_node("bg.end", kind="end", activation=0.09, count=11143)
    G.add_edges_from([("root", "bg"), ("bg", "bg.end")])
    order = [p["nodes"][-1] for p in R.graph_paths(G)]
    assert order.index("a3") > max(order.index(n) for n in ("a1", "a2", "a4", "a5", "a7", "a8"))
    assert order[-1] == "bg" and order[0] == "a7"


def test_an_end_a_prediction_fires_on_reads_as_firing_where_graph_json_holds_it_just_below_as_a_double(tmp_path):
    # a graph.json not written by n2g (by hand, another tool) holds END 0.49999999: below 0.5 as a double, but every
    # prediction is a float32 (0.5), so `n2g predict`, the server and describe() say it fires at 0.50, while the
    # page's path table, drawing and summary read 0.49, listed it after the graded paths and called it quiet
    import json

    import numpy as np

    from n2g.explain import summary_text
    from n2g.graph import NeuronGraph, shown_fixed
    from n2g.records import NeuronId, NeuronResult, NeuronStats

    graph = NeuronGraph(fire_threshold=0.5)
    graph.add_path([(5, 1.0)], 0.7)
    graph.add_path([(6, 1.0)], 0.9)
    graph.add_path([(7, 1.0)], 0.3)
    path = graph.save(tmp_path / "graph.json")
    d = json.loads(path.read_text())
    for node in d["graph"]["nodes"]:
        if node.get("activation") == 0.9:
            node["activation"] = 0.49999999
        if node.get("activation") == 0.3:
            node["count"] = 50  # a graded path seen often: it outranked the one that fires by END x count
    path.write_text(json.dumps(d))
    assert (NeuronGraph.load(path).predict_sequence([6]) >= 0.5).tolist() == [True]
    assert float(np.float32(0.49999999)) == 0.5 and shown_fixed(0.49999999, 0.5) == "0.50"
    G = R.load_graph_json(path)
    order = [p["tokens"][0] for p in R.graph_paths(G)]
    assert order.index("6") < order.index("7"), order
    assert not any(R.is_quiet(a, 0.5) for _, a in G.nodes(data=True) if a.get("token_id") == 6)
    assert "act 0.50" in R.to_dot(G) and "0.49" not in R.to_dot(G)
    result = NeuronResult(neuron=NeuronId(0, 1), status="fitted",
                          stats=NeuronStats(max_activation=2.0, firing_rate=0.01, n_sampled_tokens=100))
    text = summary_text(result, G)
    assert "fires on 5 (0.70) and 6 (0.50)" in text and "0.49" not in text, text


def test_a_graph_files_own_threshold_and_neuron_win_over_attributes_its_node_link_graph_carries(tmp_path):
    # graph.json's node-link "graph" attributes came first (setdefault): a file of a positive neuron fitted at 0.5
    # whose inner attributes said {"fire_threshold": 0.05, "neuron": {"sign": "negative"}} was drawn with the
    # negative side's legend ("normalised to the neuron's most negative value"), its 0.1 activator counted firing
    # and its paths ordered at 0.05, while the predictor, describe() and the page's text read 0.5
    import json

    from n2g.graph import NeuronGraph
    graph = NeuronGraph(fire_threshold=0.5)
    graph.add_path([(5, 1.0)], 0.9)
    graph.add_path([(6, 1.0)], 0.1)
    path = graph.save(tmp_path / "graph.json")
    d = json.loads(path.read_text())
    d["neuron"] = {"layer": 0, "index": 1, "sign": "positive"}  # as a run's graph.json names its neuron
    d["graph"]["graph"] = {"fire_threshold": 0.05, "neuron": {"layer": 0, "index": 1, "sign": "negative"}}
    path.write_text(json.dumps(d))
    G = R.load_graph_json(path, check=True)
    assert R.graph_fire_threshold(G) == 0.5 and G.graph["neuron"]["sign"] == "positive"
    assert [a["token_id"] for _, a in G.nodes(data=True) if R.is_quiet(a, R.graph_fire_threshold(G))] == [6]
    dot = R.to_dot(G)
    assert "most negative" not in dot and "normalised to the neuron&#39;s maximum" in dot.replace("'", "&#39;"), dot


def _plain_positions(dot: str) -> tuple[float, dict[str, tuple[float, float]]]:
    out = subprocess.run(["dot", "-Tplain"], input=dot.encode(), capture_output=True, check=True).stdout.decode()
    height, pos = 0.0, {}
    for line in out.splitlines():
        f = line.split()
        if f[0] == "graph":
            height = float(f[3])
        elif f[0] == "node":
            pos[f[1]] = (float(f[2]), float(f[3]))
    return height, pos


@needs_dot
def test_large_graph_is_summarised_strongest_on_top_and_fits_one_screen():
    G = large_graph(90)
    dot = R.to_dot(G, title="L5.N1")
    nodes = node_lines(dot)
    drawn_acts = [line for line in nodes.values() if 'class="activator' in line]
    assert len(drawn_acts) <= R.MAX_DRAWN_PATHS
    # 120 paths, 14 drawn on 11 tokens; 34 activators stay below 0.5 (quiet), all of them among the hidden
    assert "+106 more paths" in dot and "(79 more activating tokens, 34 quiet)" in dot
    assert "summary: the 14 strongest of 120 paths (90 activating tokens, 34 of them quiet: never predicted to fire)" in dot
    G.graph["fire_threshold"] = 0.3  # a graph fitted at 0.3: activators from 0.3 to 0.5 fire (they were drawn as quiet)
    assert "(90 activating tokens, 12 of them quiet: never predicted to fire)" in R.to_dot(G, title="L5.N1")
    G.graph["fire_threshold"] = 0.5
    height, pos = _plain_positions(dot)
    assert height * 96 < 720, f"{height * 96:.0f} px tall: does not fit one screen (80 % of a 900 px window)"
    strongest = R.graph_paths(G)[0]
    tok = G.nodes[strongest["nodes"][0]]["token_id"]
    top = next(n for n, line in nodes.items() if f"token id {tok};" in line)
    act_ys = {n: pos[n][1] for n, line in nodes.items() if 'class="activator' in line}
    assert act_ys[top] == max(act_ys.values()), "the strongest path's activator is at the top"
    # activators are stacked in order of strength, top to bottom
    order = sorted(act_ys, key=lambda n: -act_ys[n])
    acts = [float(re.search(r"activation ([0-9.]+)", nodes[n]).group(1)) for n in order]
    assert acts == sorted(acts, reverse=True)
    assert pos["more"][1] < min(act_ys.values()), "the +k more node is at the bottom"


def test_small_graph_is_drawn_whole():
    dot = R.to_dot(large_graph(6))
    assert "more paths" not in dot and "summary:" not in dot
    assert sum('class="activator' in line for line in node_lines(dot).values()) == 6


def test_a_grown_context_token_says_grown_not_a_zero_importance():
    # Occlusion measured 9's importance on a proposed path; 21 was grown from training occurrences
    # (no path ran through it), so it has no importance to print, not an importance of 0.
    from n2g.graph import NeuronGraph

    g = NeuronGraph()
    g.add_path([(8, 1.0), (9, 0.6)], 1.0)
    activator = g.nodes[0].children[8]
    grown = g.add_child(activator, 21)
    g.nodes[grown].end = 0.0
    g.token_text = {8: "x", 9: "y", 21: "z"}
    lines = node_lines(R.to_dot(g.to_networkx(), title="t"))
    (proposed,) = [line for line in lines.values() if ">y<" in line or "y<FONT" in line or ">y" in line]
    (learned,) = [line for line in lines.values() if "z" in re.search(r"label=<(.*)>", line).group(1)]
    assert "imp 0.60" in proposed
    assert "grown" in learned and "imp" not in re.search(r"label=<(.*)>", learned).group(1)
    assert "no occlusion importance" in learned
    # a context token on a path that covers a firing training token the graph missed: importance 0 on that
    # path (occlusion never ran there), so "grown" too, not "imp 0.00"
    g.add_path([(8, 1.0), (40, 0.0)], 1.0)
    g.token_text[40] = "qq"
    lines = node_lines(R.to_dot(g.to_networkx(), title="t"))
    (covered,) = [line for line in lines.values() if "qq" in re.search(r"label=<(.*)>", line).group(1)]
    assert "grown" in covered and "imp 0.00" not in covered
