"""The vocabulary in context: evidence for every token a small corpus is too small to show (issue 10).

A held-out token that fires may be one the training partition never shows, or shows once: no graph or
lookup fitted on the corpus can value it. Model-written text (:mod:`n2g.written`) shows some of them;
this module asks the subject model about all of them. ``cfg.vocabulary`` contexts (``cfg.vocabulary_context``
tokens each, cut from seeded training excerpts) are each followed by every ordinary token that the
training partition shows fewer than ``max(min_count, 2)`` times, and every neuron of each wanted layer
is read at that token (:meth:`n2g.models.SubjectModel.continuation_activations`: the context runs once,
each token is one position over its cached keys and values). A token that fires at a neuron in any of
the contexts becomes single-token training evidence for that neuron's graph, with its value in every
context (:func:`n2g.distill.written_examples`), beside the corpus's and the written text's; lookups and
scores never see it.

Only the (token, neuron) pairs that fire on either side are kept, so a whole layer is small; it is
cached per model, corpus, partition and settings, so a later run over the same layer reads it back.
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .activations import from_float16, store_exponents, to_float16
from .fileio import remove_stale_temporaries, replacing
from .records import NeuronId, Sign
from .written import shown_tokens

log = logging.getLogger(__name__)

VOCABULARY_VERSION = 3
BATCH_BYTES = 1 << 28
"""Most memory one batch of candidates' activations may take on the model's device (all wanted layers)."""


@dataclass
class LayerVocabulary:
    """The firing (token, neuron) pairs of one layer, sorted by neuron."""

    tokens: np.ndarray
    """``[M]`` token ids."""
    neurons: np.ndarray
    """``[M]`` neuron indices (ascending)."""
    values: np.ndarray
    """``[M, contexts]`` raw activations (float16) of the token at the neuron after each context."""
    exponents: np.ndarray | None = None
    """``[M]`` int32: row i holds ``activation * 2**-exponents[i]`` (the activation store's scaling of its neuron,
    :func:`n2g.activations.store_exponents`); None: all 0."""

    def __post_init__(self) -> None:
        if self.exponents is None:
            self.exponents = np.zeros(len(self.tokens), np.int32)


@dataclass
class VocabularyTokens:
    """Tokens measured after each context, kept where they fire (see the module's docstring)."""

    layers: dict[int, LayerVocabulary] = field(default_factory=dict)
    contexts: int = 0
    threshold: float = 0.5
    """A token is evidence for a neuron's side where its normalised activation reaches this after some context."""
    most: int | None = None
    """Most tokens one neuron's side takes: those with the highest mean activation over the contexts."""

    def for_neuron(self, neuron: NeuronId, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, normalised activations)``: each token that fires on this neuron's side after some
        context (at most :attr:`most`, strongest first), once per context, or None."""
        layer = self.layers.get(neuron.layer)
        if layer is None or not scale > 0:
            return None
        lo, hi = np.searchsorted(layer.neurons, [neuron.index, neuron.index + 1])
        values = from_float16(layer.values[lo:hi], layer.exponents[lo:hi, None]) / np.float32(scale)
        if neuron.sign == Sign.NEGATIVE:
            values = -values
        tokens, values = strongest(layer.tokens[lo:hi].astype(np.int64), values, self.threshold, self.most)
        if not len(tokens):
            return None
        return np.repeat(tokens, values.shape[1]), values.ravel()


def strongest(tokens: np.ndarray, values: np.ndarray, threshold: float, most: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``values`` (``[tokens, contexts]``, normalised) that reach ``threshold`` after some context,
    at most ``most`` of them (the highest mean activation), in their given order."""
    fires = values.max(1, initial=-np.inf) >= threshold if values.size else np.zeros(len(tokens), bool)
    tokens, values = tokens[fires], values[fires]
    if most is not None and len(tokens) > most:
        keep = np.sort(np.argsort(-values.mean(1), kind="stable")[:most])
        tokens, values = tokens[keep], values[keep]
    return tokens, values


class Evidence:
    """Single-token evidence from several sources (written text, the vocabulary in context), joined per neuron."""

    def __init__(self, *sources) -> None:
        self.sources = [s for s in sources if s is not None]

    def for_neuron(self, neuron: NeuronId, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
        got = [g for g in (s.for_neuron(neuron, scale) for s in self.sources) if g is not None]
        if not got:
            return None
        return np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got]).astype(np.float32)


