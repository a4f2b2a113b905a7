"""Features: anything that maps token ids to one value per token.

A feature is a callable ``f(token_ids) -> activations`` on ``[batch, pos]`` tensors: a neuron of a
subject model (:class:`NeuronFeature`), an SAE latent, or a planted rule in a test. The distiller
only ever sees features, so every stage can be tested without a model. Sequences are padded on the
right; a feature must be causal (a token's value depends only on it and the tokens before it),
so padding never changes a real token's value.

This module also holds the request/driver protocol the stages speak: a stage is a generator that
yields :class:`Evaluate` or :class:`Candidates` requests and receives the answers, so the same
stage code runs one neuron at a time (:func:`drive`) or many neurons in shared batches
(``n2g.engine``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .errors import N2GError


class Feature(Protocol):
    """Token ids ``[batch, pos]`` in, activations ``[batch, pos]`` out."""

    def __call__(self, token_ids: torch.Tensor) -> torch.Tensor: ...


class SubstituteSource(Protocol):
    """Plausible replacement tokens for position ``positions[b]`` of ``seqs[b]``, best first."""

    def __call__(self, seqs: Sequence[Sequence[int]], positions: Sequence[int], k: int) -> list[list[int]]: ...


@dataclass
class Evaluate:
    """Request: the normalised activation of every token of every sequence."""

    seqs: list[list[int]]
    stage: str = "other"
    """Which stage asks (prune, importance, augment, ...): cost accounting only, never the answer."""


@dataclass
class Candidates:
    """Request: up to ``k`` substitutes for ``seqs[b][positions[b]]``, word shape kept."""

    seqs: list[list[int]]
    positions: list[int]
    k: int


@dataclass
class Compute:
    """Request: the result of ``fn(*args)``, pure host work with no model call (the engine may
    run it in a worker process while the model serves other neurons)."""

    fn: Callable
    args: tuple


Steps = Generator[Any, Any, Any]


def drive(steps: Steps, evaluate: Callable[[list[list[int]]], list[np.ndarray]],
          candidates: Callable[[list[list[int]], list[int], int], list[list[int]]] | None = None):
    """Run a stage generator to completion, answering its requests; returns its result."""
    answer = None
    try:
        while True:
            request = steps.send(answer)
            if isinstance(request, Evaluate):
                answer = evaluate(request.seqs) if request.seqs else []
            elif isinstance(request, Candidates):
                if candidates is None or not request.seqs:
                    answer = [[] for _ in request.seqs]
                else:
                    answer = _checked_candidates(candidates(request.seqs, request.positions, request.k),
                                                 len(request.seqs))
            elif isinstance(request, Compute):
                answer = request.fn(*request.args)
            else:  # pragma: no cover - programming error
                raise TypeError(f"unknown request {request!r}")
    except StopIteration as stop:
        return stop.value


def _checked_candidates(found, n: int) -> list[list[int]]:
    """A substitutes callable's answer as ``n`` lists of token ids, or an N2GError saying what it must return."""
    hint = "a substitutes callable must return one list of token ids (whole numbers of 0 or more) per sequence"
    if isinstance(found, (str, bytes)) or not isinstance(found, Sequence) or len(found) != n:
        raise N2GError(f"{hint}; got {type(found).__name__}"
                       + (f" of {len(found)} items for {n} sequences" if isinstance(found, Sequence) else ""))
    out = []
    for row in found:
        if isinstance(row, torch.Tensor):
            row = row.detach().cpu().tolist()
        elif isinstance(row, np.ndarray):
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_)) and 0 <= int(t) < 2**31
                for t in row):
            raise N2GError(f"{hint}; got {str(row)[:60]!r}")
        out.append([int(t) for t in row])
    return out


MAX_PADDING = 1.15
"""A batch computes at most this many positions per real token (sequences are bucketed by length)."""


