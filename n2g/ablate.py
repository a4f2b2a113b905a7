"""Ablation score: can the graph stand in for its neuron inside the model?

On held-out text the subject model runs with one neuron's activation replaced, at every token, by
(a) the graph's prediction (on the neuron's raw scale; negated for the negative side), (b) zero,
(c) the neuron's mean activation over the scan's stored tokens. Each is compared with the clean
model: the increase of next-token cross-entropy (nats per predicted token) and the KL divergence
KL(clean || ablated) (nats per token). The graph recovers the fraction

    recovered = 1 - (CE_graph - CE_clean) / (CE_zero - CE_clean)

of the damage zero-ablation does. When zero-ablation changes the loss by less than
:data:`MIN_DAMAGE` nats per token, that fraction means nothing: it is reported as ``None`` with status
``"zero ablation has no effect"``.

Rows of one sequence share forward passes: the clean row and every replacement of every neuron
asked for (each row carries its own layer, neuron and values), so sequences are never padded.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import N2GError, is_real
from .records import NeuronId, Sign

MIN_DAMAGE = 1e-4
"""Zero-ablation damage (nats per token) below which the recovered fraction is not reported."""
VARIANTS = ("graph", "zero", "mean")
LOGIT_BUDGET = 1 << 26
"""Logit values (rows x positions x vocabulary) one forward pass may hold: 256 MB of float32."""


@dataclass
class Ablation:
    """One neuron's ablation score on some held-out text."""

    ce_clean: float
    """Clean next-token cross-entropy (nats per predicted token)."""
    ce_increase: dict[str, float] = field(default_factory=dict)
    """Cross-entropy increase over clean, per replacement (graph, zero, mean)."""
    kl: dict[str, float] = field(default_factory=dict)
    """KL(clean || replaced), nats per token, per replacement."""
    recovered: float | None = None
    """Fraction of zero-ablation's damage the graph recovers (1: stands in fully; None: undefined)."""
    status: str = "ok"
    n_tokens: int = 0
    """Predicted tokens the means are over."""
    n_excerpts: int = 0

    def to_dict(self) -> dict:
        return {"ce_clean": self.ce_clean, "ce_increase": dict(self.ce_increase), "kl": dict(self.kl),
                "recovered": self.recovered, "status": self.status, "n_tokens": self.n_tokens,
                "n_excerpts": self.n_excerpts}

    @classmethod
    def from_dict(cls, d: dict) -> "Ablation":
        return cls(float(d["ce_clean"]), {k: float(v) for k, v in d.get("ce_increase", {}).items()},
                   {k: float(v) for k, v in d.get("kl", {}).items()},
                   None if d.get("recovered") is None else float(d["recovered"]), str(d.get("status", "ok")),
                   int(d.get("n_tokens", 0)), int(d.get("n_excerpts", 0)))


@contextlib.contextmanager
def replaced(model, rows: Sequence[tuple[int, int, torch.Tensor] | None], n_pos: int, offset: int):
    """Pre-hooks that overwrite, in row ``r`` of the batch, neuron ``rows[r] = (layer, index, values)``
    at the real token positions (after ``offset``, the BOS) with ``values``; ``None`` rows stay clean."""
    by_layer: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
    for r, edit in enumerate(rows):
        if edit is not None:
            by_layer.setdefault(edit[0], []).append((r, edit[1], edit[2]))
    handles = []

    def make(edits):
        def hook(module, args):
            x = args[0]
            shaped = x.reshape(len(rows), n_pos, -1).clone()
            for r, index, values in edits:
                shaped[r, offset:, index] = values.to(shaped.dtype)
            return (shaped.reshape(x.shape), *args[1:])
        return hook

    try:
        for layer, edits in by_layer.items():
            handles.append(model._projs[layer].register_forward_pre_hook(make(edits)))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.inference_mode()
def _log_probs(model, seq: list[int], rows: list) -> torch.Tensor:
    """``[rows, predicted positions, vocab]`` next-token log-probabilities of one sequence, per row."""
    ids = torch.tensor([seq] * len(rows), dtype=torch.long)
    ids, mask, offset = model._prepare(ids, None)
    n_pos = ids.shape[1]
    with replaced(model, [None if r is None else (r[0], r[1], r[2].to(model.device)) for r in rows], n_pos, offset):
        logits = model.model(**model._forward_kwargs(ids, mask)).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1), ids[:, 1:]


