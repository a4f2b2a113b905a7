"""Hostile input to steer, the CLI's numbers, the CPU scan batch and the Python API (audit 31): one line, bounded."""

from __future__ import annotations

import json

import pytest
import torch

import n2g
from conftest import tiny_model, tiny_tokenizer
from test_pipeline import tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from n2g import cli
from n2g.errors import N2GError
from n2g.models import SubjectModel


def main(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bloom():
    """BLOOM (ALiBi) declares no context length in its config."""
    torch.manual_seed(0)
    return SubjectModel(tiny_model("bloom"), tiny_tokenizer(), spec="tiny-bloom")


# --- H3, T2: steer's prompt and --tokens are bounded for every family ---------------------------------------------

def test_steer_knows_a_context_declared_as_max_seq_len():
    from n2g.steer import check_prompt, steer

    torch.manual_seed(0)
    model = SubjectModel(tiny_model("mpt"), tiny_tokenizer(), spec="tiny-mpt")  # MptConfig.max_seq_len 128
    check_prompt(model, [5, 6], 100)  # 103 positions with BOS: fits
    with pytest.raises(N2GError, match="exceeds this model's context of 128"):
        check_prompt(model, [5, 6], 200)  # MPT was a RuntimeError traceback from inside the model
    with pytest.raises(N2GError, match="context of 128"):
        steer(model, 1, 3, [5] * 300, 1.0, n_tokens=1)


def test_steer_on_a_model_without_a_declared_context_is_bounded(bloom):
    from n2g.steer import MAX_TOKENS, UNDECLARED_CONTEXT, check_prompt

    check_prompt(bloom, [5, 6], 12)
    with pytest.raises(N2GError, match=f"more than the {UNDECLARED_CONTEXT:,} n2g allows"):
        check_prompt(bloom, [5] * UNDECLARED_CONTEXT, 1)  # was taken whole: 25,000 tokens took 24 GB
    with pytest.raises(N2GError, match="--tokens 100000 is more than"):
        check_prompt(bloom, [5, 6], 100_000)  # was a greedy loop of 100,000 forwards
    with pytest.raises(N2GError, match=f"give --tokens {MAX_TOKENS} or fewer"):
        check_prompt(bloom, [5, 6], MAX_TOKENS + 1)


def test_steer_command_refuses_too_many_tokens_before_loading_the_model(capsys, tmp_path):
    code, out, err = main(["steer", "--model", tmp_path / "no-such-model", "--layer", "1", "--neuron", "3",
                           "--max", "1", "--prompt", "the cat", "--tokens", "100000", "-q"], capsys)
    assert code == 2 and out == ""
    assert err.startswith("n2g: error: --tokens 100000 is more than") and len(err.splitlines()) == 1, err


# --- L5: a negative number in exponent form is an option's value, not an option ----------------------------------

def test_negative_exponent_numbers_are_option_values(tiny_dir, capsys):  # noqa: F811
    code, out, err = main(["steer", "--model", tiny_dir / "model", "--layer", "1", "--neuron", "3", "--prompt",
                           "the cat", "--max", "-1e1", "--scale", "-2e-1", "--tokens", "1", "--json", "-q"], capsys)
    assert code == 0, err  # was: argument --scale: expected one argument
    result = json.loads(out)
    assert result["max_activation"] == -10.0 and result["scale"] == -0.2 and result["value"] == pytest.approx(2.0)


def test_negative_exponent_numbers_reach_every_numeric_option():
    parser = cli.build_parser()
    parse = lambda *argv: parser.parse_args(cli._join_negative_numbers(parser, list(argv)))
    args = parse("steer", "--layer", "1", "--neuron", "3", "--prompt", "x", "--max", "-1e308", "--scale", "-inf")
    assert (args.max_activation, args.scale) == ("-1e308", "-inf")  # n2g's own check then says what is wrong
    assert parse("serve", "RUN", "--port", "-1e3").port == "-1e3"
    after = ["search", "--", "--limit", "-1e3"]  # after --: positional, untouched
    assert cli._join_negative_numbers(parser, after) == after
    with pytest.raises(SystemExit):  # an int option now says the value is not an int, not that it is missing
        parse("steer", "--layer", "-1e3", "--neuron", "3", "--prompt", "x")
    args = parse("steer", "--layer", "1", "--neuron", "3", "--prompt", "-5e2", "--target", "-1e3")
    assert (args.prompt, args.target) == ("-5e2", "-1e3")  # text options take text that looks like a number
    # abbreviations argparse accepts take them too ("--sca" was "expected one argument")
    args = parse("steer", "--lay", "1", "--neu", "3", "--prompt", "x", "--sca", "-1e3", "--tar", "-2e1")
    assert (args.scale, args.target) == ("-1e3", "-2e1")
    assert cli._join_negative_numbers(parser, ["run", "--ver", "-1e3"]) == ["run", "--ver", "-1e3"]  # a flag's prefix


# --- M5: the CPU scan batch is bounded by the width (an SAE's d_sae) -----------------------------------------------

class _Wide:
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, d_mlp):
        self.d_mlp = d_mlp


