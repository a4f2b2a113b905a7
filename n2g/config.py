"""Distillation settings and the named presets.

``paper`` reproduces the defaults of the published Neuron to Graph method (README.md, "Presets";
every difference in evaluation/results/paper_vs_published.md); ``default`` is the best configuration measured on SmolLM2 by
``evaluation/fidelity.py``. A config is a small dataclass whose ``__post_init__`` rejects bad
values with :class:`~n2g.errors.N2GError`, so the CLI can build one straight from user input.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

from .errors import N2GError


MAX_TOKEN_IDS = 1 << 20
"""Most ids a token-id setting (``sentence_end_ids``) may hold: more than the largest vocabularies."""
MAX_RUN_REACH = 1 << 16
"""Most positions back a run question (``run_window``, ``run_max``) may reach: arrays of that many lags are
built per occurrence, and no excerpt is that long."""
SUBSTITUTE_SOURCES = ("model", "embedding")
"""Substitute sources a config can name (``DistillConfig.substitute_source``; :func:`n2g.augment.make_substitutes`)."""


@dataclass
class DistillConfig:
    """Every knob of the distiller; README.md ("How it learns", "Presets") says what each step does."""

    n_top: int = 20
    """Top-activating excerpts split between train and test (half each)."""
    n_extra_train: int = 0
    """Further top excerpts (ranks after ``n_top``) added to training only; the test split is unchanged."""
    n_random_test: int = 10
    """Random excerpts added to the test split so false positives are measured."""
    n_random_train: int = 0
    """Random excerpts added to training (used by END calibration and the baselines)."""
    seed: int = 0
    """Seed of the train/test split and the random excerpt choice."""
    fire_threshold: float = 0.5
    """Normalised activation at or above which a token fires."""
    prune_threshold: float = 0.5
    """A pruned prefix must keep this fraction of the pivot's original activation."""
    max_context: int = 30
    """Most context tokens (before the pivot) considered by pruning."""
    importance_threshold: float = 0.75
    """Context tokens at least this important for a firing token enter the graph; others are wildcards."""
    prune_search: str = "exhaustive"
    """``exhaustive`` tries every context length (published); ``coarse`` tries 0,1,2,4,8,16,30 then the gap below the first that holds."""
    n_prune: int | None = None
    """Training top excerpts (best first) that are pruned and occluded to build paths; the rest only calibrate. None: all."""
    prune_quiet: bool = False
    """Also prune training top excerpts whose maximum is above 0 but below ``fire_threshold`` (published:
    every training snippet is pruned; rescaling can then lift its post-pivot tokens into paths)."""
    max_pivots: int = 1
    """Firing positions per training example pruned as pivots (1: only the maximum, as published)."""
    pivot_activation: str = "pruned"
    """END value of a pruned pivot: as measured on the ``pruned`` window (published) or in the ``original`` excerpt."""
    augment: bool = False
    """Make variants of important tokens (the published method can; its SmolLM2 run had it off)."""
    augment_threshold: float = 0.8
    """Importance for the pivot above which a token gets variants."""
    augment_positions: str = "important"
    """Tokens that get variants: every ``important`` one (importance for the pivot at least
    ``augment_threshold``, published), or the ``activator`` (the pivot) alone."""
    n_variants: int = 5
    """Most variants per important token."""
    variant_importance: str = "measured"
    """Importance matrix of a variant that fires: ``measured`` by occluding every token of the variant
    (published), or the ``source`` example's own (a variant differs from it in one token; no occlusion run)."""
    variant_evidence: str = "all"
    """Variants that calibrate END values beside the training tokens: ``all`` (those that stop firing
    teach which substitutes are not allowed), only the ``firing`` ones, or ``none`` (variants only add paths)."""
    novel_variants: bool = False
    """Keep only variants whose substitute is rarer than ``min_count`` in the training evidence: the
    corpus already values every token it shows often enough."""
    n_candidates: int = 30
    """Substitute candidates asked from the substitute source (word shape kept) before ``novel_variants``
    drops the common ones and ``n_variants`` are kept."""
    variant_once: bool = False
    """Measure each (token, substitute) pair once, in the best pruned window that proposes it; later
    windows with the same token skip that substitute (published: every window's variants are measured)."""
    substitute_source: str = "model"
    """Where substitutes come from when the run names none: ``model``, the subject model's next-token
    guesses at the position (a whole-model pass per window), or ``embedding``, the tokens whose input
    embeddings are nearest the substituted token's (no forward pass). The CLI's ``--substitutes mlm:NAME``
    asks a masked LM instead."""
    end_activation: str = "first"
    """How an END node's activation is set: ``first`` path inserted (published), ``mean`` or ``max``."""
    calibrate: bool = False
    """Re-estimate every END's activation as the mean true activation of the training tokens that reach it."""
    backoff: bool = False
    """Calibration sets every matched node, so unmatched context backs off to the shorter match."""
    end_statistic: str = "mean"
    """Calibrated END value: ``mean`` of the training activations reaching it, a quantile like ``"0.7"``,
    or ``auto``: the quantile with the best firing F1 on the training tokens, chosen per neuron."""
    cover: bool = False
    """Every token that fires in training and starts no path gets a one-token path (calibration then decides)."""
    subtree: bool = False
    """Backoff calibration values a node that too few tokens stop at from all tokens matched through it."""
    cover_context: int = 0
    """With ``cover``: after calibration, every firing training token the graph still predicts quiet gets a path
    through the N tokens before it (0: none), as a backoff n-gram lookup would hold; calibration and pruning
    then keep what changes predictions."""
    out_of_sample: bool = False
    """Score the ``auto`` choice out of sample: each training token is matched as if the paths its own
    excerpt made were not in the graph (leave one excerpt out), as a token of unseen text would be."""
    min_count: int = 1
    """Training tokens a node needs before backoff calibration gives it a value."""
    match: str = "greedy"
    """``greedy`` (exact child before wildcard, published) or ``search`` (try both, keep the deepest END)."""
    held_out: float = 0.5
    """Fraction of the corpus's excerpts held out for testing (one seeded partition per run)."""
    evidence: str = "examples"
    """Training tokens that calibrate the graph: the training ``examples`` only (published) or the whole
    training ``partition`` kept by the scan's activation store."""
    grow: bool = False
    """Grow context branches from every training occurrence of the graph's tokens (see :mod:`n2g.grow`),
    then drop branches that do not change a prediction on training data."""
    grow_depth: int = 2
    """Exact context positions a grown branch may reach back."""
    set_cost: float = 2.0
    """G a grown set question ("one of S") pays per member past the first: a set picked for being pure is not free."""
    grow_gaps: bool = False
    """Growing may also ask about positions a branch skips: a token further back than the next position,
    with wildcards between ("X fires unless the token two before it is one of S"), and the token a proposed
    branch's wildcard stands for ("Y * X fires, but not Y Z X"), which becomes an exact sibling branch."""
    context_activators: bool = False
    """Growing may add rules with no activating token, "any token fires when the token d back is Y"
    (or, for a neuron the graph says fires nearly everywhere, "any token is quiet when ...")
    (d up to ``grow_depth``), under a wildcard activator drawn as ``[*]``; an exact activator's match wins ties.
    Only ``match="search"`` follows them (greedy matching, as published, starts at the token's own activator)."""
    clean_gain: float = 0.0
    """A grown question below ``min_gain`` is still taken when it splits cleanly: all fire on one side,
    none on the other, at least 3 distinct occurrences each (repeated text counts once), and the split
    explains the activations' variance with a Gaussian likelihood ratio of at least this (0: never).
    Deterministic rules are then learned from a few occurrences."""
    grow_below: bool = False
    """Also grow a branch that pruning or occlusion proposed further back (up to ``grow_depth``
    positions), from the training occurrences it explains, so "X after Y, unless Z before Y" is
    learned when "Y [X]" was proposed (without it only the activator itself is grown)."""
    value_gain: float = 0.0
    """Where every training occurrence of a grown branch fires, a context token that makes the
    activation clearly stronger or weaker still becomes a branch ("X at 1.0 after Y Y, at 0.6 after Y"):
    Gaussian likelihood ratio of the split at least this, means at least 0.2 apart, 3 distinct
    occurrences each side (0: never). Such a branch stays while its value differs by 0.2."""
    join_depths: bool = False
    """Where branches of an activator X show a context token Y at two or more distances, and every
    training occurrence of X with Y within the largest of them fires (or none does), a wildcard run
    "Y within D before X" joins them (see :meth:`n2g.grow.Grower._join_depths`)."""
    run_window: int = 3
    """Grown wildcard runs match a token anywhere in this many positions back (1: no runs)."""
    run_max: int = 0
    """Wider runs are asked too, doubling from ``run_window`` up to this many positions back ("Y within
    6", 12, ... before X), each doubling charged ``run_cost`` of G (0: only ``run_window``). With
    ``join_depths``, a joined run reaches as far back as the agreeing training occurrences show Y, up
    to the narrowest such span covering that, and short of the first occurrence that disagrees."""
    run_cost: float = 2.0
    """G a grown run pays per doubling of its reach past ``run_window``."""
    start_node: bool = False
    """Growing and context rules may also ask "is the position d back the start of the text" (a start node,
    drawn ``⟨start⟩``, matched where a walk steps back past the text's first token), so "X fires only as
    the text's first token", "X within 2 tokens of the start" and "any token at the start" are expressible.
    Each training excerpt starts a text (the model sees BOS and nothing else before it); single-token
    evidence (written text, the vocabulary in context) does not."""
    min_gain: float = 10.0
    """Least likelihood-ratio (G) statistic of a grown branch's split (10: p of about 0.002 by chance)."""
    choose_on: str = "evidence"
    """Training tokens whose F1 picks the ``auto`` quantile: all calibration ``evidence``, or a ``split``-shaped
    mix (the best ceil(n_top/2) training top excerpts and n_random_test training random excerpts, as the test split)."""
    end_value: str = "quantile"
    """With ``end_statistic="auto"``: store the chosen ``quantile``, or the ``mean`` kept on the quantile's side of the threshold."""
    quiet_tokens: int = 0
    """Up to this many tokens that never fire in training but whose mean training activation stands
    out from the typical token's are added as activators holding that (sub-threshold, possibly
    negative) mean, those that explain most variance first: firing predictions do not change,
    graded ones (Pearson) improve (:func:`n2g.distill.add_quiet_tokens`)."""
    background: bool = False
    """Tokens no path matches are predicted at the mean training activation of such tokens (an END on
    the wildcard activator alone, drawn ``[*]``), not 0, when that mean is below ``fire_threshold``."""
    background_tokens: bool = False
    """With ``background``: each token seen at least ``max(min_count, 2)`` times where no path matches
    it, never firing there, gets its own mean there as its background value (``NeuronGraph.token_values``,
    not trie nodes); a token no path matches is predicted at it, else at the background value. Firing
    predictions do not change; graded ones (Pearson) do, as a lookup's would."""
    dense: bool = False
    """With ``cover``: a neuron for which at least half of the training tokens fire gets the wildcard
    activator ``[*]`` (any token fires, calibration values it) and, instead of a path for every firing
    token, a path for every token seen ``min_count`` times that mostly does not fire: its exceptions.
    Growing, context rules ("any token after Y is quiet") and pruning work on these as on any graph, so
    "every token but ..." is a few nodes that also hold for tokens training never showed."""
    written: int = 0
    """Excerpts the subject model writes, each continuing the opening of a training excerpt (sampled,
    seeded; at most one per training excerpt; 0: none). Each written token that the training partition
    shows fewer than ``max(min_count, 2)`` times and that fires somewhere in the written text joins the
    graph's training evidence as a single token with its measured activation (every occurrence), so the
    graph learns tokens the corpus is too small to show (:mod:`n2g.written`). Lookups and scores still see
    the corpus only."""
    written_prompt: int = 8
    """Tokens of a training excerpt's opening that prompt a written excerpt (never evidence themselves)."""
    vocabulary: int = 0
    """Contexts after which the subject model is read at every ordinary token that the training partition
    shows fewer than ``max(min_count, 2)`` times (0: none). A token that fires at a neuron after any of them
    joins that neuron's training evidence as a single token, once per context with its measured activation,
    like written text's (:mod:`n2g.vocabulary`): the graph can then fire on tokens the corpus never shows.
    Lookups and scores still see the corpus only."""
    vocabulary_context: int = 15
    """Tokens in each context of ``vocabulary``, cut at seeded places from distinct training excerpts."""
    vocabulary_most: int = 256
    """Most tokens of the vocabulary in context one neuron's graph takes (those with the highest mean
    activation over the contexts), so a neuron that fires on thousands of tokens keeps a readable graph."""
    batch_tokens: int = 16384
    """Padded tokens per forward batch (rows x length)."""
    # -- the published implementation (albertsgarde/Neuron2Graph); see evaluation/results/paper_vs_published.md
    rescale_pruned: bool = False
    """Record every activation of a pruned example (context, pivot, post tokens, variants) times
    ``original pivot activation / window maximum``, rounded to 3 decimals (published), so the pivot keeps
    its activation in the whole excerpt."""
    prune_windows: str = "search"
    """``search``: windows from ``prune_search``, the shortest whose pivot keeps ``prune_threshold`` of its
    activation; ``published``: windows of 5, 10, ..., ``max_context`` tokens counting BOS (plus the whole
    prefix when shorter), shortest first, accepted only when the pivot is the window's maximum and keeps
    strictly more than ``prune_threshold``; else the longest if anything in it is active, else no example."""
    merge_wildcards: bool = False
    """After the paths are in, copy the branches of a wildcard's exact siblings under the wildcard and
    drop the siblings without an END (:meth:`~n2g.graph.NeuronGraph.merge_wildcards`, published)."""
    post_context: int = 0
    """Tokens after the pivot kept in a pruned example (published: 5), up to the end of the pivot's sentence;
    they make their own paths when they fire."""
    sentence_end_ids: tuple[int, ...] | None = None
    """Token ids that end a sentence for ``post_context``. None: derived by the caller that knows the
    tokenizer (``n2g.published.for_model``: tokens whose text contains ``.``, ``!`` or a newline, as
    published); with no model (``n2g.distill``) none are known and only ``post_context`` bounds the tail."""
    strict: bool = False
    """Published comparisons when building paths: a position makes a path only if its activation is
    strictly above ``fire_threshold``, a context token is kept only if its importance is strictly above
    ``importance_threshold`` (scoring still fires at ``>=``)."""
    occlusion_text: str | None = None
    """Text whose single token occludes for importance (published GPT-2 id 1 is ``"``; for SmolLM2 ``"``
    is id 18), resolved by the caller that knows the tokenizer (``n2g.published.for_model``). None or not one
    token: the model's default occlusion token."""
    occlusion_token_id: int | None = None
    """An explicit occlusion token id for importance (overrides ``occlusion_text`` and the model's default)."""

    def __post_init__(self) -> None:
        self._check_types()
        for name in ("n_top", "n_variants", "n_candidates", "batch_tokens", "max_pivots", "grow_depth", "run_window",
                     "written_prompt", "vocabulary_context", "vocabulary_most"):
            if getattr(self, name) < 1:
                raise N2GError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_prune is not None and self.n_prune < 1:
            raise N2GError(f"n_prune must be at least 1 or None (got {self.n_prune})")
        for name in ("clean_gain", "value_gain"):
            if getattr(self, name) < 0:
                raise N2GError(f"{name} must be 0 (never) or more (got {getattr(self, name)})")
        for name in ("n_extra_train", "n_random_test", "n_random_train", "max_context", "cover_context", "run_max", "run_cost",
                     "written", "vocabulary", "seed", "min_count", "quiet_tokens", "min_gain", "set_cost"):
            if getattr(self, name) < 0:
                raise N2GError(f"{name} must be 0 or more (got {getattr(self, name)})")
        # a graph's depth: see graph.MAX_GRAPH_DEPTH; a run's reach: positions back, and no excerpt is longer
        for name, most in (("max_context", 256), ("grow_depth", 64), ("run_window", MAX_RUN_REACH),
                           ("run_max", MAX_RUN_REACH)):
            if getattr(self, name) > most:
                raise N2GError(f"{name} must be at most {most} (got {getattr(self, name)})")
        for name in ("fire_threshold", "prune_threshold", "importance_threshold", "augment_threshold"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise N2GError(f"{name} must be in (0, 1] (got {value})")
        if self.end_activation not in ("first", "mean", "max"):
            raise N2GError(f"end_activation must be first, mean or max (got {self.end_activation!r})")
        if self.prune_search not in ("exhaustive", "coarse"):
            raise N2GError(f"prune_search must be exhaustive or coarse (got {self.prune_search!r})")
        if self.pivot_activation not in ("pruned", "original"):
            raise N2GError(f"pivot_activation must be pruned or original (got {self.pivot_activation!r})")
        if self.end_statistic not in ("mean", "auto"):
            try:
                q = float(self.end_statistic)
            except ValueError:
                q = -1.0
            if not 0.0 <= q <= 1.0:
                raise N2GError(f"end_statistic must be mean, auto or a quantile in [0, 1] (got {self.end_statistic!r})")
        if not 0.0 < self.held_out < 1.0:
            raise N2GError(f"held_out must be between 0 and 1 (got {self.held_out})")
        if self.evidence not in ("examples", "partition"):
            raise N2GError(f"evidence must be examples or partition (got {self.evidence!r})")
        if self.choose_on not in ("evidence", "split"):
            raise N2GError(f"choose_on must be evidence or split (got {self.choose_on!r})")
        if self.end_value not in ("quantile", "mean"):
            raise N2GError(f"end_value must be quantile or mean (got {self.end_value!r})")
        if self.variant_importance not in ("measured", "source"):
            raise N2GError(f"variant_importance must be measured or source (got {self.variant_importance!r})")
        if self.substitute_source not in SUBSTITUTE_SOURCES:
            raise N2GError(f"substitute_source must be {' or '.join(SUBSTITUTE_SOURCES)} (got {self.substitute_source!r})")
        if self.augment_positions not in ("important", "activator"):
            raise N2GError(f"augment_positions must be important or activator (got {self.augment_positions!r})")
        if self.variant_evidence not in ("all", "firing", "none"):
            raise N2GError(f"variant_evidence must be all, firing or none (got {self.variant_evidence!r})")
        if self.match not in ("greedy", "search"):
            raise N2GError(f"match must be greedy or search (got {self.match!r})")
        if self.prune_windows not in ("search", "published"):
            raise N2GError(f"prune_windows must be search or published (got {self.prune_windows!r})")
        if self.post_context < 0:
            raise N2GError(f"post_context must be 0 or more (got {self.post_context})")
        if self.sentence_end_ids is not None:
            self.sentence_end_ids = self._token_ids("sentence_end_ids", self.sentence_end_ids)
        if self.occlusion_text is not None and (not isinstance(self.occlusion_text, str) or not self.occlusion_text):
            raise N2GError(f"occlusion_text must be a non-empty string or None (got {self.occlusion_text!r})")
        if self.occlusion_token_id is not None and (isinstance(self.occlusion_token_id, bool)
                                                    or not isinstance(self.occlusion_token_id, int)
                                                    or self.occlusion_token_id < 0):
            raise N2GError(f"occlusion_token_id must be a token id of 0 or more or None (got {self.occlusion_token_id!r})")

    @staticmethod
    def _token_ids(name: str, ids) -> tuple[int, ...]:
        """``ids`` as a sorted tuple of distinct token ids; counted before anything is built from them, so
        ``range(10**9)`` is refused at once rather than made into a set of a billion ints."""
        import itertools

        from .graph import MAX_TOKEN_ID

        try:
            try:
                n = len(ids)
            except OverflowError:  # range(10**30)
                n = MAX_TOKEN_IDS + 1
            except TypeError:  # a generator: read one more than allowed, no more
                ids = list(itertools.islice(iter(ids), MAX_TOKEN_IDS + 1))
                n = len(ids)
            if n > MAX_TOKEN_IDS:
                raise N2GError(f"{name} holds more than {MAX_TOKEN_IDS:,} ids (no vocabulary is that large); "
                               "pass only the ids of the tokens that end a sentence")
            if isinstance(ids, (str, bytes, bytearray)):  # "13" would be the ids 1 and 3
                raise TypeError
            values = list(ids)
            if any(isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in values):
                raise TypeError  # 3.7 would be 3, True would be 1 (a NumPy integer is Integral)
            out = tuple(sorted({int(t) for t in values}))
        except (TypeError, ValueError, OverflowError):
            raise N2GError(f"{name} must be token ids (got {str(ids)[:80]})") from None
        bad = [t for t in (out[:1] + out[-1:]) if not 0 <= t <= MAX_TOKEN_ID]  # sorted: the ends say it
        if bad:
            raise N2GError(f"{name} must be token ids from 0 to {MAX_TOKEN_ID} (got {bad[0]})")
        return out

    def _check_types(self) -> None:
        """Every field holds a value of its declared type (an int is a float; a bool is never a number;
        a NumPy number is stored as the Python number it equals, so the config stays JSON)."""
        import math
        import numbers

        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), {k.strip() for k in str(f.type).split("|")}
            if value is None and "None" in kinds:
                continue
            if "bool" in kinds:
                ok = isinstance(value, bool)
            elif "int" in kinds:
                ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
                if ok:
                    setattr(self, f.name, int(value))
            elif "float" in kinds:
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                if ok and not isinstance(value, (int, float)):
                    setattr(self, f.name, float(value))
            elif "str" in kinds:
                ok = isinstance(value, str)
            else:
                continue  # tuples are checked below
            if not ok:
                want = " or ".join(sorted(kinds - {"None"}))
                raise N2GError(f"{f.name} must be {'a finite' if want == 'float' else 'an' if want == 'int' else 'a'} {want}"
                               f"{' or None' if 'None' in kinds else ''} (got {value!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DistillConfig":
        if not isinstance(d, dict):
            raise N2GError(f"a config must be a dict of DistillConfig fields (got {type(d).__name__})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def replace(self, **changes) -> "DistillConfig":
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise N2GError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                           f"options are DistillConfig fields, e.g. {', '.join(sorted(names)[:6])}, ...")
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, DistillConfig] = {
    # The published implementation (albertsgarde/Neuron2Graph); evaluation/results/paper_vs_published.md
    # lists every difference, what follows it and what remains.
    "paper": DistillConfig(
        rescale_pruned=True,
        prune_windows="published",
        merge_wildcards=True,
        post_context=5,
        strict=True,
        occlusion_text='"',
        prune_quiet=True,
    ),
    # Measured on SmolLM2 with evaluation/fidelity.py (see evaluation/results/): more training text,
    # every node calibrated on training tokens (backoff) at the quantile with the best training F1
    # scored out of sample, every training activator covered, deepest-match search, cheaper pruning.
    "default": DistillConfig(
        n_extra_train=30,
        n_random_train=40,
        n_prune=20,
        max_pivots=1,
        prune_search="coarse",
        pivot_activation="original",
        end_activation="mean",
        calibrate=True,
        backoff=True,
        end_statistic="auto",
        out_of_sample=True,
        cover=True,
        min_count=2,
        match="search",
        evidence="partition",
        grow=True,
        subtree=True,
        cover_context=1,
        choose_on="split",
        end_value="mean",
        quiet_tokens=64,
        background=True,
        background_tokens=True,
        dense=True,
        min_gain=20.0,
        grow_depth=3,
        grow_gaps=True,
        set_cost=1.0,
        clean_gain=60.0,
        grow_below=True,
        value_gain=60.0,
        join_depths=True,
        run_max=64,
        run_cost=6.0,
        start_node=True,
        context_activators=True,
        augment=True,
        augment_positions="activator",
        novel_variants=True,
        variant_evidence="firing",
        variant_importance="source",
        substitute_source="embedding",
        n_variants=8,
        variant_once=True,
        written=512,
        vocabulary=4,
    ),
}


def given(overrides: dict) -> dict:
    """``overrides`` without the ``None`` values that mean "not given" (an option left out on the command line):
    a ``None`` is kept for a field that takes it as a value (``n_prune=None``: prune every training excerpt;
    ``occlusion_text=None``: the model's own occlusion token), and for a name that is no field (refused later)."""
    optional = {f.name for f in dataclasses.fields(DistillConfig) if "None" in str(f.type)}
    fields = {f.name for f in dataclasses.fields(DistillConfig)}
    return {k: v for k, v in overrides.items() if v is not None or k in optional or k not in fields}


def preset(name: str, **overrides) -> DistillConfig:
    """The named preset with ``overrides`` applied (a ``None`` is ignored, except for a field that takes it: :func:`given`)."""
    if not isinstance(name, str) or name not in PRESETS:
        raise N2GError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**given(overrides))