def _checked(model, jobs, seqs_of) -> tuple[list, list[list[list[int]]]]:
    """``jobs`` and ``seqs_of`` as lists, or an N2GError that says what to pass: lists of different lengths
    were cut to the shorter one by ``zip``, so a neuron without sequences was reported as "no text"; a
    token id or neuron the model does not have was an IndexError from inside it."""
    from .models import context_room
    from .steer import _token_ids

    hint = "pass jobs as [(n2g.NeuronId, graph, scale, mean), ...] and seqs_of as one list of token-id sequences per job"
    jobs, seqs_of = list(jobs), list(seqs_of)
    if len(jobs) != len(seqs_of):
        raise N2GError(f"{len(jobs)} job(s) but {len(seqs_of)} list(s) of sequences; {hint}")
    room = context_room(model)
    out = []
    for k, (job, seqs) in enumerate(zip(jobs, seqs_of)):
        if not isinstance(job, (tuple, list)) or len(job) != 4 or not isinstance(job[0], NeuronId):
            raise N2GError(f"jobs[{k}] is not (n2g.NeuronId, graph, scale, mean); {hint}")
        neuron, graph, scale, mean = job
        model.check_neuron(neuron.layer, neuron.index)
        if graph is not None and not callable(getattr(graph, "predict_sequence", None)):
            raise N2GError(f"jobs[{k}]: the graph is a {type(graph).__name__}, not an n2g.NeuronGraph; pass a fitted "
                           "model's graph_ (or None for a neuron without a graph)")
        for what, value in (("scale", scale), ("mean", mean)):
            if not is_real(value) or not math.isfinite(value):
                raise N2GError(f"jobs[{k}]: {what} must be a finite number (got {value!r}); {hint}")
        if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Iterable):
            raise N2GError(f"seqs_of[{k}] is not a list of token-id sequences; {hint}")
        rows = []
        for seq in seqs:
            ids = _token_ids(model, seq, f"a sequence of seqs_of[{k}]")
            if room is not None and len(ids) > room:
                raise N2GError(f"a sequence of seqs_of[{k}] is {len(ids)} tokens, more than this model's context "
                               f"takes ({room}); pass shorter sequences")
            rows.append(ids)
        out.append(rows)
    return jobs, out


def ablation_scores(model, jobs: Sequence[tuple[NeuronId, object, float, float]], seqs_of: Sequence[Sequence[list[int]]],
                    ) -> list[Ablation]:
    """Ablation scores of many neurons: ``jobs[k] = (neuron, graph, scale, mean)`` on the sequences
    ``seqs_of[k]`` (held-out excerpts); ``scale`` is the neuron's maximum on its side (the graph's
    normalising constant) and ``mean`` its mean raw activation. Neurons sharing a sequence share its
    forward passes."""
    jobs, seqs_of = _checked(model, jobs, seqs_of)
    per_seq: dict[tuple[int, ...], list[tuple[int, str, torch.Tensor | None]]] = {}
    for k, ((neuron, graph, scale, mean), seqs) in enumerate(zip(jobs, seqs_of)):
        sign = 1.0 if neuron.sign == Sign.POSITIVE else -1.0
        for seq in seqs:
            seq = [int(t) for t in seq]
            if len(seq) < 2 and model.bos_token_id is None:
                continue
            pred = graph.predict_sequence(seq) if graph is not None else np.zeros(len(seq), np.float32)
            values = {"graph": torch.as_tensor(pred * scale * sign, dtype=torch.float32),
                      "zero": torch.zeros(len(seq)), "mean": torch.full((len(seq),), float(mean))}
            per_seq.setdefault(tuple(seq), []).extend((k, v, values[v]) for v in VARIANTS)
    ce = [dict.fromkeys(("clean", *VARIANTS), 0.0) for _ in jobs]
    kl = [dict.fromkeys(VARIANTS, 0.0) for _ in jobs]
    count = [0] * len(jobs)
    excerpts = [0] * len(jobs)
    vocab = int(model.model.get_output_embeddings().weight.shape[0])
    for seq, wanted in per_seq.items():
        n_pos = len(seq) + (1 if model.bos_token_id is not None else 0)
        per_pass = max(1, LOGIT_BUDGET // max(n_pos * vocab, 1) - 1)
        clean_lp, targets = _log_probs(model, list(seq), [None])
        clean_lp, targets = clean_lp[0], targets[0]
        clean_ce = -clean_lp.gather(-1, targets[:, None])[:, 0]
        clean_p = clean_lp.exp()
        for k in {k for k, _, _ in wanted}:
            ce[k]["clean"] += float(clean_ce.sum())
            count[k] += int(clean_ce.numel())
            excerpts[k] += 1
        for start in range(0, len(wanted), per_pass):
            chunk = wanted[start : start + per_pass]
            rows = [(jobs[k][0].layer, jobs[k][0].index, values) for k, _, values in chunk]
            lp, _ = _log_probs(model, list(seq), rows)
            for (k, variant, _), row in zip(chunk, lp):
                ce[k][variant] += float(-row.gather(-1, targets[:, None]).sum())
                kl[k][variant] += float((clean_p * (clean_lp - row)).sum())
    out = []
    for k in range(len(jobs)):
        n = count[k]
        if not n:
            out.append(Ablation(float("nan"), status="no text", n_tokens=0))
            continue
        clean = ce[k]["clean"] / n
        inc = {v: ce[k][v] / n - clean for v in VARIANTS}
        div = {v: kl[k][v] / n for v in VARIANTS}
        if inc["zero"] < MIN_DAMAGE:
            recovered, status = None, "zero ablation has no effect"
        else:
            recovered, status = 1.0 - inc["graph"] / inc["zero"], "ok"
        out.append(Ablation(clean, inc, div, recovered, status, n, excerpts[k]))
    return out