def test_cpu_scan_batch_shrinks_for_wide_saes_only():
    from n2g.engine import CPU_SCAN_VALUES, device_budget

    assert device_budget(_Wide(48), 32) == (16384, 32)  # the tests' tiny models: unchanged
    assert device_budget(_Wide(1536), 64)[1] == 32  # SmolLM2's MLP at the default length: unchanged
    wide = device_budget(_Wide(100_000), 32)[1]  # was 32: 3.5 GB for 64 excerpts of 32 tokens
    assert 1 <= wide < 32 and wide * 32 * 100_000 <= CPU_SCAN_VALUES
    assert device_budget(_Wide(10**7), 1024)[1] == 1  # never zero
    assert device_budget(_Wide(100_000), 32, scan_batch=8)[1] == 8  # --scan-batch still wins


def test_fit_neuron_scans_in_batches_sized_to_the_width(tiny_dir, monkeypatch, tmp_path):  # noqa: F811
    import n2g.engine
    import n2g.scan

    seen = {}

    def spy(*args, **kw):
        seen["batch"] = kw.get("batch_size")
        raise KeyboardInterrupt  # the batch is all this test needs

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(n2g.engine, "CPU_SCAN_VALUES", 4 * 16 * 48)  # as if d_mlp 48 were a wide SAE: 4 excerpts
    monkeypatch.setattr(n2g.scan, "scan_layers", spy)
    model = n2g.load_model(str(tiny_dir / "model"))
    corpus = n2g.load_corpus(str(tiny_dir / "corpus.txt"), model, length=16)
    with pytest.raises(KeyboardInterrupt):
        n2g.fit_neuron(model, 1, 2, corpus=corpus, progress=False)
    assert seen["batch"] == 4  # was the scan's default of 32 whatever the width


# --- L8, L10, L11, L12: the Python API ------------------------------------------------------------------------------

