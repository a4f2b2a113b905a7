"""Engine details: out-of-memory back-off, shared rows, scan statistics."""

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g.config import preset
from n2g.engine import Job, RowEvaluator, fit_many
from n2g.models import SubjectModel
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers


class SmallMemory(SubjectModel):
    """Raises CUDA's out-of-memory error whenever a batch has more than ``limit`` rows."""

    limit = 4
    calls = 0

    def layer_activations(self, token_ids, attention_mask, layers):
        self.calls += 1
        if token_ids.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().layer_activations(token_ids, attention_mask, layers)


@pytest.fixture
def models():
    torch.manual_seed(0)
    net = tiny_model("llama")
    return SubjectModel(net, tiny_tokenizer(), spec="tiny"), SmallMemory(net, tiny_tokenizer(), spec="tiny")


def test_out_of_memory_backs_off_and_gives_the_same_results(models):
    plain, small = models
    excerpts = torch.randint(4, 68, (40, 16))
    scans = scan_layers(plain, excerpts, [1], k=64, pool_size=64, batch_size=16, progress=False)
    scans_small = scan_layers(small, excerpts, [1], k=64, pool_size=64, batch_size=16, progress=False)
    # Excerpts with tied maxima may swap places between batchings; the ranked values may not.
    assert torch.allclose(scans[1].top_val, scans_small[1].top_val, atol=1e-5)
    jobs = [Job(NeuronId(1, i), scans[1].scale(i, Sign.POSITIVE), scans[1].ranked(i, Sign.POSITIVE), scans[1].pool) for i in (2, 7)]
    cfg = preset("paper")
    ref = fit_many(plain, excerpts.tolist(), jobs, cfg, group_size=2)
    evaluator = RowEvaluator(small, cfg.batch_tokens, small.occlusion_token_id)
    got = fit_many(small, excerpts.tolist(), jobs, cfg, group_size=2, evaluator=evaluator)
    assert evaluator.batch_tokens < cfg.batch_tokens
    for job in jobs:
        assert ref[job.neuron].graph.stats() == got[job.neuron].graph.stats()
        assert ref[job.neuron].scores["n2g"].f1 == got[job.neuron].scores["n2g"].f1


def test_a_sequence_shared_by_neurons_of_a_layer_runs_once(models):
    plain, _ = models
    counting = SmallMemory(plain.model, tiny_tokenizer(), spec="tiny")
    counting.limit = 10**6
    seq = [5, 6, 7, 8]
    evaluator = RowEvaluator(counting, 4096, 0)
    out = evaluator([seq, seq, seq], [NeuronId(0, 1), NeuronId(0, 2), NeuronId(0, 3, Sign.NEGATIVE)], [1.0, 2.0, 1.0])
    assert counting.calls == 1 and evaluator.rows_done == 1
    direct = plain.activations(torch.tensor([seq]), None, [(0, 1), (0, 2), (0, 3)])[0].numpy()
    np.testing.assert_allclose(out[0], direct[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[1], direct[:, 1] / 2.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out[2], -direct[:, 2], rtol=1e-5, atol=1e-6)


def test_scan_statistics_match_a_direct_computation(models):
    plain, _ = models
    excerpts = torch.randint(4, 68, (30, 12))
    scan = scan_layers(plain, excerpts, [2], k=5, pool_size=30, batch_size=7, progress=False)[2]
    acts = plain.activations(excerpts, None, [(2, 3)])[..., 0]
    maxima = acts.amax(1)
    assert scan.top_idx[:, 3].tolist() == maxima.argsort(descending=True)[:5].tolist()
    assert scan.scale(3, Sign.POSITIVE) == pytest.approx(float(maxima.max()), rel=1e-5)
    assert scan.scale(3, Sign.NEGATIVE) == pytest.approx(-float(acts.min()), rel=1e-5)
    stats = scan.stats(3, Sign.POSITIVE)
    assert stats.n_sampled_tokens == 30 * 12  # the pool is the whole corpus here
    expected_rate = float((acts >= 0.5 * maxima.max()).float().mean())
    assert stats.firing_rate == pytest.approx(expected_rate, abs=1e-6)
    assert stats.quantiles["0.5"] == pytest.approx(float(acts.flatten().quantile(0.5)), rel=1e-4, abs=1e-6)
