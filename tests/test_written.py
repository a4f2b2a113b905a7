"""Model-written text: rare tokens the corpus cannot value become graph evidence (n2g.written)."""
import numpy as np
import pytest
import torch

import n2g
from n2g.activations import partition
from n2g.config import preset
from n2g.engine import store_job
from n2g.records import NeuronId, Sign
from n2g.written import measure, nucleus_sample, openings, shown_tokens, single_tokens, write_excerpts, written_excerpts, written_tokens
from planted import text

FIRES_ON = (8, 21, 22)


def family(x):
    return sum((x == t) for t in FIRES_ON).float()


def corpus_and_written():
    """Training text shows activator 8 only; the written rows show 21, 22 and the quiet 23 often."""
    train = text(1, [[8]])
    g = torch.Generator().manual_seed(7)
    rows = torch.randint(30, 100, (40, 32), generator=g)
    for b in range(40):
        rows[b, 5], rows[b, 15], rows[b, 25] = 21 if b % 2 else 22, 23, 23
    return train, rows


def test_written_text_teaches_tokens_the_corpus_never_shows():
    train, rows = corpus_and_written()
    plain = n2g.distill(family, train, augment=False)
    model = n2g.distill(family, train, augment=False, written=rows)
    assert {21, 22} <= model.graph_.tokens() and not {21, 22} & plain.graph_.tokens()
    assert 23 not in model.graph_.tokens() or model.predict_normalised(torch.tensor([[23]]))[0, 0] < 0.5
    probe = torch.tensor([[41, 21, 50, 22, 60, 23, 70, 8, 40]])
    np.testing.assert_array_equal(model.predict_normalised(probe)[0] >= 0.5, family(probe).numpy()[0] >= 0.5)
    assert (plain.predict_normalised(probe)[0] >= 0.5).tolist() != (family(probe).numpy()[0] >= 0.5).tolist()
    # the lookups and scores never see the written text: the baselines are those of the plain fit
    assert model.scores_["token_lookup"] == plain.scores_["token_lookup"]
    off = n2g.distill(family, train, config=preset("default", written=0), augment=False, written=rows)
    assert off.graph_.tokens() == plain.graph_.tokens()


def test_written_text_is_no_evidence_for_tokens_the_corpus_shows():
    # 25 fires after 26 only; the corpus shows 25 often, never after 26; the written text shows "26 25" everywhere
    def after26(x):
        prev = torch.nn.functional.pad(x, (1, 0), value=-1)[:, :-1]
        return (((x == 25) & (prev == 26)) | (x == 8)).float()

    train = text(1, [[8], [25]])
    rows = torch.tensor([[26, 25] * 16] * 20)
    model = n2g.distill(after26, train, augment=False, written=rows)
    assert model.predict_normalised(torch.tensor([[26, 25]]))[0, 1] < 0.5  # the corpus never showed it firing
    assert 26 not in model.graph_.tokens()  # a token only the written text shows is evidence, quiet here


def test_single_tokens_keeps_what_training_shows_fewer_than_min_count_times():
    training = [np.array([5, 5, 6, 7]), np.array([7, 9])]
    ids, acts = single_tokens([np.array([5, 6, 11, 7, 6])], [np.array([0.1, 0.2, 0.3, 0.4, 0.5])], training, 2)
    assert ids.tolist() == [6, 11, 6] and acts.tolist() == pytest.approx([0.2, 0.3, 0.5])
    assert shown_tokens(np.array([[5, 5, 6], [7, 7, 7]]), np.array([True, False]), 2).tolist() == [5]


def test_openings_are_a_seeded_choice_of_training_excerpts():
    excerpts = np.arange(60).reshape(10, 6)
    is_train = np.array([True, False] * 5)
    a = openings(excerpts, is_train, 3, 2, seed=0)
    assert a.shape == (3, 2) and all(row[0] % 12 == 0 for row in a)  # rows 0, 2, 4, 6, 8 are training
    assert np.array_equal(a, openings(excerpts, is_train, 3, 2, seed=0))
    assert openings(excerpts, is_train, 99, 2, seed=0).shape == (5, 2)  # at most one per training excerpt
    assert openings(excerpts, is_train, 3, 6, seed=0).shape == (0, 6)  # nothing left to write


