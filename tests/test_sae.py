"""SAE latents as features: a tiny random SAE saved in SAELens format, run end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import deny, tiny_model, tiny_tokenizer
from test_pipeline import cli, run_args, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from n2g.errors import N2GError
from n2g.models import SubjectModel
from n2g.sae import SAEModel

D_IN, D_SAE = 32, 16


def write_sae(folder, hook="blocks.1.hook_resid_post", d_in=D_IN, d_sae=D_SAE, seed=0, threshold=None, **cfg):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps({"d_in": d_in, "d_sae": d_sae, "hook_name": hook,
                                                 "activation_fn": "relu", **cfg}))
    weights = {"W_enc": torch.randn(d_in, d_sae, generator=g), "b_enc": torch.zeros(d_sae),
               "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.1, "b_dec": torch.zeros(d_in)}
    if threshold is not None:
        weights["threshold"] = threshold
    save_file(weights, str(folder / "sae_weights.safetensors"))
    return folder


def _site_output(net, module, ids, bos):
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        net(torch.cat([torch.full((ids.shape[0], 1), bos), ids], 1))
    handle.remove()
    return seen["h"].float()


@pytest.mark.parametrize("hook, site_layer, jump", [("blocks.1.hook_resid_post", 1, False),
                                                    ("blocks.2.hook_resid_pre", 1, False),
                                                    ("blocks.1.hook_resid_post", 1, True)])
def test_every_activation_entry_point_reads_the_latents(tmp_path, hook, site_layer, jump):
    """Scan (layer_activations), fitting (rows_activations) and activations() all see the SAE's
    latents, not the MLP neurons of the same index; resid_pre of block L is block L-1's output, and
    a jumprelu latent is its pre-activation where that clears the latent's threshold."""
    torch.manual_seed(0)
    net = tiny_model("llama")
    base = SubjectModel(net, tiny_tokenizer(), spec="tiny")
    threshold = torch.linspace(0.0, 2.0, D_SAE) if jump else None
    cfg = {"architecture": "jumprelu"} if jump else {}
    sae = SAEModel(base, write_sae(tmp_path / "sae", hook, threshold=threshold, **cfg))
    layer = int(hook.split(".")[1])
    ids = torch.randint(4, 60, (3, 10))
    h = _site_output(net, net.model.layers[site_layer], ids, base.bos_token_id)
    pre = (h - sae.b_dec) @ sae.W_enc + sae.b_enc
    expected = (torch.where(pre > threshold, pre, 0.0) if jump else torch.relu(pre))[:, 1:]
    got = sae.layer_activations(ids, None, [layer])[layer]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    if jump:  # the thresholds matter: some latents with a positive pre-activation stay 0
        assert bool(((pre[:, 1:] > 0) & (expected == 0)).any()) and bool((expected > 0).any())
    cols = sae.activations(ids, None, [(layer, 0), (layer, 5), (layer, 11)])
    torch.testing.assert_close(cols, expected[..., [0, 5, 11]], rtol=1e-5, atol=1e-5)
    rows = sae.rows_activations(ids, None, [(layer, 3), (layer, 7), (layer, 3)])
    torch.testing.assert_close(rows, torch.stack([expected[0, :, 3], expected[1, :, 7], expected[2, :, 3]]),
                               rtol=1e-5, atol=1e-5)
    mlp = base.activations(ids, None, [(layer, 0)])
    assert not torch.allclose(mlp[..., 0], expected[..., 0])  # the MLP neuron of the same index differs


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"])
def test_latents_are_the_sae_encoding_of_the_hook_site(tmp_path, hook):
    torch.manual_seed(0)
    net = tiny_model("llama")
    base = SubjectModel(net, tiny_tokenizer(), spec="tiny")
    sae = SAEModel(base, write_sae(tmp_path / "sae", hook))
    layer = int(hook.split(".")[1])
    ids = torch.randint(4, 60, (3, 10))
    got = sae.layer_activations(ids, None, [layer])[layer]
    seen = {}
    site = net.model.layers[layer] if hook.endswith("resid_post") else net.model.layers[layer].mlp.down_proj
    handle = site.register_forward_hook(lambda m, i, o: seen.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        net(torch.cat([torch.full((3, 1), base.bos_token_id), ids], 1))
    handle.remove()
    expected = torch.relu((seen["h"].float() - sae.b_dec) @ sae.W_enc + sae.b_enc)[:, 1:]
    assert got.shape == (3, 10, D_SAE)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float((got > 0).float().mean()) > 0.05  # some latents fire
    effects = sae.output_effects(layer, 0, k=3)
    assert len(effects[0]) == 3


def test_run_fit_report_and_steer_on_latents(tiny_dir, tmp_path):
    sae = write_sae(tmp_path / "sae")
    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, out, "--sae", str(sae), "--layers", "0", "--neurons", "0-3", "--ablation")
            if a != "--no-report"]
    res = cli(*args)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (out / "neurons").iterdir()) == ["L1.N0", "L1.N1", "L1.N2", "L1.N3"]  # the SAE's layer
    assert res.stdout.startswith("latent ") and "\n4 latents (4 fitted now)" in res.stdout  # said "neuron(s)"
    meta = json.loads((out / "run.json").read_text())
    assert "+sae:" in meta["model"]["spec"] and meta["model"]["sae"]["hook_name"] == "blocks.1.hook_resid_post"
    fitted = [json.loads((out / "neurons" / k / "result.json").read_text()) for k in ("L1.N0", "L1.N1", "L1.N2", "L1.N3")]
    live = [r for r in fitted if r["status"] == "fitted"]
    assert live and all(set(r["ablation"]["ce_increase"]) == {"graph", "zero", "mean"} for r in live)
    assert (out / "report.html").exists() and (out / "viewer" / "neurons" / "L1.N0.html").exists()
    page = (out / "viewer" / "neurons" / f"L1.N{live[0]['neuron']['index']}.html").read_text()
    # the page names what it shows: a latent of the SAE at its hook, whose output effect is its decoder direction
    assert 'SAE latent L1.N' in page and "of the SAE at blocks.1.hook_resid_post" in page
    assert "the latent's decoder direction" in page and "activation ÷ the latent's maximum" in page
    assert "Neuron L1" not in page and "the neuron's output weights" not in page
    # its server reads true activations with --model and --sae (--model alone is refused): what the pages suggest
    assert 'data-sae="1"' in page and 'getAttribute("data-sae")' in page and "--model MODEL --sae SAE to see the latent" in page
    assert "--model</code> and <code>--sae</code> to see true activations" in (out / "report.html").read_text()
    key = live[0]["neuron"]["index"]
    steer = cli("steer", "--model", str(tiny_dir / "model"), "--sae", str(sae), "--layer", "1", "--neuron", str(key),
                "--prompt", "the cat sat", "--max", "1", "--scale", "20", "--tokens", "2", "--json", "-q")
    assert steer.returncode == 0, steer.stderr
    assert json.loads(steer.stdout)["kl"] > 0  # clamping the latent changes the next-token distribution
    steer = cli("steer", "--model", str(tiny_dir / "model"), "--sae", str(sae), "--layer", "1", "--neuron", str(key),
                "--prompt", "the cat sat", "--max", "1", "--scale", "20", "--tokens", "2", "-q")
    assert steer.returncode == 0, steer.stderr
    assert steer.stdout.startswith(f"latent L1.N{key} of the SAE at blocks.1.hook_resid_post: maximum activation 1 ")
    assert "gainers are among the latent's 50 most promoted" in steer.stdout and "neuron" not in steer.stdout


