"""A neuron over the whole scanned corpus: its activation histogram and examples from quantile bands.

The scan keeps every token's activation in the layer's store (:mod:`n2g.activations`), so the
distribution and the examples below the top come for free, with no model call: the histogram
counts every stored token's normalised activation, and the bands rank the stored excerpts by their
maximum and sample a few from the top 1 %, the 90th-99th and 50th-90th percentiles and the bottom
half (as OpenAI's neuron viewer and Neuronpedia show examples from several activation ranges, not
only the top). The viewer draws both on the neuron page.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BANDS = ((0.99, 1.0), (0.9, 0.99), (0.5, 0.9), (0.0, 0.5))
"""Quantile bands of the stored excerpts ranked by their maximum activation, strongest first: the
top 1 %, the 90th to 99th percentile, the 50th to 90th, and the bottom half."""
N_BINS = 40
PER_BAND = 2


def histogram(values: np.ndarray, bins: int = N_BINS) -> dict:
    """Counts of normalised activations in ``bins`` equal bins from min(values, 0) to max(values, 1)."""
    flat = np.asarray(values, np.float64).ravel()
    flat = flat[np.isfinite(flat)]
    lo = float(min(flat.min(initial=0.0), 0.0))
    hi = float(max(flat.max(initial=1.0), 1.0))
    counts, edges = np.histogram(flat, bins=bins, range=(lo, hi))
    return {"edges": [round(float(e), 6) for e in edges], "counts": [int(c) for c in counts],
            "n_tokens": int(flat.size), "unit": "normalised activation (activation / neuron maximum)"}


def band_label(q_lo: float, q_hi: float) -> str:
    """``top 1 %``, ``90th-99th percentile``, ``bottom half`` ... for a quantile band."""
    if q_hi >= 1.0:
        return f"top {100 * (1 - q_lo):g} %"
    if q_lo <= 0.0:
        return "bottom half" if q_hi == 0.5 else f"bottom {100 * q_hi:g} %"
    return f"{100 * q_lo:g}th\u2013{100 * q_hi:g}th percentile"


def band_excerpts(values: np.ndarray, excerpts: Sequence[int], per_band: int = PER_BAND, seed: int = 0,
                  exclude: Sequence[int] = ()) -> list[dict]:
    """Per quantile band of :data:`BANDS`: its excerpts' peak range, how many there are, and a seeded sample.

    ``values`` is ``[n, length]`` normalised activations of the stored ``excerpts``. Excerpts are
    ranked by their maximum (ties in a stable order) and cut at the band quantiles, so each band
    holds its share of the excerpts exactly. Excerpts in ``exclude`` (those already shown as
    train/test examples) are sampled only when a band has too few others.
    """
    peaks = np.asarray(values, np.float64).max(axis=1) if len(values) else np.zeros(0)
    order = np.argsort(peaks, kind="stable")  # weakest first
    n = len(order)
    rng = np.random.default_rng(seed + 7919)
    skip = set(map(int, exclude))
    out = []
    for q_lo, q_hi in BANDS:
        rows = order[int(np.floor(q_lo * n)) : (n if q_hi >= 1.0 else int(np.floor(q_hi * n)))]
        fresh = [int(r) for r in rows if int(excerpts[r]) not in skip]
        chosen = rng.choice(fresh, size=min(per_band, len(fresh)), replace=False).tolist() if fresh else []
        if len(chosen) < per_band:  # a small band (the top 1 % of a small corpus) may be all shown above already
            seen = [int(r) for r in rows if int(excerpts[r]) in skip]
            chosen += rng.choice(seen, size=min(per_band - len(chosen), len(seen)), replace=False).tolist() if seen else []
        chosen = sorted(chosen)
        out.append({"q_lo": q_lo, "q_hi": q_hi, "lo": float(peaks[rows].min()) if len(rows) else 0.0,
                    "hi": float(peaks[rows].max()) if len(rows) else 0.0, "n_excerpts": int(len(rows)), "rows": chosen})
    return out


def attach_profile(result, scan, excerpts: Sequence[Sequence[int]], graph, token_strings, seed: int = 0) -> None:
    """Fill ``result.histogram`` and ``result.band_examples`` from the layer's scan (no model call).

    ``excerpts`` are the corpus's token ids, ``graph`` the fitted graph (its predictions are shown
    beside the true activations) and ``token_strings`` the tokenizer's display strings.
    """
    from .records import Example

    scale = result.stats.max_activation
    if scan is None or getattr(scan, "store", None) is None or not scale > 0:
        return
    neuron = result.neuron
    values = scan.activations(neuron.index, neuron.sign) / scale
    stored = scan.store.excerpts
    hist = histogram(values)
    shown = [e.excerpt_index for e in result.examples if e.excerpt_index is not None]
    bands = band_excerpts(values, stored, seed=seed, exclude=shown)
    hist["bands"] = [{"q_lo": b["q_lo"], "q_hi": b["q_hi"], "lo": round(b["lo"], 5), "hi": round(b["hi"], 5),
                      "n_excerpts": b["n_excerpts"]} for b in bands]
    result.histogram = hist
    examples = []
    for b in bands:
        for row in b["rows"]:
            idx = int(stored[row])
            ids = [int(t) for t in excerpts[idx]]
            pred = graph.predict_sequence(ids) if graph is not None else None
            examples.append(Example(ids, [round(float(v), 5) for v in values[row]], split="band",
                                    source=f"band {b['q_lo']:g}-{b['q_hi']:g}", excerpt_index=idx,
                                    predicted=None if pred is None else [round(float(v), 5) for v in pred],
                                    tokens=token_strings(ids)))
    result.band_examples = examples
