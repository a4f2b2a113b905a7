"""The Python API: n2g.load_corpus / fit_neuron on a tiny model, readable graphs, predict on text, score on arrays."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import pickle
import random
import shutil

import numpy as np
import pytest
import torch

import n2g
from n2g.features import NeuronFeature
from n2g.score import score_arrays

WORDS = ["the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(20)]


@pytest.fixture(scope="module")
def subject():
    from conftest import tiny_model, tiny_tokenizer
    from n2g.models import SubjectModel

    torch.manual_seed(0)
    return SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-api")


@pytest.fixture(scope="module")
def fitted(subject, tmp_path_factory):
    """One neuron of a tiny model fitted once for the module, its scan cached in a fresh cache."""
    root = tmp_path_factory.mktemp("api")
    rng = random.Random(0)
    path = root / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(60)))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("N2G_CACHE", str(root / "cache"))
        corpus = n2g.load_corpus(str(path), subject, length=16)
        model = n2g.fit_neuron(subject, 1, 5, corpus=corpus, progress=False)
    return model, corpus, root / "cache"


def test_fit_neuron_returns_a_fitted_model_with_token_text(fitted, subject):
    model, corpus, _ = fitted
    assert len(corpus) == 150 and corpus.excerpts.shape[1] == 16
    assert model.status_ == "fitted" and model.neuron_ == n2g.NeuronId(1, 5)
    assert set(model.scores_) >= {"n2g", "token_lookup", "ngram", "zero"}
    graph = model.graph_
    vocab = {w for w in subject.tokenizer.get_vocab() if not w.startswith("<")}  # words, not <pad> or <bos>
    # The corpus's words, and vocabulary words the embedding variants found firing; never a placeholder.
    assert graph.tokens() and all(graph.token_text[t] in vocab for t in graph.tokens()), "graph carries token text"
    text = str(graph)
    assert text.startswith("NeuronGraph L1.N5:") and "object at" not in text
    lines = text.splitlines()[2:]
    assert len(lines) == len(graph.paths()) and all("[" in ln and "]" in ln for ln in lines)
    assert any(w in text for w in WORDS)
    r = repr(model)
    assert r.startswith("NeuronModel L1.N5 (fitted; test firing F1") and "NeuronGraph L1.N5" in r
    assert model.scale == pytest.approx(model.stats_.max_activation)


def test_predict_accepts_text_and_matches_ids(fitted, subject):
    model, _, _ = fitted
    text = "the cat sat on the mat w1 sat w16"
    ids = subject.encode(text)
    by_text = model.predict(text)
    assert by_text.shape == (len(ids),)
    np.testing.assert_allclose(by_text, model.predict(ids))
    np.testing.assert_allclose(model.predict(torch.tensor([ids]))[0], by_text)
    pairs = model.predict_tokens(text)
    assert [t for t, _ in pairs] == text.split() and [v for _, v in pairs] == pytest.approx(by_text.tolist())
    # on the raw scale: the normalised prediction times the neuron's maximum
    np.testing.assert_allclose(by_text, model.predict_normalised(ids) * model.scale, rtol=1e-6)


@pytest.mark.parametrize("bad, message", [
    ([], "no tokens to predict on"),
    ("", "the text has no tokens"),
    ([[1, 2], [3]], "different lengths"),
    ([1.5, 2.0], "must be integers"),
    (["a", "b"], "one string at a time"),
    ([-1, 4], "non-negative"),
    (np.zeros((1, 2, 3), int), "one sequence"),
    ([4, 10**6], "token id 1000000 is beyond the subject model's vocabulary"),  # was predicted 0, silently
])
def test_predict_bad_input_raises_n2gerror_with_advice(fitted, bad, message):
    model, _, _ = fitted
    with pytest.raises(n2g.N2GError, match=message):
        model.predict(bad)


def same(a, b):
    for k, v in dataclasses.asdict(b).items():
        got = getattr(a, k)
        assert got == v if isinstance(v, (str, int, type(None))) else got == pytest.approx(v, rel=1e-6), k


def test_score_accepts_plain_arrays_and_agrees_with_examples(fitted, subject):
    model, corpus, _ = fitted
    ids = corpus.excerpts[:6]
    raw = NeuronFeature(subject, 1, 5)(ids)
    s = model.score(ids, raw)
    expect = score_arrays(list((raw / model.scale).numpy()), list(model.predict_normalised(ids)), 0.5)
    same(s, expect)
    same(model.score(ids.numpy(), raw.numpy().tolist()), expect)
    test = [e for e in model.examples_ if e.split == "test"]
    assert model.score(test) == model.scores_["n2g"], "score(examples) reproduces the stored test score"
    with pytest.raises(n2g.N2GError, match="one activation per token"):
        model.score(ids, raw[:, :3])
    with pytest.raises(n2g.N2GError, match="NaN"):
        model.score(ids, torch.full(ids.shape, float("nan")))
    with pytest.raises(n2g.N2GError, match="list of n2g.Example"):
        model.score(ids)


def test_histogram_and_band_examples_come_from_the_scan(fitted):
    model, corpus, _ = fitted
    h = model.result_.histogram
    assert sum(h["counts"]) == h["n_tokens"] == corpus.excerpts.numel(), "every stored token counted once"
    assert h["edges"][-1] >= 1.0 and len(h["edges"]) == len(h["counts"]) + 1
    bands = h["bands"]
    assert [(b["q_lo"], b["q_hi"]) for b in bands] == [(0.99, 1.0), (0.9, 0.99), (0.5, 0.9), (0.0, 0.5)]
    assert [b["n_excerpts"] for b in bands] == [2, 13, 60, 75], "each band holds its share of the 150 excerpts"
    assert all(bands[k]["lo"] >= bands[k + 1]["hi"] for k in range(3)), "bands are ordered by peak activation"
    assert bands[0]["hi"] == pytest.approx(1.0, abs=2e-3)
    shown = {e.excerpt_index for e in model.examples_}
    by_band = {f"band {b['q_lo']:g}-{b['q_hi']:g}": b for b in bands}
    assert len(model.result_.band_examples) == 8
    for e in model.result_.band_examples:
        b = by_band[e.source]
        assert b["lo"] - 1e-4 <= max(e.activations) <= b["hi"] + 1e-4
        assert e.tokens and e.predicted is not None
        if b["q_hi"] <= 0.9:  # bands with plenty of excerpts show ones not already shown as train/test examples
            assert e.excerpt_index not in shown


def test_fit_neuron_takes_a_store_budget(subject, monkeypatch, tmp_path):
    rng = random.Random(1)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(400)))
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    corpus = n2g.load_corpus(str(path), subject, length=16)
    assert len(corpus) > 300
    model = n2g.fit_neuron(subject, 1, 5, corpus=corpus, progress=False, store_tokens=16 * 250)
    assert model.result_ is not None
    stores = list((tmp_path / "cache" / "scans").glob("*.acts.npy"))
    assert len(stores) == 1 and np.load(stores[0], mmap_mode="r").shape[1] == 250  # the budget's excerpts


def test_fit_neuron_reuses_the_cached_scan(fitted, subject, caplog, monkeypatch):
    _, corpus, cache = fitted
    monkeypatch.setenv("N2G_CACHE", str(cache))
    with caplog.at_level(logging.INFO, logger="n2g.scan"):
        again = n2g.fit_neuron(subject, 1, 5, corpus=corpus, progress=False)
    assert any("scan loaded from cache" in r.message for r in caplog.records)
    assert str(again.graph_) == str(fitted[0].graph_)


def test_notebook_display_shows_graph_and_scores(fitted):
    model, _, _ = fitted
    page = model._repr_html_()
    assert "firing F1" in page and "token lookup" in page and "maximum activation" in page
    if shutil.which("dot"):
        assert "<svg" in page


def test_notebook_display_escapes_token_text():
    feature = lambda ids: (ids == 7).float()
    model = n2g.distill(feature, [[1, 7, 2, 7, 3, 4]] * 8 + [[5, 6, 1, 2, 3, 4]] * 8)
    model.graph_.token_text[7] = "<script>alert(1)</script>"
    page = model._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_notebook_display_of_an_unfitted_model_says_so():
    page = n2g.NeuronModel(lambda ids: ids.float())._repr_html_()
    assert "Not fitted yet" in page and "predicts 0 everywhere" not in page


def test_notebook_display_of_a_negative_side_gives_the_extreme_its_predictions_are_scaled_to():
    # predict() returns normalised x scale x sign: on the negative side the raw scale it names is below 0
    model = n2g.NeuronModel(lambda ids: -ids.float(), scale=2.0, sign=-1.0)
    page = model._repr_html_()
    assert "most negative activation -2.0000 (raw; predictions are on this scale)" in page and "maximum" not in page
    page = n2g.NeuronModel(lambda ids: ids.float(), scale=2.0)._repr_html_()
    assert "maximum activation 2.0000 (raw; predictions are on this scale)" in page


@pytest.mark.skipif(shutil.which("dot") is None, reason="needs Graphviz")
def test_notebook_drawing_of_a_negative_side_says_its_activations_are_normalised_to_its_most_negative_value():
    # the page's drawing of a .neg neuron says so (graph.json names its side); the notebook's drawing said
    # "normalised to the neuron's maximum" under the text "most negative activation -0.5"
    feature = lambda ids: -(ids == 5).float() / 2
    model = n2g.distill(feature, [[4, 5, 6, 7, 4, 8]] * 6 + [[4, 6, 7, 8]] * 6, sign="negative")
    page = model._repr_html_()
    assert "<svg" in page and "most negative value on the scanned corpus" in page
    assert "normalised to the neuron&#39;s maximum" not in page and "normalised to the neuron's maximum" not in page
    positive = n2g.distill(lambda ids: (ids == 5).float() / 2, [[4, 5, 6, 7, 4, 8]] * 6 + [[4, 6, 7, 8]] * 6)
    assert "most negative value" not in positive._repr_html_()


def test_printed_negative_side_gives_the_extreme_its_predictions_are_scaled_to():
    # print(model) named the negative side's extreme 'maximum activation 0.5' beside predictions below 0
    feature = lambda ids: -(ids == 5).float() / 2  # "cat": -0.5, else 0
    model = n2g.distill(feature, [[4, 5, 6, 7, 4, 8]] * 6 + [[4, 6, 7, 8]] * 6, sign="negative")
    assert model.predict([4, 5, 6]) == pytest.approx([0.0, -0.5, 0.0], abs=0.01)
    assert repr(model).splitlines()[0].endswith("; most negative activation -0.5)") and "maximum" not in repr(model)
    positive = n2g.distill(lambda ids: (ids == 5).float() / 2, [[4, 5, 6, 7, 4, 8]] * 6 + [[4, 6, 7, 8]] * 6)
    assert str(positive).splitlines()[0].endswith("; maximum activation 0.5)")


def test_a_dead_feature_is_never_printed_with_the_stand_in_scale_as_its_maximum():
    # A feature that never fires held the stand-in scale 1, printed as "dead; maximum activation 1"; the negative
    # side of a feature that is 3 everywhere as "most negative activation -1".
    excerpts = [[4, 5, 6, 7, 8, 9]] * 4 + [[9, 8, 7, 6]] * 4
    for feature, sign, said in [(lambda ids: torch.zeros(ids.shape), "positive", "never goes above 0"),
                                (lambda ids: torch.full(ids.shape, 3.0), "negative", "never goes below 0")]:
        model = n2g.distill(feature, excerpts, sign=sign)
        assert model.status_ == "dead"
        assert repr(model).splitlines()[0].endswith(f"(dead; it {said} on its excerpts)")
        page = model._repr_html_()
        assert f"it {said} on its excerpts" in page and "activation 1" not in page and "activation -1" not in page


@pytest.mark.parametrize("call, message", [
    (lambda m: n2g.fit_neuron(m, 99, 0, progress=False), "does not exist"),
    (lambda m: n2g.fit_neuron(m, 0, 0, sign="both", progress=False), "call fit_neuron twice"),
    (lambda m: n2g.fit_neuron(m, 0, 0, preset="best", progress=False), "unknown preset"),
    (lambda m: n2g.fit_neuron(m, "0", 0, progress=False), "layer must be an integer"),
    (lambda m: n2g.fit_neuron(m, np.int64(99), np.int64(0), progress=False), "does not exist"),  # NumPy ints are ints
    (lambda m: n2g.fit_neuron(m, 0, 0, corpus=42, progress=False), "corpus must be"),
    (lambda m: n2g.fit_neuron(m, 0, 0, store_tokens=0, progress=False), "store_tokens must be"),
    (lambda m: n2g.fit_neuron(m, 0, 0, store_tokens=2.5, progress=False), "store_tokens must be"),
    (lambda m: n2g.fit_neuron(42, 0, 0, progress=False), "model must be"),
    (lambda m: n2g.load_corpus("default", m, length=0), "length must be"),
    (lambda m: n2g.fit_neuron(m, 0, 0, preset=["paper"], progress=False), "unknown preset"),  # was unhashable TypeError
    (lambda m: n2g.fit_neuron(m, 0, 0, corpus="", progress=False), "source must be"),  # was the default corpus
    (lambda m: n2g.load_corpus("", m), "source must be"),  # was every text file under the working directory
    (lambda m: n2g.load_corpus("default", m, max_excerpts=True), "max_excerpts must be"),
    (lambda m: n2g.load_corpus("default", m, text_field=None), "text_field must be"),
    (lambda m: n2g.load_model(""), "model spec must be"),  # was "." (the working directory) as a model
    (lambda m: n2g.load_model(None), "model spec must be"),  # was a hub lookup of 'None'
    (lambda m: n2g.distill(n2g.feature_from_hook(lambda ids: [[1, 2], [3]]), [[1, 2, 3]] * 4),
     "run_with_hook returned list"),  # was torch's ValueError from inside the adapter
])
def test_api_bad_input_says_what_to_do(tiny_llama, call, message):
    with pytest.raises(n2g.N2GError, match=message):
        call(tiny_llama)


def test_distilled_feature_without_tokenizer_refuses_text():
    model = n2g.distill(lambda ids: (ids == 7).float(), [[1, 7, 2, 7, 3, 4]] * 8 + [[5, 6, 1, 2, 3, 4]] * 8)
    assert model.predict([1, 7]).tolist() == pytest.approx([0.0, 1.0])
    with pytest.raises(n2g.N2GError, match="has no tokenizer"):
        model.predict("seven")
    with pytest.raises(n2g.N2GError, match="not fitted"):
        n2g.NeuronModel(lambda ids: ids.float()).predict([1, 2])


def test_hook_adapter_turns_a_forward_hook_into_a_feature(tiny_llama):
    """The README's adapter pattern: capture an MLP's input to down_proj with a hook, distil it."""
    hf = tiny_llama.model
    down = hf.model.layers[1].mlp.down_proj

    def run_with_hook(token_ids):
        seen = {}
        handle = down.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0][..., 5]))
        try:
            bos = torch.full((token_ids.shape[0], 1), tiny_llama.bos_token_id)
            hf(torch.cat([bos, token_ids], 1))
        finally:
            handle.remove()
        return seen["x"][:, 1:]

    feature = n2g.feature_from_hook(run_with_hook)
    ids = torch.randint(4, 60, (3, 12))
    np.testing.assert_allclose(feature(ids).numpy(), NeuronFeature(tiny_llama, 1, 5)(ids).numpy(), rtol=1e-5, atol=1e-6)
    model = n2g.distill(feature, torch.randint(4, 60, (40, 12)))
    assert model.status_ == "fitted" and model.scores_["n2g"].n_tokens > 0
    assert not down._forward_pre_hooks, "no hook leaks"


def test_fit_neuron_agrees_with_the_pipeline(fitted, subject, tmp_path, monkeypatch):
    """n2g.fit_neuron and `n2g fit` (the pipeline) make the same graph and scores from the same inputs."""
    from n2g.pipeline import RunOptions, run

    model, corpus, cache = fitted
    monkeypatch.setenv("N2G_CACHE", str(cache))
    summary = run(RunOptions(layers="1", neurons="5", out=str(tmp_path / "run"), progress=False, report=False),
                  model=subject, corpus=corpus)
    (stored,) = summary.results
    assert stored.scores == model.scores_ and stored.stats == model.stats_
    assert stored.histogram == model.result_.histogram
    graph = n2g.NeuronGraph.load(tmp_path / "run" / "neurons" / "L1.N5" / "graph.json")
    assert str(graph) == str(model.graph_)


def test_a_fitted_neuron_fitted_again_on_its_own_examples_uses_the_settings_it_was_fitted_with(fitted, subject, monkeypatch):
    """fit_neuron fits with the settings that need the tokenizer filled in (``occlusion_text`` as its token id,
    sentence ends), but the returned model kept the config without them, so ``fit(...)`` on its own training
    examples occluded with the model's default token instead and made another graph."""
    _, corpus, cache = fitted
    monkeypatch.setenv("N2G_CACHE", str(cache))
    model = n2g.fit_neuron(subject, 2, 7, corpus=corpus, preset="paper", occlusion_text="the", progress=False)
    assert model.config.occlusion_token_id == subject.encode("the")[0] != subject.occlusion_token_id
    ids = [e.token_ids for e in model.examples_]
    before, nodes = [model.graph_.predict_sequence(i) for i in ids], len(model.graph_.nodes)
    model.fit([e for e in model.examples_ if e.split == "train" and e.source == "top"],
              [e for e in model.examples_ if e.split == "train" and e.source == "random"])
    assert len(model.graph_.nodes) == nodes
    assert all(np.array_equal(a, model.graph_.predict_sequence(i)) for a, i in zip(before, ids))


