"""The neuron model: fit a graph to a feature, predict with it, score it against baselines.

``NeuronModel`` follows the estimator contract: ``__init__`` stores parameters, ``fit(examples)``
returns ``self`` and sets attributes ending in ``_``, ``predict(token_ids)`` returns activations on
the feature's own scale, ``score(examples)`` returns :class:`~n2g.records.Scores`. The stages are
generators (see :mod:`n2g.features`), so :func:`neuron_steps` is the same code whether one neuron is
fitted alone (:func:`distill`) or many share batches (``n2g.engine``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .activations import partition
from .augment import Variant, augment_steps
from .baselines import fit_baselines
from .config import DistillConfig, given, preset
from .errors import N2GError, is_real, is_whole
from .examples import random_pool, split_examples
from .features import Compute, Evaluate, Normalised, Steps, drive, evaluate_sequences, check_finite
from .graph import WILDCARD, NeuronGraph
from .grow import Grower, add_context_activators, drop_explained_activators, prune_unchanged, run_spans
from .importance import importance_steps
from .predict import predict_batch, predict_sequences
from .prune import Pruned, choose_pivots, prune_steps
from .published import add_example_strict, post_context_steps, published_prune_steps, rescale
from .records import Example, NeuronStats, Scores
from .score import score_arrays

QUANTILES = (0.5, 0.9, 0.99, 0.999)


@dataclass
class FitTrace:
    """What fitting saw, for inspection and rendering of examples."""

    pruned: list[Pruned] = field(default_factory=list)
    importances: list[np.ndarray] = field(default_factory=list)
    variants: list[Variant] = field(default_factory=list)


@dataclass
class Proposals:
    """What the model was asked while fitting: pruned windows, their importances, variants."""

    pruned: list[Pruned]
    importances: list[np.ndarray]
    variants: list[Variant]
    owners: list[int]
    """``owners[t]``: the training excerpt pruning target ``t`` came from."""


def fit_steps(train: Sequence[Example], calibration: Sequence[Example], cfg: DistillConfig,
              occlusion_id: int) -> Steps:
    """Generator stage: prune, weigh, augment and build the graph from training examples."""
    proposals = yield from propose_steps(train, cfg, occlusion_id,
                                         common_tokens([e.token_ids for e in list(train) + list(calibration)], cfg))
    return build_graph(train, calibration, cfg, proposals)


def common_tokens(sequences, cfg: DistillConfig) -> frozenset[int]:
    """With augmentation and ``novel_variants``: the tokens seen at least ``max(min_count, 1)`` times in
    the training evidence ``sequences``, which it values itself (variants substitute only others)."""
    if not (cfg.augment and cfg.novel_variants):
        return frozenset()
    flat = [np.asarray(s, np.int64).ravel() for s in sequences]
    if not flat:
        return frozenset()
    uniq, counts = np.unique(np.concatenate(flat), return_counts=True)
    return frozenset(uniq[counts >= max(cfg.min_count, 1)].tolist())


def _ranked(train: Sequence[Example]) -> list[int]:
    peak = [max(e.activations, default=0.0) for e in train]
    return sorted(range(len(train)), key=lambda k: -peak[k])


def pruned_excerpts(train: Sequence[Example], cfg: DistillConfig) -> list[int]:
    """Training examples whose pivots are pruned, best first: the ``n_prune`` best whose maximum fires
    (with ``prune_quiet``, published: whose maximum is above 0)."""
    peak = [max(e.activations, default=0.0) for e in train]
    keep = (lambda a: a > 0.0) if cfg.prune_quiet else (lambda a: a >= cfg.fire_threshold)
    return [k for k in _ranked(train)[: cfg.n_prune] if keep(peak[k])]


def propose_steps(train: Sequence[Example], cfg: DistillConfig, occlusion_id: int,
                  common: frozenset[int] = frozenset()) -> Steps:
    """Generator stage: every model request of a fit (prune, post-context, importance, augment).

    ``common``: tokens variants do not substitute (:func:`common_tokens`)."""
    if cfg.occlusion_token_id is not None:  # an explicit occlusion token (paper: '"', see n2g.published.for_model)
        occlusion_id = cfg.occlusion_token_id
    targets, owners = [], []  # owners[t]: the excerpt id pruning target t came from
    for k in pruned_excerpts(train, cfg):
        acts = np.asarray(train[k].activations)
        for pivot in choose_pivots(acts, cfg):
            targets.append((list(train[k].token_ids), acts, pivot))
            owners.append(k)
    if cfg.prune_windows == "published":  # published window grid, argmax test and fallback
        pruned = yield from published_prune_steps(targets, cfg)
    else:
        pruned = yield from prune_steps(targets, cfg)
    pruned = yield from post_context_steps(pruned, targets, cfg)  # tokens after the pivot (post_context > 0)
    # Without augmentation a pivot's importance for itself is never read: its occluded copy is not run.
    imps = yield from importance_steps([p.token_ids for p in pruned], [p.activations for p in pruned], occlusion_id,
                                       diagonal_last=cfg.augment and cfg.augment_positions == "important")
    variants = []
    if cfg.augment and pruned:
        variants = yield from augment_steps([p.token_ids for p in pruned], [p.activations for p in pruned],
                                            imps, cfg, occlusion_id, common, [p.pivot_index for p in pruned])
    return Proposals(pruned, imps, variants, owners)


def written_examples(written: tuple[np.ndarray, np.ndarray] | None, threshold: float) -> list[Example]:
    """Model-written tokens as single-token training examples (no context: the corpus teaches contexts),
    every occurrence of each token the written text shows firing (``threshold``). A rare token that never
    fires there is left to the background value: it would change no firing prediction, and thousands of
    one-token examples would triple the host work of a fit."""
    if written is None:
        return []
    ids, acts = written
    keep = np.isin(ids, np.unique(ids[acts >= threshold]))
    ids, acts = ids[keep], acts[keep]
    return [Example([int(t)], [float(a)], split="train", source="written") for t, a in zip(ids.tolist(), acts.tolist())]


def build_graph(train: Sequence[Example], calibration: Sequence[Example], cfg: DistillConfig,
                proposals: Proposals, written: Sequence[Example] = ()) -> tuple[NeuronGraph, FitTrace]:
    """Host work of a fit (no model calls): the graph from the proposals and all training evidence
    (``written``: single-token examples of model-written text, evidence like the corpus's)."""
    graph = NeuronGraph(cfg.end_activation, cfg.match, cfg.fire_threshold)
    pruned, imps, owners = proposals.pruned, proposals.importances, proposals.owners
    trace = FitTrace(pruned, imps, proposals.variants)
    corpus_seen = list(train) + list(calibration)  # a training excerpt's id is its index here
    seen = corpus_seen + list(written)
    ranked = _ranked(train)
    for p, imp in zip(pruned, imps):
        acts = rescale(p) if cfg.rescale_pruned else p.activations  # published: pivot back to its original value
        if cfg.pivot_activation == "original":  # the window was kept for its context; its END keeps the real value
            acts = acts.copy()
            acts[p.pivot_index] = p.original
        if cfg.strict:  # published comparisons (> fire and importance thresholds)
            add_example_strict(graph, p.token_ids, acts, imp, cfg.importance_threshold, owners[p.source])
        else:
            graph.add_example(p.token_ids, acts, imp, cfg.importance_threshold, owners[p.source])
    if cfg.augment and pruned and cfg.novel_variants and trace.variants:  # as propose_steps skipped them
        common = common_tokens([e.token_ids for e in corpus_seen], cfg)
        trace.variants = [v for v in trace.variants if int(v.token_ids[v.position]) not in common]
    if cfg.augment and pruned:
        for v in trace.variants:
            if v.importance is not None:
                v_acts = rescale(pruned[v.source], v.activations) if cfg.rescale_pruned else v.activations
                add = (lambda *a: add_example_strict(graph, *a)) if cfg.strict else graph.add_example
                add(v.token_ids, v_acts, v.importance, cfg.importance_threshold, owners[pruned[v.source].source])
    dense = cfg.cover and cfg.calibrate and cfg.dense and firing_share(seen, cfg.fire_threshold) >= DENSE_SHARE
    if dense:  # a neuron that fires on most tokens: "any token" and its exceptions
        wild = graph.add_child(0, WILDCARD)
        graph.nodes[wild].end = 1.0  # an END, so calibration counts the tokens nothing else matches here
    elif cfg.cover:
        covered: set[int] = set()
        for k, e in enumerate(seen):
            acts = np.asarray(e.activations)
            hits = np.flatnonzero(acts >= cfg.fire_threshold)  # only firing tokens matter here
            for t, a in zip(np.asarray(e.token_ids)[hits].tolist(), acts[hits].tolist()):
                start = graph.nodes[0].children.get(t)
                if start is None:
                    covered.add(t)
                    graph.add_path([(t, 1.0)], float(a), k)
                elif t in covered:  # one path per token; later excerpts where it fires support it too
                    graph.nodes[start].sources.add(k)
    if cfg.merge_wildcards:  # published: exact siblings of a wildcard merged into it
        graph.merge_wildcards()
    grower = None
    # each excerpt starts a text for the model (BOS, then the excerpt); a single written token does not
    starts = np.fromiter((e.source != "written" for e in seen), bool, len(seen)) if cfg.start_node else None
    if cfg.grow and seen:
        ids, acts = _evidence_arrays(seen)
        grower = lambda: Grower(graph, ids, acts, np.arange(len(seen)), min_count=cfg.min_count,
                                max_depth=cfg.grow_depth, run_window=cfg.run_window, min_gain=cfg.min_gain,
                                skip_questions=cfg.grow_gaps, split_wildcards=cfg.grow_gaps, set_cost=cfg.set_cost,
                                clean_gain=cfg.clean_gain, grow_below=cfg.grow_below, value_gain=cfg.value_gain,
                                join_depths=cfg.join_depths, run_max=cfg.run_max, run_cost=cfg.run_cost, starts=starts)
        grower().grow()
    if cfg.calibrate:
        evidence = [(np.asarray(e.token_ids), np.asarray(e.activations)) for e in seen]
        told = [v for v in trace.variants if cfg.variant_evidence == "all"
                or (cfg.variant_evidence == "firing" and v.importance is not None)]
        evidence += [(v.token_ids, v.activations) for v in told]
        sources = None
        if cfg.out_of_sample:
            sources = list(range(len(seen))) + [owners[pruned[v.source].source] for v in told]
        select = None
        if cfg.choose_on == "split":  # a mix shaped like the test split: best top excerpts + random ones
            best_top = ranked[: (cfg.n_top + 1) // 2]
            randoms = [len(train) + j for j, e in enumerate(calibration) if e.source == "random"][: cfg.n_random_test]
            select = best_top + randoms
        calibrate = lambda: graph.calibrate(evidence, backoff=cfg.backoff, statistic=cfg.end_statistic,
                                            min_count=cfg.min_count, sources=sources, end_value=cfg.end_value,
                                            select=select, subtree=cfg.subtree)
        calibrate()
        if cfg.cover and cfg.cover_context:  # firing tokens still predicted quiet get their context as a path
            missed = 0
            for k, e in enumerate(seen):
                acts = np.asarray(e.activations)
                if not np.any(acts[1:] >= cfg.fire_threshold):
                    continue  # nothing here could be missed
                ids = list(map(int, e.token_ids))
                pred = graph.predict_sequence(ids)
                for j in np.flatnonzero(acts >= cfg.fire_threshold).tolist():
                    a = acts[j]
                    if j > 0 and pred[j] < cfg.fire_threshold:
                        back = ids[max(0, j - cfg.cover_context) : j][::-1]
                        graph.add_path([(ids[j], 1.0)] + [(b, 0.0) for b in back], float(a), k)
                        missed += 1
            if missed:
                calibrate()
        if cfg.grow and prune_unchanged(graph, evidence):
            calibrate()  # tokens of removed branches now count at their ancestors
        if cfg.context_activators and seen:  # rules for any token after Y, where they fix training errors
            ids, acts = _evidence_arrays(seen)
            if add_context_activators(graph, ids, acts, max_depth=cfg.grow_depth, min_count=cfg.min_count,
                                      min_gain=cfg.min_gain, run_cost=cfg.run_cost,
                                      run_spans=run_spans(cfg.run_window, cfg.run_max) if cfg.run_window > 1 else (),
                                      starts=starts):
                calibrate()
                if cfg.grow and prune_unchanged(graph, evidence):  # exact branches the rules now say
                    calibrate()
                if drop_explained_activators(graph, evidence[: len(seen)]):  # activators the rules now say
                    calibrate()
        exceptions = add_exceptions(graph, evidence[: len(seen)], cfg.min_count) if dense else []
        if exceptions:  # after the context rules: "any token after Y is quiet" says at once what many would
            if grower is not None:
                grower().grow(only=exceptions)  # the contexts in which an exception fires after all
            calibrate()
            if cfg.grow and prune_unchanged(graph, evidence):
                calibrate()
        if cfg.quiet_tokens:  # corpus text only: variants are edited contexts chosen because they fire
            if add_quiet_tokens(graph, evidence[: len(seen)], cfg.quiet_tokens, max(cfg.min_count, 2), dense=dense) and dense:
                calibrate()  # "any token" without the tokens that now hold their own value
        if cfg.background:
            set_background(graph, evidence[: len(seen)], max(cfg.min_count, 2) if cfg.background_tokens else None)
    return graph, trace


DENSE_SHARE = 0.5
"""With ``dense``: the share of training tokens that must fire for "any token" to be the graph's base."""


def firing_share(examples: Sequence[Example], threshold: float) -> float:
    """The share of the examples' tokens whose activation reaches ``threshold`` (0 with no tokens)."""
    n = sum(len(e.activations) for e in examples)
    if not n:
        return 0.0
    return sum(int(np.sum(np.asarray(e.activations) >= threshold)) for e in examples) / n


def _per_token(ids: np.ndarray, acts: np.ndarray, threshold: float):
    """Per distinct token of ``ids``: (tokens, index of each position's token, counts, firing counts, means)."""
    uniq, inv = np.unique(ids, return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq))
    fired = np.bincount(inv, weights=(acts >= threshold).astype(np.float64), minlength=len(uniq))
    means = np.bincount(inv, weights=acts, minlength=len(uniq)) / np.maximum(counts, 1)
    return uniq, inv, counts, fired, means


def add_exceptions(graph: NeuronGraph, evidence: Sequence[tuple[np.ndarray, np.ndarray]], min_count: int = 2) -> list[int]:
    """For a dense neuron's graph (``[*]`` fires): a one-token path for every token that the graph
    predicts to fire at least ``min_count`` times in ``evidence`` (token ids, activations; excerpt k
    is ``evidence[k]``) while most of those occurrences do not fire, holding their mean activation and
    naming every excerpt they occur in as a source; calibration and pruning then treat these like
    any activator. Returns their ids."""
    thr = graph.fire_threshold
    tokens, values, owners = [], [], []
    for k, (ids, acts) in enumerate(evidence):
        ids = np.asarray(ids, np.int64)
        said = (graph.predict_sequence(ids.tolist()) >= thr) & (ids >= 0)
        tokens.append(ids[said])
        values.append(np.asarray(acts, np.float64)[said])
        owners.append(np.full(int(said.sum()), k, np.int64))
    if not tokens:
        return []
    uniq, inv, counts, fired, means = _per_token(np.concatenate(tokens), np.concatenate(values), thr)
    pairs = np.unique(np.stack([inv, np.concatenate(owners)], 1), axis=0)  # (token index, excerpt), sorted
    bounds = np.searchsorted(pairs[:, 0], np.arange(len(uniq) + 1))
    added = []
    for j in np.flatnonzero((counts >= min_count) & (2 * fired < counts)).tolist():
        node = graph.add_path([(int(uniq[j]), 1.0)], float(means[j]))
        graph.nodes[node].end = float(means[j])  # also where a proposal already made it an activator
        graph.nodes[node].sources.update(pairs[bounds[j]: bounds[j + 1], 1].tolist())
        added.append(int(uniq[j]))
    return added


def add_quiet_tokens(graph: NeuronGraph, evidence: Sequence[tuple[np.ndarray, np.ndarray]], limit: int,
                     min_count: int = 2, dense: bool = False) -> list[int]:
    """Add up to ``limit`` quiet activators: tokens outside the graph, seen at least ``min_count``
    times in ``evidence``, never firing, valued at their mean activation (which may be negative).

    They are ranked by how much variance they explain: count x (mean - base)^2, where base is the
    mean activation of every token outside the graph, so a token that is often moderately active
    (or often below the typical token, for a neuron with negative values) comes before a rare one.
    For a ``dense`` graph (``[*]`` fires) the tokens outside it mostly fire: the tokens "any token"
    predicts get their own value the same way, kept at or above the firing threshold (so no firing
    prediction changes), against a base of the median token's mean (a few strong ones do not move it).
    Returns the token ids added.
    """
    if not evidence:
        return []
    thr = graph.fire_threshold
    ids = np.concatenate([np.asarray(i, np.int64) for i, _ in evidence])
    acts = np.concatenate([np.asarray(a, np.float64) for _, a in evidence])
    keep = ids >= 0
    roots = graph.nodes[0].children
    wild = roots.get(WILDCARD)
    if dense and wild is not None:  # only the tokens "any token" predicts: context rules say the rest
        keep &= np.concatenate([[graph.match_end(row, i) == wild for i in range(len(row))]
                                for row in (np.asarray(i, np.int64).tolist() for i, _ in evidence)]).astype(bool)
    ids, acts = ids[keep], acts[keep]
    if not len(ids):
        return []
    uniq, inv, counts, fired, means = _per_token(ids, acts, thr)
    root_ids = np.fromiter(roots, np.int64, len(roots))
    ok = (counts >= min_count) & ~np.isin(uniq, root_ids)
    if dense:
        means = np.maximum(means, thr)
        order = np.argsort(means, kind="stable")
        base = float(means[order][np.searchsorted(np.cumsum(counts[order]), counts.sum() / 2)])
        ok &= (2 * fired >= counts) & (np.abs(means - base) > 1e-6)  # one "any token" values right needs no node
    else:
        outside = ~np.isin(ids, root_ids)
        base = float(acts[outside].mean()) if outside.any() else 0.0  # the typical token the graph does not know
        ok &= (fired == 0) & (means != 0)
    gain = np.where(ok, counts * (means - base) ** 2, -1.0)
    order = [j for j in np.argsort(-gain, kind="stable")[:limit] if gain[j] > 0]
    added = []
    for j in order:
        node = graph.add_path([(int(uniq[j]), 1.0)], float(means[j]))
        graph.nodes[node].end = float(means[j])
        added.append(int(uniq[j]))
    return added


def set_background(graph: NeuronGraph, evidence: Sequence[tuple[np.ndarray, np.ndarray]],
                   token_min_count: int | None = None) -> float | None:
    """Give the wildcard activator alone (``[*]``) an END: the mean training activation of the tokens
    no path of the graph matches, so a token the graph does not know is predicted at the typical
    unknown token's value instead of 0. Only a value below the firing threshold is set (firing
    predictions do not change); an exact activator's match, or any context rule's, wins over it.
    With ``token_min_count``, each token seen that many times where no path matches, never firing
    there, also gets its own mean there (``graph.token_values``). Returns the background value set, or None.
    """
    if not evidence:
        return None
    roots = graph.nodes[0].children
    anywhere = WILDCARD in roots  # a context rule may start at any token: every token is matched
    seqs = [np.asarray(ids, np.int64) for ids, _ in evidence]
    flat = np.concatenate(seqs)
    unmatched = flat >= 0
    if anywhere:
        candidates = np.flatnonzero(unmatched)
    else:  # a token no path starts at matches nothing: no trie walk for it
        starts = np.fromiter((k for k in roots if k != WILDCARD), np.int64)
        candidates = np.flatnonzero(unmatched & np.isin(flat, starts))
    bounds = np.cumsum([0] + [len(q) for q in seqs])
    which = np.searchsorted(bounds, candidates, side="right") - 1
    last, idl = -1, []
    for at, j in zip(candidates.tolist(), which.tolist()):
        if j != last:
            last, idl = j, seqs[j].tolist()
        if graph.match_end(idl, at - int(bounds[j])) is not None:
            unmatched[at] = False
    total, n = 0.0, 0
    acts = np.concatenate([np.asarray(a, np.float64) for _, a in evidence])
    for value in acts[unmatched].tolist():  # summed in position order, as token by token
        total += value
        n += 1
    if not n:
        return None
    value = total / n
    if not (math.isfinite(value) and value < graph.fire_threshold) or value == 0.0:
        return None
    wild = graph.add_child(0, WILDCARD)
    graph.nodes[wild].end = value
    graph.nodes[wild].end_values = [value] * n
    if token_min_count is not None:
        uniq, _, counts, fired, means = _per_token(flat[unmatched], acts[unmatched], graph.fire_threshold)
        own = (counts >= token_min_count) & (fired == 0) & (np.abs(means - value) >= TOKEN_VALUE_STEP)
        graph.token_values = {int(t): float(np.float32(m)) for t, m in zip(uniq[own].tolist(), means[own].tolist())}
    return value


TOKEN_VALUE_STEP = 0.005
"""A token's own background value is kept only where it differs from the background value by this much."""


def _evidence_arrays(examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray]:
    """``[n, width]`` token ids (-1 pads) and activations of examples of any lengths."""
    width = max((len(e.token_ids) for e in examples), default=0)
    ids = np.full((len(examples), width), -1, np.int64)
    acts = np.zeros((len(examples), width), np.float32)
    for r, e in enumerate(examples):
        ids[r, : len(e.token_ids)] = e.token_ids
        acts[r, : len(e.activations)] = e.activations
    return ids, acts


@dataclass
class NeuronFit:
    """The outcome of fitting one neuron (normalised scale)."""

    graph: NeuronGraph | None
    examples: list[Example]
    scores: dict[str, Scores]
    trace: FitTrace | None = None
    status: str = "fitted"
    ablation: dict | None = None
    """The ablation score, when the run asked for one (:mod:`n2g.ablate`)."""
    steering: dict | None = None
    """The steering check, when the run asked for ablation (:mod:`n2g.steer`)."""
    ceiling: dict | None = None
    """What any predictor keyed on tokens could reach on the test split (:func:`token_ceiling`)."""


def neuron_steps(excerpts: Sequence[Sequence[int]], ranked: Sequence[int], pool: Sequence[int],
                 cfg: DistillConfig, occlusion_id: int,
                 known: Mapping[int, np.ndarray] | None = None, is_train: Sequence[bool] | None = None,
                 evidence: Sequence[int] | None = None,
                 shared_common: tuple[frozenset[int], frozenset[int]] | None = None,
                 written: tuple[np.ndarray, np.ndarray] | None = None) -> Steps:
    """Generator stage for one neuron: examples, split, fit, predict, score against baselines.

    ``shared_common``: ``(excerpts, tokens)``, the :func:`common_tokens` of those training excerpts,
    computed once for the neurons that share an ``evidence`` list; used when the neuron's training
    evidence is exactly those excerpts (else computed here).

    ``known`` maps excerpt indices to normalised activations already measured (the scan's store);
    only excerpts missing from it are sent to the model. ``is_train`` is the run's corpus-level
    partition; ``evidence`` lists the training excerpts whose activations are known (the stored
    training partition): the baselines always learn from all of them, the graph does when
    ``cfg.evidence == "partition"``. ``written``: ``(token ids, normalised activations)`` of model-written
    tokens the training partition rarely shows (:mod:`n2g.written`), single-token evidence for the graph.
    """
    split = split_examples(ranked, pool, cfg, is_train)
    roles = ([(i, "train", "top") for i in split.train_top] + [(i, "test", "top") for i in split.test_top]
             + [(i, "train", "random") for i in split.train_random] + [(i, "test", "random") for i in split.test_random])
    known = known if known is not None else {}
    fetched: dict[int, np.ndarray] = {}
    missing = sorted({i for i, _, _ in roles if i not in known})
    if missing:
        values = yield Evaluate([list(excerpts[i]) for i in missing], "excerpts")
        fetched.update(zip(missing, values))
    value = lambda i: fetched[i] if i in fetched else known[i]
    examples = [Example(list(map(int, excerpts[i])), [float(v) for v in value(i)], split=s, source=src, excerpt_index=int(i))
                for i, s, src in roles]
    train_top = [e for e in examples if e.split == "train" and e.source == "top"]
    in_examples = {e.excerpt_index for e in examples if e.split == "train"}
    rest = [int(i) for i in (evidence or ()) if i not in in_examples]
    # The rest of the training partition travels as arrays (cheap to send to a worker process).
    rest_acts = known.many(rest) if hasattr(known, "many") else [np.asarray(known[i], np.float32) for i in rest]
    partition = (rest, [np.asarray(excerpts[i], np.int64) for i in rest], rest_acts)
    if shared_common is not None and shared_common[0] == (  # the neuron's training evidence is the shared one
            {e.excerpt_index for e in examples if e.split == "train"} | (set(rest) if cfg.evidence == "partition" else set())):
        common = shared_common[1]
    else:
        common = common_tokens([e.token_ids for e in examples if e.split == "train"]  # what build_graph will see
                               + (partition[1] if cfg.evidence == "partition" else []), cfg)
    proposals = yield from propose_steps(train_top, cfg, occlusion_id, common)
    fit = yield Compute(finish_fit, (examples, partition, proposals, cfg, written))  # heeds cfg.written and cfg.vocabulary
    return fit


def finish_fit(examples: list[Example], partition: tuple[list[int], list[np.ndarray], list[np.ndarray]],
               proposals: Proposals, cfg: DistillConfig,
               written: tuple[np.ndarray, np.ndarray] | None = None) -> "NeuronFit":
    """Host work of one neuron after its last model request: graph, predictions, scores, baselines.

    Pure (no model, no shared state), so the engine may run it in a worker process."""
    train_top = [e for e in examples if e.split == "train" and e.source == "top"]
    train_random = [e for e in examples if e.split == "train" and e.source == "random"]
    test = [e for e in examples if e.split == "test"]
    partition = [Example(ids.tolist(), acts.astype(np.float64).tolist(), split="train", source="partition",
                         excerpt_index=i) for i, ids, acts in zip(*partition)]
    calibration = train_random + (partition if cfg.evidence == "partition" else [])
    graph, trace = build_graph(train_top, calibration, cfg, proposals, written_examples(written, cfg.fire_threshold) if cfg.written or cfg.vocabulary else [])
    for e in examples:
        e.predicted = [float(v) for v in graph.predict_sequence(e.token_ids)]
    scores = {"n2g": score_arrays([e.activations for e in test], [e.predicted for e in test], cfg.fire_threshold)}
    train = train_top + train_random + partition
    train_ids = [np.asarray(e.token_ids, np.int64) for e in train]  # built once for every lookup
    train_acts = [np.asarray(e.activations, np.float64) for e in train]
    for name, lookup in fit_baselines(train_ids, train_acts).items():
        scores[name] = lookup.score(test, cfg.fire_threshold)  # the graph's threshold, not the lookups' default 0.5
    ceiling = token_ceiling(train_ids, train_acts, test, cfg.fire_threshold)
    return NeuronFit(graph, examples, scores, trace, ceiling=ceiling)


def token_ceiling(train_ids: Sequence[np.ndarray], train_acts: Sequence[np.ndarray], test: Sequence[Example],
                  threshold: float) -> dict:
    """How far a predictor keyed on tokens can get on ``test``: ``n_firing`` test tokens fire, of
    which ``n_seen`` are tokens that fire somewhere in the training evidence; no graph or lookup learned
    from that evidence recalls the others (only a variant measured by the model, or model-written text, can). ``f1`` is the
    firing F1 of a predictor exact on the seen ones and silent on the rest, 2s / (1 + s) with s the
    seen share (None without a firing test token)."""
    fired = [ids[acts >= threshold] for ids, acts in zip(train_ids, train_acts) if len(ids)]
    fired_tokens = np.unique(np.concatenate(fired)) if fired else np.zeros(0, np.int64)
    n_firing = n_seen = 0
    for e in test:
        acts = np.asarray(e.activations, np.float64)
        hits = np.asarray(e.token_ids, np.int64)[acts >= threshold]
        n_firing += len(hits)
        n_seen += int(np.isin(hits, fired_tokens).sum())
    share = n_seen / n_firing if n_firing else None
    return {"n_firing": n_firing, "n_seen": n_seen, "f1": None if share is None else 2 * share / (1 + share)}


def _smaller_side(cfg: DistillConfig) -> float:
    """The share of the corpus's excerpts on the smaller side of the partition (0.5 at the default ``held_out``)."""
    return min(cfg.held_out, 1.0 - cfg.held_out)


def top_k(cfg: DistillConfig) -> int:
    """Top excerpts the scan keeps per neuron: enough for both sides of the partition (twice the top
    excerpts asked for at ``held_out`` 0.5; more where one side holds less of them)."""
    return max(64, math.ceil((cfg.n_top + cfg.n_extra_train) / _smaller_side(cfg)))


def pool_size(cfg: DistillConfig) -> int:
    """Random excerpts in the shared pool: enough for both sides of the partition (as :func:`top_k`)."""
    return max(64, math.ceil((cfg.n_top + cfg.n_extra_train + cfg.n_random_test + cfg.n_random_train) / _smaller_side(cfg)))


def corpus_stats(acts: Sequence[np.ndarray], sample: Sequence[int], fire_threshold: float) -> NeuronStats:
    """Maximum over all tokens; quantiles and firing rate over the sampled excerpts' tokens."""
    peak = max((float(np.max(a)) for a in acts if len(a)), default=0.0)
    tokens = np.concatenate([np.asarray(acts[i]) for i in sample]) if len(sample) else np.zeros(0)
    quantiles = {str(q): float(np.quantile(tokens, q)) for q in QUANTILES} if tokens.size else {}
    rate = float(np.mean(tokens >= fire_threshold * peak)) if tokens.size and peak > 0 else 0.0
    return NeuronStats(peak, quantiles, rate, int(tokens.size))


class NeuronModel:
    """A fitted neuron graph with the estimator contract, on the feature's own scale.

    ``predict`` takes token ids (``[batch, pos]`` or one sequence) or, when the model knows its
    tokenizer (models from :func:`n2g.fit_neuron`), text; ``score`` takes examples, or token ids and
    true activations as plain arrays. ``print(model)`` lists the graph's paths; a notebook shows the
    graph and the scores. Pickling (or ``copy.deepcopy``) copies all it holds: a model from
    :func:`n2g.fit_neuron` carries its subject model, weights and all (``graph_.save`` keeps the graph alone).
    """

    def __init__(self, feature: Callable | None = None, config: DistillConfig | None = None, *,
                 scale: float = 1.0, sign: float = 1.0, substitutes: Callable | None = None,
                 occlusion_token_id: int = 0, name: str = "feature", encode: Callable[[str], list[int]] | None = None,
                 token_strings: Callable[[list[int]], list[str]] | None = None, vocab_size: int | None = None):
        for what, fn in (("feature", feature), ("substitutes", substitutes), ("encode", encode),
                         ("token_strings", token_strings)):
            if fn is not None and not callable(fn):
                raise N2GError(f"{what} must be callable or None, not {type(fn).__name__}")
        if config is not None and not isinstance(config, DistillConfig):
            raise N2GError(f"config must be an n2g.DistillConfig (e.g. n2g.preset('paper')) or None, "
                           f"not {type(config).__name__}")
        if not is_real(scale) or not (math.isfinite(scale) and scale > 0):
            raise N2GError(f"scale must be the feature's maximum activation, a positive finite number (got {scale!r})")
        if not is_real(sign) or sign not in (1, -1):
            raise N2GError(f"sign must be 1.0 (the positive side) or -1.0 (the negative side) (got {sign!r})")
        if not is_whole(occlusion_token_id) or not 0 <= int(occlusion_token_id) <= MAX_TOKEN_ID:
            raise N2GError(f"occlusion_token_id must be a token id from 0 to {MAX_TOKEN_ID} (got {occlusion_token_id!r})")
        if not isinstance(name, str):
            raise N2GError(f"name must be text (got {type(name).__name__})")
        if vocab_size is not None and (not is_whole(vocab_size) or vocab_size < 1):
            raise N2GError(f"vocab_size must be the subject model's vocabulary size, a whole number of at least 1, "
                           f"or None (got {vocab_size!r})")
        scale, sign = float(scale), float(sign)
        occlusion_token_id = int(occlusion_token_id)
        vocab_size = None if vocab_size is None else int(vocab_size)
        self.feature = feature
        self.config = config or preset("default")
        self.scale = scale
        self.sign = sign
        self.substitutes = substitutes
        self.occlusion_token_id = occlusion_token_id
        self.name = name
        self.encode = encode
        self.token_strings = token_strings
        self.vocab_size = vocab_size
        """Token ids the subject model has (ids from 0 to this - 1), where known: larger ones are refused."""

    def _evaluator(self) -> Normalised:
        if self.feature is None:
            raise N2GError("this neuron model has no feature to fit; pass one to NeuronModel(feature, ...)")
        return Normalised(self.feature, self.scale, self.sign, self.name, self.config.batch_tokens, self.occlusion_token_id)

    def fit(self, examples: Sequence[Example], calibration: Sequence[Example] = ()) -> "NeuronModel":
        """Fit the graph on training examples (normalised activations already measured)."""
        groups = []
        for what, group in (("examples", examples), ("calibration", calibration)):
            group = list(group) if isinstance(group, Iterable) and not isinstance(group, (str, bytes)) else None
            if group is None or not all(isinstance(e, Example) for e in group):
                raise N2GError(f"fit needs {what} as a list of n2g.Example (token ids and normalised activations); "
                               "to fit from token ids alone call n2g.distill(feature, excerpts)")
            groups.append([_checked_example(e, k, what) for k, e in enumerate(group)])
        if not groups[0]:  # an empty graph, "fitted", would predict the feature quiet everywhere
            raise N2GError("fit needs at least one training example; pass a non-empty list of n2g.Example, "
                           "or call n2g.distill(feature, excerpts)")
        steps = fit_steps(groups[0], groups[1], self.config, self.occlusion_token_id)
        self.graph_, self.trace_ = drive(steps, self._evaluator(), self.substitutes)
        self.status_ = "fitted"
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "graph_"):
            raise N2GError(f"{self.name} is not fitted yet; call fit(examples), or get a fitted model from "
                           "n2g.fit_neuron(...) or n2g.distill(...)")

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with the subject model's tokenizer (models from :func:`n2g.fit_neuron`)."""
        if not isinstance(text, str):  # a list of words or of ids reached the tokenizer: a TypeError from inside it
            raise N2GError(f"text must be one string (got {type(text).__name__}); for token ids call "
                           "predict(token_ids), one string at a time for texts")
        if self.encode is None:
            raise N2GError(f"{self.name} has no tokenizer, so it cannot read text; pass token ids "
                           "(a list of ints or a [batch, pos] array), or give it its subject model: "
                           "n2g.fit_neuron(model, ...) or n2g.load_neuron(run, key, model=...)")
        return list(self.encode(text))

    def _ids(self, token_ids) -> tuple[np.ndarray, bool]:
        """``[batch, pos]`` int64 ids from text, one sequence or a batch; and whether the input was one sequence."""
        if isinstance(token_ids, str):
            ids = self.tokenize(token_ids)
            if not ids:
                raise N2GError("the text has no tokens; pass a non-empty string")
            return np.asarray([ids], np.int64), True
        if isinstance(token_ids, torch.Tensor):
            token_ids = token_ids.detach().cpu().numpy()
        if isinstance(token_ids, (list, tuple)) and token_ids and all(isinstance(t, str) for t in token_ids):
            raise N2GError("pass one string at a time, or token ids; a list of strings is ambiguous")
        try:
            arr = np.asarray(token_ids)
        except ValueError:
            raise N2GError("token ids of different lengths; pad them into a [batch, pos] array with an "
                           "attention_mask, or predict one sequence at a time") from None
        if arr.dtype == object and arr.ndim == 0:  # a generator, a set, an Example, ...: not a sequence
            raise N2GError(f"token ids must be text, a list, an array or a tensor (got {type(token_ids).__name__}); "
                           "pass list(...) of the ids, or score(examples) for n2g.Example")
        if arr.dtype == object:
            raise N2GError("token ids of different lengths; pad them into a [batch, pos] array with an "
                           "attention_mask, or predict one sequence at a time")
        if arr.size == 0:
            raise N2GError("no tokens to predict on; pass text or a non-empty list of token ids")
        if arr.dtype.kind == "f" and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        if arr.dtype.kind not in "iu":
            raise N2GError(f"token ids must be integers (got {arr.dtype}); pass text"
                           + (" (this model has a tokenizer)" if self.encode else "") + " or integer token ids")
        if arr.ndim not in (1, 2):
            raise N2GError(f"token ids must be one sequence [pos] or a batch [batch, pos] (got shape {arr.shape})")
        if (arr < 0).any():
            raise N2GError("token ids must be non-negative; a negative id is not a token")
        if int(arr.max()) > MAX_TOKEN_ID:  # a uint64 beyond int64 would wrap to a negative id
            raise N2GError(f"token id {int(arr.max())} is beyond {MAX_TOKEN_ID}, the largest id n2g takes; "
                           "pass ids from the subject model's tokenizer")
        vocab = getattr(self, "vocab_size", None)  # (a model pickled before it was kept has none)
        if vocab is not None and (arr >= vocab).any():
            raise N2GError(f"token id {int(arr.max())} is beyond the subject model's vocabulary of {vocab} tokens "
                           f"(ids 0 to {vocab - 1}); pass ids from its tokenizer, or text")
        return (arr[None, :] if arr.ndim == 1 else arr).astype(np.int64), arr.ndim == 1

    @staticmethod
    def _mask(attention_mask, ids: np.ndarray, single: bool) -> np.ndarray | None:
        """``attention_mask`` as a 0/1 array of the token ids' shape, or an N2GError."""
        if attention_mask is None:
            return None
        if isinstance(attention_mask, torch.Tensor):
            attention_mask = attention_mask.detach().cpu().numpy()
        try:
            mask = np.asarray(attention_mask)
        except ValueError:
            mask = np.asarray(None)
        if single and mask.ndim == 1:
            mask = mask[None, :]
        if mask.shape != ids.shape or mask.dtype.kind not in "biuf" or not np.all((mask == 0) | (mask == 1)):
            raise N2GError(f"attention_mask must be 0s and 1s of the token ids' shape {ids.shape[-1] if single else ids.shape} "
                           f"(got {mask.dtype} of shape {mask.shape}); pass the tokenizer's mask or none")
        return mask

    def predict_normalised(self, token_ids, attention_mask=None) -> np.ndarray:
        """Predicted activations divided by the neuron's maximum (1.0 = its strongest excerpt)."""
        self._check_fitted()
        ids, single = self._ids(token_ids)
        out = predict_batch(self.graph_, ids, self._mask(attention_mask, ids, single))
        return out[0] if single else out

    def predict(self, token_ids, attention_mask=None) -> np.ndarray:
        """Predicted activations on the feature's scale (sign and maximum restored).

        ``token_ids``: text (when the model has a tokenizer), one sequence of ids (returns ``[pos]``)
        or a ``[batch, pos]`` batch (returns ``[batch, pos]``).
        """
        return (self.predict_normalised(token_ids, attention_mask) * self.scale * self.sign).astype(np.float32)

    def predict_tokens(self, text: str) -> list[tuple[str, float]]:
        """``(token, predicted activation)`` for each token of ``text``, on the feature's scale."""
        ids = self.tokenize(text)
        values = self.predict(ids) if ids else []
        names = self.token_strings(ids) if self.token_strings else [str(i) for i in ids]
        return [(t, float(v)) for t, v in zip(names, values)]

    def score(self, X, y=None) -> Scores:
        """Pooled-token scores (firing precision/recall/F1, Pearson r, ...).

        ``score(examples)``: examples whose activations are normalised (as ``examples_`` holds).
        ``score(X, y)``: token ids (or text) and the true activations on the feature's own scale,
        as plain arrays of the same shape (``[pos]`` or ``[batch, pos]``).
        """
        self._check_fitted()
        if y is None:
            if isinstance(X, Example):
                X = [X]
            if not (isinstance(X, (list, tuple)) and X and all(isinstance(e, Example) for e in X)):
                raise N2GError("score(examples) needs a list of n2g.Example; for plain arrays call "
                               "score(token_ids, true_activations)")
            X = [_checked_example(e, k, "examples") for k, e in enumerate(X)]
            preds = predict_sequences(self.graph_, [e.token_ids for e in X])
            return score_arrays([e.activations for e in X], preds, self.config.fire_threshold)
        if isinstance(X, Example) or (isinstance(X, (list, tuple)) and X and all(isinstance(e, Example) for e in X)):
            raise N2GError("score(examples) takes no true activations (the examples hold them); call score(examples), "
                           "or score(token_ids, true_activations)")
        ids, single = self._ids(X)
        try:
            true = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y, dtype=np.float64)
        except (TypeError, ValueError):
            raise N2GError("true activations must be numbers in an array of the token ids' shape "
                           "(one per token, rows of equal length)") from None
        true = true[None, :] if single and true.ndim == 1 else true
        if true.shape != ids.shape:
            raise N2GError(f"true activations have shape {true.shape} but the token ids {ids.shape}; "
                           "pass one activation per token")
        if not np.all(np.isfinite(true)):
            raise N2GError("true activations contain NaN or infinite values; pass finite numbers")
        norm = true * self.sign / self.scale
        preds = predict_batch(self.graph_, ids)
        return score_arrays(list(norm), list(preds), self.config.fire_threshold)

    def __repr__(self) -> str:
        status = getattr(self, "status_", "not fitted")
        head = f"NeuronModel {self.name} ({status}"
        scores = getattr(self, "scores_", None) or {}
        if "n2g" in scores:
            s = scores["n2g"]
            base = scores.get("token_lookup")
            f1 = "no firing test token" if s.f1 is None else f"{s.f1:.3f}"
            head += f"; test firing F1 {f1}" + (f", token lookup {base.f1:.3f}" if base and base.f1 is not None else "")
            head += f", Pearson r {s.pearson:.3f}" if s.pearson is not None else ""
            head += "; the graph refit on every excerpt after scoring" if getattr(self, "refit_", False) else ""
        # raw, as predict() gives it: the negative side's extreme is below 0 (the notebook display names it so too)
        if status == "dead":  # no extreme: the scale it holds is a stand-in, not a value the feature took
            head += f"; it never goes {'below' if self.sign < 0 else 'above'} 0 on its excerpts)"
        else:
            head += f"; most negative activation {-self.scale:.4g})" if self.sign < 0 else f"; maximum activation {self.scale:.4g})"
        if not hasattr(self, "graph_"):
            return head
        return head + "\n" + self.graph_.describe(limit=10)

    __str__ = __repr__

    def _repr_html_(self) -> str:
        """Notebook display: the rendered graph, the scores against the baselines, the top paths."""
        from .notebook import model_html

        return model_html(self)