def test_the_api_takes_pathlib_paths(tiny_dir, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    model = n2g.load_model(tiny_dir / "model")  # was: model spec must be ... (got PosixPath(...))
    assert model.n_layers == 3
    corpus = n2g.load_corpus(tiny_dir / "corpus.txt", model, length=16, max_excerpts=20)
    assert len(corpus) == 20
    fitted = n2g.fit_neuron(tiny_dir / "model", 1, 2, corpus=tiny_dir / "corpus.txt", max_excerpts=30, progress=False)
    assert fitted.neuron_ == n2g.NeuronId(1, 2) and fitted.status_ in ("fitted", "dead")


def test_loading_a_graph_from_a_directory_says_it_is_one(tmp_path):
    from n2g.fileio import UnreadableFile, read_bytes

    with pytest.raises(N2GError, match="it is a directory; give the path of a graph's JSON file") as e:
        n2g.NeuronGraph.load(tmp_path)
    assert "pipe, device or socket" not in str(e.value)
    with pytest.raises(UnreadableFile, match="is a directory, not a file"):
        read_bytes(tmp_path)


def test_a_float64_feature_beyond_float32_says_it_overflows():
    with pytest.raises(N2GError, match="overflow float32") as e:
        n2g.distill(lambda ids: (ids == 7).double() * 1e300, [[7, 7, 8]] * 8)
    assert "--dtype" not in str(e.value)  # a CLI option is no help to an API caller
    with pytest.raises(N2GError, match="NaN or infinite") as e:
        n2g.distill(lambda ids: (ids == 7).float() * float("nan"), [[7, 7, 8]] * 8)
    assert "--dtype" not in str(e.value)
    assert n2g.distill(lambda ids: (ids == 7).double() * 1e30, [[7, 7, 8]] * 8).status_ == "fitted"  # in range: fine


@pytest.mark.parametrize("ids, message", [([2**31], "from 0 to 2147483647 \\(got 2147483648\\)"),
                                          ([5, 10**30], "got 1000000000000000000000000000000"),
                                          ([-1, 4], "got -1"),
                                          ("range", "holds more than 1,048,576 ids"),
                                          ("generator", "holds more than 1,048,576 ids"),
                                          ("13", "must be token ids \\(got 13\\)"),  # not the ids 1 and 3
                                          (b"ab", "must be token ids"), ([3.7], "must be token ids"),
                                          ([True], "must be token ids")])
def test_sentence_end_ids_are_bounded(ids, message):
    from n2g.config import MAX_TOKEN_IDS, DistillConfig

    def given():
        if ids == "range":
            return range(MAX_TOKEN_IDS + 1)
        if ids == "generator":
            return (i for i in range(MAX_TOKEN_IDS + 1))
        return ids

    with pytest.raises(N2GError, match=message):
        DistillConfig(sentence_end_ids=given())
    with pytest.raises(N2GError, match=message):
        n2g.distill(lambda t: (t == 7).float(), [[7, 7, 8]] * 8, sentence_end_ids=given())
    if ids == "range":  # counted, not built: range(10**9) made a set of a billion ints for minutes
        with pytest.raises(N2GError, match=message):
            DistillConfig(sentence_end_ids=range(10**12))
        with pytest.raises(N2GError, match=message):
            DistillConfig(sentence_end_ids=range(10**30))  # too large even for len()
    assert DistillConfig(sentence_end_ids=[9, 3, 9]).sentence_end_ids == (3, 9)


# --- audit 34: empty path arguments, text that is not UTF-8, non-UTF-8 file names, odd config encodings -------

@pytest.mark.parametrize("argv, message", [
    (["info", "--model", ""], "--model is empty"),
    (["run", "--corpus", "", "-q"], "--corpus is empty"),  # was: the current directory read as the corpus
    (["run", "--out", " ", "-q"], "--out is empty"),  # was: graphs/<model>-<preset>
    (["fit", "--layer", "0", "--neuron", "0", "--sae", "", "-q"], "--sae is empty"),  # was: MLP neurons, silently
    (["report", ""], "the run directory is empty"),
    (["search", "", "Paris"], "the run directory is empty"),
    (["serve", "", "--port", "0"], "the run directory is empty"),
    (["info", "--device", ""], "--device is empty"),  # was: cuda if available, silently
])
def test_empty_path_arguments_are_refused(argv, message, capsys):
    code, out, err = main(argv, capsys)
    assert code == 2 and out == ""
    assert err.startswith(f"n2g: error: {message}") and len(err.splitlines()) == 1, err


def test_out_as_a_dangling_link_says_where_it_leads(tmp_path, capsys):
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    code, _, err = main(["run", "--model", tmp_path / "no-model", "--out", tmp_path / "out", "-q"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"is a link to {tmp_path / 'nowhere'}, which does not exist" in err  # was: cannot write run.json (File exists)


def test_text_that_is_not_utf8_is_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    code, _, err = main(["search", tmp_path, "Par\udcffis"], capsys)  # `n2g search RUN $'Par\xffis'`
    assert code == 2 and err.startswith("n2g: error: the search token is not valid UTF-8 text"), err  # was a traceback
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    with pytest.raises(N2GError, match=r"^the text is not valid Unicode \(byte 0xff at character 4\); pass UTF-8 text$"):
        model.encode("the \udcff")  # steer --prompt $'the \xff': was "check its tokenizer files"


def test_a_lone_surrogate_escape_in_a_jsonl_corpus_names_its_line(tmp_path):
    from n2g.corpus import load_texts

    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "the cat"}\n{"text": "\\ud800 sat"}\n')
    with pytest.raises(N2GError, match=r"^field 'text' of line 2 of .*c.jsonl holds a lone surrogate \(U\+D800"):
        load_texts(str(path))


def test_corpus_and_out_named_in_bytes_that_are_not_utf8(tiny_dir, tmp_path):  # noqa: F811
    import os
    import subprocess
    import sys

    import pyarrow as pa
    import pyarrow.parquet as pq

    from conftest import REPO
    from n2g.corpus import load_texts
    from n2g.fileio import read_json

    raw = os.fsencode(tmp_path)
    corpus = raw + b"/c\xff.txt"
    with open(corpus, "wb") as f:
        f.write((tiny_dir / "corpus.txt").read_bytes())
    out = raw + b"/o\xff"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONIOENCODING="utf-8:strict")  # as in a en_US.UTF-8 terminal
    common = ["--model", str(tiny_dir / "model"), "--corpus", corpus, "--excerpt-length", "32", "--no-report", "-q",
              "--out", out]
    for args in (["fit", "--layer", "0", "--neuron", "0", "--json"], ["run", "--layers", "0", "--neurons", "0-1"]):
        res = subprocess.run([sys.executable, "-m", "n2g", *args, *common], capture_output=True, env=env, timeout=300)
        # were tracebacks: the corpus digest, run.json, scores.parquet, then printing the summary
        assert res.returncode == 0 and b"Traceback" not in res.stderr, res.stderr[-2000:]
        if "--json" in args:
            assert json.loads(res.stdout.decode("utf-8"))["out"] == os.fsdecode(out)  # valid UTF-8 JSON
    run = read_json(os.fsdecode(out + b"/run.json"))
    assert run["identity"]["corpus"].endswith("/c\\xff.txt") and os.path.exists(out + b"/scores.parquet")
    parquet = raw + b"/p\xff.parquet"
    with open(parquet, "wb") as f:
        pq.write_table(pa.table({"text": ["the cat sat"]}), f)
    assert load_texts(os.fsdecode(parquet)) == ["the cat sat"]  # was: "is not a readable Parquet file"


@pytest.mark.parametrize("prefix, message", [(b"\xef\xbb\xbf", "starts with a UTF-8 byte-order mark"),
                                             (b"\xff\xfe", "is UTF-16 text")])
def test_config_json_with_a_byte_order_mark_says_so(tiny_dir, tmp_path, prefix, message, capsys):  # noqa: F811
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir / "model", folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_bytes(prefix + text.encode("utf-16-le" if prefix == b"\xff\xfe" else "utf-8"))
    code, _, err = main(["info", "--model", folder, "-q"], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1, err  # was: "not a valid JSON file"


def test_a_pickle_of_a_newer_protocol_is_refused_without_a_torch_warning(tiny_dir, tmp_path):  # noqa: F811
    import pickle
    import shutil
    import warnings

    from n2g.models import load_model

    class Call:
        def __reduce__(self):
            import os
            return (os.getcwd, ())

    folder = tmp_path / "m"
    shutil.copytree(tiny_dir / "model", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Call()}, protocol=4))
    with warnings.catch_warnings(record=True) as seen, pytest.raises(N2GError, match="never runs pickled code"):
        warnings.simplefilter("always")
        load_model(str(folder), device="cpu")
    assert not [w for w in seen if "pickle protocol" in str(w.message)]  # was a two-line UserWarning before the error


