"""The published implementation's rules (albertsgarde/Neuron2Graph), as options the ``paper`` preset turns on.

Written from the published behaviour, not its code; evaluation/results/paper_vs_published.md lists every
difference, and tests/test_paper.py pins each rule to what the published code printed on planted inputs.

- :func:`published_prune_steps` (``prune_windows="published"``): windows of 5, 10, ..., ``max_context``
  tokens ending at the pivot, counting the BOS slot the model puts in front as a token of the full prefix,
  plus the whole prefix when it is at most ``max_context`` tokens, shortest first; a window is accepted
  when the pivot is its (first) maximum and keeps strictly more than ``prune_threshold`` of its original
  activation; if none is, the longest is taken when anything in it is active, else the pivot gives no
  example.
- :func:`post_context_steps` (``post_context``): up to that many tokens after the pivot, within the pivot's
  sentence (a sentence ends at a token of ``sentence_end_ids``), are appended to a pruned example.
- :func:`rescale` (``rescale_pruned``): the recorded activations of a pruned example are multiplied by
  ``original pivot activation / window maximum`` and rounded to 3 decimals.
- :func:`add_example_strict` (``strict``): paths for positions strictly above the fire threshold, context
  tokens strictly above the importance threshold.
- :func:`for_model`: the model-dependent settings (occlusion token, sentence ends) from a tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .config import DistillConfig
from .errors import N2GError
from .features import Evaluate, Steps
from .graph import WILDCARD, NeuronGraph
from .prune import Pruned, measure_windows

WINDOW_STEP = 5
"""Published window lengths are multiples of this (``skip_interval``)."""
SENTENCE_END_CHARS = (".", "!", "\n")
"""A token whose text contains one of these ends a sentence (published ``sentence_tokenizer``)."""


def window_contexts(pivot: int, max_context: int = 30, step: int = WINDOW_STEP) -> list[int]:
    """Context lengths (tokens before the pivot) of the published windows, shortest first.

    A window of ``k`` tokens ends at the pivot and counts the BOS slot as a token of the full prefix
    (``pivot + 2`` tokens), so it has ``k - 1`` context tokens, or all ``pivot`` of them when it is the
    whole prefix. ``k`` runs over the multiples of ``step`` up to ``max_context`` and the whole prefix
    when that is at most ``max_context`` tokens.
    """
    full = pivot + 2
    return sorted({min(k - 1, pivot) for k in range(1, min(full, max_context) + 1) if k % step == 0 or k == full})


def published_prune_steps(examples: list[tuple[list[int], np.ndarray, int]], cfg: DistillConfig) -> Steps:
    """Generator stage: prune each ``(token_ids, activations, pivot)`` the published way.

    Returns the kept :class:`~n2g.prune.Pruned` examples (``source`` indexes ``examples``; a pivot whose
    windows are all inactive gives none), each with ``window_max`` set.
    """
    contexts = [window_contexts(pivot, cfg.max_context) for _, _, pivot in examples]
    tried: dict[int, dict[int, np.ndarray]] = {}
    for e, c, values in (yield from measure_windows(examples, contexts)):
        tried.setdefault(e, {})[c] = np.asarray(values, np.float32)
    pruned = []
    for e, (ids, acts, pivot) in enumerate(examples):
        original = float(acts[pivot])
        chosen = None
        for c in contexts[e]:
            v = tried[e][c]
            if int(np.argmax(v)) == c and float(v[c]) > cfg.prune_threshold * original:
                chosen = c
                break
        if chosen is None:
            c = contexts[e][-1]
            if not float(np.max(tried[e][c])) > 0:
                continue
            chosen = c
        v = tried[e][chosen]
        start = pivot - chosen
        pruned.append(Pruned(list(ids[start : pivot + 1]), v, e, start, original, pivot=chosen,
                             window_max=float(np.max(v))))
    return pruned


def post_end(ids: Sequence[int], pivot: int, n_post: int, sentence_end: set[int] | frozenset[int]) -> int:
    """End (exclusive) of the tokens kept after ``pivot``: at most ``n_post``, up to and including the
    token that ends the pivot's sentence (none if the pivot ends it)."""
    end = min(len(ids), pivot + 1 + n_post)
    for k in range(pivot, end):
        if int(ids[k]) in sentence_end:
            return k + 1
    return end