MAX_TOKEN_ID = 2**31 - 1
"""Largest token id ``distill`` accepts (ids are stored as 64-bit, matched as ints)."""


def _checked_example(e: Example, k: int, what: str) -> Example:
    """``e`` with its token ids as ints and its activations as floats, or an N2GError saying what example ``k``
    of ``what`` lacks: one sequence of whole-number token ids and as many finite activations."""
    hint = "pass one sequence of token ids and one finite activation per token"
    try:
        ids = np.asarray(e.token_ids)
        acts = np.asarray(e.activations, np.float64)
    except (TypeError, ValueError):
        raise N2GError(f"{what}[{k}]: its token ids and activations must be sequences of numbers; {hint}") from None
    if ids.ndim != 1 or acts.ndim != 1:
        raise N2GError(f"{what}[{k}]: token ids of shape {ids.shape} and activations of shape {acts.shape}; {hint}")
    if ids.size and (ids.dtype.kind not in "iu" or int(ids.min()) < 0 or int(ids.max()) > MAX_TOKEN_ID):
        raise N2GError(f"{what}[{k}]: token ids must be whole numbers from 0 to {MAX_TOKEN_ID}; {hint}")
    if len(ids) != len(acts):
        raise N2GError(f"{what}[{k}] has {len(ids)} token ids but {len(acts)} activations; {hint}")
    if not np.all(np.isfinite(acts)):
        raise N2GError(f"{what}[{k}] has NaN or infinite activations; {hint}")
    if isinstance(e.token_ids, list) and isinstance(e.activations, list):
        return e
    return dataclasses.replace(e, token_ids=ids.astype(np.int64).tolist(), activations=acts.tolist())