def test_excerpts_of_one_token_are_allowed_from_python_as_from_the_cli(tiny_llama):
    corpus = n2g.load_corpus("default", tiny_llama, length=1, max_excerpts=5)
    assert corpus.excerpts.shape == (5, 1)


@pytest.fixture(scope="module")
def both_sides_run(fitted, subject, tmp_path_factory):
    """The fitted neuron's run folder (both sides, as `n2g run --sign both` writes it) and the models fit_neuron made."""
    from n2g.pipeline import RunOptions, run

    _, corpus, cache = fitted
    out = tmp_path_factory.mktemp("sides") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("N2G_CACHE", str(cache))
        run(RunOptions(layers="1", neurons="5", sign="both", out=str(out), progress=False, report=False),
            model=subject, corpus=corpus)
        fits = {s: n2g.fit_neuron(subject, 1, 5, corpus=corpus, sign=s, progress=False) for s in ("positive", "negative")}
    return out, fits


@pytest.mark.parametrize("sign, key", [("positive", "L1.N5"), ("negative", "L1.N5.neg")])
def test_a_loaded_neuron_behaves_as_the_one_fit_neuron_made(both_sides_run, subject, sign, key):
    out, fits = both_sides_run
    fit = fits[sign]
    ids = np.array([e.token_ids for e in fit.examples_ if e.split == "test"])
    for model in (None, subject):
        loaded = n2g.load_neuron(out, key, model=model)
        assert (loaded.scale, loaded.sign, loaded.name) == (fit.scale, fit.sign, fit.name)
        assert loaded.scores_ == fit.scores_ and loaded.stats_ == fit.stats_ and loaded.examples_ == fit.examples_
        assert str(loaded) == str(fit)
        # graph.json holds END values to 6 decimals (never across the firing threshold): the same predictions to that
        np.testing.assert_allclose(loaded.predict(ids), fit.predict(ids), rtol=0, atol=1e-6 * fit.scale)
        assert (loaded.predict_normalised(ids) >= 0.5).tolist() == (fit.predict_normalised(ids) >= 0.5).tolist()
        assert np.sign(loaded.predict(ids)).tolist() == np.sign(fit.predict(ids)).tolist()
    np.testing.assert_allclose(loaded.predict("the cat sat on the mat"), fit.predict("the cat sat on the mat"),
                               rtol=0, atol=1e-6 * fit.scale)


