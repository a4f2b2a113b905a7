"""The Python entry points: load a model and a corpus, fit one neuron, get a fitted model back.

>>> import n2g
>>> model = n2g.load_model()                       # the packaged SmolLM2-135M-Instruct   # doctest: +SKIP
>>> neuron = n2g.fit_neuron(model, layer=3, index=17)                                  # doctest: +SKIP
>>> print(neuron)               # scores and the graph's paths as text                  # doctest: +SKIP
>>> neuron.predict("def f(x): return x")   # predicted activation per token             # doctest: +SKIP

``fit_neuron`` does what ``n2g fit`` does for one neuron, in memory: the layer's scan is cached
under ``$N2G_CACHE`` exactly as the CLI caches it (a later call or CLI run on the same model and
corpus reuses it), the corpus is partitioned the same way, and the returned
:class:`~n2g.distill.NeuronModel` carries the graph with token text, the examples, the scores
against the baselines, the corpus statistics and the activation histogram.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from .config import PRESETS, preset as make_preset
from .corpus import Corpus
from .distill import NeuronModel
from .errors import N2GError, is_whole
from .features import as_numbers
from .models import SubjectModel
from .models import load_model as _load_model
from .records import NeuronId, Sign

log = logging.getLogger(__name__)


def load_model(spec: str = "default", device: str | None = None, dtype: str | None = None) -> SubjectModel:
    """A subject model: ``"default"`` (packaged SmolLM2), a ``.gguf`` file, a local HF directory or a hub id."""
    spec = _path_text(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise N2GError(f"model spec must be 'default', a .gguf file, a model directory or a hub id (got {spec!r})")
    return _load_model(spec, device=device, dtype=dtype)


def _path_text(value):
    """A ``pathlib.Path`` (any ``os.PathLike``) as the string it stands for; anything else unchanged."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _model(model) -> SubjectModel:
    from .sae import SAEModel

    if isinstance(model, (SubjectModel, SAEModel)):  # an SAE over a model: its latents stand in for the neurons
        return model
    model = _path_text(model)
    if isinstance(model, str):
        return load_model(model)
    raise N2GError(f"model must be an n2g.load_model(...) result or a model spec string (got {type(model).__name__}); "
                   "e.g. n2g.fit_neuron(n2g.load_model(), layer=3, index=17)")


def load_corpus(source: str = "default", model=None, *, length: int = 64, max_excerpts: int | None = None,
                text_field: str = "text") -> Corpus:
    """Token excerpts cut from ``source`` with ``model``'s tokenizer.

    ``source``: ``"default"`` (the offline Python docs), a text or JSONL file, a directory of them,
    or ``hf:NAME[:CONFIG]`` (needs the ``datasets`` package). ``model``: the subject model (or its
    spec) whose tokenizer cuts the text; the default model when omitted.
    """
    source = _path_text(source)
    if not isinstance(source, str) or not source.strip():
        raise N2GError(f"source must be text: 'default', a file or directory path, or hf:NAME (got {source!r})")
    if not is_whole(length) or length < 1:  # one token is a lookup of single tokens, as `--excerpt-length 1` gives
        raise N2GError(f"length must be an integer of at least 1 token (got {length!r})")
    if not isinstance(text_field, str):
        raise N2GError(f"text_field must be the name of the field holding the text (got {text_field!r})")
    max_excerpts = _max_excerpts(max_excerpts)
    m = _model("default" if model is None else model)
    return Corpus.build(source, m.encode, length=int(length), max_excerpts=max_excerpts, text_field=text_field)


def _max_excerpts(value) -> int | None:
    """``max_excerpts`` as an int (a NumPy integer too) or None, or an N2GError."""
    if value is not None and (not is_whole(value) or value < 1):
        raise N2GError(f"max_excerpts must be a positive integer or None (got {value!r})")
    return None if value is None else int(value)


