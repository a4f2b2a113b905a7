"""Synthesise a small run directory (4 neurons in 2 layers) for the render/report/viewer tests.

Neurons: L0.N1 (fitted, " Paris" <- " in"), L0.N2 (fitted, no firing test token, f1 None),
L1.N3 (dead, no graph), L1.N4.neg (fitted, " Paris" with hostile context tokens: a script tag,
quotes, backslash, braces, pipe, ampersand). The numbers are chosen so report means are exact.
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import networkx as nx

from n2g.records import Example, NeuronId, NeuronResult, NeuronStats, Scores, Sign

SCRIPT = "<script>alert(1)</script>"
QUOTED = '"quoted" \'single\''
SPECIALS = "back\\slash {brace} | & <b>x</b>"

VOCAB = {
    100: " Paris", 101: " in", 102: " London", 103: "Paris", 104: " the", 105: "\n", 106: ".",
    200: SCRIPT, 201: QUOTED, 202: SPECIALS,
}


def scores(p, r, f1, nfp, nff, pearson, status="ok") -> Scores:
    return Scores(
        precision=p, recall=r, f1=f1, nonfiring_precision=nfp, nonfiring_recall=nfp,
        nonfiring_f1=nff, pearson=pearson, explained_variance=None if pearson is None else pearson / 2,
        n_tokens=40, n_firing=0 if status != "ok" else 4, n_predicted_firing=4, status=status,
    )


def _graph(paths: list[tuple[list[tuple[int | None, float]], float]],
           quiet: tuple[tuple[int, float], ...] = ()) -> nx.DiGraph:
    """Trie from paths: [(activator_id, act), (ctx_id or None for wildcard, importance), ...], end act; with the
    attributes :meth:`n2g.graph.NeuronGraph.to_networkx` writes (root at depth -1, an END at its owner's depth,
    ``run`` 0 on token and wildcard nodes). ``quiet``: (token id, value) of quiet activators, activating tokens whose
    END holds a graded value below the fire threshold (never predicted to fire), which real graphs carry by the
    dozen (``quiet_tokens``)."""
    G = nx.DiGraph()
    G.add_node("root", kind="root", token_id=None, token="", depth=-1, importance=0.0, activation=0.0, count=0)
    for tokens, end_act in [*paths, *(([(tid, 1.0)], value) for tid, value in quiet)]:
        parent = "root"
        for depth, (tid, w) in enumerate(tokens):
            node = f"{parent}/{tid if tid is not None else '*'}"
            if node not in G:
                if depth == 0:
                    G.add_node(node, kind="activator", run=0, token_id=tid, token=VOCAB[tid], depth=0,
                               importance=1.0, activation=end_act, count=0)
                elif tid is None:
                    G.add_node(node, kind="wildcard", run=0, token_id=None, token="*", depth=depth,
                               importance=w, activation=0.0, count=0)
                else:
                    G.add_node(node, kind="context", run=0, token_id=tid, token=VOCAB[tid], depth=depth,
                               importance=w, activation=0.0, count=0)
                G.add_edge(parent, node)
            G.nodes[node]["count"] += 1
            parent = node
        end = f"{parent}/END"
        G.add_node(end, kind="end", token_id=None, token="", depth=len(tokens) - 1, importance=0.0, activation=end_act,
                   count=1)
        G.add_edge(parent, end)
        act_node = f"root/{tokens[0][0]}"
        G.nodes[act_node]["activation"] = max(G.nodes[act_node]["activation"], end_act)
    return G


def _example(ids, acts, pred, split, source="top", with_tokens=True) -> Example:
    return Example(
        token_ids=ids, activations=acts, split=split, source=source, predicted=pred,
        tokens=[VOCAB[i] for i in ids] if with_tokens else None,
    )


def make_run(root: Path) -> Path:
    """Write the run under ``root / "run"`` and return its path."""
    run = Path(root) / "run"
    (run / "neurons").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({
        "kind": "n2g.run", "schema_version": 1, "name": "synthetic <test> run",
        "model": {"spec": "toy/model", "architecture": "llama", "n_layers": 2, "d_mlp": 8},
        "corpus": {"source": "planted", "n_excerpts": 10, "length": 8},
        "identity": {"model": "toy/model", "config": {"fire_threshold": 0.5}}, "versions": {"n2g": "0.1.0"},
    }))

    def save(result: NeuronResult, G: nx.DiGraph | None) -> None:
        _save(run, result, G)

    zero_ok = scores(None, 0.0, 0.0, 0.9, 0.95, None)
    # L0.N1: " in Paris"
    save(NeuronResult(
        neuron=NeuronId(0, 1), status="fitted",
        stats=NeuronStats(max_activation=5.0, quantiles={"0.5": 0.01, "0.99": 0.3}, firing_rate=0.01, n_sampled_tokens=1000),
        scores={"n2g": scores(0.8, 0.8, 0.8, 0.9, 0.9, 0.7), "token_lookup": scores(0.5, 0.75, 0.6, 0.8, 0.8, 0.5),
                "ngram": scores(0.7, 0.7, 0.7, 0.85, 0.85, 0.6), "zero": zero_ok},
        examples=[
            _example([104, 101, 100, 106], [0.0, 0.1, 1.0, 0.0], [0.0, 0.0, 0.7, 0.0], "train"),
            _example([101, 100], [0.2, 0.9], [0.0, 0.7], "train"),
            _example([104, 100, 105], [0.0, 0.6, 0.0], [0.0, 0.9, 0.0], "test"),
            _example([104, 104, 106], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], "test", source="random", with_tokens=False),
        ],
        promoted=[(" France", 1.5), (" city", 0.9)], suppressed=[(" Texas", -1.2)],
        graph_stats={"activator": 3, "context": 1, "wildcard": 0, "end": 4, "paths": 6}, seconds=1.5,
    ), _graph([([(100, 1.0)], 0.9), ([(100, 1.0), (101, 0.8)], 0.7)], quiet=((105, 0.1), (106, -0.2))))

    # L0.N2: " London" <- * <- " in", and "Paris"; no firing test token
    save(NeuronResult(
        neuron=NeuronId(0, 2), status="fitted",
        stats=NeuronStats(max_activation=2.0, quantiles={"0.5": 0.0}, firing_rate=0.002, n_sampled_tokens=1000),
        scores={"n2g": scores(None, None, None, 1.0, 1.0, 0.2, status="no_firing_test_token"),
                "token_lookup": scores(None, None, None, 1.0, 1.0, 0.1, status="no_firing_test_token"),
                "ngram": scores(None, None, None, 1.0, 1.0, 0.3, status="no_firing_test_token"),
                "zero": scores(None, None, None, 1.0, 1.0, None, status="no_firing_test_token")},
        examples=[
            _example([101, 104, 102], [0.0, 0.0, 1.0], [0.0, 0.0, 0.6], "train"),
            _example([104, 104, 106], [0.0, 0.1, 0.0], [0.0, 0.0, 0.0], "test"),
        ],
        graph_stats={"activator": 2, "context": 1, "wildcard": 1, "end": 2, "paths": 2}, seconds=1.0,
    ), _graph([([(102, 1.0), (None, 0.1), (101, 0.9)], 0.6), ([(103, 1.0)], 0.5)]))

    # L1.N3: dead
    save(NeuronResult(
        neuron=NeuronId(1, 3), status="dead",
        stats=NeuronStats(max_activation=0.0, firing_rate=0.0, n_sampled_tokens=1000),
    ), None)

    # L1.N4.neg: " Paris" with hostile context
    save(NeuronResult(
        neuron=NeuronId(1, 4, Sign.NEGATIVE), status="fitted",
        stats=NeuronStats(max_activation=3.0, quantiles={"0.5": 0.05, "0.99": 0.5}, firing_rate=0.05, n_sampled_tokens=1000),
        scores={"n2g": scores(0.5, 0.5, 0.5, 0.7, 0.7, 0.4), "token_lookup": scores(0.4, 0.4, 0.4, 0.6, 0.6, 0.3),
                "ngram": scores(0.3, 0.3, 0.3, 0.5, 0.5, 0.2), "zero": zero_ok},
        examples=[
            _example([201, 200, 100], [0.0, 0.2, 1.0], [0.0, 0.0, 1.0], "train"),
            _example([202, 100, 105], [0.1, 0.8, 0.0], [0.0, 0.8, 0.0], "test"),
        ],
        promoted=[(SCRIPT, 2.0)], suppressed=[(QUOTED, -1.0)],
        graph_stats={"activator": 1, "context": 3, "wildcard": 0, "end": 2, "paths": 2}, seconds=2.0,
    ), _graph([([(100, 1.0), (200, 0.85), (201, 0.77)], 1.0), ([(100, 1.0), (202, 0.9)], 0.8)]))
    return run


def add_histogram(run: Path, key: str = "L0.N1") -> None:
    """Give a neuron of the synthetic run an activation histogram and band examples (as a fit stores them)."""
    path = run / "neurons" / key / "result.json"
    d = json.loads(path.read_text())
    d["histogram"] = {
        "edges": [round(-0.2 + 0.1 * k, 6) for k in range(13)],  # -0.2 .. 1.0, 12 bins
        "counts": [5, 30, 900, 40, 10, 6, 4, 2, 1, 1, 0, 1],
        "n_tokens": 1000, "unit": "normalised activation (activation / neuron maximum)",
        "bands": [{"q_lo": 0.99, "q_hi": 1.0, "lo": 0.9, "hi": 1.0, "n_excerpts": 1},
                  {"q_lo": 0.9, "q_hi": 0.99, "lo": 0.4, "hi": 0.85, "n_excerpts": 9},
                  {"q_lo": 0.5, "q_hi": 0.9, "lo": 0.05, "hi": 0.35, "n_excerpts": 40},
                  {"q_lo": 0.0, "q_hi": 0.5, "lo": -0.1, "hi": 0.05, "n_excerpts": 50}],
    }
    d["band_examples"] = [
        _example([104, 102, 100], [0.0, 0.1, 0.6], [0.0, 0.0, 0.9], "band", source="band 0.9-0.99").to_dict(),
        _example([104, 106, 105], [0.05, 0.1, 0.0], [0.0, 0.0, 0.0], "band", source="band 0-0.5").to_dict(),
    ]
    path.write_text(json.dumps(d))


def add_large_neuron(run: Path, key_index: int = 5, n_act: int = 90) -> NeuronId:
    """A layer-1 neuron whose graph has ``n_act`` activating tokens (a large graph, drawn summarised).

    Its scores (F1 0.65, Pearson 0.4333) leave every mean of the report unchanged. The strongest
    path is the token ``" strongest"`` (END 1.0, count 9).
    """
    neuron = NeuronId(1, key_index)
    G = nx.DiGraph()
    G.add_node("root", kind="root", token_id=None, token="", depth=-1, importance=0.0, activation=0.0, count=0)
    for i in range(n_act):
        tid = 300 + i
        strongest = i == n_act // 2
        act = 1.0 if strongest else round(0.5 + 0.45 * ((i * 37) % n_act) / n_act, 4)
        count = 9 if strongest else 1 + i % 3
        a = f"a{i}"
        G.add_node(a, kind="activator", run=0, token_id=tid, token=" strongest" if strongest else f" word{i}", depth=0,
                   importance=1.0, activation=act, count=count)
        G.add_node(f"{a}/END", kind="end", token_id=None, token="", depth=0, importance=0.0, activation=act, count=count)
        G.add_edges_from([("root", a), (a, f"{a}/END")])
        if i % 4 == 0 and not strongest:
            G.add_node(f"c{i}", kind="context", run=0, token_id=101, token=" in", depth=1, importance=0.9, activation=act, count=1)
            G.add_node(f"c{i}/END", kind="end", token_id=None, token="", depth=1, importance=0.0, activation=0.1, count=1)
            G.add_edges_from([(a, f"c{i}"), (f"c{i}", f"c{i}/END")])
    result = NeuronResult(
        neuron=neuron, status="fitted",
        stats=NeuronStats(max_activation=4.0, quantiles={"0.5": 0.02, "0.99": 1.0}, firing_rate=0.08, n_sampled_tokens=1000),
        scores={"n2g": scores(0.6, 0.7, 0.65, 0.9, 0.9, 0.4333333), "token_lookup": scores(0.5, 0.5, 0.5, 0.8, 0.8, 0.3),
                "ngram": scores(0.5, 0.5, 0.5, 0.8, 0.8, 0.3), "zero": scores(None, 0.0, 0.0, 0.9, 0.95, None)},
        examples=[_example([104, 101, 100, 106], [0.0, 0.1, 0.7, 0.0], [0.0, 0.0, 0.7, 0.0], "test")],
        graph_stats={**{k: sum(G.nodes[n]["kind"] == k for n in G) for k in ("activator", "context", "wildcard", "end")},
                     "paths": G.number_of_nodes()}, seconds=3.0,
    )
    _save(run, result, G)
    return neuron


def add_dense_neuron(run: Path, key_index: int = 6) -> NeuronId:
    """A layer-1 neuron that fires on any token but right after ``" in"``, as n2g fits a dense neuron: its graph's
    wildcard activator ("*", no token id) ends a firing path of its own (0.9), and its one context token ends a
    quiet one (0.1). Its graph holds no activating token; it scores no test token (its f1 is None)."""
    neuron = NeuronId(1, key_index)
    G = nx.DiGraph()
    G.add_node("root", kind="root", token_id=None, token="", depth=-1, importance=0.0, activation=0.0, count=0)
    G.add_node("1", kind="activator", run=0, token_id=None, token="*", depth=0, importance=1.0, activation=0.9, count=0)
    G.add_node("1.end", kind="end", token_id=None, token="", depth=0, importance=0.0, activation=0.9, count=40)
    G.add_node("2", kind="context", run=0, token_id=101, token=VOCAB[101], depth=1, importance=0.0, activation=0.1, count=0)
    G.add_node("2.end", kind="end", token_id=None, token="", depth=1, importance=0.0, activation=0.1, count=5)
    G.add_edges_from([("root", "1"), ("1", "1.end"), ("1", "2"), ("2", "2.end")])
    result = NeuronResult(
        neuron=neuron, status="fitted",
        stats=NeuronStats(max_activation=1.0, quantiles={"0.5": 0.6}, firing_rate=0.9, n_sampled_tokens=1000),
        scores={"n2g": scores(None, None, None, 1.0, 1.0, 0.2, status="no_firing_test_token")},
        graph_stats={"activator": 1, "context": 1, "wildcard": 0, "end": 2, "paths": 45}, seconds=1.0,
    )
    _save(run, result, G)
    return neuron


def _save(run: Path, result: NeuronResult, G: nx.DiGraph | None) -> None:
    """``result.json`` and (unless dead: ``G`` None) ``graph.json`` of one neuron, as n2g writes them."""
    d = run / "neurons" / result.neuron.key
    d.mkdir()
    (d / "result.json").write_text(json.dumps(result.to_dict()))
    if G is not None:
        (d / "graph.json").write_text(json.dumps({
            "kind": "n2g.graph", "schema_version": 1, "neuron": result.neuron.to_dict(), "fire_threshold": 0.5,
            "end_activation": "mean", "match": "search", "graph": nx.node_link_data(G, edges="edges"),
        }))


def api(url: str):
    """A request for the server's API with the header the viewer's pages add (``urlopen(api(url))``)."""
    import urllib.request

    return urllib.request.Request(url, headers={"X-N2G-Request": "1"})


@contextlib.contextmanager
def serving(run_dir, **kwargs):
    """The run served on a free loopback port (yields the port); shut down on leaving."""
    from n2g.viewer import make_server

    server = make_server(run_dir, "127.0.0.1", 0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
