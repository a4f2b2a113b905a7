"""Records shared by the pipeline stages: neurons, statistics, examples, scores, results.

Every record is a dataclass with ``to_dict`` / ``from_dict``; saved records carry a ``kind`` and a
``schema_version`` and unknown keys are dropped on load, so old files stay readable.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import N2GError, is_whole

SCHEMA_VERSION = 1


def sae_settings(sae):
    """An SAE as ``run.json`` records it (``model.sae``), less the path it was read from (``sae``, ``./sae`` and
    ``/abs/sae`` are one SAE); what is not a record, as it is."""
    return {k: v for k, v in sae.items() if k != "path"} if isinstance(sae, dict) else sae


def newer_schema(d) -> str | None:
    """Why a saved record cannot be read by this n2g, where a newer one wrote it (its ``schema_version`` above
    :data:`SCHEMA_VERSION`: fields may mean other things now); None otherwise."""
    version = d.get("schema_version") if isinstance(d, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        return f"written by a newer n2g (schema {version}; this one reads up to {SCHEMA_VERSION}): upgrade n2g"
    return None


class Sign(str, enum.Enum):
    """Which side of a neuron is distilled; gated neurons fire negative as well as positive."""

    POSITIVE = "positive"
    NEGATIVE = "negative"


def plural(n: int, noun: str) -> str:
    """``noun`` as said of ``n`` things: "1 neuron", "2 neurons" (the caller prints the number)."""
    return noun if n == 1 else noun + "s"


def _clean(value: Any) -> Any:
    """JSON-safe copy: enums to values, non-finite floats to None."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass(frozen=True, order=True)
class NeuronId:
    """A neuron of the subject model, or one side of it."""

    layer: int
    """Index of the transformer block whose MLP holds the neuron."""
    index: int
    """Index of the neuron within the MLP (the input dimension of the output projection)."""
    sign: Sign = Sign.POSITIVE
    """Which side is distilled: negative means the activation is multiplied by -1 first."""

    def __post_init__(self) -> None:
        # NeuronId(5, 2, "negative") kept the string: to_dict() failed on it, and "both" was taken
        for what in ("layer", "index"):
            value = getattr(self, what)
            if not is_whole(value) or value < 0:
                raise N2GError(f"a neuron's {what} must be a whole number of 0 or more (got {value!r})")
            object.__setattr__(self, what, int(value))  # a NumPy integer as the int it equals (JSON writes it)
        if not isinstance(self.sign, Sign):
            if self.sign not in ("positive", "negative"):
                raise N2GError(f"a neuron's sign must be 'positive' or 'negative' (got {self.sign!r})")
            object.__setattr__(self, "sign", Sign(self.sign))

    @property
    def key(self) -> str:
        """Stable text key used for folder names and indexes, e.g. ``L5.N123`` or ``L5.N123.neg``."""
        suffix = ".neg" if self.sign == Sign.NEGATIVE else ""
        return f"L{self.layer}.N{self.index}{suffix}"

    @classmethod
    def from_key(cls, key: str) -> "NeuronId":
        """The neuron a key such as ``L5.N2`` or ``L5.N2.neg`` names; a ValueError for anything else."""
        m = re.fullmatch(r"L([0-9]+)\.N([0-9]+)(\.neg)?", key) if isinstance(key, str) else None
        if m is None:
            raise ValueError(f"{str(key)[:40]!r} is not a neuron key; keys look like L5.N2 or L5.N2.neg")
        return cls(int(m[1]), int(m[2]), Sign.NEGATIVE if m[3] else Sign.POSITIVE)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "index": self.index, "sign": self.sign.value}

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronId":
        return cls(int(d["layer"]), int(d["index"]), Sign(d.get("sign", "positive")))


