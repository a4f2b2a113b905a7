"""The vocabulary in context: every token the corpus rarely shows, read after a few contexts (n2g.vocabulary)."""
import numpy as np
import pytest
import torch

from n2g.activations import partition
from n2g.config import preset
from n2g.engine import store_job
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers
from n2g.vocabulary import candidates, contexts, measure, model_evidence, vocabulary_tokens
from n2g.written import shown_tokens


def test_a_continuation_reads_the_same_activations_as_the_whole_row(tiny_subject):
    prefix = [5, 9, 17, 4, 30, 11]
    cands = torch.tensor([4, 8, 40, 63, 9])
    got = tiny_subject.continuation_activations(prefix, cands, [0, 2])
    rows = torch.tensor([prefix + [int(c)] for c in cands])
    whole = tiny_subject.layer_activations(rows, None, [0, 2])
    for layer in (0, 2):
        assert got[layer].shape == (len(cands), tiny_subject.d_mlp)
        torch.testing.assert_close(got[layer].cpu(), whole[layer][:, -1].float().cpu(), atol=1e-4, rtol=1e-4)


def test_a_model_without_a_copyable_cache_runs_whole_rows(tiny_llama, monkeypatch):
    prefix, cands = [5, 9, 17], torch.tensor([4, 8, 40])
    fast = tiny_llama.continuation_activations(prefix, cands, [1])
    monkeypatch.setattr("n2g.models.CONTINUATION_BYTES", 1)  # one candidate per copy of the cache
    torch.testing.assert_close(tiny_llama.continuation_activations(prefix, cands, [1])[1], fast[1])
    monkeypatch.setattr("n2g.models.copy.deepcopy", lambda c: (_ for _ in ()).throw(TypeError("no copy")))
    slow = tiny_llama.continuation_activations(prefix, cands, [1])
    torch.testing.assert_close(fast[1], slow[1], atol=1e-4, rtol=1e-4)


def test_contexts_are_seeded_windows_of_distinct_training_excerpts():
    excerpts = np.arange(20 * 16).reshape(20, 16)
    is_train = partition(20, 0.5, 0)
    got = contexts(excerpts, is_train, 4, 5, 0)
    assert got.shape == (4, 5) and np.array_equal(got, contexts(excerpts, is_train, 4, 5, 0))
    rows = got[:, 0] // 16
    assert len(set(rows.tolist())) == 4 and is_train[rows].all()
    assert (np.diff(got, axis=1) == 1).all()  # contiguous windows inside one excerpt
    assert not np.array_equal(got, contexts(excerpts, is_train, 4, 5, 1))
    assert contexts(excerpts, is_train, 4, 40, 0).shape == (4, 16)  # never longer than an excerpt
    assert contexts(excerpts, is_train, 0, 5, 0).shape == (0, 5)


def test_candidates_are_ordinary_tokens_training_shows_fewer_than_min_count_times(tiny_llama):
    excerpts = np.array([[4, 4, 5, 6], [7, 7, 7, 8], [9, 9, 9, 9]])
    is_train = np.array([True, True, False])
    got = set(candidates(tiny_llama, excerpts, is_train, 2).tolist())
    assert {4, 7} & got == set() and {5, 6, 8, 9, 10, 60} <= got
    assert not {0, 1, 2, 3} & got  # <unk>, <bos>, <eos>, <pad>: special tokens
    assert max(got) == len(tiny_llama.tokenizer) - 1 < 127  # the embedding's other rows are not tokens