@pytest.mark.parametrize("make, needle", [
    (lambda p: write_sae(p, d_in=16), "does not match the model's hidden size"),
    (lambda p: write_sae(p, hook="blocks.7.hook_resid_post"), "layers 0-2"),
    (lambda p: write_sae(p, hook="blocks.1.attn.hook_z"), "not supported"),
    (lambda p: write_sae(p, activation_fn="gelu"), "not supported"),
    (lambda p: write_sae(p, architecture="jumprelu"), "threshold should have shape"),
    (lambda p: write_sae(p, hook="blocks.0.hook_resid_pre"), "embeddings"),
    (lambda p: p, "not an SAELens directory"),
    (lambda p: (write_sae(p), (p / "cfg.json").write_text("[" * 100_000 + "]" * 100_000))[0], "not a readable SAE config"),
])
def test_bad_sae_is_one_line(tiny_dir, tmp_path, make, needle):
    sae = make(tmp_path / "sae")
    sae.mkdir(exist_ok=True)
    work = tmp_path / "cwd"
    work.mkdir()
    res = cli("run", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--excerpt-length", "32",
              "--neurons", "0", "--sae", str(sae), "-q", cwd=work)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("n2g: error:")]
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr and list(work.iterdir()) == []


def test_an_sae_run_reads_true_activations_through_its_own_sae_and_no_other(tiny_dir, tmp_path):
    from n2g.models import load_model
    from n2g.sae import load_sae

    sae = write_sae(tmp_path / "sae")
    out = tmp_path / "run"
    args = [a for a in run_args(tiny_dir, out, "--sae", str(sae), "--layers", "1", "--neurons", "0-3") if a != "--no-report"]
    assert cli(*args).returncode == 0
    model = str(tiny_dir / "model")
    for command, needle in [
        (("serve", str(out), "--model", model, "--port", "0"), "holds SAE latents (blocks.1.hook_resid_post); give its SAE with --sae"),
        (("predict", str(out), "the cat", "--model", model), "holds SAE latents (blocks.1.hook_resid_post); give its SAE with --sae"),
        (("predict", str(out), "the cat", "--sae", str(sae)), "--sae needs --model"),
        (("predict", str(out), "the cat", "--model", model, "--sae", str(write_sae(tmp_path / "wide", d_sae=24))),
         "made with another SAE than"),  # its latent 0 is another latent
        (("serve", str(out), "--model", model, "--sae", str(write_sae(tmp_path / "pre", hook="blocks.2.hook_resid_pre")),
          "--port", "0"), "hook_name 'blocks.1.hook_resid_post' there, 'blocks.2.hook_resid_pre' here"),
    ]:
        res = cli(*command)
        assert res.returncode == 2 and needle in res.stderr and "Traceback" not in res.stderr, (command, res.stderr)
    # with the run's SAE over the model: each latent's true activation on the text, as the SAE encodes it
    live = [json.loads(p.read_text()) for p in sorted((out / "neurons").glob("*/result.json"))]
    live = [r for r in live if r["status"] == "fitted"]
    res = cli("predict", str(out), "the cat sat on the mat", "--model", model, "--sae", str(sae), "--json", "-q",
              *(a for r in live for a in ("--neuron", f"L1.N{r['neuron']['index']}")))
    assert res.returncode == 0, res.stderr
    got = {e["key"]: e["true"] for e in json.loads(res.stdout)["results"]}
    latents = load_sae(sae, load_model(model))
    ids = json.loads(res.stdout)["token_ids"]
    with torch.no_grad():
        acts = latents.activations(torch.tensor([ids]), None, [(1, r["neuron"]["index"]) for r in live])[0].numpy()
    assert sorted(got) == sorted(f"L1.N{r['neuron']['index']}" for r in live)
    assert np.abs(acts).max() > 0  # (the output holds 4 decimals)
    for j, r in enumerate(live):
        np.testing.assert_allclose(got[f"L1.N{r['neuron']['index']}"], acts[:, j] / r["stats"]["max_activation"], rtol=0, atol=5.1e-5)


