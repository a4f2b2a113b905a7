"""Subject-model layer: neuron values against hand computation, early stop, padding, BOS, loading."""

from __future__ import annotations

import time
import types

import pytest
import torch
from torch import nn

from n2g.errors import N2GError
from n2g.models import SubjectModel, _gguf_cache_path, default_gguf_path, load_model

close = torch.testing.assert_close


def _blocks(sm: SubjectModel):
    m = sm.model
    if sm.model_type in ("gpt2", "gptj", "bloom", "falcon"):
        return m.transformer.h
    return {
        "gpt_neox": lambda: m.gpt_neox.layers,
        "opt": lambda: m.model.decoder.layers,
        "mpt": lambda: m.transformer.blocks,
    }.get(sm.model_type, lambda: m.model.layers)()


def _by_hand(sm: SubjectModel, ids: torch.Tensor) -> dict[int, torch.Tensor]:
    """Every layer's neurons recomputed from the MLP weights during one full forward pass."""
    out, handles = {}, []
    for layer, block in enumerate(_blocks(sm)):
        mlp = getattr(block, "mlp", None)
        if sm.model_type in ("llama", "gemma3_text", "stablelm"):
            where, fn = mlp, lambda x, mlp=mlp: mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        elif sm.model_type in ("gpt2", "starcoder2"):
            where, fn = mlp, lambda x, mlp=mlp: mlp.act(mlp.c_fc(x))
        elif sm.model_type in ("gpt_neox", "falcon"):
            where, fn = mlp, lambda x, mlp=mlp: mlp.act(mlp.dense_h_to_4h(x))
        elif sm.model_type == "bloom":
            where, fn = mlp, lambda x, mlp=mlp: mlp.gelu_impl(mlp.dense_h_to_4h(x))
        elif sm.model_type == "phi":
            where, fn = mlp, lambda x, mlp=mlp: mlp.activation_fn(mlp.fc1(x))
        elif sm.model_type == "gptj":
            where, fn = mlp, lambda x, mlp=mlp: mlp.act(mlp.fc_in(x))
        elif sm.model_type == "mpt":
            ffn = block.ffn
            where, fn = ffn, lambda x, ffn=ffn: ffn.act(ffn.up_proj(x))
        else:  # OPT has no MLP module: fc1 -> activation_fn -> fc2 inside the block
            where, fn = block.fc1, lambda x, b=block: b.activation_fn(
                nn.functional.linear(x, b.fc1.weight, b.fc1.bias))

        def hook(module, args, layer=layer, fn=fn):
            out[layer] = fn(args[0]).reshape(ids.shape[0], ids.shape[1], -1)

        handles.append(where.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            sm.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def _with_bos(sm: SubjectModel, ids: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((ids.shape[0], 1), sm.bos_token_id), ids], dim=1)


def _ids(batch=3, pos=9):
    return torch.randint(4, 120, (batch, pos))


def test_neurons_match_hand_computation_and_drop_bos(tiny_subject):
    sm = tiny_subject
    ids = _ids()
    hand = _by_hand(sm, _with_bos(sm, ids))
    neurons = [(0, 5), (2, 1), (1, sm.d_mlp - 1), (0, 0), (2, 7)]
    got = sm.activations(ids, None, neurons)
    assert got.shape == (3, 9, len(neurons)) and got.dtype == torch.float32
    assert got.device.type == "cpu"
    for n, (layer, index) in enumerate(neurons):
        close(got[..., n], hand[layer][:, 1:, index])  # BOS column dropped
    assert not torch.allclose(got[..., 0], got[..., 3])


def test_without_bos_uses_tokens_as_given(tiny_subject):
    sm = tiny_subject
    ids = _ids()
    with_bos = sm.activations(ids, None, [(1, 3)])
    sm.bos_token_id = None
    without = sm.activations(ids, None, [(1, 3)])
    close(without[..., 0], _by_hand(sm, ids)[1][..., 3])
    assert not torch.allclose(with_bos, without)  # BOS really was prepended before


