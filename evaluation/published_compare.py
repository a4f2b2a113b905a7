"""The published N2G code and the ``paper`` preset on the same SmolLM2 neurons and corpus-level split.

The published implementation (albertsgarde/Neuron2Graph, package ``n2g/``) is not part of this project:
fetch it into a scratch folder with model-free stubs (see evaluation/results/paper_vs_published.md) and
point ``--published`` at it. Its modules are loaded under the name ``pubn2g`` (its ``__init__`` is not
run), so both packages live in one process and share the model and the activation store.

Neurons: the harness's sample (``default_rng(seed).choice(d_mlp, per_layer)`` sorted, layer by layer),
the first ``--take`` of each layer. Split: ``partition(n_excerpts, 0.5, 0, excerpts)``; a neuron's training excerpts
are its best 10 training-partition excerpts, its test excerpts its best 10 held-out ones (the harness's
top-only mix). The published code is fed those excerpts as text whose round trip keeps the ids
(``demo/shim.py: IdTextTokenizer``), without augmentation (``NoAugmenter``: DistilBERT is a hub download),
with ``prepend_bos=False`` (our model prepends BOS itself) and the occlusion token of ``"``.

    nice python evaluation/published_compare.py --published /tmp/n2g_published --take 2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import platform
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from n2g.activations import partition
from n2g.config import preset
from n2g.corpus import Corpus
from n2g.engine import fit_many, store_job
from n2g.examples import split_examples
from n2g.models import cache_dir, load_model
from n2g.pipeline import parse_indices
from n2g.records import NeuronId
from n2g.scan import scan_layers
from n2g.score import score_arrays


def load_published(root: Path):
    """The published package's modules as ``pubn2g.*`` (no ``__init__``) and the demo shims."""
    pkg = types.ModuleType("pubn2g")
    pkg.__path__ = [str(root / "n2g")]
    sys.modules["pubn2g"] = pkg
    for extra in ("deps", "stubs", "demo"):
        sys.path.append(str(root / extra))  # after the venv, so only missing packages come from the stubs
    return (importlib.import_module("pubn2g.train_and_eval"), importlib.import_module("pubn2g.fit"),
            importlib.import_module("shim"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--published", default="/tmp/n2g_published")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=8)
    ap.add_argument("--take", type=int, default=2, help="neurons per layer fitted (the first of the sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-excerpts", type=int, default=1024)
    ap.add_argument("--k", type=int, default=100, help="top excerpts scanned (100 shares the harness's scan cache)")
    ap.add_argument("--pool", type=int, default=200, help="random pool scanned (200 shares the harness's scan cache)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    tae, fit, shim = load_published(Path(args.published))
    model = load_model("default")
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    rng = np.random.default_rng(args.seed)
    neurons = [NeuronId(l, int(i)) for l in layers
               for i in sorted(rng.choice(model.d_mlp, args.per_layer, replace=False))[: args.take]]
    paper = preset("paper")
    t0 = time.perf_counter()
    scans = scan_layers(model, corpus.excerpts, layers, k=args.k, pool_size=args.pool, cache_dir=cache_dir(),
                        corpus_key=corpus.tokens_key(), progress=False)
    scan_s = time.perf_counter() - t0
    excerpts = corpus.excerpts.tolist()
    is_train = partition(len(excerpts), paper.held_out, paper.seed, excerpts)
    jobs = [store_job(scans[n.layer], n, is_train) for n in neurons]

    t0 = time.perf_counter()
    ours = fit_many(model, excerpts, jobs, paper, group_size=len(jobs))
    ours_s = time.perf_counter() - t0

    quote = model.encode('"')
    assert len(quote) == 1, quote
    cfg = fit.FitConfig(fit.PruneConfig(prepend_bos=False), fit.ImportanceConfig(prepend_bos=False, masking_token=quote[0]),
                        fit.AugmentationConfig(prepend_bos=False))
    tok = shim.IdTextTokenizer(model.token_strings, pad_id=0)
    rows = []
    pub_s = 0.0
    for job in jobs:
        n = job.neuron
        mine = ours[n]
        if mine.status == "dead" or not job.scale > 0:
            rows.append({"neuron": n.key, "status": "dead"})
            continue
        split = split_examples(job.ranked, job.pool, paper, is_train)
        test_ours = [e for e in mine.examples if e.split == "test" and e.source == "top"]
        assert [e.excerpt_index for e in test_ours] == split.test_top
        both = [e for e in mine.examples if e.split == "test"]

        def feat(t, layer=n.layer, index=n.index):
            x = t[None] if t.dim() == 1 else t
            out = model.activations(x, None, [(layer, index)])[..., 0].float()
            return out[0] if t.dim() == 1 else out

        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            _, stats, acts, preds = tae.train_and_eval(feat, tok, shim.NoAugmenter(),
                                                       [tok.text(excerpts[i]) for i in split.train_top],
                                                       [tok.text(excerpts[i]) for i in split.test_top],
                                                       float(job.scale), 0.5, cfg)
        pub_s += time.perf_counter() - t0
        width = len(excerpts[0])
        shape = (len(split.test_top), -1)  # flattened, each excerpt padded to 256 tokens: keep the real ones
        published = score_arrays(list(np.asarray(acts).reshape(shape)[:, :width]),
                                 list(np.asarray(preds).reshape(shape)[:, :width]), 0.5)
        pub_pred = np.asarray(preds).reshape(shape)[:, :width] >= 0.5
        our_pred = np.array([e.predicted for e in test_ours]) >= 0.5
        agree = float(np.mean(pub_pred == our_pred))  # test tokens where both predict the same firing
        mine_top = score_arrays([e.activations for e in test_ours], [e.predicted for e in test_ours], 0.5)
        mine_both = score_arrays([e.activations for e in both], [e.predicted for e in both], 0.5)
        rows.append({"neuron": n.key, "layer": n.layer, "status": "fitted",
                     "published_f1": published.f1, "published_own_f1": float(stats.firing.f1_score),
                     "published_recall": published.recall, "published_precision": published.precision,
                     "paper_f1": mine_top.f1, "paper_recall": mine_top.recall, "paper_precision": mine_top.precision,
                     "paper_f1_top_random": mine_both.f1, "agree": agree, "paper_nodes": mine.graph.stats() if mine.graph else None})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    lines = ["| layer | n | published F1 | paper F1 | paper - published | published recall | paper recall | paper F1 (top+random) | same firing prediction |",
             "|---|---|---|---|---|---|---|---|---|"]
    for layer in layers + ["all"]:
        live = [r for r in rows if r["status"] == "fitted" and (layer == "all" or r["layer"] == layer)
                and r["published_f1"] is not None and r["paper_f1"] is not None]
        m = lambda key: float(np.mean([r[key] or 0.0 for r in live])) if live else float("nan")
        lines.append(f"| {layer} | {len(live)} | {m('published_f1'):.3f} | {m('paper_f1'):.3f} | "
                     f"{m('paper_f1') - m('published_f1'):+.3f} | {m('published_recall'):.3f} | {m('paper_recall'):.3f} | "
                     f"{m('paper_f1_top_random'):.3f} | {100 * m('agree'):.1f}% |")
    print("\n".join(lines))
    fitted = sum(r["status"] == "fitted" for r in rows)
    print(f"\nmodel {model.spec} ({model.device}, {model.dtype}); corpus {corpus.source}: {len(excerpts)} excerpts x "
          f"{corpus.length} tokens; partition {int(is_train.sum())} training / {int((~is_train).sum())} held-out; "
          f"neurons: first {args.take} of {args.per_layer} per layer (sample seed {args.seed}); scan {scan_s:.1f}s; "
          f"paper {ours_s / max(len(jobs), 1):.2f} s/neuron, published {pub_s / max(fitted, 1):.2f} s/neuron; "
          f"{platform.machine()}, {torch.get_num_threads()} threads")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
