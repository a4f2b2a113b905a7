"""The ``n2g`` command line: a thin layer over :mod:`n2g.pipeline` and the report/viewer modules.

``main(argv) -> int``; progress and logs go to stderr, results to stdout and files. Every mistake a
user can make comes back as one line on stderr and exit code 2, never a traceback. When the reader
of stdout goes away (``n2g ... | head``) the command stops quietly with exit code 141, as Unix
tools killed by SIGPIPE do.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .config import PRESETS
from .errors import N2GError


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="subject model: 'default' (packaged SmolLM2-135M-Instruct), a .gguf file, a local HF directory or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")


def _corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="default",
                   help="'default' (offline Python docs), a text/JSONL file or directory, or hf:NAME[:CONFIG]")
    p.add_argument("--text-field", default="text", help="JSONL field holding the text (default: text)")
    p.add_argument("--excerpt-length", type=int, default=64, help="tokens per excerpt (default 64)")
    p.add_argument("--max-excerpts", type=int, default=None, help="use only the first N excerpts of the corpus")


def _fit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="distiller settings (default: default)")
    p.add_argument("--augment", dest="augment", action="store_true", default=None, help="make variants of important tokens")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no augmentation")
    p.add_argument("--substitutes", default="model",
                   help="augmentation substitutes: 'model' (the subject model's next-token guesses) or mlm:NAME (a masked LM)")
    p.add_argument("--out", default=None, help="run directory (default: graphs/<model>-<preset>)")
    p.add_argument("--group-size", type=int, default=64, help="neurons fitted together in shared batches")
    p.add_argument("--store-tokens", type=int, default=None,
                   help="token budget of each layer's on-disk activation store (default 131072; larger corpora keep a seeded subset)")
    p.add_argument("--batch-tokens", type=int, default=None,
                   help="tokens per fitting batch (default: sized to free GPU memory; 16384 on CPU)")
    p.add_argument("--scan-batch", type=int, default=None,
                   help="excerpts per scan batch (default: sized to free GPU memory; 32 on CPU)")
    p.add_argument("--host-workers", type=int, default=None,
                   help="worker processes for graph building and scoring (default: all cores but one on a GPU, 0 on CPU)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="fit on Ray workers: a local cluster, or the cluster at ADDRESS (needs pip install 'n2g[ray]')")
    p.add_argument("--ray-workers", type=int, default=None,
                   help="Ray workers (default: one per GPU of the cluster, else one per CPU)")
    p.add_argument("--no-report", dest="report", action="store_false", help="skip rendering, report and viewer")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="n2g", description="Neuron to Graph: explain single neurons as token-pattern graphs.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="describe a subject model", description="Print a model's architecture, size, device and dtype.")
    _model_args(p)

    p = sub.add_parser("fit", help="distil one neuron", description="Distil one neuron into a graph, score it and save it.")
    _model_args(p)
    _corpus_args(p)
    p.add_argument("--layer", type=int, required=True, help="layer index")
    p.add_argument("--neuron", type=int, required=True, help="neuron index within the layer's MLP")
    p.add_argument("--sign", default="positive", choices=["positive", "negative"], help="which side to distil")
    _fit_args(p)

    p = sub.add_parser("run", help="distil many neurons", description="Distil many neurons (layers x neurons) with batched fitting; resumable.")
    _model_args(p)
    _corpus_args(p)
    p.add_argument("--layers", default="0", help="e.g. 0,5,10 or 0-29 or all (default 0)")
    p.add_argument("--neurons", default="all", help="e.g. 0-99 or 1,2,3 or all (default all)")
    p.add_argument("--sign", default="positive", choices=["positive", "negative", "both"], help="which side(s) to distil")
    _fit_args(p)

    p = sub.add_parser("report", help="write the validation report and viewer for a run",
                       description="Render graphs and write report.html/json/csv, the search index and viewer pages.")
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("--out", default=None,
                   help="write the report into a copy of the run made here (for a read-only run directory)")

    p = sub.add_parser("serve", help="serve a run's viewer with search", description="Serve the viewer of a run directory.")
    p.add_argument("run_dir", help="a run directory written by n2g run / n2g fit")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", default="8000", help="port, 1-65535 (default 8000; 0 picks a free one)")
    return parser


def _options(args, layers: str, neurons: str):
    from .pipeline import RunOptions

    overrides = {"augment": args.augment}
    return RunOptions(model=args.model, corpus=args.corpus, text_field=args.text_field, excerpt_length=args.excerpt_length,
                      max_excerpts=args.max_excerpts, layers=layers, neurons=neurons, sign=args.sign, preset=args.preset,
                      overrides=overrides, substitutes=args.substitutes, out=args.out, device=args.device, dtype=args.dtype, group_size=args.group_size,
                      store_tokens=args.store_tokens, scan_batch=args.scan_batch, batch_tokens=args.batch_tokens,
                      host_workers=args.host_workers, ray=args.ray, ray_workers=args.ray_workers,
                      report=args.report, progress=not args.quiet)


def _check_out(out: Path) -> None:
    """Refuse to write a run into an unrelated non-empty directory; tidy up after a killed run."""
    if out.is_dir() and not (out / "run.json").exists():
        try:
            occupied = any(out.iterdir())
        except OSError as exc:
            raise N2GError(f"cannot read --out directory {out} ({exc.strerror}); choose another --out") from None
        if occupied:
            raise N2GError(f"--out {out} is a non-empty directory that is not an n2g run; "
                           "choose a new or empty directory, or an existing run directory")
    if (out / "run.json").is_file():
        from .fileio import remove_stale_temporaries

        remove_stale_temporaries(out)


def _run(args) -> int:
    from .pipeline import default_out, run, summary_table

    if args.command == "fit":
        opts = _options(args, str(args.layer), str(args.neuron))
    else:
        opts = _options(args, args.layers, args.neurons)
    _check_out(Path(opts.out) if opts.out else default_out(opts))
    summary = run(opts)
    print(summary_table(summary.results))
    print(f"\n{len(summary.results)} neurons ({summary.fitted_now} fitted now) in {summary.seconds:.1f}s -> {summary.out}")
    if "report" in summary.artifacts:
        print(f"report: {summary.artifacts['report']}")
    return 0


def _info(args) -> int:
    from .models import load_model

    info = load_model(args.model, device=args.device, dtype=args.dtype).info()
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")
    return 0


def _copy_run(src: Path, dst: Path) -> Path:
    """Copy a run (without its report outputs) to ``dst``, all or nothing; returns ``dst``."""
    import shutil
    import tempfile

    if dst.exists() and not (dst.is_dir() and not any(dst.iterdir())):
        raise N2GError(f"--out {dst} already exists; name a new or empty directory for the copy")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise N2GError(f"--out {dst} is inside the run {src}; name a directory elsewhere")
    tmp = None
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
        skip = shutil.ignore_patterns(".*.tmp", "index.sqlite", "report.html", "report.json", "report.csv", "viewer")
        shutil.copytree(src, tmp / "run", symlinks=True, ignore=skip)  # links are copied as links, never followed
        os.replace(tmp / "run", dst)
    except (OSError, shutil.Error) as exc:
        raise N2GError(f"cannot copy the run to {dst} ({exc}); choose a writable --out with enough space") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _report(args) -> int:
    from .report import build_all

    run_dir = Path(args.run_dir)
    if not (run_dir / "run.json").exists():
        raise N2GError(f"{args.run_dir} is not an n2g run directory (no run.json); run `n2g run` first")
    if args.out:
        run_dir = _copy_run(run_dir, Path(args.out))
    paths = build_all(run_dir)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _serve(args) -> int:
    from .viewer import check_port, serve

    port = check_port(args.port)
    if not (Path(args.run_dir) / "run.json").exists():
        raise N2GError(f"{args.run_dir} is not an n2g run directory (no run.json); run `n2g run` first")
    serve(Path(args.run_dir), host=args.host, port=port)
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows up here rather than at interpreter exit
        return code
    except BrokenPipeError:
        # The reader of stdout has gone (`n2g ... | head`): stop quietly, as Unix tools do.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())  # so the final flush at exit cannot fail again
        except (OSError, ValueError, AttributeError):
            pass
        return 141


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.WARNING if getattr(args, "quiet", False) else logging.INFO,
                        format="n2g: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    handlers = {"info": _info, "fit": _run, "run": _run, "report": _report, "serve": _serve}
    try:
        return handlers[args.command](args)
    except N2GError as exc:
        print(f"n2g: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("n2g: interrupted; finished neurons are saved, re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