def test_the_model_writes_whole_seeded_excerpts(tiny_llama):
    prompts = np.array([[4, 5, 6], [7, 8, 4]])
    a = write_excerpts(tiny_llama, prompts, 12, seed=3)
    assert a.shape == (2, 12) and np.array_equal(a[:, :3], prompts)
    assert np.array_equal(a, write_excerpts(tiny_llama, prompts, 12, seed=3))
    assert not np.array_equal(a, write_excerpts(tiny_llama, prompts, 12, seed=4))
    ordinary = tiny_llama.ordinary_tokens()
    assert all(ordinary[t] for t in a[:, 3:].ravel().tolist())  # no end of text, padding or unknown id
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    write_excerpts(tiny_llama, prompts, 12, seed=3)
    assert torch.rand(1) == before  # the caller's random state is left alone


def test_nucleus_sampling_draws_from_the_top_p_tokens_in_proportion():
    # 5 likely tokens hold 0.9 of the mass, 995 unlikely ones 0.1: with top-p 0.9 only the 5 are drawn,
    # each in proportion to its probability; the suppressed token (-inf) never
    probs = np.full(1000, 0.1 / 995)
    probs[[3, 10, 500, 700, 999]] = [0.4, 0.2, 0.15, 0.1, 0.05]
    scores = torch.tensor(np.log(probs), dtype=torch.float32).repeat(4000, 1)
    scores[:, 10] = float("-inf")  # suppressed: what is left renormalises to 0.5, 0.1875, 0.125, 0.0625, ...
    picks = nucleus_sample(scores, 0.7, torch.Generator().manual_seed(0)).numpy()
    kept = {3: 0.4, 500: 0.15, 700: 0.1}  # 0.5 + 0.1875 < 0.7 <= 0.5 + 0.1875 + 0.125: exactly these three
    assert set(np.unique(picks).tolist()) == set(kept)
    total = sum(kept.values())
    for t, q in kept.items():
        assert abs(np.mean(picks == t) - q / total) < 0.03
    again = nucleus_sample(scores, 0.7, torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(picks, again)  # seeded by its own generator


def test_nucleus_sampling_widens_to_flat_rows_and_keeps_the_top_token():
    flat = torch.zeros(3, 5000)  # top-p 0.95 of a flat row needs 4,750 tokens, far past the first topk
    flat[1, 7] = 50.0  # all the mass on one token: it is the whole nucleus
    picks = nucleus_sample(flat, 0.95, torch.Generator().manual_seed(1))
    assert picks[1] == 7 and 0 <= picks[0] < 5000 and 0 <= picks[2] < 5000
    many = nucleus_sample(torch.zeros(20000, 5000), 0.95, torch.Generator().manual_seed(2)).numpy()
    assert len(np.unique(many)) > 3000  # spread over the whole nucleus, not the first 256


def test_measure_keeps_rare_tokens_after_the_prompt_with_their_activations(tiny_llama):
    written = np.array([[4, 9, 9, 10, 4, 11], [9, 4, 12, 4, 13, 9]])
    common = np.array([4])
    got = measure(tiny_llama, written, 2, common, {1: [5, 3], 2: [0]})
    assert got.ids.tolist() == [9, 10, 11, 12, 13, 9]
    full = tiny_llama.layer_activations(torch.tensor(written), None, [1, 2])
    keep = np.array([[0, 0, 1, 1, 0, 1], [0, 0, 1, 0, 1, 1]], bool)
    np.testing.assert_allclose(got.acts[1][:, got.columns[1][5]], full[1][torch.tensor(keep)][:, 5].numpy(), atol=2e-3)
    np.testing.assert_allclose(got.acts[2][:, got.columns[2][0]], full[2][torch.tensor(keep)][:, 0].numpy(), atol=2e-3)
    pos = got.for_neuron(NeuronId(1, 3, Sign.POSITIVE), 2.0)
    neg = got.for_neuron(NeuronId(1, 3, Sign.NEGATIVE), 4.0)
    np.testing.assert_allclose(neg[1], -pos[1] / 2, atol=1e-6)
    assert got.for_neuron(NeuronId(1, 4, Sign.POSITIVE), 1.0) is None  # not measured
    assert got.for_neuron(NeuronId(1, 3, Sign.POSITIVE), 0.0) is None  # dead on this corpus


def test_written_excerpts_are_cached_and_reused(tiny_llama, tmp_path, monkeypatch):
    excerpts = np.random.default_rng(0).integers(4, 60, (12, 16))
    is_train = partition(12, 0.5, 0)
    first = written_excerpts(tiny_llama, excerpts, is_train, 4, 3, 0, tmp_path, "corpus-a")
    assert first.shape == (4, 16) and len(list((tmp_path / "written").glob("*.npy"))) == 1

    def refuse(*a, **k):
        raise AssertionError("written again")

    monkeypatch.setattr("n2g.written.write_excerpts", refuse)
    assert np.array_equal(written_excerpts(tiny_llama, excerpts, is_train, 4, 3, 0, tmp_path, "corpus-a"), first)
    with pytest.raises(AssertionError):  # another corpus is written anew
        written_excerpts(tiny_llama, excerpts, is_train, 4, 3, 0, tmp_path, "corpus-b")
    (next((tmp_path / "written").glob("*.npy"))).write_bytes(b"damaged")
    monkeypatch.undo()
    assert np.array_equal(written_excerpts(tiny_llama, excerpts, is_train, 4, 3, 0, tmp_path, "corpus-a"), first)


def test_a_killed_writers_temporaries_in_the_caches_are_removed_by_the_next_save(tiny_llama, tmp_path):
    # a SIGKILL while the written text or the vocabulary in context was being saved left .NAME.PID-HOST.XXXXXXXX.tmp
    # files in $N2G_CACHE that nothing removed (the scan cache cleans its own); a live writer's stay
    import os

    from n2g.fileio import HOST
    from n2g.vocabulary import LayerVocabulary, _save

    dead = 2 ** 22 + 12345  # above Linux's largest pid
    for folder in ("written", "vocabulary"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / f".x.npy.{dead}-{HOST}.abcdefgh.tmp").write_bytes(b"half")
        (tmp_path / folder / f".x.npy.{os.getpid()}-{HOST}.abcdefgh.tmp").write_bytes(b"live")
    excerpts = np.random.default_rng(0).integers(4, 60, (12, 16))
    written_excerpts(tiny_llama, excerpts, partition(12, 0.5, 0), 4, 3, 0, tmp_path, "corpus-a")
    empty = np.zeros(0, np.int32)
    _save(tmp_path / "vocabulary" / "L1.npz", LayerVocabulary(empty, empty, np.zeros(0, np.float32), np.zeros(0, np.int16)))
    for folder in ("written", "vocabulary"):
        assert sorted(p.name.split(".")[3] for p in (tmp_path / folder).glob(".*.tmp")) == [f"{os.getpid()}-{HOST}"]


def test_a_job_carries_its_neurons_written_evidence(tiny_llama, tmp_path):
    from n2g.scan import scan_layers

    excerpts = torch.as_tensor(np.random.default_rng(1).integers(4, 60, (16, 16)))
    cfg = preset("default", written=6)
    is_train = partition(16, cfg.held_out, cfg.seed)
    scans = scan_layers(tiny_llama, excerpts, [1], k=4, pool_size=4, progress=False)
    tokens = written_tokens(tiny_llama, excerpts, is_train, cfg, [NeuronId(1, 2, Sign.POSITIVE)], tmp_path, "c")
    assert tokens.n_excerpts == 6
    job = store_job(scans[1], NeuronId(1, 2, Sign.POSITIVE), is_train, tokens)
    ids, acts = job.written
    assert len(ids) == len(tokens.ids) > 0
    shown = set(shown_tokens(excerpts.numpy(), is_train, 2).tolist())
    assert not shown & set(ids.tolist())
    assert written_tokens(tiny_llama, excerpts, is_train, preset("paper"), [NeuronId(1, 2, Sign.POSITIVE)], tmp_path, "c") is None


def test_a_very_wide_layer_measures_as_many_written_excerpts_as_fit_the_budget(tiny_llama, monkeypatch):
    written = np.tile(np.arange(9, 21), (10, 1))
    monkeypatch.setattr("n2g.written.MAX_BYTES", 2 * 48 * 12 * 3)  # three excerpts of all 48 neurons
    got = measure(tiny_llama, written, 2, np.array([], np.int64), {0: list(range(48))})
    assert got.n_excerpts == 3 and len(got.ids) == 3 * 10 and got.acts[0].shape == (30, 48)


def test_a_neuron_measures_the_same_written_excerpts_alone_as_among_a_whole_layer(tiny_llama, monkeypatch):
    # The budget is a whole layer's: one counted over the neurons a run asks for measured fewer excerpts for a
    # neuron in a large run (and more for the same neuron fitted alone, or in a resumed run) than the run's others.
    written = np.random.default_rng(0).integers(4, 60, (10, 12))
    monkeypatch.setattr("n2g.written.MAX_BYTES", 2 * 48 * 12 * 3)
    alone = measure(tiny_llama, written, 2, np.array([], np.int64), {0: [5]})
    among = measure(tiny_llama, written, 2, np.array([], np.int64), {0: list(range(48)), 1: [5]})
    assert alone.n_excerpts == among.n_excerpts == 3
    np.testing.assert_array_equal(alone.ids, among.ids)
    np.testing.assert_array_equal(alone.for_neuron(NeuronId(0, 5), 1.0)[1], among.for_neuron(NeuronId(0, 5), 1.0)[1])


def test_a_model_that_cannot_write_leaves_the_corpus_alone(tiny_llama, monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("no cache support\nsecond line")

    monkeypatch.setattr(tiny_llama.model, "generate", broken)
    excerpts = np.random.default_rng(0).integers(4, 60, (8, 16))
    with caplog.at_level("WARNING", logger="n2g"):
        got = written_excerpts(tiny_llama, excerpts, partition(8, 0.5, 0), 4, 3, 0)
    assert got.shape == (0, 16)
    assert "the model cannot write text (RuntimeError: no cache support); fitting from the corpus alone" in caplog.text


def test_a_cache_folder_that_cannot_be_made_still_writes(tiny_llama, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    excerpts = np.random.default_rng(0).integers(4, 60, (8, 16))
    with caplog.at_level("WARNING", logger="n2g"):
        got = written_excerpts(tiny_llama, excerpts, partition(8, 0.5, 0), 4, 3, 0, blocker / "cache")
    assert got.shape == (4, 16) and "writing without it" in caplog.text


def test_a_graph_takes_every_occurrence_of_the_written_tokens_that_fire_there():
    from n2g.distill import written_examples

    ids = np.array([21, 23, 21, 24, 23, 21])
    acts = np.array([0.9, 0.1, 0.2, 0.45, 0.0, 0.7], np.float32)
    got = written_examples((ids, acts), 0.5)
    assert [(e.token_ids, e.activations, e.source) for e in got] == [
        ([21], [pytest.approx(0.9)], "written"), ([21], [pytest.approx(0.2)], "written"), ([21], [pytest.approx(0.7)], "written")]
    assert written_examples(None, 0.5) == []
