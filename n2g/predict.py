"""Prediction: run a fitted graph over batches of token ids.

For each position the trie is walked backwards from the token (exact token before wildcard, or a
search over exact, wildcard and wildcard-run branches, as configured); the prediction is the activation of the
most specific END reached (most exact context tokens, then deepest), or
0. Works on ``[batch, pos]`` tensors or arrays (with an optional mask; masked positions get 0) and
on ragged lists of sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .graph import NeuronGraph


def predict_batch(graph: NeuronGraph, token_ids, attention_mask=None) -> np.ndarray:
    """Normalised predictions ``[batch, pos]`` for a batch of token ids. With ``attention_mask`` each row's text
    is its unmasked tokens: padding (left or right) is no context, and the text starts at its first real token
    (where a start-of-text node matches); masked positions predict 0."""
    ids = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    if ids.ndim == 1:
        return graph.predict_sequence(ids.tolist())
    out = np.zeros(ids.shape, np.float32)
    mask = None
    if attention_mask is not None:
        mask = attention_mask.detach().cpu().numpy() if isinstance(attention_mask, torch.Tensor) else np.asarray(attention_mask)
        mask = mask.astype(bool)
    for b in range(ids.shape[0]):
        if mask is None:
            out[b] = graph.predict_sequence(ids[b].tolist())
        elif mask[b].any():
            out[b, mask[b]] = graph.predict_sequence(ids[b][mask[b]].tolist())
    return out


def predict_sequences(graph: NeuronGraph, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Normalised predictions for ragged sequences."""
    return [graph.predict_sequence(list(s)) for s in seqs]
