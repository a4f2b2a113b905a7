"""Ablation score: a planted neuron's graph stands in for it inside the model; zeroing it hurts."""

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g.ablate import Ablation, ablation_scores
from n2g.activations import partition
from n2g.config import preset
from n2g.engine import fit_many, store_job
from n2g.models import SubjectModel
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers
from test_pipeline import tiny_dir  # noqa: F401  (a fixture)

LAYER, INDEX, STRENGTH = 1, 3, 4.0


def planted(sign: float = 1.0):
    """A tiny Llama whose neuron L1.N3 is exactly 4.0 on token 7 and 0 elsewhere, and writes
    strongly towards token 9 (so the text "7 9" depends on it); with ``sign`` -1 it is -4.0 on token 7
    and writes towards 9 as it falls (its negative side carries the rule)."""
    torch.manual_seed(0)
    net = tiny_model("llama")
    model = SubjectModel(net, tiny_tokenizer(), spec="tiny")
    seen = {}
    net.get_input_embeddings().register_forward_pre_hook(lambda m, args: seen.__setitem__("ids", args[0]))

    def plant(module, args):
        x = args[0].clone()
        x[..., INDEX] = sign * STRENGTH * (seen["ids"] == 7).to(x.dtype)
        return (x, *args[1:])

    proj = model._projs[LAYER]
    proj.register_forward_pre_hook(plant)
    with torch.no_grad():
        proj.weight[:, INDEX] = sign * 2.0 * net.get_output_embeddings().weight[9]
    return model


def corpus(n=64, length=24, seed=0):
    rng = np.random.default_rng(seed)
    rows = rng.integers(10, 60, size=(n, length))
    for row in rows:
        for j in rng.choice(length - 1, size=3, replace=False):
            row[j], row[j + 1] = 7, 9  # the neuron's token, then the token it predicts
    return torch.tensor(rows)


def _fitted_planted(sign: Sign):
    """(model, neuron, graph, scale, mean raw activation, 6 held-out excerpts) of the planted neuron's ``sign`` side,
    fitted by default and recovered at F1 1.0."""
    model = planted(sign=1.0 if sign == Sign.POSITIVE else -1.0)
    excerpts = corpus()
    scans = scan_layers(model, excerpts, [LAYER], k=64, pool_size=64, batch_size=16, progress=False)
    is_train = partition(len(excerpts), 0.5, 0)
    neuron = NeuronId(LAYER, INDEX, sign)
    job = store_job(scans[LAYER], neuron, is_train)
    assert job.scale == pytest.approx(STRENGTH)
    fit = fit_many(model, excerpts.tolist(), [job], preset("default"))[neuron]
    assert fit.scores["n2g"].f1 == 1.0
    held_out = [excerpts[i].tolist() for i in range(len(excerpts)) if not is_train[i]][:6]
    mean = float(scans[LAYER].store.neuron(INDEX).astype(np.float64).mean())
    return model, neuron, fit.graph, job.scale, mean, held_out


def test_graph_of_a_planted_neuron_recovers_the_zero_ablation_damage():
    model, neuron, graph, scale, mean, held_out = _fitted_planted(Sign.POSITIVE)
    (score,) = ablation_scores(model, [(neuron, graph, scale, mean)], [held_out])
    assert score.status == "ok" and score.n_excerpts == 6 and score.n_tokens == 6 * 24
    assert score.ce_increase["zero"] > 0.05  # the neuron matters: without it "9" after "7" is a surprise
    assert abs(score.ce_increase["graph"]) < 1e-4 and score.kl["graph"] < 1e-5
    assert score.recovered == pytest.approx(1.0, abs=1e-3)
    assert 0 < score.ce_increase["mean"] < score.ce_increase["zero"] + 1.0
    again = Ablation.from_dict(score.to_dict())
    assert again == score


def test_graph_of_a_planted_negative_side_stands_in_with_the_model_s_sign():
    # the negative side's graph predicts +1 (normalised) on "7": put back as -4.0, as the model computes it, it
    # recovers zero-ablation's damage; put back as +4.0 it would write away from "9" and do more damage than zero
    model, neuron, graph, scale, mean, held_out = _fitted_planted(Sign.NEGATIVE)
    assert mean < 0
    (score,) = ablation_scores(model, [(neuron, graph, scale, mean)], [held_out])
    assert score.ce_increase["zero"] > 0.05
    assert abs(score.ce_increase["graph"]) < 1e-4 and score.recovered == pytest.approx(1.0, abs=1e-3)
    flipped = NeuronId(LAYER, INDEX)  # the same graph and scale read as a positive side's: the wrong sign
    (wrong,) = ablation_scores(model, [(flipped, graph, scale, mean)], [held_out])
    assert wrong.ce_increase["graph"] > score.ce_increase["zero"]