def length_batches(lengths: Sequence[int], batch_tokens: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Group sequence indices into batches sorted by length, each at most ``batch_tokens`` padded
    tokens and at most ``max_padding`` padded positions per real one."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    real = 0
    for i in order:
        longest = max(lengths[i], 1)  # sorted, so the newest is the longest
        if current and ((len(current) + 1) * longest > batch_tokens
                        or (len(current) + 1) * longest > max_padding * (real + max(lengths[i], 1))):
            batches.append(current)
            current, real = [], 0
        current.append(i)
        real += max(lengths[i], 1)
    if current:
        batches.append(current)
    return batches


def pad(seqs: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to a ``[batch, pos]`` id tensor and its 0/1 attention mask."""
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), max(width, 1)), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), max(width, 1)), dtype=torch.long)
    for r, s in enumerate(seqs):
        if len(s):
            ids[r, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
            mask[r, : len(s)] = 1
    return ids, mask


def as_numbers(out, source: str, hint: str) -> torch.Tensor:
    """``out`` (what ``source`` returned) as a tensor, or an N2GError ending with ``hint``."""
    try:
        return torch.as_tensor(out)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise N2GError(f"{source} returned {type(out).__name__}, not numbers ({exc}); {hint}") from None


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def call_feature(feature: Callable, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Call a feature, passing the attention mask only to features that declare they use it."""
    if getattr(feature, "uses_attention_mask", False):
        out = feature(ids, attention_mask=mask)
    else:
        out = feature(ids)
    out = as_numbers(out, "the feature", "a feature must return a [batch, pos] tensor or array of activations")
    if out.is_complex():  # casting would drop the imaginary part with only a warning
        raise N2GError("the feature returned complex numbers; a feature must return real activations "
                       "(take .real or .abs() yourself)")
    if out.shape != ids.shape:
        raise N2GError(
            f"the feature returned shape {tuple(out.shape)} for token ids of shape {tuple(ids.shape)}; "
            "a feature must return one value per token ([batch, pos])"
        )
    out = out.detach()
    if out.is_floating_point() and torch.finfo(out.dtype).max > FLOAT32_MAX:
        # float64 values past float32's range would become infinities below and be blamed on NaNs
        finite = out[torch.isfinite(out)]
        peak = float(finite.abs().max()) if finite.numel() else 0.0
        if peak > FLOAT32_MAX:
            raise N2GError(f"the feature returned values up to {peak:.3g}, which overflow float32 (largest "
                           f"{FLOAT32_MAX:.3g}), the precision n2g works in; scale the feature down (e.g. divide it "
                           "by a constant)")
    return out.to("cpu", torch.float32)


def evaluate_sequences(feature: Callable, seqs: Sequence[Sequence[int]], batch_tokens: int = 16384,
                       pad_id: int = 0) -> list[np.ndarray]:
    """Raw feature values for variable-length sequences, in padded batches sorted by length."""
    out: list[np.ndarray | None] = [None] * len(seqs)
    for batch in length_batches([len(s) for s in seqs], batch_tokens):
        ids, mask = pad([seqs[i] for i in batch], pad_id)
        values = call_feature(feature, ids, mask).numpy()
        for r, i in enumerate(batch):
            out[i] = values[r, : len(seqs[i])].copy()
    return out  # type: ignore[return-value]


def check_finite(values: np.ndarray, name: str) -> None:
    """Raise a clear error when a feature produced NaN or infinite values."""
    if not np.all(np.isfinite(values)):
        raise N2GError(
            f"{name} produced NaN or infinite activations; check the feature function (a subject model in half "
            "precision: load it with dtype='float32')"
        )


class Normalised:
    """Wraps a raw evaluator: multiplies by the sign and divides by the neuron's maximum."""

    def __init__(self, feature: Callable, scale: float, sign: float = 1.0, name: str = "feature",
                 batch_tokens: int = 16384, pad_id: int = 0):
        if not (math.isfinite(scale) and scale > 0):
            raise N2GError(f"{name}: the normalising maximum must be a positive finite number (got {scale})")
        self.feature, self.scale, self.sign, self.name = feature, float(scale), float(sign), name
        self.batch_tokens, self.pad_id = batch_tokens, pad_id

    def __call__(self, seqs: list[list[int]]) -> list[np.ndarray]:
        raw = evaluate_sequences(self.feature, seqs, self.batch_tokens, self.pad_id)
        out = []
        for values in raw:
            check_finite(values, self.name)
            out.append((values * self.sign / self.scale).astype(np.float32))
        return out


class NeuronFeature:
    """One neuron of a subject model as a feature (raw activations, both signs)."""

    uses_attention_mask = True

    def __init__(self, model, layer: int, index: int):
        model.check_neuron(layer, index)
        self.model, self.layer, self.index = model, layer, index

    def __call__(self, token_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model.activations(token_ids, attention_mask, [(self.layer, self.index)])[..., 0]
