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

import itertools
import logging
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .augment import make_substitutes
from .config import DistillConfig
from .distill import NeuronFit, common_tokens, neuron_steps
from .errors import N2GError
from .features import Candidates, Compute, Evaluate, length_batches, pad
from .published import for_model
from .records import NeuronId, Sign

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One neuron to fit: where it is, its normalising maximum and its ranked excerpts."""

    neuron: NeuronId
    scale: float
    ranked: list[int]
    pool: list[int]
    known: Mapping[int, np.ndarray] | None = None
    """Normalised activations already measured (the scan's store), by excerpt index."""
    is_train: np.ndarray | None = None
    """The run's corpus-level partition (True: training excerpt)."""
    evidence: list[int] | None = None
    """Training excerpts whose activations ``known`` holds (the stored training partition)."""
    written: tuple[np.ndarray, np.ndarray] | None = None
    """Tokens of model-written text the training partition rarely shows, and the neuron's normalised
    activations there (:mod:`n2g.written`): single-token evidence for the graph only."""


class StoreValues(Mapping):
    """One neuron's normalised activations on the stored excerpts, read from the store when asked.

    Nothing is read up front: a whole-model run builds a job per neuron, and a float32 copy of every
    neuron's column (1,729 x 64 values on the embedded corpus) would hold 20 GB for SmolLM2's 46,080
    neurons before the first one is fitted. Each row is read from the memory-mapped store on access.
    """

    def __init__(self, scan, neuron: NeuronId, scale: float):
        self.store = scan.store
        self.index, self.negative, self.scale = neuron.index, neuron.sign != Sign.POSITIVE, scale
        self.live = scale > 0  # a dead neuron: nothing known

    def __getitem__(self, excerpt: int) -> np.ndarray:
        if excerpt not in self:
            raise KeyError(excerpt)
        return self.many([excerpt])[0]

    def many(self, excerpts: Sequence[int]) -> list[np.ndarray]:
        """``[self[e] for e in excerpts]`` in one read of the store (the scan's column / scale, bit for bit)."""
        if not len(excerpts):
            return []
        if not self.live:
            raise KeyError(excerpts[0])
        block = self.store.neuron(self.index, excerpts)
        return list((-block if self.negative else block) / self.scale)

    def __contains__(self, excerpt) -> bool:
        return self.live and self.store.has(excerpt)

    def __iter__(self):
        return iter(self.store.excerpts.tolist() if self.live else [])

    def __len__(self) -> int:
        return self.store.n_stored if self.live else 0


def store_job(scan, neuron: NeuronId, is_train: np.ndarray, written=None) -> Job:
    """A job whose known activations and training evidence come from the layer's activation store
    (and ``written``, a :class:`n2g.written.WrittenTokens`, when the run measured model-written text)."""
    scale = scan.scale(neuron.index, neuron.sign)
    known = StoreValues(scan, neuron, scale) if scan.store is not None else None
    evidence = scan.store.excerpts[np.asarray(is_train, bool)[scan.store.excerpts]].tolist() if scan.store is not None else None
    mine = written.for_neuron(neuron, scale) if written is not None else None
    return Job(neuron, scale, scan.ranked(neuron.index, neuron.sign), scan.pool, known, is_train, evidence, mine)


@dataclass
class StageCost:
    """Forward work of one stage, counted in machine-independent units."""

    rows: int = 0
    """Sequences sent to the model (after identical rows of a layer were merged)."""
    asked: int = 0
    """Sequences the neurons asked for, before merging."""
    real: int = 0
    """Token positions of those rows (no BOS, no padding)."""
    padded: int = 0
    """Token positions the model computed: rows x their batch's width."""
    weighted: float = 0.0
    """Padded positions x (deepest layer + 1) / layers: a pass stops after the deepest layer it needs."""
    calls: int = 0
    """Forward passes that carried rows of this stage."""


def _count_substitutes(cost: "Cost", asked: int, before: dict, after: dict) -> None:
    """Count one round of substitute requests as the ``substitutes`` stage from the source's own
    counters: whole-model passes (they need the logits), so weighted positions are padded ones."""
    st = cost.stage("substitutes")
    delta = {key: int(after[key]) - int(before.get(key, 0)) for key in ("calls", "rows", "real", "padded")}
    st.asked += asked
    st.rows += delta["rows"]
    st.real += delta["real"]
    st.padded += delta["padded"]
    st.weighted += float(delta["padded"])
    st.calls += delta["calls"]
    cost.forward_calls += delta["calls"]


@dataclass
class Cost:
    """What fitting cost, per stage, plus the host time spent outside forward passes."""

    n_layers: int = 1
    stages: dict = field(default_factory=dict)
    forward_calls: int = 0
    forward_seconds: float = 0.0
    """Wall seconds inside forward passes (including the copy of results to the host)."""
    forward_thread_cpu: float = 0.0
    host_cpu: float = 0.0
    """Main-thread CPU seconds of fitting outside forward passes and offloadable work: the serial
    part that holds up the model (splitting, reading the store, request building)."""
    compute_cpu: float = 0.0
    """CPU seconds of the pure host work (graph building, calibration, prediction, scoring) wherever
    it ran: inline, or spread over worker processes (``host_workers``)."""

    def stage(self, name: str) -> StageCost:
        return self.stages.setdefault(name, StageCost())

    def total(self) -> StageCost:
        out = StageCost()
        for s in self.stages.values():
            for k in ("rows", "asked", "real", "padded", "weighted", "calls"):
                setattr(out, k, getattr(out, k) + getattr(s, k))
        out.calls = self.forward_calls
        return out


CPU_BATCH_TOKENS = 16384
"""Fitting batch budget off an accelerator: a CPU is busy long before memory matters."""
MAX_BATCH_TOKENS = 1 << 20
CPU_SCAN_BATCH = 32
"""Excerpts per scan batch off an accelerator, for an ordinary MLP width."""
CPU_SCAN_VALUES = 1 << 24
"""Most activations (excerpts x positions x width) in one CPU scan batch: a scan holds several copies
of them, and a wide SAE (a million latents) would otherwise take tens of GB where the CPU's out of
memory is a kill, not an error to back off from."""


def device_budget(model, length: int, n_scan_layers: int = 1, batch_tokens: int | None = None,
                  scan_batch: int | None = None) -> tuple[int, int]:
    """``(batch_tokens, scan_batch)``: fitting batch budget in tokens and excerpts per scan batch.

    Given values win (the CLI's ``--batch-tokens`` and ``--scan-batch``). Otherwise, on a CUDA
    device they grow with its free memory (half of it, by an estimate of the bytes a token costs in a
    forward pass that keeps one layer's MLP activations, or every scanned layer's for the scan);
    elsewhere they are 16,384 tokens and 32 excerpts, fewer excerpts when the width (``d_mlp``, an
    SAE's ``d_sae``) times ``length`` would put more than :data:`CPU_SCAN_VALUES` activations in one
    batch. Out-of-memory errors still back off.
    """
    device = getattr(model, "device", torch.device("cpu"))
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        per_excerpt = max(int(length), 1) * max(int(getattr(model, "d_mlp", 0) or 0), 1)
        return batch_tokens or CPU_BATCH_TOKENS, scan_batch or max(1, min(CPU_SCAN_BATCH, CPU_SCAN_VALUES // per_excerpt))
    free, _ = torch.cuda.mem_get_info(device)
    config = getattr(getattr(model, "model", None), "config", None)
    d_model = int(getattr(config, "hidden_size", 0) or 0) or model.d_mlp // 2
    heads = int(getattr(config, "num_attention_heads", 0) or 0) or 16
    elem = torch.finfo(getattr(model, "dtype", torch.float32)).bits // 8
    per_token = elem * (6 * d_model + 4 * model.d_mlp + heads * max(length, 64)) + 4 * model.d_mlp
    fit = int(min(max(free * 0.5 // per_token, CPU_BATCH_TOKENS), MAX_BATCH_TOKENS))
    scan_per_excerpt = length * (per_token + 8 * model.d_mlp * max(n_scan_layers, 1))
    scan = int(min(max(free * 0.5 // scan_per_excerpt, 32), 8192))
    return batch_tokens or fit, scan_batch or scan


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class RowEvaluator:
    """Answers activation requests of many neurons in shared padded batches, backing off on OOM.

    Requests are grouped by layer, and a sequence asked for by several neurons of one layer runs
    once: one forward pass yields every neuron of that layer, and each asker takes its column.
    """

    def __init__(self, model, batch_tokens: int, pad_id: int):
        self.model, self.batch_tokens, self.pad_id = model, batch_tokens, pad_id
        self.rows_done = 0
        self.cost = Cost(n_layers=int(getattr(model, "n_layers", 1) or 1))

    def __call__(self, seqs: list[list[int]], neurons: list[NeuronId], scales: list[float],
                 stages: Sequence[str] | None = None) -> list[np.ndarray]:
        out: list[np.ndarray | None] = [None] * len(seqs)
        stages = list(stages) if stages is not None else ["other"] * len(seqs)
        by_layer: dict[int, dict[tuple[int, ...], list[int]]] = {}
        for i, (seq, neuron) in enumerate(zip(seqs, neurons)):
            by_layer.setdefault(neuron.layer, {}).setdefault(tuple(seq), []).append(i)
            self.cost.stage(stages[i]).asked += 1
        for layer in sorted(by_layer):
            unique = list(by_layer[layer].items())
            for batch in length_batches([len(u[0]) for u in unique], self.batch_tokens):
                self._run(layer, [unique[j] for j in batch], neurons, scales, out, stages)
        return out  # type: ignore[return-value]

    def _count(self, layer: int, rows, stages: list[str]) -> None:
        cost = self.cost
        width = max(len(seq) for seq, _ in rows)
        depth = (layer + 1) / cost.n_layers
        cost.forward_calls += 1
        seen = set()
        for seq, askers in rows:
            s = cost.stage(stages[askers[0]])
            s.rows += 1
            s.real += len(seq)
            s.padded += width
            s.weighted += width * depth
            if stages[askers[0]] not in seen:
                seen.add(stages[askers[0]])
                s.calls += 1

    def _run(self, layer: int, rows: list[tuple[tuple[int, ...], list[int]]], neurons, scales, out,
             stages: list[str]) -> None:
        try:
            wall, cpu = time.perf_counter(), time.thread_time()
            ids, mask = pad([list(seq) for seq, _ in rows], self.pad_id)
            acts = self.model.layer_activations(ids, mask, [layer])[layer]
            r_idx = [r for r, (_, askers) in enumerate(rows) for _ in askers]
            n_idx = [neurons[i].index for _, askers in rows for i in askers]
            values = acts[torch.tensor(r_idx, device=acts.device), :, torch.tensor(n_idx, device=acts.device)]
            values = values.float().cpu().numpy()
            self.cost.forward_seconds += time.perf_counter() - wall
            self.cost.forward_thread_cpu += time.thread_time() - cpu
            self._count(layer, rows, stages)
        except RuntimeError as exc:
            if not _is_oom(exc) or len(rows) == 1:
                raise
            torch.cuda.empty_cache()
            self.batch_tokens = max(self.batch_tokens // 2, 64)
            log.warning("out of memory: batch size backed off to %d tokens", self.batch_tokens)
            half = len(rows) // 2
            self._run(layer, rows[:half], neurons, scales, out, stages)
            self._run(layer, rows[half:], neurons, scales, out, stages)
            return
        at = 0
        for seq, askers in rows:
            for i in askers:
                v = values[at, : len(seq)]
                at += 1
                if not np.all(np.isfinite(v)):
                    raise N2GError(f"neuron {neurons[i].key} produced NaN or infinite activations; try --dtype float32")
                factor = 1.0 if neurons[i].sign == Sign.POSITIVE else -1.0
                out[i] = (v * factor / scales[i]).astype(np.float32)
        self.rows_done += len(rows)


def timed_call(fn: Callable, args: tuple):
    """``(fn(*args), CPU seconds it took)``: runs where it is sent (inline or in a worker process)."""
    t = time.thread_time()
    out = fn(*args)
    return out, time.thread_time() - t


def _resume(steps, answer) -> NeuronFit:
    """Send a neuron its last answer; its generator returns the fit."""
    try:
        steps.send(answer)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("a neuron asked for more after its host work")  # pragma: no cover - programming error


def host_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()):
    """Worker processes for the host work of fitting (None for 0: run it inline).

    Spawned, not forked: safe beside CUDA and torch's thread pools; each worker imports n2g once
    (and runs ``initializer(*initargs)`` once)."""
    if workers <= 0:
        return None
    import multiprocessing

    return _HostPool(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                     initializer=_worker_start, initargs=(initializer, initargs))


class _HostPool(ProcessPoolExecutor):
    """A process pool whose workers start with Ctrl-C blocked: a worker takes seconds to import n2g and
    torch before :func:`_worker_start` can ignore SIGINT, and a Ctrl-C in that time (a terminal sends it
    to every process of the group) printed a traceback per worker. The pool starts workers on demand,
    inside ``submit``, so SIGINT is blocked in the submitting thread for the call (a blocked signal is
    inherited through fork and exec); one arriving meanwhile is delivered once ``submit`` has registered
    the worker, so shutting the pool down still reaches it (interrupted half-way, it was left waiting
    and the main process hung at exit)."""

    def submit(self, fn, /, *args, **kwargs):
        if not hasattr(signal, "pthread_sigmask"):
            return super().submit(fn, *args, **kwargs)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            return super().submit(fn, *args, **kwargs)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _worker_start(initializer: Callable | None, initargs: tuple) -> None:
    """In each worker: leave Ctrl-C to the main process (it shuts the pool down; a worker's own
    KeyboardInterrupt only prints a traceback), end with the main process even when it is killed
    (Linux), then run the caller's initializer."""

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the parent process dies
    except (OSError, AttributeError):
        pass  # not Linux: a killed main process leaves its workers to finish their task and idle out
    if initializer is not None:
        initializer(*initargs)


def fit_group(model, excerpts: Sequence[Sequence[int]], jobs: list[Job], cfg: DistillConfig, *,
              substitutes: Callable | None = None, evaluator: RowEvaluator | None = None,
              pool=None, parked: list | None = None) -> dict[NeuronId, NeuronFit]:
    """Fit a group of neurons in lockstep, sharing every batch; dead neurons come back as such.

    With a ``pool`` each neuron's host work (:class:`~n2g.features.Compute`) goes to a worker
    process; with a ``parked`` list the group returns without waiting for it, appending
    ``(neuron, steps, future)`` for the caller to finish (:func:`_resume`) while the model runs
    the next group. Results are the same either way."""
    cfg = for_model(cfg, model)  # settings that need the tokenizer (paper: occlusion by '"', sentence ends)
    occlusion = int(model.occlusion_token_id)
    evaluator = evaluator or RowEvaluator(model, cfg.batch_tokens, occlusion)
    if substitutes is None and cfg.augment:
        substitutes = make_substitutes(model, cfg.substitute_source)
    cost = getattr(evaluator, "cost", None)
    cpu0 = time.thread_time()
    forward0 = cost.forward_thread_cpu if cost is not None else 0.0
    excluded_cpu = 0.0
    results: dict[NeuronId, NeuronFit] = {}
    live = {}
    shared: dict = {}  # the common tokens of each evidence list the jobs share (a layer's stored training excerpts)
    keys = {}
    if cfg.augment and cfg.novel_variants and cfg.evidence == "partition":
        for job in jobs:
            if job.evidence is not None and job.scale > 0:
                key = keys[job.neuron] = tuple(int(i) for i in job.evidence)
                if key not in shared:
                    shared[key] = (frozenset(key), common_tokens([excerpts[i] for i in key], cfg))
    for job in jobs:
        if not job.scale > 0:
            results[job.neuron] = NeuronFit(None, [], {}, None, status="dead")
        else:
            live[job.neuron] = neuron_steps(excerpts, job.ranked, job.pool, cfg, occlusion, job.known,
                                            job.is_train, job.evidence, shared.get(keys.get(job.neuron)),
                                            written=job.written)
    scales = {job.neuron: job.scale for job in jobs}
    answers: dict[NeuronId, object] = {n: None for n in live}
    own: list = []  # neurons whose host work runs in the pool
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
        for n, r in requests.items():
            if not isinstance(r, Compute):
                continue
            if pool is None:
                t = time.thread_time()
                answers[n], cpu = timed_call(r.fn, r.args)
                excluded_cpu += time.thread_time() - t  # counted as compute, not as serial host work
                if cost is not None:
                    cost.compute_cpu += cpu
            else:
                own.append((n, live.pop(n), pool.submit(timed_call, r.fn, r.args)))
        if evals:
            seqs, owners, stages = [], [], []
            for n, r in evals:
                seqs.extend(r.seqs)
                owners.extend([n] * len(r.seqs))
                stages.extend([r.stage] * len(r.seqs))
            values = evaluator(seqs, owners, [scales[n] for n in owners], stages) if seqs else []
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
            t, wall = time.thread_time(), time.perf_counter()
            counts = dict(getattr(substitutes, "counts", None) or {})
            found = substitutes(seqs, positions, k) if (substitutes is not None and seqs) else [[] for _ in seqs]
            if cost is not None and counts and seqs:  # the subject model's own passes (ModelSubstitutes)
                cost.forward_thread_cpu += time.thread_time() - t
                cost.forward_seconds += time.perf_counter() - wall
                _count_substitutes(cost, len(seqs), counts, substitutes.counts)
            else:
                excluded_cpu += time.thread_time() - t
            at = 0
            for n, r in cands:
                answers[n] = [c[: r.k] for c in found[at : at + len(r.seqs)]]
                at += len(r.seqs)
    if cost is not None:
        forward = cost.forward_thread_cpu - forward0
        cost.host_cpu += max(time.thread_time() - cpu0 - forward - excluded_cpu, 0.0)
    if parked is not None:
        parked.extend(own)
    else:
        for n, steps, future in own:
            answer, cpu = future.result()
            if cost is not None:
                cost.compute_cpu += cpu
            results[n] = _resume(steps, answer)
    return results


def _claimed(queue, size: int, claim: Callable[[NeuronId], bool]) -> list[Job]:
    """The next ``size`` jobs of ``queue`` that ``claim`` gives this process (fewer at its end)."""
    group = []
    for job in queue:
        if claim(job.neuron):
            group.append(job)
            if len(group) == size:
                break
    return group


def fit_many(model, excerpts: Sequence[Sequence[int]], jobs: list[Job], cfg: DistillConfig, *,
             group_size: int = 64, on_done: Callable[[Job, NeuronFit, float], None] | None = None,
             substitutes: Callable | None = None, evaluator: RowEvaluator | None = None,
             host_workers: int = 0, pool=None, claim: Callable[[NeuronId], bool] | None = None
             ) -> dict[NeuronId, NeuronFit]:
    """Fit jobs in groups of ``group_size`` (1 = one neuron at a time), calling ``on_done`` per neuron
    in neuron order.

    With ``claim``, a job is fitted only if ``claim(neuron)`` says yes when its group is formed (another
    process sharing the run directory may hold it); the others are left out of the result.

    ``host_workers > 0`` runs every neuron's host work in that many worker processes (or pass a
    ``pool`` from :func:`host_pool` to share one), overlapped with the model's forward passes for the
    next groups; the fits are identical to ``0`` (inline).
    """
    evaluator = evaluator or RowEvaluator(model, cfg.batch_tokens, int(model.occlusion_token_id))
    if substitutes is None and cfg.augment:
        substitutes = make_substitutes(model, cfg.substitute_source)
    cost = getattr(evaluator, "cost", None)
    out: dict[NeuronId, NeuronFit] = {}
    jobs = sorted(jobs, key=lambda j: j.neuron)
    by_neuron = {j.neuron: j for j in jobs}
    order: list[tuple[NeuronId, float]] = []  # finished in this order, whatever ran where
    pending: dict[NeuronId, tuple] = {}
    done: dict[NeuronId, NeuronFit] = {}

    def deliver(block: bool, keep: int = 0) -> None:
        """Finish parked neurons (oldest first) and report every neuron whose turn has come."""
        while order:
            neuron, share = order[0]
            if neuron in pending:
                steps, future = pending[neuron]
                if not (block or len(pending) > keep or future.done()):
                    return
                answer, cpu = future.result()
                if cost is not None:
                    cost.compute_cpu += cpu
                done[neuron] = _resume(steps, answer)
                del pending[neuron]
            order.pop(0)
            out[neuron] = done.pop(neuron)
            if on_done is not None:
                on_done(by_neuron[neuron], out[neuron], share)

    own_pool = pool is None and host_workers > 0
    if own_pool:
        pool = host_pool(host_workers)
    try:
        queue = iter(jobs)
        while True:
            group = list(itertools.islice(queue, group_size)) if claim is None else \
                _claimed(queue, group_size, claim)
            if not group:
                break
            t0 = time.perf_counter()
            parked: list | None = [] if pool is not None else None
            fits = fit_group(model, excerpts, group, cfg, substitutes=substitutes, evaluator=evaluator,
                             pool=pool, parked=parked)
            share = (time.perf_counter() - t0) / max(len(group), 1)
            done.update(fits)
            for n, steps, future in parked or ():
                pending[n] = (steps, future)
            order.extend((job.neuron, share) for job in group)
            # Keep the workers fed while the model runs the next group, with at most two groups in flight.
            deliver(block=False, keep=2 * group_size)
        deliver(block=True)
    finally:
        if own_pool:
            pool.shutdown(wait=True, cancel_futures=True)
    return out