def test_layer_activations_stop_early_equal_full_pass(tiny_subject):
    sm = tiny_subject
    ids = _ids()
    hand = _by_hand(sm, _with_bos(sm, ids))
    calls = []
    last_block = _blocks(sm)[-1]
    handle = last_block.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        acts = sm.layer_activations(ids, None, [1, 0])
    finally:
        handle.remove()
    assert calls == []  # the pass stopped before the last block
    assert set(acts) == {0, 1}
    for layer in (0, 1):
        assert acts[layer].shape == (3, 9, sm.d_mlp) and acts[layer].dtype == torch.float32
        close(acts[layer], hand[layer][:, 1:])
    close(sm.layer_activations(ids, None, [2])[2], hand[2][:, 1:])


def test_hooks_are_removed_even_after_errors(tiny_llama):
    sm = tiny_llama
    sm.activations(_ids(), None, [(2, 0)])
    with pytest.raises(ValueError):
        sm.activations(torch.zeros(5, dtype=torch.long), None, [(0, 0)])
    assert all(not p._forward_pre_hooks for p in sm._projs)
    out = sm.model(input_ids=_ids())  # a plain forward still runs to the logits
    assert out.logits.shape == (3, 9, sm.vocab_size)


def test_right_padding_leaves_real_positions_unchanged(tiny_subject):
    sm = tiny_subject
    ids = _ids(batch=2, pos=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    padded = ids.clone()
    padded[1, 6:] = 999_999  # padding values must never be looked up
    neurons = [(0, 2), (2, 3)]
    got = sm.activations(padded, mask, neurons)
    alone = sm.activations(ids[1:, :6], None, neurons)
    close(got[1, :6], alone[0], atol=1e-5, rtol=1e-5)
    close(got[0], sm.activations(ids[:1], None, neurons)[0], atol=1e-5, rtol=1e-5)
    assert torch.all(got[1, 6:] == 0)
    layer = sm.layer_activations(padded, mask, [2])[2]
    close(layer[1, :6, 3], alone[0, :, 1], atol=1e-5, rtol=1e-5)
    assert torch.all(layer[1, 6:] == 0)


def test_rows_activations_are_per_row_slices(tiny_subject):
    sm = tiny_subject
    ids = _ids(batch=4, pos=8)
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    rows = [(2, 4), (0, 1), (2, 0), (1, sm.d_mlp - 1)]
    got = sm.rows_activations(ids, mask, rows)
    full = sm.activations(ids, mask, rows)
    assert got.shape == (4, 8) and got.dtype == torch.float32
    for b in range(4):
        close(got[b], full[b, :, b])
    with pytest.raises(ValueError):
        sm.rows_activations(ids, mask, rows[:2])


def test_next_token_candidates_use_logits_of_previous_position(tiny_subject):
    sm = tiny_subject
    ids = _ids(batch=3, pos=6)
    positions = torch.tensor([0, 3, 6])  # 6 = the token after the last one
    got = sm.next_token_candidates(ids, None, positions, k=4)
    with torch.no_grad():
        logits = sm.model(input_ids=_with_bos(sm, ids)).logits
    for b, p in enumerate(positions.tolist()):
        assert got[b].tolist() == logits[b, p].topk(4).indices.tolist()


def test_output_effects_follow_unembedding(tiny_llama):
    sm = tiny_llama
    top, bottom = sm.output_effects(1, 7, k=5)
    m = sm.model
    by_hand = m.lm_head.weight @ (m.model.layers[1].mlp.down_proj.weight[:, 7] * m.model.norm.weight)
    assert [v for _, v in top] == pytest.approx(by_hand.topk(5).values.tolist(), rel=1e-4)
    assert [s for s, _ in top] == sm.token_strings(by_hand.topk(5).indices.tolist())
    assert [v for _, v in bottom] == pytest.approx(
        by_hand.topk(5, largest=False).values.tolist(), rel=1e-4)


def test_output_effects_are_the_direct_effect_through_the_final_norm(tiny_subject):
    """Every token's output effect is proportional to the change the direction makes in the model's own final
    norm and unembedding (a Jacobian-vector product at a residual orthogonal to it, where the norm acts as
    its gain over a constant scale): a LayerNorm's centring (GPT-2, OPT, BLOOM, ...) included, so a
    direction's mean, which never reaches the logits, does not rank tokens either."""
    from n2g.models import _get, _proj_out_column

    sm = tiny_subject
    torch.manual_seed(1)
    fam = sm._family
    norm = _get(sm.model, fam.final_norm)
    project = _get(sm.model, fam.project_out) if fam.project_out else None
    head = sm.model.get_output_embeddings()
    with torch.no_grad():
        for p in norm.parameters():  # a trained norm's gain and bias are not all ones and zeros
            p.add_(torch.randn_like(p) * 0.3)

    def logits(h):
        y = norm(h)
        return head(project(y) if project is not None else y)

    v = _proj_out_column(sm._projs[1], 3).float()
    basis = torch.linalg.qr(torch.stack([torch.ones_like(v), v], dim=1)).Q
    h = torch.randn_like(v)
    h = h - basis @ (basis.T @ h)  # mean 0 and orthogonal to v
    jvp = torch.func.jvp(logits, (h,), (v,))[1].double()
    effect = (head.weight @ sm._logit_inputs(v[None])[0]).double()
    scale = float(jvp @ effect / (effect @ effect))
    assert scale > 0
    close(effect * scale, jvp, rtol=1e-4, atol=1e-5 * float(jvp.abs().max()))
    top, bottom = sm.output_effects(1, 3, k=5)
    assert [t for t, _ in top] == sm.token_strings(jvp.topk(5).indices.tolist())
    assert [t for t, _ in bottom] == sm.token_strings(jvp.topk(5, largest=False).indices.tolist())
    if fam.centered:  # a constant added to every component changes nothing
        shifted, plain = sm.direction_effects(v + 2.0, k=5)[0], sm.direction_effects(v, k=5)[0]
        assert [t for t, _ in shifted] == [t for t, _ in plain]
        assert [x for _, x in shifted] == pytest.approx([x for _, x in plain], rel=1e-4)


def test_output_effects_batched_equal_one_at_a_time(tiny_subject):
    """Output effects of a group of neurons (one matmul) are exactly each neuron's own, in every family."""
    sm = tiny_subject
    indices = list(range(0, sm.d_mlp, 3))
    many = sm.output_effects_many(2, indices, k=6)
    assert many == [sm.output_effects(2, i, k=6) for i in indices]
    assert many[:2] == sm.output_effects_many(2, indices[:2], k=6)  # whatever else is in the batch


def test_output_effects_match_a_float64_reference(tiny_llama, monkeypatch):
    """Values are the float32 rounding of the exact effect, tokens ranked by it; a row whose
    candidates cannot be proved complete is measured over the whole vocabulary, same answer."""
    import n2g.models as models

    sm = tiny_llama
    m = sm.model
    w_u = m.lm_head.weight.double()
    for index in (0, 7, 40):
        vec = m.model.layers[1].mlp.down_proj.weight[:, index].float() * m.model.norm.weight.float()
        exact = (w_u @ vec.double()).float()
        top, bottom = sm.output_effects(1, index, k=5)
        order = torch.sort(exact, descending=True, stable=True).indices[:5]
        assert top == list(zip(sm.token_strings(order.tolist()), exact[order].tolist()))
        order = torch.sort(exact, stable=True).indices[:5]
        assert bottom == list(zip(sm.token_strings(order.tolist()), exact[order].tolist()))
    want = sm.output_effects_many(1, range(12), k=5)
    monkeypatch.setattr(models, "EFFECT_CANDIDATES", 0)  # k candidates only: most rows fall back
    assert sm.output_effects_many(1, range(12), k=5) == want


def test_output_effects_ties_broken_by_token_id(tiny_llama):
    sm = tiny_llama
    w = sm.model.lm_head.weight
    with torch.no_grad():
        w[10:20] = w[5]  # eleven tokens with the same effect for every neuron
    ids = {s: i for i, s in enumerate(sm.token_strings(range(sm.vocab_size)))}
    for index in range(sm.d_mlp):
        effects = sm.output_effects(1, index, k=12)
        assert effects == sm.output_effects_many(1, [index, 0, 47], k=12)[0]
        for side in effects:
            for (s1, v1), (s2, v2) in zip(side, side[1:]):
                if v1 == v2:
                    assert ids[s1] < ids[s2]
    tied = [s for side in sm.output_effects(1, 3, k=sm.vocab_size) for s, _ in side if ids[s] in range(10, 20)]
    assert len(tied) == 20


def test_special_tokens_and_strings(tiny_llama):
    sm = tiny_llama
    assert sm.bos_token_id == 1
    assert sm.occlusion_token_id == 0  # <unk>: neither BOS nor EOS
    ids = sm.encode("the cat sat")
    assert sm.token_strings(ids) == ["the", "cat", "sat"]
    assert sm.token_strings([1, 120]) == ["<bos>", "<120>"]
    info = sm.info()
    assert info["n_layers"] == 3 and info["d_mlp"] == 48 and info["family"] == "gated"
    assert info["architecture"] == "llama" and info["dtype"] == "float32"
    assert info["n_params"] == sum(p.numel() for p in sm.model.parameters())


def test_out_of_range_neurons_name_valid_ranges(tiny_llama):
    for layer, index in [(3, 0), (-1, 0), (0, 48)]:
        with pytest.raises(N2GError, match=r"layers are 0\.\.2 and neuron indices 0\.\.47"):
            tiny_llama.check_neuron(layer, index)
    with pytest.raises(N2GError):
        tiny_llama.activations(_ids(), None, [(0, 0), (5, 1)])
    with pytest.raises(N2GError):
        tiny_llama.layer_activations(_ids(), None, [3])


def test_unknown_architecture_lists_supported():
    fake = nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="rwkv")
    with pytest.raises(N2GError, match=r"'rwkv' is not supported.*gpt2.*llama.*opt"):
        SubjectModel(fake)


