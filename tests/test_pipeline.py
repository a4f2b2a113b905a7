"""Whole runs on a tiny random model: batched = alone, resume after kill -9, bad input, artifacts."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pyarrow.parquet as pq
import torch

from conftest import save_tiny_folder, tiny_model, tiny_tokenizer
from n2g.config import preset
from n2g.engine import Job, fit_many
from n2g.models import SubjectModel
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a local model directory, plus a corpus file."""
    return save_tiny_folder(tmp_path_factory.mktemp("tiny"), 12)


def cli(*args, cwd=None, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "n2g", *args], capture_output=True, text=True, cwd=cwd, env=env, **kw)


def run_args(tiny_dir, out, *extra):
    return ["run", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--layers", "0-2",
            "--neurons", "0-9", "--excerpt-length", "32", "--group-size", "3", "--no-report", "-q", "--out", str(out), *extra]


def stored(out: Path) -> dict:
    """Every neuron's result (minus wall time) and graph, by key."""
    found = {}
    for folder in sorted((out / "neurons").iterdir()):
        result = json.loads((folder / "result.json").read_text())
        result.pop("seconds")
        graph = (folder / "graph.json").read_text() if (folder / "graph.json").exists() else None
        found[folder.name] = (result, graph)
    return found


def canonical(value):
    """JSON-like data with floats rounded to 4 decimals (forward-pass summation order differs by batch)."""
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: canonical(v) for k, v in value.items()}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def test_batched_fitting_equals_fitting_each_neuron_alone():
    torch.manual_seed(0)
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    excerpts = torch.randint(4, 68, (120, 24))
    cfg = preset("default")
    scans = scan_layers(model, excerpts, [0, 1, 2], k=64, pool_size=64, progress=False)
    jobs = [Job(NeuronId(l, i, s), scans[l].scale(i, s), scans[l].ranked(i, s), scans[l].pool)
            for l in (0, 2) for i in (1, 5, 9) for s in (Sign.POSITIVE, Sign.NEGATIVE)]
    alone = fit_many(model, excerpts.tolist(), jobs, cfg, group_size=1)
    together = fit_many(model, excerpts.tolist(), jobs, cfg, group_size=len(jobs))
    assert sum(f.graph.n_paths() for f in alone.values() if f.graph) > 0
    for job in jobs:
        a, b = alone[job.neuron], together[job.neuron]
        assert a.status == b.status
        # Same structure, tokens and decisions; stored activations agree to float rounding.
        assert canonical(a.graph.to_dict()) == canonical(b.graph.to_dict())
        # Binarised scores are identical; continuous ones may differ in the last float bits because
        # batch composition changes the summation order inside the forward pass.
        for method in a.scores:
            sa, sb = a.scores[method].to_dict(), b.scores[method].to_dict()
            for key in ("pearson", "explained_variance"):
                assert sa.pop(key) == pytest.approx(sb.pop(key), abs=1e-6)
            assert sa == sb


