"""`n2g compare`: two runs of one model, neuron by neuron (synthetic runs, exact numbers)."""

import dataclasses
import json
import shutil

import pytest

import n2g
from n2g import cli
from n2g.compare import compare_runs

from helpers_run import make_run


def main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _edit(run, key, change):
    path = run / "neurons" / key / "result.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def _set_scores(run, key, f1, pearson):
    def change(d):
        d["scores"]["n2g"]["f1"], d["scores"]["n2g"]["pearson"] = f1, pearson
    _edit(run, key, change)


def _run_json(run, change):
    d = json.loads((run / "run.json").read_text())
    change(d)
    (run / "run.json").write_text(json.dumps(d))


@pytest.fixture
def runs(tmp_path):
    a = make_run(tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    _set_scores(b, "L0.N1", 0.9, 0.6)  # F1 0.8 -> 0.9, Pearson 0.7 -> 0.6; the other neurons as in A
    default = json.loads(json.dumps(dataclasses.asdict(n2g.preset("default"))))  # as run.json records it
    for run, augment in ((a, True), (b, False)):
        _run_json(run, lambda d: d["identity"].update(model_content="abc", config={**default, "augment": augment}))
    return a, b


def test_paired_means_differences_and_wins_are_exact(runs):
    a, b = runs
    c = compare_runs(a, b)
    assert c.paired == ["L0.N1", "L0.N2", "L1.N3", "L1.N4.neg"] and not (c.only_a or c.only_b or c.text_differs)
    f1 = c.metrics["f1"]  # L0.N1 (0.8, 0.9) and L1.N4.neg (0.5, 0.5): L0.N2 has no firing test token, L1.N3 is dead
    assert (f1.n, f1.mean_a, f1.mean_b, f1.b_better, f1.equal, f1.b_worse) == (2, 0.65, 0.7, 1, 1, 0)
    assert f1.difference == pytest.approx(0.05) and 0.0 <= f1.low <= f1.difference <= f1.high <= 0.1 + 1e-12
    r = c.metrics["pearson"]  # L0.N1 (0.7, 0.6), L0.N2 (0.2, 0.2), L1.N4.neg (0.4, 0.4)
    assert (r.n, r.b_better, r.equal, r.b_worse) == (3, 0, 2, 1)
    assert r.mean_a == pytest.approx(1.3 / 3) and r.difference == pytest.approx(-0.1 / 3)
    assert c.layers == [{"layer": 0, "n": 1, "f1_a": 0.8, "f1_b": 0.9, "difference": pytest.approx(0.1)},
                        {"layer": 1, "n": 1, "f1_a": 0.5, "f1_b": 0.5, "difference": 0.0}]
    assert [n["key"] for n in c.neurons] == ["L0.N1", "L1.N4.neg", "L0.N2", "L1.N3"]  # largest gain first, no F1 last
    assert c.settings == [("augment", True, False)]


def test_neurons_on_other_held_out_text_or_in_one_run_only_are_left_out(runs, tmp_path):
    a, b = runs
    def other_text(d):
        d["examples"][2]["token_ids"][0] = 105  # the first test excerpt of L0.N1 is another one in B
    _edit(b, "L0.N1", other_text)
    shutil.rmtree(b / "neurons" / "L0.N2")
    shutil.copytree(b / "neurons" / "L1.N4.neg", b / "neurons" / "L1.N5.neg")
    _edit(b, "L1.N5.neg", lambda d: d["neuron"].update(index=5))
    c = compare_runs(a, b)
    assert (c.paired, c.text_differs, c.only_a, c.only_b) == (["L1.N3", "L1.N4.neg"], ["L0.N1"], ["L0.N2"], ["L1.N5.neg"])
    f1 = c.metrics["f1"]
    assert (f1.n, f1.mean_a, f1.mean_b, f1.difference) == (1, 0.5, 0.5, 0.0)


def test_the_command_prints_the_comparison_and_json(runs, capsys):
    a, b = runs
    code, out, err = main(["compare", a, b], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"A  {a}  (run synthetic <test> run, model toy/model, 4 neurons)"
    assert lines[2] == "settings that differ (A -> B): augment True -> False"
    assert lines[3] == "4 neurons in both runs, scored on the same held-out text; left out: 0 only in A, 0 only in B"
    assert lines[6].split() == ["firing", "F1", "0.650", "0.700", "+0.050", *lines[6].split()[5:7], "1", "/", "1", "/", "0", "2"]
    assert "L0.N1           0.800 -> 0.900  +0.100" in out and "largest losses" not in out
    code, out, err = main(["compare", a, b, "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and d["paired"] == ["L0.N1", "L0.N2", "L1.N3", "L1.N4.neg"]
    assert d["metrics"]["f1"]["b_better"] == 1 and d["settings"] == [{"setting": "augment", "a": True, "b": False}]
    code, out, err = main(["compare", a, b, "--limit", "0"], capsys)
    assert code == 0 and "largest gains" not in out


def test_a_preset_change_is_named_with_what_each_side_changed_of_it(runs, capsys):
    a, b = runs
    default, paper = (dataclasses.asdict(n2g.preset(name)) for name in ("default", "paper"))
    _run_json(a, lambda d: d["identity"].update(config=json.loads(json.dumps({**default, "written": 0}))))
    _run_json(b, lambda d: d["identity"].update(config=json.loads(json.dumps(paper))))
    code, out, err = main(["compare", a, b], capsys)
    n = sum(default[k] != paper[k] for k in default) - 1  # A's written 0 is paper's too
    assert code == 0 and f"settings that differ: preset default -> paper ({n} settings; --json lists them); " \
                         "A also: written 0" in out, out


@pytest.mark.parametrize("case, message", [
    ("model", "were made with different models (model content abc and xyz); a neuron of one is not the neuron of the "
              "other: compare two runs of one model"),
    ("threshold", "scores firing at 0.5 and "),
    ("no neuron", "share no neuron; run the second with the same --layers, --neurons and --sign as the first"),
    ("no text", "no neuron of both runs was scored on the same held-out text (they differ in n_top); compare runs"),
    ("not a run", "is not an n2g run directory (no run.json); run `n2g run` first"),
    ("limit", "--limit must be 0 or more (got -1)"),
])
def test_what_cannot_be_compared_is_one_line(runs, capsys, case, message):
    a, b = runs
    argv = ["compare", a, b]
    if case == "model":
        _run_json(b, lambda d: d["identity"].update(model_content="xyz"))
    elif case == "threshold":
        _run_json(b, lambda d: d["identity"]["config"].update(fire_threshold=0.3))
        message += f"{b} at 0.3; compare runs fitted at one fire threshold"
    elif case == "no neuron":
        for key in ("L0.N1", "L0.N2", "L1.N3"):
            shutil.rmtree(b / "neurons" / key)
        shutil.copytree(b / "neurons" / "L1.N4.neg", b / "neurons" / "L1.N4")
        _edit(b, "L1.N4", lambda d: d["neuron"].update(sign="positive"))
        shutil.rmtree(b / "neurons" / "L1.N4.neg")
    elif case == "no text":
        _run_json(b, lambda d: d["identity"]["config"].update(n_top=10))
        for key in ("L0.N1", "L0.N2", "L1.N4.neg"):
            _edit(b, key, lambda d: d["examples"].pop())
        shutil.rmtree(b / "neurons" / "L1.N3")
    elif case == "not a run":
        argv[2] = a / "neurons"
    else:
        argv += ["--limit", "-1"]
    code, out, err = main(argv, capsys)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and message in err, err


@pytest.mark.parametrize("case", ["damaged", "list", "deep", "link out", "both damaged"])
def test_a_run_json_that_cannot_be_read_is_one_line_not_another_model(runs, capsys, case):
    a, b = runs
    if case == "damaged":
        (b / "run.json").write_text("{nope")
    elif case == "list":
        (b / "run.json").write_text("[1, 2]")
    elif case == "deep":
        (b / "run.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "link out":
        (b / "run.json").unlink()
        (b / "run.json").symlink_to(a / "run.json")
    else:  # neither run's model is known: not compared as if they were of one model
        (a / "run.json").write_text("{nope")
        (b / "run.json").write_text("{nope")
    code, out, err = main(["compare", a, b], capsys)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert "run.json cannot be read" in err and "different models" not in err, err
    assert "re-running the same `n2g run` command rewrites it" in err


def test_json_is_valid_when_a_run_json_holds_nan_or_infinity(runs, capsys):
    a, b = runs
    _run_json(a, lambda d: d["model"].update(spec=float("inf")))
    _run_json(b, lambda d: (d["model"].update(spec=float("inf")), d["identity"]["config"].update(augment=float("nan"))))
    code, out, err = main(["compare", a, b, "--json"], capsys)
    assert code == 0 and "Traceback" not in err, err
    d = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert d["a"]["model"] is None and d["settings"] == [{"setting": "augment", "a": True, "b": None}]


def test_a_score_outside_its_range_counts_as_none(runs, capsys):
    a, b = runs  # F1 1e308 and -1e308: the mean overflowed to inf, printed as +inf, and --json was a traceback
    for key in ("L0.N1", "L1.N4.neg"):
        _set_scores(a, key, -1e308, -5.0)
        _set_scores(b, key, 1e308, 5.0)
    c = compare_runs(a, b)
    assert (c.metrics["f1"].n, c.metrics["f1"].mean_a) == (0, None)
    assert (c.metrics["pearson"].n, c.metrics["pearson"].mean_a) == (1, 0.2)  # L0.N2 alone
    code, out, err = main(["compare", a, b, "--json"], capsys)
    assert code == 0 and json.loads(out)["neurons"][0]["f1_b"] is None, err
    code, out, err = main(["compare", a, b], capsys)
    assert code == 0 and "inf" not in out and "1000000" not in out, out


def test_a_model_spec_with_a_newline_is_one_line(runs, capsys):
    a, b = runs
    _run_json(a, lambda d: d["identity"].pop("model_content"))
    _run_json(b, lambda d: (d["identity"].pop("model_content"), d["model"].update(spec="evil\nline two\x1b[2J" + "x" * 5000)))
    code, out, err = main(["compare", a, b], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 500, err
    assert "(model toy/model and evil\\nline two\\x1b[2Jxxx" in err and "\x1b" not in err


def test_scores_whose_held_out_text_is_not_recorded_are_not_paired(runs):
    a, b = runs
    for run in (a, b):
        _edit(run, "L0.N1", lambda d: d.update(examples=[]))  # scored, but on which excerpts neither file says
    c = compare_runs(a, b)
    assert (c.paired, c.text_differs) == (["L0.N2", "L1.N3", "L1.N4.neg"], ["L0.N1"])  # L1.N3, dead, has none to pair
    assert (c.metrics["f1"].n, c.metrics["f1"].mean_b) == (1, 0.5)


def test_a_run_that_records_no_options_is_said_so_not_preset_none(runs, capsys):
    a, b = runs
    _run_json(a, lambda d: d["identity"].pop("config"))
    code, out, err = main(["compare", a, b], capsys)
    assert code == 0 and "settings that differ: preset not recorded -> default (" in out and "None" not in out, out


def test_held_out_text_that_differs_names_what_chose_it_not_the_preset(runs, capsys):
    """`default` and `paper` pick test excerpts alike (the run's held-out partition), so where a default and a paper
    run hold other held-out text the message names what does choose it (here the corpus size), not the presets'
    other settings (`evidence` only says what the graph learns from)."""
    a, b = runs
    default, paper = (json.loads(json.dumps(dataclasses.asdict(n2g.preset(name)))) for name in ("default", "paper"))
    _run_json(a, lambda d: d["identity"].update(config=default, n_excerpts=1024))
    _run_json(b, lambda d: d["identity"].update(config=paper, n_excerpts=512))
    for key in ("L0.N1", "L0.N2", "L1.N4.neg"):
        _edit(b, key, lambda d: d["examples"].pop())
    shutil.rmtree(b / "neurons" / "L1.N3")  # dead: no held-out text to differ
    code, out, err = main(["compare", a, b], capsys)
    assert code == 2 and not out and len(err.strip().splitlines()) == 1, err
    assert "(they differ in n_excerpts); compare runs of one model and corpus with the same --max-excerpts" in err, err
    assert "evidence" not in err and "published way" not in err, err


@pytest.mark.parametrize("sae_b, refused", [
    ({"path": "/abs/sae"}, False),  # the same SAE given by another path: was refused as another model
    ({"hook_name": "blocks.2.hook_resid_post"}, True),
    (None, True),  # latents against MLP neurons
])
def test_runs_of_one_sae_compare_whatever_path_it_was_given_by(runs, capsys, sae_b, refused):
    a, b = runs
    sae = {"path": "sae", "hook_name": "blocks.1.hook_resid_post", "d_sae": 16, "activation_fn": "relu"}
    _run_json(a, lambda d: d["model"].update(sae=sae))
    _run_json(b, lambda d: d["model"].update(sae=None if sae_b is None else {**sae, **sae_b}))
    code, out, err = main(["compare", a, b], capsys)
    if refused:
        assert code == 2 and "were made with different models (SAE " in err, err
    else:  # an SAE's latents are called latents, as the run's own summary and pages call them
        assert code == 0 and "firing F1" in out, err
        assert "model toy/model, 4 latents)" in out and "4 latents in both runs" in out and "neuron" not in out, out
