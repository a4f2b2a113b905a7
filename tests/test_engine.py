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
    # every quantile of each side, the negative one of the negated activations (it held the positive side's
    # quantiles negated in reverse order: its "0.5" was -(quantile 0.999), its "0.999" -(quantile 0.5))
    for sign, signed in ((Sign.POSITIVE, acts), (Sign.NEGATIVE, -acts)):
        quantiles = scan.stats(3, sign).quantiles
        assert list(quantiles) == ["0.5", "0.9", "0.99", "0.999"]
        for q, value in quantiles.items():  # the store keeps float16
            assert value == pytest.approx(float(signed.flatten().quantile(float(q))), rel=2e-3, abs=1e-5), (sign, q)


class TokenValued(SubjectModel):
    """Each neuron's activation is a function of the token alone: rows are exact whatever the batch holds."""

    def layer_activations(self, token_ids, attention_mask, layers):
        d = self.d_mlp
        values = ((token_ids[..., None] * (torch.arange(d) + 1)) % 7).float() - 3.0
        return {l: values for l in layers}


def test_equal_maxima_rank_by_excerpt_index_whatever_the_scan_batch(models):
    # Equal maxima are common (the same first token after BOS; a token-level neuron on the same token); topk
    # ordered such ties as it liked, so which excerpts a neuron's top examples held moved with --scan-batch
    # (and with the GPU's free memory, which sizes it).
    plain, _ = models
    model = TokenValued(plain.model, tiny_tokenizer(), spec="tiny")
    excerpts = torch.randint(4, 68, (40, 10))
    scans = [scan_layers(model, excerpts, [1], k=9, pool_size=40, batch_size=b, progress=False)[1] for b in (1, 5, 40)]
    for scan in scans:
        for idx, val, sign in ((scan.top_idx, scan.top_val, -1), (scan.bot_idx, scan.bot_val, 1)):
            for n in range(idx.shape[1]):  # by value, then by excerpt index
                assert idx[:, n].tolist() == [i for _, i in sorted(zip((sign * val[:, n]).tolist(), idx[:, n].tolist()))]
        assert torch.equal(scan.top_idx, scans[0].top_idx) and torch.equal(scan.bot_idx, scans[0].bot_idx)


def _store_jobs(model, excerpts, layer, indices):
    from n2g.activations import partition
    from n2g.engine import store_job

    scans = scan_layers(model, excerpts, [layer], k=64, pool_size=64, batch_size=16, progress=False)
    is_train = partition(len(excerpts), 0.5, 0)
    return [store_job(scans[layer], NeuronId(layer, i), is_train) for i in indices]


def test_store_jobs_read_nothing_until_asked_and_then_the_scaled_stored_row(models):
    # A whole-model run builds one job per neuron (46,080 for SmolLM2): building them must not copy
    # any neuron's stored activations, and each value read later is the store's row / the scale.
    from n2g.activations import partition
    from n2g.engine import store_job

    plain, _ = models
    excerpts = torch.randint(4, 68, (24, 10))
    scan = scan_layers(plain, excerpts, [1], k=64, pool_size=64, batch_size=16, progress=False)[1]
    is_train = partition(len(excerpts), 0.5, 0)
    values = scan.store.values

    class Untouchable:
        shape, dtype = values.shape, values.dtype

        def __getitem__(self, key):
            raise AssertionError("a job read the store while being built")

    scan.store.values = Untouchable()
    jobs = [store_job(scan, NeuronId(1, i, sign), is_train) for i in range(plain.d_mlp) for sign in Sign]
    scan.store.values = values
    assert jobs[0].evidence == [i for i in range(len(excerpts)) if is_train[i]]
    for job in jobs[:12]:
        column = scan.activations(job.neuron.index, job.neuron.sign) / job.scale
        assert len(job.known) == len(excerpts) and 7 in job.known
        for e in (0, 7, 23):
            np.testing.assert_array_equal(job.known[e], column[e])
        for got, e in zip(job.known.many([23, 0, 7]), (23, 0, 7)):  # one read, the same values
            np.testing.assert_array_equal(got, column[e])