def test_load_model_from_local_directory(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    sm = load_model(str(tmp_path), device="cpu")
    assert sm.info()["spec"] == str(tmp_path) and sm.n_layers == 3
    ids = _ids()
    close(sm.activations(ids, None, [(2, 5)]), tiny_llama.activations(ids, None, [(2, 5)]))
    assert sm.encode("the mat") == tiny_llama.encode("the mat")
    half = load_model(str(tmp_path), device="cpu", dtype="bfloat16")
    assert half.dtype == torch.bfloat16
    out = half.activations(ids, None, [(2, 5)])
    assert out.dtype == torch.float32
    close(out, tiny_llama.activations(ids, None, [(2, 5)]), atol=0.05, rtol=0.1)


def test_load_model_rejects_unsupported_local_architecture(tmp_path):
    import transformers as tf

    tf.MambaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1).save_pretrained(tmp_path)  # no MLP neurons
    with pytest.raises(N2GError, match="'mamba'.*not supported.*gpt_neox"):
        load_model(str(tmp_path), device="cpu")


@pytest.mark.parametrize("spec", ["missing/model.gguf", "nope.gguf", "./no/such/dir", "/no/such"])
def test_missing_paths_raise(spec):
    with pytest.raises(N2GError, match="does not exist"):
        load_model(spec)


