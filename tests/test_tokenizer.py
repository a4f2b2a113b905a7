"""The run's saved tokenizer: typed text split as the model splits it without loading the model, and a
tokenizer.json from a run folder that may come from anyone is used only when it is what n2g writes."""

from __future__ import annotations

import json
import logging
import sys

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g import tokenizer
from n2g.corpus import Corpus
from n2g.errors import N2GError
from n2g.models import SubjectModel
from n2g.pipeline import RunOptions, run
from n2g.viewer import _UNKNOWN, RunVocabulary

TEXT = "the cat  sat on\tthe mat w7"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A run of one neuron of a tiny Llama with a word-level tokenizer, and the model."""
    root = tmp_path_factory.mktemp("tokenizer")
    mp = pytest.MonkeyPatch()
    mp.setenv("N2G_CACHE", str(root / "cache"))
    try:
        torch.manual_seed(0)
        model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-words")
        corpus = Corpus("ids", 16, torch.randint(4, 60, (40, 16), generator=torch.Generator().manual_seed(0)))
        run(RunOptions(layers="1", neurons="0", out=str(root / "run"), progress=False,
                       overrides={"written": 0, "vocabulary": 0}), model=model, corpus=corpus)
    finally:
        mp.undo()
    return root / "run", model


def _main(argv, capsys):
    from n2g.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_saves_its_models_tokenizer_and_typed_text_splits_as_the_model_does(made, capsys):
    run_dir, model = made
    saved = json.loads((run_dir / "tokenizer.json").read_text())
    assert saved["kind"] == "n2g.tokenizer" and saved["token_strings"] == model.token_strings(range(model.vocab_size))
    split = tokenizer.splitter(run_dir)
    assert isinstance(split, tokenizer.RunTokenizer) and split.exact
    ids = model.encode(TEXT)
    assert split.split(TEXT) == (ids, model.token_strings(ids))
    # the run's own vocabulary, split greedily, makes the spaces tokens the model never reads
    greedy, _ = RunVocabulary(run_dir).split(TEXT)
    assert greedy != ids and _UNKNOWN in greedy
    code, out, err = _main(["predict", run_dir, TEXT, "--json", "-q"], capsys)
    assert code in (0, 1), err
    data = json.loads(out)
    assert data["token_ids"] == ids and data["tokens"] == model.token_strings(ids)
    assert data["tokenizer"] == "the model's tokenizer (tiny-llama-words), saved with the run"
    code, out, _ = _main(["predict", run_dir, TEXT], capsys)
    assert f"{len(ids)} tokens, split by the model's tokenizer (tiny-llama-words), saved with the run\n" in out


def test_the_server_splits_typed_text_with_the_saved_tokenizer(made):
    import urllib.request
    from urllib.parse import quote

    from helpers_run import api, serving

    run_dir, model = made
    with serving(run_dir) as port, urllib.request.urlopen(api(f"http://127.0.0.1:{port}/api/fires?text={quote(TEXT)}")) as r:
        d = json.load(r)
    assert d["token_ids"] == model.encode(TEXT) and d["tokenizer"].endswith("saved with the run")


def test_a_tokenizer_the_tokenizers_library_splits_otherwise_is_not_saved(tmp_path, monkeypatch):
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    assert tokenizer.definition_of(model) is not None
    real = model.encode
    monkeypatch.setattr(model, "encode", lambda text: [1, *real(text)])  # a Python side that adds to the split
    assert tokenizer.definition_of(model) is None and not tokenizer.save(tmp_path, model)
    assert not (tmp_path / "tokenizer.json").exists()
    assert tokenizer.definition_of(SubjectModel(tiny_model("llama"), None, spec="no tokenizer")) is None


def test_a_run_refused_before_its_first_neuron_leaves_no_tokenizer_behind(tmp_path):
    from n2g.store import RunStore

    store = RunStore(tmp_path / "a" / "run")
    store.open({"model": "tiny"})
    store.save_tokenizer(SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny"))
    assert (tmp_path / "a" / "run" / "tokenizer.json").is_file()
    store.discard_if_empty()
    assert not (tmp_path / "a").exists()


def _copy(run_dir, tmp_path, name="copy"):
    import shutil

    dst = tmp_path / name
    shutil.copytree(run_dir, dst, symlinks=True)
    return dst


def _unsized(run_dir):
    """run.json without its model's vocabulary size (as a hand-made or older run's may be)."""
    meta = json.loads((run_dir / "run.json").read_text())
    del meta["model"]["vocab_size"]
    (run_dir / "run.json").write_text(json.dumps(meta))


def _tamper(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def _growing(path):
    """The saved definition with forty Replace("a", "aa") normalizers: one typed "a" made 2**40 characters."""
    definition = json.loads(json.loads(path.read_text())["tokenizer"])
    definition["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"String": "a"}, "content": "aa"}] * 40}
    return json.dumps(definition)


def _growing_bytes(path):
    """The saved definition with forty ByteLevel pre-tokenizers in a row: one typed "é" made 2**40 characters."""
    definition = json.loads(json.loads(path.read_text())["tokenizer"])
    definition["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}] * 40}
    return json.dumps(definition)


def _many_steps(path):
    """The saved definition with 300 Whitespace pre-tokenizers in a row, each a pass over all typed text."""
    definition = json.loads(json.loads(path.read_text())["tokenizer"])
    definition["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}] * 300}
    return json.dumps(definition)


def _renamed(path, keep_bos: bool):
    """The saved display strings as another model with as many tokens would have them: the run's BOS token's kept,
    or only it changed."""
    strings = json.loads(path.read_text())["token_strings"]
    bos = json.loads((path.parent / "run.json").read_text())["model"]["bos_token_id"]
    if keep_bos:
        return [s if i == bos else f"other{i}" for i, s in enumerate(strings)]
    return [s if i != bos else "<s>" for i, s in enumerate(strings)]


@pytest.mark.parametrize("damage, says", [
    (lambda p: p.write_text("not json"), "Expecting value"),
    (lambda p: _tamper(p, kind="something.else"), "not a tokenizer n2g saves"),
    (lambda p: _tamper(p, schema_version=99), "upgrade n2g"),
    (lambda p: _tamper(p, tokenizer="{}"), "cannot use"),
    (lambda p: _tamper(p, token_strings=[1, 2]), "not a tokenizer n2g saves"),
    (lambda p: _tamper(p, token_strings=["x" * 1025] * 68), "a token's text is longer than 1,024 characters"),
    (lambda p: _tamper(p, model="x" * 4097), "its model name is longer than 4,096 characters"),
    (lambda p: (p.unlink(), p.symlink_to("/etc/hostname")), "leads out of the run"),
    (lambda p: _tamper(p, tokenizer=_growing(p)), "its normalizers and pre-tokenizers can make typed text"),
    (lambda p: _tamper(p, tokenizer=_growing_bytes(p)), "its normalizers and pre-tokenizers can make typed text"),
    (lambda p: _tamper(p, tokenizer=_many_steps(p)), "it chains 300 normalizers and pre-tokenizers"),
    (lambda p: _tamper(p, token_strings=["a"] * 200), "it lists 200 tokens, but the run's model has 128"),
    (lambda p: _tamper(p, token_strings=_renamed(p, True)), "tokens the run's pages show have other texts in it"),
    (lambda p: _tamper(p, token_strings=_renamed(p, False)), "but the run's model begins text with"),
], ids=["not json", "other kind", "newer", "broken definition", "bad strings", "long strings", "long model name", "link out", "growing normalizers",
        "growing pre-tokenizers", "many steps", "another model's", "another model's, as many tokens", "another BOS"])
def test_a_tokenizer_json_n2g_did_not_write_is_not_used(made, tmp_path, caplog, damage, says):
    run_dir, _ = made
    copy = _copy(run_dir, tmp_path)
    damage(copy / "tokenizer.json")
    with caplog.at_level(logging.WARNING):
        split = tokenizer.splitter(copy)
    assert isinstance(split, RunVocabulary) and not split.exact
    assert "splitting typed text by the run's own vocabulary" in caplog.text and says in caplog.text


def test_the_normalizers_of_real_tokenizers_are_within_the_growth_bound():
    import base64
    import struct

    llama = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "\u2581"},
                                                 {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    bert = {"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True, "lowercase": True}
    charsmap = base64.b64encode(struct.pack("<I", 8) + bytes(8) + "\u30ad\u30ed\0a\0".encode()).decode()
    for normalizer in (None, llama, bert, {"type": "NFKC"}, {"type": "Precompiled", "precompiled_charsmap": charsmap},
                       {"type": "Sequence", "normalizers": [{"type": "NFKC"}, llama]}):
        assert tokenizer._growth(normalizer) <= tokenizer.MAX_GROWTH
    smollm2 = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                     {"type": "ByteLevel", "add_prefix_space": False}]}
    metaspace = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    assert tokenizer._growth(smollm2) * tokenizer._growth(metaspace) * tokenizer._growth(bert) <= tokenizer.MAX_GROWTH
    long = base64.b64encode(struct.pack("<I", 0) + b"x" * 5000 + b"\0").decode()  # a character made 5,000
    assert tokenizer._growth({"type": "Precompiled", "precompiled_charsmap": long}) > tokenizer.MAX_GROWTH


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
def test_a_run_interrupted_before_its_first_neuron_leaves_no_run_folder(tmp_path, monkeypatch, stop):
    # Ctrl-C (or SIGTERM) during the scan left run.json and tokenizer.json: the same command with other options
    # was then refused ("holds a run made with a different ...; choose another --out")
    from n2g import pipeline

    def interrupted(*args, **kwargs):
        raise stop()

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pipeline, "fit_neurons", interrupted)
    torch.manual_seed(0)
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-words")
    corpus = Corpus("ids", 16, torch.randint(4, 60, (40, 16), generator=torch.Generator().manual_seed(0)))
    with pytest.raises(stop):
        run(RunOptions(layers="1", neurons="0", out=str(tmp_path / "new" / "run"), progress=False,
                       overrides={"written": 0, "vocabulary": 0}), model=model, corpus=corpus)
    assert not (tmp_path / "new").exists()


def test_ids_past_the_saved_table_are_unknown_tokens(made, tmp_path):
    run_dir, model = made
    copy = _copy(run_dir, tmp_path)
    _tamper(copy / "tokenizer.json", token_strings=model.token_strings(range(5)))  # ids 0-4 only
    _unsized(copy)  # a run.json that cannot say how many tokens the model has
    ids, toks = tokenizer.splitter(copy).split("the cat")
    assert ids == [4, _UNKNOWN] and toks == ["the", "cat"]


def test_a_pattern_past_its_matching_budget_is_one_line(made, tmp_path, capfd):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    run_dir, _ = made
    copy = _copy(run_dir, tmp_path)
    hostile = Tokenizer(models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>"))
    hostile.pre_tokenizer = pre_tokenizers.Split(Regex("(a+)+$"), behavior="isolated")  # backtracks without end
    _tamper(copy / "tokenizer.json", tokenizer=hostile.to_str())
    split = tokenizer.splitter(copy)
    assert split.split("b a")[0] == [1, 0]  # ordinary text is split ("b " unknown, then "a")
    capfd.readouterr()
    with pytest.raises(N2GError, match=r"^the run's tokenizer .* cannot split this text .*pass --model"):
        split.split("a" * 40 + "!")
    assert capfd.readouterr().err == ""  # the Rust panic's message and backtrace are not shown
    print("still written", file=sys.stderr)  # and the error stream works as before
    assert capfd.readouterr().err == "still written\n"


def test_predict_shows_control_characters_of_the_saved_model_name(made, tmp_path, capsys):
    run_dir, _ = made
    copy = _copy(run_dir, tmp_path)
    _tamper(copy / "tokenizer.json", model="tiny\x1b]0;title\x07\u202eevil")  # a run folder from anyone
    code, out, err = _main(["predict", copy, "the cat"], capsys)
    assert "\x1b" not in out + err and "\u202e" not in out + err
    assert "split by the model's tokenizer (tiny\\x1b]0;title\\x07\\u202eevil), saved with the run" in out


@pytest.mark.slow
def test_the_packaged_models_tokenizer_is_saved_and_splits_as_the_model(smollm2, tmp_path):
    from n2g.corpus import load_texts

    assert tokenizer.save(tmp_path, smollm2)
    split = tokenizer.splitter(tmp_path)
    assert split.split(" in Paris") == (smollm2.encode(" in Paris"), [" in", " Paris"])
    for text in load_texts("default")[:10]:
        text = text[:4000]
        ids = smollm2.encode(text)
        assert split.split(text) == (ids, smollm2.token_strings(ids))


def test_a_loaded_neuron_reads_text_with_the_saved_tokenizer(made, tmp_path):
    import n2g

    run_dir, model = made
    neuron = n2g.load_neuron(run_dir, "L1.N0")
    ids = model.encode(TEXT)
    assert neuron.tokenize(TEXT) == ids
    assert [t for t, _ in neuron.predict_tokens(TEXT)] == model.token_strings(ids)
    assert neuron.predict(TEXT).tolist() == neuron.predict(ids).tolist()
    copy = _copy(run_dir, tmp_path)
    (copy / "tokenizer.json").unlink()  # a run made before n2g saved it: token ids only
    with pytest.raises(N2GError, match="has no tokenizer"):
        n2g.load_neuron(copy, "L1.N0").predict(TEXT)
    _copy(run_dir, tmp_path, "short")
    _tamper(tmp_path / "short" / "tokenizer.json", token_strings=model.token_strings(range(5)))
    _unsized(tmp_path / "short")
    with pytest.raises(N2GError, match="past its own table of 5 tokens for 'cat'"):
        n2g.load_neuron(tmp_path / "short", "L1.N0").predict("the cat")
    (tmp_path / "short" / "tokenizer.json").write_text("{}")  # damaged: read when first used, and said so then
    damaged = n2g.load_neuron(tmp_path / "short", "L1.N0")
    with pytest.raises(N2GError, match="tokenizer.json cannot be used .* pass token ids, or give it the run's model"):
        damaged.predict("the cat")
    assert damaged.predict(ids).shape == (len(ids),)
    import pickle

    again = pickle.loads(pickle.dumps(neuron))  # the run's path travels, not the tokenizer; read again there
    assert again.tokenize(TEXT) == ids and neuron.encode.__self__._loaded is not None


def test_a_neuron_loaded_from_a_relative_path_reads_text_after_a_change_of_directory(made, tmp_path, monkeypatch):
    import pickle

    import n2g

    run_dir, model = made
    copy = _copy(run_dir, tmp_path)
    monkeypatch.chdir(tmp_path)
    pickled = pickle.dumps(n2g.load_neuron("copy", "L1.N0"))  # a relative path, as typed
    monkeypatch.chdir(tmp_path.parent)
    assert pickle.loads(pickled).tokenize(TEXT) == model.encode(TEXT)
    gone = pickle.loads(pickled)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(N2GError, match="tokenizer.json is gone, so the neuron cannot read text"):
        gone.tokenize(TEXT)



def _words_tokenizer(backend=None, **kwargs):
    """tiny_tokenizer()'s words around ``backend`` (its own by default), in the transformers class."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend or tiny_tokenizer().backend_tokenizer, bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", pad_token="<pad>", **kwargs)