def contexts(excerpts: np.ndarray, is_train: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """``[n, length]`` token windows cut at seeded places from distinct training excerpts (fewer when
    the partition has fewer; shorter when the excerpts are): :func:`sequence_contexts` of the training rows."""
    rows = np.asarray(excerpts)
    width = int(rows.shape[1]) if rows.ndim == 2 else 0
    windows = sequence_contexts([rows[i] for i in np.flatnonzero(np.asarray(is_train, bool))], n, length, seed)
    return np.array(windows, np.int64).reshape(len(windows), max(min(int(length), width), 0))


def sequence_contexts(seqs, n: int, length: int, seed: int) -> list[list[int]]:
    """Up to ``n`` token windows of up to ``length`` tokens, cut at seeded places from distinct non-empty
    sequences of ``seqs`` (token-id rows of any lengths: :func:`n2g.distill.distill`'s training excerpts)."""
    usable = [s for s in seqs if len(s)]
    if n <= 0 or length <= 0 or not usable:
        return []
    rng = np.random.default_rng([int(seed), 15])
    pick = np.sort(rng.choice(len(usable), min(int(n), len(usable)), replace=False))
    lengths = np.array([len(usable[j]) for j in pick])
    sizes = np.minimum(int(length), lengths)
    ends = rng.integers(sizes, lengths + 1)
    return [[int(t) for t in usable[j][e - k:e]] for j, k, e in zip(pick, sizes, ends)]


def feature_vocabulary(measure_rows, training: list, size: int, cfg) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, normalised activations)`` for a feature with no model behind it (:func:`n2g.distill.distill`):
    every id below ``size`` that ``training`` shows fewer than ``max(min_count, 2)`` times, put after each of
    ``cfg.vocabulary`` training contexts; ``measure_rows(rows)`` gives the normalised activations of token-id
    rows. Kept as :meth:`VocabularyTokens.for_neuron` keeps them: the tokens that fire, at most
    ``cfg.vocabulary_most``, once per context."""
    from .written import _shown

    flat = np.concatenate([np.asarray(s, np.int64).ravel() for s in training]) if training else np.zeros(0, np.int64)
    cand = np.setdiff1d(np.arange(int(size), dtype=np.int64), _shown(flat, max(cfg.min_count, 2)))
    windows = sequence_contexts(training, cfg.vocabulary, cfg.vocabulary_context, cfg.seed)
    if not len(cand) or not windows:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    rows = [w + [int(t)] for w in windows for t in cand]
    last = np.array([float(np.asarray(v)[-1]) for v in measure_rows(rows)], np.float32)
    values = last.reshape(len(windows), len(cand)).T  # [candidates, contexts]
    tokens, values = strongest(cand, values, cfg.fire_threshold, cfg.vocabulary_most)
    return np.repeat(tokens, len(windows)), values.ravel().astype(np.float32)


def candidates(model, excerpts: np.ndarray, is_train: np.ndarray, min_count: int) -> np.ndarray:
    """Ordinary token ids (no special tokens, none the tokenizer does not know) that the training
    partition shows fewer than ``min_count`` times."""
    ordinary = getattr(model, "ordinary_tokens", None)
    if ordinary is None:
        return np.zeros(0, np.int64)
    ids = np.flatnonzero(ordinary().cpu().numpy())
    return ids[~np.isin(ids, shown_tokens(excerpts, is_train, min_count))].astype(np.int64)


def measure(model, windows: np.ndarray, tokens: np.ndarray, scales: dict[int, tuple[torch.Tensor, torch.Tensor]],
            threshold: float, progress: bool = False, most: int | None = None) -> VocabularyTokens:
    """Every neuron of each layer in ``scales`` (layer -> (positive, negative) maxima ``[d_mlp]``) at each
    token after each window; the pairs that reach ``threshold`` x the maximum on either side are kept (on
    each side at most ``most`` per neuron, the highest mean activation first: what :meth:`VocabularyTokens.for_neuron`
    would take)."""
    from .progress import Progress

    layers = sorted(scales)
    out = VocabularyTokens(contexts=len(windows))
    if not len(windows) or not len(tokens):
        out.layers = {l: LayerVocabulary(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(windows)), np.float16))
                      for l in layers}
        return out
    width = sum(int(scales[l][0].numel()) for l in layers)
    batch = int(max(1, min(len(tokens), BATCH_BYTES // max(1, 2 * width * len(windows)))))
    device = getattr(model, "device", torch.device("cpu"))
    # Neurons float16 would not hold as they are are kept scaled as the activation store keeps them.
    exps = {l: store_exponents(torch.maximum(scales[l][0], scales[l][1])) for l in layers}
    shift = {l: torch.exp2(-exps[l].float()) for l in layers}
    cut = {l: (threshold * scales[l][0].to(device) * shift[l].to(device), threshold * scales[l][1].to(device) * shift[l].to(device))
           for l in layers}
    exps_on = {l: exps[l].to(device) if bool(exps[l].any()) else None for l in layers}
    live = {l: (scales[l][0].to(device) > 0, scales[l][1].to(device) > 0) for l in layers}
    kept: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {l: [] for l in layers}
    bar = Progress(len(tokens) * len(windows), "vocabulary", unit="tok", enabled=progress)
    for start in range(0, len(tokens), batch):
        chunk = torch.as_tensor(tokens[start:start + batch])
        per = {l: [] for l in layers}
        for w in windows:
            acts = model.continuation_activations(w.tolist(), chunk, layers)
            for l in layers:
                per[l].append(to_float16(acts[l], exps_on[l]))
            bar.update(len(chunk))
        for l in layers:
            values = torch.stack(per[l], dim=1)  # [chunk, contexts, d_mlp]
            top, bottom = values.max(1).values.float(), values.min(1).values.float()
            pos, neg = cut[l]
            fires = ((top >= pos) & live[l][0]) | ((-bottom >= neg) & live[l][1])
            rows, cols = fires.nonzero(as_tuple=True)
            if len(rows):
                kept[l].append((chunk[rows.cpu()].numpy(), cols.cpu().numpy(), values[rows, :, cols].cpu().numpy()))
    bar.close()
    for l in layers:
        if kept[l]:
            tok = np.concatenate([k[0] for k in kept[l]])
            neu = np.concatenate([k[1] for k in kept[l]])
            val = np.concatenate([k[2] for k in kept[l]]).astype(np.float16)
        else:
            tok, neu, val = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, len(windows)), np.float16)
        if most is not None and len(tok):
            v = val.astype(np.float32)
            pos, neg = ((x.cpu().float() * shift[l]).numpy() for x in scales[l])
            up = (v.max(1) >= threshold * pos[neu]) & (pos[neu] > 0)
            down = (-v.min(1) >= threshold * neg[neu]) & (neg[neu] > 0)
            keep = _first_per_group(neu, v.mean(1), up, most) | _first_per_group(neu, -v.mean(1), down, most)
            tok, neu, val = tok[keep], neu[keep], val[keep]
        order = np.lexsort((tok, neu))
        out.layers[l] = LayerVocabulary(tok[order].astype(np.int64), neu[order].astype(np.int64), val[order],
                                        exps[l].numpy()[neu[order]])
    return out


def _first_per_group(groups: np.ndarray, score: np.ndarray, ok: np.ndarray, most: int) -> np.ndarray:
    """Bools: among the rows where ``ok``, the ``most`` of the highest ``score`` in each group."""
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((-score[idx], groups[idx]))]
    g = groups[order]
    starts = np.r_[0, np.flatnonzero(np.diff(g)) + 1] if len(g) else np.zeros(0, np.int64)
    rank = np.arange(len(g)) - np.repeat(starts, np.diff(np.r_[starts, len(g)]))
    keep = np.zeros(len(groups), bool)
    keep[order[rank < most]] = True
    return keep


def _cache_path(cache_dir: Path, model, key: str, layer: int) -> Path:
    from .scan import _model_key

    mkey, label = _model_key(model)
    digest = hashlib.sha256(f"{mkey}|{key}|{layer}|v{VOCABULARY_VERSION}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40]
    return Path(cache_dir) / "vocabulary" / f"{safe}-L{layer}-{digest}.npz"


def _load(path: Path, n_contexts: int, d_mlp: int | None = None, vocab_size: int | None = None) -> LayerVocabulary | None:
    """A cached layer, or None (and a warning) when it is missing, unreadable or not what this module writes:
    another shape, neurons out of order or beyond ``d_mlp``, tokens beyond ``vocab_size``."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            layer = LayerVocabulary(z["tokens"].astype(np.int64), z["neurons"].astype(np.int64), z["values"].astype(np.float16),
                                    z["exponents"].astype(np.int32))
        if not (layer.values.ndim == 2 and layer.values.shape == (len(layer.tokens), n_contexts)
                and len(layer.neurons) == len(layer.tokens) == len(layer.exponents)):
            log.warning("ignoring vocabulary cache %s of another shape", path)
        elif len(layer.tokens) and not (
                int(layer.neurons.min()) >= 0 and bool((np.diff(layer.neurons) >= 0).all()) and int(layer.tokens.min()) >= 0
                and (d_mlp is None or int(layer.neurons.max()) < d_mlp)
                and (vocab_size is None or int(layer.tokens.max()) < vocab_size)):
            log.warning("ignoring damaged vocabulary cache %s (neurons or tokens out of range); measuring again", path)
        else:
            return layer
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a damaged zip is no OSError
        log.warning("ignoring unreadable vocabulary cache %s (%s)", path, exc)
    return None


