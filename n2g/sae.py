"""SAE latents as features: every latent of a sparse autoencoder at a hook site of the model.

``--sae PATH`` reads a local SAELens-format directory: ``cfg.json`` (``d_in``, ``d_sae``,
``hook_name`` such as ``blocks.3.hook_resid_post``, ``blocks.3.hook_resid_pre`` (layer 1 or later: the
residual stream entering block 3 is block 2's output) or ``blocks.3.hook_mlp_out``, ``activation_fn``
``relu`` or ``topk`` with ``activation_fn_kwargs.k``, or ``architecture`` ``jumprelu`` (Gemma Scope
style: a latent is its pre-activation where that exceeds its ``threshold``, else 0), optional
``apply_b_dec_to_input``) and ``sae_weights.safetensors`` (``W_enc [d_in, d_sae]``, ``b_enc``,
``W_dec [d_sae, d_in]``, ``b_dec``, and ``threshold [d_sae]`` for jumprelu).
:class:`SAEModel` wraps the subject model so that the rest of n2g sees the SAE's layer with
``d_sae`` "neurons": the scan, fitting, reports and viewer run unchanged, and ablation and steering
edit a latent by adding the change of its decoded contribution at the hook site.
"""

from __future__ import annotations

import inspect
import json
import re
import types
from pathlib import Path

import torch
from torch import nn

from .errors import N2GError
from .models import SubjectModel, _get, _StopForward, neuron_numbers

HOOK = re.compile(r"^blocks\.(\d{1,6})\.hook_(resid_post|resid_pre|mlp_out)$")


class _LatentSite:
    """Stands where an MLP output projection would: a pre-hook registered here sees ``(latents,)``
    ``[batch, pos, d_sae]``, may return edited latents, and the site's output changes by the edit decoded."""

    def __init__(self, owner: "SAEModel"):
        self.owner = owner

    def register_forward_pre_hook(self, hook):
        owner = self.owner

        def forward_hook(module, inputs, output):
            h = output[0] if isinstance(output, tuple) else output
            f = owner.encode_latents(h)
            edited = hook(module, (f,))
            if edited is None:
                return None
            delta = ((edited[0] if isinstance(edited, tuple) else edited).float() - f) @ owner.W_dec
            h = h + delta.to(h.dtype)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return owner.site.register_forward_hook(forward_hook)