@pytest.mark.parametrize("cfg, weights, needle", [
    ({"activation_fn": "topk", "activation_fn_kwargs": [3]}, None, "activation_fn_kwargs.k"),  # was AttributeError
    ({"activation_fn": "topk", "activation_fn_kwargs": {"k": "abc"}}, None, "activation_fn_kwargs.k"),  # ValueError
    ({"activation_fn": "topk", "activation_fn_kwargs": {"k": -3}}, None, "activation_fn_kwargs.k"),  # torch error later
    ({"hook_name": "blocks." + "9" * 5000 + ".hook_resid_post"}, None, "not supported"),  # int() digit limit
    ({"d_in": 32.7}, None, "d_in must be a positive whole number"),  # was read as 32
    ({"d_sae": 0}, None, "d_sae must be a positive whole number"),
    ({"apply_b_dec_to_input": "false"}, None, "apply_b_dec_to_input must be true or false"),  # was read as True
    ({"architecture": ["jumprelu"]}, None, "architecture must be a string"),  # was read as relu
    ({}, {"W_enc": torch.full((D_IN, D_SAE), float("nan"))}, "not all finite floats"),  # NaN latents at fit time
    ({}, {"W_enc": torch.ones(D_IN, D_SAE, dtype=torch.int64)}, "not all finite floats"),
])
def test_bad_sae_config_or_weights_are_refused_when_loaded(tmp_path, cfg, weights, needle):
    folder = write_sae(tmp_path / "sae")
    (folder / "cfg.json").write_text(json.dumps({**json.loads((folder / "cfg.json").read_text()), **cfg}))
    if weights:
        from safetensors.torch import load_file

        save_file({**load_file(str(folder / "sae_weights.safetensors")), **weights}, str(folder / "sae_weights.safetensors"))
    base = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    with pytest.raises(N2GError, match=needle):
        SAEModel(base, folder)


def test_sae_weights_that_cannot_be_read_are_named(tmp_path, monkeypatch):
    # safetensors called such a file missing: "cannot read ... (FileNotFoundError); is it a safetensors file?"
    folder = write_sae(tmp_path / "sae")
    deny(monkeypatch, "n2g.sae.open", folder / "sae_weights.safetensors")
    base = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    with pytest.raises(N2GError, match=r"cannot read .*sae_weights.safetensors \(Permission denied\); make the SAE's"):
        SAEModel(base, folder)


@pytest.mark.parametrize("layers", ["2", "0,1"])
def test_run_on_a_layer_the_sae_does_not_read_writes_nothing(tiny_dir, tmp_path, layers):
    sae = write_sae(tmp_path / "sae")
    out = tmp_path / "run"
    res = cli(*run_args(tiny_dir, out, "--sae", str(sae), "--layers", layers, "--neurons", "0"))
    assert res.returncode == 2 and "this SAE reads layer 1" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()  # was: a run directory holding run.json and no neurons