def post_context_steps(pruned: list[Pruned], examples: list[tuple[list[int], np.ndarray, int]],
                       cfg: DistillConfig) -> Steps:
    """Generator stage: append the post-pivot tokens to pruned examples and measure them (in place)."""
    if cfg.post_context <= 0:
        return pruned
    ends = set(cfg.sentence_end_ids or ())
    grow = []
    for p in pruned:
        ids, _, pivot = examples[p.source]
        end = post_end(ids, pivot, cfg.post_context, ends)
        if end > pivot + 1:
            grow.append((p, list(ids[p.start : end])))
    if not grow:
        return pruned
    answers = yield Evaluate([seq for _, seq in grow], "post_context")
    for (p, seq), values in zip(grow, answers):
        p.pivot = p.pivot_index
        p.token_ids = seq
        p.activations = np.asarray(values, np.float32)
    return pruned


def rescale(p: Pruned, acts: np.ndarray | None = None) -> np.ndarray:
    """Activations of a pruned example (or of its variant) as the published code records them."""
    acts = np.asarray(p.activations if acts is None else acts, np.float64)
    window_max = p.window_max if p.window_max is not None else float(np.max(acts[: p.pivot_index + 1]))
    factor = p.original / window_max if window_max > 0 else 1.0
    return np.round(acts * factor, 3).astype(np.float32)


def strict_path(ids: Sequence[int], imp: np.ndarray, j: int, threshold: float) -> list[tuple[int, float]]:
    """The backward path of position ``j`` keeping context tokens strictly above ``threshold``."""
    important = [k for k in range(j) if imp[k, j] > threshold]
    furthest = min(important, default=j)
    path = [(int(ids[j]), 1.0)]
    for k in range(j - 1, furthest - 1, -1):
        path.append((int(ids[k]) if imp[k, j] > threshold else WILDCARD, float(imp[k, j])))
    return path


def add_example_strict(graph: NeuronGraph, ids: Sequence[int], acts: np.ndarray, imp: np.ndarray,
                       threshold: float, source: int | None = None) -> int:
    """Like :meth:`NeuronGraph.add_example` with the published strict comparisons; returns paths added."""
    added = 0
    for j in range(len(ids)):
        if acts[j] > graph.fire_threshold:
            graph.add_path(strict_path(ids, imp, j, threshold), float(acts[j]), source)
            added += 1
    return added


def sentence_end_ids(token_strings: Sequence[str]) -> tuple[int, ...]:
    """Ids (indices of ``token_strings``) whose text contains ``.``, ``!`` or a newline."""
    return tuple(i for i, s in enumerate(token_strings) if any(ch in s for ch in SENTENCE_END_CHARS))


def for_model(cfg: DistillConfig, model) -> DistillConfig:
    """``cfg`` with the settings that need the tokenizer filled in (unchanged when none are asked for).

    ``occlusion_text`` becomes ``occlusion_token_id`` when it encodes to one token; ``post_context`` with
    ``sentence_end_ids=None`` gets the ids of the tokens that end a sentence. ``model`` needs ``encode``,
    ``token_strings`` and ``vocab_size`` (a :class:`~n2g.models.SubjectModel`); without a tokenizer the
    config is returned as it is.
    """
    changes: dict = {}
    try:
        if cfg.occlusion_text is not None and cfg.occlusion_token_id is None:
            ids = model.encode(cfg.occlusion_text)
            if len(ids) == 1:
                changes["occlusion_token_id"] = int(ids[0])
        if cfg.post_context > 0 and cfg.sentence_end_ids is None:
            changes["sentence_end_ids"] = sentence_end_ids(model.token_strings(list(range(int(model.vocab_size)))))
    except (N2GError, AttributeError, TypeError):  # no tokenizer (a bare model in tests): model defaults
        return cfg
    return cfg.replace(**changes) if changes else cfg
