"""Shared fixtures: seeded random generators, tiny random subject models, the packaged SmolLM2."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_FAMILIES = ("llama", "gpt2", "gpt_neox", "opt", "phi", "gptj", "bloom", "falcon", "starcoder2", "mpt",
                 "gemma3_text", "stablelm")


def deny(monkeypatch, where: str, *paths: Path) -> None:
    """Make ``where`` (a dotted name: ``os.stat``, ``os.scandir``, or ``n2g.sae.open`` for the ``open`` one module
    calls) raise PermissionError for each of ``paths`` and act as before for every other path: a file or folder
    whose mode refuses this user, refused where the OS would refuse it (root, whom modes do not stop, runs the
    tests too)."""
    import builtins
    import errno
    import importlib

    module, name = where.rsplit(".", 1)
    real = getattr(importlib.import_module(module), name, None) or getattr(builtins, name)
    refused_paths = {Path(p).absolute() for p in paths}

    def refused(p, *args, **kwargs):
        if Path(os.fsdecode(p)).absolute() in refused_paths:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(p))
        return real(p, *args, **kwargs)

    monkeypatch.setattr(where, refused, raising=False)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def save_tiny_folder(root: Path, documents: int) -> Path:
    """A tiny Llama and its tokenizer saved as ``root/model`` (seeded), and ``root/corpus.txt`` of ``documents``
    documents of 300 random words; returns ``root``."""
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    rng = random.Random(0)
    (root / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(documents)))
    return root


def tiny_tokenizer():
    """A whitespace word-level tokenizer: <unk>=0, <bos>=1, <eos>=2, <pad>=3, then 64 words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<eos>", "<pad>", "the", "cat", "sat", "on", "mat"]
    words += [f"w{i}" for i in range(64 - len(words) + 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>", pad_token="<pad>")


def tiny_model(family: str = "llama", vocab: int = 128):
    """A randomly initialised causal LM of ``family`` with 3 layers, hidden 32, d_mlp 48/128."""
    import transformers as tf

    special = dict(bos_token_id=1, eos_token_id=2, pad_token_id=3)
    if family == "llama":
        cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=128, **special)
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                            **special)
    elif family == "gpt_neox":
        cfg = tf.GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=3, num_attention_heads=4,
                               max_position_embeddings=128, **special)
    elif family == "opt":
        cfg = tf.OPTConfig(vocab_size=vocab, hidden_size=32, ffn_dim=48, num_hidden_layers=3,
                           num_attention_heads=4, word_embed_proj_dim=32,
                           max_position_embeddings=128, **special)
    elif family == "phi":
        cfg = tf.PhiConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=128, **special)
    elif family == "gptj":
        cfg = tf.GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=4,
                            **special)
    elif family == "bloom":
        cfg = tf.BloomConfig(vocab_size=vocab, hidden_size=32, n_layer=3, n_head=4, **special)
    elif family == "falcon":
        cfg = tf.FalconConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                              max_position_embeddings=128, **special)
    elif family == "starcoder2":
        cfg = tf.Starcoder2Config(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  **special)
    elif family == "mpt":
        cfg = tf.MptConfig(vocab_size=vocab, d_model=32, n_layers=3, n_heads=4, max_seq_len=128, **special)
    elif family == "gemma3_text":
        cfg = tf.Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  max_position_embeddings=128, **special)
    elif family == "stablelm":
        cfg = tf.StableLmConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                **special)
    else:
        raise ValueError(family)
    model = tf.AutoModelForCausalLM.from_config(cfg)
    return model.eval()


@pytest.fixture(params=TINY_FAMILIES)
def tiny_subject(request):
    """A SubjectModel around a tiny random model of each supported family in turn."""
    from n2g.models import SubjectModel

    return SubjectModel(tiny_model(request.param), tiny_tokenizer(), spec=f"tiny-{request.param}")


@pytest.fixture
def tiny_llama():
    from n2g.models import SubjectModel

    return SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama")


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M-Instruct on CPU (de-quantised once, then cached)."""
    os.environ.setdefault("N2G_CACHE", str(REPO / ".cache" / "n2g"))
    from n2g.models import load_model

    return load_model("default", device="cpu")