def test_measure_keeps_exactly_the_pairs_that_fire_on_either_side(tiny_llama):
    windows = np.array([[5, 9, 17, 4], [30, 11, 12, 13]])
    tokens = np.arange(4, 64)
    full = torch.stack([tiny_llama.continuation_activations(w.tolist(), torch.as_tensor(tokens), [1])[1] for w in windows], 1)
    pos, neg = full.amax((0, 1)) * 1.25, -full.amin((0, 1)) * 1.25  # maxima as a bigger corpus might give
    pos[3] = 0.0  # neuron 3 is dead on its positive side
    got = measure(tiny_llama, windows, tokens, {1: (pos, neg)}, 0.5).layers[1]
    fires = ((full.amax(1) >= 0.5 * pos) & (pos > 0)) | ((-full.amin(1) >= 0.5 * neg) & (neg > 0))
    want = sorted((int(n), int(tokens[t])) for t, n in zip(*np.nonzero(fires.numpy())))
    assert sorted(zip(got.neurons.tolist(), got.tokens.tolist())) == want and len(want) > 10
    capped = measure(tiny_llama, windows, tokens, {1: (pos, neg)}, 0.5, most=2).layers[1]
    for n in set(got.neurons.tolist()):  # per neuron and side: the two of the highest mean that fire there
        rows = got.neurons == n
        mean = got.values[rows].astype(np.float32).mean(1)
        up = (got.values[rows].astype(np.float32).max(1) >= 0.5 * float(pos[n])) & (float(pos[n]) > 0)
        down = -got.values[rows].astype(np.float32).min(1) >= 0.5 * float(neg[n])
        want_n = set(got.tokens[rows][up][np.argsort(-mean[up], kind="stable")[:2]].tolist())
        want_n |= set(got.tokens[rows][down][np.argsort(mean[down], kind="stable")[:2]].tolist())
        assert set(capped.tokens[capped.neurons == n].tolist()) == want_n
    assert (np.diff(got.neurons) >= 0).all()
    row = next(i for i, n in enumerate(got.neurons) if n == want[0][0])
    t = int(np.flatnonzero(tokens == got.tokens[row])[0])
    np.testing.assert_allclose(got.values[row], full[t, :, got.neurons[row]].numpy(), atol=2e-3, rtol=2e-3)


def test_a_job_gets_each_firing_token_once_per_context_beside_the_written_text(tiny_llama, tmp_path, monkeypatch):
    excerpts = torch.as_tensor(np.random.default_rng(1).integers(4, 60, (16, 16)))
    cfg = preset("default", written=6, vocabulary=3, vocabulary_context=5)
    is_train = partition(16, cfg.held_out, cfg.seed)
    scans = scan_layers(tiny_llama, excerpts, [1], k=4, pool_size=4, progress=False)
    neurons = [NeuronId(1, i, Sign.POSITIVE) for i in range(48)]
    voc = vocabulary_tokens(tiny_llama, excerpts, is_train, cfg, neurons, scans, tmp_path, "c")
    assert voc.contexts == 3 and len(list((tmp_path / "vocabulary").glob("*.npz"))) == 1
    shown = set(shown_tokens(excerpts.numpy(), is_train, 2).tolist())
    layer = voc.layers[1]
    assert len(layer.tokens) > 0 and not shown & set(layer.tokens.tolist())
    n = NeuronId(1, int(layer.neurons[0]), Sign.POSITIVE)
    scale = scans[1].scale(n.index, n.sign)
    mine = layer.neurons == n.index
    fires = layer.values[mine].astype(np.float32).max(1) / scale >= 0.5  # kept for this side, not the other
    got = voc.for_neuron(n, scale)
    if not fires.any():
        assert got is None
        n = NeuronId(1, n.index, Sign.NEGATIVE)
        scale = scans[1].scale(n.index, n.sign)
        fires = -layer.values[mine].astype(np.float32).min(1) / scale >= 0.5
        got = voc.for_neuron(n, scale)
    ids, acts = got
    assert ids.tolist() == np.repeat(layer.tokens[mine][fires], 3).tolist()
    assert (acts.reshape(-1, 3).max(1) >= 0.5).all()
    strongest = voc.layers[1]
    top = max(range(48), key=lambda i: int((strongest.neurons == i).sum()))
    everything = voc.for_neuron(NeuronId(1, top, Sign.POSITIVE), scans[1].scale(top, Sign.POSITIVE))
    voc.most = 2  # the two tokens of the highest mean activation, in token order
    two = voc.for_neuron(NeuronId(1, top, Sign.POSITIVE), scans[1].scale(top, Sign.POSITIVE))
    means = {int(t): float(everything[1][everything[0] == t].mean()) for t in set(everything[0].tolist())}
    best = sorted(sorted(means, key=lambda t: -means[t])[:2])
    assert len(means) > 2 and two[0].tolist() == np.repeat(best, 3).tolist()
    both = model_evidence(tiny_llama, excerpts, is_train, cfg, neurons, scans, tmp_path, "c")
    job = store_job(scans[1], n, is_train, both)
    written = both.sources[0].for_neuron(n, scale)
    assert job.written[0].tolist() == (written[0].tolist() if written is not None else []) + ids.tolist()

    def refuse(*a, **k):
        raise AssertionError("measured again")

    monkeypatch.setattr("n2g.vocabulary.measure", refuse)  # the layer comes from the cache
    again = vocabulary_tokens(tiny_llama, excerpts, is_train, cfg, neurons, scans, tmp_path, "c")
    np.testing.assert_array_equal(again.layers[1].values, layer.values)
    with pytest.raises(AssertionError):  # other contexts are measured anew
        vocabulary_tokens(tiny_llama, excerpts, is_train, cfg.replace(seed=5), neurons, scans, tmp_path, "c")
    assert vocabulary_tokens(tiny_llama, excerpts, is_train, preset("paper"), neurons, scans, tmp_path, "c") is None