def test_killed_run_resumes_to_identical_results(tiny_dir, tmp_path):
    reference = tmp_path / "reference"  # the same command, never interrupted
    assert cli(*run_args(tiny_dir, reference, "--group-size", "1")).returncode == 0
    killed = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "n2g", *run_args(tiny_dir, killed, "--group-size", "1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(killed.glob("neurons/*/result.json"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(killed.glob("neurons/*/result.json")))
    assert 4 <= done_before < 30, "the run should have been killed part-way"
    # resumed with the host work in worker processes: still the same results
    resumed = cli(*run_args(tiny_dir, killed, "--group-size", "1", "--host-workers", "2"))
    assert resumed.returncode == 0, resumed.stderr
    assert stored(killed) == stored(reference)
    assert len(stored(reference)) == 30


def test_ctrl_c_stops_in_one_line_and_the_run_resumes_to_identical_results(tiny_dir, tmp_path):
    reference = tmp_path / "reference"
    assert cli(*run_args(tiny_dir, reference, "--group-size", "1")).returncode == 0
    stopped = tmp_path / "stopped"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # a shell starts background jobs with SIGINT ignored, and a child inherits that: give it back its
    # default, as in a terminal, so Python turns Ctrl-C into KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "n2g", *run_args(tiny_dir, stopped, "--group-size", "1")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and len(list(stopped.glob("neurons/*/result.json"))) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
    _, err = proc.communicate(timeout=120)
    done_before = len(list(stopped.glob("neurons/*/result.json")))
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == ("n2g: interrupted; finished neurons are saved, "
                                            "re-run the same command to resume")
    assert 4 <= done_before < 30, "the run should have been stopped part-way"
    assert not [p for p in stopped.rglob("*") if p.name.endswith(".tmp")]  # no half-written file left
    resumed = cli(*run_args(tiny_dir, stopped, "--group-size", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert stored(stopped) == stored(reference)


def test_damaged_artifact_is_redone_and_others_are_kept(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(*run_args(tiny_dir, out)).returncode == 0
    before = stored(out)
    victim = next(k for k, (r, g) in before.items() if g is not None)
    (out / "neurons" / victim / "graph.json").write_text("{ not json")
    other = next(k for k in before if k != victim)
    mtime = (out / "neurons" / other / "result.json").stat().st_mtime_ns
    again = cli(*run_args(tiny_dir, out))
    assert again.returncode == 0, again.stderr
    # The victim is refitted alone where it was first fitted in a batch of 30: the same result up to
    # the float rounding of differently padded batches (see test_batched_fitting_equals_...).
    redone = {k: (canonical(r), canonical(json.loads(g)) if g else None) for k, (r, g) in stored(out).items()}
    assert redone == {k: (canonical(r), canonical(json.loads(g)) if g else None) for k, (r, g) in before.items()}
    assert stored(out)[other] == before[other]
    assert (out / "neurons" / other / "result.json").stat().st_mtime_ns == mtime
    assert "damaged" in again.stderr


def test_run_directory_of_another_configuration_is_refused(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert cli(*run_args(tiny_dir, out)).returncode == 0
    other = cli(*run_args(tiny_dir, out, "--preset", "paper"))
    assert other.returncode == 2
    assert "different config" in other.stderr and "--out" in other.stderr
    assert "Traceback" not in other.stderr


def test_fit_prints_a_summary_and_writes_artifacts(tiny_dir, tmp_path):
    out = tmp_path / "fit"
    res = cli("fit", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--layer", "1",
              "--neuron", "4", "--excerpt-length", "32", "-q", "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "L1.N4" in res.stdout and "n2g F1" in res.stdout
    result = json.loads((out / "neurons" / "L1.N4" / "result.json").read_text())
    from n2g.baselines import BASELINES
    from n2g.store import METHODS

    assert set(result["scores"]) == {"n2g", *BASELINES} == set(METHODS)
    assert all(e["tokens"] for e in result["examples"])
    table = list(csv.DictReader((out / "scores.csv").open()))
    assert [row["method"] for row in table] == list(METHODS)
    n2g_row = table[0]
    assert float(n2g_row["f1"]) == pytest.approx(result["scores"]["n2g"]["f1"])
    assert int(n2g_row["n_firing"]) == result["scores"]["n2g"]["n_firing"]
    ceiling = result["ceiling"]  # test firing tokens that fire somewhere in training bound any token-keyed graph
    assert ceiling["n_firing"] == result["scores"]["n2g"]["n_firing"] and 0 <= ceiling["n_seen"] <= ceiling["n_firing"]
    if ceiling["n_firing"]:
        share = ceiling["n_seen"] / ceiling["n_firing"]
        assert float(n2g_row["ceiling_f1"]) == pytest.approx(2 * share / (1 + share))
    parquet = pq.read_table(out / "scores.parquet").to_pylist()
    assert [row["method"] for row in parquet] == [row["method"] for row in table]
    assert parquet[0]["f1"] == pytest.approx(result["scores"]["n2g"]["f1"])
    assert parquet[0]["layer"] == 1 and parquet[0]["index"] == 4 and parquet[0]["score_status"] == "ok"
    assert (out / "report.html").exists() and (out / "index.sqlite").exists()
    assert (out / "neurons" / "L1.N4" / "graph.dot").exists()
    # the page's summary paragraph, in the terminal too (wrapped to its width)
    from n2g.explain import summary_text
    from n2g.render import load_graph_json
    from n2g.report import load_results

    (saved,) = load_results(out)
    expected = summary_text(saved, load_graph_json(out / "neurons" / "L1.N4" / "graph.json", out), 0.5)
    assert expected.startswith("L1.N4 ") and "On held-out excerpts" in expected
    assert " ".join(expected.split()) in " ".join(res.stdout.split())
    assert res.stdout.rstrip().splitlines()[-1].startswith("page: ")
    again = cli("fit", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--layer", "1",
                "--neuron", "4", "--excerpt-length", "32", "-q", "--out", str(out), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["neurons"][0]["summary"] == expected  # --json: the paragraph, unwrapped


def test_info_reports_the_model(tiny_dir):
    res = cli("info", "--model", str(tiny_dir / "model"))
    assert res.returncode == 0, res.stderr
    assert "n_layers" in res.stdout and " 3" in res.stdout and "48" in res.stdout


def bad_cases(tiny_dir, tmp_path):
    binary = tmp_path / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    model, corpus = str(tiny_dir / "model"), str(tiny_dir / "corpus.txt")
    base = ["--excerpt-length", "32", "-q"]
    return {
        "unknown model": (["info", "--model", str(tmp_path / "nope.gguf")], "does not exist"),
        "missing corpus": (["run", "--model", model, "--corpus", str(tmp_path / "missing.txt"), *base], "missing.txt"),
        "binary corpus": (["run", "--model", model, "--corpus", str(binary), *base], "UTF-8"),
        "empty corpus": (["run", "--model", model, "--corpus", str(empty), *base], "empty"),
        "layer out of range": (["fit", "--model", model, "--corpus", corpus, "--layer", "7", "--neuron", "0", *base], "out of range"),
        "neuron out of range": (["fit", "--model", model, "--corpus", corpus, "--layer", "0", "--neuron", "999", *base], "out of range"),
        "empty neuron list": (["run", "--model", model, "--corpus", corpus, "--neurons", ",", *base], "no neuron"),
        "unwritable out": (["run", "--model", model, "--corpus", corpus, "--neurons", "0", *base, "--out", str(a_file / "sub")], "writable"),
        "report of nothing": (["report", str(tmp_path / "nothing")], "run directory"),
        "zero batch tokens": (["run", "--model", model, "--corpus", corpus, "--batch-tokens", "0", *base], "--batch-tokens"),
        "negative host workers": (["run", "--model", model, "--corpus", corpus, "--host-workers", "-1", *base], "--host-workers"),
        "a worker per neuron": (["run", "--model", model, "--corpus", corpus, "--host-workers", "100000", *base],
                                "worker processes per core"),
    }


@pytest.mark.parametrize("case", ["unknown model", "missing corpus", "binary corpus", "empty corpus", "layer out of range",
                                  "neuron out of range", "empty neuron list", "unwritable out", "report of nothing",
                                  "zero batch tokens", "negative host workers", "a worker per neuron"])
def test_bad_input_gives_one_line_and_writes_nothing(case, tiny_dir, tmp_path):
    args, needle = bad_cases(tiny_dir, tmp_path)[case]
    work = tmp_path / "cwd"
    work.mkdir()
    res = cli(*args, cwd=work)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [l for l in res.stderr.splitlines() if l.startswith("n2g: error:")]
    assert len(lines) == 1 and needle.lower() in lines[0].lower(), res.stderr
    assert "Traceback" not in res.stderr
    assert list(work.iterdir()) == []  # nothing written (no graphs/ directory either)


def test_output_effects_in_chunks_equal_one_neuron_at_a_time():
    """The run computes output effects a chunk of neurons at a time (one matmul); each neuron,
    either sign, gets exactly what it gets alone."""
    from n2g.pipeline import EffectsAhead, output_effects, output_effects_many

    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    neurons = [NeuronId(l, i, s) for l in (0, 2) for i in (1, 4, 5, 9) for s in (Sign.POSITIVE, Sign.NEGATIVE)]
    alone = [output_effects(model, n) for n in neurons]
    assert output_effects_many(model, neurons) == alone
    ahead = EffectsAhead(model, neurons, chunk=3)
    assert [ahead(n) for n in neurons] == alone
    assert ahead.ready == {}  # nothing kept once delivered
    assert alone[1] == ([(t, -v) for t, v in alone[0][1]], [(t, -v) for t, v in alone[0][0]])


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_excerpts_longer_than_the_models_context_are_refused_before_the_run_starts(family, tmp_path):
    from n2g.errors import N2GError
    from n2g.pipeline import RunOptions, run

    words = ["the", "cat", "sat", "on", "mat"]
    (tmp_path / "c.txt").write_text(" ".join(words[i % 5] for i in range(600)))
    model = SubjectModel(tiny_model(family), tiny_tokenizer(), spec=f"tiny-{family}")  # 128 positions
    opts = RunOptions(corpus=str(tmp_path / "c.txt"), excerpt_length=128, neurons="0", out=str(tmp_path / "run"),
                      report=False, progress=False)
    with pytest.raises(N2GError, match="--excerpt-length 127 or less"):
        run(opts, model=model)
    assert not (tmp_path / "run").exists()  # nothing written
    opts.excerpt_length = 127  # BOS plus 127 tokens fit exactly
    assert len(run(opts, model=model).results) == 1


def test_summary_table_shows_the_token_ceiling_beside_the_scores():
    from helpers_run import scores
    from n2g.pipeline import summary_table
    from n2g.records import NeuronResult, NeuronStats

    stats = NeuronStats(max_activation=1.0, quantiles={}, firing_rate=0.1, n_sampled_tokens=10)
    results = [NeuronResult(NeuronId(0, i), "fitted", stats, scores={m: scores(0.5, 0.5, f1, 0.9, 0.9, 0.5)
                                                                       for m in ("n2g", "token_lookup", "ngram")},
                            ceiling={"n_firing": 10, "n_seen": seen, "f1": 2 * seen / 10 / (1 + seen / 10)})
               for i, (f1, seen) in enumerate([(0.6, 10), (0.4, 5)])]
    lines = summary_table(results).splitlines()
    assert lines[0].split()[8:10] == ["max", "F1"]
    assert lines[1].split()[2:6] == ["0.60", "0.60", "0.60", "1.00"]
    assert lines[2].split()[2:6] == ["0.40", "0.40", "0.40", "0.67"]
    assert lines[3].split()[2:6] == ["0.50", "0.50", "0.50", "0.83"]  # means over the two neurons
    # a neuron firing on every token (a constant one) keeps its node count and firing rate apart
    results[0].stats = NeuronStats(max_activation=1.0, quantiles={}, firing_rate=1.0, n_sampled_tokens=10)
    assert summary_table(results).splitlines()[1].split()[-2:] == ["0", "100.00%"]


def test_a_run_is_not_resumed_with_other_weights_behind_the_same_model_path(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_dir / "model", folder)
    args = ["run", "--model", str(folder), "--corpus", str(tiny_dir / "corpus.txt"), "--layers", "0",
            "--neurons", "0-1", "--excerpt-length", "32", "--no-report", "-q", "--out", str(tmp_path / "out")]
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    identity = json.loads((tmp_path / "out" / "run.json").read_text())["identity"]
    assert len(identity["model_weights"]) == 16
    torch.manual_seed(7)
    tiny_model("llama").save_pretrained(folder)  # overwritten in place: same path, same config
    again = cli(*args[:-4], "--neurons", "0-3", *args[-3:])
    assert again.returncode == 2 and "model_weights" in again.stderr and "Traceback" not in again.stderr
    del identity["model_weights"], identity["model_content"]  # a run made before weights were recorded resumes as before
    meta = json.loads((tmp_path / "out" / "run.json").read_text())
    meta["identity"] = identity
    (tmp_path / "out" / "run.json").write_text(json.dumps(meta))
    resumed = cli(*args[:-4], "--neurons", "0-3", *args[-3:])
    assert resumed.returncode == 0, resumed.stderr


def _claim_of(pid: int, host: str | None = None) -> str:
    from n2g.store import _start_time, this_process

    return json.dumps({"host": host or this_process()["host"], "pid": pid, "start": _start_time(pid)})


def test_claims_share_a_run_directory_between_processes(tmp_path):
    from n2g.records import NeuronResult, NeuronStats
    from n2g.store import CLAIMS, RunStore, _start_time, this_process

    store = RunStore(tmp_path)
    store.open({"model": "m"})
    a, b, c, d = (NeuronId(0, i, Sign.POSITIVE) for i in range(4))
    assert store.claim(a) == ("mine", None)
    assert json.loads((tmp_path / CLAIMS / a.key).read_text())["pid"] == os.getpid()
    assert RunStore(tmp_path).claim(a) == ("mine", None)  # the same process, another handle
    other = subprocess.Popen(["sleep", "60"])  # another live process on this host holds b
    try:
        (tmp_path / CLAIMS / b.key).write_text(_claim_of(other.pid))
        state, holder = store.claim(b)
        assert state == "busy" and holder["pid"] == other.pid
        (tmp_path / CLAIMS / c.key).write_text(_claim_of(other.pid, host="elsewhere"))
        assert store.claim(c)[0] == "remote"  # another host's process: cannot be asked whether it runs
    finally:
        other.kill()
        other.wait()
    assert store.claim(b) == ("mine", None)  # its process ended without saving b: taken over
    # a claim naming a live process of this host but not its start time (a copied or hand-made run folder
    # naming pid 1): not one n2g wrote here, so the run would otherwise wait for it for ever
    (tmp_path / CLAIMS / d.key).write_text(json.dumps({"host": this_process()["host"], "pid": 1}))
    assert store.claim(d) == ("mine", None) or _start_time(1) is None  # (where /proc says nothing, it cannot be told)
    (tmp_path / CLAIMS / d.key).write_text(json.dumps({"host": this_process()["host"], "pid": 1, "start": "7"}))
    assert store.claim(d) == ("mine", None) or _start_time(1) in (None, "7")
    (tmp_path / CLAIMS / d.key).write_text('{"pid": ')  # a damaged claim is nobody's
    assert store.claim(d) == ("mine", None)
    store.save(NeuronResult(neuron=a, status="dead", stats=NeuronStats(max_activation=0.0)), None)
    assert not (tmp_path / CLAIMS / a.key).exists()  # saved: the claim is gone
    assert store.claim(a) == ("done", None)
    store.release_claims()  # an interrupted run drops its own claims, never another host's
    assert sorted(p.name for p in (tmp_path / CLAIMS).iterdir()) == [c.key]


def test_claims_are_never_written_where_a_link_named_claims_leads(tmp_path, caplog):
    from n2g.records import NeuronResult, NeuronStats
    from n2g.store import CLAIMS, RunStore

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "L0.N1").write_text("precious")
    run = tmp_path / "run"
    store = RunStore(run)
    store.open({"model": "m"})
    (run / CLAIMS).symlink_to(outside, target_is_directory=True)
    neuron = NeuronId(0, 1, Sign.POSITIVE)
    with caplog.at_level(logging.WARNING):
        assert store.claim(neuron) == ("mine", None)  # fitted without claims, said once
    assert "cannot hold claims" in caplog.text
    store.save(NeuronResult(neuron=neuron, status="dead", stats=NeuronStats(max_activation=0.0)), None)
    store.release_claims()
    assert sorted(p.name for p in outside.iterdir()) == ["L0.N1"] and (outside / "L0.N1").read_text() == "precious"


def test_the_same_corpus_and_model_by_other_paths_resume_the_run_and_share_its_scans(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    common = ["--layers", "0", "--excerpt-length", "32", "--no-report", "-q", "--out", str(out)]
    first = cli("run", "--model", "./model", "--corpus", "corpus.txt", "--neurons", "0-1", *common, cwd=tiny_dir)
    assert first.returncode == 0, first.stderr
    scans = sorted(p.name for p in (tmp_path / "cache" / "scans").iterdir())
    (tmp_path / "linked.txt").symlink_to(tiny_dir / "corpus.txt")
    again = cli("run", "--model", str(tiny_dir / "model") + "/", "--corpus", "linked.txt", "--neurons", "0-3", *common,
                cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert len(list(out.glob("neurons/*/result.json"))) == 4
    assert sorted(p.name for p in (tmp_path / "cache" / "scans").iterdir()) == scans  # no second scan
    assert json.loads((out / "run.json").read_text())["identity"]["corpus"] == "corpus.txt"
    (tmp_path / "corpus.txt").write_text((tiny_dir / "corpus.txt").read_text()[::-1])  # other text, same name
    other = cli("run", "--model", "./model", "--corpus", str(tmp_path / "corpus.txt"), "--neurons", "0-1", *common,
                cwd=tiny_dir)
    assert other.returncode == 2 and "different corpus" in other.stderr and other.stderr.count("\n") == 1, other.stderr
    import shutil  # the same weights in a folder whose config.json computes otherwise

    shutil.copytree(tiny_dir / "model", tmp_path / "edited")
    config = json.loads((tmp_path / "edited" / "config.json").read_text())
    (tmp_path / "edited" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    edited = cli("run", "--model", str(tmp_path / "edited"), "--corpus", "corpus.txt", "--neurons", "0-1", *common,
                 cwd=tiny_dir)
    assert edited.returncode == 2 and "different model" in edited.stderr and "model_config" in edited.stderr, edited.stderr


def test_a_run_is_not_resumed_with_another_bos_or_occlusion_token_set_on_the_model(tmp_path, monkeypatch):
    """``bos_token_id`` and ``occlusion_token_id`` are plain attributes a notebook may set; the first changes every
    activation (the scan cache is keyed on it), the second every importance, but a run resumed after either was
    changed went on and mixed neurons fitted both ways in one run. A run made before they were recorded resumes."""
    import dataclasses

    from n2g.corpus import Corpus
    from n2g.errors import N2GError
    from n2g.pipeline import RunOptions, run

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-tokens")
    corpus = Corpus("ids", 16, torch.randint(4, 60, (40, 16), generator=torch.Generator().manual_seed(0)))
    out = tmp_path / "out"
    opts = RunOptions(layers="1", neurons="0", out=str(out), progress=False, report=False,
                      overrides={"written": 0, "vocabulary": 0})
    run(opts, model=model, corpus=corpus)
    more = dataclasses.replace(opts, neurons="0-1")
    for name, value in (("occlusion_token_id", 5), ("bos_token_id", None)):
        before = getattr(model, name)
        setattr(model, name, value)
        with pytest.raises(N2GError, match="different model_tokens"):
            run(more, model=model, corpus=corpus)
        setattr(model, name, before)
    meta = json.loads((out / "run.json").read_text())
    del meta["identity"]["model_tokens"]  # a run made before they were recorded
    (out / "run.json").write_text(json.dumps(meta))
    assert [r.neuron.key for r in run(more, model=model, corpus=corpus).results] == ["L1.N0", "L1.N1"]


def test_a_model_that_computes_nan_is_refused_in_one_line_and_leaves_no_run_folder(tiny_dir, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    shutil.copytree(tiny_dir / "model", tmp_path / "nan")
    config = json.loads((tmp_path / "nan" / "config.json").read_text())
    (tmp_path / "nan" / "config.json").write_text(json.dumps({**config, "rms_norm_eps": float("nan")}))
    out = tmp_path / "new" / "out"
    done = cli("fit", "--model", str(tmp_path / "nan"), "--corpus", str(tiny_dir / "corpus.txt"), "--layer", "1",
               "--neuron", "2", "--excerpt-length", "32", "-q", "--no-report", "--out", str(out))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "NaN or infinite activations; the model computes them in full precision too" in done.stderr
    assert not (tmp_path / "new").exists()  # nor the folder made for it
    (tmp_path / "nan" / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 1}))
    small = cli("fit", "--model", str(tmp_path / "nan"), "--corpus", str(tiny_dir / "corpus.txt"), "--excerpt-length", "1",
                "--layer", "1", "--neuron", "2", "-q", "--no-report", "--out", str(out))
    assert small.returncode == 2 and "context (1 position, one of them for BOS) leaves no room" in small.stderr, small.stderr


def test_a_run_created_by_another_process_a_moment_ago_is_checked_not_overwritten(tmp_path, monkeypatch):
    from n2g import store as store_module
    from n2g.errors import N2GError

    real = store_module.create_json

    def raced(path, data):  # another process writes its run.json between our check and our create
        real(path, {**data, "identity": {"model": "theirs"}})
        return real(path, data)

    monkeypatch.setattr(store_module, "create_json", raced)
    with pytest.raises(N2GError, match="different model"):
        store_module.RunStore(tmp_path / "run").open({"model": "mine"})
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"] == {"model": "theirs"}


def test_a_result_too_large_to_read_back_is_refused_when_saved(tmp_path, monkeypatch):
    from n2g import store as store_module
    from n2g.errors import N2GError
    from n2g.records import NeuronResult, NeuronStats

    monkeypatch.setattr(store_module, "MAX_READ_BYTES", 100)
    run = store_module.RunStore(tmp_path / "run")
    run.open({"model": "m"})
    with pytest.raises(N2GError, match="more than the 0 MiB n2g reads back.*shorter --excerpt-length"):
        run.save(NeuronResult(neuron=NeuronId(0, 1, Sign.POSITIVE), status="dead",
                              stats=NeuronStats(max_activation=0.0)), None)
    assert not (tmp_path / "run" / "neurons" / "L0.N1" / "result.json").exists()


def test_two_runs_on_one_out_split_the_neurons_and_both_end_with_all_of_them(tiny_dir, tmp_path):
    few = ("--layers", "0-1", "--neurons", "0-5")
    reference = tmp_path / "reference"
    assert cli(*run_args(tiny_dir, reference, *few, "--group-size", "1")).returncode == 0  # batches as each run's
    shared = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = [subprocess.Popen([sys.executable, "-m", "n2g", *run_args(tiny_dir, shared, *few, "--group-size", "1", "--json")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0], [err for _, err in outputs]
    summaries = [json.loads(out) for out, _ in outputs]
    assert [s["n_neurons"] for s in summaries] == [12, 12]
    assert sum(s["fitted_now"] for s in summaries) == 12  # each neuron fitted once, by one of them
    assert canonical(stored(shared)) == canonical(stored(reference))
    assert list((shared / ".claims").iterdir()) == []  # every claim gone


def test_a_run_waits_for_a_neuron_another_process_is_fitting_and_takes_it_over_when_that_one_dies(tiny_dir, tmp_path):
    from n2g.store import CLAIMS

    out = tmp_path / "waits"
    first = cli(*run_args(tiny_dir, out, "--layers", "0", "--neurons", "0"))
    assert first.returncode == 0, first.stderr
    other = subprocess.Popen(["sleep", "60"])
    try:
        (out / CLAIMS / "L0.N1").write_text(_claim_of(other.pid))  # another process is fitting L0.N1
        env = dict(os.environ, PYTHONPATH=str(REPO))
        run = subprocess.Popen([sys.executable, "-m", "n2g", *run_args(tiny_dir, out, "--layers", "0", "--neurons", "0-2",
                                                                     "--json")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while time.time() < deadline and not (out / "neurons/L0.N2/result.json").exists():
            time.sleep(0.1)
        time.sleep(3)  # L0.N2 is done: the run now waits for L0.N1
        assert run.poll() is None and not (out / "neurons/L0.N1/result.json").exists()
    finally:
        other.kill()
        other.wait()
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    summary = json.loads(stdout)
    assert (summary["n_neurons"], summary["fitted_now"]) == (3, 2)  # L0.N2, then L0.N1 once its process ended
    assert (out / "neurons/L0.N1/result.json").exists() and not (out / CLAIMS / "L0.N1").exists()


def test_a_neuron_of_a_run_loads_as_the_fitted_model_its_fit_made(tiny_dir, tmp_path, caplog):
    import n2g
    from n2g.errors import N2GError

    out = tmp_path / "run"
    res = cli("run", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--layers", "1",
              "--neurons", "4", "--sign", "both", "--excerpt-length", "32", "--no-report", "-q", "--out", str(out))
    assert res.returncode == 0, res.stderr
    for key, sign in (("L1.N4", 1.0), ("L1.N4.neg", -1.0)):
        saved = json.loads((out / "neurons" / key / "result.json").read_text())
        model = n2g.load_neuron(out, key)
        assert model.status_ == saved["status"] == "fitted" and model.sign == sign
        assert model.scale == saved["stats"]["max_activation"]
        assert model.scores_["n2g"].f1 == saved["scores"]["n2g"]["f1"]
        tests = [e for e in model.examples_ if e.split == "test"]
        assert tests and len(model.examples_) == len(saved["examples"])
        for e in tests:  # the saved graph predicts what the fit stored, on the normalised and the raw scale
            ids = np.asarray(e.token_ids)
            np.testing.assert_allclose(model.predict_normalised(ids), e.predicted, atol=1e-5)
            np.testing.assert_allclose(model.predict(ids), np.asarray(e.predicted) * model.scale * sign, rtol=1e-5, atol=1e-7)
        assert model.score(tests).f1 == pytest.approx(model.scores_["n2g"].f1)
        assert str(model).startswith(f"NeuronModel {key} (fitted; test firing F1")
    with_model = n2g.load_neuron(out, "L1.N4", model=str(tiny_dir / "model"))  # text, through the run's own tokenizer
    ids = with_model.tokenize("the cat sat on the mat")
    np.testing.assert_array_equal(with_model.predict("the cat sat on the mat"), with_model.predict(ids))
    # without the model, text is read with the tokenizer the run saved: the same ids and predictions
    assert n2g.load_neuron(out, "L1.N4").tokenize("the cat sat on the mat") == ids
    (out / "tokenizer.json").unlink()  # a run made before n2g saved it takes token ids only
    with pytest.raises(N2GError, match="has no tokenizer"):
        n2g.load_neuron(out, "L1.N4").predict("the cat sat")
    for args, needle in (((tmp_path, "L1.N4"), "not an n2g run directory"), ((out, "L1.N5"), "no readable result for L1.N5"),
                         ((out, "neuron 4"), "is not a neuron key")):
        with pytest.raises(N2GError, match=needle):
            n2g.load_neuron(*args)
    (out / "neurons" / "L1.N4.neg" / "result.json").write_text("{damaged")
    with caplog.at_level(logging.WARNING), pytest.raises(N2GError, match="no readable result for L1.N4.neg"):
        n2g.load_neuron(out, "L1.N4.neg")
    assert "stored artifacts are damaged" in caplog.text and "it is not loaded" in caplog.text
    assert "redone" not in caplog.text  # loading redoes nothing


def test_repeated_documents_never_land_on_both_sides_of_the_split_and_one_distinct_excerpt_says_so(tmp_path, caplog):
    import random

    from n2g.corpus import Corpus
    from n2g.pipeline import RunOptions, open_store, run

    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(40)]
    docs = [" ".join(rng.choice(words) for _ in range(48)) for _ in range(8)] * 3  # each document three times
    rng.shuffle(docs)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    opts = RunOptions(corpus=str(tmp_path / "c.jsonl"), excerpt_length=16, neurons="0", out=str(tmp_path / "run"),
                      report=False, progress=False, overrides={"written": 0, "vocabulary": 0})
    corpus = Corpus.build(opts.corpus, model.encode, length=16)
    _, is_train = open_store(opts, model, corpus)
    rows = lambda side: {r.tobytes() for r in corpus.excerpts.numpy()[side]}
    assert not rows(is_train) & rows(~is_train) and (~is_train).sum() >= 24
    assert json.loads((tmp_path / "run" / "run.json").read_text())["identity"]["partition"] == "repeats together"
    # every excerpt the same text: nothing can be held out, and the run says so rather than printing "nofire"
    (tmp_path / "same.txt").write_text(" ".join(["cat"] * 100))
    opts = RunOptions(corpus=str(tmp_path / "same.txt"), excerpt_length=16, neurons="0", out=str(tmp_path / "same"),
                      report=False, progress=False, overrides={"written": 0, "vocabulary": 0})
    with caplog.at_level(logging.WARNING):
        run(opts, model=model)
    assert "one distinct excerpt (6 copies of it), so nothing is held out and no neuron can be scored" in caplog.text


@pytest.mark.parametrize("factor", [1e8, 1e-9])
def test_a_neuron_scaled_far_beyond_or_below_float16_fits_the_graph_of_the_same_neuron_unscaled(factor, tmp_path, monkeypatch):
    """A neuron's graph does not depend on its scale. The float16 stores kept a neuron beyond +-65,504 at 65,504
    (scored against its true maximum: no test token fired) and one below 2^-18 as a few steps of 6e-8 or as 0; the
    written text and the vocabulary in context stored such a neuron as infinite. Here the neuron's gate-up row is
    scaled and its down-projection column unscaled, so the model computes the same function and every token of the
    scan, the written text and the vocabulary sees the neuron times ``factor``."""
    from n2g.corpus import Corpus
    from n2g.pipeline import RunOptions, run

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    corpus = Corpus("ids", 16, torch.randint(4, 60, (80, 16), generator=torch.Generator().manual_seed(0)))
    scores, graphs = {}, {}
    for f in (1.0, factor):
        torch.manual_seed(0)
        lm = tiny_model("llama")
        with torch.no_grad():
            lm.model.layers[1].mlp.up_proj.weight[3] *= f
            lm.model.layers[1].mlp.down_proj.weight[:, 3] /= f
        model = SubjectModel(lm, tiny_tokenizer(), spec=f"tiny-llama-x{f}")
        out = tmp_path / f"x{f}"
        done = run(RunOptions(layers="1", neurons="2-3", out=str(out), progress=False, report=False), model=model, corpus=corpus)
        scores[f] = {r.neuron.key: (r.scores["n2g"].f1, r.scores["n2g"].pearson, r.scores["ngram2_max"].f1) for r in done.results}
        graph = json.loads((out / "neurons" / "L1.N3" / "graph.json").read_text())
        graphs[f] = graph["graph"]
    assert scores[1.0]["L1.N3"][0] > 0.5  # a neuron with something to find
    for key in ("L1.N2", "L1.N3"):
        assert scores[factor][key] == pytest.approx(scores[1.0][key], abs=1e-3)
    shape = {f: ([(n["id"], n["kind"], n["token_id"], n["depth"]) for n in g["nodes"]], g["edges"]) for f, g in graphs.items()}
    assert shape[factor] == shape[1.0] and len(shape[1.0][0]) > 3  # the same nodes and edges ...
    for a, b in zip(graphs[factor]["nodes"], graphs[1.0]["nodes"]):  # ... at the same (normalised) values
        assert a["activation"] == pytest.approx(b["activation"], abs=1e-3)  # float16 keeps 11 bits