def test_the_weights_key_tells_top_k_settings_apart_and_keeps_a_relu_saes_key(tmp_path):
    """An SAE's k is part of what it computes: a cfg.json edited from relu to top-k, or to another k, must
    not reuse the scans or resume the run of the old one (it was keyed on the weights alone)."""
    torch.manual_seed(0)
    base = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny")
    keys = {}
    for name, cfg in {"relu": {}, "k1": {"activation_fn": "topk", "activation_fn_kwargs": {"k": 1}},
                      "k2": {"activation_fn": "topk", "activation_fn_kwargs": {"k": 2}}}.items():
        sae = SAEModel(base, write_sae(tmp_path / name, **cfg))
        keys[name] = sae.weights_key()
        assert sae.info()["sae"].get("k") == cfg.get("activation_fn_kwargs", {}).get("k")
    assert len(set(keys.values())) == 3  # the same weights in all three folders
    import hashlib

    from n2g.models import add_tensor_sample

    relu = SAEModel(base, tmp_path / "relu")  # its key is computed as before k was keyed: old runs resume
    h = hashlib.sha256(f"{base.weights_key()}|{relu.hook_name}|{relu.jumprelu}|{relu.apply_b_dec}".encode())
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        add_tensor_sample(h, name, getattr(relu, name))
    assert keys["relu"] == h.hexdigest()[:16]


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_mlp_out_is_what_the_mlp_adds_to_the_residual(tmp_path, family):
    """hook_mlp_out is the MLP's contribution to the residual stream: in Gemma 2/3 (Gemma Scope's MLP SAEs) that is
    the output of the norm applied after the MLP, not of the down projection; latents were encoded from the
    un-normalised projection output, and a clamped latent's decoded change was passed through that norm."""
    torch.manual_seed(0)
    net = tiny_model(family)
    base = SubjectModel(net, tiny_tokenizer(), spec="tiny")
    sae = SAEModel(base, write_sae(tmp_path / "sae", "blocks.1.hook_mlp_out"))
    block = net.model.layers[1]
    contribution = getattr(block, "post_feedforward_layernorm", block.mlp.down_proj)
    ids = torch.randint(4, 60, (2, 9))
    h = _site_output(net, contribution, ids, base.bos_token_id)
    expected = torch.relu((h - sae.b_dec) @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(sae.layer_activations(ids, None, [1])[1], expected[:, 1:], rtol=1e-5, atol=1e-5)
    from n2g.steer import clamped

    clean = _site_output(net, block, ids, base.bos_token_id)
    with clamped(sae, 1, 4, 2.5):
        edited = _site_output(net, block, ids, base.bos_token_id)
    # the residual after the block moves by exactly the latent's decoded change
    torch.testing.assert_close(edited - clean, (2.5 - expected[..., 4:5]) * sae.W_dec[4], rtol=1e-4, atol=1e-4)


def test_an_sae_latent_is_fitted_and_loaded_from_python_as_the_cli_fits_it(tiny_dir, tmp_path):
    import n2g
    from n2g.errors import N2GError
    from n2g.sae import load_sae

    sae = write_sae(tmp_path / "sae")
    out = tmp_path / "run"
    res = cli(*run_args(tiny_dir, out, "--sae", str(sae), "--layers", "1", "--neurons", "0-3"))
    assert res.returncode == 0, res.stderr
    saved = {k: json.loads((out / "neurons" / k / "result.json").read_text()) for k in ("L1.N0", "L1.N1", "L1.N2", "L1.N3")}
    key = next(k for k, r in saved.items() if r["status"] == "fitted")
    index = saved[key]["neuron"]["index"]
    latents = load_sae(sae, n2g.load_model(str(tiny_dir / "model")))
    corpus = n2g.load_corpus(str(tiny_dir / "corpus.txt"), latents, length=32)  # as run_args cut it
    fitted = n2g.fit_neuron(latents, 1, index, corpus=corpus, progress=False)
    assert fitted.stats_.max_activation == pytest.approx(saved[key]["stats"]["max_activation"])
    assert fitted.scores_["n2g"].f1 == pytest.approx(saved[key]["scores"]["n2g"]["f1"])
    loaded = n2g.load_neuron(out, key, model=latents)  # the run's latent, reading text through the model's tokenizer
    ids = loaded.tokenize("the cat sat on the mat")
    np.testing.assert_array_equal(loaded.predict("the cat sat on the mat"), loaded.predict(ids))
    np.testing.assert_allclose(loaded.predict(ids), fitted.predict(ids), atol=1e-5 * fitted.scale)
    with pytest.raises(N2GError, match="holds SAE latents; pass its SAE over the model"):
        n2g.load_neuron(out, key, model=str(tiny_dir / "model"))
