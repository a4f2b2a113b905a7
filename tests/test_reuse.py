"""Reuse must never change an answer: a cached scan, written text or vocabulary pass, or a resumed run
directory, gives what a fresh computation gives, or is refused in one line."""

from __future__ import annotations

import random

import pytest

from conftest import save_tiny_folder, tiny_model
from n2g.errors import N2GError
from n2g.pipeline import RunOptions, run

QUICK = {"written": 0, "vocabulary": 0}


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a model folder, and a corpus file (each test its own: some edit it)."""
    return save_tiny_folder(tmp_path, 6)


def fit_one(folder, out, cache, monkeypatch, model=None, **overrides):
    monkeypatch.setenv("N2G_CACHE", str(cache))
    opts = RunOptions(model=str(folder / "model"), corpus=str(folder / "corpus.txt"), layers="0", neurons="5",
                      excerpt_length=32, out=str(out), report=False, progress=False, overrides={**QUICK, **overrides})
    (result,) = run(opts, model=model).results
    return result


def test_model_folder_edited_in_place_is_scanned_again(tiny_folder, tmp_path, monkeypatch):
    """One weight of a model folder changed and saved to the same path: the scan cache must not serve the old
    weights' activations (the weights key samples each tensor and missed it), and the old run is not resumed."""
    from safetensors.torch import load_file, save_file

    cache = tmp_path / "cache"
    before = fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch)
    path = tiny_folder / "model" / "model.safetensors"
    weights = load_file(str(path))
    weights["model.layers.0.mlp.up_proj.weight"][5, 1] *= 50  # one value, between the sampled ones
    save_file(weights, str(path), metadata={"format": "pt"})
    cached = fit_one(tiny_folder, tmp_path / "run2", cache, monkeypatch)
    fresh = fit_one(tiny_folder, tmp_path / "run3", tmp_path / "fresh-cache", monkeypatch)
    assert fresh.stats.max_activation != pytest.approx(before.stats.max_activation)
    assert cached.stats.to_dict() == fresh.stats.to_dict()
    with pytest.raises(N2GError, match="different model_content"):
        fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch)


def test_weights_edited_in_memory_between_two_fits_are_scanned_again(tiny_folder, tmp_path, monkeypatch):
    """A notebook fits a neuron, zeroes part of a weight in place and fits it again with the same model object
    and cache: the second fit must see the edited weights, not the scan keyed on the first ones."""
    import n2g

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    model = n2g.load_model(str(tiny_folder / "model"))
    corpus = n2g.load_corpus(str(tiny_folder / "corpus.txt"), model, length=32)
    before = n2g.fit_neuron(model, layer=0, index=5, corpus=corpus, progress=False, **QUICK)
    model.model.model.layers[0].mlp.up_proj.weight.data[5] *= -3  # .data: no version counter sees it
    again = n2g.fit_neuron(model, layer=0, index=5, corpus=corpus, progress=False, **QUICK)
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "fresh-cache"))
    fresh = n2g.fit_neuron(model, layer=0, index=5, corpus=corpus, progress=False, **QUICK)
    assert fresh.stats_.max_activation != pytest.approx(before.stats_.max_activation)
    assert again.stats_.to_dict() == fresh.stats_.to_dict()
    fit_one(tiny_folder, tmp_path / "run", tmp_path / "cache", monkeypatch, model=model)
    model.model.model.layers[0].mlp.up_proj.weight.data[5] *= 2
    with pytest.raises(N2GError, match="different model_content"):  # the run of the weights before is not resumed
        fit_one(tiny_folder, tmp_path / "run", tmp_path / "cache", monkeypatch, model=model)


def test_a_scan_cached_at_another_fire_threshold_counts_its_firing_rates_again(tiny_folder, tmp_path, monkeypatch):
    """The scan cache is not keyed on the fire threshold; its firing rates were (the share of tokens at or above
    threshold x max), so a fit at 0.2 after one at 0.5 reported the 0.5 rate."""
    cache = tmp_path / "cache"
    at_half = fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch)
    cached = fit_one(tiny_folder, tmp_path / "run2", cache, monkeypatch, fire_threshold=0.2)
    fresh = fit_one(tiny_folder, tmp_path / "run3", tmp_path / "fresh-cache", monkeypatch, fire_threshold=0.2)
    assert fresh.stats.firing_rate > at_half.stats.firing_rate
    assert cached.stats.to_dict() == fresh.stats.to_dict()
    again = fit_one(tiny_folder, tmp_path / "run4", cache, monkeypatch)  # and back: the entry itself is unchanged
    assert again.stats.to_dict() == at_half.stats.to_dict()


