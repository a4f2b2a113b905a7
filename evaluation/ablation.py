"""Ablation harness: how well SmolLM2 graphs stand in for their neurons inside the model, per layer.

Fits the fidelity harness's neuron sample (seeded, per layer) with ``--ablation`` and prints, per
layer, the mean fraction of the zero-ablation damage the graph recovers and the mean
cross-entropy increase with the neuron replaced by the graph, zero and its mean.

    python evaluation/ablation.py --layers 0,5,10,15,20,25,29 --per-layer 2 --max-excerpts 1024
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time

import numpy as np
import torch

from n2g.models import load_model
from n2g.pipeline import RunOptions, parse_indices, run
from n2g.report import compute_report

from harness import parse_set


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the neuron sample (as evaluation/fidelity.py)")
    ap.add_argument("--max-excerpts", type=int, default=1024)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--set", action="append", default=[], help="a preset override, e.g. --set background_tokens=false")
    args = ap.parse_args(argv)
    overrides = parse_set(args.set)
    model = load_model("default")
    layers = parse_indices(args.layers, model.n_layers, "layer")
    rng = np.random.default_rng(args.seed)
    sample = {l: sorted(int(i) for i in rng.choice(model.d_mlp, args.per_layer, replace=False)) for l in layers}
    out = args.out or tempfile.mkdtemp(prefix="n2g-ablation-")
    t0 = time.perf_counter()
    for layer, indices in sample.items():
        opts = RunOptions(layers=str(layer), neurons=",".join(map(str, indices)), max_excerpts=args.max_excerpts,
                          out=out, ablation=True, report=False, progress=False, overrides=overrides)
        run(opts, model=model)
    seconds = time.perf_counter() - t0
    rep = compute_report(out)
    print("| layer | neurons (recovered defined) | graph recovers | CE increase: graph | zero | mean |")
    print("|---|---|---|---|---|---|")
    fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
    for row in rep["layers"] + [rep["overall"]]:
        a = row.get("ablation")
        if not a:
            continue
        print(f"| {row['layer']} | {a['n_neurons']} ({a['n_recovered']}) | {fmt(a['recovered'])} | {fmt(a['ce_increase_graph'], 5)} "
              f"| {fmt(a['ce_increase_zero'], 5)} | {fmt(a['ce_increase_mean'], 5)} |")
    print(f"\nmodel {model.spec} ({model.device}, {model.dtype}); preset default {overrides or ''}; "
          f"neurons {sample} (sample seed {args.seed}); "
          f"corpus: first {args.max_excerpts} excerpts; held-out text: each neuron's 8 strongest held-out test excerpts; "
          f"{seconds:.0f} s in all; {platform.machine()}, {torch.get_num_threads()} threads; run in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
