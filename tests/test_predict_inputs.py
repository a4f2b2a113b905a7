"""`n2g predict`, `n2g.search.fires_on` and `/api/fires` given hostile or unusual input: hand-made indexes,
runs fitted at another fire threshold, many neurons, and what --json holds."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from helpers_run import make_run
from n2g import cli
from n2g.report import build_all
from n2g.search import fires_on


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
