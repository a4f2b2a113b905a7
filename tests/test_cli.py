"""The command line: --version, --json, search, -q/-v, fit --sign both, defaults shared with Python, file modes."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_run import add_large_neuron, make_run
from n2g import __version__, cli
from n2g.pipeline import RunOptions
from n2g.report import build_all

REPO = Path(__file__).resolve().parents[1]


def main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"n2g {__version__}"


def test_run_defaults_agree_with_python_and_are_small():
    args = cli.build_parser().parse_args(["run"])
    assert (args.layers, args.neurons) == (RunOptions().layers, RunOptions().neurons) == ("0", "0-7")
    assert cli.build_parser().parse_args(["fit", "--layer", "1", "--neuron", "2", "--sign", "both"]).sign == "both"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("cli"))
    add_large_neuron(run)
    build_all(run)
    return run


def test_search_prints_a_table_and_json(run, capsys):
    code, out, err = main(["search", run, "paris", "--role", "activator"], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["neuron", "token", "role", "weight", "N2G", "F1", "match"]
    assert [ln.split()[0] for ln in lines[1:]] == ["L1.N4.neg", "L0.N1", "L0.N2"]
    assert "␣Paris" in lines[1] and "case-insensitive" in lines[1]
    code, out, _ = main(["search", run, "IN", "--json", "--role", "context"], capsys)
    data = json.loads(out)
    assert code == 0 and data["query"] == "IN"
    found = {(h["key"], h["token"], h["match"]) for h in data["results"]}
    assert found == {("L0.N1", " in", "case-insensitive"), ("L0.N2", " in", "case-insensitive"),
                     ("L1.N5", " in", "case-insensitive"), ("L1.N4.neg", "\"quoted\" 'single'", "substring")}
    assert data["results"][-1]["match"] == "substring", "substring matches come last"
    code, out, _ = main(["search", run, "word1", "--json", "--limit", "1"], capsys)
    (hit,) = json.loads(out)["results"]
    assert hit["token"] == " word1" and hit["key"] == "L1.N5"


def test_search_marks_an_activating_token_that_never_fires_as_quiet(run, capsys):
    code, out, _ = main(["search", run, "."], capsys)  # L0.N1 holds "." at -0.2: a graded value, below the threshold
    lines = out.splitlines()
    assert code == 0 and lines[1].split()[:3] == ["L0.N1", ".", "quiet"]
    assert lines[-1].startswith("(quiet: an activating token whose graph value stays below the fire threshold 0.5;")
    code, out, _ = main(["search", run, "Paris", "--role", "activator"], capsys)
    assert "quiet" not in out  # 0.5 and up fire
    code, out, _ = main(["search", run, ".", "--json"], capsys)
    data = json.loads(out)
    assert data["fire_threshold"] == 0.5 and [(h["key"], h["role"], h["quiet"]) for h in data["results"]] == [("L0.N1", "activator", True)]


def test_search_mistakes_are_one_line(run, tmp_path, capsys):
    code, out, err = main(["search", run, "zzzz-nothing"], capsys)
    assert code == 1 and out == "" and "no neuron's graph has a token matching" in err
    code, _, err = main(["search", tmp_path, "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "not an n2g run directory" in err
    code, _, err = main(["search", run, "x", "--limit", "0"], capsys)
    assert code == 2 and "--limit must be at least 1" in err
    code, _, err = main(["search", run, "x", "-q", "-v"], capsys)
    assert code == 2 and "contradict" in err


def test_predict_lists_the_neurons_whose_graphs_fire_on_a_text(run, capsys):
    # split with the run's own tokens: " in", " Paris", "." -- L0.N1's " in [ Paris]" (END 0.7) fires at " Paris";
    # L0.N2 and L1.N5 hold " in" too but none of their paths is all there; L1.N4.neg's " Paris" needs its context
    code, out, err = main(["predict", run, " in Paris."], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("3 tokens, split by the run's own vocabulary")
    assert lines[1].split()[:4] == ["neuron", "N2G", "F1", "predicted"]
    assert lines[2:] == [f"{'L0.N1':<16}{'0.80':>7}{0.7:>10.2f}  ␣Paris 0.70"]
    code, out, _ = main(["predict", run, " in the London", "--json"], capsys)  # " London" after * after " in"
    data = json.loads(out)
    assert code == 0 and data["tokens"] == [" in", " the", " London"] and data["token_ids"] == [101, 104, 102]
    (hit,) = data["results"]
    assert (hit["key"], hit["predicted"], hit["predicted_max"], hit["fires"]) == ("L0.N2", [0.0, 0.0, 0.6], 0.6, [2])
    code, out, _ = main(["predict", run, " in Paris", "--neuron", "L1.N4.neg", "--neuron", "L0.N1"], capsys)
    assert code == 0
    assert out.splitlines()[1:] == [
        "values are normalised activations; a .neg side's is the activation ÷ its most negative value "
        "(1 = its strongest, where the model's value is lowest)",
        "", "L1.N4.neg (N2G F1 0.50): the graph says it fires on 0 of 2 tokens",
        f"  {'token':<24}{'predicted':>10}", f"  {'␣in':<24}{0.0:>10.2f}", f"  {'␣Paris':<24}{0.0:>10.2f}",
        "", "L0.N1 (N2G F1 0.80): the graph says it fires on 1 of 2 tokens",
        f"  {'token':<24}{'predicted':>10}", f"  {'␣in':<24}{0.0:>10.2f}", f"  {'␣Paris':<24}{0.7:>10.2f}"]
    code, out, err = main(["predict", run, " the the."], capsys)
    assert code == 1 and out.startswith("3 tokens") and "no neuron's graph predicts firing on this text" in err


@pytest.mark.parametrize("argv, says", [
    (["--neuron", "Lx"], "--neuron: 'Lx' is not a neuron key; keys look like L5.N2 or L5.N2.neg"),
    (["--neuron", "L9.N9"], "no neuron L9.N9 in the index of"),
    (["--limit", "0"], "--limit must be at least 1"),
])
def test_predict_mistakes_are_one_line(run, capsys, argv, says):
    code, out, err = main(["predict", run, " in Paris", *argv], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and says in err, err


def test_predict_reads_the_text_from_standard_input_and_refuses_none(run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO(" in Paris"))
    code, out, _ = main(["predict", run, "-", "--json"], capsys)
    assert code == 0 and [h["key"] for h in json.loads(out)["results"]] == ["L0.N1"]
    # `echo " in Paris" | n2g predict RUN -`: the line break echo adds is not a token of the text (it was the last)
    for piped in (" in Paris\n", " in Paris\r\n"):
        monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
        code, piped_out, _ = main(["predict", run, "-", "--json"], capsys)
        assert code == 0 and json.loads(piped_out) == json.loads(out)
    monkeypatch.setattr(sys, "stdin", io.StringIO(" in Paris\n\n"))  # only the one that ends it
    code, two, _ = main(["predict", run, "-", "--json"], capsys)
    assert code == 0 and json.loads(two)["tokens"][-1] == "\n"
    code, out, err = main(["predict", run, "  "], capsys)
    assert code == 2 and "no text given" in err


def _run_of_the_tiny_llama(tmp_path):
    """(run, model, text, its token ids): the synthetic run, saying it was made with a 3-layer llama of 48 neurons a
    layer, and that tiny llama saved as a folder (tmp_path / "llama") and loaded."""
    import torch

    from conftest import tiny_model, tiny_tokenizer
    from n2g.models import load_model

    run = make_run(tmp_path)
    made = json.loads((run / "run.json").read_text())
    made["model"] = {"spec": "tiny", "architecture": "llama", "n_layers": 3, "d_mlp": 48}
    (run / "run.json").write_text(json.dumps(made))
    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    tiny_tokenizer().save_pretrained(tmp_path / "llama")
    text = "the cat sat on the mat and the dog"
    model = load_model(str(tmp_path / "llama"))
    return run, model, text, model.encode(text)


def test_predict_shows_a_true_activation_just_below_the_threshold_below_it(tmp_path, capsys):
    # the predicted column kept a value on its side of the threshold (0.49, never 0.50), the true column beside it
    # did not: a token the model truly drives to 0.4996 of its maximum read "0.50" under "it truly fires on 0"
    import torch

    run, model, text, ids = _run_of_the_tiny_llama(tmp_path)
    acts = model.activations(torch.tensor([ids]), None, [(0, 1)])[0].float().numpy()
    d = json.loads((run / "neurons" / "L0.N1" / "result.json").read_text())
    d["stats"]["max_activation"] = float(acts[:, 0].max()) / 0.4996  # its strongest token here: 0.4996, quiet
    (run / "neurons" / "L0.N1" / "result.json").write_text(json.dumps(d))
    build_all(run)
    code, out, err = main(["predict", run, text, "--model", tmp_path / "llama", "--neuron", "L0.N1", "-q"], capsys)
    assert code == 0 and "it truly fires on 0" in out, out + err
    rows = [ln.split() for ln in out.splitlines() if ln.startswith("  ") and "predicted" not in ln]
    assert max(float(r[-1]) for r in rows) == 0.49, out


def test_predict_with_the_model_shows_true_activations_and_the_neurons_that_truly_fire(tmp_path, capsys):
    # the synthetic run said it was made with a 3-layer llama of 48 neurons a layer: the tiny one here
    import torch

    run, model, text, ids = _run_of_the_tiny_llama(tmp_path)
    acts = model.activations(torch.tensor([ids]), None, [(0, 1), (0, 2), (1, 4)])[0].float().numpy()
    # maxima that make L0.N1 and L1.N4.neg fire on this text (at their strongest token) and L0.N2 not
    maxima = {"L0.N1": float(acts[:, 0].max()), "L0.N2": 4 * float(abs(acts[:, 1]).max()), "L1.N4.neg": -float(acts[:, 2].min())}
    for key, top in maxima.items():
        d = json.loads((run / "neurons" / key / "result.json").read_text())
        d["stats"]["max_activation"] = top
        (run / "neurons" / key / "result.json").write_text(json.dumps(d))
    build_all(run)
    code, out, err = main(["predict", run, text, "--model", tmp_path / "llama", "--json", "-q"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["token_ids"] == ids and data["tokenizer"].startswith("the model's tokenizer")
    expect = {"L0.N1": acts[:, 0] / maxima["L0.N1"], "L0.N2": acts[:, 1] / maxima["L0.N2"],
              "L1.N4.neg": -acts[:, 2] / maxima["L1.N4.neg"]}
    truly = sorted(k for k, v in expect.items() if v.max() >= 0.5)
    assert truly == ["L0.N1", "L1.N4.neg"]
    assert sorted(h["key"] for h in data["results"]) == truly  # no graph fires on these ids: only the true ones
    for h in data["results"]:
        assert h["fires"] == [] and h["true"] == pytest.approx(expect[h["key"]].round(4).tolist(), abs=1e-4)
        assert h["true_fires"] == [i for i, v in enumerate(expect[h["key"]]) if v >= 0.5]
    code, out, _ = main(["predict", run, text, "--model", tmp_path / "llama", "--neuron", "L1.N4.neg", "--json", "-q"], capsys)
    (h,) = json.loads(out)["results"]
    assert code == 0 and h["true"] == pytest.approx(expect["L1.N4.neg"].round(4).tolist(), abs=1e-4)
    from conftest import tiny_model, tiny_tokenizer

    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")  # another model's neuron of the same index is not the truth
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    code, _, err = main(["predict", run, text, "--model", tmp_path / "gpt2", "-q"], capsys)
    assert code == 2 and "was made with another model" in err and "predict on it with the run's model" in err


def test_quiet_silences_library_progress_bars(monkeypatch):
    import huggingface_hub.utils as hub
    import transformers.utils.logging as tlog

    from n2g.progress import silence_library_bars

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    tlog.enable_progress_bar()
    hub.enable_progress_bars()
    assert tlog.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
    try:
        silence_library_bars()
        assert not tlog.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    finally:
        tlog.enable_progress_bar()
        hub.enable_progress_bars()


def _cli(args, umask=0o022, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "n2g", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
                          preexec_fn=lambda: os.umask(umask))


def test_verbose_logs_debug_lines(tmp_path):
    run = make_run(tmp_path)  # no index yet: search builds it and says so
    proc = _cli(["search", run, "Paris", "-v"])
    assert proc.returncode == 0, proc.stderr
    assert "n2g: DEBUG n2g.cli: searching" in proc.stderr and "INFO n2g.search: indexed 4 neurons" in proc.stderr


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from conftest import tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("tinymodel")
    tiny_model("llama").save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(20)]
    (root / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(40)))
    return root


def test_info_json(tiny_model_dir, capsys):
    code, out, err = main(["info", "--model", tiny_model_dir / "model", "--json", "-q"], capsys)
    info = json.loads(out)
    assert code == 0 and info["architecture"] == "llama" and info["n_layers"] == 3 and info["d_mlp"] == 48


def test_fit_both_signs_json_quiet_and_files_follow_the_umask(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = _cli(["fit", "--model", tiny_model_dir / "model", "--corpus", tiny_model_dir / "corpus.txt",
                 "--excerpt-length", "16", "--layer", "1", "--neuron", "5", "--sign", "both", "--out", out,
                 "--json", "-q"], umask=0o002, env={"N2G_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "-q: no progress bars, no log lines"
    data = json.loads(proc.stdout)
    assert sorted(n["key"] for n in data["neurons"]) == ["L1.N5", "L1.N5.neg"]
    assert data["fitted_now"] == 2 and data["out"] == str(out)
    assert all("f1" in n["scores"]["n2g"] for n in data["neurons"])
    assert all(n["ceiling"]["n_firing"] == n["scores"]["n2g"]["n_firing"] for n in data["neurons"])  # the token ceiling too
    assert Path(data["artifacts"]["report"]).is_file() and Path(data["neurons"][0]["page"]).is_file()
    files = [out / "run.json", out / "report.html", out / "scores.csv", out / "index.sqlite",
             out / "neurons" / "L1.N5" / "result.json", out / "neurons" / "L1.N5" / "graph.json",
             out / "viewer" / "index.html", out / "viewer" / "neurons" / "L1.N5.neg.html"]
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o664, f"{f} is {oct(stat.S_IMODE(f.stat().st_mode))}"


def test_a_run_without_graphviz_writes_dot_sources_and_finishes(tiny_model_dir, tmp_path):
    # A GPU machine often lacks Graphviz: the run must still finish (DOT files, pages, report), not
    # fail at the end after hours of fitting. PATH holds only a folder with this Python in it.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    out = tmp_path / "run"
    proc = _cli(["run", "--model", tiny_model_dir / "model", "--corpus", tiny_model_dir / "corpus.txt",
                 "--excerpt-length", "16", "--layers", "1", "--neurons", "5-6", "--out", out, "-q"],
                env={"N2G_CACHE": str(tmp_path / "cache"), "PATH": str(bin_dir)})
    assert proc.returncode == 0, proc.stderr
    graph = out / "neurons" / "L1.N5"
    assert (graph / "graph.dot").read_text().startswith("digraph")
    assert not (graph / "graph.svg").exists() and not (graph / "graph.png").exists()
    assert (out / "report.html").is_file() and (out / "viewer" / "neurons" / "L1.N6.html").is_file()


def test_one_neuron_is_one_neuron_in_every_line_and_nothing_warns(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = _cli(["fit", "--model", tiny_model_dir / "model", "--corpus", tiny_model_dir / "corpus.txt",
                 "--excerpt-length", "16", "--layer", "1", "--neuron", "5", "--out", out],
                env={"N2G_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "\n1 neuron (1 fitted now) in " in proc.stdout
    for line in ("1 neuron requested, 0 already done", "fit layer 1: done, 1 neuron in", "indexed 1 neuron into",
                 "wrote viewer for 1 neuron under"):
        assert line in proc.stderr
    assert "Warning" not in proc.stderr  # matplotlib's legend warning when no neuron had an F1

def test_written_option_sets_how_many_excerpts_the_model_writes(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _cli(["fit", "--model", tiny_model_dir / "model", "--corpus", tiny_model_dir / "corpus.txt",
                 "--excerpt-length", "16", "--layer", "1", "--neuron", "5", "--written", "3", "--no-report", "--out", out],
                env={"N2G_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "the model writes 3 excerpts of 16 tokens" in proc.stderr and "written text: 3 excerpts," in proc.stderr
    assert json.loads((out / "run.json").read_text())["identity"]["config"]["written"] == 3
    bad = tmp_path / "bad"
    code, _, err = main(["fit", "--model", tiny_model_dir / "model", "--layer", "1", "--neuron", "5",
                         "--written", "-1", "--out", bad, "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "written must be 0 or more" in err and not bad.exists()


def test_serve_with_a_missing_model_is_one_line(run, tmp_path, capsys):
    code, out, err = main(["serve", run, "--port", "0", "--model", tmp_path / "no-such-model"], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and "model path" in err and "does not exist" in err


def test_substitutes_option_picks_the_source_and_refuses_others(tiny_model_dir, tmp_path, capsys, caplog):
    from n2g.pipeline import check_options

    assert RunOptions().config().substitute_source == "embedding"  # the default preset's
    assert RunOptions(preset="paper").config().substitute_source == "model"  # paper --augment: next-token guesses
    assert RunOptions(substitutes="model").config().substitute_source == "model"
    assert RunOptions(preset="paper", substitutes="embedding").config().substitute_source == "embedding"
    assert RunOptions(substitutes="mlm:some-model").config().substitute_source == "embedding"  # run option only
    for good in (None, "model", "embedding", "mlm:x"):
        check_options(RunOptions(substitutes=good))
    with caplog.at_level("WARNING", logger="n2g"):  # options that would do nothing are said to do nothing
        check_options(RunOptions(substitutes="model", overrides={"augment": False}))
        check_options(RunOptions(ray_workers=4))
    assert "--substitutes model has no effect without augmentation" in caplog.text
    assert "--ray-workers 4 has no effect without --ray" in caplog.text
    out = tmp_path / "out"
    code, _, err = main(["fit", "--model", tiny_model_dir / "model", "--layer", "0", "--neuron", "1",
                         "--substitutes", "nearest", "--out", out, "-q"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "--substitutes must be 'model', 'embedding' or 'mlm:NAME'" in err and "Traceback" not in err
    assert not out.exists()  # refused before anything was written


def test_out_that_is_a_file_is_refused_before_loading_anything(tmp_path, capsys):
    target = tmp_path / "afile"
    target.write_text("keep me")
    # the model does not exist: the --out check comes first, so nothing is loaded for nothing
    code, out, err = main(["run", "--model", tmp_path / "no-such-model", "--out", target, "-q"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is a file, not a directory" in err
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("argv, needle", [
    (["run", "--dtype", "float8"], "n2g run: error: argument --dtype: invalid choice: 'float8'"),
    (["frobnicate"], "n2g: error: argument COMMAND: invalid choice: 'frobnicate'"),
    (["run", "--layers"], "n2g run: error: argument --layers: expected one argument"),
    (["serve"], "n2g serve: error: the following arguments are required: run_dir"),
])
def test_usage_mistakes_are_one_line_that_points_to_the_help(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "usage:" not in err, err
    assert err.startswith(needle) and err.rstrip().endswith("--help`"), err


def test_predict_help_names_the_runs_fire_threshold_not_0_5(capsys):
    # predict lists the neurons whose graphs reach the run's own fire threshold (a run fitted at 0.3 fires at 0.3);
    # its help said "normalised activation >= 0.5" whatever the run
    with pytest.raises(SystemExit) as e:
        cli.main(["predict", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and ">= 0.5" not in out
    assert "at or above the run's fire threshold, 0.5 unless the run was fitted at another)" in out


def test_the_command_line_starts_without_torch_and_n2g_distill_stays_the_function():
    # torch loads inside the command (~1.5 s), where Ctrl-C is the command's one-line interruption
    code = ("import sys, n2g, n2g.cli; assert 'torch' not in sys.modules, 'torch at import'; "
            "import n2g.pipeline, n2g.distill; from n2g import distill; from n2g.distill import NeuronModel; "
            "assert callable(n2g.distill) and distill is n2g.distill and n2g.NeuronModel is NeuronModel; "
            "assert n2g.distill.__module__ == 'n2g.distill'; print(sorted(set(n2g.__all__) - set(dir(n2g))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr


def test_ctrl_c_while_a_library_imports_is_one_line(monkeypatch, capsys, tmp_path):
    # A Ctrl-C that lands while networkx imports (0.3 s into `n2g search`, `n2g show`, ...) leaves networkx half
    # registered, so importing it again fails (KeyError: 'Algorithm already exists in dispatch namespace'); the
    # interrupt's own message imported it (cli.visible read BIDI_CONTROLS from n2g.render), and the command ended
    # in that traceback with exit 1 instead of one line. Here networkx cannot be imported at all.
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_search", interrupted)
    monkeypatch.setattr(cli, "_TERMINAL_CONTROLS", {})
    monkeypatch.delitem(sys.modules, "n2g.render", raising=False)
    monkeypatch.setitem(sys.modules, "networkx", None)  # `import networkx` raises ImportError
    assert cli.main(["search", str(tmp_path), "dict"]) == 130
    assert capsys.readouterr().err == "n2g: interrupted\n"


def test_ctrl_c_while_torch_imports_prints_no_librarys_log_lines_after_it(tmp_path):
    # A Ctrl-C about 1.1-1.5 s into any command that loads a model stops torch's import after it registered its
    # exit handler (FakeTensor cache stats, logged at INFO) and before torch set its loggers' levels: at exit
    # those records reached n2g's handler, three lines after "n2g: interrupted". A library's records below a
    # warning are shown with -v only.
    code = ("import atexit, logging, sys; from n2g import cli\n"
            "def stopped(args):\n"
            "    atexit.register(lambda: logging.getLogger('somelib.cache').info('cache stats: 0 hits'))\n"
            "    logging.getLogger('somelib.cache').info('imported')\n"
            "    raise KeyboardInterrupt\n"
            "cli._info = stopped\n"
            "sys.exit(cli.main(['info']))\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "n2g: interrupted\n")
    loud = subprocess.run([sys.executable, "-c", code.replace("['info']", "['info', '-v']")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "cache stats: 0 hits" in loud.stderr  # -v shows them


def test_ctrl_c_before_a_command_starts_is_one_line(monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["info"]) == 130
    assert capsys.readouterr().err == "n2g: interrupted\n"


from test_pipeline import run_args, tiny_dir  # noqa: E402,F401  (tiny_dir is a fixture)


def _tiny_bert(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)
    BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("spec, needle", [
    ("mlm:some-org/some-mlm", "hub cannot be reached"),  # was: a scan, retries for half a minute, run.json left behind
    ("mlm:./no/such/mlm", "does not exist"),
    ("mlm:SUBJECT", "not a masked language model"),  # a causal LM: was refused only after the scan, run.json left
    ("mlm:BERT", None),
])
def test_masked_lm_substitutes_are_checked_before_the_run_starts(tiny_dir, tmp_path, spec, needle):
    spec = spec.replace("SUBJECT", str(tiny_dir / "model")).replace("BERT", str(_tiny_bert(tmp_path / "bert")))
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") and not k.lower().endswith("_proxy")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf"), PYTHONPATH=str(REPO))
    args = run_args(tiny_dir, out, "--substitutes", spec, "--neurons", "0-1", "--layers", "0")
    res = subprocess.run([sys.executable, "-m", "n2g", *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=120)
    if needle is None:
        assert res.returncode == 0, res.stderr
        assert json.loads((out / "run.json").read_text())["identity"]["substitutes"] == spec
        # the same run resumed with the variants of another source would mix the two: refused
        again = subprocess.run([sys.executable, "-m", "n2g", *run_args(tiny_dir, out, "--neurons", "0-3", "--layers", "0")],
                               capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        assert again.returncode == 2 and "different substitutes" in again.stderr, again.stderr
        return
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.strip() and "Loading weights" not in l]
    assert len(lines) == 1 and lines[0].startswith("n2g: error:") and needle in lines[0], res.stderr
    assert not out.exists()


def test_ray_address_that_is_not_one_writes_nothing(tiny_dir, tmp_path, capsys):
    pytest.importorskip("ray")
    out = tmp_path / "run"
    code, _, err = main(run_args(tiny_dir, out, "--neurons", "0", "--layers", "0", "--ray", "no such host"), capsys)
    assert code == 2 and "is not host:port" in err and not out.exists()  # was: run.json, then "Invalid address format"


def test_sigterm_stops_a_command_like_ctrl_c_with_one_line(tmp_path):
    import subprocess
    import sys

    code = ("import os, signal, sys, time, n2g.cli as c\n"
            "c._info = lambda args: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30))\n"
            "sys.exit(c.main(['info']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines() == ["n2g: interrupted"]  # info saves nothing to resume


def test_search_predict_and_serve_say_when_the_index_is_behind_the_run(tmp_path, capsys, caplog, monkeypatch):
    # a neuron fitted after `n2g report` (a run resumed with more neurons) is in no index yet
    import shutil

    import n2g.viewer

    served = []
    monkeypatch.setattr(n2g.viewer, "serve", lambda run_dir, **kw: served.append(run_dir))
    run = make_run(tmp_path)
    build_all(run)
    for argv in (["search", run, "Paris"], ["predict", run, " in Paris"], ["serve", run]):
        code, _, err = main(argv, capsys)
        assert code == 0 and "search index" not in caplog.text, caplog.text
    shutil.copytree(run / "neurons" / "L0.N1", run / "neurons" / "L0.N7")
    d = json.loads((run / "neurons" / "L0.N7" / "result.json").read_text())
    d["neuron"]["index"] = 7
    (run / "neurons" / "L0.N7" / "result.json").write_text(json.dumps(d))
    built = (run / "index.sqlite").stat().st_mtime_ns - 10**10  # the index built 10 s before this result was saved,
    os.utime(run / "index.sqlite", ns=(built, built))  # and after the others
    for result in run.glob("neurons/*/result.json"):
        if result.parent.name != "L0.N7":
            os.utime(result, ns=(built - 10**10,) * 2)
    for argv in (["search", run, "Paris"], ["predict", run, " in Paris"], ["serve", run]):
        caplog.clear()
        code, out, err = main(argv, capsys)
        assert code == 0 and "L0.N7" not in out
        assert f"the search index of {run} lists 4 neurons, the run holds 5 (1 saved since the index was built); " \
               f"run `n2g report {run}` to bring it up to date" in caplog.text, caplog.text
    build_all(run)
    caplog.clear()
    code, out, err = main(["predict", run, " in Paris"], capsys)
    assert code == 0 and "search index" not in caplog.text and "L0.N7" in out
    assert served == [run] * 2  # the warning does not stop the server


def test_show_prints_a_neurons_scores_summary_and_strongest_paths(run, capsys):
    code, out, err = main(["show", run, "L0.N1", "L1.N4.neg", "L1.N3", "--paths", "1"], capsys)
    assert code == 0 and err == ""
    blocks = out.split("\n\n")
    assert blocks[0].splitlines()[0] == ("L0.N1 (fitted): test firing F1 0.800; token lookup 0.600; best lookup, "
                                         "3-gram lookup (max), 0.700; Pearson r 0.700; maximum activation 5")
    assert blocks[0].splitlines()[1].startswith("L0.N1 fires on ␣Paris (0.90), in contexts such as ␣in right before it")
    assert blocks[1].splitlines()[2:] == ["  [␣Paris]  0.90  x1", "  ... 3 more paths (--paths all lists every one)",
                                          f"page: {run / 'viewer' / 'neurons' / 'L0.N1.html'}"]
    assert blocks[2].startswith("L1.N4.neg (fitted): test firing F1 0.500; token lookup 0.400; Pearson r 0.400; "
                                "most negative activation -3\n")
    assert "\\x1b" not in out and "<script>alert(1)</script> [␣Paris]  1.00  x1" in blocks[3]
    assert blocks[4].splitlines()[0] == "L1.N3 (dead)" and "NeuronGraph" not in blocks[4]  # no graph to list
    code, out, _ = main(["show", run, "L0.N1", "--paths", "all", "--json"], capsys)
    (d,) = json.loads(out)["neurons"]
    saved = json.loads((run / "neurons" / "L0.N1" / "result.json").read_text())
    assert code == 0 and d["scores"]["n2g"]["f1"] == saved["scores"]["n2g"]["f1"] == 0.8
    assert d["best_lookup"] == "ngram" and d["n_paths"] == 4 and len(d["paths"]) == 4
    assert [(p["text"], p["end"], p["count"]) for p in d["paths"][:2]] == [("[␣Paris]", 0.9, 1), ("␣in [␣Paris]", 0.7, 1)]
    assert d["summary"].startswith("L0.N1 fires on") and d["page"].endswith("L0.N1.html")
    code, out, _ = main(["show", run, "L0.N1", "--paths", "0"], capsys)
    assert code == 0 and "NeuronGraph" not in out
    code, out, _ = main(["show", run, "L0.N2", "--paths", "1"], capsys)  # 2 paths: one shown, one more
    assert code == 0 and "  ... 1 more path (--paths all lists every one)" in out.splitlines()
    code, out, _ = main(["show", run, "L0.N1", "L00.N01", "L0.N1", "--paths", "0", "--json"], capsys)
    assert code == 0 and [d["key"] for d in json.loads(out)["neurons"]] == ["L0.N1"]  # one neuron, however written


def test_show_paths_past_int_s_digit_limit_lists_every_path(run, capsys):
    # a whole number of 5,000 digits passed the ASCII-digit check, then int() raised "Exceeds the limit (4300 digits)"
    # as a traceback; it is more paths than any graph holds, so every path is listed, as "all" does
    code, out, err = main(["show", run, "L0.N1", "--paths", "9" * 5000], capsys)
    assert code == 0 and "Traceback" not in err and "more path" not in out and "  [.]" in out
    code, out, _ = main(["show", run, "L0.N1", "--paths", "0" * 5000 + "1"], capsys)
    assert code == 0 and "  ... 3 more paths (--paths all lists every one)" in out


@pytest.mark.parametrize("argv, says", [
    (["L0.x"], "'L0.x' is not a neuron key; keys look like L5.N2"),
    (["L0.N1", "L9.N9"], "holds no readable result for L9.N9; fit it there with `n2g run --layers 9 --neurons 9"),
    (["L0.N1", "--paths", "-1"], "--paths must be a whole number of 0 or more, or 'all'"),
    (["L0.N1", "--paths", "many"], "--paths must be a whole number of 0 or more, or 'all'"),
    (["L0.N1", "--paths", "1_0"], "--paths must be a whole number of 0 or more, or 'all'"),  # int() takes these
    (["L0.N1", "--paths", "\u0663"], "--paths must be a whole number of 0 or more, or 'all'"),
])
def test_show_mistakes_are_one_line(run, capsys, argv, says):
    code, out, err = main(["show", run, *argv], capsys)
    assert code == 2 and out == "" and says in err and len(err.strip().splitlines()) == 1
    code, _, err = main(["show", run.parent, "L0.N1"], capsys)
    assert code == 2 and "is not an n2g run directory" in err
