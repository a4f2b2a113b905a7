"""Augmentation: variants of the tokens that matter most.

For each pruned example, every token whose importance for the pivot is at least
``augment_threshold`` (with ``augment_positions="activator"``: the pivot alone) gets up to
``n_variants`` substitutes from a substitute source, word shape kept: the subject model's own
next-token guesses at that position (:class:`ModelSubstitutes`), the tokens nearest the substituted
one in its input embedding (:class:`EmbeddingSubstitutes`, the ``default`` preset's), a masked LM, or
one a test supplies. Every variant's activations are measured; variants that still fire get importance matrices and
add paths to the graph, and all variants (firing or not) are evidence for END calibration, which is
how a variant that stops firing teaches the graph which substitutes are not allowed.
"""

from __future__ import annotations

import logging

from dataclasses import dataclass

import numpy as np

from .config import DistillConfig
from .features import Candidates, Evaluate, Steps
from .importance import importance_steps

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """A pruned example with one important token substituted."""

    token_ids: list[int]
    activations: np.ndarray
    importance: np.ndarray | None
    """Importance matrix, only for variants that fire somewhere: measured by occlusion, or with
    ``variant_importance="source"`` the source example's own."""
    source: int
    """Index of the pruned example it came from."""
    position: int
    """The substituted position."""


def augment_steps(seqs: list[list[int]], acts: list[np.ndarray], imps: list[np.ndarray],
                  cfg: DistillConfig, occlusion_id: int, common: set[int] | frozenset[int] = frozenset(),
                  pivots: list[int] | None = None) -> Steps:
    """Generator stage: make, measure and (when they fire) weigh variants of important tokens.

    ``pivots[e]`` is the firing position of ``seqs[e]`` (default: its last token). With
    ``augment_positions="activator"`` only the pivot itself is substituted. Substitutes in ``common``
    (with ``novel_variants``: tokens the training evidence already shows often enough to value them
    itself) are skipped before any is measured."""
    asks: list[tuple[int, int]] = []
    for e, (ids, imp) in enumerate(zip(seqs, imps)):
        pivot = len(ids) - 1 if pivots is None else pivots[e]
        if cfg.augment_positions == "activator":
            asks.append((e, pivot))
            continue
        for k in range(pivot + 1):
            if imp[k, pivot] >= cfg.augment_threshold:
                asks.append((e, k))
    if not asks:
        return []
    answers = yield Candidates([list(seqs[e]) for e, _ in asks], [k for _, k in asks], cfg.n_candidates)
    variants: list[tuple[list[int], int, int]] = []
    tried: set[tuple[int, int]] = set()  # (token, substitute) pairs measured (variant_once)
    for (e, k), cands in zip(asks, answers):
        original = seqs[e][k]
        chosen = [int(c) for c in cands if int(c) != original and int(c) != occlusion_id
                  and int(c) not in common][: cfg.n_variants]
        if cfg.variant_once:  # windows come best first: a pair is measured in the best one proposing it
            chosen = [c for c in chosen if (original, c) not in tried]
            tried.update((original, c) for c in chosen)
        for c in chosen:
            ids = list(seqs[e])
            ids[k] = c
            variants.append((ids, e, k))
    if not variants:
        return []
    values = yield Evaluate([v[0] for v in variants], "augment")
    firing = [i for i, v in enumerate(values) if float(np.max(v)) >= cfg.fire_threshold]
    if cfg.variant_importance == "source":  # one substituted token: the source's importance, no occlusion run
        matrices = [imps[variants[i][1]] for i in firing]
    else:
        matrices = yield from importance_steps([variants[i][0] for i in firing], [values[i] for i in firing], occlusion_id)
    by_index = dict(zip(firing, matrices))
    return [Variant(ids, np.asarray(values[i], np.float32), by_index.get(i), e, k)
            for i, (ids, e, k) in enumerate(variants)]


def same_shape(original: str, candidate: str) -> bool:
    """Word shape kept: the same leading-space status, and letters only if the original is letters only."""
    if original.startswith(" ") != candidate.startswith(" "):
        return False
    core_o, core_c = original.strip(), candidate.strip()
    if not core_c:
        return not core_o
    if core_o.isalpha():
        return core_c.isalpha()
    return True


