"""Reuse must never change an answer: a cached scan, written text or vocabulary pass, or a resumed run
directory, gives what a fresh computation gives, or is refused in one line."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g.errors import N2GError
from n2g.pipeline import RunOptions, run

QUICK = {"written": 0, "vocabulary": 0}


@pytest.fixture
def tiny_folder(tmp_path):
    """A tiny Llama saved as a model folder, and a corpus file."""
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    rng = random.Random(0)
    (tmp_path / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(6)))
    return tmp_path


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
