"""Two runs of one model, neuron by neuron: which graphs predict their neuron better.

A researcher who changes a setting (``--augment``, ``--written 0``, ``--vocabulary 0``, another n2g version)
and runs the same neurons again asks whether the graphs got better. :func:`compare_runs` pairs the neurons the
two runs share, keeps only those scored on the same held-out text (the same test excerpts, token for token, so
the two scores are paired), and gives the mean firing F1 and Pearson r of each run, the mean difference with a
95 % bootstrap interval over the neurons (:func:`n2g.score.paired_difference`), how many neurons each run wins,
the difference per layer, and the neurons that moved most. ``n2g compare RUN_A RUN_B`` prints it.

Runs of different models, or scored at different fire thresholds, are refused: their scores do not describe
the same neurons on the same terms.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from .errors import N2GError
from .records import NeuronResult, plural, sae_settings

METRICS = {"f1": "firing F1", "pearson": "Pearson r"}
"""Scores compared, by their field in :class:`n2g.records.Scores`, with the name printed."""

_RANGES = {"f1": (0.0, 1.0), "pearson": (-1.0, 1.0)}
"""The values each score can take: one outside (a damaged file) counts as no score."""

TIE = 1e-9
"""Differences smaller than this count as equal."""

_TEST_SHAPE = ("n_top", "n_random_test", "seed", "held_out")
"""Options that choose a neuron's held-out test excerpts (:func:`n2g.examples.split_examples`): named when two runs'
held-out text differs. Every preset picks them from the run's held-out partition, so ``default`` and ``paper`` runs
of one corpus are scored on the same text."""


@dataclasses.dataclass
class Side:
    """One run: its folder, name, model and the settings it was fitted with."""

    run_dir: str
    name: str | None
    model: str | None
    neurons: int
    settings: dict
    preset: str | None = None
    """The preset whose fields the settings are closest to (None: run.json records no options)."""
    own: dict = dataclasses.field(default_factory=dict)
    """Settings that differ from that preset's (the command line's --augment, --written ...)."""
    unit: str = "neuron"
    """What the run fitted: "latent" for an SAE's latents (runs of one model fit the same kind)."""


def _closest_preset(settings: dict) -> tuple[str | None, dict]:
    """(name, settings that differ from it) of the preset the fitting options are closest to."""
    import json

    from .config import PRESETS

    best = None
    for name, cfg in PRESETS.items():
        fields = json.loads(json.dumps(dataclasses.asdict(cfg)))  # as run.json writes them (tuples as lists)
        own = {k: settings[k] for k in fields if k in settings and settings[k] != fields[k]}
        if any(k in settings for k in fields) and (best is None or len(own) < len(best[1])):
            best = (name, own)
    return best if best is not None else (None, {})


@dataclasses.dataclass
class MetricSummary:
    """One score over the paired neurons where both runs define it."""

    metric: str
    n: int
    mean_a: float | None
    mean_b: float | None
    difference: float | None
    """Mean of B - A over the neurons."""
    low: float | None
    high: float | None
    """95 % paired bootstrap interval of ``difference`` (seeded)."""
    b_better: int
    equal: int
    b_worse: int


@dataclasses.dataclass
class Comparison:
    """What :func:`compare_runs` finds; ``to_dict`` for JSON."""

    a: Side
    b: Side
    settings: list[tuple[str, object, object]]
    """(setting, value in A, value in B) for every fitting option that differs."""
    paired: list[str]
    """Neurons in both runs scored on the same held-out text."""
    only_a: list[str]
    only_b: list[str]
    text_differs: list[str]
    """Neurons in both runs whose held-out text is not the same (their scores are not paired)."""
    unreadable: list[str]
    """Neurons in both runs whose result could not be read in one of them (named in a warning)."""
    metrics: dict[str, MetricSummary]
    layers: list[dict]
    """Per layer: layer, n, mean F1 of A and of B, difference (neurons with F1 in both)."""
    neurons: list[dict]
    """Per paired neuron: key, status in A and B, F1 and Pearson r of each; sorted by F1 difference, largest gain first."""

    def to_dict(self) -> dict:
        """As JSON: NaN and infinities from a run.json (a setting, a model spec) as None, since JSON has none."""
        from .report import _finite

        d = dataclasses.asdict(self)
        d["settings"] = [{"setting": k, "a": a, "b": b} for k, a, b in self.settings]
        return _finite(d)