def test_nothing_to_measure_is_an_empty_layer_not_an_error(tiny_llama):
    scales = {1: (torch.ones(48), torch.ones(48))}
    for windows, tokens in ((np.zeros((0, 4), np.int64), np.arange(4, 9)), (np.array([[5, 6, 7]]), np.zeros(0, np.int64))):
        got = measure(tiny_llama, windows, tokens, scales, 0.5)
        assert list(got.layers) == [1] and len(got.layers[1].tokens) == 0
        assert got.for_neuron(NeuronId(1, 0, Sign.POSITIVE), 1.0) is None


def test_a_feature_learns_tokens_its_excerpts_never_show_from_its_vocabulary():
    import n2g
    from planted import text

    def family(x):  # fires on 8, 21 and 22; the training text shows only 8
        return ((x == 8) | (x == 21) | (x == 22)).float()

    train = text(1, [[8]])
    plain = n2g.distill(family, train, augment=False)
    model = n2g.distill(family, train, augment=False, vocabulary=128)
    assert {21, 22} <= model.graph_.tokens() and not {21, 22} & plain.graph_.tokens()
    probe = torch.tensor([[41, 21, 50, 22, 60, 23, 70, 8, 40, 120]])
    np.testing.assert_array_equal(model.predict_normalised(probe)[0] >= 0.5, family(probe).numpy()[0] >= 0.5)
    assert model.scores_["token_lookup"] == plain.scores_["token_lookup"]  # lookups and scores never see it
    off = n2g.distill(family, train, config=preset("default", vocabulary=0), augment=False, vocabulary=128)
    assert off.graph_.tokens() == plain.graph_.tokens()
    for bad in (0, -3, True, "128", 1.5):
        with pytest.raises(n2g.N2GError, match="vocabulary must be the feature's vocabulary size"):
            n2g.distill(family, train, vocabulary=bad)


def test_sequence_contexts_are_seeded_windows_of_distinct_sequences():
    from n2g.vocabulary import sequence_contexts

    seqs = [list(range(100 * i, 100 * i + n)) for i, n in enumerate((3, 0, 20, 9, 30))]
    got = sequence_contexts(seqs, 3, 5, 0)
    assert got == sequence_contexts(seqs, 3, 5, 0) and len(got) == 3
    assert len({w[0] // 100 for w in got}) == 3 and all(len(w) == min(5, len(seqs[w[0] // 100])) for w in got)
    assert all(w == list(range(w[0], w[0] + len(w))) for w in got)
    assert sequence_contexts(seqs, 10, 5, 0).__len__() == 4 and sequence_contexts([[], []], 2, 5, 0) == []