def _corpus(corpus, model: SubjectModel, max_excerpts: int | None) -> Corpus:
    max_excerpts = _max_excerpts(max_excerpts)
    corpus = _path_text(corpus)
    if corpus is None or isinstance(corpus, str):
        return load_corpus("default" if corpus is None else corpus, model, max_excerpts=max_excerpts)
    if isinstance(corpus, Corpus):
        _check_token_ids(corpus, model)
        if max_excerpts is not None and max_excerpts < len(corpus):
            return Corpus(corpus.source, corpus.length, corpus.excerpts[:max_excerpts])
        return corpus
    raise N2GError(f"corpus must be None, a source string or path, or an n2g.load_corpus(...) result (got {type(corpus).__name__})")


def _check_token_ids(corpus: Corpus, model: SubjectModel) -> None:
    """N2GError unless ``corpus`` holds ``[n, length]`` integer token ids of ``model``'s vocabulary: a corpus
    cut with another model's tokenizer made the embedding lookup fail with an IndexError."""
    ex = corpus.excerpts
    if not isinstance(ex, torch.Tensor) or ex.ndim != 2 or ex.dtype.is_floating_point or ex.dtype.is_complex \
            or ex.dtype == torch.bool:
        raise N2GError("the corpus's excerpts must be a [n_excerpts, length] tensor of integer token ids; "
                       "make the corpus with n2g.load_corpus(source, model)")
    if ex.numel() and (int(ex.min()) < 0 or int(ex.max()) >= model.vocab_size):
        bad = int(ex.min()) if int(ex.min()) < 0 else int(ex.max())
        raise N2GError(f"the corpus holds token id {bad}, which is not in this model's vocabulary of "
                       f"{model.vocab_size} tokens (ids 0 to {model.vocab_size - 1}); cut the corpus with this "
                       "model's tokenizer: n2g.load_corpus(source, model)")


def fit_neuron(model, layer: int, index: int, corpus=None, preset: str = "default", max_excerpts: int | None = None,
               sign: str = "positive", *, progress: bool = True, store_tokens: int | None = None,
               **overrides) -> NeuronModel:
    """Distil neuron ``(layer, index)`` of ``model`` and return the fitted :class:`~n2g.distill.NeuronModel`.

    ``corpus``: None (the default corpus), a source string, or a :class:`~n2g.corpus.Corpus` from
    :func:`load_corpus`. ``preset``: ``"default"`` or ``"paper"``; ``overrides`` change single
    settings (e.g. ``augment=True``). ``sign``: ``"positive"`` or ``"negative"`` (the negative side
    of a gated neuron). The result predicts on the neuron's raw scale; ``predict`` accepts text.
    ``store_tokens``: the activation store's token budget (``n2g fit --store-tokens``; default 131,072),
    smaller for a very wide layer whose store would not fit the disk or memory.
    """
    from .activations import DEFAULT_STORE_TOKENS, partition
    from .distill import pool_size, top_k
    from .engine import device_budget, fit_many, store_job
    from .features import NeuronFeature
    from .models import cache_dir
    from .pipeline import to_result
    from .scan import scan_layers

    if not isinstance(preset, str) or preset not in PRESETS:
        raise N2GError(f"unknown preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}")
    if sign not in ("positive", "negative"):
        raise N2GError(f"sign must be 'positive' or 'negative' (got {sign!r}); for both sides call fit_neuron twice")
    for what, value in (("layer", layer), ("index", index)):
        if not is_whole(value):
            raise N2GError(f"{what} must be an integer (got {value!r})")
    layer, index = int(layer), int(index)  # a NumPy integer is the int it equals
    if store_tokens is not None and (not is_whole(store_tokens) or store_tokens < 1):
        raise N2GError(f"store_tokens must be a whole number of at least 1 (got {store_tokens!r})")
    cfg = make_preset(preset, **overrides)  # an unknown or ill-typed setting: N2GError
    m = _model(model)
    m.check_neuron(layer, index)
    corp = _corpus(corpus, m, max_excerpts)
    from .models import check_excerpt_length

    check_excerpt_length(m, int(corp.excerpts.shape[1]))
    started = time.perf_counter()
    neuron = NeuronId(layer, index, Sign(sign))
    _, scan_batch = device_budget(m, int(corp.excerpts.shape[1]))  # as `n2g fit` sizes it (a wide SAE: fewer)
    scans = scan_layers(m, corp.excerpts, [layer], k=top_k(cfg), pool_size=pool_size(cfg), seed=cfg.seed,
                        batch_size=scan_batch,
                        fire_threshold=cfg.fire_threshold, cache_dir=cache_dir(), corpus_key=corp.tokens_key(),
                        progress=progress,
                        store_tokens=DEFAULT_STORE_TOKENS if store_tokens is None else int(store_tokens))
    scan = scans[layer]
    is_train = partition(len(corp), cfg.held_out, cfg.seed, corp.excerpts)
    excerpts = corp.rows()
    from .vocabulary import model_evidence

    written = model_evidence(m, corp.excerpts, is_train, cfg, [neuron], scans, cache_dir(), corp.tokens_key(),
                             progress=progress)
    fit = fit_many(m, excerpts, [store_job(scan, neuron, is_train, written)], cfg, group_size=1)[neuron]
    result = to_result(m, neuron, scan.stats(index, neuron.sign), fit, time.perf_counter() - started,
                       scan=scan, excerpts=excerpts)
    scale = result.stats.max_activation
    from .published import for_model

    # the settings as the fit used them (paper: occlusion by '"', sentence ends), so a later fit(...) uses them too
    out = NeuronModel(NeuronFeature(m, layer, index), for_model(cfg, m), scale=scale if scale > 0 else 1.0,
                      sign=1.0 if neuron.sign == Sign.POSITIVE else -1.0, occlusion_token_id=int(m.occlusion_token_id),
                      name=neuron.key, encode=m.encode, token_strings=m.token_strings, vocab_size=int(m.vocab_size))
    from .graph import NeuronGraph

    out.graph_ = fit.graph if fit.graph is not None else NeuronGraph(cfg.end_activation, cfg.match, cfg.fire_threshold)
    out.graph_.neuron = neuron
    out.examples_, out.scores_, out.trace_, out.ceiling_ = fit.examples, fit.scores, fit.trace, fit.ceiling or {}
    out.stats_, out.status_, out.result_, out.neuron_ = result.stats, result.status, result, neuron
    return out


