"""What the evaluation scripts share: the harness's neuron sample and ``--set`` overrides."""

from __future__ import annotations

import json

import numpy as np

from n2g.records import NeuronId, Sign


def sample_neurons(d_mlp: int, layers, per_layer: int, seed: int, sign: str = "positive") -> list[NeuronId]:
    """``per_layer`` neurons of each layer, drawn with ``default_rng(seed)`` layer by layer, sorted; the
    ``sign`` side of each (the same indices for either side)."""
    rng = np.random.default_rng(seed)
    return [NeuronId(l, int(i), Sign(sign)) for l in layers for i in sorted(rng.choice(d_mlp, per_layer, replace=False))]


def parse_set(items) -> dict:
    """``["key=value", ...]`` as preset overrides: JSON values (numbers, true/false, null), else the word."""
    out = {}
    for item in items:
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