def _as_lists(excerpts) -> list[list[int]]:
    """Excerpts as lists of token ids, or an N2GError saying what a valid input is."""
    hint = ("pass excerpts as a list of token-id lists (or a [batch, pos] integer tensor or array) "
            f"of whole numbers from 0 to {MAX_TOKEN_ID}")
    if isinstance(excerpts, (torch.Tensor, np.ndarray)):
        if excerpts.ndim != 2:
            raise N2GError(f"excerpts must be 2-dimensional [batch, pos] (got shape {tuple(excerpts.shape)}); {hint}")
        arr = excerpts.detach().cpu().numpy() if isinstance(excerpts, torch.Tensor) else excerpts  # GPU, autograd
        if arr.dtype.kind in "iu" and (arr.size == 0 or (int(arr.min()) >= 0 and int(arr.max()) <= MAX_TOKEN_ID)):
            return arr.tolist()  # an integer array in range: nothing to check per token
        excerpts = arr.tolist()
    if isinstance(excerpts, (str, bytes)) or not isinstance(excerpts, Iterable):
        raise N2GError(f"excerpts must be token ids, not {type(excerpts).__name__}; {hint}")
    out = []
    for e in excerpts:
        if isinstance(e, (str, bytes)) or not isinstance(e, Iterable):
            raise N2GError(f"an excerpt must be a sequence of token ids, not {type(e).__name__}; {hint}")
        if isinstance(e, (torch.Tensor, np.ndarray)):  # one excerpt as a 1-D tensor or array (any device)
            if e.ndim != 1:
                raise N2GError(f"an excerpt must be one sequence of token ids (got shape {tuple(e.shape)}); {hint}")
            e = (e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else e).tolist()
        row = []
        for t in e:
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or not 0 <= int(t) <= MAX_TOKEN_ID:
                raise N2GError(f"token id {t!r} is not a whole number from 0 to {MAX_TOKEN_ID}; {hint}")
            row.append(int(t))
        out.append(row)
    return out