def _save(path: Path, layer: LayerVocabulary) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)  # those of a writer killed mid-save (nothing else removes them)
        with replacing(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, tokens=layer.tokens.astype(np.int32), neurons=layer.neurons.astype(np.int32), values=layer.values,
                         exponents=layer.exponents.astype(np.int16))
    except OSError as exc:
        log.warning("cannot save the vocabulary cache in %s (%s); going on without it", path.parent, exc.strerror or exc)


def vocabulary_tokens(model, excerpts, is_train: np.ndarray, cfg, neurons: Iterable[NeuronId], scans: dict,
                      cache_dir: str | Path | None = None, corpus_key: str = "",
                      progress: bool = False) -> VocabularyTokens | None:
    """What ``cfg.vocabulary`` asks for the layers of ``neurons`` (``scans``: layer -> its
    :class:`n2g.scan.LayerScan`, for each neuron's maxima), or None when it asks nothing."""
    layers = sorted({n.layer for n in neurons})
    if not getattr(cfg, "vocabulary", 0) or not layers or not hasattr(model, "continuation_activations"):
        return None
    rows = excerpts.numpy() if isinstance(excerpts, torch.Tensor) else np.asarray(excerpts)
    min_count = max(cfg.min_count, 2)
    windows = contexts(rows, is_train, cfg.vocabulary, cfg.vocabulary_context, cfg.seed)
    key = (f"{corpus_key}|{np.packbits(np.asarray(is_train, bool)).tobytes().hex()}|{windows.tobytes().hex()}"
           f"|{min_count}|{cfg.fire_threshold}|{cfg.vocabulary_most}")
    out = VocabularyTokens(contexts=len(windows), threshold=cfg.fire_threshold, most=cfg.vocabulary_most)
    todo = []
    for l in layers:
        path = _cache_path(Path(cache_dir), model, key, l) if cache_dir else None
        got = _load(path, len(windows), getattr(model, "d_mlp", None), getattr(model, "vocab_size", None)) \
            if path is not None else None
        if got is not None:
            out.layers[l] = got
        else:
            todo.append(l)
    if todo:
        tokens = candidates(model, rows, is_train, min_count)
        scales = {l: (scans[l].top_val[0].float(), -scans[l].bot_val[0].float()) for l in todo}
        log.info("vocabulary in context: %s tokens the training partition shows fewer than %d times, after %d "
                 "contexts of %d tokens, layers %s", f"{len(tokens):,}", min_count, len(windows), windows.shape[1], todo)
        new = measure(model, windows, tokens, scales, cfg.fire_threshold, progress, cfg.vocabulary_most)
        for l in todo:
            out.layers[l] = new.layers[l]
            if cache_dir:
                _save(_cache_path(Path(cache_dir), model, key, l), new.layers[l])
    log.info("vocabulary in context: %s firing (token, neuron) pairs per layer, over all its neurons",
             ", ".join(f"L{l} {len(v.tokens):,}" for l, v in sorted(out.layers.items())))
    return out


def model_evidence(model, excerpts, is_train: np.ndarray, cfg, neurons: Iterable[NeuronId], scans: dict,
                   cache_dir: str | Path | None = None, corpus_key: str = "", progress: bool = False):
    """Everything the subject model tells the graphs beyond the corpus: written text (``cfg.written``) and
    the vocabulary in context (``cfg.vocabulary``), joined per neuron; None when the settings ask for neither."""
    from .scan import peak_exponents
    from .written import written_tokens

    neurons = list(neurons)
    exponents = {l: peak_exponents(scans[l].top_val, scans[l].bot_val) for l in {n.layer for n in neurons} if l in scans}
    written = written_tokens(model, excerpts, is_train, cfg, neurons, cache_dir, corpus_key, exponents)
    vocabulary = vocabulary_tokens(model, excerpts, is_train, cfg, neurons, scans, cache_dir, corpus_key, progress)
    if written is None and vocabulary is None:
        return None
    return Evidence(written, vocabulary)
