"""The whole job: model and corpus in, a run directory of graphs, scores and reports out.

``run(RunOptions(...))`` loads the subject model and corpus, scans the requested layers once,
fits every requested neuron with the batched engine, stores each result as it finishes (so an
interrupted run resumes where it stopped), writes the scores table and, unless asked not to, the
rendered graphs, validation report, search index and viewer.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import SUBSTITUTE_SOURCES, DistillConfig, preset
from .errors import N2GError
from .records import NeuronId, NeuronResult, Sign, plural

log = logging.getLogger(__name__)


def parse_indices(text: str, limit: int, what: str) -> list[int]:
    """``"all"``, ``"5"``, ``"0-99"``, ``"0,5,10-12"`` -> sorted indices, checked against ``limit``."""
    text = str(text).strip()
    if text == "all":
        return list(range(limit))
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([0-9]{1,18})(?:-([0-9]{1,18}))?", part)
        if not m:
            shown = part if len(part) <= 40 else part[:37] + "..."
            raise N2GError(f"cannot read {what} {shown!r}; use numbers, ranges like 0-99, commas, or 'all'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise N2GError(f"{what} range {part!r} is backwards; write it low-high")
        if hi >= limit:  # checked before expanding: a huge range must not be built first
            raise N2GError(f"{what} {max(lo, limit)} is out of range: this model has {what}s 0-{limit - 1}")
        out.update(range(lo, hi + 1))
    if not out:
        raise N2GError(f"no {what} given; name at least one (e.g. 0, 0-9 or all)")
    return sorted(out)


@dataclass
class RunOptions:
    """What to run; every field has a command-line option of the same name."""

    model: str = "default"
    corpus: str = "default"
    text_field: str = "text"
    excerpt_length: int = 64
    max_excerpts: int | None = None
    layers: str = "0"
    neurons: str = "0-7"
    sign: str = "positive"
    preset: str = "default"
    overrides: dict = field(default_factory=dict)
    out: str | None = None
    device: str | None = None
    dtype: str | None = None
    substitutes: str | None = None
    """Augmentation substitutes: None (the preset's ``substitute_source``), ``model``, ``embedding``
    or ``mlm:NAME`` (a masked LM)."""
    group_size: int = 64
    scan_batch: int | None = None
    """Excerpts per scan batch (None: sized to the device, see n2g.engine.device_budget)."""
    batch_tokens: int | None = None
    """Token budget of fitting batches (None: sized to the device)."""
    host_workers: int | None = None
    """Worker processes for the host work of fitting (None: all cores but one on an accelerator,
    0 on a CPU, whose cores the forward passes already use)."""
    ray: str | None = None
    """Fit on Ray: None (no), "local" (a local cluster started for the run) or a cluster address."""
    ray_workers: int | None = None
    """Ray workers (None: one per GPU of the cluster, else one per CPU)."""
    sae: str | None = None
    """A local SAELens directory: fit its latents (at its hook's layer) instead of MLP neurons."""
    control: str | None = None
    """``"random"``: also fit the same neurons on a randomly initialised copy of the model (seeded),
    into ``OUT/control-random``; the report shows both."""
    ablation: bool = False
    """Also score each graph standing in for its neuron inside the model (n2g.ablate; about 5x the
    forward work of fitting, so off unless asked)."""
    store_tokens: int | None = None
    """Token budget of the per-layer activation store (None: the default, see n2g.activations)."""
    report: bool = True
    progress: bool = True

    def config(self) -> DistillConfig:
        source = self.substitutes if self.substitutes in SUBSTITUTE_SOURCES else None
        return preset(self.preset, **{"substitute_source": source, **self.overrides})


@dataclass
class RunSummary:
    out: Path
    results: list[NeuronResult]
    fitted_now: int
    seconds: float
    artifacts: dict = field(default_factory=dict)


def store_budget(opts: RunOptions) -> int:
    from .activations import DEFAULT_STORE_TOKENS

    if opts.store_tokens is not None and opts.store_tokens < 1:
        raise N2GError(f"--store-tokens must be at least 1 (got {opts.store_tokens})")
    return opts.store_tokens or DEFAULT_STORE_TOKENS


def default_out(opts: RunOptions) -> Path:
    name = Path(opts.model).stem if opts.model not in ("default", "smollm2") else "smollm2"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    return Path("graphs") / f"{name}-{opts.preset}"


def versions() -> dict:
    import networkx
    import torch
    import transformers

    from . import __version__

    return {"n2g": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "networkx": networkx.__version__, "python": platform.python_version()}


def _signs(sign: str) -> list[Sign]:
    if sign == "both":
        return [Sign.POSITIVE, Sign.NEGATIVE]
    if sign not in ("positive", "negative"):
        raise N2GError(f"--sign must be positive, negative or both (got {sign!r})")
    return [Sign(sign)]


MAX_WORKERS_PER_CORE = 4
"""The most host worker processes per CPU core ``--host-workers`` may ask for: more only share the cores and
each holds the vocabulary and the stored corpus rows (thousands would exhaust memory)."""


def check_options(opts: RunOptions) -> None:
    """Refuse bad options before anything is loaded or written."""
    _signs(opts.sign)
    if opts.substitutes is not None and opts.substitutes not in SUBSTITUTE_SOURCES and not (
            opts.substitutes.startswith("mlm:") and len(opts.substitutes) > 4):
        named = ", ".join(f"'{name}'" for name in SUBSTITUTE_SOURCES)
        raise N2GError(f"--substitutes must be {named} or 'mlm:NAME' (got {opts.substitutes!r})")
    if opts.group_size < 1:
        raise N2GError("--group-size must be at least 1")
    for flag, value in (("--scan-batch", opts.scan_batch), ("--batch-tokens", opts.batch_tokens)):
        if value is not None and value < 1:
            raise N2GError(f"{flag} must be at least 1 (got {value})")
    if opts.host_workers is not None and opts.host_workers < 0:
        raise N2GError(f"--host-workers must be 0 or more (got {opts.host_workers})")
    cores = os.cpu_count() or 1
    if opts.host_workers is not None and opts.host_workers > MAX_WORKERS_PER_CORE * cores:
        raise N2GError(f"--host-workers {opts.host_workers} is more than {MAX_WORKERS_PER_CORE} worker processes per core "
                       f"({cores} {'core' if cores == 1 else 'cores'} here); pass at most {MAX_WORKERS_PER_CORE * cores}, "
                       "or leave it out for one per core beside a GPU")
    if opts.control not in (None, "random"):
        raise N2GError(f"--control must be 'random' (got {opts.control!r})")
    if opts.ray_workers is not None and opts.ray_workers < 1:
        raise N2GError(f"--ray-workers must be at least 1 (got {opts.ray_workers})")
    if opts.ray_workers is not None and opts.ray is None:
        log.warning("--ray-workers %d has no effect without --ray; add --ray to fit on Ray workers", opts.ray_workers)
    if opts.substitutes is not None and not opts.config().augment:
        log.warning("--substitutes %s has no effect without augmentation (--no-augment, or a preset without it); "
                    "drop one of the two", opts.substitutes)


def load_inputs(opts: RunOptions, model=None, corpus=None):
    """The subject model and corpus of a run (either may be passed in already loaded)."""
    from .corpus import Corpus
    from .models import check_excerpt_length, load_model

    if model is None:
        model = load_model(opts.model, device=opts.device, dtype=opts.dtype)
    if opts.sae and not hasattr(model, "encode_latents"):
        from .sae import load_sae

        model = load_sae(opts.sae, model)
    check_excerpt_length(model, opts.excerpt_length if corpus is None else int(corpus.excerpts.shape[1]))
    if corpus is None:
        corpus = Corpus.build(opts.corpus, model.encode, length=opts.excerpt_length,
                              max_excerpts=opts.max_excerpts, text_field=opts.text_field)
    return model, corpus


def open_store(opts: RunOptions, model, corpus):
    """The run directory's store, created or checked against this run's identity; and the partition."""
    from .activations import partition, stored_excerpts
    from .models import config_key_of, content_key_of, forget_weight_keys, model_location, weights_key_of
    from .store import RunStore

    cfg = opts.config()
    out = Path(opts.out) if opts.out else default_out(opts)
    store = RunStore(out)
    forget_weight_keys(model)  # a model passed in may have been edited since an earlier run keyed it
    weights, settings = weights_key_of(model), config_key_of(model)
    content = content_key_of(model) if weights else None
    identity = {"model": str(model.spec), **({"model_weights": weights} if weights else {}),
                **({"model_content": content} if content else {}),
                **({"model_config": settings} if weights and settings else {}),
                **({"model_path": model_location(model)} if weights else {}),
                # plain attributes a caller may set: the first token of every row, the token that occludes
                "model_tokens": {"bos": None if getattr(model, "bos_token_id", None) is None else int(model.bos_token_id),
                                 "occlusion": int(model.occlusion_token_id)},
                "corpus": corpus.source, "corpus_fingerprint": corpus.fingerprint(), "corpus_tokens": corpus.tokens_key(),
                "excerpt_length": int(corpus.excerpts.shape[1]), "n_excerpts": int(corpus.excerpts.shape[0]),
                "config": cfg.to_dict(), "store_tokens": store_budget(opts),
                # a masked LM named for the variants (the config says only that the preset's source is overridden)
                "substitutes": opts.substitutes if cfg.augment and (opts.substitutes or "").startswith("mlm:") else None}
    n_excerpts, length = int(corpus.excerpts.shape[0]), int(corpus.excerpts.shape[1])
    is_train = partition(n_excerpts, cfg.held_out, cfg.seed, corpus.excerpts)
    moved = int((is_train != partition(n_excerpts, cfg.held_out, cfg.seed)).sum())
    if moved:  # a run of this corpus made before repeats were kept together was scored on another split
        identity["partition"] = "repeats together"
    n_stored = len(stored_excerpts(n_excerpts, length, store_budget(opts), cfg.seed))
    store.open(identity, {"name": out.name, "model": model.info(), "versions": versions(),
                          "corpus": {"source": corpus.source, "n_excerpts": n_excerpts, "length": length},
                          "partition": {"training_excerpts": int(is_train.sum()), "held_out_excerpts": int((~is_train).sum()),
                                        "held_out": cfg.held_out, "seed": cfg.seed},
                          "activation_store": {"token_budget": store_budget(opts), "stored_excerpts": n_stored,
                                               "bytes_per_layer": n_stored * length * int(model.d_mlp) * 2}})
    if moved:
        log.info("partition: the copies of a repeated excerpt are kept on one side (%d of %d excerpts moved), so "
                 "no held-out excerpt repeats a training one", moved, n_excerpts)
    if not (~is_train).any():
        log.warning("the corpus has %s, so nothing is held out and no neuron can be scored; add text "
                    "(more excerpts, or a shorter --excerpt-length)",
                    "one excerpt" if n_excerpts == 1 else f"one distinct excerpt ({n_excerpts} copies of it)")
    return store, is_train


def run(opts: RunOptions, model=None, corpus=None) -> RunSummary:
    """Run the pipeline; ``model`` and ``corpus`` may be passed in already loaded (tests, notebooks)."""
    started = time.perf_counter()
    check_options(opts)
    signs = _signs(opts.sign)
    if opts.ray is not None:
        from .distributed import preflight

        preflight(opts)
    if opts.config().augment and (opts.substitutes or "").startswith("mlm:"):
        from .augment import check_masked_lm

        check_masked_lm(opts.substitutes[4:])  # before anything is loaded or written: no network, one line
    model, corpus = load_inputs(opts, model, corpus)
    layers = parse_indices(opts.layers, model.n_layers, "layer")
    sae_layer = getattr(model, "encode_latents", None) and model.layer
    if opts.sae and layers == [0] and sae_layer:  # the default layer list means: the SAE's layer
        layers = [sae_layer]
    if hasattr(model, "encode_latents"):
        for layer in layers:  # before the run directory is made
            model.check_neuron(layer, 0)
    indices = parse_indices(opts.neurons, model.d_mlp, "neuron")
    store, is_train = open_store(opts, model, corpus)
    store.save_tokenizer(model)  # typed text split as the model splits it, without loading the model
    out = store.root
    wanted = [NeuronId(l, i, s) for l in layers for i in indices for s in signs]
    todo = [n for n in wanted if not store.is_done(n)]
    log.info("%d %s requested, %d already done in %s", len(wanted), plural(len(wanted), "neuron"),
             len(wanted) - len(todo), out)
    fitted = 0
    try:
        if todo and opts.ray is not None:
            from .distributed import fit_on_ray

            fitted = fit_on_ray(opts, todo, store)
        elif todo:
            fitted = fit_neurons(opts, todo, model, corpus, store, is_train)
    except (N2GError, KeyboardInterrupt, SystemExit):  # refused or interrupted (Ctrl-C, SIGTERM) before a first
        store.discard_if_empty()  # neuron (the model computes NaN, ...): no run folder is left, so the command
        raise  # may be run again with other options
    if opts.ablation and fitted < len(wanted):  # a finished neuron is never redone: --ablation cannot reach one fitted without it
        unscored = [n for n in wanted if _fitted_without_ablation(store, n)]  # before, or by another process
        if unscored:
            log.warning("%d neuron(s) of this run (e.g. %s) were fitted without --ablation (before, or by another "
                        "n2g process on the same --out) and are not redone, so they get no ablation score; run them "
                        "again with --ablation into a new --out", len(unscored), unscored[0].key)
    if opts.control == "random":
        from dataclasses import replace

        if hasattr(model, "encode_latents"):  # the same SAE on the random model
            from .sae import load_sae

            control = load_sae(model.path, random_copy(model.base, CONTROL_SEED))
        else:
            control = random_copy(model, CONTROL_SEED)
        run(replace(opts, control=None, out=str(out / CONTROL_DIR), report=False, ray=None), model=control, corpus=corpus)
    store.write_scores_table()
    artifacts = {}
    if opts.report:
        from .report import build_all

        artifacts = build_all(out)
    wanted_set = set(wanted)  # once: a whole model is 46,080 neurons or more
    results = [r for r in store.results() if r.neuron in wanted_set]
    return RunSummary(out, results, fitted, time.perf_counter() - started, artifacts)


CONTROL_DIR = "control-random"
"""Where ``--control random`` puts the same neurons fitted on a randomly initialised model."""
CONTROL_SEED = 1234
"""Seed of the control's weights (not 0: a model that is itself a seed-0 random init would be its own control)."""


def random_copy(model, seed: int = 0):
    """The subject model's architecture and tokenizer with freshly initialised weights (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .models import SubjectModel

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        net = AutoModelForCausalLM.from_config(model.model.config)
    finally:
        torch.random.set_rng_state(state)
    net = net.to(device=model.device, dtype=model.dtype).eval()
    copy = SubjectModel(net, model.tokenizer, spec=f"{model.spec}#random-init-seed{seed}")
    copy.bos_token_id, copy.occlusion_token_id = model.bos_token_id, model.occlusion_token_id
    return copy


def _fitted_without_ablation(store, neuron: NeuronId) -> bool:
    result = store.load_result(neuron)
    return result is not None and result.status != "dead" and not result.ablation


CLAIM_POLL_SECONDS = 2.0
"""How often a run that has fitted its share looks again at neurons another process on this host is fitting."""


def fit_neurons(opts: RunOptions, todo: list[NeuronId], model, corpus, store, is_train, share: bool = True) -> int:
    """Scan the layers of ``todo`` once and fit, save and count its neurons (one process's share of a run).

    With ``share`` (not under Ray, whose driver hands out the work) neurons are claimed in the run
    directory as they are fitted (:meth:`~n2g.store.RunStore.claim`): runs started on the same
    ``--out`` split the neurons between them, and each waits for the neurons another live process on
    this host is fitting, taking over those whose process has ended, so every run ends with all its
    neurons saved. Neurons claimed from another host are left to it, with a warning."""
    import os

    from .distill import pool_size, top_k
    from .engine import RowEvaluator, device_budget, fit_many, host_pool, store_job
    from .models import cache_dir
    from .progress import Progress
    from .scan import cache_bytes, scan_layers
    from .store import CLAIMS

    cfg = opts.config()
    length = int(corpus.excerpts.shape[1])
    fitted = 0
    scan_layer_set = sorted({n.layer for n in todo})
    batch_tokens, scan_batch = device_budget(model, length, len(scan_layer_set), opts.batch_tokens, opts.scan_batch)
    host_workers = opts.host_workers
    if host_workers is None:
        host_workers = max((os.cpu_count() or 1) - 1, 0) if getattr(model.device, "type", "") == "cuda" else 0
    log.info("batches: %d tokens when fitting, %d excerpts when scanning; %d host worker process(es)",
             batch_tokens, scan_batch, host_workers)
    scans = scan_layers(model, corpus.excerpts, scan_layer_set, k=top_k(cfg), pool_size=pool_size(cfg),
                        seed=cfg.seed, batch_size=scan_batch, fire_threshold=cfg.fire_threshold,
                        cache_dir=cache_dir(), corpus_key=corpus.tokens_key(), progress=opts.progress,
                        store_tokens=store_budget(opts), reread_weights=False)  # open_store has just keyed them
    stored = next(iter(scans.values())).store
    log.info("partition: %d training and %d held-out excerpts; activation store: %d excerpts x %d layer(s), "
             "%.1f MB on disk", int(is_train.sum()), int((~is_train).sum()), stored.n_stored, len(scans),
             cache_bytes(scans) / 1e6)
    excerpts = corpus.rows()
    from .vocabulary import model_evidence

    written = model_evidence(model, corpus.excerpts, is_train, cfg, todo, scans, cache_dir(), corpus.tokens_key(),
                             progress=opts.progress)
    jobs = [store_job(scans[n.layer], n, is_train, written) for n in todo]
    substitutes = None
    if cfg.augment and (opts.substitutes or "").startswith("mlm:"):
        from .augment import MaskedLMSubstitutes

        substitutes = MaskedLMSubstitutes(model, opts.substitutes[4:], device=str(model.device))
    evaluator = RowEvaluator(model, batch_tokens, int(model.occlusion_token_id))
    # One set of worker processes for every layer: graph building and scoring, then the result's
    # description and its files, so the main process only feeds the model.
    pool = None
    if host_workers > 0:
        vocab = model.token_strings(range(model.vocab_size))
        # a worker describes results from the stored excerpts only: their token ids, not the corpus's
        pool = host_pool(host_workers, _worker_setup, (vocab, corpus.rows(stored.excerpts)))
    saving: list = []
    bars: list = []
    holders: dict = {}  # neuron -> the claim of another process that holds it

    def mine(neuron: NeuronId) -> bool:
        state, holder = store.claim(neuron)
        if holder is not None:
            holders[neuron] = holder
        return state == "mine"

    def fit_jobs(jobs: list) -> None:
        for layer in sorted({j.neuron.layer for j in jobs}):
            layer_jobs = [j for j in jobs if j.neuron.layer == layer]
            bar = Progress(len(layer_jobs), f"fit layer {layer}", "neurons", enabled=opts.progress)
            # in the order fit_many finishes them: one batched pass through the unembedding per group
            effects = EffectsAhead(model, sorted(j.neuron for j in layer_jobs), chunk=opts.group_size)

            def save(job, fit, seconds, bar=bar, effects=effects):
                nonlocal fitted
                scan = scans[job.neuron.layer]
                stats = scan.stats(job.neuron.index, job.neuron.sign)
                if opts.ablation and fit.graph is not None:
                    fit.ablation = ablation_of(model, job, fit, scan)
                    fit.steering = steering_of(model, job, fit)
                if pool is None:
                    store.save(to_result(model, job.neuron, stats, fit, seconds, scan=scan, excerpts=excerpts,
                                         effects=effects(job.neuron)), fit.graph)
                    fitted += 1
                    bar.update(1)
                    return
                saving.append((pool.submit(_describe_and_save, str(store.root), job.neuron, stats, fit, seconds,
                                           effects(job.neuron), *store_values(scan, job.neuron)), bar))
                while saving and saving[0][0].done():
                    future, done_bar = saving.pop(0)
                    future.result()  # a failed write (disk full) stops the run here
                    fitted += 1
                    done_bar.update(1)

            fit_many(model, excerpts, layer_jobs, cfg, group_size=opts.group_size, on_done=save, substitutes=substitutes,
                     evaluator=evaluator, pool=pool, claim=mine if share else None)
            bars.append(bar)

    try:
        fit_jobs(jobs)
        told = False
        while share and holders:  # neurons another process held when their turn came
            left, busy, remote = [], {}, {}
            for job in jobs:
                if job.neuron in holders:
                    state, holder = store.claim(job.neuron)
                    if state == "mine":  # its process ended without saving it
                        left.append(job)
                    elif state in ("busy", "remote"):
                        (busy if state == "busy" else remote)[job.neuron] = holder
            if remote:
                first, holder = next(iter(remote.items()))
                log.warning("%d neuron(s) (e.g. %s) are claimed by process %s on host %s and are left to it; if that "
                            "run has ended, delete %s and re-run the same command", len(remote), first.key,
                            holder.get("pid"), holder.get("host"), store.root / CLAIMS)
            holders.clear()
            holders.update(busy)
            if left:
                fit_jobs(left)
            elif busy:
                if not told:
                    log.info("waiting for %d neuron(s) that another n2g process (pid %s) is fitting into %s",
                             len(busy), next(iter(busy.values())).get("pid"), store.root)
                    told = True
                time.sleep(CLAIM_POLL_SECONDS)
        for future, done_bar in saving:
            future.result()
            fitted += 1
            done_bar.update(1)
        saving.clear()
        for bar in bars:
            bar.close()
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        store.release_claims()
    return fitted


ABLATION_EXCERPTS = 8
"""Held-out excerpts (the strongest first) an ablation score runs on."""


def ablation_of(model, job, fit, scan) -> dict:
    """The ablation score of a fitted neuron on its held-out test excerpts (see :mod:`n2g.ablate`)."""
    from .ablate import ablation_scores

    tests = sorted((e for e in fit.examples if e.split == "test"),
                   key=lambda e: (e.source != "top", -max(e.activations, default=0.0)))[:ABLATION_EXCERPTS]
    mean = float(scan.store.neuron(job.neuron.index).astype(np.float64).mean()) if scan.store is not None else 0.0
    (score,) = ablation_scores(model, [(job.neuron, fit.graph, job.scale, mean)], [[e.token_ids for e in tests]])
    return score.to_dict()


STEER_SCALE = 4.0
"""With ``--ablation``, the neuron page's steering check clamps the neuron to this multiple of its maximum."""


def steering_of(model, job, fit) -> dict:
    """The steering check of a fitted neuron: clamped on the prefix of its strongest held-out excerpt
    (up to its most active token), next-token gainers and losers and greedy continuations."""
    from .steer import steer

    tops = [e for e in fit.examples if e.split == "test" and e.source == "top" and e.activations]
    if not tops:
        return {}
    best = max(tops, key=lambda e: max(e.activations))
    prefix = list(best.token_ids[: int(np.argmax(best.activations)) + 1])
    sign = 1.0 if job.neuron.sign == Sign.POSITIVE else -1.0
    result = steer(model, job.neuron.layer, job.neuron.index, prefix, STEER_SCALE * job.scale * sign, n_tokens=8)
    return {"prompt": "".join(model.token_strings(prefix)), "scale": STEER_SCALE, **result.to_dict()}


def _signed(neuron: NeuronId, effects) -> tuple[list, list]:
    promoted, suppressed = effects
    if neuron.sign == Sign.NEGATIVE:
        promoted, suppressed = [(t, -v) for t, v in suppressed], [(t, -v) for t, v in promoted]
    return promoted, suppressed


def output_effects(model, neuron: NeuronId) -> tuple[list, list]:
    """Tokens the neuron's side promotes and suppresses (the negative side writes the opposite direction)."""
    return _signed(neuron, model.output_effects(neuron.layer, neuron.index, k=10))


def output_effects_many(model, neurons: list[NeuronId]) -> list[tuple[list, list]]:
    """:func:`output_effects` of many neurons, one batched pass per layer (the same answers)."""
    many = getattr(model, "output_effects_many", None)
    if many is None:
        return [output_effects(model, n) for n in neurons]
    out: list = [None] * len(neurons)
    by_layer: dict[int, list[int]] = {}
    for i, n in enumerate(neurons):
        by_layer.setdefault(n.layer, []).append(i)
    for layer, where in by_layer.items():
        indices = sorted({neurons[i].index for i in where})
        found = dict(zip(indices, many(layer, indices, k=10)))
        for i in where:
            out[i] = _signed(neurons[i], found[neurons[i].index])
    return out


class EffectsAhead:
    """Output effects of a list of neurons, computed a chunk at a time on first use (the neurons of
    a layer finish in order, so each chunk is one batched pass through the unembedding)."""

    def __init__(self, model, neurons: list[NeuronId], chunk: int = 64):
        self.model, self.neurons, self.chunk = model, list(neurons), max(int(chunk), 1)
        self.at = {n: i for i, n in enumerate(self.neurons)}
        self.ready: dict[NeuronId, tuple[list, list]] = {}

    def __call__(self, neuron: NeuronId) -> tuple[list, list]:
        if neuron not in self.ready:
            if neuron not in self.at:
                return output_effects(self.model, neuron)
            start = self.at[neuron]
            todo = [n for n in self.neurons[start : start + self.chunk] if n not in self.ready]
            self.ready.update(zip(todo, output_effects_many(self.model, todo)))
        return self.ready.pop(neuron)


def describe(neuron: NeuronId, stats, fit, seconds: float, token_strings, effects, scan=None,
             excerpts=None) -> NeuronResult:
    """The storable record of one fit: display strings, output effects and, with the layer's ``scan``
    and the corpus ``excerpts``, the activation histogram and band examples (:mod:`n2g.profile`).
    Needs no model, so it can run in a worker process."""
    for e in fit.examples:
        e.tokens = token_strings(e.token_ids)
    promoted, suppressed = effects
    graph_stats = {}
    if fit.graph is not None:
        fit.graph.neuron = neuron
        fit.graph.set_token_text(token_strings)
        graph_stats = fit.graph.stats()
    result = NeuronResult(neuron=neuron, status=fit.status if fit.graph is not None else "dead", stats=stats,
                          scores=fit.scores, examples=fit.examples, promoted=promoted, suppressed=suppressed,
                          graph_stats=graph_stats, seconds=seconds, ablation=getattr(fit, "ablation", None) or {},
                          steering=getattr(fit, "steering", None) or {}, ceiling=getattr(fit, "ceiling", None) or {})
    if scan is not None and excerpts is not None:
        from .profile import attach_profile

        attach_profile(result, scan, excerpts, fit.graph, token_strings)
    return result


def to_result(model, neuron: NeuronId, stats, fit, seconds: float, scan=None, excerpts=None,
              effects=None) -> NeuronResult:
    """A storable record of one fit, with display strings and output-weight effects filled in
    (``effects``: already computed, e.g. by :class:`EffectsAhead`)."""
    effects = effects if effects is not None else output_effects(model, neuron)
    return describe(neuron, stats, fit, seconds, model.token_strings, effects, scan, excerpts)


def store_values(scan, neuron: NeuronId) -> tuple:
    """What a worker needs to read one neuron's stored activations: the store file's path (the
    worker reads the neuron's rows itself, so the main process reads nothing), or the values
    themselves when the store lives in memory; ``(None, None)`` without a store."""
    if scan.store is None:
        return None, None
    if scan.store.path is not None:
        return (str(scan.store.path), neuron.index, neuron.sign, int(scan.store.exponents[neuron.index])), scan.store.excerpts
    return scan.activations(neuron.index, neuron.sign), scan.store.excerpts


class _NeuronScan:
    """The part of a layer's scan one neuron's profile reads, small enough to send to a worker."""

    def __init__(self, values, excerpts):
        self.values, self.store = values, type("Stored", (), {"excerpts": excerpts})()

    def activations(self, index, sign):
        if isinstance(self.values, tuple):  # (store path, index, sign, exponent): read here, in the worker
            from .activations import ActivationStore, from_float16

            path, index, sign, exponent = self.values
            stores = _WORKER.setdefault("stores", {})
            if path not in stores:
                stores[path] = ActivationStore.open(Path(path), self.store.excerpts)
            values = from_float16(stores[path].values[index], exponent)
            return values if sign == Sign.POSITIVE else -values
        return self.values


_WORKER: dict = {}
"""Per worker process: the tokenizer's display strings and the corpus token ids (set once), and
the activation stores it has opened."""


def _worker_setup(vocab: list[str], excerpts) -> None:
    _WORKER["vocab"], _WORKER["excerpts"] = vocab, excerpts


def _describe_and_save(root: str, neuron: NeuronId, stats, fit, seconds, effects, values, stored) -> None:
    from .store import RunStore

    vocab = _WORKER["vocab"]
    token_strings = lambda ids: [vocab[int(t)] if 0 <= int(t) < len(vocab) else f"<{int(t)}>" for t in ids]
    scan = _NeuronScan(values, stored) if values is not None else None
    result = describe(neuron, stats, fit, seconds, token_strings, effects, scan, _WORKER["excerpts"])
    RunStore(root).save(result, fit.graph)


def summary_table(results: list[NeuronResult], unit: str = "neuron") -> str:
    """A one-screen text table: per neuron (``unit``: "latent" for an SAE's), F1 of n2g against the baselines and the
    token ceiling (the most a predictor keyed on tokens could score: :func:`n2g.distill.token_ceiling`)."""
    def fmt(v):
        return "  -  " if v is None else f"{v:5.2f}"

    lines = [f"{unit:<16}{'status':<8}{'n2g F1':>8}{'tok F1':>8}{'3gram F1':>9}{'max F1':>8}{'n2g r':>8}{'nodes':>7}{'fire%':>8}"]
    for r in results:
        s = r.scores
        f = lambda m, k="f1": getattr(s[m], k) if m in s else None
        nodes = r.graph_nodes
        status = r.status if r.status == "dead" or "n2g" not in s or s["n2g"].status == "ok" else "nofire"
        lines.append(f"{r.neuron.key:<16}{status:<8}{fmt(f('n2g')):>8}{fmt(f('token_lookup')):>8}{fmt(f('ngram')):>9}"
                     f"{fmt(r.ceiling.get('f1')):>8}{fmt(f('n2g', 'pearson')):>8}{nodes:>7}{100 * r.stats.firing_rate:>7.2f}%")
    scored = [r for r in results if "n2g" in r.scores and r.scores["n2g"].f1 is not None]
    if scored:
        mean = lambda m: float(np.mean([r.scores[m].f1 for r in scored if r.scores[m].f1 is not None]))
        ceilings = [r.ceiling["f1"] for r in scored if r.ceiling.get("f1") is not None]
        lines.append(f"{'mean (' + str(len(scored)) + ')':<24}{mean('n2g'):>8.2f}{mean('token_lookup'):>8.2f}{mean('ngram'):>9.2f}"
                     + (f"{float(np.mean(ceilings)):>8.2f}" if ceilings else f"{'  -  ':>8}"))
    return "\n".join(lines)