def test_an_empty_folder_is_named_as_one(tmp_path):
    # it was "not a Hugging Face model directory (Unrecognized model in ... Should have a `model_type` key in its
    # config.json.)", transformers' words for a folder that has no config.json at all
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(N2GError, match="is a folder without config.json or a .gguf file; pass a Hugging Face model"):
        load_model(str(tmp_path), device="cpu")


def test_a_folder_holding_an_upper_case_gguf_file_is_not_said_to_have_none(tmp_path):
    # a .GGUF file passed as a path loads (its suffix is read case-blind), but a folder holding it was "a folder
    # without config.json or a .gguf file"
    (tmp_path / "model.GGUF").write_bytes(b"")
    with pytest.raises(N2GError) as err:
        load_model(str(tmp_path), device="cpu")
    assert "without config.json or a .gguf file" not in str(err.value) and "model.GGUF" in str(err.value)


def test_hub_failure_says_what_to_do(monkeypatch):
    import transformers as tf

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(tf.AutoConfig, "from_pretrained", offline)
    monkeypatch.setattr("n2g.models._check_hub_reachable", lambda spec: None)  # transformers' own failure
    with pytest.raises(N2GError, match="could not be found locally or downloaded.*local path"):
        load_model("some-org/some-model")


def test_an_unreachable_hub_is_reported_before_transformers_retries(monkeypatch):
    import socket

    import transformers as tf

    from n2g.models import PROXY_VARIABLES

    calls = []

    def unreachable(address, timeout=None):
        calls.append(address)
        raise OSError(-2, "Name or service not known")

    def asked(*args, **kwargs):
        calls.append("transformers")
        raise OSError("no network")

    for v in PROXY_VARIABLES + ("HF_HUB_OFFLINE",):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(tf.AutoConfig, "from_pretrained", asked)
    with pytest.raises(N2GError, match="not in the Hugging Face cache and huggingface.co cannot be reached "
                                       r"\(Name or service not known\).*local path"):
        load_model("n2g-test-org/no-such-model")
    assert calls == [("huggingface.co", 443)]  # transformers was never asked
    calls.clear()
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # the hub may be reachable through it
    with pytest.raises(N2GError, match="could not be found locally or downloaded"):
        load_model("n2g-test-org/no-such-model")
    assert calls == ["transformers"]


