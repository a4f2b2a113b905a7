"""Forward throughput of the subject model through n2g's one activation function.

Times ``SubjectModel.activations`` (one neuron of the deepest layer, so every layer runs) on random
token ids at a few batch shapes, on the model's device and dtype, and prints real token positions per
second: the figure ``evaluation/cost.py --tokens-per-s`` projects from. Each shape is run twice to
warm up, then timed over ``--repeats`` calls (CUDA synchronised).

    python evaluation/forward.py --device cuda --dtype bfloat16
    python evaluation/forward.py --model /path/to/model --shapes 1x64,4096x32
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from n2g.models import load_model


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        rows, length = part.lower().split("x")
        out.append((int(rows), int(length)))
    return out


def sync(device) -> None:
    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--shapes", default="1x64,64x64,512x64,4096x32",
                    help="comma-separated ROWSxTOKENS batch shapes")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer", type=int, default=None, help="deepest layer run (default: the last)")
    args = ap.parse_args()

    model = load_model(args.model, device=args.device, dtype=args.dtype)
    layer = model.n_layers - 1 if args.layer is None else args.layer
    name = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else platform.processor() or "cpu"
    print(f"model {model.spec}: {model.n_layers} layers x {model.d_mlp} neurons, {model.device} ({name}), "
          f"{model.dtype}; deepest layer run {layer} (full depth = {model.n_layers} layers); "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    vocab = int(model.model.get_input_embeddings().num_embeddings)
    gen = torch.Generator().manual_seed(0)
    print(f"{'rows x tokens':>14} {'s/call':>9} {'tokens/s':>12} {'full-depth tokens/s':>20}")
    for rows, length in parse_shapes(args.shapes):
        ids = torch.randint(4, vocab, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        try:
            for _ in range(2):
                model.activations(ids, mask, [(layer, 0)])
            sync(model.device)
            t0 = time.perf_counter()
            for _ in range(args.repeats):
                model.activations(ids, mask, [(layer, 0)])
            sync(model.device)
        except torch.cuda.OutOfMemoryError:
            print(f"{rows:>7} x {length:<5} out of memory")
            torch.cuda.empty_cache()
            continue
        per_call = (time.perf_counter() - t0) / args.repeats
        tps = rows * length / per_call
        print(f"{rows:>7} x {length:<5} {per_call:9.4f} {tps:12,.0f} {tps * (layer + 1) / model.n_layers:20,.0f}")


if __name__ == "__main__":
    main()