def load_neuron(run, key: str, model=None) -> NeuronModel:
    """A neuron of a run (the folder ``n2g run`` or ``n2g fit`` wrote) as the fitted :class:`~n2g.distill.NeuronModel`
    its fit made: the saved graph, examples, scores and stats, predicting on the neuron's raw scale.

    ``key``: ``"L5.N2"``, or ``"L5.N2.neg"`` for a negative side. ``model`` (optional): the run's subject model (an
    :func:`load_model` result or its spec, e.g. ``"default"``), so that ``fit`` can run again; without it ``predict``
    reads text with the tokenizer the run saved (``RUN/tokenizer.json``), or takes token ids where the run has none. A
    model of another shape than the run's is refused.
    """
    from .config import DistillConfig
    from .features import NeuronFeature
    from .graph import NeuronGraph
    from .published import for_model
    from .report import read_run_json
    from .store import RunStore

    run = _path_text(run)
    if not isinstance(run, str):
        raise N2GError(f"run must be the path of a run folder (got {type(run).__name__})")
    run_dir = Path(run)
    if not (run_dir / "run.json").exists():
        raise N2GError(f"{run} is not an n2g run directory (no run.json); pass the folder `n2g run` or `n2g fit` wrote")
    info, problem = read_run_json(run_dir)
    try:
        neuron = NeuronId.from_key(key)
    except ValueError as exc:
        raise N2GError(str(exc)) from None
    result = RunStore(run_dir).load_result(neuron, then="it is not loaded")
    if result is None:
        graph_file = run_dir / "neurons" / neuron.key / "graph.json"
        if graph_file.is_file():  # a graph it cannot read says why (one a newer n2g wrote: upgrade), not "fit it again"
            NeuronGraph.load(graph_file)
        raise N2GError(f"{run} holds no readable result for {neuron.key}; fit it there with `n2g run --layers "
                       f"{neuron.layer} --neurons {neuron.index}{' --sign negative' if neuron.sign == Sign.NEGATIVE else ''} "
                       f"--out {run}` (the run's other options)")
    made_with = (info or {}).get("model") if isinstance((info or {}).get("model"), dict) else {}
    try:
        cfg = DistillConfig.from_dict(((info or {}).get("identity") or {}).get("config"))
    except (N2GError, TypeError, AttributeError):
        log.warning("%s: the run's settings cannot be read (%s); the default preset's stand in for them",
                    run_dir / "run.json", problem or "no config recorded")
        cfg = make_preset("default")
    m = None
    if model is not None:
        m = _model(model)
        if bool(made_with.get("sae")) != hasattr(m, "encode_latents"):
            raise N2GError(f"{run} holds SAE latents; pass its SAE over the model, n2g.sae.load_sae(SAE_PATH, model), or no "
                           "model" if made_with.get("sae") else f"{run} holds the model's neurons, not an SAE's latents; "
                           "pass the model itself, or no model")
        from .models import shape_differences

        differ = shape_differences(made_with, m)
        if differ:
            raise N2GError(f"{run} was made with another model ({'; '.join(differ)}); pass the run's own model "
                           f"({made_with.get('spec')!r}) or none")
        m.check_neuron(neuron.layer, neuron.index)
    encode, token_strings = (m.encode, m.token_strings) if m is not None else (None, None)
    if m is None:  # text is read with the tokenizer the run saved, where it has one (read when first used)
        from . import tokenizer

        if os.path.lexists(run_dir / tokenizer.NAME):
            saved = tokenizer.SavedTokenizer(run_dir)
            encode, token_strings = saved.encode, saved.token_strings
    scale = result.stats.max_activation
    vocab = m.vocab_size if m is not None else made_with.get("vocab_size")
    out = NeuronModel(NeuronFeature(m, neuron.layer, neuron.index) if m is not None else None,
                      for_model(cfg, m) if m is not None else cfg, scale=scale if scale > 0 else 1.0,
                      sign=1.0 if neuron.sign == Sign.POSITIVE else -1.0,
                      occlusion_token_id=int(m.occlusion_token_id) if m is not None else 0, name=neuron.key,
                      encode=encode, token_strings=token_strings,
                      vocab_size=int(vocab) if is_whole(vocab) and int(vocab) > 0 else None)
    if result.status == "dead":
        out.graph_ = NeuronGraph(cfg.end_activation, cfg.match, cfg.fire_threshold)
    else:
        out.graph_ = NeuronGraph.load(run_dir / "neurons" / neuron.key / "graph.json")
    out.graph_.neuron = neuron
    out.examples_, out.scores_, out.ceiling_ = result.examples, result.scores, dict(result.ceiling or {})
    out.stats_, out.status_, out.result_, out.neuron_ = result.stats, result.status, result, neuron
    return out


def feature_from_hook(run_with_hook, name: str = "hooked feature"):
    """A feature (token ids ``[batch, pos]`` -> activations ``[batch, pos]``) from any model call.

    ``run_with_hook(token_ids)`` runs your model and returns the ``[batch, pos]`` values of the unit
    you care about, captured however your library captures them (a TransformerLens hook, an nnsight
    trace, a plain forward hook). The result can be passed to :func:`n2g.distill`. See the README
    for TransformerLens and nnsight examples.
    """
    if not callable(run_with_hook):
        raise N2GError("feature_from_hook needs a callable: token ids [batch, pos] -> values [batch, pos]")
    if not isinstance(name, str):
        raise N2GError(f"name must be text, the feature's name in messages (got {type(name).__name__})")

    def feature(token_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = as_numbers(run_with_hook(token_ids), f"{name}: run_with_hook",
                             "return the [batch, pos] values as a tensor or array")
            return out.detach().float().cpu()

    feature.__name__ = name
    return feature
