"""Speed benchmark: the batched engine against one-at-a-time engines, on the same neurons.

Engines (same stages, same graphs):
  sequential   one neuron at a time, one sequence per forward pass (the published method's order)
  per-neuron   one neuron at a time, each stage's sequences in padded batches
  batched      many neurons at a time sharing padded batches (n2g's engine)

Prints seconds, neurons/s and the speed-up over ``sequential`` per engine, and checks the graphs
agree. The corpus scan is timed separately (it is shared by all engines).

    python evaluation/speed.py --layers 0,5,10,15,20,25,29 --per-layer 2 --max-excerpts 512
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

from n2g.config import preset
from n2g.corpus import Corpus
from n2g.activations import partition
from n2g.distill import pool_size, top_k
from n2g.engine import RowEvaluator, fit_many, store_job
from n2g.models import cache_dir, load_model
from n2g.pipeline import parse_indices
from n2g.scan import scan_layers

from harness import sample_neurons


class OneSequence(RowEvaluator):
    """Evaluates one sequence per forward pass."""

    def __call__(self, seqs, neurons, scales, stages=None):
        out = []
        stages = stages or ["other"] * len(seqs)
        for s, n, sc, st in zip(seqs, neurons, scales, stages):
            out.extend(RowEvaluator.__call__(self, [s], [n], [sc], [st]))
        return out


def structure(graph) -> list:
    return sorted((-2 if n.token_id is None else n.token_id, n.depth, len(n.children), n.end is not None) for n in graph.nodes) if graph else []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--max-excerpts", type=int, default=512)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--engines", default="sequential,per-neuron,batched")
    ap.add_argument("--group-size", type=int, default=256)
    ap.add_argument("--batch-tokens", type=int, default=None)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    cfg = preset(args.preset, batch_tokens=args.batch_tokens)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    neurons = sample_neurons(model.d_mlp, layers, args.per_layer, args.seed)
    t0 = time.perf_counter()
    scans = scan_layers(model, corpus.excerpts, layers, k=top_k(cfg), pool_size=pool_size(cfg),
                        seed=cfg.seed, batch_size=64, progress=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    scan_s = time.perf_counter() - t0
    excerpts = corpus.excerpts.tolist()
    is_train = partition(len(excerpts), cfg.held_out, cfg.seed, excerpts)
    from n2g.vocabulary import model_evidence

    written = model_evidence(model, corpus.excerpts, is_train, cfg, neurons, scans, cache_dir(), corpus.tokens_key())
    jobs = [store_job(scans[n.layer], n, is_train, written) for n in neurons]  # as the pipeline: examples from the store
    timings, graphs = {}, {}
    for engine in args.engines.split(","):
        group = 1 if engine in ("sequential", "per-neuron") else args.group_size
        evaluator = (OneSequence if engine == "sequential" else RowEvaluator)(model, cfg.batch_tokens, int(model.occlusion_token_id))
        t0 = time.perf_counter()
        fits = fit_many(model, excerpts, jobs, cfg, group_size=group, evaluator=evaluator)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        timings[engine] = time.perf_counter() - t0
        graphs[engine] = {n: structure(f.graph) for n, f in fits.items()}
        print(f"# {engine}: {timings[engine]:.1f}s", file=sys.stderr, flush=True)
    first = next(iter(graphs))
    same = {e: sum(graphs[e][n] == graphs[first][n] for n in neurons) for e in graphs}
    base = timings.get("sequential")
    print(f"{'engine':<12}{'seconds':>10}{'s/neuron':>10}{'neurons/s':>11}{'vs sequential':>15}{'same graphs':>13}")
    for e, t in timings.items():
        ratio = f"{base / t:14.1f}x" if base else "             -"
        print(f"{e:<12}{t:>10.1f}{t / len(jobs):>10.2f}{len(jobs) / t:>11.3f}{ratio:>15}{same[e]:>8}/{len(jobs)}")
    dev = torch.cuda.get_device_name() if model.device.type == "cuda" else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"\nmodel {model.spec} on {dev}, {model.dtype}; preset {args.preset}; {len(jobs)} neurons "
          f"({args.per_layer} per layer in {args.layers}, seed {args.seed}); corpus {len(excerpts)} excerpts x {corpus.length}; "
          f"model load {load_s:.1f}s; scan of {len(layers)} layers {scan_s:.1f}s ({corpus.excerpts.numel() / scan_s:,.0f} tok/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