def test_truncation_and_padding_in_the_definition_are_not_saved(tmp_path):
    # a tokenizer.json may set them (the Python side applies them only when asked, and model.encode never asks):
    # saved as they were, typed text past max_length was cut short and a short one padded, though the probes agreed
    backend = tiny_tokenizer().backend_tokenizer
    backend.enable_truncation(max_length=len(tokenizer.PROBES[0]))
    backend.enable_padding(length=4, pad_id=3, pad_token="<pad>")
    with_both = backend.to_str()
    model = SubjectModel(tiny_model("llama"), _words_tokenizer(backend), spec="tiny")
    assert tokenizer.save(tmp_path, model)  # before the model encodes anything, as with a cached corpus
    long, short = " ".join(["the cat sat on the mat"] * 20), "cat"
    assert len(model.encode(long)) == 120 and model.encode(short) == [5]
    split = tokenizer.splitter(tmp_path)
    assert split.split(long)[0] == model.encode(long) and split.split(short)[0] == [5]
    _tamper(tmp_path / "tokenizer.json", tokenizer=with_both)  # a file saved with them (by an n2g before this fix)
    split = tokenizer.splitter(tmp_path)
    assert isinstance(split, tokenizer.RunTokenizer)
    assert split.split(long)[0] == model.encode(long) and split.split(short)[0] == [5]