def _fingerprint(fit):
    g = fit.graph
    nodes = sorted((-2 if n.token_id is None else n.token_id, n.depth, n.end is not None, n.end or 0.0)
                   for n in g.nodes) if g else []
    return nodes, {m: s.to_dict() for m, s in fit.scores.items()}, [e.predicted for e in fit.examples]


def test_host_work_in_worker_processes_gives_identical_fits(models):
    plain, _ = models
    excerpts = torch.randint(4, 68, (48, 16))
    jobs = _store_jobs(plain, excerpts, 1, [2, 5, 7, 11, 13])
    cfg = preset("default")
    seen = []
    inline = fit_many(plain, excerpts.tolist(), jobs, cfg, group_size=2)
    pooled = fit_many(plain, excerpts.tolist(), jobs, cfg, group_size=2, host_workers=2,
                      on_done=lambda job, fit, s: seen.append(job.neuron))
    assert seen == sorted(j.neuron for j in jobs)  # reported in neuron order, each once
    assert any(f.graph is not None and len(f.graph.nodes) > 1 for f in inline.values())
    for job in jobs:
        assert _fingerprint(pooled[job.neuron]) == _fingerprint(inline[job.neuron])


def test_cost_accounting_counts_rows_positions_and_padding(models):
    plain, _ = models
    counting = SmallMemory(plain.model, tiny_tokenizer(), spec="tiny")
    counting.limit = 10**6
    evaluator = RowEvaluator(counting, 4096, 0)
    seqs = [[5] * 10, [6] * 10, [7] * 9, [5] * 10, [8] * 2]  # one repeat; lengths 2, 9, 10 bucket apart
    neurons = [NeuronId(1, 0)] * 5
    evaluator(seqs, neurons, [1.0] * 5, ["prune", "prune", "importance", "prune", "importance"])
    cost = evaluator.cost
    prune, imp = cost.stages["prune"], cost.stages["importance"]
    assert (prune.asked, prune.rows, prune.real) == (3, 2, 20)
    assert (imp.asked, imp.rows, imp.real) == (2, 2, 11)
    total = cost.total()
    assert total.padded <= 1.15 * total.real  # [2] alone: padding it with the 9s and 10s would exceed 15%
    assert total.weighted == pytest.approx(total.padded * 2 / 3)  # layer 1 of 3: the pass stops there
    assert counting.calls == cost.forward_calls == 2


