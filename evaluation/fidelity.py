"""Fidelity harness: how well graphs predict SmolLM2 neurons across depth, per preset and baseline.

Samples a fixed set of neurons (seeded) in each of the given layers of the embedded SmolLM2 and
the embedded corpus, partitions the corpus once (training / held-out excerpts), fits every preset,
and prints per layer and for two test mixes (held-out top excerpts only; held-out top + random)
the mean firing F1 and Pearson correlation of each preset, of token lookup and of the best n-gram
lookup (every lookup fitted on every token of the training partition), the graph size, and how
many held-out firing tokens have an activator never seen firing in training.

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

from n2g.activations import partition
from n2g.baselines import BASELINES
from n2g.config import preset
from n2g.corpus import Corpus
from n2g.distill import pool_size, top_k
from n2g.engine import RowEvaluator, fit_many, store_job
from n2g.models import cache_dir, load_model
from n2g.pipeline import parse_indices
from n2g.scan import scan_layers
from n2g.score import paired_difference, score_arrays

from harness import parse_set, sample_neurons


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="seed of the neuron sample")
    ap.add_argument("--sign", choices=("positive", "negative"), default="positive",
                    help="which side of each sampled neuron to fit (negative: the activation times -1)")
    ap.add_argument("--max-excerpts", type=int, default=1024)
    ap.add_argument("--presets", default="paper,default")
    ap.add_argument("--set", action="append", default=[], help="override for the default preset, e.g. --set max_pivots=2")
    ap.add_argument("--json", default=None, help="also write per-neuron scores here")
    ap.add_argument("--memo", default=None, help="pickle file memoising activations between harness runs (tuning only)")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    neurons = sample_neurons(model.d_mlp, layers, args.per_layer, args.seed, args.sign)
    overrides = parse_set(args.set)
    configs = {name: preset(name, **(overrides if name == "default" else {})) for name in args.presets.split(",")}
    split_cfg = next(iter(configs.values()))
    if any((c.held_out, c.seed) != (split_cfg.held_out, split_cfg.seed) for c in configs.values()):
        raise SystemExit("every preset must share held_out and seed (one corpus-level split)")
    k = max(top_k(c) for c in configs.values())
    pool = max(pool_size(c) for c in configs.values())
    t0 = time.perf_counter()
    scans = scan_layers(model, corpus.excerpts, layers, k=k, pool_size=pool, cache_dir=cache_dir(),
                        corpus_key=corpus.tokens_key(), progress=False)
    scan_s = time.perf_counter() - t0
    excerpts = corpus.excerpts.tolist()
    ids_all = corpus.excerpts.numpy()
    is_train = partition(len(excerpts), split_cfg.held_out, split_cfg.seed, excerpts)
    from n2g.vocabulary import model_evidence

    written = model_evidence(model, corpus.excerpts, is_train, max(configs.values(), key=lambda c: (c.written, c.vocabulary)), neurons, scans, cache_dir(), corpus.tokens_key())
    jobs = [store_job(scans[n.layer], n, is_train, written) for n in neurons]
    fits, seconds = {}, {}
    memo = Memo(model, args.memo) if args.memo else None
    for name, cfg in configs.items():
        t0 = time.perf_counter()
        evaluator = memo.evaluator(cfg.batch_tokens) if memo else None
        fits[name] = fit_many(model, excerpts, jobs, cfg, group_size=len(jobs), evaluator=evaluator)
        seconds[name] = time.perf_counter() - t0
        print(f"# {name}: {len(jobs)} neurons in {seconds[name]:.1f}s ({seconds[name] / len(jobs):.2f} s/neuron)", file=sys.stderr)

    # Scores per neuron, method and test mix; baselines refitted here on the stored training partition.
    mixes = {"top": ("top",), "top+random": ("top", "random")}
    base_from = "default" if "default" in configs else next(iter(configs))
    scores: dict = {}
    unseen: dict = {}
    for job in jobs:
        n = job.neuron
        if fits[base_from][n].status == "dead":
            continue
        train_rows = job.evidence
        train_ids = ids_all[train_rows]
        train_acts = np.stack([job.known[i] for i in train_rows])
        fired_tokens = set(np.unique(train_ids[train_acts >= 0.5]).tolist())
        for mix, sources in mixes.items():
            test = {name: [e for e in fits[name][n].examples if e.split == "test" and e.source in sources] for name in configs}
            ref = test[base_from]
            true = [np.asarray(e.activations) for e in ref]
            cell = {name: score_arrays([e.activations for e in test[name]], [e.predicted for e in test[name]]) for name in configs}
            for bname, make in BASELINES.items():
                if bname == "zero":
                    continue
                b = make().fit_arrays(list(train_ids), list(train_acts))
                cell[bname] = score_arrays(true, b.predict_sequences([e.token_ids for e in ref]))
            scores[(n, mix)] = cell
            firing = [(t, a) for e in ref for t, a in zip(e.token_ids, e.activations) if a >= 0.5]
            unseen[(n, mix)] = (sum(t not in fired_tokens for t, _ in firing), len(firing))

    lines = []
    for mix in mixes:
        live = [n for n in neurons if (n, mix) in scores and scores[(n, mix)][base_from].f1 is not None]
        methods = list(configs) + [b for b in BASELINES if b != "zero"]
        mean = lambda ns, m, attr: float(np.mean([getattr(scores[(n, mix)][m], attr) or 0.0 for n in ns])) if ns else float("nan")
        overall = {m: mean(live, m, "f1") for m in methods}
        best = max((b for b in methods if b not in configs), key=lambda b: overall[b])
        shown = list(configs) + ["token_lookup", best]
        lines.append(f"\n## test mix: held-out {mix} (best full-partition lookup overall: {best})\n")
        lines.append("| layer | n | " + " | ".join(f"{m} F1 | {m} r" for m in shown)
                     + f" | {base_from} - {best} F1 [95% CI] | best lookup per layer | graph nodes | unseen activators | ceiling F1 |")
        lines.append("|" + "---|" * (2 * len(shown) + 7))
        for layer in layers + ["all"]:
            ns = [n for n in live if layer == "all" or n.layer == layer]
            per_layer_best = max((b for b in methods if b not in configs), key=lambda b: mean(ns, b, "f1")) if ns else "-"
            nodes = np.mean([sum(v for key, v in fits[base_from][n].graph.stats().items()
                                 if key in ("activator", "context", "wildcard")) for n in ns]) if ns else float("nan")
            u = [unseen[(n, mix)] for n in ns]
            frac = sum(a for a, _ in u) / max(sum(b for _, b in u), 1)
            seen = [(b - a) / b for a, b in u if b]  # per neuron: share of firing tokens a lookup-style graph can reach
            ceiling = float(np.mean([2 * s / (1 + s) for s in seen])) if seen else float("nan")
            gap = paired_difference([scores[(n, mix)][base_from].f1 or 0.0 for n in ns], [scores[(n, mix)][best].f1 or 0.0 for n in ns])
            lines.append(f"| {layer} | {len(ns)} | " + " | ".join(f"{mean(ns, m, 'f1'):.3f} | {mean(ns, m, 'pearson'):.3f}" for m in shown)
                         + f" | {gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}] | {per_layer_best} {mean(ns, per_layer_best, 'f1') if ns else float('nan'):.3f} | {nodes:.0f} | {100 * frac:.1f}% | {ceiling:.3f} |")
        lines.append("\nAll lookups (overall mean F1): " + ", ".join(f"{b} {overall[b]:.3f}" for b in methods if b not in configs))
    print("\n".join(lines))
    print(f"\nmodel {model.spec} ({model.device}, {model.dtype}); corpus {corpus.source}: {len(excerpts)} excerpts x {corpus.length} tokens; "
          f"partition {int(is_train.sum())} training / {int((~is_train).sum())} held-out excerpts (held_out {split_cfg.held_out}, seed {split_cfg.seed}); "
          f"{args.per_layer} neurons/layer ({args.sign} side), sample seed {args.seed}; scan {scan_s:.1f}s; "
          + "; ".join(f"{n} {seconds[n] / len(jobs):.2f} s/neuron" for n in configs)
          + f"; {platform.machine()}, {torch.get_num_threads()} threads")
    print("F1 of the firing class pooled over held-out test tokens, mean over neurons (neurons without a firing test token "
          "excluded); r = Pearson; lookups are fitted on every token of the training partition; 'unseen activators': "
          "held-out firing tokens whose token never fires in training (no lookup-style graph can recall them); 'ceiling F1': "
          "mean over neurons of the F1 of a predictor exact on every other token and silent on those (2s / (1 + s), s the "
          "share of firing tokens seen firing in training): the most a graph can score without model-measured variants; "
          "'[95% CI]': a paired bootstrap over the neurons of the row (n2g.score.paired_difference), how far the mean "
          "difference could move with another sample of neurons")
    if args.json:
        rows = [{"neuron": n.key, "mix": mix, **{m: s.to_dict() for m, s in cell.items()}} for (n, mix), cell in scores.items()]
        Path(args.json).write_text(json.dumps(rows, indent=1))
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
            def __call__(self, seqs, neurons, scales, stages=None):
                keys = [(n.key, tuple(s)) for n, s in zip(neurons, seqs)]
                miss = [i for i, k in enumerate(keys) if k not in memo.table]
                if miss:
                    stages = stages or ["other"] * len(seqs)
                    got = RowEvaluator.__call__(self, [seqs[i] for i in miss], [neurons[i] for i in miss],
                                                [scales[i] for i in miss], [stages[i] for i in miss])
                    memo.table.update({keys[i]: v for i, v in zip(miss, got)})
                return [memo.table[k] for k in keys]

        return Cached(self.model, batch_tokens, int(self.model.occlusion_token_id))

    def save(self):
        import pickle

        self.path.write_bytes(pickle.dumps(self.table))


if __name__ == "__main__":
    sys.exit(main())
