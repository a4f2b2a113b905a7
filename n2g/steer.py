"""Steering and attribution: what a neuron does to the model's next-token predictions.

:func:`steer` clamps a neuron to a multiple of its maximum activation at every position of a
prompt (and of the tokens generated after it) and reports the change in next-token probabilities
(top gainers and losers), a short greedy continuation before and after, and how many of the top
gainers are among the tokens the neuron's output weights promote (its direct logit effect; for a clamp
below 0, the tokens they suppress, which a fall in the activation promotes).
:func:`attribution` gives, for a prompt and an output token, the neuron's attribution at every
position: the gradient of that token's next-token probability with respect to the neuron's
activation, times the activation (the Transluce seed's definition).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import N2GError, is_real, is_whole


@dataclass
class Steering:
    """What clamping one neuron did to one prompt."""

    value: float
    """The activation the neuron was clamped to (raw scale)."""
    gainers: list[tuple[str, float, float]] = field(default_factory=list)
    """(token, probability before, after), largest increase first."""
    losers: list[tuple[str, float, float]] = field(default_factory=list)
    """(token, probability before, after), largest decrease first."""
    before: str = ""
    """Greedy continuation of the prompt by the clean model."""
    after: str = ""
    """Greedy continuation with the neuron clamped."""
    promoted_overlap: int = 0
    """How many of the top gainers are among the 50 output tokens the clamp's direction promotes most: the neuron's
    most promoted tokens for a value of 0 or more, its most suppressed ones (promoted as it falls) below 0."""
    kl: float = 0.0
    """KL(clean || clamped) of the next-token distribution, nats."""

    def to_dict(self) -> dict:
        return {"value": self.value, "gainers": [list(g) for g in self.gainers], "losers": [list(l) for l in self.losers],
                "before": self.before, "after": self.after, "promoted_overlap": self.promoted_overlap, "kl": self.kl}


MAX_TOKENS = 1024
"""Most tokens a greedy continuation generates (``--tokens``): each one is a forward pass over the
whole prompt so far, twice (clean and clamped)."""
UNDECLARED_CONTEXT = 4096
"""Most positions (BOS, prompt and generated tokens) for a model whose config declares no context
length (BLOOM's ALiBi): attention memory grows with the square of the length, so none is unbounded."""


def check_tokens(n: int) -> None:
    """A continuation length n2g generates (``--tokens``); checked before a model is loaded too."""
    if n > MAX_TOKENS:
        raise N2GError(f"--tokens {n} is more than the {MAX_TOKENS:,} n2g generates; give --tokens {MAX_TOKENS} or fewer")


def check_prompt(model, ids: Sequence[int], extra: int = 0) -> None:
    """A prompt the model can take: not empty, and within its context with ``extra`` tokens more."""
    from .models import context_limit

    if not len(ids):
        raise N2GError("the prompt has no tokens; give some text with --prompt")
    check_tokens(extra)
    limit = context_limit(model)  # n_positions, max_position_embeddings or max_seq_len (MPT)
    need = len(ids) + extra + (1 if model.bos_token_id is not None else 0)
    if limit is None and need > UNDECLARED_CONTEXT:
        raise N2GError(f"the prompt is {len(ids)} tokens; with {extra} generated tokens it needs {need} positions, "
                       f"more than the {UNDECLARED_CONTEXT:,} n2g allows a model whose config declares no context "
                       "length; give a shorter --prompt (or fewer --tokens)")
    if limit is not None and need > limit:
        raise N2GError(f"the prompt is {len(ids)} tokens; with {extra} generated tokens it exceeds this model's "
                       f"context of {limit}; give a shorter --prompt (or fewer --tokens)")


def _scalar(value):
    """A one-element tensor or array as the Python number it holds; anything else unchanged."""
    if isinstance(value, (torch.Tensor, np.ndarray)) and value.ndim == 0:
        return value.item()
    return value


def _whole(value, what: str, least: int = 0) -> int:
    """``value`` as an int of at least ``least`` (a NumPy integer too), or an N2GError."""
    value = _scalar(value)
    if not is_whole(value) or value < least:
        raise N2GError(f"{what} must be a whole number of {least} or more (got {value!r})")
    return int(value)


def _token_ids(model, ids, what: str = "the prompt") -> list[int]:
    """``ids`` as a list of ints, each a token id of ``model``, or an N2GError: a string was read character
    by character, a 2-D batch gave a ValueError, an id beyond the vocabulary an IndexError from inside the model."""
    hint = "pass one sequence of token ids from the model's tokenizer, e.g. model.encode(text)"
    if isinstance(ids, (str, bytes)):
        raise N2GError(f"{what} must be token ids, not text; {hint}")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    try:
        arr = np.asarray(ids)
    except (TypeError, ValueError):
        arr = np.asarray(None)
    if arr.size == 0 and arr.ndim == 1:
        return []  # check_prompt says the prompt has no tokens
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise N2GError(f"{what} must be one sequence of whole-number token ids (got {arr.dtype} of shape "
                       f"{arr.shape}); {hint}")
    vocab = int(model.vocab_size)
    if int(arr.min()) < 0 or int(arr.max()) >= vocab:
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise N2GError(f"{what} holds token id {bad}, which is not in this model's vocabulary (ids 0 to "
                       f"{vocab - 1}); {hint}")
    return arr.astype(np.int64).tolist()


def _neuron(model, layer, index) -> tuple[int, int]:
    from .models import neuron_numbers

    model.check_neuron(layer, index)  # a whole number each, and in the model
    return neuron_numbers(layer, index)


@contextlib.contextmanager
def clamped(model, layer: int, index: int, value: float | None):
    """Within the block, the neuron's activation is ``value`` at every position (None: untouched)."""
    if value is None:
        yield
        return

    def hook(module, args):
        x = args[0].clone()
        x[..., index] = value
        return (x, *args[1:])

    handle = model._projs[layer].register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.inference_mode()
def _next_probs(model, ids: list[int], layer: int, index: int, value: float | None) -> torch.Tensor:
    x, mask, _ = model._prepare(torch.tensor([ids]), None)
    with clamped(model, layer, index, value):
        logits = model.model(**model._forward_kwargs(x, mask)).logits[0, -1]
    return torch.softmax(logits.float(), dim=-1).cpu()


def _greedy(model, ids: list[int], n: int, layer: int, index: int, value: float | None) -> list[int]:
    out = list(ids)
    for _ in range(n):
        out.append(int(_next_probs(model, out, layer, index, value).argmax()))
    return out[len(ids):]


def steer(model, layer: int, index: int, ids: Sequence[int], value: float, k: int = 10, n_tokens: int = 12,
          promoted: Sequence[str] | None = None) -> Steering:
    """Clamp neuron ``layer``/``index`` to ``value`` (raw activation) on prompt ``ids``; see the module docs."""
    layer, index = _neuron(model, layer, index)
    ids = _token_ids(model, ids)
    value = _scalar(value)
    if not is_real(value) or not math.isfinite(value):
        raise N2GError(f"value must be a finite number, the raw activation to clamp the neuron to (got {value!r})")
    limit = torch.finfo(model.dtype).max if model.dtype.is_floating_point else math.inf
    if abs(value) > limit:
        raise N2GError(f"value {value:g} is beyond this model's {model.dtype} range; give a smaller value")
    value = float(value)
    k, n_tokens = _whole(k, "k"), _whole(n_tokens, "n_tokens")
    check_prompt(model, ids, n_tokens)
    p0 = _next_probs(model, ids, layer, index, None)
    p1 = _next_probs(model, ids, layer, index, value)
    delta = p1 - p0
    k = min(k, delta.numel())
    names = lambda idx: model.token_strings([int(i) for i in idx])
    up, down = delta.topk(k).indices.tolist(), (-delta).topk(k).indices.tolist()
    gainers = [(t, float(p0[i]), float(p1[i])) for t, i in zip(names(up), up)]
    losers = [(t, float(p0[i]), float(p1[i])) for t, i in zip(names(down), down)]
    if promoted is None:  # the tokens the clamp's direction writes towards: a value below 0 (a negative side) the
        # neuron's most suppressed ones, which a fall in its activation promotes
        promoted = [t for t, _ in model.output_effects(layer, index, k=50)[0 if value >= 0 else 1]]
    overlap = len(set(t for t, _, _ in gainers) & set(promoted))
    kl = float((p0 * (torch.log(p0.clamp_min(1e-30)) - torch.log(p1.clamp_min(1e-30)))).sum())
    return Steering(float(value), gainers, losers, model.text(_greedy(model, ids, n_tokens, layer, index, None)),
                    model.text(_greedy(model, ids, n_tokens, layer, index, value)), overlap, kl)


def attribution(model, layer: int, index: int, ids: Sequence[int], target: int) -> np.ndarray:
    """Per prompt position: d p(target as the next token) / d activation, times the activation."""
    layer, index = _neuron(model, layer, index)
    ids = _token_ids(model, ids)
    target = _whole(target, "target (a token id)")
    if target >= model.vocab_size:
        raise N2GError(f"target {target} is not in this model's vocabulary (ids 0 to {model.vocab_size - 1}); "
                       "pass the token id of the output token")
    check_prompt(model, ids)
    x, mask, offset = model._prepare(torch.tensor([ids]), None)
    leaf = {}

    def hook(module, args):
        h = args[0].clone()
        a = h[..., index].detach().clone().requires_grad_(True)
        leaf["a"] = a
        h[..., index] = a
        return (h, *args[1:])

    handle = model._projs[layer].register_forward_pre_hook(hook)
    try:
        with torch.enable_grad():
            logits = model.model(**model._forward_kwargs(x, mask)).logits[0, -1]
            prob = torch.softmax(logits.float(), dim=-1)[int(target)]
            prob.backward()
    finally:
        handle.remove()
    a = leaf["a"]
    attr = (a.grad * a).detach().float().reshape(-1).cpu().numpy()
    return attr[offset:]