def test_a_loaded_neuron_whose_graph_a_newer_n2g_wrote_says_to_upgrade(both_sides_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(both_sides_run[0], out)
    path = out / "neurons" / "L1.N5" / "graph.json"
    saved = json.loads(path.read_text())
    from n2g.graph import GRAPH_SCHEMA_VERSION

    path.write_text(json.dumps({**saved, "schema_version": GRAPH_SCHEMA_VERSION + 1}))
    with pytest.raises(n2g.N2GError, match="is newer than this n2g .*; upgrade n2g$"):
        n2g.load_neuron(out, "L1.N5")  # said "fit it there with `n2g run ...`", which would overwrite the newer run's
    path.write_text("{")
    with pytest.raises(n2g.N2GError, match=r"^cannot read graph .*graph\.json: JSONDecodeError"):
        n2g.load_neuron(out, "L1.N5")


def test_a_run_a_newer_n2g_wrote_is_neither_added_to_nor_read(both_sides_run, subject, fitted, tmp_path, monkeypatch, capsys):
    from n2g import cli
    from n2g.pipeline import RunOptions, run
    from n2g.records import NeuronResult

    out = tmp_path / "run"
    shutil.copytree(both_sides_run[0], out)
    meta = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**meta, "schema_version": meta["schema_version"] + 1}))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    upgrade = r"was written by a newer n2g \(schema 2; this one reads up to 1\): upgrade n2g to "
    with pytest.raises(n2g.N2GError, match=upgrade + "add to it, or choose another --out$"):
        monkeypatch.setenv("N2G_CACHE", str(fitted[2]))  # resuming it wrote this n2g's results beside the newer ones
        run(RunOptions(layers="1", neurons="4,5", out=str(out), progress=False, report=False), model=subject, corpus=fitted[1])
    with pytest.raises(n2g.N2GError, match=upgrade + "read it$"):
        n2g.load_neuron(out, "L1.N5")
    for command in (["report", str(out)], ["report", str(out), "--out", str(tmp_path / "copy")], ["search", str(out), "the"],
                    ["predict", str(out), "the cat"], ["serve", str(out), "--port", "0"], ["compare", str(out), str(out)]):
        assert cli.main(command) == 2, command  # each read the run's files as this n2g's (report wrote pages of them)
        assert capsys.readouterr().err.strip().endswith("upgrade n2g to read it"), command
    assert not (tmp_path / "copy").exists()
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before, "nothing written"
    result = json.loads((out / "neurons" / "L1.N5" / "result.json").read_text())
    with pytest.raises(ValueError, match=r"^written by a newer n2g \(schema 2; .*upgrade n2g$"):
        NeuronResult.from_dict({**result, "schema_version": 2})
    NeuronResult.from_dict(result)