# --- audit 39: paths too long, link loops, numbers too long for Python ---------------------------------------

@pytest.mark.parametrize("argv", [
    lambda long, tmp: ["run", "--model", tmp / "no-model", "--out", long, "-q"],
    lambda long, tmp: ["info", "--model", long],
    lambda long, tmp: ["report", long],
    lambda long, tmp: ["search", long, "Paris"],
    lambda long, tmp: ["serve", long, "--port", "0"],
])
def test_a_path_too_long_for_the_file_system_is_one_line(tmp_path, capsys, argv):
    long = tmp_path / ("a" * 300)  # one name longer than any file system allows: was OSError [Errno 36]
    code, out, err = main(argv(long, tmp_path), capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert "is too long for this file system; choose another path" in err and "..." in err  # shortened
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_a_corpus_path_too_long_for_the_file_system_is_one_line(tiny_dir, tmp_path, capsys):  # noqa: F811
    long = tmp_path / ("a" * 300)
    code, out, err = main(["run", "--model", tiny_dir / "model", "--corpus", long, "--out", tmp_path / "o", "-q"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "is too long for this file system" in err, err
    assert not (tmp_path / "o").exists()


def test_report_out_as_a_link_loop_is_one_line(tmp_path, capsys):
    (tmp_path / "run.json").write_text("{}")
    (tmp_path / "loop").symlink_to("loop")
    code, _, err = main(["report", tmp_path, "--out", tmp_path / "loop"], capsys)
    assert code == 2 and len(err.splitlines()) == 1, err  # was: RuntimeError: Symlink loop
    assert "is a link that leads back to itself" in err


@pytest.mark.parametrize("name, body, where", [
    ("c.jsonl", '{"text": "the cat", "n": ' + "9" * 5000 + "}\n", "line 1 of"),
    ("c.json", '[{"text": "the cat", "n": ' + "9" * 5000 + "}]", "c.json cannot be read as JSON"),
])
def test_a_number_too_long_for_python_in_a_json_corpus_is_one_message(tmp_path, name, body, where):
    from n2g.corpus import load_texts

    path = tmp_path / name
    path.write_text(body)  # was: ValueError: Exceeds the limit (4300 digits) for integer string conversion
    with pytest.raises(N2GError, match=r"cannot be read as JSON \(Exceeds the limit \(4300 digits\)[^;]*\); ") as exc:
        list(load_texts(str(path)))
    assert where in str(exc.value) and "set_int_max_str_digits" not in str(exc.value)


def test_a_number_too_long_for_python_in_a_large_json_list_names_its_record(tmp_path, monkeypatch):
    from n2g import corpus

    monkeypatch.setattr(corpus, "TEXT_PIECE_BYTES", 64)  # read it a piece at a time, as a large file is
    path = tmp_path / "c.json"
    path.write_text('[{"text": "the cat sat on the mat"}, {"text": "x", "n": ' + "9" * 5000 + "}]")
    with pytest.raises(N2GError, match=r"is not one JSON list of records \(record 1: Exceeds the limit"):
        list(corpus.load_texts(str(path)))


def test_a_path_too_long_without_a_file_name_is_still_one_line(monkeypatch, capsys):
    import errno

    def too_long(args):
        raise OSError(errno.ENAMETOOLONG, "File name too long")  # as a library may raise it, with no filename

    monkeypatch.setattr(cli, "_info", too_long)
    code, out, err = main(["info"], capsys)
    assert code == 2 and err == "n2g: error: a path given is too long for this file system; choose another path\n"


# --- audit 32: a report copied out of a run that holds no regular file; a Ctrl-C in a finaliser ---------------------

@pytest.mark.parametrize("kind", ["pipe", "device"])
def test_a_run_holding_a_pipe_or_device_is_not_copied_for_a_report(kind, tmp_path, capsys):
    # `n2g report RUN --out COPY` read a device such as /dev/zero until the copy filled the disk, and said of a
    # pipe "choose a writable --out with enough space"
    import os
    import stat

    from helpers_run import make_run

    run = make_run(tmp_path)
    odd = run / "neurons" / "L0.N1" / "graph.png"
    if kind == "pipe":
        os.mkfifo(odd)
    else:  # /dev/null: the old copy took it for an empty file (a /dev/zero would fill the disk)
        try:
            os.mknod(odd, stat.S_IFCHR | 0o600, os.makedev(1, 3))
        except (PermissionError, OSError):
            pytest.skip("making a device node needs root")
    copy = tmp_path / "copy"
    code, out, err = main(["report", run, "--out", copy], capsys)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"n2g: error: {odd} in the run is not a regular file (a pipe, device or socket)"), err
    assert "remove it from the run" in err
    assert not copy.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".copy.")]