@dataclass
class NeuronStats:
    """What the scan learned about a neuron over the whole corpus (on the distilled sign)."""

    max_activation: float
    """Largest activation over all scanned real tokens; divides activations to normalise them."""
    quantiles: dict[str, float] = field(default_factory=dict)
    """Activation quantiles (keys like ``"0.5"``, ``"0.99"``) over a seeded random token sample."""
    firing_rate: float = 0.0
    """Fraction of sampled tokens whose normalised activation is >= the fire threshold."""
    n_sampled_tokens: int = 0
    """How many tokens the quantiles and firing rate were estimated from."""

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronStats":
        d = {k: v for k, v in d.items() if k in _fields(cls)}
        if d.get("max_activation") is None:
            d["max_activation"] = 0.0
        return cls(**d)


@dataclass
class Example:
    """One text window and the neuron's normalised activation on every token of it."""

    token_ids: list[int]
    """Token ids of the window (no BOS; the activation function adds it)."""
    activations: list[float]
    """True normalised activation per token (activation / neuron max)."""
    split: str = "train"
    """``"train"`` or ``"test"``."""
    source: str = "top"
    """``"top"`` (a top-activating excerpt), ``"random"`` (a random excerpt), ``"variant"`` or ``"written"``
    (a token of model-written text, :mod:`n2g.written`)."""
    excerpt_index: int | None = None
    """Index of the corpus excerpt it came from, when it came from one."""
    predicted: list[float] | None = None
    """The graph's predicted normalised activation per token, filled in after fitting."""
    tokens: list[str] | None = None
    """Display strings of the tokens, filled in by the runner that knows the tokenizer."""

    @property
    def pivot(self) -> int:
        """Position of the maximum activation."""
        return max(range(len(self.activations)), key=self.activations.__getitem__)

    def to_dict(self) -> dict:
        # Written out by hand: dataclasses.asdict deep-copies every float, the slowest part of saving a result.
        floats = lambda xs: None if xs is None else [v if math.isfinite(v) else None for v in map(float, xs)]
        return {"token_ids": [int(t) for t in self.token_ids], "activations": floats(self.activations),
                "split": self.split, "source": self.source,
                "excerpt_index": None if self.excerpt_index is None else int(self.excerpt_index),
                "predicted": floats(self.predicted), "tokens": None if self.tokens is None else [str(t) for t in self.tokens]}

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(**{k: v for k, v in d.items() if k in _fields(cls)})


