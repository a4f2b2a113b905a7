"""Fast tuning of host-only settings: fit once with the model, then refit from the saved proposals.

Settings that change only how the graph is built from what the model was asked (calibration,
growing, quiet activators, END values; not pruning, importance or augmentation) give the same
graphs whether the model is called again or not. ``save`` runs the fidelity harness's neuron sample
once through the model and pickles every neuron's examples, proposals and training partition;
``refit`` rebuilds the graphs from that file under each ``--set`` variant in seconds and prints the
mean firing F1 and Pearson per mix and layer beside the two strongest lookups, and each variant's paired
difference from the first (and the first's from those lookups) with a 95 % bootstrap interval over neurons.

    python evaluation/refit.py save --seed 1 --out /tmp/fits1.pkl
    python evaluation/refit.py refit /tmp/fits1.pkl --set quiet_tokens=16 --set quiet_tokens=64

Tune on one sample (seed 1) and report on another (seed 0). The pickle is a scratch file of this
script (never read by the package).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import time
from pathlib import Path

import numpy as np

from n2g.activations import partition
from n2g.baselines import BASELINES
from n2g.config import preset
from n2g.distill import Proposals, finish_fit, pool_size, pruned_excerpts, top_k
from n2g.score import paired_difference, score_arrays

from harness import parse_set, sample_neurons

LOOKUPS = ("ngram2_max", "ngram3_0.75")
LAYERS = "0,5,10,15,20,25,29"


def save(args) -> int:
    from n2g.corpus import Corpus
    from n2g.engine import fit_many, store_job
    from n2g.models import cache_dir, load_model
    from n2g.pipeline import parse_indices
    from n2g.scan import scan_layers

    model = load_model("default")
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    neurons = sample_neurons(model.d_mlp, layers, args.per_layer, args.seed, args.sign)  # the sample of evaluation/fidelity.py
    cfg = preset("default", **parse_set(args.set))
    scans = scan_layers(model, corpus.excerpts, layers, k=top_k(cfg), pool_size=pool_size(cfg), cache_dir=cache_dir(),
                        corpus_key=corpus.tokens_key(), progress=False)
    excerpts = corpus.excerpts.tolist()
    is_train = partition(len(excerpts), cfg.held_out, cfg.seed, excerpts)
    from n2g.vocabulary import model_evidence

    written = model_evidence(model, corpus.excerpts, is_train, cfg, neurons, scans, cache_dir(), corpus.tokens_key())
    jobs = [store_job(scans[n.layer], n, is_train, written) for n in neurons]
    memo = None
    if args.memo:  # activations shared with evaluation/fidelity.py --memo: the same proposals as its runs
        from fidelity import Memo
        memo = Memo(model, args.memo)
    t0 = time.perf_counter()
    fits = fit_many(model, excerpts, jobs, cfg, group_size=len(jobs),
                    evaluator=memo.evaluator(cfg.batch_tokens) if memo else None)
    if memo:
        memo.save()
    print(f"# fitted {len(jobs)} neurons in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    data = {"neurons": neurons, "fits": {n: fits[n] for n in neurons}, "config": cfg.to_dict(),
            "evidence": {n: (j.evidence, {i: j.known[i] for i in j.evidence}) for n, j in zip(neurons, jobs)},
            "ids": corpus.excerpts.numpy(), "written": {n: j.written for n, j in zip(neurons, jobs)}}
    Path(args.out).write_bytes(pickle.dumps(data))
    return 0


def refit_all(data: dict, overrides: dict, lookups: bool) -> dict:
    cfg = preset("default", **overrides)
    ids_all = data["ids"]
    res = {}
    for n in data["neurons"]:
        fit = data["fits"][n]
        if fit.status == "dead" or fit.trace is None:
            continue
        evidence, known = data["evidence"][n]
        examples = fit.examples
        train_top = [e for e in examples if e.split == "train" and e.source == "top"]
        if cfg.max_pivots != 1:
            raise SystemExit("refit rebuilds proposal owners for one pivot per excerpt (max_pivots=1)")
        owners = pruned_excerpts(train_top, cfg)
        proposals = Proposals(fit.trace.pruned, fit.trace.importances, fit.trace.variants, owners)
        in_examples = {e.excerpt_index for e in examples if e.split == "train"}
        rest = [i for i in evidence if i not in in_examples]
        part = (rest, [ids_all[i].astype(np.int64) for i in rest], [np.asarray(known[i], np.float32) for i in rest])
        new = finish_fit(examples, part, proposals, cfg, data.get("written", {}).get(n))
        train_ids = ids_all[evidence]
        train_acts = np.stack([known[i] for i in evidence])
        for mix, sources in (("top", ("top",)), ("top+random", ("top", "random"))):
            test = [e for e in new.examples if e.split == "test" and e.source in sources]
            s = score_arrays([e.activations for e in test], [e.predicted for e in test])
            row = {"graph": (s.f1, s.pearson)}
            for name in LOOKUPS if lookups else ():
                b = BASELINES[name]().fit_arrays(list(train_ids), list(train_acts))
                sl = score_arrays([e.activations for e in test], b.predict_sequences([e.token_ids for e in test]))
                row[name] = (sl.f1, sl.pearson)
            res[(n, mix)] = row
        res[(n, "nodes")] = len(new.graph.nodes) - 1
    return res


def summary(res: dict, title: str) -> str:
    out = [title]
    for mix in ("top", "top+random"):
        keys = [k for k in res if k[1] == mix and res[k]["graph"][0] is not None]
        for method in res[keys[0]] if keys else ():
            f1 = np.mean([res[k][method][0] or 0.0 for k in keys])
            r = np.mean([res[k][method][1] or 0.0 for k in keys])
            layers: dict = {}
            for k in keys:
                layers.setdefault(k[0].layer, []).append(res[k][method][0] or 0.0)
            out.append(f"  {mix:<10} {method:<12} F1 {f1:.3f}  r {r:.3f}  | "
                       + " ".join(f"L{l} {np.mean(v):.2f}" for l, v in layers.items()))
    out.append(f"  nodes per graph {np.mean([v for k, v in res.items() if k[1] == 'nodes']):.1f}")
    return "\n".join(out)


def gaps(res: dict, base: dict, method: str = "graph") -> str:
    """Per mix, the mean paired F1 difference of ``res``'s graphs from ``base``'s ``method`` (the same
    neurons) with its 95 % bootstrap interval over neurons: is a variant's change more than the sample's noise?"""
    out = []
    for mix in ("top", "top+random"):
        keys = [k for k in res if k[1] == mix and res[k]["graph"][0] is not None and k in base and method in base[k]]
        d, lo, hi = paired_difference([res[k]["graph"][0] or 0.0 for k in keys], [base[k][method][0] or 0.0 for k in keys])
        out.append(f"  {mix:<10} graph - {'default' if method == 'graph' else method} F1 {d:+.3f} [{lo:+.3f}, {hi:+.3f}] (95% CI, {len(keys)} neurons)")
    return "\n".join(out)


def refit(args) -> int:
    data = pickle.loads(Path(args.fits).read_bytes())
    variants = [{}] + [parse_set(s.split()) for s in args.set]
    first = None
    for k, overrides in enumerate(variants):
        t0 = time.perf_counter()
        res = refit_all(data, overrides, lookups=k == 0)
        print(summary(res, f"{json.dumps(overrides) or 'default'} ({time.perf_counter() - t0:.1f}s)"), flush=True)
        if first is None:
            first = res
            for name in LOOKUPS:
                print(gaps(res, first, name), flush=True)
        else:
            print(gaps(res, first), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="fit the harness sample with the model and pickle what refit needs")
    s.add_argument("--seed", type=int, default=1)
    s.add_argument("--sign", choices=("positive", "negative"), default="positive")
    s.add_argument("--layers", default=LAYERS)
    s.add_argument("--per-layer", type=int, default=8)
    s.add_argument("--max-excerpts", type=int, default=1024)
    s.add_argument("--set", action="append", default=[])
    s.add_argument("--out", required=True)
    s.add_argument("--memo", default=None, help="activation memo of evaluation/fidelity.py --memo (read and extended)")
    r = sub.add_parser("refit", help="rebuild the graphs from a saved file under each --set variant")
    r.add_argument("fits")
    r.add_argument("--set", action="append", default=[],
                   help="one variant per --set, e.g. --set quiet_tokens=16; several overrides in one variant: "
                        "--set 'augment=true novel_variants=true'")
    args = ap.parse_args(argv)
    return save(args) if args.command == "save" else refit(args)


if __name__ == "__main__":
    sys.exit(main())