def test_byte_level_pieces_of_a_character_show_their_bytes_each_apart():
    # A byte-level BPE (GPT-2, Llama 3, SmolLM2) splits a rare character into pieces that decode to "\ufffd" on their
    # own: graphs, pages, search and predict showed a dozen different activators all as "\ufffd".
    from conftest import tiny_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = "the café 日本語 東京 🙂 naïve " * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=262, special_tokens=["<unk>", "<bos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>")
    sm = SubjectModel(tiny_model("llama", vocab=len(tok)), tok, spec="tiny-bpe")
    ids = sm.encode(" 日 the")
    shown = sm.token_strings(ids)
    assert shown[:3] == [" <0xE6>", "<0x97>", "<0xA5>"] and "".join(shown[3:]) == " the"
    everything = sm.token_strings(range(len(tok)))
    assert not any("\ufffd" in t for t in everything) and len(set(everything)) == len(everything)
    # text read as a whole (steer's continuations) shows the character its pieces make
    assert sm.text(ids) == " 日 the" and sm.text(ids[3:]) == " the"


def test_bad_dtype(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(N2GError, match="float32, bfloat16, float16"):
        load_model(str(tmp_path), device="cpu", dtype="int8")


@pytest.mark.slow
def test_packaged_smollm2(smollm2, monkeypatch):
    sm = smollm2
    info = sm.info()
    assert (info["n_layers"], info["d_mlp"], info["architecture"]) == (30, 1536, "llama")
    assert sm.bos_token_id is not None and sm.occlusion_token_id not in (sm.bos_token_id,)
    ids = torch.tensor([sm.encode("The capital of France is")])
    nxt = sm.next_token_candidates(ids, None, torch.tensor([ids.shape[1]]), k=1)
    assert sm.token_strings(nxt[0].tolist()) == [" Paris"]
    assert sm.token_strings(sm.encode(" the\nhello")) == [" the", "\n", "hello"]
    acts = sm.activations(ids, None, [(0, 0), (29, 1535)])
    assert acts.shape == (1, ids.shape[1], 2) and torch.isfinite(acts).all()

    # the de-quantised weights are cached, and a second load never touches the GGUF
    cached = _gguf_cache_path(default_gguf_path())
    assert (cached / "model.safetensors").is_file() and (cached / "config.json").is_file()
    import transformers as tf

    original = tf.AutoModelForCausalLM.from_pretrained
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(tf.AutoModelForCausalLM, "from_pretrained", spy)
    start = time.perf_counter()
    again = load_model("default", device="cpu")
    assert calls and all("gguf_file" not in c for c in calls)
    assert time.perf_counter() - start < 15
    close(again.activations(ids, None, [(5, 10)]), sm.activations(ids, None, [(5, 10)]))


@pytest.mark.parametrize("device", ["meta", "xyz", "cuda:x"])
def test_a_device_that_cannot_compute_is_refused_before_any_weights_load(device):
    from n2g.errors import N2GError
    from n2g.models import load_model

    # The path does not exist either: the device is checked first, so nothing is read or loaded for nothing.
    with pytest.raises(N2GError, match="device") as e:
        load_model("/nonexistent/n2g-model-dir", device=device)
    assert "\n" not in str(e.value) and "cpu" in str(e.value)


def test_meta_device_on_a_real_model_is_one_line_not_a_crash_later(tmp_path):
    from conftest import tiny_model, tiny_tokenizer

    from n2g.errors import N2GError
    from n2g.models import load_model

    tiny_model("llama").save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(N2GError, match="holds no data"):
        load_model(str(tmp_path / "m"), device="meta")


def test_a_hub_lookup_says_it_goes_to_the_network_first(tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               N2G_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "n2g", "info", "--model", "n2g-test-org/no-such-model"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    lines = p.stderr.splitlines()
    hub = next(i for i, l in enumerate(lines) if "looking it up on the Hugging Face hub" in l)
    assert hub < next(i for i, l in enumerate(lines) if l.startswith("n2g: error:"))


def test_quiet_mode_silences_the_gguf_dequantising_bar_and_restores_it(monkeypatch, capfd):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from n2g.models import _quiet_gguf_bar

    bar = gguf_utils.tqdm
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # what -q sets
    with _quiet_gguf_bar():
        list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."))
    assert gguf_utils.tqdm is bar and "de-quantizing" not in capfd.readouterr().err
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS")
    with _quiet_gguf_bar():  # without -q the bar is transformers' own
        assert gguf_utils.tqdm is bar


@pytest.mark.parametrize("family", __import__("conftest").TINY_FAMILIES)
def test_every_family_saved_as_a_folder_loads_past_the_checkpoint_checks(family, tmp_path):
    from conftest import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    model = tiny_model(family)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cpu")  # layer count and embedding read from its safetensors headers
    ids = torch.tensor([[4, 5, 6, 7, 8]])
    direct = SubjectModel(model, tiny_tokenizer())
    assert loaded.n_layers == 3
    assert torch.allclose(loaded.layer_activations(ids, None, [2])[2], direct.layer_activations(ids, None, [2])[2], atol=1e-5)
    assert loaded.weights_key() == direct.weights_key()  # the same weights, the same key


def _tiny_folder(path, edit=None, weights="safetensors"):
    """The tests' tiny Llama saved as a model folder, its config.json edited by ``edit(dict)``."""
    import json

    from conftest import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    tiny_model("llama").save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    if weights in ("bin", "legacy bin"):  # an older checkpoint: a pickle of tensors (zip, or before torch 1.6)
        from safetensors.torch import load_file

        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin",
                   _use_new_zipfile_serialization=weights == "bin")
        (path / "model.safetensors").unlink()
    if edit is not None:
        config = json.loads((path / "config.json").read_text())
        text = edit(config)  # the edited dict, or the file's whole text
        (path / "config.json").write_text(text if isinstance(text, str) else json.dumps(config))
    return path


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "extra.safetensors"])
def test_a_pipe_in_a_model_folder_is_refused_not_waited_on(tmp_path, name):
    import os
    import subprocess
    import sys

    folder = _tiny_folder(tmp_path / "m")
    (folder / name).unlink(missing_ok=True)
    os.mkfifo(folder / name)  # opening it would wait for a writer for ever
    code = f"from n2g.models import load_model; load_model({str(folder)!r}, device='cpu')"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and f"{name} is not a regular file" in done.stderr.splitlines()[-1], done.stderr


