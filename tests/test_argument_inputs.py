"""Arguments of the public Python API and the CLI (audit 4): wrong types, out-of-range values, numpy
scalars and mismatched inputs are one N2GError that says what to pass, never a deep TypeError or
IndexError, and never a silently wrong answer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from n2g.errors import N2GError
from test_pipeline import tiny_dir  # noqa: F401  (tiny_dir is a fixture)


# --- n2g.steer.steer / attribution: the README's Python entry points for steering -------------------------------

@pytest.mark.parametrize("call, message", [
    (lambda m, steer, attr: steer(m, 0, 1, [5, 6], float("nan")), "value must be a finite number"),  # was NaN tables
    (lambda m, steer, attr: steer(m, 0, 1, [5, 6], float("inf")), "value must be a finite number"),
    (lambda m, steer, attr: steer(m, 0, 1, [5, 6], 1e39), "beyond this model's torch.float32 range"),
    (lambda m, steer, attr: steer(m, 0, 1, [5, 500], 1.0), "token id 500, which is not in this model's vocabulary"),
    (lambda m, steer, attr: steer(m, 0, 1, [5, -1], 1.0), "token id -1, which is not in this model's vocabulary"),
    (lambda m, steer, attr: steer(m, 0, 1, "the cat", 1.0), "must be token ids, not text"),  # was int('t')
    (lambda m, steer, attr: steer(m, 0, 1, torch.tensor([[5, 6]]), 1.0), "one sequence of whole-number token ids"),
    (lambda m, steer, attr: steer(m, 0, 1, [5.7, 6.2], 1.0), "whole-number token ids"),  # was read as 5 and 6
    (lambda m, steer, attr: steer(m, 0, 1, [5, 6], 1.0, k=-1), "k must be a whole number of 0 or more"),
    (lambda m, steer, attr: steer(m, 0, 1, [5] * 200, 1.0, n_tokens=-100), "n_tokens must be a whole number"),
    (lambda m, steer, attr: steer(m, 0, 1, [5, 6], 1.0, n_tokens=1.5), "n_tokens must be a whole number"),
    (lambda m, steer, attr: steer(m, 0.0, 1, [5, 6], 1.0), "layer must be a whole number (got 0.0)"),
    (lambda m, steer, attr: steer(m, True, 1, [5, 6], 1.0), "layer must be a whole number (got True)"),
    (lambda m, steer, attr: attr(m, 0, 1, [5, 6], -1), "target (a token id) must be a whole number of 0"),  # was the last token
    (lambda m, steer, attr: attr(m, 0, 1, [5, 6], 500), "target 500 is not in this model's vocabulary"),
    (lambda m, steer, attr: attr(m, 0, 1, [5, 6], 5.9), "target (a token id) must be a whole number"),  # was token 5
    (lambda m, steer, attr: attr(m, 0, 1, [999], 5), "token id 999"),
    (lambda m, steer, attr: attr(m, 0, "1", [5, 6], 5), "index must be a whole number (got '1')"),
])
def test_steer_and_attribution_refuse_what_they_cannot_use_in_one_line(tiny_llama, call, message):
    from n2g.steer import attribution, steer

    with pytest.raises(N2GError) as info:
        call(tiny_llama, steer, attribution)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_steer_and_attribution_take_numpy_and_tensor_numbers(tiny_llama):
    from n2g.steer import attribution, steer

    plain = steer(tiny_llama, 0, 1, [5, 6, 7], 2.0, n_tokens=1)
    same = steer(tiny_llama, np.int64(0), torch.tensor(1), torch.tensor([5, 6, 7]), np.float32(2.0), n_tokens=np.int64(1))
    assert same.kl == pytest.approx(plain.kl) and same.after == plain.after
    assert np.allclose(attribution(tiny_llama, 0, 1, np.array([5, 6, 7]), torch.tensor(9)),
                       attribution(tiny_llama, 0, 1, [5, 6, 7], 9))


# --- n2g.ablate.ablation_scores: scores many neurons at once (README) --------------------------------------------

def _ablation_graph():
    import n2g

    return n2g.distill(lambda ids: (ids == 5).float(), [[5, 6, 7, 5, 8]] * 6, preset_name="paper").graph_


@pytest.mark.parametrize("jobs, seqs_of, message", [
    ("two", [[[5, 6, 7]]], "2 job(s) but 1 list(s) of sequences"),  # the second neuron was reported "no text"
    ("one", [[[5, 6, 7]], [[5, 6]]], "1 job(s) but 2 list(s)"),  # the second list was ignored
    ("one", [[[5, 600]]], "token id 600, which is not in this model's vocabulary"),  # IndexError inside the model
    ("one", [[[5, -1]]], "token id -1"),
    ("one", [[5, 6, 7]], "a sequence of seqs_of[0] must be one sequence of whole-number token ids"),  # TypeError
    ("one", [[[5] * 300]], "300 tokens, more than this model's context takes (127)"),  # was scored past the context
    ("layer 7", [[[5, 6]]], "does not exist in tiny-llama"),  # IndexError: list index out of range
    ("index 100", [[[5, 6]]], "does not exist in tiny-llama"),
    ("tuple neuron", [[[5, 6]]], "jobs[0] is not (n2g.NeuronId, graph, scale, mean)"),  # AttributeError
    ("neuron model", [[[5, 6]]], "the graph is a NeuronModel, not an n2g.NeuronGraph; pass a fitted model's graph_"),
    ("nan scale", [[[5, 6]]], "jobs[0]: scale must be a finite number (got nan)"),  # NaN scores
])
def test_ablation_scores_refuses_jobs_and_sequences_it_cannot_score(tiny_llama, jobs, seqs_of, message):
    import n2g
    from n2g.ablate import ablation_scores
    from n2g.records import NeuronId

    g, n = _ablation_graph(), NeuronId(0, 1)
    jobs = {"one": [(n, g, 1.0, 0.0)], "two": [(n, g, 1.0, 0.0)] * 2, "layer 7": [(NeuronId(7, 1), g, 1.0, 0.0)],
            "index 100": [(NeuronId(0, 100), g, 1.0, 0.0)], "tuple neuron": [((0, 1), g, 1.0, 0.0)],
            "neuron model": [(n, n2g.NeuronModel(), 1.0, 0.0)], "nan scale": [(n, g, float("nan"), 0.0)]}[jobs]
    with pytest.raises(N2GError) as info:
        ablation_scores(tiny_llama, jobs, seqs_of)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_ablation_scores_take_numpy_sequences_and_numbers(tiny_llama):
    from n2g.ablate import ablation_scores
    from n2g.records import NeuronId

    g, n = _ablation_graph(), NeuronId(0, 1)
    (plain,) = ablation_scores(tiny_llama, [(n, g, 1.0, 0.0)], [[[5, 6, 7, 8]]])
    (same,) = ablation_scores(tiny_llama, ((n, g, np.float32(1.0), np.float64(0.0)),), [np.array([[5, 6, 7, 8]])])
    assert same.to_dict() == plain.to_dict() and plain.n_tokens == 4


# --- n2g.load_corpus / fit_neuron: a NumPy integer is the int it equals, as layer and index already are ----------

def test_load_corpus_and_fit_neuron_take_numpy_integers_for_counts(tiny_llama, tmp_path):
    import n2g
    from n2g.api import _corpus

    text = tmp_path / "words.txt"
    text.write_text(" ".join(["the cat sat on the mat"] * 40))
    corpus = n2g.load_corpus(text, tiny_llama, length=np.int64(8), max_excerpts=np.int32(3))  # was refused:
    assert tuple(corpus.excerpts.shape) == (3, 8)  # "max_excerpts must be a positive integer (got np.int32(3))"
    assert len(_corpus(corpus, tiny_llama, np.int64(2))) == 2  # what fit_neuron(..., max_excerpts=) cuts
    for bad in (np.float64(3.0), np.True_, np.int64(0)):
        with pytest.raises(N2GError, match="max_excerpts must be a positive integer"):
            n2g.load_corpus(text, tiny_llama, length=8, max_excerpts=bad)


# --- DistillConfig: settings whose negative value has no meaning ---------------------------------------------------

@pytest.mark.parametrize("name, value", [
    ("seed", -10**6),  # was a ValueError from inside NumPy's generator when the excerpts were partitioned
    ("quiet_tokens", -1),  # was "all quiet tokens but the last": a slice [:-1]
    ("min_count", -3), ("min_gain", -5.0), ("set_cost", -1.0),
])
def test_distill_config_refuses_negative_counts_seeds_and_costs(name, value):
    import n2g

    with pytest.raises(N2GError, match=f"^{name} must be 0 or more \\(got {value}\\)$"):
        n2g.DistillConfig(**{name: value})
    with pytest.raises(N2GError, match=f"^{name} must be 0 or more"):
        n2g.distill(lambda ids: (ids == 5).float(), [[5, 6, 7]] * 4, **{name: value})
    n2g.DistillConfig(**{name: 0})  # 0 still means none / no minimum


def test_distill_config_from_something_other_than_a_dict_is_one_line():
    import n2g

    with pytest.raises(N2GError, match="a config must be a dict of DistillConfig fields \\(got list\\)"):
        n2g.DistillConfig.from_dict([1])  # was AttributeError: 'list' object has no attribute 'items'


# --- NeuronModel.fit ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("examples", [[], (), {}, iter([])])
def test_fitting_on_no_examples_is_refused_not_an_empty_graph(examples):
    import n2g

    model = n2g.NeuronModel(lambda ids: (ids == 5).float())
    with pytest.raises(N2GError, match="^fit needs at least one training example; pass a non-empty list"):
        model.fit(examples)  # was status "fitted" with a graph of no paths
    assert not hasattr(model, "graph_")


# --- NeuronModel.predict / score: what is not token ids says so -----------------------------------------------------

@pytest.fixture(scope="module")
def fives():
    import n2g

    return n2g.distill(lambda ids: (ids == 5).float(), [[5, 6, 7, 5, 8]] * 6, preset_name="paper")


@pytest.mark.parametrize("call, message", [
    (lambda m: m.predict(i for i in [5, 6]), "token ids must be text, a list, an array or a tensor (got generator)"),
    (lambda m: m.predict({5, 6}), "(got set)"),  # these three said "token ids of different lengths"
    (lambda m: m.predict(m.examples_[0]), "(got Example)"),
    (lambda m: m.score(m.examples_, [1.0]), "score(examples) takes no true activations"),
    (lambda m: m.predict(np.array([2**64 - 1], np.uint64)), "token id 18446744073709551615 is beyond 2147483647"),
    (lambda m: m.predict([2**40, 5]), "token id 1099511627776 is beyond 2147483647"),  # was predicted as unseen
])
def test_predict_and_score_name_inputs_that_are_not_token_ids(fives, call, message):
    with pytest.raises(N2GError) as info:
        call(fives)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert fives.predict(np.array([5, 6], np.uint8)).tolist() == fives.predict([5, 6]).tolist()


# --- NeuronGraph.describe: print(model) lists the paths; describe(limit=...) caps them ------------------------------

def test_describe_takes_a_limit_of_0_or_more_and_says_so_otherwise(fives):
    graph = fives.graph_
    n = len(graph.paths())
    assert graph.describe(limit=0).endswith(f"... {n} more {'path' if n == 1 else 'paths'} (graph.describe(limit=None) lists all)")
    assert graph.describe(limit=np.int64(1)).splitlines()[:3] == graph.describe(limit=None).splitlines()[:3]
    for bad in (-1, "3", 2.5, True):  # -1 was max() of an empty sequence, "3" a TypeError from slicing
        with pytest.raises(N2GError, match="^limit must be a whole number of 0 or more, or None for every path"):
            graph.describe(limit=bad)


# --- $N2G_CACHE ------------------------------------------------------------------------------------------------------

def test_a_cache_under_the_home_of_an_unknown_user_is_one_line_and_leaves_no_run(tiny_dir, tmp_path, monkeypatch,  # noqa: F811
                                                                                capsys):
    from n2g import cli

    monkeypatch.setenv("N2G_CACHE", "~no-such-user-of-n2g/cache")
    out = tmp_path / "run"
    code = cli.main(["fit", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"),
                     "--excerpt-length", "32", "--layer", "0", "--neuron", "0", "--no-report", "-q", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err == ("n2g: error: $N2G_CACHE '~no-such-user-of-n2g/cache' names the home folder of a user "
                                 "that this system does not know, so n2g's cache has no place; set $N2G_CACHE to a "
                                 "folder path\n")  # was RuntimeError: Could not determine home directory
    assert not out.exists()


def test_feature_from_hook_refuses_a_name_that_is_not_text():
    import n2g

    with pytest.raises(N2GError, match=r"^name must be text, the feature's name in messages \(got int\)$"):
        n2g.feature_from_hook(lambda ids: ids.float(), name=3)  # was TypeError: __name__ must be set to a string
    assert n2g.feature_from_hook(lambda ids: ids.float(), name="unit").__name__ == "unit"


@pytest.mark.parametrize("key", ["Lx", "L5", "L5.N2.pos", "L5.Nx", "l5.n2", " L5.N2", None, 52])
def test_a_neuron_key_that_is_not_one_is_named_in_a_value_error(key):
    from n2g.records import NeuronId

    with pytest.raises(ValueError, match="is not a neuron key; keys look like L5.N2 or L5.N2.neg"):
        NeuronId.from_key(key)
    assert NeuronId.from_key("L5.N2.neg") == NeuronId(5, 2, NeuronId.from_key("L0.N0.neg").sign)


@pytest.mark.parametrize("record", [[], "result", 3, None])
def test_a_result_record_that_is_not_an_object_is_a_value_error(record):
    from n2g.records import NeuronResult

    with pytest.raises(ValueError, match="not a neuron result record"):
        NeuronResult.from_dict(record)