def test_substitute_forwards_are_counted_as_a_full_depth_stage(models):
    from n2g.augment import ModelSubstitutes

    plain, _ = models
    excerpts = torch.randint(4, 68, (48, 16))
    jobs = _store_jobs(plain, excerpts, 1, [2, 5])
    asked = []

    class Recording(ModelSubstitutes):
        def __call__(self, seqs, positions, k):
            asked.extend(len(x) for x in seqs)
            return super().__call__(seqs, positions, k)

    evaluator = RowEvaluator(plain, 4096, int(plain.occlusion_token_id))
    fit_many(plain, excerpts.tolist(), jobs, preset("default"), group_size=2, substitutes=Recording(plain, batch_size=3),
             evaluator=evaluator)
    st = evaluator.cost.stages["substitutes"]
    assert st.rows == st.asked == len(asked) > 0 and st.real == sum(asked)
    assert st.weighted == st.padded  # the whole depth: substitutes need the logits
    assert st.real <= st.padded <= 1.15 * st.real  # batched by length, as fitting is
    assert st.calls >= -(-len(asked) // 3)


def test_default_substitutes_come_from_the_input_embedding_without_forward_passes(models):
    from n2g.augment import EmbeddingSubstitutes

    plain, _ = models
    assert preset("default").substitute_source == "embedding"
    excerpts = torch.randint(4, 68, (48, 16))
    jobs = _store_jobs(plain, excerpts, 1, [2, 5])
    evaluator = RowEvaluator(plain, 4096, int(plain.occlusion_token_id))
    fits = fit_many(plain, excerpts.tolist(), jobs, preset("default"), group_size=2, evaluator=evaluator)
    st = evaluator.cost.stages["substitutes"]
    assert st.asked > 0 and st.real == st.padded == st.calls == 0  # asked, answered by one matmul each, no pass
    augment = evaluator.cost.stages["augment"]
    assert augment.asked > 0  # the neighbours were measured as variants
    nearest = EmbeddingSubstitutes(plain)
    for fit in fits.values():
        for v in fit.trace.variants:  # every variant's substitute is among its activator's nearest tokens
            source = fit.trace.pruned[v.source].token_ids
            assert v.token_ids[v.position] in nearest([source], [v.position], 30)[0]


def test_common_tokens_shared_by_a_layer_give_the_same_fits(models, monkeypatch):
    import n2g.engine as engine

    plain, _ = models
    excerpts = torch.randint(4, 60, (48, 16))
    jobs = _store_jobs(plain, excerpts, 1, [2, 5, 7])
    substitutes = lambda seqs, positions, k: [[61, 5, 62, 63, 6] for _ in seqs]  # 5 and 6 are common
    cfg = preset("default")
    shared = fit_many(plain, excerpts.tolist(), jobs, cfg, group_size=3, substitutes=substitutes)
    original = engine.neuron_steps
    monkeypatch.setattr(engine, "neuron_steps", lambda *a, **k: original(*a[:8], **k))  # each neuron counts alone
    alone = fit_many(plain, excerpts.tolist(), jobs, cfg, group_size=3, substitutes=substitutes)
    for job in jobs:
        assert _fingerprint(shared[job.neuron]) == _fingerprint(alone[job.neuron])
        got = [v.token_ids[v.position] for v in shared[job.neuron].trace.variants]
        assert got == [v.token_ids[v.position] for v in alone[job.neuron].trace.variants]
        assert set(got) <= {61, 62, 63}
    assert any(shared[job.neuron].trace.variants for job in jobs)


class SmallLogits(SubjectModel):
    """Raises CUDA's out-of-memory error for next-token candidates of more than 2 rows."""

    def next_token_candidates(self, token_ids, attention_mask, positions, k):
        if token_ids.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().next_token_candidates(token_ids, attention_mask, positions, k)


def test_model_substitutes_batch_by_length_and_back_off_on_out_of_memory(models):
    from n2g.augment import ModelSubstitutes

    plain, _ = models
    g = torch.Generator().manual_seed(3)
    seqs = [torch.randint(4, 68, (n,), generator=g).tolist() for n in (6, 6, 6, 6, 6, 6, 12)]
    positions = [len(x) - 1 for x in seqs]
    one = ModelSubstitutes(plain, batch_size=1)
    ref = one(seqs, positions, 8)
    assert one.counts["padded"] == one.counts["real"] == sum(map(len, seqs)) and one.counts["calls"] == len(seqs)
    small = ModelSubstitutes(SmallLogits(plain.model, tiny_tokenizer(), spec="tiny"), batch_size=64)
    assert small(seqs, positions, 8) == ref
    assert small.batch_size <= 2 and small.counts["rows"] == len(seqs)


def test_padding_bound_of_length_batches():
    from n2g.features import length_batches

    lengths = [1, 2, 3, 4, 5, 8, 8, 9, 16, 30, 31, 31]
    batches = length_batches(lengths, 10**6)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        real = sum(lengths[i] for i in b)
        assert len(b) * max(lengths[i] for i in b) <= 1.15 * real
    assert length_batches([4] * 10, 10**6) == [list(range(10))]  # equal lengths share one batch


def test_host_workers_leave_ctrl_c_to_the_main_process():
    import signal

    from n2g.engine import host_pool

    pool = host_pool(1)
    try:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=120) == signal.SIG_IGN
    finally:
        pool.shutdown()


def _blocked_signals():
    import signal

    return signal.pthread_sigmask(signal.SIG_BLOCK, set())


def test_host_workers_start_with_ctrl_c_blocked_and_the_main_process_keeps_it():
    """A worker imports n2g and torch for seconds before it can ignore SIGINT; a Ctrl-C then printed a
    traceback per worker, and one interrupted while the pool registered it was never shut down (the
    main process hung at exit). Workers now start with SIGINT blocked; the main process's mask is as before."""
    import signal

    from n2g.engine import host_pool

    before = _blocked_signals()
    pool = host_pool(2)
    try:
        masks = [f.result() for f in [pool.submit(_blocked_signals) for _ in range(4)]]
    finally:
        pool.shutdown()
    assert all(signal.SIGINT in m for m in masks)
    assert _blocked_signals() == before and signal.SIGINT not in before