@pytest.mark.parametrize("edit, weights, says", [
    (lambda c: c.update(hidden_size=100_000), "safetensors", "config.json makes .* \\[128, 100000\\] but the weights hold \\[128, 32\\]"),
    (lambda c: c.update(intermediate_size=1_000_000), "safetensors", "down_proj.weight \\[32, 1000000\\] but the weights hold \\[32, 48\\]"),
    (lambda c: c.update(num_hidden_layers=1), "safetensors", "says 1 layer but the weights hold 3.*truncated"),
    (lambda c: c.update(num_hidden_layers=10_000), "bin", "says 10000 layers but the weights hold 3"),
    (lambda c: c.update(hidden_size=100_000), "bin", "but the weights hold \\[128, 32\\]"),
    (lambda c: c.update(intermediate_size=1_000_000), "legacy bin", "but the weights hold \\[32, 48\\]"),
    (lambda c: '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "safetensors",
     "nests JSON too deeply"),
    (lambda c: c.update(pad="x" * (17 << 20)), "safetensors", "config.json is 17 MiB"),
])
def test_a_config_that_does_not_fit_its_weights_is_refused_before_they_are_built(tmp_path, edit, weights, says):
    # transformers would build the config's sizes first (gigabytes for a 100 KB checkpoint) or drop layers silently
    folder = _tiny_folder(tmp_path / "m", edit, weights)
    with pytest.raises(N2GError, match=says):
        load_model(str(folder), device="cpu")


