"""Batched fitting across neurons.

Every neuron's distillation is a generator of requests (:func:`n2g.distill.neuron_steps`). The
engine advances a group of neurons in lockstep and answers all their outstanding requests
together: activation requests of every neuron become rows of shared padded batches (sorted by
length; each row asks its own neuron, and the forward pass stops after the deepest layer in the
batch), and substitute requests share next-token batches. Because each neuron sees exactly the
answers it would get alone, results are the same as fitting one neuron at a time (the
``group_size=1`` engine, which is also the one-at-a-time baseline of the speed benchmark).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .augment import ModelSubstitutes
from .config import DistillConfig
from .distill import NeuronFit, neuron_steps
from .errors import N2GError
from .features import Candidates, Evaluate, length_batches, pad
from .records import NeuronId, Sign

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One neuron to fit: where it is, its normalising maximum and its ranked excerpts."""

    neuron: NeuronId
    scale: float
    ranked: list[int]
    pool: list[int]


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class RowEvaluator:
    """Answers activation requests of many neurons in shared padded batches, backing off on OOM."""

    def __init__(self, model, batch_tokens: int, pad_id: int):
        self.model, self.batch_tokens, self.pad_id = model, batch_tokens, pad_id
        self.rows_done = 0

    def __call__(self, seqs: list[list[int]], neurons: list[NeuronId], scales: list[float]) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(seqs)
        # Sort by layer first so a batch's forward pass stops as early as its rows allow.
        order = sorted(range(len(seqs)), key=lambda i: (neurons[i].layer, len(seqs[i]), i))
        chunks: list[list[int]] = []
        layer_of = None
        for i in order:
            if layer_of != neurons[i].layer:
                chunks.append([])
                layer_of = neurons[i].layer
            chunks[-1].append(i)
        for chunk in chunks:
            for batch in length_batches([len(seqs[i]) for i in chunk], self.batch_tokens):
                self._run([chunk[j] for j in batch], seqs, neurons, scales, out)
        return out  # type: ignore[return-value]

    def _run(self, rows: list[int], seqs, neurons, scales, out) -> None:
        try:
            ids, mask = pad([seqs[i] for i in rows], self.pad_id)
            values = self.model.rows_activations(ids, mask, [(neurons[i].layer, neurons[i].index) for i in rows])
            values = values.detach().float().cpu().numpy()
        except RuntimeError as exc:
            if not _is_oom(exc) or len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_tokens = max(self.batch_tokens // 2, 64)
            log.warning("out of memory: batch size backed off to %d tokens", self.batch_tokens)
            half = len(rows) // 2
            self._run(rows[:half], seqs, neurons, scales, out)
            self._run(rows[half:], seqs, neurons, scales, out)
            return
        for r, i in enumerate(rows):
            v = values[r, : len(seqs[i])]
            if not np.all(np.isfinite(v)):
                raise N2GError(f"neuron {neurons[i].key} produced NaN or infinite activations; try --dtype float32")
            factor = 1.0 if neurons[i].sign == Sign.POSITIVE else -1.0
            out[i] = (v * factor / scales[i]).astype(np.float32)
        self.rows_done += len(rows)


def fit_group(model, excerpts: Sequence[Sequence[int]], jobs: list[Job], cfg: DistillConfig, *,
              substitutes: Callable | None = None, evaluator: RowEvaluator | None = None) -> dict[NeuronId, NeuronFit]:
    """Fit a group of neurons in lockstep, sharing every batch; dead neurons come back as such."""
    occlusion = int(model.occlusion_token_id)
    evaluator = evaluator or RowEvaluator(model, cfg.batch_tokens, occlusion)
    if substitutes is None and cfg.augment:
        substitutes = ModelSubstitutes(model)
    results: dict[NeuronId, NeuronFit] = {}
    live = {}
    for job in jobs:
        if not job.scale > 0:
            results[job.neuron] = NeuronFit(None, [], {}, None, status="dead")
        else:
            live[job.neuron] = neuron_steps(excerpts, job.ranked, job.pool, cfg, occlusion)
    scales = {job.neuron: job.scale for job in jobs}
    answers: dict[NeuronId, object] = {n: None for n in live}
    while live:
        requests = {}
        for neuron, steps in list(live.items()):
            try:
                requests[neuron] = steps.send(answers[neuron])
            except StopIteration as stop:
                results[neuron] = stop.value
                del live[neuron]
        evals = [(n, r) for n, r in requests.items() if isinstance(r, Evaluate)]
        cands = [(n, r) for n, r in requests.items() if isinstance(r, Candidates)]
        if evals:
            seqs, owners = [], []
            for n, r in evals:
                seqs.extend(r.seqs)
                owners.extend([n] * len(r.seqs))
            values = evaluator(seqs, owners, [scales[n] for n in owners]) if seqs else []
            at = 0
            for n, r in evals:
                answers[n] = values[at : at + len(r.seqs)]
                at += len(r.seqs)
        if cands:
            seqs, positions = [], []
            for _, r in cands:
                seqs.extend(r.seqs)
                positions.extend(r.positions)
            k = max(r.k for _, r in cands)
            found = substitutes(seqs, positions, k) if (substitutes is not None and seqs) else [[] for _ in seqs]
            at = 0
            for n, r in cands:
                answers[n] = [c[: r.k] for c in found[at : at + len(r.seqs)]]
                at += len(r.seqs)
    return results


def fit_many(model, excerpts: Sequence[Sequence[int]], jobs: list[Job], cfg: DistillConfig, *,
             group_size: int = 64, on_done: Callable[[Job, NeuronFit, float], None] | None = None,
             substitutes: Callable | None = None, evaluator: RowEvaluator | None = None) -> dict[NeuronId, NeuronFit]:
    """Fit jobs in groups of ``group_size`` (1 = one neuron at a time), calling ``on_done`` per neuron."""
    evaluator = evaluator or RowEvaluator(model, cfg.batch_tokens, int(model.occlusion_token_id))
    if substitutes is None and cfg.augment:
        substitutes = ModelSubstitutes(model)
    out: dict[NeuronId, NeuronFit] = {}
    jobs = sorted(jobs, key=lambda j: j.neuron)
    for start in range(0, len(jobs), group_size):
        group = jobs[start : start + group_size]
        t0 = time.perf_counter()
        fits = fit_group(model, excerpts, group, cfg, substitutes=substitutes, evaluator=evaluator)
        share = (time.perf_counter() - t0) / max(len(group), 1)
        for job in group:
            out[job.neuron] = fits[job.neuron]
            if on_done is not None:
                on_done(job, fits[job.neuron], share)
    return out
