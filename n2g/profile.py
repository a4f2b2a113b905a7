"""A neuron over the whole scanned corpus: its activation histogram and examples from activation bands.

The scan keeps every token's activation in the layer's store (:mod:`n2g.activations`), so the
distribution and the examples below the top come for free, with no model call: the histogram
counts every stored token's normalised activation, and the bands pick excerpts whose maximum falls
in each slice of the neuron's range (as OpenAI's neuron viewer and Neuronpedia show examples from
several activation intervals, not only the top). The viewer draws both on the neuron page.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

BANDS = ((0.75, 1.0), (0.5, 0.75), (0.25, 0.5), (0.0, 0.25))
"""Bands of an excerpt's maximum normalised activation, strongest first (upper bound inclusive)."""
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


def band_excerpts(values: np.ndarray, excerpts: Sequence[int], per_band: int = PER_BAND, seed: int = 0,
                  exclude: Sequence[int] = ()) -> list[dict]:
    """Per band of :data:`BANDS`: how many stored excerpts peak in it and a seeded sample of them.

    ``values`` is ``[n, length]`` normalised activations of the stored ``excerpts``; excerpts in
    ``exclude`` (those already shown as train/test examples) are not sampled.
    """
    peaks = np.asarray(values, np.float64).max(axis=1) if len(values) else np.zeros(0)
    rng = np.random.default_rng(seed + 7919)
    skip = set(map(int, exclude))
    out = []
    for k, (lo, hi) in enumerate(BANDS):
        # the top band has no upper bound (16-bit storage can put the maximum a hair above 1), the last no lower
        inside = (peaks > lo if k == 0 else (peaks > lo) & (peaks <= hi)) if lo > 0 else (peaks <= hi)
        rows = np.flatnonzero(inside)
        pickable = [int(r) for r in rows if int(excerpts[r]) not in skip]
        chosen = sorted(rng.choice(pickable, size=min(per_band, len(pickable)), replace=False).tolist()) if pickable else []
        out.append({"lo": lo, "hi": hi, "n_excerpts": int(rows.size), "rows": chosen})
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
    hist["bands"] = [{"lo": b["lo"], "hi": b["hi"], "n_excerpts": b["n_excerpts"]} for b in bands]
    result.histogram = hist
    examples = []
    for b in bands:
        for row in b["rows"]:
            idx = int(stored[row])
            ids = [int(t) for t in excerpts[idx]]
            pred = graph.predict_sequence(ids) if graph is not None else None
            examples.append(Example(ids, [round(float(v), 5) for v in values[row]], split="band",
                                    source=f"band {b['lo']:g}-{b['hi']:g}", excerpt_index=idx,
                                    predicted=None if pred is None else [round(float(v), 5) for v in pred],
                                    tokens=token_strings(ids)))
    result.band_examples = examples