def test_a_dtype_that_cannot_hold_activations_is_refused_before_loading(tmp_path):
    with pytest.raises(N2GError, match="torch.int64 cannot hold"):
        load_model(str(tmp_path / "not-even-there"), device="cpu", dtype=torch.int64)


def _edited_gguf(tmp_path, key, value):
    import shutil

    from gguf import GGUFReader

    target = tmp_path / default_gguf_path().name
    shutil.copy(default_gguf_path(), target)
    reader = GGUFReader(str(target), "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][0] = value
    reader.data.flush()
    del reader
    return target


@pytest.mark.parametrize("key, value, says", [
    ("llama.block_count", 40, "says 40 layers \\(llama.block_count\\) but it holds tensors for 30"),
    ("llama.feed_forward_length", 20_000, "llama.feed_forward_length 20000 but blk.0.ffn_up.weight is \\[576, 1536\\]"),
])
def test_a_gguf_whose_metadata_does_not_fit_its_tensors_is_refused_and_never_served_from_the_cache(
        tmp_path, key, value, says):
    edited = _edited_gguf(tmp_path, key, value)
    # the same name and size as the packaged file: its de-quantised copy is not this one's
    assert edited.name == default_gguf_path().name and edited.stat().st_size == default_gguf_path().stat().st_size
    assert _gguf_cache_path(edited) != _gguf_cache_path(default_gguf_path())
    with pytest.raises(N2GError, match=says):
        load_model(str(edited), device="cpu")
    assert not _gguf_cache_path(edited).exists()


def test_an_ill_typed_config_or_a_missing_tokenizer_is_named_in_the_message(tmp_path):
    folder = _tiny_folder(tmp_path / "typed", lambda c: c.update(num_hidden_layers="3"))
    with pytest.raises(N2GError, match="config.json is not a valid model config \\(.*num_hidden_layers.*str"):
        load_model(str(folder), device="cpu")
    folder = _tiny_folder(tmp_path / "untokenized")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(N2GError, match="could not load the tokenizer of .*the tokenizer files it was saved with"):
        load_model(str(folder), device="cpu")


@pytest.mark.slow
def test_the_packaged_model_has_the_same_keys_when_converted_and_when_read_from_its_cache(tmp_path, monkeypatch):
    # runs and scans are keyed on them: a run started by the process that de-quantised the GGUF must
    # resume (and find its scans) in every later process, which reads the cached copy
    from n2g.models import config_key_of

    monkeypatch.setenv("N2G_CACHE", str(tmp_path))
    cache = _gguf_cache_path(default_gguf_path())
    assert not cache.exists()
    converted = load_model("default", device="cpu")
    assert (cache / "model.safetensors").is_file()
    cached = load_model("default", device="cpu")
    assert (config_key_of(converted), converted.weights_key(), converted.content_key()) == \
        (config_key_of(cached), cached.weights_key(), cached.content_key())
    assert len(config_key_of(cached)) == 16


def test_an_older_saves_stray_shards_beside_the_weights_are_not_read(tmp_path):
    # transformers loads model.safetensors (or the shards its index lists), never other files in the folder
    import shutil

    from conftest import tiny_model

    folder = _tiny_folder(tmp_path / "m")
    torch.manual_seed(1)
    old = tiny_model("llama")
    old.config.num_hidden_layers = 6
    from transformers import LlamaForCausalLM

    LlamaForCausalLM(old.config).save_pretrained(tmp_path / "six")
    shutil.copy(tmp_path / "six" / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    assert load_model(str(folder), device="cpu").n_layers == 3
