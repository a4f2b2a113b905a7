"""Substitute sources: word shape, the subject model's own guesses, its input embedding, a masked LM."""

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from n2g.augment import EmbeddingSubstitutes, MaskedLMSubstitutes, ModelSubstitutes, same_shape
from n2g.models import SubjectModel


@pytest.mark.parametrize("original,candidate,ok", [
    (" Paris", " London", True), (" Paris", "London", False), ("Paris", " London", False),
    (" Paris", " 42", False), (" (", " [", True), ("42", "17", True), (" the", " ,", False),
])
def test_same_shape(original, candidate, ok):
    assert same_shape(original, candidate) is ok


def test_model_substitutes_keep_word_shape(smollm2):
    ids = smollm2.encode("The capital of France is Paris")
    source = ModelSubstitutes(smollm2)
    (found,) = source([ids], [len(ids) - 1], 20)
    texts = smollm2.token_strings(found)
    assert found and ids[-1] not in found
    assert all(t.startswith(" ") and t.strip().isalpha() for t in texts), texts


def test_model_substitutes_never_propose_special_tokens_or_padding_rows(monkeypatch):
    subject = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")  # 128 embedding rows, 64 words
    vocab = subject.tokenizer.get_vocab()
    guesses = [vocab["<eos>"], 100, vocab["mat"], vocab["<pad>"], vocab["sat"], 127]
    monkeypatch.setattr(subject, "next_token_candidates", lambda ids, mask, positions, k: torch.tensor([guesses]))
    seq = [vocab["<bos>"], vocab["the"], vocab["w5"]]  # not letters only: word shape alone would let all six in
    assert ModelSubstitutes(subject)([seq], [2], 6) == [[vocab["mat"], vocab["sat"]]]


def test_embedding_substitutes_are_the_nearest_tokens_of_the_same_shape():
    torch.manual_seed(0)
    subject = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    vocab = subject.tokenizer.get_vocab()
    cat, sat, mat, w7 = (vocab[w] for w in ("cat", "sat", "mat", "w7"))
    emb = subject.model.get_input_embeddings().weight
    with torch.no_grad():
        emb[w7] = 2 * emb[cat]  # cosine 1: the nearest of all, but not a word of letters like "cat"
        emb[100] = 3 * emb[cat]  # cosine 1 too, but a padding row past the tokenizer's 64 words
        emb[vocab["<pad>"]] = 1.5 * emb[cat]  # and a special token: neither is ever a substitute
        noise = torch.nn.functional.normalize(torch.randn(2, emb.shape[1]), dim=1) * emb[cat].norm()
        emb[mat] = emb[cat] + 0.05 * noise[0]  # near
        emb[sat] = emb[cat] + 0.2 * noise[1]  # less near, still far nearer than a random token
    assert subject.nearest_tokens([cat], 3)[0].tolist() == [w7, mat, sat]
    source = EmbeddingSubstitutes(subject)
    assert source([[1, cat, sat], [1, mat]], [1, 1], 2) == [[mat, sat], [cat, sat]]
    assert source.counts["real"] == 0  # no forward pass


def test_masked_lm_substitutes_map_to_single_subject_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat"] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    mlm_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]")
    torch.manual_seed(0)
    mlm = BertForMaskedLM(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64))
    mlm.save_pretrained(tmp_path / "mlm")
    mlm_tok.save_pretrained(tmp_path / "mlm")
    subject = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    source = MaskedLMSubstitutes(subject, str(tmp_path / "mlm"))
    seq = subject.encode("the cat sat on the mat")
    found = source([seq, seq], [1, 5], 6)
    assert all(0 < len(f) <= 6 for f in found)
    assert seq[1] not in found[0] and seq[5] not in found[1]
    vocab = {w for w in words if not w.startswith("[")}
    for ids in found:
        assert all(subject.token_strings([i])[0] in vocab for i in ids)


def _drive_augment(cfg, seqs, proposals):
    """Run augment_steps on windows whose pivot is their last token, every variant firing."""
    import numpy as np

    from n2g.augment import augment_steps
    from n2g.features import Candidates, Evaluate

    acts = [np.array([0.0] * (len(s) - 1) + [1.0]) for s in seqs]
    imps = [np.ones((len(s), len(s))) for s in seqs]
    steps = augment_steps(seqs, acts, imps, cfg, 0)
    request = next(steps)
    assert isinstance(request, Candidates)
    request = steps.send([list(proposals) for _ in request.seqs])
    assert isinstance(request, Evaluate)
    try:
        steps.send([np.ones(len(s)) for s in request.seqs])
    except StopIteration as done:
        return done.value
    raise AssertionError("augment_steps asked for more than candidates and one evaluation")


def test_variant_once_measures_each_substitute_of_a_token_in_its_best_window_only():
    from n2g.config import preset

    seqs = [[1, 5, 7], [1, 6, 7], [1, 6, 8]]  # windows best first; token 7 is the activator of two
    base = preset("default", n_variants=2, substitute_source="model")
    every = _drive_augment(base.replace(variant_once=False), seqs, [20, 21, 22])
    once = _drive_augment(base.replace(variant_once=True), seqs, [20, 21, 22])
    pairs = lambda vs: [(v.source, v.token_ids[v.position]) for v in vs]
    assert pairs(every) == [(0, 20), (0, 21), (1, 20), (1, 21), (2, 20), (2, 21)]
    assert pairs(once) == [(0, 20), (0, 21), (2, 20), (2, 21)]  # window 1's pairs were measured in window 0
    assert all(v.importance is not None for v in once)  # firing variants keep their source's importance