def test_a_model_that_splits_its_special_tokens_is_not_saved():
    # split_special_tokens=True: the Python side reads "<bos>" typed in text as characters; the tokenizers
    # library's definition does not carry that flag, so its twin would read it as the special token
    assert tokenizer.definition_of(SubjectModel(tiny_model("llama"), _words_tokenizer(), spec="tiny")) is not None
    model = SubjectModel(tiny_model("llama"), _words_tokenizer(split_special_tokens=True), spec="tiny")
    assert model.encode("the <bos> cat") != [4, 1, 5]
    assert tokenizer.definition_of(model) is None


def test_text_that_is_not_unicode_is_one_line(made):
    split = tokenizer.splitter(made[0])
    for bad, says in (("a\ud800b", "not valid Unicode"), (b"the cat", "must be one string")):
        with pytest.raises(N2GError, match=says):
            split.split(bad)
        with pytest.raises(N2GError, match=says):
            split.encode(bad)


def test_a_tokenizer_past_the_limits_loading_keeps_is_not_saved(tmp_path, monkeypatch):
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    monkeypatch.setattr(tokenizer, "MAX_TOKEN_STRING", 3)  # "<bos>", "<unk>" ... are longer
    assert not tokenizer.save(tmp_path, model) and not (tmp_path / "tokenizer.json").exists()
    monkeypatch.undo()
    assert tokenizer.save(tmp_path, model) and tokenizer.RunTokenizer.load(tmp_path) is not None