@pytest.mark.parametrize("text", [["the", "cat"], 123, None, b"the cat"])
def test_text_for_the_tokenizer_must_be_one_string(fitted, text):
    # a list of words was a TypeError from inside the tokenizer; a number or bytes "cannot encode the text ... check
    # its tokenizer files", as if the tokenizer were damaged
    model, _, _ = fitted
    for call in (model.tokenize, model.predict_tokens):
        with pytest.raises(n2g.N2GError, match=r"^text must be one string \(got (list|int|NoneType|bytes)\); for token ids call"):
            call(text)
    assert [t for t, _ in model.predict_tokens("the cat")] == ["the", "cat"]


def test_a_neuron_id_takes_its_sign_as_text_and_refuses_what_is_no_neuron():
    neuron = n2g.NeuronId(1, 2, "negative")  # as fit_neuron and distill take the sign; to_dict() was an AttributeError
    assert neuron.sign is n2g.Sign.NEGATIVE and neuron == n2g.NeuronId.from_key("L1.N2.neg")
    assert neuron.to_dict() == {"layer": 1, "index": 2, "sign": "negative"}
    assert json.dumps(n2g.NeuronId(np.int64(3), np.int32(4)).to_dict()) == '{"layer": 3, "index": 4, "sign": "positive"}'
    for args, message in (((1, 2, "both"), "sign must be 'positive' or 'negative'"),  # was taken, keyed L1.N2
                          ((-1, 2), "layer must be a whole number of 0 or more"),  # was keyed L-1.N2, which no key reads
                          ((1, 2.5), "index must be a whole number of 0 or more")):
        with pytest.raises(n2g.N2GError, match=message):
            n2g.NeuronId(*args)


def test_a_graph_predicts_one_sequence_of_integer_token_ids_and_says_so_otherwise():
    model = n2g.distill(lambda ids: (ids == 7).float(), [[1, 7, 2, 7, 3, 4]] * 8 + [[5, 6, 1, 2, 3, 4]] * 8)
    graph = model.graph_
    assert graph.predict_sequence(np.array([1, 7])).tolist() == graph.predict_sequence(torch.tensor([1, 7])).tolist() \
        == [0.0, 1.0]
    for bad in ([1.0, 7.9], [[1, 7]], "17", None, 7):  # 7.9 was read as token 7; [[1, 7]] a TypeError, None too
        with pytest.raises(n2g.N2GError, match="^predict_sequence takes one sequence of integer token ids"):
            graph.predict_sequence(bad)


def test_a_fitted_neuron_pickles_and_copies_with_its_subject_model(fitted):
    # README: pickling a model from fit_neuron carries its subject model, so the copy still reads text
    model, _, _ = fitted
    text = "the cat sat on the mat w1"
    for copied in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        np.testing.assert_array_equal(copied.predict(text), model.predict(text))
        assert copied.scores_ == model.scores_ and str(copied) == str(model)
        assert copied.feature.model is not model.feature.model
