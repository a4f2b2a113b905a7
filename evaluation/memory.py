"""Peak memory of reading a corpus and of a whole `n2g run`, as the corpus grows.

Writes a text file of N words drawn from a 4,000-word vocabulary (one document, or with --docs a
JSON lines file of 1,000-word documents), saves a tiny random Llama with a word-level tokenizer of that vocabulary
(so the forward pass costs little and the corpus dominates), and runs, each in a fresh process:

- `Corpus.build` alone (tokenising and cutting excerpts): the process's peak resident memory;
- `n2g run --layers 0 --neurons 0-3 --no-report` on that corpus with `--host-workers 0` and with
  `--host-workers 2`: the peak of the run's main process and of its largest worker.

Each peak is printed beside the same process's peak after importing n2g and torch (the base), so the
difference is what the corpus costs. With --model default the tokenizer is the embedded SmolLM2's
(its vocabulary: the text is the embedded corpus repeated) and only `Corpus.build` is measured.

    python evaluation/memory.py --tokens 1000000,4000000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_BUILD = r"""
import json, resource, sys, time
from n2g.corpus import Corpus
from transformers import PreTrainedTokenizerFast
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[2] == "default":
    from n2g.models import load_model
    encode = load_model("default", device="cpu").encode
else:
    tok = PreTrainedTokenizerFast.from_pretrained(sys.argv[2])
    encode = lambda s: tok.encode(s, add_special_tokens=False)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
c = Corpus.build(sys.argv[1], encode, length=64)
print(json.dumps({"base_mb": base / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "excerpts": len(c), "seconds": time.perf_counter() - t, "fingerprint": c.fingerprint()}))
"""

CHILD_RUN = r"""
import json, resource, sys
import torch, n2g, n2g.cli, transformers
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = n2g.cli.main(sys.argv[1:])
if code:
    sys.exit(code)
print(json.dumps({"base_mb": base / 1024, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def write_model(folder: Path, words: list[str]) -> None:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = ["<unk>", "<bos>", "<eos>", "<pad>"] + words
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                      unk_token="<unk>", pad_token="<pad>")
    cfg = tf.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, pad_token_id=3)
    tf.LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


def write_text(path: Path, words: list[str], n_tokens: int, docs: bool, seed: int = 0) -> None:
    """One document of lines of 1,000 words, or (``docs``) JSON lines of 1,000-word documents."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for start in range(0, n_tokens, 1000):
            line = " ".join(rng.choice(words) for _ in range(min(1000, n_tokens - start)))
            f.write((json.dumps({"text": line}) if docs else line) + "\n")


def _descendants(root: int) -> list[int]:
    """Processes below ``root``, from /proc (Linux)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parent[int(stat.parent.name)] = int(fields[1])
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def _high_water_mb(pid: int) -> float:
    """A process's own peak resident memory (VmHWM: reset by exec, unlike getrusage's children figure)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def child(code: str, *args: str) -> dict:
    """Run ``code`` in a fresh Python; its JSON answer, plus the largest peak among its own child processes."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    worker_peak = 0.0
    while proc.poll() is None:
        for pid in _descendants(proc.pid):
            worker_peak = max(worker_peak, _high_water_mb(pid))
        time.sleep(0.2)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-2000:])
    answer = json.loads(out.strip().splitlines()[-1])
    answer["worker_peak_mb"] = worker_peak
    return answer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1000000,4000000", help="corpus sizes in words, comma-separated")
    ap.add_argument("--model", default="tiny", choices=("tiny", "default"))
    ap.add_argument("--docs", action="store_true", help="documents of 1,000 words instead of one document")
    args = ap.parse_args()
    words = [f"w{i}" for i in range(4000)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = "default"
        if args.model == "tiny":
            model = str(tmp / "model")
            write_model(Path(model), words)
        for n in [int(v) for v in args.tokens.split(",")]:
            text = tmp / f"corpus-{n}.{'jsonl' if args.docs else 'txt'}"
            if args.model == "tiny":
                write_text(text, words, n, args.docs)
            else:
                from n2g.corpus import _pydoc_texts

                body = "\n\n".join(_pydoc_texts()) + "\n\n"
                text.write_text(body * max(1, round(n / 116_000)))  # about 116,000 SmolLM2 tokens a copy
            mb = text.stat().st_size / 1e6
            build = child(CHILD_BUILD, str(text), model)
            row = {"tokens": n, "file_mb": mb, "build": build}
            if args.model == "tiny":
                for workers in (0, 2):
                    out = tmp / f"run-{n}-{workers}"
                    row[f"run_w{workers}"] = child(CHILD_RUN, "run", "--model", model, "--corpus", str(text),
                                                   "--layers", "0", "--neurons", "0-3", "--no-report", "-q",
                                                   "--host-workers", str(workers), "--out", str(out))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"model {args.model}; {'JSON lines, documents of 1,000 words' if args.docs else 'one text document'}; "
          f"{platform.machine()}, Python {platform.python_version()}")
    print("| tokens | file MB | excerpts | build: base -> peak MB (s) | run, main: base -> peak MB | "
          "run with 2 workers: main peak / largest worker peak MB (sampled) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        b = r["build"]
        cells = [f"{r['tokens']:,}", f"{r['file_mb']:.1f}", f"{b['excerpts']:,}",
                 f"{b['base_mb']:.0f} -> {b['peak_mb']:.0f} ({b['seconds']:.1f})"]
        if "run_w0" in r:
            w0, w2 = r["run_w0"], r["run_w2"]
            cells += [f"{w0['base_mb']:.0f} -> {w0['peak_mb']:.0f}", f"{w2['peak_mb']:.0f} / {w2['worker_peak_mb']:.0f}"]
        else:
            cells += ["-", "-"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