@dataclass
class Scores:
    """How well a predictor matches a neuron on pooled real test tokens (normalised scale)."""

    precision: float | None
    """Firing class: of tokens predicted to fire, the fraction that truly fire."""
    recall: float | None
    """Firing class: of tokens that truly fire, the fraction predicted to fire."""
    f1: float | None
    """Firing class F1; None when there is no firing test token (never reported as perfect)."""
    nonfiring_precision: float | None
    """Non-firing class precision."""
    nonfiring_recall: float | None
    """Non-firing class recall."""
    nonfiring_f1: float | None
    """Non-firing class F1."""
    pearson: float | None
    """Pearson correlation of true and predicted continuous values (OpenAI's explanation score)."""
    explained_variance: float | None
    """1 - Var(true - predicted) / Var(true)."""
    n_tokens: int = 0
    """Real tokens scored."""
    n_firing: int = 0
    """Real tokens that truly fire."""
    n_predicted_firing: int = 0
    """Real tokens predicted to fire."""
    status: str = "ok"
    """``"ok"``, or ``"no_firing_test_token"`` when the test split has nothing to recall."""

    def to_dict(self) -> dict:
        return _clean(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "Scores":
        return cls(**{k: v for k, v in d.items() if k in _fields(cls)})


def check_folder(neuron: NeuronId, folder_name: str) -> None:
    """Raise ValueError unless a stored result of ``neuron`` lies in its own folder (``neurons/<key>``): a
    copied or renamed folder would show a neuron twice, pair its result with another graph, or count the
    folder's own neuron as done."""
    if neuron.key != folder_name:
        raise ValueError(f"it holds the result of {neuron.key}, not of its folder's neuron")


@dataclass
class NeuronResult:
    """Everything a run stores about one neuron except its graph (saved beside it)."""

    neuron: NeuronId
    """Which neuron and sign."""
    status: str
    """``"fitted"``, or ``"dead"`` when it never fires on the corpus (a result, not an error)."""
    stats: NeuronStats
    """Corpus statistics from the scan."""
    scores: dict[str, Scores] = field(default_factory=dict)
    """Scores per method: ``"n2g"``, ``"token_lookup"``, ``"ngram"``, ``"zero"``."""
    examples: list[Example] = field(default_factory=list)
    """Train and test examples with true and predicted activations."""
    promoted: list[tuple[str, float]] = field(default_factory=list)
    """Tokens the neuron's output weights promote most (token, logit effect)."""
    suppressed: list[tuple[str, float]] = field(default_factory=list)
    """Tokens the neuron's output weights suppress most (token, logit effect)."""
    graph_stats: dict[str, int] = field(default_factory=dict)
    """Node counts of the graph by kind, and its number of paths."""
    seconds: float = 0.0
    """Wall time spent fitting this neuron (shared batches are split evenly)."""
    histogram: dict = field(default_factory=dict)
    """Normalised activations of every stored token: ``edges``, ``counts``, ``n_tokens``, and ``bands``
    (per band of an excerpt's maximum: ``lo``, ``hi``, ``n_excerpts``); see :mod:`n2g.profile`."""
    band_examples: list[Example] = field(default_factory=list)
    """Excerpts sampled from each activation band (``source`` is ``"band LO-HI"``, split ``"band"``)."""
    ablation: dict = field(default_factory=dict)
    """With ``--ablation``: the graph standing in for the neuron inside the model (see :mod:`n2g.ablate`)."""
    steering: dict = field(default_factory=dict)
    """With ``--ablation``: the neuron clamped on a held-out prefix (see :mod:`n2g.steer`)."""
    ceiling: dict = field(default_factory=dict)
    """The test split's firing tokens (``n_firing``), how many of them are tokens that fire somewhere in
    training (``n_seen``), and the firing F1 a predictor keyed on tokens could reach at most (``f1``)."""

    KIND = "n2g.neuron_result"

    @property
    def graph_nodes(self) -> int:
        """Nodes of the graph: activating, context and wildcard (its paths' END values not counted)."""
        return sum(v for k, v in self.graph_stats.items() if k in ("activator", "context", "wildcard") and isinstance(v, int))

    def to_dict(self) -> dict:
        return {
            "kind": self.KIND,
            "schema_version": SCHEMA_VERSION,
            "neuron": self.neuron.to_dict(),
            "status": self.status,
            "stats": self.stats.to_dict(),
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "examples": [e.to_dict() for e in self.examples],
            "promoted": [[t, float(v)] for t, v in self.promoted],
            "suppressed": [[t, float(v)] for t, v in self.suppressed],
            "graph_stats": dict(self.graph_stats),
            "seconds": float(self.seconds),
            "histogram": _clean(self.histogram),
            "band_examples": [e.to_dict() for e in self.band_examples],
            "ablation": _clean(self.ablation),
            "steering": _clean(self.steering),
            "ceiling": _clean(self.ceiling),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NeuronResult":
        if not isinstance(d, dict):
            raise ValueError(f"not a neuron result record (a JSON {type(d).__name__}, not an object)")
        if d.get("kind") != cls.KIND:
            raise ValueError(f"not a neuron result record (kind={d.get('kind')!r})")
        if newer := newer_schema(d):
            raise ValueError(newer)
        return cls(
            neuron=NeuronId.from_dict(d["neuron"]),
            status=d["status"],
            stats=NeuronStats.from_dict(d["stats"]),
            scores={k: Scores.from_dict(v) for k, v in d.get("scores", {}).items()},
            examples=[Example.from_dict(e) for e in d.get("examples", [])],
            promoted=[(t, float(v)) for t, v in d.get("promoted", [])],
            suppressed=[(t, float(v)) for t, v in d.get("suppressed", [])],
            graph_stats={k: int(v) for k, v in d.get("graph_stats", {}).items()},
            seconds=float(d.get("seconds", 0.0)),
            histogram=d.get("histogram") or {},
            band_examples=[Example.from_dict(e) for e in d.get("band_examples", [])],
            ablation=d.get("ablation") or {},
            steering=d.get("steering") or {},
            ceiling=d.get("ceiling") or {},
        )