def test_a_ctrl_c_a_finaliser_swallows_still_stops_the_command_in_one_line(monkeypatch, capsys):
    # A SIGINT that lands while the garbage collector runs a __del__ (as torch and transformers import) was printed
    # as "Exception ignored in ... KeyboardInterrupt" with a traceback, and the command went on and exited 0
    import signal
    import time

    class Finalised:
        def __del__(self):
            raise KeyboardInterrupt  # what Python's SIGINT handler raises in whatever code runs at that moment

    def info(args):
        obj = Finalised()
        del obj
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.01)
        return 0

    monkeypatch.setattr(cli, "_info", info)
    # As in a terminal, Python's own SIGINT handler (a suite started in the background of a non-interactive
    # shell inherits SIGINT ignored, and an ignored signal cannot be delivered again)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        code, out, err = main(["info"], capsys)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert code == 130, err
    assert "Exception ignored" not in err and "Traceback" not in err, err
    assert err.splitlines() == ["n2g: interrupted"]  # info saves nothing to resume


@pytest.mark.parametrize("ids, message", [
    (torch.full((6, 8), 500), r"the corpus holds token id 500, which is not in this model's vocabulary of 128 tokens"),
    (torch.full((6, 8), -1), r"the corpus holds token id -1, which is not in this model's vocabulary"),
    (torch.ones(6, 8), r"the corpus's excerpts must be a \[n_excerpts, length\] tensor of integer token ids"),
])
def test_fit_neuron_refuses_a_corpus_cut_with_another_models_tokenizer(ids, message, tmp_path, monkeypatch):
    # a corpus from n2g.load_corpus(source, other_model) was an IndexError from the embedding lookup (a float one
    # was fitted as a dead neuron)
    from n2g.corpus import Corpus

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    with pytest.raises(N2GError, match="^" + message):
        n2g.fit_neuron(model, 0, 0, corpus=Corpus("other", 8, ids), progress=False)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["report.html", "index.sqlite", "viewer/neurons/L0.N1.html"])