class SAEModel:
    """The subject model seen through an SAE: layer ``layer`` has ``d_sae`` latents as its neurons."""

    def __init__(self, base: SubjectModel, path: str | Path):
        self.base = base
        path = Path(path).expanduser()
        cfg_path, weights_path = path / "cfg.json", path / "sae_weights.safetensors"
        if not cfg_path.is_file() or not weights_path.is_file():
            raise N2GError(f"{path} is not an SAELens directory (it needs cfg.json and sae_weights.safetensors)")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            meta = cfg.get("meta") if isinstance(cfg, dict) else None
            if "hook_name" not in cfg and isinstance(meta, dict) and "hook_name" in meta:
                cfg = {**cfg, "hook_name": meta["hook_name"]}  # SAELens 6 keeps it under meta
            d_in, d_sae, hook_name = cfg["d_in"], cfg["d_sae"], str(cfg["hook_name"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
            raise N2GError(f"{cfg_path} is not a readable SAE config with d_in, d_sae and hook_name ({exc})") from None
        for what, value in (("d_in", d_in), ("d_sae", d_sae)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise N2GError(f"{cfg_path}: {what} must be a positive whole number (got {value!r}); "
                               "use the cfg.json saved with the SAE")
        for what in ("activation_fn", "activation_fn_str", "architecture"):
            if what in cfg and not isinstance(cfg[what], str):
                raise N2GError(f"{cfg_path}: {what} must be a string (got {cfg[what]!r}); use the cfg.json saved with the SAE")
        if not isinstance(cfg.get("apply_b_dec_to_input", True), bool):
            raise N2GError(f"{cfg_path}: apply_b_dec_to_input must be true or false "
                           f"(got {cfg['apply_b_dec_to_input']!r})")
        m = HOOK.match(hook_name)
        if not m:
            raise N2GError(f"SAE hook {hook_name!r} is not supported; use blocks.L.hook_resid_post, "
                           "blocks.L.hook_resid_pre (L >= 1) or blocks.L.hook_mlp_out")
        self.layer, self.site_kind = int(m.group(1)), m.group(2)
        if self.site_kind == "resid_pre" and self.layer == 0:
            raise N2GError("SAE hook blocks.0.hook_resid_pre (the embeddings) is not supported; "
                           "use an SAE on a later layer, or on blocks.0.hook_resid_post")
        if self.layer >= base.n_layers:
            raise N2GError(f"the SAE reads layer {self.layer} ({hook_name}) but the model has layers 0-{base.n_layers - 1}; "
                           "use an SAE trained on this model")
        hidden = int(getattr(base.model.config, "hidden_size", 0) or getattr(base.model.config, "n_embd", 0) or 0)
        if hidden and d_in != hidden:
            raise N2GError(f"the SAE's width d_in={d_in} does not match the model's hidden size {hidden}; "
                           "use an SAE trained on this model")
        act = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu"))
        architecture = cfg.get("architecture", "standard").lower()
        if architecture not in ("standard", "jumprelu", "topk"):
            # a gated SAE (or any other) encodes differently: read as a ReLU SAE its latents would be wrong
            raise N2GError(f"{cfg_path}: SAE architecture {cfg['architecture']!r} is not supported; "
                           "standard (relu or topk), topk and jumprelu are")
        norm = cfg.get("normalize_activations", "none")
        if norm in ("constant_norm_rescale", "layer_norm"):  # applied to the input at run time, which n2g does not
            raise N2GError(f"{cfg_path}: normalize_activations {norm!r} is not supported (n2g encodes the hook's "
                           "activations as they are); use an SAE saved with none or expected_average_only_in")
        self.topk = None
        self.jumprelu = architecture == "jumprelu" or act == "jumprelu"
        if self.jumprelu:
            act = "relu"
        if architecture == "topk":  # SAELens 6: the architecture names it and k is a field of its own
            act = "topk"
        if act == "topk":
            kwargs = cfg.get("activation_fn_kwargs") or {}
            k = kwargs.get("k") if isinstance(kwargs, dict) else None
            if k is None and architecture == "topk":
                k = cfg.get("k")
            if isinstance(k, bool) or not isinstance(k, int) or k < 1:
                raise N2GError(f"{cfg_path}: a topk SAE needs k (activation_fn_kwargs.k, or k beside architecture topk), "
                               f"a positive whole number (got {k!r})")
            self.topk = k
        elif act != "relu":
            raise N2GError(f"SAE activation_fn {act!r} is not supported; relu, topk and the jumprelu architecture are")
        from safetensors.torch import load_file

        try:
            open(weights_path, "rb").close()  # safetensors reports a file it may not read as missing
        except OSError as exc:
            raise N2GError(f"cannot read {weights_path} ({exc.strerror}); make the SAE's files readable") from None
        try:
            w = load_file(str(weights_path))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise N2GError(f"cannot read {weights_path} ({type(exc).__name__}); is it a safetensors file?") from None
        want = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        if self.jumprelu:
            want["threshold"] = (d_sae,)
        for name, shape in want.items():
            if name not in w or tuple(w[name].shape) != shape:
                got = None if name not in w else tuple(w[name].shape)
                raise N2GError(f"{weights_path}: {name} should have shape {shape} (d_in={d_in}, d_sae={d_sae}), "
                               f"found {got}; the weights do not match cfg.json")
            if not (w[name].is_floating_point() and bool(torch.isfinite(w[name].float()).all())):
                raise N2GError(f"{weights_path}: {name} holds {w[name].dtype} values that are not all finite floats; "
                               "the weights are damaged or not an SAE's")
        dev = base.device
        self.W_enc, self.b_enc = w["W_enc"].float().to(dev), w["b_enc"].float().to(dev)
        self.W_dec, self.b_dec = w["W_dec"].float().to(dev), w["b_dec"].float().to(dev)
        self.threshold = w["threshold"].float().to(dev) if self.jumprelu else None
        self.apply_b_dec = bool(cfg.get("apply_b_dec_to_input", True))
        self.hook_name, self.path = hook_name, path
        blocks = _get(base.model, base._family.blocks)
        if self.site_kind == "mlp_out":  # what the MLP adds to the residual: after the norm Gemma 2/3 and OLMo 2
            # apply to the MLP's output (where TransformerLens's hook_mlp_out reads), else the output projection's
            post = getattr(blocks[self.layer], "post_feedforward_layernorm", None)
            self.site: nn.Module = post if isinstance(post, nn.Module) else base._projs[self.layer]
        else:  # resid_pre of block L is what block L - 1 hands on
            self.site = blocks[self.layer if self.site_kind == "resid_post" else self.layer - 1]
        self.d_mlp = d_sae
        self.n_layers = base.n_layers
        self.spec = f"{base.spec}+sae:{path.resolve()}"
        self._projs = {self.layer: _LatentSite(self)}

    def __getattr__(self, name):
        """Everything not defined here is the subject model's (tokenizer, model, device ...), and its
        methods run as methods of this object: ``activations``, ``rows_activations`` and every edit
        (ablation, steering) then find the latent site in ``self._projs`` and the latent count in
        ``self.d_mlp``, not the MLP's."""
        attr = inspect.getattr_static(type(self.base), name, None)
        if isinstance(attr, types.FunctionType):
            return types.MethodType(attr, self)
        return getattr(self.base, name)

    def encode_latents(self, h: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of hook-site activations ``h`` (float32)."""
        x = h.float() - (self.b_dec if self.apply_b_dec else 0.0)
        pre = x @ self.W_enc + self.b_enc
        if self.threshold is not None:  # jumprelu: the pre-activation where it clears the latent's threshold
            return torch.where(pre > self.threshold, torch.relu(pre), 0.0)
        if self.topk is None:
            return torch.relu(pre)
        top = pre.topk(min(self.topk, pre.shape[-1]), dim=-1)
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def check_neuron(self, layer: int, index: int) -> None:
        layer, index = neuron_numbers(layer, index)
        if layer != self.layer:
            raise N2GError(f"this SAE reads layer {self.layer} ({self.hook_name}); ask for layer {self.layer}")
        if not 0 <= index < self.d_mlp:
            raise N2GError(f"latent {index} does not exist: this SAE has latents 0..{self.d_mlp - 1}")

    @torch.inference_mode()
    def layer_activations(self, token_ids, attention_mask, layers):
        layers = sorted({int(l) for l in layers})
        for l in layers:
            self.check_neuron(l, 0)
        if not layers:
            return {}
        ids, mask, offset = self.base._prepare(token_ids, attention_mask)
        captured = {}

        def grab(module, inputs, output):
            captured["f"] = self.encode_latents(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        handle = self.site.register_forward_hook(grab)
        try:
            self.base.model(**self.base._forward_kwargs(ids, mask))
        except _StopForward:
            pass
        finally:
            handle.remove()
        f = captured["f"][:, offset:]
        keep = mask[:, offset:].bool().unsqueeze(-1)
        return {self.layer: torch.where(keep, f, 0.0)}

    @torch.inference_mode()
    def output_effects(self, layer: int, index: int, k: int = 10):
        """Tokens the latent's decoder direction promotes and suppresses (direct logit effect)."""
        return self.output_effects_many(layer, [index], k)[0]

    @torch.inference_mode()
    def output_effects_many(self, layer: int, indices, k: int = 10):
        """:meth:`output_effects` of several latents at once (one batched pass through the unembedding)."""
        indices = [int(i) for i in indices]
        for i in indices:
            self.check_neuron(layer, i)
        rows = torch.tensor(indices, dtype=torch.long, device=self.W_dec.device)
        return self.base.directions_effects(self.W_dec[rows], k)

    def weights_key(self) -> str:
        """The subject model's weights key extended by this SAE's weights and settings (see
        :meth:`n2g.models.SubjectModel.weights_key`)."""
        import hashlib

        from .models import add_tensor_sample

        settings = f"{self.base.weights_key()}|{self.hook_name}|{self.jumprelu}|{self.apply_b_dec}"
        if self.topk is not None:  # (a relu SAE's key is what it was before k was keyed)
            settings += f"|topk={self.topk}"
        if self.site is not self.base._projs[self.layer] and self.site_kind == "mlp_out":  # read after the post-MLP
            settings += "|site=post_feedforward_layernorm"  # norm since 2026-12-07: scans cached before read before it
        h = hashlib.sha256(settings.encode())
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
            if getattr(self, name) is not None:
                add_tensor_sample(h, name, getattr(self, name))
        return h.hexdigest()[:16]

    def content_key(self) -> str:
        """The subject model's content key extended by every value of this SAE's weights and its settings
        (see :meth:`n2g.models.SubjectModel.content_key`)."""
        import hashlib

        from .models import add_tensor_content

        base = self.base.content_key()
        known = self.__dict__.get("_content_key")  # (not getattr: that would find the base model's)
        if known is None or known[0] != base:
            h = hashlib.sha256(f"{base}|{self.hook_name}|{self.jumprelu}|{self.apply_b_dec}|{self.topk}".encode())
            for name in ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"):
                if getattr(self, name) is not None:
                    add_tensor_content(h, name, getattr(self, name))
            self.__dict__["_content_key"] = known = (base, h.hexdigest()[:16])
        return known[1]

    def info(self) -> dict:
        return {**self.base.info(), "spec": self.spec, "d_mlp": self.d_mlp,
                "sae": {"path": str(self.path), "hook_name": self.hook_name, "d_sae": self.d_mlp,
                        "activation_fn": "jumprelu" if self.jumprelu else "topk" if self.topk else "relu",
                        **({"k": self.topk} if self.topk is not None else {})}}

    def __repr__(self) -> str:
        return f"SAEModel({self.base!r}, {self.hook_name}, {self.d_mlp} latents)"


def load_sae(path: str | Path, base: SubjectModel) -> SAEModel:
    return SAEModel(base, path)