def test_a_graph_that_predicts_nothing_recovers_nothing_and_a_useless_neuron_is_flagged():
    model = planted()
    excerpts = corpus(16)
    seqs = [excerpts[i].tolist() for i in range(4)]

    class Nothing:
        def predict_sequence(self, ids):
            return np.zeros(len(ids), np.float32)

    dead = NeuronId(LAYER, 5)
    with torch.no_grad():
        model._projs[LAYER].weight[:, 5] = 0.0  # writes nothing: ablating it changes nothing
    planted_score, dead_score = ablation_scores(
        model, [(NeuronId(LAYER, INDEX), Nothing(), STRENGTH, 0.0), (dead, Nothing(), 1.0, 0.0)], [seqs, seqs])
    assert planted_score.recovered == pytest.approx(0.0, abs=1e-6)  # graph = zero ablation
    assert dead_score.recovered is None and dead_score.status == "zero ablation has no effect"
    assert dead_score.ce_increase["zero"] == pytest.approx(0.0, abs=1e-5)


def test_run_with_ablation_stores_it_and_shows_it(tiny_dir, tmp_path):
    import json

    from test_pipeline import cli, run_args

    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, out, "--neurons", "0-1", "--layers", "1", "--ablation") if a != "--no-report"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    result = json.loads((out / "neurons" / "L1.N0" / "result.json").read_text())
    a = result["ablation"]
    assert a["n_excerpts"] > 0 and set(a["ce_increase"]) == {"graph", "zero", "mean"}
    assert a["status"] in ("ok", "zero ablation has no effect")
    page = (out / "viewer" / "neurons" / "L1.N0.html").read_text()
    assert "Does the graph stand in for the neuron?" in page and 'id="steer-gainers"' in page
    steering = result["steering"]
    assert len(steering["gainers"]) == 10 and steering["scale"] == 4.0 and steering["prompt"]
    assert 'id="ablation-table"' in (out / "report.html").read_text()
    plain = tmp_path / "plain"
    assert cli(*run_args(tiny_dir, plain, "--neurons", "0", "--layers", "1")).returncode == 0
    assert json.loads((plain / "neurons" / "L1.N0" / "result.json").read_text())["ablation"] == {}
    again = cli(*run_args(tiny_dir, plain, "--neurons", "0", "--layers", "1", "--ablation"))  # done: not redone
    assert again.returncode == 0 and "fitted without --ablation (before, or by another n2g process" in again.stderr


def test_control_random_fits_the_same_neurons_on_a_random_copy(tiny_dir, tmp_path):
    import json

    from test_pipeline import cli, run_args

    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, out, "--neurons", "0-2", "--layers", "1", "--control", "random") if a != "--no-report"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    control = out / "control-random"
    meta = json.loads((control / "run.json").read_text())
    assert meta["model"]["spec"].endswith("#random-init-seed1234")
    assert sorted(p.name for p in (control / "neurons").iterdir()) == ["L1.N0", "L1.N1", "L1.N2"]
    real = json.loads((out / "neurons" / "L1.N0" / "result.json").read_text())
    fake = json.loads((control / "neurons" / "L1.N0" / "result.json").read_text())
    assert real["stats"]["max_activation"] != fake["stats"]["max_activation"]  # other weights, other neuron
    report = json.loads((out / "report.json").read_text())
    assert [row["layer"] for row in report["control"]["layers"]] == [1, "all"]
    assert 'id="control-table"' in (out / "report.html").read_text()
    assert not (out / "neurons" / "control-random").exists()


def test_random_copy_is_seeded_and_differs_from_the_model():
    from n2g.pipeline import random_copy

    model = planted()
    a, b = random_copy(model, 0), random_copy(model, 0)
    wa, wb = a._projs[1].weight, b._projs[1].weight
    assert torch.equal(wa, wb) and not torch.equal(wa, model._projs[1].weight)
    assert random_copy(model, 1)._projs[1].weight.ne(wa).any()