def _run_json(run_dir: Path) -> dict:
    """``run.json``; N2GError where it cannot be read: without it the model the run was made with is unknown."""
    from .report import read_run_json

    path = run_dir / "run.json"
    if not path.exists():
        raise N2GError(f"{run_dir} is not an n2g run directory (no run.json); run `n2g run` first")
    d, problem = read_run_json(run_dir)
    if problem is not None:
        raise N2GError(f"{path} cannot be read ({problem}), so the model {run_dir} was made with is not known; "
                       "re-running the same `n2g run` command rewrites it")
    return d


def _identity(info: dict) -> dict:
    identity = info.get("identity")
    return identity if isinstance(identity, dict) else {}


def _models_differ(infos: list[dict]) -> tuple[str, object, object] | None:
    """(what differs, A's, B's) where the two runs' models differ: the digest of the weights where both run.json
    files record the same kind of one (the content's, then the files'), else the spec and shape; None if alike."""
    identities = [_identity(i) for i in infos]
    models = [i.get("model") if isinstance(i.get("model"), dict) else {} for i in infos]
    # an SAE's settings, not the path it was read from (as given: `sae`, `./sae`, `/abs/sae`); its weights are in
    # the content and weights keys below
    saes = [repr(sae_settings(m.get("sae"))) for m in models]
    if saes[0] != saes[1]:
        return "SAE", *saes
    for key in ("model_content", "model_weights"):
        values = [identity.get(key) for identity in identities]
        if all(isinstance(v, str) for v in values):
            return (key.replace("_", " "), *values) if values[0] != values[1] else None
    shapes = [(m.get("spec"), m.get("n_layers"), m.get("d_mlp")) for m in models]
    return ("model", *(s[0] for s in shapes)) if shapes[0] != shapes[1] else None


def _settings(info: dict) -> dict:
    """The options a run was fitted with (its preset's fields, as run.json records them), and its corpus."""
    identity = _identity(info)
    config = identity.get("config")
    out = dict(config) if isinstance(config, dict) else {}
    for key in ("corpus", "excerpt_length", "n_excerpts", "store_tokens", "substitutes"):
        if key in identity:
            out[key] = identity[key]
    return out


def _test_text(result: NeuronResult) -> tuple:
    """The held-out excerpts a neuron was scored on: (source, excerpt, token ids) of each, in order."""
    return tuple((e.source, e.excerpt_index, tuple(e.token_ids)) for e in result.examples if e.split == "test")


def _score(result: NeuronResult, metric: str) -> float | None:
    scores = result.scores.get("n2g")
    value = None if scores is None else getattr(scores, metric)
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    low, high = _RANGES[metric]
    return float(value) if low - TIE <= value <= high + TIE else None


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _summary(metric: str, pairs: list[tuple[float, float]]) -> MetricSummary:
    from .score import paired_difference

    if not pairs:
        return MetricSummary(metric, 0, None, None, None, None, None, 0, 0, 0)
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    diff, low, high = paired_difference(b, a)
    better = sum(y - x > TIE for x, y in pairs)
    worse = sum(x - y > TIE for x, y in pairs)
    return MetricSummary(metric, len(pairs), _mean(a), _mean(b), diff, low, high, better, len(pairs) - better - worse, worse)


