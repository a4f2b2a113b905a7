"""Property-based fuzz of the CLI parsers and the corpus, result and graph loaders.

The contract: any input gives a result or an :class:`N2GError` (argparse's own usage errors exit
with status 2), never another exception. Examples are few and small so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from n2g import cli
from n2g.corpus import load_texts
from n2g.errors import N2GError
from n2g.pipeline import parse_indices
from n2g.render import load_graph_json, to_dot
from n2g.search import iter_results
from n2g.viewer import check_port, neuron_page

# N2G_FUZZ_EXAMPLES=5000 for a deeper search than the suite's quick one
FUZZ = settings(max_examples=int(os.environ.get("N2G_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


# ---------------------------------------------------------------------------------------------
# CLI parsers


@FUZZ
@given(st.text(alphabet=string.digits + ",- al\t", max_size=30) | st.text(max_size=30),
       st.integers(min_value=1, max_value=5000))
def test_parse_indices_gives_indices_in_range_or_a_user_error(text, limit):
    try:
        got = parse_indices(text, limit, "neuron")
    except N2GError:
        return
    assert got == sorted(set(got)) and got and all(0 <= i < limit for i in got)


@FUZZ
@given(st.integers() | st.text(max_size=12) | st.floats() | st.none() | st.booleans())
def test_check_port_gives_a_port_or_a_user_error(value):
    try:
        port = check_port(value)
    except N2GError:
        return
    assert 0 <= port <= 65535


WORDS = ["run", "fit", "report", "serve", "info", "--layers", "--neurons", "--layer", "--neuron", "--port",
         "--sign", "--preset", "--max-excerpts", "--excerpt-length", "--group-size", "--dtype", "-q", "--help"]


@FUZZ
@given(st.lists(st.sampled_from(WORDS) | st.text(max_size=6), max_size=6))
def test_argument_parser_gives_a_namespace_or_a_usage_error(argv):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.build_parser().parse_args(argv)
        except SystemExit as e:
            assert e.code in (0, 2)


@FUZZ
@given(st.text(max_size=20), st.text(max_size=8))
def test_report_and_serve_of_any_path_are_one_line_errors(scratch, path, port):
    for argv in (["report", str(scratch / path)], ["serve", str(scratch / path), "--port", port]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse: e.g. a path that looks like an option
                code = e.code
        assert code == 2, (argv, err.getvalue())
        assert "Traceback" not in err.getvalue()


# ---------------------------------------------------------------------------------------------
# loaders


@FUZZ
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       st.sampled_from([".txt", ".jsonl", ".json", ".md"]), st.sampled_from(["text", "body"]))
def test_corpus_loader_gives_texts_or_a_user_error(scratch, data, suffix, field):
    path = scratch / f"corpus{suffix}"
    path.write_bytes(data)
    try:
        texts = load_texts(str(path), text_field=field)
    except N2GError:
        return
    assert texts and all(isinstance(t, str) and t.strip() for t in texts)


@FUZZ
@given(json_values | st.fixed_dictionaries({"json": json_values}).map(lambda d: [d["json"]]))
def test_jsonl_loader_gives_texts_or_a_user_error(scratch, record):
    path = scratch / "records.jsonl"
    path.write_text(json.dumps(record) + "\n" + json.dumps({"text": "fine"}) + "\n")
    try:
        texts = load_texts(str(path))
    except N2GError:
        return
    assert texts[-1] == "fine"


graph_dicts = st.fixed_dictionaries({
    "directed": st.booleans(), "multigraph": st.just(False), "graph": st.dictionaries(st.text(max_size=3), json_values, max_size=2),
    "nodes": st.lists(st.dictionaries(st.sampled_from(["id", "kind", "token", "token_id", "activation", "importance",
                                                       "depth", "count"]), json_values, max_size=6), max_size=5),
    "edges": st.lists(st.dictionaries(st.sampled_from(["source", "target"]), json_values, max_size=2), max_size=5),
})


@FUZZ
@given(graph_dicts | json_values)
def test_graph_loader_gives_a_drawable_graph_or_a_user_error(scratch, graph):
    path = scratch / "graph.json"
    path.write_text(json.dumps({"kind": "n2g.graph", "schema_version": 1, "graph": graph}))
    try:
        G = load_graph_json(path)
    except N2GError:
        return
    assert to_dot(G).startswith("digraph")  # what the report does with every graph it loads


result_dicts = st.fixed_dictionaries({
    "kind": st.just("n2g.neuron_result"),
    "neuron": st.fixed_dictionaries({"layer": st.integers(-2, 3) | json_values, "index": st.integers(0, 9)}),
    "status": st.sampled_from(["fitted", "dead"]) | json_values,
    "stats": st.fixed_dictionaries({"max_activation": st.floats(allow_nan=False) | json_values,
                                    "firing_rate": st.floats(0, 1) | json_values}),
    "scores": st.dictionaries(st.sampled_from(["n2g", "ngram"]),
                              st.dictionaries(st.sampled_from(["precision", "recall", "f1", "n_tokens", "status"]),
                                              json_values, max_size=3), max_size=2) | json_values,
    "examples": st.lists(st.dictionaries(st.sampled_from(["token_ids", "activations", "predicted", "tokens", "split"]),
                                         json_values, max_size=5), max_size=2),
    "promoted": st.lists(st.tuples(st.text(max_size=3) | st.integers(), st.floats(allow_nan=False)), max_size=2)
    | json_values,
})


@FUZZ
@given(result_dicts | json_values)
def test_result_loader_skips_damage_and_pages_render_what_it_keeps(scratch, record):
    folder = scratch / "run" / "neurons" / "L0.N0"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(record))
    for _, result in iter_results(scratch / "run"):
        assert neuron_page(scratch / "run", result).startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------------------------------------
# one field of a whole, real result replaced: the result is skipped as damaged, or its page renders


def _real_result() -> dict:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_run import make_run

    with tempfile.TemporaryDirectory() as d:
        run = make_run(Path(d))
        rec = json.loads((run / "neurons" / "L0.N1" / "result.json").read_text())
    rec["histogram"] = {"edges": [0.0, 0.5, 1.0], "counts": [5, 2], "n_tokens": 7,
                        "bands": [{"lo": 0.0, "hi": 1.0, "n_excerpts": 2, "q_lo": 0.0, "q_hi": 1.0}]}
    rec["band_examples"] = [dict(rec["examples"][0], source="band 0-1", split="band")]
    rec["ablation"] = {"n_excerpts": 2, "n_tokens": 9, "ce_clean": 1.0, "ce_increase": {"graph": 0.1, "zero": 0.2},
                       "kl": {"graph": 0.1}, "recovered": 0.5, "status": "ok"}
    rec["steering"] = {"scale": 4, "value": 1.0, "kl": 0.1, "promoted_overlap": 1, "prompt": "p",
                       "gainers": [["a", 0.1, 0.2]], "losers": [], "before": "x", "after": "y"}
    return rec


def _paths(value, prefix=()):
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value[:2]):
            out += _paths(v, prefix + (i,))
    return out


REAL_RESULT = _real_result()
extreme_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([10**400, -(10**400), 1e308, -1e308, 0.0, -0.0])
    | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["lo", "hi", "n_excerpts", "q_lo", "q_hi", "edges", "counts", "graph"]) | st.text(max_size=3),
        inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(st.sampled_from(_paths(REAL_RESULT)), extreme_values)
def test_one_damaged_field_of_a_real_result_is_skipped_or_rendered(scratch, where, value):
    import copy

    record = copy.deepcopy(REAL_RESULT)
    holder = record
    for k in where[:-1]:
        holder = holder[k]
    holder[where[-1]] = value
    folder = scratch / "one" / "neurons" / "L0.N1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "result.json").write_text(json.dumps(record))
    for _, result in iter_results(scratch / "one"):
        assert neuron_page(scratch / "one", result).startswith("<!DOCTYPE html>")
