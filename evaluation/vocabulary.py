"""Vocabulary benchmark: what the vocabulary in context (n2g.vocabulary) costs a run, measured.

Runs the stage for the given layers on the embedded corpus with no cache (so every candidate token is read
after every context) and prints seconds, CPU seconds, token positions through the model, the positions the
same numbers would take as whole rows (context + token), the (token, neuron) pairs kept and the peak
resident memory. On a CPU this stage is most of a first run's model work after the scan; it is cached per
layer, so later runs over the same layers read it back.

    python evaluation/vocabulary.py --layers 0,5 --max-excerpts 512
    python evaluation/vocabulary.py --layers 0,5,10,15,20,25,29 --max-excerpts 1024
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import time

import numpy as np

from n2g.activations import partition
from n2g.config import preset
from n2g.corpus import Corpus
from n2g.distill import pool_size, top_k
from n2g.models import cache_dir, load_model
from n2g.pipeline import parse_indices
from n2g.records import NeuronId, Sign
from n2g.scan import scan_layers
from n2g.vocabulary import candidates, vocabulary_tokens


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,5")
    ap.add_argument("--max-excerpts", type=int, default=512)
    args = ap.parse_args(argv)
    model = load_model("default")
    cfg = preset("default")
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    scans = scan_layers(model, corpus.excerpts, layers, k=top_k(cfg), pool_size=pool_size(cfg), cache_dir=cache_dir(),
                        corpus_key=corpus.tokens_key(), progress=False)
    is_train = partition(len(corpus.excerpts), cfg.held_out, cfg.seed, corpus.excerpts)
    n_cand = len(candidates(model, corpus.excerpts.numpy(), is_train, max(cfg.min_count, 2)))
    neurons = [NeuronId(l, 0, Sign.POSITIVE) for l in layers]
    cpu0, t0 = time.process_time(), time.perf_counter()
    got = vocabulary_tokens(model, corpus.excerpts, is_train, cfg, neurons, scans, cache_dir=None)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    positions = n_cand * cfg.vocabulary
    pairs = {l: len(v.tokens) for l, v in got.layers.items()}
    per_neuron = {l: np.bincount(v.neurons, minlength=model.d_mlp) for l, v in got.layers.items()}
    print("| layers | excerpts | candidates | contexts x tokens | positions | as whole rows | s | CPU s | pairs kept per layer | neurons with a pair | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {','.join(map(str, layers))} | {len(corpus.excerpts)} | {n_cand:,} | {cfg.vocabulary} x {cfg.vocabulary_context} "
          f"| {positions:,} | {positions * (cfg.vocabulary_context + 1):,} | {seconds:.1f} | {cpu:.1f} "
          f"| {', '.join(f'L{l} {n:,}' for l, n in pairs.items())} "
          f"| {', '.join(f'L{l} {int((c > 0).sum())}' for l, c in per_neuron.items())} "
          f"| {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} |")
    print(f"\nmodel default ({model.device}, {model.dtype}); {platform.machine()}, {platform.python_version()}; "
          f"positions: one per candidate and context (the context runs once); deepest layer {max(layers)} of {model.n_layers}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
