"""Cost accounting: the forward and host work of fitting neurons, in machine-independent units.

Fits a seeded sample of SmolLM2 neurons (the fidelity harness's layer mix) with one preset and the
batched engine, then prints per stage and per neuron: forward calls, rows asked and run (identical
rows of a layer run once), real and padded token positions, layer-weighted positions (a pass stops
after the deepest layer it needs, so a layer-0 row costs 1/30 of a layer-29 row), and host CPU
seconds (fitting outside forward passes; saving results; report and rendering including `dot`).
It ends with projections, labelled as such, to a whole model on a named accelerator from a
tokens/s figure you give (full-depth forward positions per second), and to this CPU from the
throughput measured in this run.

    python evaluation/cost.py --layers 0,5,10,15,20,25,29 --per-layer 2 --max-excerpts 1024
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import torch

from n2g.activations import partition
from n2g.config import preset
from n2g.corpus import Corpus
from n2g.distill import pool_size, top_k
from n2g.engine import RowEvaluator, fit_many, store_job
from n2g.models import cache_dir, load_model
from n2g.pipeline import output_effects, parse_indices, versions
from n2g.records import NeuronId
from n2g.scan import scan_layers

from harness import parse_set, sample_neurons

STAGE_ORDER = ("excerpts", "prune", "post_context", "importance", "substitutes", "augment", "other")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0,5,10,15,20,25,29")
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the neuron sample")
    ap.add_argument("--max-excerpts", type=int, default=1024)
    ap.add_argument("--preset", default="default")
    ap.add_argument("--device-name", default="H100 (bf16)", help="accelerator named in the projection")
    ap.add_argument("--tokens-per-s", type=float, default=600_000.0,
                    help="full-depth forward positions per second on that accelerator (a figure you supply)")
    ap.add_argument("--no-report", action="store_true", help="skip timing the report and rendering")
    ap.add_argument("--set", action="append", default=[], help="preset override, e.g. --set n_prune=16")
    ap.add_argument("--host-workers", type=int, default=0, help="worker processes for the host work of fitting")
    ap.add_argument("--group-size", type=int, default=64,
                    help="neurons of a layer per chunk of output effects, as in `n2g run` (default 64)")
    args = ap.parse_args(argv)

    model = load_model(args.model)
    corpus = Corpus.build("default", model.encode, max_excerpts=args.max_excerpts)
    layers = parse_indices(args.layers, model.n_layers, "layer")
    neurons = sample_neurons(model.d_mlp, layers, args.per_layer, args.seed)
    overrides = parse_set(args.set)
    cfg = preset(args.preset, **overrides)
    t0 = time.perf_counter()
    scans = scan_layers(model, corpus.excerpts, layers, k=top_k(cfg), pool_size=pool_size(cfg), cache_dir=cache_dir(),
                        corpus_key=corpus.tokens_key(), progress=False, seed=cfg.seed)
    scan_s = time.perf_counter() - t0
    excerpts = corpus.excerpts.tolist()
    is_train = partition(len(excerpts), cfg.held_out, cfg.seed, excerpts)
    from n2g.vocabulary import model_evidence

    written = model_evidence(model, corpus.excerpts, is_train, cfg, neurons, scans, cache_dir(), corpus.tokens_key())
    jobs = [store_job(scans[n.layer], n, is_train, written) for n in neurons]
    evaluator = RowEvaluator(model, cfg.batch_tokens, int(model.occlusion_token_id))
    t0 = time.perf_counter()
    fits = fit_many(model, excerpts, jobs, cfg, group_size=len(jobs), evaluator=evaluator, host_workers=args.host_workers)
    fit_s = time.perf_counter() - t0
    live = [j for j in jobs if fits[j.neuron].status != "dead"]
    n = max(len(live), 1)
    cost = evaluator.cost

    save_cpu = save_serial = report_cpu = report_children = plots_cpu = 0.0
    if live:
        from n2g.pipeline import EffectsAhead, _describe_and_save, _worker_setup, store_values
        from n2g.store import RunStore

        with tempfile.TemporaryDirectory() as tmp:
            store = RunStore(os.path.join(tmp, "run"))
            store.open({"cost": True}, {"name": "cost", "model": model.info(), "versions": versions(),
                                        "corpus": {"source": corpus.source, "n_excerpts": len(excerpts), "length": corpus.length}})
            # What the main process keeps when workers describe and save (--host-workers > 0): output
            # effects, in chunks of one fitting group of a layer (a whole-layer run's chunks are full:
            # each sampled layer's chunk holds its sampled neurons and the next ones up to the group
            # size), and what a worker needs to read the neuron's stored activations.
            chunk = args.group_size
            c0 = time.thread_time()
            for layer in sorted({j.neuron.layer for j in live}):
                mine = sorted(j.neuron for j in live if j.neuron.layer == layer)
                fill = [NeuronId(layer, i) for i in range(model.d_mlp) if NeuronId(layer, i) not in mine]
                effects = EffectsAhead(model, (mine + fill)[:max(chunk, len(mine))], chunk=chunk)
                for neuron in mine:
                    effects(neuron)
            n_effects = sum(max(chunk, sum(j.neuron.layer == layer for j in live)) for layer in {j.neuron.layer for j in live})
            effects_s = (time.thread_time() - c0) / n_effects * len(live)
            c0 = time.thread_time()
            shipped = {j.neuron: store_values(scans[j.neuron.layer], j.neuron) for j in live}
            save_serial = effects_s + time.thread_time() - c0
            # What a worker does per neuron: describe (display strings, histogram, band examples read
            # from the store file) and save; timed here, in this process, as one worker.
            _worker_setup(model.token_strings(range(model.vocab_size)), corpus.excerpts.numpy())
            effects = {j.neuron: output_effects(model, j.neuron) for j in live}
            c0 = time.thread_time()
            for j in live:
                _describe_and_save(str(store.root), j.neuron, scans[j.neuron.layer].stats(j.neuron.index, j.neuron.sign),
                                   fits[j.neuron], 0.0, effects[j.neuron], *shipped[j.neuron])
            store.write_scores_table()
            save_cpu = save_serial + time.thread_time() - c0
            if not args.no_report:
                import n2g.report as report

                # The report's plots (and the import of matplotlib) cost the same for 14 neurons as
                # for 46,080: timed apart, and counted once per run in the projection.
                draw = report._plots

                def timed_plots(rep):
                    nonlocal plots_cpu
                    t = time.thread_time()
                    try:
                        return draw(rep)
                    finally:
                        plots_cpu += time.thread_time() - t

                report._plots = timed_plots
                c0, k0 = time.thread_time(), children_cpu()
                try:
                    report.build_all(store.root)
                finally:
                    report._plots = draw
                report_cpu, report_children = time.thread_time() - c0 - plots_cpu, children_cpu() - k0

    print(f"{'stage':<13}{'calls':>7}{'asked/n':>9}{'rows/n':>8}{'real/n':>9}{'padded/n':>10}{'pad x':>7}{'weighted/n':>12}")
    rows = [(s, cost.stages[s]) for s in STAGE_ORDER if s in cost.stages] + [("all", cost.total())]
    for name, s in rows:
        ratio = s.padded / s.real if s.real else float("nan")
        print(f"{name:<13}{s.calls:>7}{s.asked / n:>9.1f}{s.rows / n:>8.1f}{s.real / n:>9.0f}{s.padded / n:>10.0f}{ratio:>7.2f}{s.weighted / n:>12.0f}")
    tot = cost.total()
    host = cost.host_cpu / n
    serial = host + save_serial / n  # the main process with --host-workers > 0
    parallel = cost.compute_cpu / n + (save_cpu - save_serial) / n + report_cpu / n + report_children / n
    print(f"\nhost CPU per neuron, main process (serial, holds up the model): fitting {host:.3f} s + output effects "
          f"(chunks of {args.group_size} neurons of a layer) and store reference for saving {save_serial / n:.3f} s = {serial:.3f} s")
    print(f"host CPU per neuron, spread over worker processes: graph building, calibration, prediction, scoring "
          f"{cost.compute_cpu / n:.3f} s; describing and saving the result {(save_cpu - save_serial) / n:.3f} s; "
          f"viewer page, index and report {report_cpu / n:.3f} s; dot {report_children / n:.3f} s; total {parallel:.3f} s")
    print(f"host CPU once per run: the report's plots (matplotlib import and drawing) {plots_cpu:.1f} s")
    print(f"forward: {cost.forward_calls} calls, {cost.forward_seconds:.1f} s wall; fit wall {fit_s:.1f} s = {fit_s / n:.2f} s/neuron "
          f"({len(live)} live of {len(jobs)} neurons; {args.host_workers} host worker process(es))")
    cpu_rate = tot.weighted / cost.forward_seconds if cost.forward_seconds else float("nan")
    print(f"measured here: {cpu_rate:,.0f} full-depth-equivalent positions/s in forward passes; scan {scan_s:.1f} s "
          f"({'cached' if scan_s < 5 else 'computed'})")

    # Projection to the whole model, labelled as one.
    total_neurons = model.n_layers * model.d_mlp
    scan_positions = corpus.excerpts.numel()  # one full-depth pass over the corpus covers every layer
    per_neuron_weighted = tot.weighted / n
    gpu_min = (total_neurons * per_neuron_weighted + scan_positions) / args.tokens_per_s / 60
    serial_min = total_neurons * serial / 60
    cores = 16
    parallel_min = total_neurons * parallel / (cores - 1) / 60
    print(f"\nPROJECTION (not measured): whole {model.spec} ({total_neurons:,} neurons) on one {args.device_name} with "
          f"{cores} CPU cores, at {args.tokens_per_s:,.0f} full-depth positions/s (a figure supplied, not measured here): "
          f"GPU forward {gpu_min:.1f} min + main-process host work {serial_min:.1f} min, overlapped with "
          f"{parallel_min:.1f} min of worker host work on {cores - 1} cores, then the report's plots {plots_cpu / 60:.2f} min: about "
          f"{max(gpu_min + serial_min, parallel_min) + plots_cpu / 60:.0f} min")
    if not args.no_report:  # the same run with --no-report: pages, report and dot come later (`n2g report`)
        bare_min = total_neurons * (cost.compute_cpu / n + (save_cpu - save_serial) / n) / (cores - 1) / 60
        print(f"PROJECTION (not measured): the same with --no-report (graphs, results and scores; `n2g report` "
              f"renders afterwards): worker host work {bare_min:.1f} min: about {max(gpu_min + serial_min, bare_min):.0f} min")
    print(f"PROJECTION (not measured): whole model on this CPU: forward {total_neurons * per_neuron_weighted / cpu_rate / 3600:.1f} h "
          f"at the throughput measured above")
    print(f"\n{model.spec} ({model.device}, {model.dtype}); preset {args.preset} {' '.join(args.set)}; {len(jobs)} neurons ({args.per_layer}/layer in "
          f"{args.layers}, sample seed {args.seed}); corpus {len(excerpts)} x {corpus.length}; batch_tokens {cfg.batch_tokens}; "
          f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, torch {torch.__version__} {torch.get_num_threads()} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