def same_result(result) -> dict:
    out = result.to_dict()
    out.pop("seconds")
    return out


@pytest.mark.parametrize("damage", ["truncated", "neurons beyond the layer"])
def test_a_damaged_vocabulary_cache_is_measured_again(tiny_folder, tmp_path, monkeypatch, damage):
    """A truncated vocabulary entry ended the run with zipfile's BadZipFile traceback; one naming neurons the
    layer does not have was read as evidence. Either is now measured again, as a fresh cache would."""
    import numpy as np

    rng = random.Random(0)  # twenty words: the other forty are tokens the corpus never shows
    (tiny_folder / "corpus.txt").write_text(" ".join(rng.choice([f"w{i}" for i in range(20)]) for _ in range(1500)))
    cache = tmp_path / "cache"
    first = fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch, vocabulary=2)
    (entry,) = (cache / "vocabulary").iterdir()
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:-50])
    else:
        with np.load(entry) as z:
            arrays = dict(z)
        assert len(arrays["neurons"])
        arrays["neurons"] = arrays["neurons"] + 1000
        with open(entry, "wb") as f:
            np.savez(f, **arrays)
    again = fit_one(tiny_folder, tmp_path / "run2", cache, monkeypatch, vocabulary=2)
    assert same_result(again) == same_result(first)


def test_a_written_text_cache_holding_ids_that_are_no_tokens_is_written_again(tiny_folder, tmp_path, monkeypatch):
    """A damaged written-text entry whose prompts still match but whose written ids lie beyond the vocabulary
    ended the run with IndexError from the embedding; it is now written again, as a fresh cache would."""
    import numpy as np

    cache = tmp_path / "cache"
    first = fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch, written=8)
    (entry,) = (cache / "written").iterdir()
    written = np.load(entry)
    written[:, -1] = 10**6
    with open(entry, "wb") as f:
        np.save(f, written)
    again = fit_one(tiny_folder, tmp_path / "run2", cache, monkeypatch, written=8)
    assert same_result(again) == same_result(first)
    assert int(np.load(entry).max()) < 10**6  # and the entry is whole again


def test_a_scan_cache_entry_damaged_on_disk_is_scanned_again(tiny_folder, tmp_path, monkeypatch):
    """A region of a cached activation store zeroed on disk still loaded, finite, and every fit read the zeros;
    the entry's files now carry SHA-256 digests checked on load, and it is scanned again."""
    cache = tmp_path / "cache"
    first = fit_one(tiny_folder, tmp_path / "run1", cache, monkeypatch)
    (entry,) = (cache / "scans").glob("*.acts.npy")
    data = bytearray(entry.read_bytes())
    start, size = len(data) // 2, len(data) // 4  # in the values, past any header
    data[start: start + size] = bytes(size)
    entry.write_bytes(bytes(data))
    again = fit_one(tiny_folder, tmp_path / "run2", cache, monkeypatch)
    assert same_result(again) == same_result(first)


def test_a_run_reads_every_byte_of_the_weights_once(tiny_folder, tmp_path, monkeypatch):
    """The content key hashes every parameter (a 7B model's 14 GB): a run keys its store and its scans with
    one reading, and so does a Ray worker across the units it fits."""
    import n2g.models

    reads = []
    real = n2g.models.add_tensor_content
    monkeypatch.setattr(n2g.models, "add_tensor_content", lambda h, name, t: (reads.append(name), real(h, name, t)))
    fit_one(tiny_folder, tmp_path / "run", tmp_path / "cache", monkeypatch)
    n_params = len(list(tiny_model("llama").named_parameters()))
    assert len(reads) == n_params and len(set(reads)) == n_params


def test_a_run_resumed_in_another_dtype_says_how_to_resume_it(tiny_folder, tmp_path, monkeypatch):
    """The dtype and device type are part of the weights' keys (the activations differ), so the run is refused:
    the message says that is why, and what to pass."""
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))

    def opts(dtype):
        return RunOptions(model=str(tiny_folder / "model"), corpus=str(tiny_folder / "corpus.txt"), layers="0",
                          neurons="5", excerpt_length=32, out=str(tmp_path / "run"), report=False, progress=False,
                          dtype=dtype, overrides=QUICK)

    run(opts("float32"))
    with pytest.raises(N2GError, match=r"different model_content, model_weights \(it was computed on cpu in float32, "
                                       r"this run on cpu in bfloat16: pass --device cpu --dtype float32 to resume it\)"):
        run(opts("bfloat16"))
