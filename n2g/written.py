"""Model-written text: evidence for the tokens a small corpus is too small to show (issue 10).

A corpus of a few hundred excerpts shows most tokens once or never, so a graph cannot tell whether
such a token fires. The subject model can: it continues the openings of training excerpts (sampled,
seeded; :func:`write_excerpts`), and every written token that the training partition shows fewer
than ``max(min_count, 2)`` times (not among :func:`shown_tokens`) is measured at each wanted neuron in its written
context (:func:`measure`). Each neuron's graph then takes every occurrence of those that fire there
as single-token training evidence (:func:`n2g.distill.written_examples`): a rare token that fires in
the model's text gets a path, valued by all its written occurrences. Tokens the corpus shows often are
left to the corpus, rare ones that never fire to the background value, and the lookups and scores never
see written text.

The written token ids are cached per model, corpus and settings (the sampling is the costly part on a
CPU, about a forward pass per written token); the activations are measured in each run, like one more
scan of ``written`` excerpts.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .activations import from_float16, to_float16
from .fileio import remove_stale_temporaries, replacing
from .records import NeuronId, Sign

log = logging.getLogger(__name__)

WRITE_VERSION = 3
MAX_BYTES = 1 << 30
"""Most memory the written tokens' activations of one whole layer would take (16-bit, every neuron of it): the
excerpts measured depend on the model alone, never on how many of its neurons a run asks for, so a neuron fitted
alone, in a whole-model run or after a resume learns from the same written text."""
TOP_P = 0.95
FIRST_TOP = 512
"""Tokens :func:`nucleus_sample` looks at first; a row whose nucleus is wider is sorted whole."""
"""Nucleus sampling: the written text stays in the model's plausible range without being its greedy text."""


@dataclass
class WrittenTokens:
    """The rare tokens of the written excerpts and their raw activations at the neurons that asked."""

    ids: np.ndarray
    """``[P]`` token ids of the written positions kept (rare in the training partition, after the prompt)."""
    acts: dict[int, np.ndarray] = field(default_factory=dict)
    """Per layer ``[P, columns]`` raw activations (float16) of the neurons in ``columns``."""
    columns: dict[int, dict[int, int]] = field(default_factory=dict)
    """Per layer: neuron index -> column of ``acts``."""
    n_excerpts: int = 0
    """Written excerpts the positions come from."""
    exponents: dict[int, np.ndarray] = field(default_factory=dict)
    """Per layer ``[columns]``: column c holds ``activation * 2**-exponents[c]`` (the activation store's scaling,
    :func:`n2g.activations.store_exponents`, for a neuron beyond float16's range); absent: all 0."""

    def for_neuron(self, neuron: NeuronId, scale: float) -> tuple[np.ndarray, np.ndarray] | None:
        """``(ids, normalised activations)`` of the neuron's side (``scale``: its maximum there), or None."""
        column = self.columns.get(neuron.layer, {}).get(neuron.index)
        if column is None or not scale > 0 or not len(self.ids):
            return None
        exponents = self.exponents.get(neuron.layer)
        acts = from_float16(self.acts[neuron.layer][:, column], 0 if exponents is None else exponents[column])
        if neuron.sign == Sign.NEGATIVE:
            acts = -acts
        return self.ids, acts / np.float32(scale)


def openings(excerpts: np.ndarray, is_train: np.ndarray, n: int, prompt: int, seed: int) -> np.ndarray:
    """``[min(n, training excerpts), prompt]``: the first ``prompt`` tokens of a seeded choice of training excerpts."""
    train = np.flatnonzero(np.asarray(is_train, bool))
    if n <= 0 or not len(train) or excerpts.shape[1] <= prompt:
        return np.zeros((0, prompt), np.int64)
    pick = np.sort(np.random.default_rng(seed).permutation(train)[:n])
    return np.asarray(excerpts[pick, :prompt], np.int64)


def _language_model(model):
    """The Hugging Face causal LM behind ``model`` (an SAE's base model's), or None."""
    inner = getattr(model, "base", model)
    lm = getattr(inner, "model", None)
    return lm if callable(getattr(lm, "generate", None)) else None


