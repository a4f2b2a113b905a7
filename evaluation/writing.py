"""Writing benchmark: how long the subject model takes to write the excerpts of model-written text.

Times :func:`n2g.written.write_excerpts` (the package's top-p sampler, :func:`n2g.written.nucleus_sample`)
against Hugging Face's own top-p sampling (``do_sample=True, top_p=0.95, top_k=0``: a sort of the
whole vocabulary and a multinomial draw at every step) on the same openings, same lengths and batch
size, alternating the two so that other load on the machine falls on both. Prints seconds, written
tokens per second and CPU seconds per method and round, and the share of the distinct tokens the two
texts write (they are different draws from the same distribution, so the shares should be alike).

    python evaluation/writing.py --excerpts 128 --rounds 2
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import numpy as np
import torch

from n2g.activations import partition
from n2g.config import preset
from n2g.corpus import Corpus
from n2g.models import load_model
from n2g.written import TOP_P, _eos, _language_model, _not_text, _quiet_transformers, openings, write_excerpts


def hf_top_p(model, prompts: np.ndarray, length: int, seed: int, batch: int) -> np.ndarray:
    """The same writing with Hugging Face's sampling (the package's way before 2026-12-05)."""
    from transformers import GenerationConfig

    lm = _language_model(model)
    eos = _eos(lm)
    new = length - prompts.shape[1]
    config = GenerationConfig(do_sample=True, temperature=1.0, top_p=TOP_P, top_k=0, max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                              suppress_tokens=_not_text(model, lm) or None)
    out = []
    with torch.random.fork_rng(), torch.inference_mode(), _quiet_transformers():
        torch.manual_seed(seed)
        for start in range(0, len(prompts), batch):
            ids = torch.as_tensor(prompts[start:start + batch], dtype=torch.long)
            ids = torch.cat([torch.full((len(ids), 1), int(model.bos_token_id), dtype=torch.long), ids], dim=1)
            written = lm.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            out.append(written[:, ids.shape[1]:].numpy()[:, :new])
    return np.concatenate([prompts, np.concatenate(out)], axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--excerpts", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    model = load_model("default")
    corpus = Corpus.build("default", model.encode, max_excerpts=1024)
    cfg = preset("default")
    ids = corpus.excerpts.numpy()
    prompts = openings(ids, partition(len(ids), cfg.held_out, cfg.seed, ids), args.excerpts, cfg.written_prompt, cfg.seed)
    length = ids.shape[1]
    new = prompts.shape[0] * (length - prompts.shape[1])
    print("| round | method | s | written tokens/s | CPU s | distinct written tokens |")
    print("|---|---|---|---|---|---|")
    totals = {"n2g": 0.0, "hf": 0.0}
    for r in range(args.rounds):
        for name, fn in (("n2g", lambda: write_excerpts(model, prompts, length, cfg.seed + r, args.batch)),
                         ("hf", lambda: hf_top_p(model, prompts, length, cfg.seed + r, args.batch))):
            t0, c0 = time.perf_counter(), time.process_time()
            text = fn()
            s, c = time.perf_counter() - t0, time.process_time() - c0
            totals[name] += s
            distinct = len(np.unique(text[:, prompts.shape[1]:]))
            print(f"| {r} | {name} | {s:.1f} | {new / s:.0f} | {c:.1f} | {distinct} |", flush=True)
    print(f"\n{args.excerpts} excerpts of {length - prompts.shape[1]} new tokens after {prompts.shape[1]}, batch "
          f"{args.batch}; total n2g {totals['n2g']:.1f} s, hf {totals['hf']:.1f} s "
          f"(x{totals['hf'] / totals['n2g']:.2f}); {platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, Python {platform.python_version()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
