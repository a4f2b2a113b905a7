"""The scan's activation store: what it keeps, the cache it is saved in, and fitting from it."""

import json
import logging
import os
import time
import pickle

import numpy as np
import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g.activations import partition, stored_excerpts
from n2g.config import preset
from n2g.distill import pool_size, top_k
from n2g.engine import fit_many, store_job
from n2g.models import SubjectModel
from n2g.records import NeuronId, Sign
from n2g.scan import _cache_stem, _model_key, peak_exponents, scan_layers


class Counting(SubjectModel):
    """A subject model that counts the token positions it runs."""

    positions = 0

    def layer_activations(self, ids, mask, layers):
        Counting.positions += int(ids.numel())
        return super().layer_activations(ids, mask, layers)


def _model():
    torch.manual_seed(0)
    return Counting(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-store")


def test_the_store_holds_every_token_activation_of_every_neuron():
    model = _model()
    excerpts = torch.randint(4, 68, (40, 16))
    scans = scan_layers(model, excerpts, [0, 2], k=8, pool_size=10, progress=False)
    truth = model.layer_activations(excerpts, None, [0, 2])
    for layer in (0, 2):
        store = scans[layer].store
        assert store.n_stored == 40 and store.values.dtype == np.float16
        for index in (0, 3, 7):
            np.testing.assert_allclose(store.neuron(index), truth[layer][:, :, index].numpy(), rtol=2e-3, atol=2e-3)
        # The negative side reads the same store, negated.
        np.testing.assert_allclose(scans[layer].activations(3, Sign.NEGATIVE, [5, 9]), -store.neuron(3, [5, 9]))


def test_a_token_budget_keeps_a_seeded_subset_that_contains_the_pool():
    keep = stored_excerpts(100, 16, 16 * 30, seed=0)
    assert len(keep) == 30 and list(keep) == sorted(keep)
    assert list(stored_excerpts(100, 16, None)) == list(range(100))
    model = _model()
    excerpts = torch.randint(4, 68, (100, 16))
    scan = scan_layers(model, excerpts, [1], k=8, pool_size=10, progress=False, store_tokens=16 * 30)[1]
    assert set(scan.pool) <= set(scan.store.excerpts.tolist())
    assert scan.store.n_stored == 30


def test_stores_that_fit_neither_disk_nor_memory_are_refused_with_a_budget_that_fits(tmp_path, monkeypatch):
    import re

    from n2g import scan as scan_module
    from n2g.errors import N2GError

    model = _model()  # d_mlp 64: a store of 100 excerpts x 16 tokens is 204,800 bytes a layer
    excerpts = torch.randint(4, 68, (100, 16))
    per_layer = 2 * model.d_mlp * 100 * 16
    monkeypatch.setattr(scan_module, "_free_bytes", lambda folder: per_layer // 2)  # no layer fits the disk
    monkeypatch.setattr(scan_module, "_available_memory", lambda: per_layer)  # 3/4 of one layer in memory
    Counting.positions = 0
    with pytest.raises(N2GError) as refused:
        scan_layers(model, excerpts, [0, 1], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    message = str(refused.value)
    assert "\n" not in message and "each of the 2 layers" in message and "needs 0.2 MB" in message
    assert Counting.positions == 0 and not list((tmp_path / "scans").glob("*.npy*"))  # refused before any work
    budget = int(re.search(r"--store-tokens (\d+)", message).group(1))
    # Disk for half a layer, memory for 3/4 of one: one store of 50 excerpts on disk, one in memory.
    assert budget == 50 * 16
    scans = scan_layers(model, excerpts, [0, 1], k=8, pool_size=10, progress=False, cache_dir=tmp_path,
                        corpus_key="c", store_tokens=budget)
    assert scans[0].store.n_stored == 50 and scans[1].store.n_stored == 50
    # Where even the random pool cannot be kept, the advice is fewer layers per run.
    monkeypatch.setattr(scan_module, "_available_memory", lambda: per_layer // 20)
    monkeypatch.setattr(scan_module, "_free_bytes", lambda folder: 0)
    with pytest.raises(N2GError, match=r"scan fewer layers per run \(--layers\)"):
        scan_layers(model, excerpts, [0, 1, 2], k=8, pool_size=10, progress=False, cache_dir=tmp_path / "b",
                    corpus_key="c")
    # Memory that holds the stores, however little disk: scanned whole, as before.
    monkeypatch.setattr(scan_module, "_available_memory", lambda: 10 * per_layer)
    assert scan_layers(model, excerpts, [0, 1, 2], k=8, pool_size=10, progress=False, cache_dir=tmp_path / "c",
                       corpus_key="c")[2].store.n_stored == 100

def test_partition_is_seeded_and_holds_out_the_asked_fraction():
    a, b = partition(1000, 0.5, seed=0), partition(1000, 0.5, seed=0)
    assert (a == b).all() and int((~a).sum()) == 500
    assert (partition(1000, 0.5, seed=1) != a).any()
    assert int((~partition(10, 0.3)).sum()) == 3


def test_partition_keeps_the_copies_of_a_repeated_excerpt_on_one_side():
    # A corpus of repeated documents: a random split puts copies of most excerpts on both sides, and the held-out
    # scores of every lookup (and graph) then measure memorised text (on 24 documents x 4 copies: held-out F1
    # 0.92 for n2g and 0.94 for a 3-gram lookup, 0.74 and 0.71 once the copies stay together).
    rng = np.random.default_rng(0)
    distinct = rng.integers(0, 1000, (50, 8))
    excerpts = distinct[rng.integers(0, 50, 400)]
    plain, together = partition(400, 0.5, 3), partition(400, 0.5, 3, excerpts)
    rows = lambda side: {r.tobytes() for r in excerpts[side]}
    assert rows(plain) & rows(~plain), "the plain draw leaks: the case this guards against"
    assert not rows(together) & rows(~together)
    assert 150 <= int((~together).sum()) <= 250  # still about half held out
    assert (partition(400, 0.5, 3, torch.from_numpy(excerpts)) == together).all()  # a tensor as an array
    assert (partition(400, 0.5, 3, excerpts.tolist()) == together).all()  # sequences as an array
    unique = np.arange(400 * 8).reshape(400, 8)
    assert (partition(400, 0.5, 3, unique) == plain).all(), "a corpus without repeats is split as before"
    # one distinct excerpt: all training (as one excerpt is), never all held out
    assert partition(10, 0.5, 0, np.zeros((10, 4))).all() and partition(1, 0.5, 0, np.zeros((1, 4))).all()
    assert (~partition(10, 0.5, 0, np.eye(10)[[0] * 9 + [1]])).any()


def test_a_cached_scan_is_reused_without_running_the_model(tmp_path):
    model = _model()
    excerpts = torch.randint(4, 68, (40, 16))
    first = scan_layers(model, excerpts, [0, 1], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    Counting.positions = 0
    again = scan_layers(model, excerpts, [0, 1], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions == 0
    for layer in (0, 1):
        assert torch.equal(first[layer].top_idx, again[layer].top_idx)
        np.testing.assert_array_equal(np.asarray(first[layer].store.values), np.asarray(again[layer].store.values))
    # Only safetensors, JSON and a plain .npy: nothing that unpickles.
    names = sorted(p.suffixes[-1] for p in (tmp_path / "scans").iterdir())
    assert set(names) == {".json", ".safetensors", ".npy"}
    from n2g.fileio import FILE_MODE  # every file with the user's umask (mkstemp and safetensors made them 0600)

    assert {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "scans").iterdir()} == \
        {p.name: oct(FILE_MODE) for p in (tmp_path / "scans").iterdir()}


def test_other_weights_or_another_dtype_behind_the_same_name_are_scanned_again(tmp_path):
    excerpts = torch.randint(4, 68, (40, 16))
    first = scan_layers(_model(), excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    torch.manual_seed(1)  # same name, same config, other weights (a checkpoint overwritten in place)
    other = Counting(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-store")
    Counting.positions = 0
    again = scan_layers(other, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0  # the model ran: nothing of the first model's scan was served
    truth = other.layer_activations(excerpts, None, [0])[0]
    np.testing.assert_allclose(again[0].store.neuron(3), truth[:, :, 3].numpy(), rtol=2e-3, atol=2e-3)
    assert not np.allclose(first[0].store.neuron(3), again[0].store.neuron(3), atol=1e-3)
    half = _model()
    half.model.to(torch.bfloat16)
    half.dtype = torch.bfloat16
    assert len({m.weights_key() for m in (_model(), other, half)}) == 3
    Counting.positions = 0
    scan_layers(half, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0
    Counting.positions = 0  # and the first model, unchanged, still finds its own entry
    scan_layers(_model(), excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions == 0


def test_the_same_model_by_another_spelling_of_its_path_shares_a_scan(tmp_path):
    excerpts = torch.randint(4, 68, (40, 16))
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "models")
    first = _model()
    first.spec = str(tmp_path / "models" / "tiny")
    scan_layers(first, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    renamed = _model()
    renamed.spec = str(tmp_path / "link" / ".." / "link" / "tiny") + "/"
    Counting.positions = 0
    scan_layers(renamed, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions == 0
    elsewhere = _model()  # the same sampled weights key at another location: two copies may differ in a few weights
    elsewhere.spec = "/another/path/to/tiny-llama"
    scan_layers(elsewhere, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0
    Counting.positions = 0
    renamed.bos_token_id = 5  # a different first token changes every activation: scanned again
    scan_layers(renamed, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0
    edited = _model()  # the same weights in a folder whose config.json says another epsilon
    edited.model.config.rms_norm_eps = 0.5
    for layer in edited.model.model.layers:
        layer.input_layernorm.variance_epsilon = layer.post_attention_layernorm.variance_epsilon = 0.5
    Counting.positions = 0
    other = scan_layers(edited, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0
    np.testing.assert_allclose(other[0].store.neuron(3), edited.layer_activations(excerpts, None, [0])[0][:, :, 3].numpy(),
                               rtol=2e-3, atol=2e-3)


def test_a_scan_another_process_is_making_is_waited_for_then_loaded(tmp_path):
    import shutil
    import threading

    from n2g.scan import _scan_lock

    model, excerpts = _model(), torch.randint(4, 68, (40, 16))
    reference = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path / "a",
                            corpus_key="c")[0]
    made = _cache_stem(tmp_path / "a", *_model_key(model), "c", 0, 8, 10, 0, f"{1 << 17}|{model.weights_key()}")
    for folder, holder_writes in ((tmp_path / "b", True), (tmp_path / "c", False)):
        stem = _cache_stem(folder, *_model_key(model), "c", 0, 8, 10, 0, f"{1 << 17}|{model.weights_key()}")
        stem.parent.mkdir(parents=True)
        got = {}

        def waiter():
            got.update(scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=folder,
                                   corpus_key="c"))

        with _scan_lock(stem, 0) as waited:  # the other process, scanning the same entry
            assert waited is False
            Counting.positions = 0
            thread = threading.Thread(target=waiter)
            thread.start()
            thread.join(1.0)
            assert thread.is_alive() and Counting.positions == 0  # waiting, not scanning
            if holder_writes:
                for suffix in (".safetensors", ".acts.npy", ".json"):  # the JSON last, as a scan saves it
                    shutil.copy(made.with_suffix(suffix), stem.with_suffix(suffix))
        thread.join(60)
        assert not thread.is_alive() and torch.equal(got[0].top_idx, reference.top_idx)
        assert (Counting.positions == 0) is holder_writes  # loaded what the other made; scanned if it made nothing
        assert not list(stem.parent.glob("*.lock"))


def test_pool_statistics_computed_a_slice_of_neurons_at_a_time_are_the_same(monkeypatch):
    import n2g.scan as scan_module

    model, excerpts = _model(), torch.randint(4, 68, (40, 16))
    whole = scan_layers(model, excerpts, [1], k=8, pool_size=10, progress=False)[1]
    monkeypatch.setattr(scan_module, "POOL_VALUES_AT_ONCE", 7 * 10 * 16)  # 7 neurons of 10 pool excerpts at a time
    sliced = scan_layers(model, excerpts, [1], k=8, pool_size=10, progress=False)[1]
    assert whole.quantiles.shape == sliced.quantiles.shape == (len(scan_module.QUANTILES), model.d_mlp)
    for name in ("quantiles", "pos_rate", "neg_rate"):
        assert torch.equal(getattr(whole, name), getattr(sliced, name)), name
    assert whole.n_pool_tokens == sliced.n_pool_tokens == 160


def test_a_fresh_cache_is_locked_too(tmp_path, monkeypatch):
    import n2g.scan as scan_module

    real, seen = scan_module._scan_lock, []

    def spy(stem, layer):
        seen.append(stem.parent.is_dir())  # the lock file can be made only where its folder exists
        return real(stem, layer)

    monkeypatch.setattr(scan_module, "_scan_lock", spy)
    scan_layers(_model(), torch.randint(4, 68, (40, 16)), [0, 1], k=8, pool_size=10, progress=False,
                cache_dir=tmp_path / "new", corpus_key="c")
    assert seen == [True, True]


def test_a_scan_cache_that_cannot_be_saved_is_a_warning_and_leaves_no_files(tmp_path, monkeypatch, caplog):
    import n2g.scan as scan_module

    def full(scan, stem):  # safetensors reports a full disk with an error of its own, not an OSError
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(scan_module, "_save", full)
    model, excerpts = _model(), torch.randint(4, 68, (40, 16))
    scans = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    truth = model.layer_activations(excerpts, None, [0])[0]
    np.testing.assert_allclose(scans[0].store.neuron(3), truth[:, :, 3].numpy(), rtol=2e-3, atol=2e-3)  # still readable
    assert list((tmp_path / "scans").iterdir()) == []
    assert any("cannot save the scan cache" in r.getMessage() and "No space left" in r.getMessage() for r in caplog.records)


class _Planted:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['N2G_PLANT_MARK']}",))


def test_a_pickle_planted_in_the_scan_cache_never_runs(tmp_path, monkeypatch):
    model = _model()
    excerpts = torch.randint(4, 68, (40, 16))
    mark = tmp_path / "pwned"
    monkeypatch.setenv("N2G_PLANT_MARK", str(mark))
    stem = _cache_stem(tmp_path, *_model_key(model), "c", 0, 8, 10, 0, f"{1 << 17}|{model.weights_key()}")
    stem.parent.mkdir(parents=True)
    payload = pickle.dumps(_Planted())
    for suffix in (".pt", ".safetensors", ".acts.npy"):
        stem.with_suffix(suffix).write_bytes(payload)
    stem.with_suffix(".json").write_text('{"version": 3, "layer": 0, "pool": [], "n_pool_tokens": 0, "fire_threshold": 0.5}')
    scans = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert not mark.exists()
    assert scans[0].store.n_stored == 40  # rescanned, then saved over the planted files
    assert np.load(stem.with_suffix(".acts.npy"), allow_pickle=False).shape[1] == 40


def test_an_unwritable_scan_cache_warns_and_goes_on(tmp_path, caplog):
    model = _model()
    excerpts = torch.randint(4, 68, (40, 16))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache folder should be")  # unwritable even for root
    with caplog.at_level(logging.WARNING):
        scans = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=blocker, corpus_key="c")
    assert scans[0].store.n_stored == 40 and scans[0].store.path is None
    assert "keeping it in memory" in caplog.text


def test_fitting_from_the_store_runs_no_stored_excerpt_again_and_batches_like_alone(monkeypatch):
    model = _model()
    excerpts = torch.randint(4, 68, (80, 16))
    cfg = preset("default")
    scans = scan_layers(model, excerpts, [0, 2], k=top_k(cfg), pool_size=pool_size(cfg), progress=False)
    is_train = partition(80, cfg.held_out, cfg.seed)
    jobs = [store_job(scans[l], NeuronId(l, i, s), is_train) for l in (0, 2) for i in (1, 5) for s in Sign]
    import sys

    distill_module = sys.modules["n2g.distill"]
    from n2g.features import Evaluate

    asked = []

    class Recorded(Evaluate):
        def __init__(self, seqs):
            asked.append(len(seqs))
            super().__init__(seqs)

    monkeypatch.setattr(distill_module, "Evaluate", Recorded)
    alone = fit_many(model, excerpts.tolist(), jobs, cfg, group_size=1)
    together = fit_many(model, excerpts.tolist(), jobs, cfg, group_size=len(jobs))
    assert asked == []  # every example excerpt came from the store; only new text ran
    for job in jobs:
        a, b = alone[job.neuron], together[job.neuron]
        assert a.status == b.status
        if a.graph is not None:
            assert a.graph.stats() == b.graph.stats()
            assert a.scores["n2g"].f1 == b.scores["n2g"].f1
    fitted = [f for f in alone.values() if f.graph is not None]
    assert fitted
    for fit in fitted:  # every test excerpt is held out; every training excerpt is not
        assert all(not is_train[e.excerpt_index] for e in fit.examples if e.split == "test")
        assert all(is_train[e.excerpt_index] for e in fit.examples if e.split == "train")


def test_a_killed_scans_half_written_store_is_removed_and_concurrent_names_differ(tmp_path):
    model = _model()
    excerpts = torch.randint(4, 68, (40, 16))
    stem = _cache_stem(tmp_path, *_model_key(model), "c", 0, 8, 10, 0, f"{1 << 17}|{model.weights_key()}")
    stem.parent.mkdir(parents=True)
    from n2g.fileio import HOST, LEGACY_TEMP_AGE

    dead = stem.parent / f".{stem.name}.999999999.abc.acts.npy.tmp"  # no such process
    alive = stem.parent / f".{stem.name}.{os.getpid()}.abc.acts.npy.tmp"  # a scan still running
    here = stem.parent / f".{stem.name}.999999999-{HOST}.abc.acts.npy.tmp"  # this machine's, its process gone
    # in a cache machines share: another machine's scan (its pid is no process here) in flight, and one long gone
    away = stem.parent / f".{stem.name}.999999999-{'0' * 8 if HOST != '0' * 8 else '1' * 8}.abc.acts.npy.tmp"
    gone = stem.parent / away.name.replace(".abc.", ".old.")
    for tmp in (dead, alive, here, away, gone):
        tmp.write_bytes(b"half")
    past = time.time() - LEGACY_TEMP_AGE - 60
    os.utime(gone, (past, past))
    scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert not dead.exists() and alive.exists() and not here.exists() and away.exists() and not gone.exists()
    assert stem.with_suffix(".acts.npy").exists()
    assert all(f"{os.getpid()}-{HOST}" not in p.name for p in stem.parent.iterdir())  # this scan's own went in place


class _Interrupted(Counting):
    """Stops the scan at its second batch, as Ctrl-C (or SIGTERM, which n2g turns into the same) would."""

    def layer_activations(self, ids, mask, layers):
        if Counting.positions:
            raise KeyboardInterrupt
        return super().layer_activations(ids, mask, layers)


def test_an_interrupted_scan_leaves_no_half_written_store_in_the_cache(tmp_path):
    torch.manual_seed(0)
    model = _Interrupted(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-store")
    Counting.positions = 0
    with pytest.raises(KeyboardInterrupt):
        scan_layers(model, torch.randint(4, 68, (40, 16)), [0, 1], k=8, pool_size=10, progress=False, batch_size=8,
                    cache_dir=tmp_path, corpus_key="c")
    assert Counting.positions > 0 and list((tmp_path / "scans").iterdir()) == []


def test_a_store_the_disk_cannot_hold_is_kept_in_memory_not_a_crash_later(tmp_path, monkeypatch, caplog):
    import errno

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with caplog.at_level(logging.WARNING, logger="n2g"):
        scans = scan_layers(_model(), torch.randint(4, 68, (40, 16)), [0], k=8, pool_size=10, progress=False,
                            cache_dir=tmp_path, corpus_key="c")
    assert scans[0].store.path is None and scans[0].store.n_stored == 40
    assert any("No space left" in r.getMessage() and "keeping it in memory" in r.getMessage() for r in caplog.records)
    assert not [p for p in (tmp_path / "scans").iterdir() if p.name.endswith(".tmp")]


def test_a_cached_store_with_non_finite_values_is_rescanned_not_used(tmp_path, caplog):
    model, excerpts = _model(), torch.randint(4, 68, (40, 16))
    first = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    clean = np.array(first[0].store.values)
    path = next((tmp_path / "scans").glob("*.acts.npy"))
    values = np.load(path, mmap_mode="r+")
    values[2, 5, 3] = np.inf  # damaged bytes on disk
    values.flush()
    del values
    with caplog.at_level(logging.WARNING, logger="n2g"):
        again = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert any("ignoring unreadable scan cache" in r.getMessage() and "NaN or infinite" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(np.asarray(again[0].store.values), clean)


@pytest.mark.parametrize("pool", [[99999], [-3]])
def test_a_cached_scan_naming_excerpts_outside_the_corpus_is_rescanned_not_used(tmp_path, caplog, pool):
    # an edited or damaged entry whose pool names excerpt 99999 crashed a later step with an IndexError;
    # -3 was taken as the third from the end
    model, excerpts = _model(), torch.randint(4, 68, (40, 16))
    first = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    meta_path = next((tmp_path / "scans").glob("*.json"))
    meta = json.loads(meta_path.read_text())
    meta["pool"][0] = pool[0]
    meta_path.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="n2g"):
        again = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, cache_dir=tmp_path, corpus_key="c")
    assert any("ignoring unreadable scan cache" in r.getMessage() and "pool" in r.getMessage() for r in caplog.records)
    assert again[0].pool == first[0].pool and min(again[0].pool) >= 0


def test_a_cache_path_too_long_to_use_scans_without_the_cache(tmp_path, caplog):
    deep = tmp_path / ("a" * 300)  # one name longer than any file system allows
    with caplog.at_level(logging.WARNING, logger="n2g"):
        scans = scan_layers(_model(), torch.randint(4, 68, (40, 16)), [0], k=8, pool_size=10, progress=False,
                            cache_dir=deep, corpus_key="c")
    assert scans[0].store.n_stored == 40 and scans[0].store.path is None
    assert any("name too long" in r.getMessage().lower() for r in caplog.records)


class _Scaled(SubjectModel):
    """One neuron's activations times a factor: 1e8 (beyond float16) or 1e-9 (a neuron whose weights were scaled far
    down, below its resolution)."""

    neuron, factor = 3, 1e8

    def layer_activations(self, ids, mask, layers):
        out = {}
        for layer, a in super().layer_activations(ids, mask, layers).items():
            scale = torch.ones(a.shape[-1], dtype=a.dtype, device=a.device)
            scale[self.neuron] = self.factor
            out[layer] = a * scale
        return out


class _Faint(_Scaled):
    neuron, factor = 5, 1e-9


def test_activations_beyond_the_float16_range_are_stored_scaled_not_clipped(tmp_path):
    # The store kept such a neuron at +-65,504 while scores divided by its true maximum (1e6 and more), so it fitted
    # as "nofire". Now it is kept divided by a power of two, exactly as float16 keeps any other neuron.
    torch.manual_seed(0)
    model = _Scaled(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-large")
    excerpts = torch.randint(4, 68, (40, 16))
    scan = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, batch_size=7, cache_dir=tmp_path)[0]
    cached = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False, batch_size=7, cache_dir=tmp_path)[0]
    assert cached.store is not scan.store and np.array_equal(cached.store.neuron(3), scan.store.neuron(3))
    truth = model.layer_activations(excerpts, None, [0])[0].permute(2, 0, 1).numpy()  # [d, n, length]
    assert np.abs(truth[3]).max() > 65504
    got = scan.store.neuron(3)
    assert np.allclose(got, truth[3], rtol=1e-3, atol=1e-3 * np.abs(truth[3]).max())
    assert float(got.max()) == pytest.approx(float(scan.top_val[0, 3]), rel=1e-3)
    assert scan.store.exponents[3] > 0 and not np.delete(scan.store.exponents, 3).any()  # the others as before
    assert np.array_equal(scan.store.exponents, peak_exponents(scan.top_val, scan.bot_val))  # what a cached scan reads
    assert np.array_equal(scan.store.neuron(2), truth[2].astype(np.float16).astype(np.float32))


def test_activations_below_the_float16_resolution_are_stored_scaled_not_lost():
    # Stored as 0, such a neuron fitted as "nofire": its graph empty, its page saying it fires on 0 % of the corpus.
    torch.manual_seed(0)
    model = _Faint(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama-faint")
    excerpts = torch.randint(4, 68, (40, 16))
    scan = scan_layers(model, excerpts, [0], k=8, pool_size=10, progress=False)[0]
    truth = model.layer_activations(excerpts, None, [0])[0][:, :, 5].numpy()
    got = scan.store.neuron(5)
    assert float(np.abs(truth).max()) < 1e-8 and scan.store.exponents[5] < 0
    assert np.allclose(got, truth, rtol=1e-3, atol=1e-3 * np.abs(truth).max())
    assert float(scan.stats(5, Sign.POSITIVE).quantiles["0.999"]) == pytest.approx(
        float(np.quantile(truth[np.isin(np.arange(40), scan.pool)], 0.999)), rel=1e-2)


def test_a_store_whose_peak_grows_batch_by_batch_rescales_what_it_wrote():
    from n2g.activations import ActivationStore, store_exponents

    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((2, 4, 3)).astype(np.float32) for _ in range(4)]
    rows[0][..., 0] *= 1e-12  # neuron 0: faint, then ordinary, then beyond float16
    rows[2][..., 0] *= 1e5
    rows[3][..., 0] *= 1e9
    rows[1][..., 1] *= 1e7  # neuron 1: beyond float16 from its second batch on; neuron 2 ordinary throughout
    store = ActivationStore.create(3, np.arange(8), 4, None)
    seen = []
    for b, block in enumerate(rows):
        store.write(np.arange(2 * b, 2 * b + 2), torch.from_numpy(block))
        seen.append(int(store.exponents[0]))
    assert seen[0] < 0 and seen[1] == 0 < seen[2] < seen[3]  # the exponent follows the peak
    truth = np.concatenate(rows).transpose(2, 0, 1)
    assert np.array_equal(store.exponents, store_exponents(np.abs(truth).reshape(3, -1).max(1)).numpy())
    for n in range(3):  # every row as exact as float16 keeps it relative to the neuron's peak
        assert np.allclose(store.neuron(n), truth[n], rtol=1e-3, atol=1e-4 * np.abs(truth[n]).max())
    assert np.array_equal(store.neuron(2), truth[2].astype(np.float16).astype(np.float32))


def test_a_run_made_with_other_options_is_refused_naming_the_options(tmp_path):
    # the message named run.json's keys alone ("a different corpus_fingerprint, corpus_tokens, n_excerpts"), which
    # a user who changed --max-excerpts or --preset cannot map to what they typed
    from n2g.errors import N2GError
    from n2g.store import RunStore

    ident = {"corpus": "c.txt", "corpus_fingerprint": "f1", "n_excerpts": 512, "excerpt_length": 64,
             "config": {"preset": "default", "min_count": 2, "augment": True}}
    RunStore(tmp_path / "run").open(ident)
    other = {**ident, "corpus_fingerprint": "f2", "n_excerpts": 128,
             "config": {"preset": "paper", "min_count": 2, "augment": False}}
    with pytest.raises(N2GError) as err:
        RunStore(tmp_path / "run").open(other)
    assert ("holds a run made with a different config (settings: augment True then, False now, preset 'default' then, "
            "'paper' now), corpus_fingerprint (--corpus), n_excerpts (--max-excerpts: 512 then, 128 now); choose another "
            "--out") in str(err.value), str(err.value)