def _eos(lm) -> int | None:
    eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = getattr(lm.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return int(eos) if eos is not None else None


def _not_text(model, lm) -> list[int]:
    """Ids the model may not write: special tokens and ids the tokenizer does not know (the corpus never
    shows them, and a graph should not learn them)."""
    inner = getattr(model, "base", model)
    vocab = int(getattr(model, "vocab_size", 0) or lm.config.vocab_size)
    if not hasattr(inner, "ordinary_tokens"):
        return []
    ordinary = inner.ordinary_tokens()
    allowed = torch.zeros(vocab, dtype=torch.bool)
    n = min(len(ordinary), vocab)
    allowed[:n] = ordinary[:n]
    return (~allowed).nonzero().flatten().tolist()


def nucleus_sample(scores: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """``[rows]`` token ids sampled from ``softmax(scores)`` cut to each row's nucleus (the fewest most
    likely tokens holding ``top_p`` of the probability, ties at the cut kept).

    What top-p sampling does, sorting only the rows whose nucleus is wider than the first
    :data:`FIRST_TOP` tokens (a ``topk`` finds the others'), then one draw per row by the inverse of the
    cumulative distribution. The draw comes from ``generator`` (on the CPU), so the same scores and seed
    give the same ids on any device and the global random state is left alone."""
    p = scores.float().softmax(-1)
    vocab = p.shape[-1]
    top = torch.topk(p, min(FIRST_TOP, vocab)).values
    mass = top.cumsum(-1)
    cut = (mass < top_p).sum(-1).clamp(max=top.shape[1] - 1)  # where each row's nucleus ends
    threshold = top.gather(1, cut[:, None])
    wide = (mass[:, -1] < top_p).nonzero().flatten()  # rows whose nucleus is wider: sorted whole
    if len(wide):
        full = torch.sort(p[wide], dim=-1, descending=True).values
        cut = (full.cumsum(-1) < top_p).sum(-1).clamp(max=vocab - 1)
        threshold[wide] = full.gather(1, cut[:, None])
    kept = torch.where(p >= threshold, p, torch.zeros((), dtype=p.dtype))
    cdf = kept.cumsum(-1)
    u = torch.rand(len(p), 1, generator=generator).to(p.device) * cdf[:, -1:]
    pick = torch.searchsorted(cdf, u, right=True).clamp(max=vocab - 1)
    outside = kept.gather(1, pick) <= 0  # rounding at the very end of a row: its most likely token instead
    if bool(outside.any()):
        pick = torch.where(outside, p.argmax(-1, keepdim=True), pick)
    return pick.squeeze(1)


def _sampler(top_p: float, seed: int):
    """A logits processor for greedy ``generate`` that leaves only the sampled token possible: the
    model's own loop and cache, this module's sampling (:func:`nucleus_sample`)."""
    from transformers import LogitsProcessor

    class NucleusSampler(LogitsProcessor):
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(int(seed))

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            pick = nucleus_sample(scores, top_p, self.generator)
            out = torch.full_like(scores, float("-inf"))
            return out.scatter_(1, pick[:, None], 0.0)

    return NucleusSampler()


def write_excerpts(model, prompts: np.ndarray, length: int, seed: int, batch: int = 64) -> np.ndarray:
    """``[len(prompts), length]`` token ids: each prompt continued by the model (sampled, seeded) to ``length``.

    The model writes whole excerpts of ordinary text: special tokens (its end of text among them) and ids
    its tokenizer does not know are never sampled. Sampling is top-p (:data:`TOP_P`) at temperature 1,
    drawn by :func:`nucleus_sample` (Hugging Face's own top-p sorts the vocabulary at every step: on a CPU
    that took 40 % of the writing)."""
    from transformers import GenerationConfig, LogitsProcessorList

    lm = _language_model(model)
    n, p = prompts.shape
    if lm is None or n == 0 or length <= p:
        return np.zeros((0, length), np.int64)
    bos = getattr(model, "bos_token_id", None)
    eos = _eos(lm)
    new = length - p
    suppress = _not_text(model, lm)
    config = GenerationConfig(do_sample=False, max_new_tokens=new, min_new_tokens=new, eos_token_id=eos,
                              pad_token_id=eos if eos is not None else 0, suppress_tokens=suppress or None)
    device = getattr(model, "device", torch.device("cpu"))
    out = []
    sampler = LogitsProcessorList([_sampler(TOP_P, seed)])
    with torch.inference_mode(), _quiet_transformers():
        for start in range(0, n, batch):
            rows = prompts[start:start + batch]
            ids = torch.as_tensor(rows, dtype=torch.long)
            if bos is not None:
                ids = torch.cat([torch.full((len(rows), 1), int(bos), dtype=torch.long), ids], dim=1)
            ids = ids.to(device)
            written = lm.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config,
                                  logits_processor=sampler)
            out.append(written[:, ids.shape[1]:].cpu().numpy()[:, :new])
    tails = np.concatenate(out)
    if tails.shape[1] < new:  # a model that stopped early anyway: pad with its own last token (never evidence)
        tails = np.concatenate([tails, np.repeat(tails[:, -1:], new - tails.shape[1], axis=1)], axis=1)
    return np.concatenate([prompts.astype(np.int64), tails.astype(np.int64)], axis=1)


@contextlib.contextmanager
def _quiet_transformers():
    """Generation's advice (padding side, flags a checkpoint's generation config sets) is not the user's business."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def shown_tokens(excerpts: np.ndarray, is_train: np.ndarray, min_count: int) -> np.ndarray:
    """Sorted ids of the tokens the training partition shows at least ``min_count`` times: the corpus
    values these itself, so written text is never evidence for them."""
    return _shown(np.asarray(excerpts)[np.asarray(is_train, bool)].ravel(), min_count)


def _shown(tokens: np.ndarray, min_count: int) -> np.ndarray:
    ids, counts = np.unique(tokens, return_counts=True)
    return ids[counts >= min_count]


def single_tokens(rows, acts, training, min_count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, activations)`` of every token of ``rows`` (with its activation in ``acts``) that the
    ``training`` rows show fewer than ``min_count`` times: the evidence :func:`measure` keeps, for text
    and activations at hand (:func:`n2g.distill.distill` with ``written=``)."""
    flat = np.concatenate([np.asarray(r, np.int64).ravel() for r in training]) if len(training) else np.zeros(0, np.int64)
    shown = _shown(flat, min_count)
    all_ids = np.concatenate([np.asarray(r, np.int64).ravel() for r in rows]) if len(rows) else np.zeros(0, np.int64)
    all_acts = np.concatenate([np.asarray(a, np.float32).ravel() for a in acts]) if len(acts) else np.zeros(0, np.float32)
    keep = ~np.isin(all_ids, shown)
    return all_ids[keep], all_acts[keep]


def measure(model, written: np.ndarray, prompt: int, common: np.ndarray, wanted: dict[int, list[int]],
            batch: int = 32, exponents: dict[int, np.ndarray] | None = None) -> WrittenTokens:
    """Raw activations of the neurons in ``wanted`` (layer -> indices) at every written token after the
    prompt that is not in ``common``: one pass over the written excerpts for all wanted layers. ``exponents``
    (layer -> ``[d_mlp]``, the activation store's) scale the neurons float16 would not hold as they are."""
    layers = sorted(wanted)
    columns = {l: {int(i): c for c, i in enumerate(sorted(set(wanted[l])))} for l in layers}
    scaled = {l: np.asarray(exponents[l], np.int32)[sorted(columns[l])] for l in layers if exponents and l in exponents}
    if not len(written) or not layers:
        return WrittenTokens(np.zeros(0, np.int64), {l: np.zeros((0, len(columns[l])), np.float16) for l in layers},
                             columns, len(written), scaled)
    width = int(getattr(model, "d_mlp", 0) or max(len(c) for c in columns.values()))  # the layer's, not the request's
    most = max(1, MAX_BYTES // max(1, 2 * width * written.shape[1]))
    if len(written) > most:  # a very wide layer (an SAE's): as many excerpts as fit the budget
        log.info("written text: measuring %d of %d excerpts (%d neurons a layer at %d bytes a token each)",
                 most, len(written), width, 2)
        written = written[:most]
    keep = ~np.isin(written, common)
    keep[:, :prompt] = False
    ids_out, acts_out = [], {l: [] for l in layers}
    cols = {l: torch.tensor(sorted(columns[l])) for l in layers}
    for start in range(0, len(written), batch):
        rows = torch.as_tensor(written[start:start + batch], dtype=torch.long)
        mask = keep[start:start + batch]
        if not mask.any():
            continue
        acts = model.layer_activations(rows, None, layers)
        for l in layers:  # on the model's device: only the kept cells of the wanted neurons travel
            a = acts[l][torch.as_tensor(mask, device=acts[l].device)]  # [kept positions, d_mlp]
            e = torch.from_numpy(scaled[l]) if l in scaled and scaled[l].any() else None
            acts_out[l].append(to_float16(a[:, cols[l].to(a.device)], e).cpu().numpy())
        ids_out.append(written[start:start + batch][mask])
    ids = np.concatenate(ids_out).astype(np.int64) if ids_out else np.zeros(0, np.int64)
    acts = {l: (np.concatenate(acts_out[l]) if acts_out[l] else np.zeros((0, len(columns[l])), np.float16)) for l in layers}
    return WrittenTokens(ids, acts, columns, len(written), scaled)


def _first(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _cache_path(cache_dir: Path, model, corpus_key: str, n: int, prompt: int, length: int, seed: int) -> Path:
    from .scan import _model_key

    key, label = _model_key(model)
    digest = hashlib.sha256(f"{key}|{corpus_key}|{n}|{prompt}|{length}|{seed}|{TOP_P}|v{WRITE_VERSION}".encode()).hexdigest()[:16]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)[:40]
    return Path(cache_dir) / "written" / f"{safe}-{digest}.npy"


def written_excerpts(model, excerpts: np.ndarray, is_train: np.ndarray, n: int, prompt: int, seed: int,
                     cache_dir: str | Path | None = None, corpus_key: str = "") -> np.ndarray:
    """The run's written excerpts, from the cache when an earlier run of the same model, corpus and
    settings wrote them (so an interrupted run resumes with the same text), else written now."""
    length = int(excerpts.shape[1])
    prompts = openings(excerpts, is_train, n, prompt, seed)
    if not len(prompts) or _language_model(model) is None:
        return np.zeros((0, length), np.int64)
    path = _cache_path(Path(cache_dir), model, corpus_key, n, prompt, length, seed) if cache_dir else None
    cached = _cached(path, prompts, length, getattr(model, "vocab_size", None))
    if cached is not None:
        return cached
    if path is None:
        return _write(model, prompts, length, seed)
    from .scan import _scan_lock

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot use the written-text cache in %s (%s); writing without it", path.parent, exc.strerror or exc)
        return _write(model, prompts, length, seed)
    with _scan_lock(path, None, "another n2g process is writing this run's text; waiting for it"):
        cached = _cached(path, prompts, length, getattr(model, "vocab_size", None))  # it may have been written while we waited
        if cached is not None:
            return cached
        written = _write(model, prompts, length, seed)
        if len(written):
            try:
                remove_stale_temporaries(path.parent)  # those of a writer killed mid-save (nothing else removes them)
                with replacing(path) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, written.astype(np.int32))
            except OSError as exc:
                log.warning("cannot save the written excerpts in %s (%s); going on without the cache", path.parent,
                            exc.strerror or exc)
    return written


def _cached(path: Path | None, prompts: np.ndarray, length: int, vocab_size: int | None = None) -> np.ndarray | None:
    """The cached written excerpts of these prompts, or None when there are none or they are not this module's:
    another shape or prompts, not integers, or ids beyond ``vocab_size`` (damaged; they are written again)."""
    if path is None or not path.is_file():
        return None
    try:
        cached = np.load(path, allow_pickle=False)
        if cached.shape == (len(prompts), length) and np.array_equal(cached[:, :prompts.shape[1]], prompts):
            if not (np.issubdtype(cached.dtype, np.integer) and (not cached.size or (
                    int(cached.min()) >= 0 and (vocab_size is None or int(cached.max()) < vocab_size)))):
                log.warning("ignoring damaged written-text cache %s (ids that are no tokens); writing it again", path)
                return None
            log.info("written excerpts loaded from cache %s", path)
            return cached.astype(np.int64)
    except (OSError, ValueError, EOFError) as exc:
        log.warning("ignoring unreadable written-text cache %s (%s)", path, exc)
    return None


def _write(model, prompts: np.ndarray, length: int, seed: int) -> np.ndarray:
    log.info("the model writes %d excerpts of %d tokens from training openings of %d", len(prompts), length,
             prompts.shape[1])
    try:
        return write_excerpts(model, prompts, length, seed)
    except (RuntimeError, ValueError, TypeError, AttributeError, NotImplementedError) as exc:
        log.warning("the model cannot write text (%s); fitting from the corpus alone", _first(exc))
        return np.zeros((0, length), np.int64)


def written_tokens(model, excerpts, is_train: np.ndarray, cfg, neurons: Iterable[NeuronId],
                   cache_dir: str | Path | None = None, corpus_key: str = "",
                   exponents: dict[int, np.ndarray] | None = None) -> WrittenTokens | None:
    """What ``cfg.written`` asks for ``neurons`` (each side of a neuron measured once), or None when it asks
    nothing; ``exponents``: the activation stores' (layer -> ``[d_mlp]``), for neurons float16 would not hold."""
    wanted: dict[int, list[int]] = {}
    for n in neurons:
        wanted.setdefault(n.layer, []).append(n.index)
    if not cfg.written or not wanted:
        return None
    rows = excerpts.numpy() if isinstance(excerpts, torch.Tensor) else np.asarray(excerpts)
    written = written_excerpts(model, rows, is_train, cfg.written, cfg.written_prompt, cfg.seed, cache_dir, corpus_key)
    common = shown_tokens(rows, is_train, max(cfg.min_count, 2))
    tokens = measure(model, written, cfg.written_prompt, common, wanted, exponents=exponents)
    log.info("written text: %d excerpts, %s tokens the training partition shows fewer than %d times",
             tokens.n_excerpts, f"{len(tokens.ids):,}", max(cfg.min_count, 2))
    return tokens