def test_a_folder_where_the_report_writes_a_file_is_named_with_what_to_do(name, tmp_path, capsys):
    # was: "cannot write RUN/.report.html.123.abcd1234.tmp (Is a directory); check the disk and permissions"
    from helpers_run import make_run

    run = make_run(tmp_path)
    (run / name).mkdir(parents=True)
    code, out, err = main(["report", run], capsys)
    lines = [line for line in err.splitlines() if line.startswith("n2g: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0] == (f"n2g: error: {run / name} is a directory where the report writes a file; remove it, "
                        f"then run `n2g report {run}` again")
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")]


def test_saving_a_graph_to_a_directory_or_a_non_path_says_so(tmp_path):
    # load said "it is a directory"; save raised IsADirectoryError (and TypeError for a number) from os.replace
    from n2g.graph import NeuronGraph

    graph = NeuronGraph()
    with pytest.raises(N2GError, match=r"^cannot save the graph to .*: it is a directory; give the path of a JSON file"):
        graph.save(tmp_path)
    with pytest.raises(N2GError, match=r"^save needs a file path, not int"):
        graph.save(3)
    assert graph.save(tmp_path / "g.json") == tmp_path / "g.json"
    assert [p.name for p in tmp_path.iterdir()] == ["g.json"]


# --- audit 2: NeuronModel, preset bounds, Ray address, resumed results, serve --model, closed stdout ------------

def _planted_model():
    """A distilled "7 right after 9" feature: a fitted NeuronModel without a tokenizer."""
    feature = lambda ids: ((ids == 7) & (torch.roll(ids, 1, 1) == 9)).float()  # noqa: E731
    g = torch.Generator().manual_seed(0)
    ex = torch.randint(0, 20, (40, 16), generator=g)
    ex[:10, 3], ex[:10, 4] = 9, 7
    return feature, n2g.distill(feature, ex)


@pytest.mark.parametrize("example, message", [
    (n2g.Example([9, 7], [1.0]), r"has 2 token ids but 1 activations"),  # fit: IndexError from calibrate
    (n2g.Example([9, 7], [float("inf"), 1.0]), r"has NaN or infinite activations"),  # fit: a graph "[*] 1.00"
    (n2g.Example("ab", [1.0, 0.0]), r"token ids of shape \(\)"),  # ValueError: invalid literal for int()
    (n2g.Example([9, 7], None), r"activations of shape \(\)"),  # score: TypeError from len(None)
    (n2g.Example([[9, 7]], [[1.0, 0.0]]), r"token ids of shape \(1, 2\)"),  # score: unhashable type: 'list'
    (n2g.Example([2**70, 7], [1.0, 0.0]), r"whole numbers from 0 to"),  # score: OverflowError
    (n2g.Example([-3, 7], [1.0, 0.0]), r"whole numbers from 0 to"),  # fitted as if a token
    (n2g.Example([9, 7], ["a", "b"]), r"must be sequences of numbers"),  # ValueError: could not convert
])
def test_fit_and_score_take_examples_of_one_finite_activation_per_token_or_say_so(example, message):
    feature, fitted = _planted_model()
    with pytest.raises(N2GError, match=r"^examples\[0\] " + message if message.startswith("has") else message):
        n2g.NeuronModel(feature).fit([example])
    with pytest.raises(N2GError, match=message):
        fitted.score([example])
    with pytest.raises(N2GError, match=r"^calibration\[1\]"):
        n2g.NeuronModel(feature).fit(fitted.examples_[:3], [fitted.examples_[0], example])
    assert fitted.score(fitted.examples_).f1 == 1.0  # well-formed examples score as before


@pytest.mark.parametrize("kwargs, message", [
    ({"config": "paper"}, r"^config must be an n2g.DistillConfig"),  # AttributeError: 'str' has no batch_tokens
    ({"scale": "x"}, r"^scale must be the feature's maximum activation"),  # TypeError in fit
    ({"scale": None}, r"^scale must be"),  # TypeError in repr
    ({"sign": "negative"}, r"^sign must be 1.0"),  # ValueError in predict
    ({"sign": 0}, r"^sign must be 1.0"),  # predicted 0 everywhere
    ({"name": 5}, r"^name must be text"),  # TypeError in repr
    ({"occlusion_token_id": "a"}, r"^occlusion_token_id must be a token id"),  # TypeError in torch.full
    ({"occlusion_token_id": -1}, r"^occlusion_token_id must be a token id"),
    ({"encode": "not callable"}, r"^encode must be callable"),  # TypeError in predict(text)
    ({"substitutes": 5}, r"^substitutes must be callable"),
    ({"token_strings": 5}, r"^token_strings must be callable"),
    ({"vocab_size": "big"}, r"^vocab_size must be"),  # UFuncTypeError in predict
    ({"vocab_size": -3}, r"^vocab_size must be"),
])
def test_a_neuron_model_refuses_constructor_arguments_it_cannot_use(kwargs, message):
    feature, _ = _planted_model()
    with pytest.raises(N2GError, match=message):
        n2g.NeuronModel(feature, **kwargs)
    with pytest.raises(N2GError, match=r"^feature must be callable"):
        n2g.NeuronModel("not callable")
    model = n2g.NeuronModel(feature, scale=2, sign=-1, occlusion_token_id=torch.tensor(3).numpy()[()], vocab_size=20)
    assert (model.scale, model.sign, model.occlusion_token_id, model.vocab_size) == (2.0, -1.0, 3, 20)


@pytest.mark.parametrize("name", ["run_window", "run_max"])
def test_the_reach_of_run_questions_is_bounded(name):
    # 10**9 tried to allocate 127 GiB (MemoryError), 10**30 was numpy's "Maximum allowed size exceeded"
    from n2g.config import MAX_RUN_REACH

    for value in (10**9, 10**30):
        with pytest.raises(N2GError, match=f"^{name} must be at most {MAX_RUN_REACH}"):
            n2g.preset("default", **{name: value})
    assert getattr(n2g.preset("default", **{name: MAX_RUN_REACH}), name) == MAX_RUN_REACH


@pytest.mark.parametrize("address", ["a..b:6379", "a" * 64 + ".example:6379", "\u00e9" * 70 + ":1"])
def test_a_ray_address_no_resolver_takes_is_refused_in_one_line(address):
    # the check of the address was a UnicodeError traceback from the idna codec ("label empty or too long")
    from n2g.distributed import _reachable

    assert _reachable(address, timeout=1.0) == "not a valid host name"


def test_a_resumed_run_redoes_results_with_values_its_summary_cannot_hold(tiny_dir, tmp_path, monkeypatch, capsys,
                                                                          caplog):
    # the report skipped these files, but a resumed `n2g run` counted them done and then failed: --json with
    # "Out of range float values are not JSON compliant", the scores table with AttributeError or ArrowInvalid
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    argv = ["run", "--model", tiny_dir / "model", "--corpus", tiny_dir / "corpus.txt", "--layers", "0",
            "--neurons", "0-1", "--excerpt-length", "32", "--no-report", "-q", "--out", out, "--json"]
    code, _, err = main(argv, capsys)
    assert code == 0, err
    edits = {"L0.N0": lambda d: d.__setitem__("seconds", float("inf")),
             "L0.N1": lambda d: d.__setitem__("ceiling", [1])}
    for key, edit in edits.items():
        path = out / "neurons" / key / "result.json"
        d = json.loads(path.read_text())
        edit(d)
        path.write_text(json.dumps(d))  # Infinity, as json writes it
    code, stdout, err = main(argv, capsys)
    assert code == 0 and "Traceback" not in err, err
    summary = json.loads(stdout)
    assert summary["fitted_now"] == 2 and summary["n_neurons"] == 2
    assert "seconds is not a finite number" in caplog.text and "ceiling has a field of the wrong type" in caplog.text


def test_the_scores_parquet_takes_numbers_arrow_would_refuse():
    pa = pytest.importorskip("pyarrow")
    from n2g.store import _parquet_cell

    assert pa.array([_parquet_cell(2**62, pa.float64())], pa.float64()).to_pylist() == [float(2**62)]
    assert _parquet_cell(10**30, pa.int64()) is None and _parquet_cell(7, pa.int64()) == 7


def test_try_your_own_text_reads_no_more_tokens_than_the_models_context(tmp_path):
    # a tiny GPT-2 (128 learned positions): 300 typed tokens were an IndexError and a dropped connection
    import threading
    import urllib.request
    from urllib.parse import quote

    from helpers_run import api, make_run
    from n2g.report import build_all
    from n2g.viewer import make_server

    run = make_run(tmp_path)
    build_all(run)
    torch.manual_seed(0)
    gpt2 = SubjectModel(tiny_model("gpt2"), tiny_tokenizer(), spec="tiny-gpt2")
    server = make_server(run, "127.0.0.1", 0, model=gpt2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/api/predict?key=L0.N1&text=" + quote("the cat sat " * 100)
        with urllib.request.urlopen(api(url), timeout=60) as r:
            d = json.load(r)
        assert r.status == 200 and len(d["tokens"]) == len(d["true"]) == 127  # 128 positions, one for BOS
    finally:
        server.shutdown()
        server.server_close()


def test_serve_refuses_a_model_of_another_shape_than_the_runs(tmp_path, capsys, monkeypatch):
    # the neuron of the same index in another model was shown as the "true activation"
    import n2g.viewer
    from helpers_run import make_run
    from n2g.report import build_all

    monkeypatch.setattr(n2g.viewer, "serve", lambda *a, **k: None)  # never listen: the check comes before

    run = make_run(tmp_path)  # run.json: a llama of 2 layers x 8 neurons
    build_all(run)
    torch.manual_seed(0)
    tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer().save_pretrained(tmp_path / "gpt2")
    code, _, err = main(["serve", run, "--model", tmp_path / "gpt2", "--port", "0", "-q"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("n2g: error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert "was made with another model" in lines[0] and "architecture 'llama' there, 'gpt2' here" in lines[0]
    assert "--model toy/model" in lines[0]


def test_a_command_started_with_its_output_closed_is_one_line(tmp_path):
    # `n2g ... >&-`: Python has no sys.stdout, and the final flush was an AttributeError traceback (exit 1)
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), N2G_CACHE=str(tmp_path / "cache"))
    res = subprocess.run([sys.executable, "-m", "n2g", "search", str(tmp_path / "none"), "x"], env=env,
                         stderr=subprocess.PIPE, text=True, timeout=120, preexec_fn=lambda: os.close(1))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().startswith("n2g: error:") and len(res.stderr.strip().splitlines()) == 1


def _sae_dir(folder, **cfg):
    from test_sae import write_sae

    folder = write_sae(folder)
    d = json.loads((folder / "cfg.json").read_text())
    d.update(cfg)
    (folder / "cfg.json").write_text(json.dumps({k: v for k, v in d.items() if v is not None}))
    return folder


def test_an_sae_architecture_n2g_cannot_encode_is_refused_and_a_saelens_6_topk_is_read_as_topk(tmp_path):
    # any "architecture" but jumprelu was encoded as a ReLU SAE without a word: SAELens 6 saves a TopK SAE as
    # architecture "topk" with k beside it (and hook_name under meta), whose latents were then dense ReLUs
    from n2g.sae import SAEModel

    torch.manual_seed(0)
    base = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    v6 = SAEModel(base, _sae_dir(tmp_path / "v6", activation_fn=None, hook_name=None, architecture="topk", k=3,
                                 meta={"hook_name": "blocks.1.hook_resid_post"}))
    assert v6.topk == 3 and v6.layer == 1 and v6.info()["sae"]["activation_fn"] == "topk"
    latents = v6.layer_activations(torch.randint(4, 60, (2, 10)), None, [1])[1]
    assert int((latents > 0).sum(-1).max()) <= 3
    with pytest.raises(N2GError, match=r"SAE architecture 'gated' is not supported"):
        SAEModel(base, _sae_dir(tmp_path / "gated", architecture="gated"))
    with pytest.raises(N2GError, match=r"a topk SAE needs k"):
        SAEModel(base, _sae_dir(tmp_path / "no-k", activation_fn=None, architecture="topk"))
    with pytest.raises(N2GError, match=r"normalize_activations 'layer_norm' is not supported"):
        SAEModel(base, _sae_dir(tmp_path / "ln", normalize_activations="layer_norm"))
    plain = SAEModel(base, _sae_dir(tmp_path / "plain", architecture="standard", normalize_activations="none"))
    assert plain.topk is None and not plain.jumprelu


@pytest.mark.parametrize("name", ["scores.csv", "scores.parquet"])
def test_a_folder_where_the_scores_table_goes_is_named_with_what_to_do(name, tmp_path):
    # a scores.parquet folder was reported as "cannot write RUN/scores.csv (Is a directory); choose a writable --out"
    from helpers_run import make_run

    from n2g.store import RunStore

    run = make_run(tmp_path)
    (run / name).mkdir()
    with pytest.raises(N2GError) as err:
        RunStore(run).write_scores_table()
    assert str(err.value) == f"{run / name} is a directory where the run writes a file; remove it and re-run the same command"
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