class ModelSubstitutes:
    """Substitute source from the subject model's own next-token distribution at a position.

    Sequences run in batches of similar length (at most ``batch_size`` rows, padding bounded as in
    fitting); ``counts`` adds up the passes, rows, real and padded positions (whole-model passes,
    since they need the logits) for the engine's cost accounting."""

    def __init__(self, model, batch_size: int = 256):
        self.model, self.batch_size = model, batch_size
        self.counts = {"calls": 0, "rows": 0, "real": 0, "padded": 0}

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        from .features import length_batches

        plan = []
        for batch in length_batches(lengths, 1 << 40):  # the padding bound alone; rows capped below
            plan.extend(batch[a : a + self.batch_size] for a in range(0, len(batch), self.batch_size))
        return plan

    def __call__(self, seqs: list[list[int]], positions: list[int], k: int) -> list[list[int]]:
        import torch

        from .features import pad

        out: list[list[int] | None] = [None] * len(seqs)
        todo = list(range(len(seqs)))
        ordinary = self.model.ordinary_tokens().tolist()  # no special or padding ids
        while todo:
            try:
                for batch in self._plan([len(seqs[i]) for i in todo]):
                    rows = [todo[j] for j in batch]
                    chunk = [seqs[i] for i in rows]
                    ids, mask = pad(chunk, int(self.model.occlusion_token_id))
                    found = self.model.next_token_candidates(ids, mask, torch.tensor([positions[i] for i in rows]), k)
                    self.counts["calls"] += 1
                    self.counts["rows"] += len(chunk)
                    self.counts["real"] += sum(len(x) for x in chunk)
                    self.counts["padded"] += int(ids.shape[0] * ids.shape[1])
                    for i, cands in zip(rows, found.tolist()):
                        row, p = seqs[i], positions[i]
                        original = self.model.token_strings([row[p]])[0]
                        cands = [c for c in cands if c < len(ordinary) and ordinary[c]]
                        texts = self.model.token_strings(cands)
                        out[i] = [c for c, t in zip(cands, texts) if c != row[p] and same_shape(original, t)]
            except RuntimeError as exc:  # out of memory: halve the batch and go on with what is left
                if "out of memory" not in str(exc).lower() or self.batch_size == 1:
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.batch_size = max(self.batch_size // 2, 1)
                log.warning("out of memory: substitute batch backed off to %d sequences", self.batch_size)
            todo = [i for i in todo if out[i] is None]
        return out  # type: ignore[return-value]


class EmbeddingSubstitutes:
    """Substitute source from the subject model's own input embedding: the tokens nearest to the one
    at the position (cosine similarity), word shape kept, whatever the context.

    Where :class:`ModelSubstitutes` asks what the model expects at the position (a whole-model
    pass), this asks which tokens the model represents like the one there: the neighbours of an
    activator are the tokens most likely to excite the neuron the same way, and the variant
    forwards then measure which of them do. No forward pass; one matmul over the vocabulary per
    new token, each token's neighbours kept for the whole run."""

    pool = 200
    """Neighbours looked at per token before word-shape filtering."""

    def __init__(self, model):
        self.model = model
        self.neighbours: dict[int, list[int]] = {}
        self.counts = {"calls": 0, "rows": 0, "real": 0, "padded": 0}  # no forward passes (engine's cost stage)

    def _fill(self, tokens: list[int]) -> None:
        todo = sorted({t for t in tokens if t not in self.neighbours})
        for a in range(0, len(todo), 256):  # bounded memory: a [256, vocab] similarity block at a time
            chunk = todo[a : a + 256]
            found = self.model.nearest_tokens(chunk, self.pool).tolist()
            texts = self.model.token_strings(chunk)
            for t, text, cands in zip(chunk, texts, found):
                shown = self.model.token_strings(cands)
                self.neighbours[t] = [c for c, c_text in zip(cands, shown) if same_shape(text, c_text)]

    def __call__(self, seqs: list[list[int]], positions: list[int], k: int) -> list[list[int]]:
        tokens = [int(row[p]) for row, p in zip(seqs, positions)]
        self._fill(tokens)
        return [self.neighbours[t][:k] for t in tokens]


def make_substitutes(model, source: str):
    """The substitute source named ``source`` for ``model``: ``model`` (next-token guesses,
    :class:`ModelSubstitutes`) or ``embedding`` (nearest input embeddings, :class:`EmbeddingSubstitutes`)."""
    return EmbeddingSubstitutes(model) if source == "embedding" else ModelSubstitutes(model)


def check_masked_lm(spec: str) -> None:
    """Refuse at once, in one line, a masked LM that is neither a local directory nor reachable: a
    path that does not exist, or a hub id not in the local cache while the hub cannot be reached."""
    from pathlib import Path

    from .errors import N2GError
    from .models import _check_hub_reachable, _looks_like_path

    if not Path(spec).expanduser().exists():
        if _looks_like_path(spec):
            raise N2GError(f"masked LM path {spec} does not exist; check the path given with --substitutes mlm:PATH")
        try:
            _check_hub_reachable(spec)
        except N2GError:
            raise N2GError(f"masked LM {spec!r} is not in the Hugging Face cache and the hub cannot be reached; check "
                           "your network, pass mlm:/path/to/a/local/model, or use --substitutes embedding") from None
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(spec)
    except Exception as exc:  # transformers raises many types for a missing or bad model
        raise N2GError(f"cannot load masked LM {spec!r} ({type(exc).__name__}); "
                       "pass a local directory or a hub id you can reach") from None
    if type(config) not in MODEL_FOR_MASKED_LM_MAPPING:
        raise N2GError(f"{spec!r} is a {config.model_type!r} model, not a masked language model; "
                       "pass one such as mlm:bert-base-uncased, or use --substitutes embedding")


class MaskedLMSubstitutes:
    """Substitute source from a masked language model (any ``AutoModelForMaskedLM``), for users who have one.

    The subject tokens are decoded to text, the target token's text is replaced by the MLM's mask,
    and the MLM's best words that are a single subject-model token of the same word shape are kept.
    """

    def __init__(self, subject, mlm_spec: str, device: str | None = None):
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        from .errors import N2GError

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(mlm_spec)
            self.mlm = AutoModelForMaskedLM.from_pretrained(mlm_spec).eval()
        except Exception as exc:  # transformers raises many types for a missing or bad model
            raise N2GError(f"cannot load masked LM {mlm_spec!r} ({type(exc).__name__}); "
                           "pass a local directory or a hub id you can reach") from exc
        if self.tokenizer.mask_token is None:
            raise N2GError(f"{mlm_spec!r} has no mask token; pass a masked language model")
        if device:
            self.mlm.to(device)
        self.subject = subject

    def __call__(self, seqs: list[list[int]], positions: list[int], k: int) -> list[list[int]]:
        import torch

        out = []
        for seq, p in zip(seqs, positions):
            texts = self.subject.token_strings(seq)
            original = texts[p]
            lead = " " if original.startswith(" ") else ""
            masked = "".join(texts[:p]) + lead + self.tokenizer.mask_token + "".join(texts[p + 1 :])
            enc = self.tokenizer(masked, return_tensors="pt", truncation=True)
            where = (enc["input_ids"][0] == self.tokenizer.mask_token_id).nonzero()
            if len(where) == 0:
                out.append([])
                continue
            with torch.inference_mode():
                logits = self.mlm(**{k_: v.to(self.mlm.device) for k_, v in enc.items()}).logits[0, int(where[0])]
            found: list[int] = []
            for cand in logits.topk(min(k * 4, logits.shape[-1])).indices.tolist():
                word = self.tokenizer.convert_tokens_to_string([self.tokenizer.convert_ids_to_tokens(cand)]).strip()
                if not word or word.startswith("##"):
                    continue
                ids = self.subject.encode(lead + word)
                if len(ids) == 1 and ids[0] != seq[p] and ids[0] not in found and same_shape(original, self.subject.token_strings(ids)[0]):
                    found.append(ids[0])
                if len(found) >= k:
                    break
            out.append(found)
        return out