def distill(feature: Callable, excerpts, *, preset_name: str = "default", sign: str = "positive",
            substitutes: Callable | None = None, occlusion_token_id: int = 0, name: str = "feature",
            config: DistillConfig | None = None, written=None, vocabulary: int | None = None,
            refit: bool = True, **options) -> NeuronModel:
    """Distil any feature into a graph from a list of token-id excerpts; returns the fitted model.

    ``substitutes``: ``(seqs, positions, k) -> token-id lists``, up to ``k`` tokens to put in place of the
    token at each position; augmentation measures the feature on those variants. A feature has no model to
    propose them, so without ``substitutes`` the graph learns without variants, whatever ``augment`` says
    (``n2g fit`` and ``n2g run`` pass the subject model's own; :func:`n2g.fit_neuron` too).

    ``written``: token-id rows of text a language model wrote (a feature has no model to write them;
    :mod:`n2g.written`). With a preset whose ``written`` is not 0, the feature is measured on them and
    each of their tokens that the training excerpts show fewer than ``max(min_count, 2)`` times joins
    the graph's evidence as a single token. ``vocabulary``: the feature's vocabulary size (ids ``0`` to
    ``vocabulary - 1``). With a preset whose ``vocabulary`` is not 0, every id that the training excerpts
    show fewer than ``max(min_count, 2)`` times is measured right after that many contexts cut from
    training excerpts, and the ones that fire join the graph's evidence as single tokens
    (:mod:`n2g.vocabulary`), so the graph can fire on tokens the excerpts never show.

    ``refit``: the graph is first fitted on the training side of the excerpts (``1 - held_out`` of them) and
    scored on the held-out side: ``scores_`` and the test examples of ``examples_`` are that fit's. Then, as a
    final model after cross-validation, ``graph_`` is fitted again from every excerpt, so it learns from all the
    evidence given (a blocker or context shown only in held-out excerpts is learned too); the training examples
    of ``examples_`` are the final fit's. ``refit=False`` keeps the scored graph (half the evidence with the
    default ``held_out``, half the feature calls).

    The returned :class:`NeuronModel` has ``graph_``, ``examples_`` (train and test with true and
    predicted normalised activations), ``scores_`` (``n2g`` and each baseline on the test split),
    ``ceiling_`` (:func:`token_ceiling`), ``stats_`` and ``status_`` (``"fitted"`` or ``"dead"``); its ``predict`` works on the feature's
    scale. ``options`` override fields of the preset (e.g. ``augment=True``).
    """
    if not callable(feature):
        raise N2GError(f"feature must be callable (token ids [batch, pos] -> activations), not {type(feature).__name__}")
    if isinstance(occlusion_token_id, bool) or not isinstance(occlusion_token_id, (int, np.integer)) \
            or not 0 <= int(occlusion_token_id) <= MAX_TOKEN_ID:
        raise N2GError(f"occlusion_token_id must be a token id from 0 to {MAX_TOKEN_ID} (got {occlusion_token_id!r})")
    if vocabulary is not None and (isinstance(vocabulary, bool) or not isinstance(vocabulary, (int, np.integer))
                                   or not 1 <= int(vocabulary) <= MAX_TOKEN_ID + 1):
        raise N2GError(f"vocabulary must be the feature's vocabulary size, from 1 to {MAX_TOKEN_ID + 1} (got {vocabulary!r})")
    if substitutes is not None and not callable(substitutes):
        raise N2GError(f"substitutes must be callable (seqs, positions, k) -> token-id lists, not {type(substitutes).__name__}")
    if not isinstance(refit, (bool, np.bool_)):
        raise N2GError(f"refit must be True (the graph learns from every excerpt after scoring) or False, not {refit!r}")
    if config is None:
        cfg = preset(preset_name, **options)
    elif not isinstance(config, DistillConfig):
        raise N2GError(f"config must be an n2g.DistillConfig (e.g. n2g.preset('paper')), not {type(config).__name__}")
    else:  # options change the given config, as they change a preset
        cfg = config.replace(**given(options))
    seqs = _as_lists(excerpts)
    if not seqs or not any(len(s) for s in seqs):
        raise N2GError("no excerpts to distil from; pass a non-empty list of token-id sequences")
    if sign not in ("positive", "negative"):
        raise N2GError(f"sign must be positive or negative (got {sign!r})")
    factor = 1.0 if sign == "positive" else -1.0
    raw = evaluate_sequences(feature, seqs, cfg.batch_tokens, occlusion_token_id)
    for values in raw:
        check_finite(values, name)
    signed = [v * factor for v in raw]
    pool = random_pool(len(seqs), pool_size(cfg), cfg.seed)
    stats = corpus_stats(signed, pool, cfg.fire_threshold)
    peak = stats.max_activation
    model = NeuronModel(feature, cfg, scale=peak if peak > 0 else 1.0, sign=factor, substitutes=substitutes,
                        occlusion_token_id=occlusion_token_id, name=name)
    model.stats_ = stats
    if not (math.isfinite(peak) and peak > 0):
        model.status_ = "dead"
        model.graph_ = NeuronGraph(cfg.end_activation, cfg.match, cfg.fire_threshold)
        model.examples_, model.scores_, model.trace_, model.ceiling_ = [], {}, None, {}
        return model
    maxima = np.array([float(np.max(v)) if len(v) else -np.inf for v in signed])
    ranked = [int(i) for i in np.argsort(-maxima, kind="stable")]
    known = {i: (signed[i] / peak).astype(np.float32) for i in range(len(seqs))}
    is_train = partition(len(seqs), cfg.held_out, cfg.seed, seqs)
    evidence = [i for i in range(len(seqs)) if is_train[i]]
    extra = None

    def measure_rows(rows):  # the feature on model text, checked and on the excerpts' normalised scale
        values = evaluate_sequences(feature, rows, cfg.batch_tokens, occlusion_token_id) if rows else []
        for v in values:
            check_finite(v, name)
        return [v * factor / peak for v in values]

    if written is not None and cfg.written:
        from .written import single_tokens

        rows = _as_lists(written)
        extra = single_tokens(rows, measure_rows(rows), [seqs[i] for i in evidence], max(cfg.min_count, 2))
    if vocabulary is not None and cfg.vocabulary:
        from .vocabulary import feature_vocabulary

        more = feature_vocabulary(measure_rows, [seqs[i] for i in evidence], int(vocabulary), cfg)
        extra = more if extra is None else (np.concatenate([extra[0], more[0]]), np.concatenate([extra[1], more[1]]))
    result = drive(neuron_steps(seqs, ranked, pool, cfg, occlusion_token_id, known, is_train, evidence, written=extra),
                   model._evaluator(), substitutes)
    model.graph_, model.examples_, model.scores_, model.trace_ = result.graph, result.examples, result.scores, result.trace
    model.ceiling_ = result.ceiling
    model.refit_ = bool(refit and not is_train.all())
    if model.refit_:  # the final graph learns from every excerpt; the scores stay the held-out ones
        everything = np.ones(len(seqs), bool)  # the written and vocabulary evidence measured above is reused
        final = drive(neuron_steps(seqs, ranked, pool, cfg, occlusion_token_id, known, everything, list(range(len(seqs))),
                                   written=extra), model._evaluator(), substitutes)
        # The graph's paths name their training excerpts by position among the training examples, so those
        # are the final fit's; the test examples keep the scored graph's predictions, as the scores do.
        model.graph_, model.trace_ = final.graph, final.trace
        model.examples_ = final.examples + [e for e in result.examples if e.split == "test"]
    model.status_ = "fitted"
    return model
