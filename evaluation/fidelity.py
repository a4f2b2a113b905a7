"""Fidelity harness: how well graphs predict SmolLM2 neurons across depth, per preset and baseline.

Samples a fixed set of neurons (seeded) in each of the given layers of the embedded SmolLM2 and
the embedded corpus, fits every preset on the same train/test split, and prints per layer the
mean firing precision/recall/F1 and Pearson correlation for each preset, token lookup and the
5-gram lookup (fitted on the default preset's training excerpts). Neurons without a firing test
token are excluded from the means and counted.

    python evaluation/fidelity.py --layers 0,5,10,15,20,25,29 --per-layer 8 --max-excerpts 1024
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from n2g.config import preset
from n2g.corpus import Corpus
from n2g.engine import Job, RowEvaluator, fit_many
from n2g.models import cache_dir, load_model
from n2g.pipeline import parse_indices
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-excerpts", type=int, default=1024)
    ap.add_argument("--presets", default="paper,default")
    ap.add_argument("--set", action="append", default=[], help="override for the default preset, e.g. --set max_pivots=2")
    ap.add_argument("--json", default=None, help="also write per-neuron scores here")
    ap.add_argument("--memo", default=None, help="pickle file memoising activations between harness runs (tuning only)")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    rng = np.random.default_rng(args.seed)
    neurons = [NeuronId(l, int(i)) for l in layers for i in sorted(rng.choice(model.d_mlp, args.per_layer, replace=False))]
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        try:
            overrides[key] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            overrides[key] = value  # a word such as mean, auto or search
    configs = {name: preset(name, **(overrides if name == "default" else {})) for name in args.presets.split(",")}
    k = max(max(64, c.n_top + c.n_extra_train) for c in configs.values())
    pool = max(max(64, c.n_top + c.n_extra_train + c.n_random_test + c.n_random_train) for c in configs.values())
    t0 = time.perf_counter()
    scans = scan_layers(model, corpus.excerpts, layers, k=k, pool_size=pool, cache_dir=cache_dir(),
                        corpus_key=corpus.fingerprint(), progress=False)
    scan_s = time.perf_counter() - t0
    excerpts = corpus.excerpts.tolist()
    jobs = [Job(n, scans[n.layer].scale(n.index, Sign.POSITIVE), scans[n.layer].ranked(n.index, Sign.POSITIVE), scans[n.layer].pool)
            for n in neurons]
    fits, seconds = {}, {}
    memo = Memo(model, args.memo) if args.memo else None
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        evaluator = memo.evaluator(cfg.batch_tokens) if memo else None
        fits[name] = fit_many(model, excerpts, jobs, cfg, group_size=len(jobs), evaluator=evaluator)
        seconds[name] = time.perf_counter() - t0
        print(f"# {name}: {len(jobs)} neurons in {seconds[name]:.1f}s ({seconds[name] / len(jobs):.2f} s/neuron)", file=sys.stderr)

    methods = [(name, name, "n2g") for name in configs]
    base_from = "default" if "default" in configs else next(iter(configs))
    methods += [("token lookup", base_from, "token_lookup"), ("5-gram", base_from, "ngram")]
    rows = []
    header = f"{'layer':>5} {'n':>3} {'dead':>4} {'nofire':>6} | " + " | ".join(f"{m[0]:^23}" for m in methods)
    sub = f"{'':>5} {'':>3} {'':>4} {'':>6} | " + " | ".join(f"{'P':>5} {'R':>5} {'F1':>5} {'r':>5}" for _ in methods)
    lines = [header, sub]
    per_neuron = []
    for layer in layers + ["all"]:
        ns = [n for n in neurons if layer == "all" or n.layer == layer]
        dead = [n for n in ns if fits[base_from][n].status == "dead"]
        live = [n for n in ns if n not in dead]
        scored = [n for n in live if fits[base_from][n].scores["n2g"].f1 is not None]
        cells = []
        for label, cfg_name, key in methods:
            vals = [fits[cfg_name][n].scores[key] for n in scored]
            mean = lambda attr: float(np.mean([getattr(v, attr) if getattr(v, attr) is not None else 0.0 for v in vals])) if vals else float("nan")
            cells.append(f"{mean('precision'):5.2f} {mean('recall'):5.2f} {mean('f1'):5.2f} {mean('pearson'):5.2f}")
        lines.append(f"{layer:>5} {len(ns):>3} {len(dead):>4} {len(live) - len(scored):>6} | " + " | ".join(cells))
    for n in neurons:
        per_neuron.append({"neuron": n.key, **{f"{label}": (fits[c][n].scores[k].to_dict() if fits[c][n].scores else None)
                                                 for label, c, k in methods}})
    print("\n".join(lines))
    print(f"\nmodel {model.spec} ({model.device}, {model.dtype}); corpus {corpus.source}: {len(excerpts)} excerpts x {corpus.length} tokens; "
          f"{args.per_layer} neurons/layer, seed {args.seed}; scan {scan_s:.1f}s; "
          + "; ".join(f"{n} {seconds[n] / len(jobs):.2f} s/neuron" for n in configs)
          + f"; {platform.machine()}, {torch.get_num_threads()} threads")
    print("precision/recall/F1 of the firing class pooled over test tokens (top + random excerpts), mean over neurons; "
          "r = Pearson; neurons without a firing test token excluded ('nofire'); dead = never fires on this corpus")
    if args.json:
        Path(args.json).write_text(json.dumps(per_neuron, indent=1))
    if memo:
        memo.save()
    return 0


class Memo:
    """Activations memoised by (neuron, sequence) so tuning runs that repeat requests skip the model."""

    def __init__(self, model, path):
        import pickle

        self.model, self.path = model, Path(path)
        self.table = pickle.loads(self.path.read_bytes()) if self.path.exists() else {}

    def evaluator(self, batch_tokens):
        memo = self

        class Cached(RowEvaluator):
            def __call__(self, seqs, neurons, scales):
                keys = [(n.key, tuple(s)) for n, s in zip(neurons, seqs)]
                miss = [i for i, k in enumerate(keys) if k not in memo.table]
                if miss:
                    got = RowEvaluator.__call__(self, [seqs[i] for i in miss], [neurons[i] for i in miss], [scales[i] for i in miss])
                    memo.table.update({keys[i]: v for i, v in zip(miss, got)})
                return [memo.table[k] for k in keys]

        return Cached(self.model, batch_tokens, int(self.model.occlusion_token_id))

    def save(self):
        import pickle

        self.path.write_bytes(pickle.dumps(self.table))


if __name__ == "__main__":
    sys.exit(main())