def compare_runs(run_a: str | os.PathLike, run_b: str | os.PathLike, progress: bool = False) -> Comparison:
    """Compare the graphs of two runs of one model on the neurons both hold (see the module's description).

    Raises :class:`~n2g.errors.N2GError` (one line, what to do) where either is not a run, the runs were made
    with different models or fire thresholds, they share no neuron, or none of the shared neurons was scored on
    the same held-out text in both.
    """
    from .progress import Progress
    from .search import _run_fire_threshold, read_result, scan_results

    dirs = Path(run_a), Path(run_b)
    infos = [_run_json(d) for d in dirs]
    found = [scan_results(d) for d in dirs]
    for d, results in zip(dirs, found):
        if not results:
            raise N2GError(f"no neuron results in {d}; run `n2g run` first")
    differ = _models_differ(infos)
    if differ is not None:
        raise N2GError(f"{dirs[0]} and {dirs[1]} were made with different models ({differ[0]} {_plain(differ[1])} and "
                       f"{_plain(differ[2])}); a neuron of one is not the neuron of the other: compare two runs of one model")
    thresholds = [_run_fire_threshold(d) for d in dirs]
    if thresholds[0] != thresholds[1]:
        raise N2GError(f"{dirs[0]} scores firing at {thresholds[0]:g} and {dirs[1]} at {thresholds[1]:g}; "
                       "compare runs fitted at one fire threshold")
    by_key = [{r.neuron.key: (folder, r, sig) for folder, r, sig in results} for results in found]
    common = [k for k in by_key[0] if k in by_key[1]]
    if not common:
        raise N2GError(f"{dirs[0]} and {dirs[1]} share no neuron; run the second with the same --layers, "
                       "--neurons and --sign as the first")
    sides = [Side(str(d), info.get("name") if isinstance(info.get("name"), str) else None,
                  (info.get("model") or {}).get("spec") if isinstance(info.get("model"), dict) else None,
                  len(results), _settings(info),
                  unit="latent" if isinstance(info.get("model"), dict) and info["model"].get("sae") else "neuron")
             for d, info, results in zip(dirs, infos, found)]
    for side in sides:
        side.preset, side.own = _closest_preset(side.settings)
    keys = sorted(set(sides[0].settings) | set(sides[1].settings))
    missing = object()
    settings = [(k, sides[0].settings.get(k), sides[1].settings.get(k)) for k in keys
                if sides[0].settings.get(k, missing) != sides[1].settings.get(k, missing)]

    paired, differs, unreadable, rows = [], [], [], []
    bar = Progress(len(common), "read results", "neurons", enabled=progress and len(common) > 200)
    for key in common:
        full = [read_result(side[key][0], side[key][2]) for side in by_key]
        bar.update()
        if full[0] is None or full[1] is None:
            unreadable.append(key)
            continue
        text = [_test_text(r) for r in full]
        # a score with no held-out excerpt recorded beside it (a damaged file) was scored on text no one can check
        if text[0] != text[1] or (not text[0] and any(_score(r, m) is not None for r in full for m in METRICS)):
            differs.append(key)
            continue
        paired.append(key)
        a, b = full
        rows.append({"key": key, "layer": a.neuron.layer, "status_a": a.status, "status_b": b.status,
                     **{f"{m}_{s}": _score(r, m) for m in METRICS for s, r in (("a", a), ("b", b))}})
    bar.close()
    if not paired:
        shape = [k for k, _, _ in settings if k in _TEST_SHAPE + ("corpus", "excerpt_length", "n_excerpts", "store_tokens")]
        why = f"they differ in {', '.join(shape)}" if shape else \
            "another corpus, --max-excerpts, store or scan would change it"
        raise N2GError(f"no neuron of both runs was scored on the same held-out text ({why}); compare runs of one "
                       "model and corpus with the same --max-excerpts (`default` and `paper` split alike)")
    metrics = {m: _summary(m, [(r[f"{m}_a"], r[f"{m}_b"]) for r in rows
                               if r[f"{m}_a"] is not None and r[f"{m}_b"] is not None]) for m in METRICS}
    layers = []
    for layer in sorted({r["layer"] for r in rows}):
        both = [(r["f1_a"], r["f1_b"]) for r in rows if r["layer"] == layer and r["f1_a"] is not None and r["f1_b"] is not None]
        ma, mb = _mean(p[0] for p in both), _mean(p[1] for p in both)
        layers.append({"layer": layer, "n": len(both), "f1_a": ma, "f1_b": mb,
                       "difference": None if ma is None else mb - ma})

    def order(r):  # largest F1 gain first; neurons without F1 in both last, by key
        d = None if r["f1_a"] is None or r["f1_b"] is None else r["f1_b"] - r["f1_a"]
        return (d is None, -(d or 0.0), r["key"])

    rows.sort(key=order)
    only_a = [k for k in by_key[0] if k not in by_key[1]]
    only_b = [k for k in by_key[1] if k not in by_key[0]]
    return Comparison(sides[0], sides[1], settings, paired, only_a, only_b, differs, unreadable, metrics, layers, rows)


def _num(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _plain(v) -> str:
    """A value from a run.json for a one-line message: a newline in it kept from breaking the line, cut short."""
    text = str(v).replace("\n", "\\n")
    return text if len(text) <= 80 else text[:77] + "..."


def _value(v) -> str:
    text = repr(v) if isinstance(v, str) else str(v)
    return text if len(text) <= 40 else text[:37] + "..."


def format_comparison(c: Comparison, limit: int = 10) -> str:
    """The comparison as text: the two runs, what differs, the means, per layer, and the neurons that moved most."""
    from .cli import visible

    def show(text) -> str:  # names from run.json, which may not be the user's own: no control characters
        return visible(str(text)).replace("\n", "\\n")

    lines = []
    for label, side in (("A", c.a), ("B", c.b)):
        about = ", ".join(x for x in (side.name and f"run {show(side.name)!s}", side.model and f"model {show(side.model)}",
                                      f"{side.neurons} {plural(side.neurons, side.unit)}") if x)
        lines.append(f"{label}  {show(side.run_dir)}  ({about})")
    if c.a.preset != c.b.preset:
        own = [f"{label} also: {', '.join(f'{show(k)} {show(_value(v))}' for k, v in side.own.items())}"
               for label, side in (("A", c.a), ("B", c.b)) if side.own]
        lines.append(f"settings that differ: preset {c.a.preset or 'not recorded'} -> {c.b.preset or 'not recorded'} ({len(c.settings)} settings; --json lists "
                     f"them){''.join('; ' + o for o in own)}")
    elif c.settings:
        shown = c.settings[:12]
        lines.append("settings that differ (A -> B): " + "; ".join(
            f"{show(k)} {show(_value(a))} -> {show(_value(b))}" for k, a, b in shown)
            + (f"; and {len(c.settings) - len(shown)} more (--json lists them)" if len(c.settings) > len(shown) else ""))
    else:
        lines.append("settings that differ: none recorded (another n2g version, or the same run twice)")
    left = [f"{len(c.only_a)} only in A", f"{len(c.only_b)} only in B"]
    if c.text_differs:
        left.append(f"{len(c.text_differs)} scored on other held-out text")
    if c.unreadable:
        left.append(f"{len(c.unreadable)} unreadable")
    unit = c.a.unit
    lines.append(f"{len(c.paired)} {plural(len(c.paired), unit)} in both runs, scored on the same held-out text; left out: {', '.join(left)}")
    lines.append("")
    lines.append(f"{'':<12}{'A':>7}{'B':>7}  {'B - A [95% CI]':<27}{'B better / equal / worse':<26}{unit}s")
    for m, s in c.metrics.items():
        interval = "" if s.low is None else f" [{_num(s.low, True)}, {_num(s.high, True)}]"
        lines.append(f"{METRICS[m]:<12}{_num(s.mean_a):>7}{_num(s.mean_b):>7}  {_num(s.difference, True) + interval:<27}"
                     f"{f'{s.b_better} / {s.equal} / {s.b_worse}':<26}{s.n}")
    if len(c.layers) > 1:
        lines.append("")
        lines.append(f"{'layer':<8}{'n':>4}{'F1 A':>8}{'F1 B':>8}{'B - A':>8}")
        for row in c.layers:
            lines.append(f"{row['layer']:<8}{row['n']:>4}{_num(row['f1_a']):>8}{_num(row['f1_b']):>8}{_num(row['difference'], True):>8}")
    moved = [r for r in c.neurons if r["f1_a"] is not None and r["f1_b"] is not None and abs(r["f1_b"] - r["f1_a"]) > TIE]
    if moved and limit:
        gains = [r for r in moved if r["f1_b"] > r["f1_a"]][:limit]
        losses = sorted((r for r in moved if r["f1_b"] < r["f1_a"]), key=lambda r: (r["f1_b"] - r["f1_a"], r["key"]))[:limit]
        for title, part in (("largest gains in F1 (B over A)", gains), ("largest losses in F1 (B under A)", losses)):
            if part:
                lines.append("")
                lines.append(f"{title}:")
                lines += [f"  {show(r['key']):<16}{_num(r['f1_a'])} -> {_num(r['f1_b'])}  {_num(r['f1_b'] - r['f1_a'], True)}"
                          for r in part]
    return "\n".join(lines)
