"""Adversarial sweep: bad input, faults and hostile use of the ``n2g`` command, one table row each.

Builds a tiny random Llama (saved as a local model directory), a corpus and a small run in a
temporary directory, then runs every case as a real command (a subprocess, like a user would) and
records its exit code (or HTTP status for the server cases), the one-line message, and what it
left behind: files in the empty working directory it ran in, or temporaries in the run. A row
passes when the exit code is the expected one, nothing was left, and no traceback was printed.
Cases that need root and ``mount`` (a full or read-only tmpfs) are marked skipped without them.

    python evaluation/sweep.py --out evaluation/results/sweep.md

Prints the table (Markdown) and writes it to ``--out``; exit status 1 when a case fails.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")


@dataclass
class Row:
    case: str
    command: str
    code: int | str
    message: str
    left: str
    ok: bool
    notes: list[str] = field(default_factory=list)


class Sweep:
    def __init__(self, root: Path):
        self.root = root
        self.rows: list[Row] = []

    # -- helpers -------------------------------------------------------------------------
    def short(self, text: str) -> str:
        text = text.replace(str(self.root), "$T").replace(sys.executable, "python")
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")  # a name that is not UTF-8, shown escaped
        # a 5,000-digit argument is shown by its length
        return re.sub(r"\S{80,}", lambda m: f"{m.group(0)[:8]}...({len(m.group(0)):,} chars)", text)

    def workdir(self) -> Path:
        return Path(tempfile.mkdtemp(dir=self.root, prefix="cwd-"))

    def n2g(self, args: list, cwd: Path | None = None, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "n2g", *map(str, args)], cwd=cwd, env=env or ENV,
                              capture_output=True, text=True, timeout=600, **kw)

    @staticmethod
    def message(stderr: str) -> str:
        errors = [l for l in stderr.splitlines() if l.startswith("n2g: error:")]
        if errors:
            return errors[0]
        lines = [l for l in stderr.splitlines() if l.strip()]
        warnings = [l for l in lines if "damaged" in l or "skipping" in l or "warning" in l.lower()]
        return (warnings or lines or [""])[-1]

    def add(self, case: str, command: str, code, message: str, left: list[str], expect, traceback: bool = False):
        ok = (code in expect if isinstance(expect, (tuple, list, set)) else code == expect) and not left and not traceback
        msg = self.short(message).strip()
        if traceback:
            msg = "TRACEBACK " + msg
        self.rows.append(Row(case, self.short(command), code, msg[:160], ", ".join(left) or "none", ok))
        print(f"{'ok  ' if ok else 'FAIL'} {case}: {code} {msg[:100]}", file=sys.stderr)

    def cli_case(self, case: str, args: list, expect=2, env: dict | None = None, leave_ok: bool = False):
        work = self.workdir()
        res = self.n2g(args, cwd=work, env=env)
        left = [] if leave_ok else sorted(str(p.relative_to(work)) for p in work.rglob("*"))
        self.add(case, "n2g " + " ".join(map(str, args)), res.returncode, self.message(res.stderr), left, expect,
                 "Traceback" in res.stderr)
        return res


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if re.match(r"^\..*\.tmp$", p.name))


def make_inputs(root: Path) -> dict:
    """A tiny random Llama as a model directory, a corpus, and a finished run of 8 neurons."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import save_tiny_folder

    save_tiny_folder(root, 12)  # root/model (a tiny random Llama) and root/corpus.txt
    corpus = root / "corpus.txt"
    base = ["--model", root / "model", "--corpus", corpus, "--excerpt-length", "32", "-q"]
    run = root / "run"
    res = subprocess.run([sys.executable, "-m", "n2g", "run", *map(str, base), "--layers", "0-1", "--neurons", "0-3",
                          "--out", str(run)], env=ENV, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        raise SystemExit(f"could not make the sweep's run: {res.stderr}")
    return {"model": root / "model", "corpus": corpus, "base": base, "run": run}


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    """A mounted tmpfs at ``path`` (needs root and mount); yields False when it cannot be made."""
    path.mkdir(parents=True, exist_ok=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0 if shutil.which("mount") else False
    try:
        yield made
    finally:
        if made:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(port: int, path: str) -> tuple[int, dict, bytes]:
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.putrequest("GET", path, skip_accept_encoding=True)
        if path.startswith("/api/"):
            con.putheader("X-N2G-Request", "1")  # as the viewer's pages send it
        con.endheaders()
        r = con.getresponse()
        return r.status, dict(r.headers), r.read()
    except (http.client.HTTPException, OSError) as e:
        return 0, {}, str(e).encode()
    finally:
        con.close()


def raw(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line + b"\r\n\r\n")
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


# ---------------------------------------------------------------------------------------------
# the cases


def cli_cases(sw: Sweep, inp: dict) -> None:
    root, base, run = sw.root, inp["base"], inp["run"]
    binary = root / "binary.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    fifo = root / "fifo.txt"
    os.mkfifo(fifo)
    two = root / "two-ggufs"
    two.mkdir()
    for name in ("a.gguf", "b.gguf"):
        (two / name).write_bytes(b"GGUF")
    unrelated = root / "thesis"
    unrelated.mkdir()
    (unrelated / "thesis.tex").write_text("precious")
    a_file = root / "a_file"
    a_file.write_text("x")
    run_args = ["run", *base]

    started = time.perf_counter()
    sw.cli_case("huge neuron range", [*run_args, "--neurons", "0-99999999999"])
    sw.rows[-1].message += f" ({time.perf_counter() - started:.1f} s)"
    sw.cli_case("layer range out of bounds", [*run_args, "--layers", "0-999"])
    sw.cli_case("unreadable neuron list", [*run_args, "--neurons", "zero"])
    sw.cli_case("5,000-digit neuron index", [*run_args, "--neurons", "9" * 5000])
    sw.cli_case("port too large", ["serve", run, "--port", "70000"])
    sw.cli_case("negative port", ["serve", run, "--port", "-1"])
    sw.cli_case("port not a number", ["serve", run, "--port", "http"])
    sw.cli_case("corpus is a FIFO", ["run", "--model", inp["model"], "--corpus", fifo, "--excerpt-length", "32", "-q"])
    sw.cli_case("corpus is /dev/null", ["run", "--model", inp["model"], "--corpus", "/dev/null", "-q"])
    sw.cli_case("corpus missing", ["run", "--model", inp["model"], "--corpus", root / "missing.txt", "-q"])
    sw.cli_case("corpus is binary", ["run", "--model", inp["model"], "--corpus", binary, "-q"])
    sw.cli_case("folder with two .gguf files", ["info", "--model", two])
    sw.cli_case("model path missing", ["info", "--model", root / "nope.gguf"])
    sw.cli_case("--out an unrelated non-empty folder", [*run_args, "--neurons", "0", "--out", unrelated])
    sw.cli_case("--out below a file", [*run_args, "--neurons", "0", "--out", a_file / "sub"])
    sw.cli_case("report of a non-run folder", ["report", unrelated])
    sw.cli_case("serve a non-run folder", ["serve", unrelated, "--port", "0"])
    damaged = root / "damaged.parquet"
    damaged.write_bytes(b"PAR1" + bytes(range(256)) * 4)
    sw.cli_case("corpus is a damaged Parquet file", ["run", "--model", inp["model"], "--corpus", damaged, "-q"])
    deep = root / "deep.jsonl"
    deep.write_text("[" * 200_000 + "]" * 200_000 + "\n")
    sw.cli_case("JSONL corpus nested 200,000 deep", ["run", "--model", inp["model"], "--corpus", deep, "-q"])
    started = time.perf_counter()
    sw.cli_case("hub id that is not cached, hub unreachable", ["info", "--model", "n2g-sweep-org/no-such-model"],
                env=dict(ENV, HF_HOME=str(root / "hf-home")))
    sw.rows[-1].message += f" ({time.perf_counter() - started:.1f} s)"

    # audit 34: empty path arguments, a dangling --out link, text and file names that are not UTF-8
    sw.cli_case("--corpus '' (an unset shell variable)", [*run_args, "--corpus", ""])
    sw.cli_case("report '' (an unset shell variable)", ["report", ""])
    dangling = root / "dangling-out"
    os.symlink(root / "nowhere", dangling)
    sw.cli_case("--out a link to a missing directory", [*run_args, "--neurons", "0", "--out", dangling])
    sw.cli_case("search token that is not UTF-8", ["search", run, "Par\udcffis"])
    sw.cli_case("steer --prompt that is not UTF-8", ["steer", "--model", inp["model"], "--layer", "0", "--neuron", "0",
                                                     "--max", "1", "--prompt", "the \udcff", "-q"])
    surrogate = root / "surrogate.jsonl"
    surrogate.write_text('{"text": "the cat"}\n{"text": "\\ud800 sat"}\n')
    sw.cli_case("JSONL text holding a lone \\ud800 escape", ["run", "--model", inp["model"], "--corpus", surrogate, "-q"])
    raw = os.fsencode(root)
    with open(raw + b"/corpus\xff.txt", "wb") as f:
        f.write(inp["corpus"].read_bytes())
    sw.cli_case("corpus and --out named in bytes that are not UTF-8",
                ["fit", "--model", inp["model"], "--corpus", os.fsdecode(raw + b"/corpus\xff.txt"), "--excerpt-length", "32",
                 "--layer", "0", "--neuron", "0", "--json", "-q", "--out", os.fsdecode(raw + b"/out\xff")], expect=0)

    # a 20 MB corpus file and --max-excerpts: only the needed prefix is tokenised
    big = root / "big.txt"
    words = [f"w{i}" for i in range(60)]
    rng = random.Random(1)
    big.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(600_000)))
    started = time.perf_counter()
    out = root / "big-run"
    sw.cli_case("--max-excerpts 64 on a 20 MB file", ["run", "--model", inp["model"], "--corpus", big, "--max-excerpts", "64",
                                                     "--excerpt-length", "32", "--neurons", "0", "--no-report", "-q",
                                                     "--out", out], expect=0)
    sw.rows[-1].message = f"finished in {time.perf_counter() - started:.1f} s"


def model_cases(sw: Sweep, inp: dict) -> None:
    """Model folders and GGUF files that do not hold what they claim (audit of 2026-12-05)."""
    root = sw.root

    def variant(name: str, edit=None, text: str | None = None) -> Path:
        folder = root / "models" / name
        shutil.copytree(inp["model"], folder)
        if edit is not None or text is not None:
            config = json.loads((folder / "config.json").read_text())
            if edit is not None:
                edit(config)
            (folder / "config.json").write_text(text if text is not None else json.dumps(config))
        return folder

    fifo_config = variant("fifo-config")
    (fifo_config / "config.json").unlink()
    os.mkfifo(fifo_config / "config.json")
    sw.cli_case("config.json is a FIFO", ["info", "--model", fifo_config, "-q"])
    bom = variant("bom")
    (bom / "config.json").write_bytes(b"\xef\xbb\xbf" + (bom / "config.json").read_bytes())
    sw.cli_case("config.json saved with a UTF-8 byte-order mark", ["info", "--model", bom, "-q"])
    fifo_weights = variant("fifo-weights")
    os.mkfifo(fifo_weights / "extra.safetensors")
    sw.cli_case("a FIFO named *.safetensors in the model folder", ["info", "--model", fifo_weights, "-q"])
    sw.cli_case("config.json hidden_size 1,000,000 over a 32-wide checkpoint",
                ["info", "--model", variant("wide", lambda c: c.update(hidden_size=1_000_000)), "-q"])
    sw.cli_case("config.json says 1 layer, the weights hold 3",
                ["info", "--model", variant("short", lambda c: c.update(num_hidden_layers=1)), "-q"])
    sw.cli_case("config.json nested 200,000 deep",
                ["info", "--model", variant("deep", text='{"model_type": "llama", "x": ' + "[" * 200_000 + "]" * 200_000 + "}"),
                 "-q"])
    sw.cli_case("a model that computes NaN (rms_norm_eps NaN), --out new",
                ["fit", "--model", variant("nan", lambda c: c.update(rms_norm_eps=float("nan"))), "--corpus", inp["corpus"],
                 "--excerpt-length", "32", "--layer", "1", "--neuron", "0", "-q", "--no-report", "--out", "new/out"])
    sys.path.insert(0, str(REPO / "tests"))
    import torch
    from conftest import tiny_model, tiny_tokenizer

    for family in ("bloom", "mpt"):  # BLOOM declares no context length; MPT calls it max_seq_len
        torch.manual_seed(0)
        tiny_model(family).save_pretrained(root / "models" / family)
        tiny_tokenizer().save_pretrained(root / "models" / family)
    steer = ["steer", "--layer", "1", "--neuron", "3", "--max", "1", "-q", "--prompt", "the cat"]
    sw.cli_case("steer --tokens 100,000 on a model declaring no context (BLOOM)",
                [*steer, "--model", root / "models" / "bloom", "--tokens", "100000"])
    sw.cli_case("steer past MPT's max_seq_len (128)", [*steer, "--model", root / "models" / "mpt", "--tokens", "200"])
    sw.cli_case("steer --scale -1e3 (a negative number in exponent form)",
                [*steer, "--model", inp["model"], "--tokens", "2", "--scale", "-1e3"], expect=0)

    # a layer of a million neurons (an SAE's width): its activation store at the default budget is
    # about 262 GB, more than this machine's disk and memory; before, a full cache disk put it in memory
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok.get_vocab()), hidden_size=32, intermediate_size=1_000_000,
                                 num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                 max_position_embeddings=128)).save_pretrained(root / "models" / "million")
    tok.save_pretrained(root / "models" / "million")
    words = [w for w in tok.get_vocab() if not w.startswith("<")]
    rng = random.Random(1)
    big = root / "big-corpus.txt"
    big.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(300)) for _ in range(600)))
    with tmpfs(root / "million-cache", "64m"):  # a small cache disk where mount is allowed
        sw.cli_case("a million-neuron layer whose activation store fits neither disk nor memory",
                    ["run", "--model", root / "models" / "million", "--corpus", big, "--excerpt-length", "64", "-q",
                     "--neurons", "0", "--out", "out"],
                    env=dict(ENV, N2G_CACHE=str(root / "million-cache")))
    shutil.rmtree(root / "models" / "million")

    from gguf import GGUFReader

    from n2g.models import default_gguf_path

    gguf = root / "models" / "forty" / default_gguf_path().name
    gguf.parent.mkdir(parents=True)
    shutil.copy(default_gguf_path(), gguf)
    reader = GGUFReader(str(gguf), "r+")
    field = reader.fields["llama.block_count"]
    field.parts[field.data[0]][0] = 40  # 30 layers of tensors
    reader.data.flush()
    del reader
    sw.cli_case("GGUF whose block_count (40) exceeds its tensors (30)", ["info", "--model", gguf, "-q"],
                env=dict(ENV, N2G_CACHE=str(root / "gguf-cache")))


def artifact_cases(sw: Sweep, inp: dict) -> None:
    root, base = sw.root, inp["base"]

    # wrong field types in one result.json: the report names it and goes on
    run = copy_run(inp["run"], root / "typed")
    path = run / "neurons" / "L0.N1" / "result.json"
    path.write_text(path.read_text().replace('"scores": {', '"scores": [], "x": {', 1))
    res = sw.n2g(["report", run])
    sw.add("result.json with wrong field types", "n2g report RUN", res.returncode, sw.message(res.stderr),
           temporaries(run), 0, "Traceback" in res.stderr)

    # a score method named like a spreadsheet formula: skipped as damaged, never written into report.csv
    run = copy_run(inp["run"], root / "formula")
    path = run / "neurons" / "L0.N1" / "result.json"
    path.write_text(path.read_text().replace('"scores": {', '"scores": {"=HYPERLINK(\\"http://x.example\\")": {}, ', 1))
    res = sw.n2g(["report", run])
    formula = "HYPERLINK" in (run / "report.csv").read_text()
    sw.add("score method named =HYPERLINK(...)", "n2g report RUN", res.returncode,
           f"report.csv holds the formula: {formula}; " + sw.message(res.stderr), temporaries(run) + (["FORMULA"] if formula else []),
           0, "Traceback" in res.stderr)

    # every result damaged: nothing to report
    run = copy_run(inp["run"], root / "all-damaged")
    for p in run.glob("neurons/*/result.json"):
        p.write_text("[1, 2")
    res = sw.n2g(["report", run])
    sw.add("every result.json damaged", "n2g report RUN", res.returncode, sw.message(res.stderr), temporaries(run), 2,
           "Traceback" in res.stderr)

    # a damaged graph.json: `n2g run` redoes that neuron
    run = copy_run(inp["run"], root / "graph-damaged")
    next(run.glob("neurons/*/graph.json")).write_text('{"kind": "n2g.graph", "graph": {"nodes": 5}}')
    res = sw.n2g(["run", *base, "--layers", "0-1", "--neurons", "0-3", "--out", run])
    sw.add("graph.json damaged, run again", "n2g run ... --out RUN", res.returncode, sw.message(res.stderr),
           temporaries(run), 0, "Traceback" in res.stderr)

    # a damaged search index: the report rebuilds it
    run = copy_run(inp["run"], root / "index-damaged")
    (run / "index.sqlite").write_bytes(b"garbage" * 100)
    index = run / "viewer" / "index.html"
    index.write_text(index.read_text().replace('"use strict";', '"use strict"; /* other */', 1)
                     + '<script nonce="evilnonce">fetch("/api/predict")</script>')
    res = sw.n2g(["report", run])
    sw.add("index.sqlite damaged, report again", "n2g report RUN", res.returncode, sw.message(res.stderr),
           temporaries(run), 0, "Traceback" in res.stderr)

    # kill -9 during the report, then again: no temporaries, same report
    run = copy_run(inp["run"], root / "killed-report")
    rng = random.Random(5)
    for _ in range(3):
        proc = subprocess.Popen([sys.executable, "-m", "n2g", "report", str(run)], env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    res = sw.n2g(["report", run])
    same = (run / "report.json").read_text() == (inp["run"] / "report.json").read_text()
    sw.add("kill -9 during report x3, then report", "n2g report RUN", res.returncode,
           f"report.json identical to an uninterrupted one: {same}", temporaries(run) + ([] if same else ["DIFFERENT"]),
           0, "Traceback" in res.stderr)

    # kill -9 during run, then resume: identical scores
    out = root / "killed-run"
    args = [sys.executable, "-m", "n2g", "run", *map(str, base), "--layers", "0-1", "--neurons", "0-3", "--group-size", "1",
            "--out", str(out)]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(out.glob("neurons/*/result.json"))) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    res = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=900)

    def scores(run_dir: Path) -> list[list[str]]:
        """scores.csv without the wall time, floats to 6 decimals (batch composition moves the last bits)."""
        def cell(x: str) -> str:
            try:
                return x if x.isdigit() else f"{float(x):.6f}"
            except ValueError:
                return x

        return [[cell(x) for x in r.split(",")[:-1]] for r in (run_dir / "scores.csv").read_text().splitlines()]

    same = scores(out) == scores(inp["run"])
    sw.add("kill -9 during run, then resume", "n2g run ... (same command)", res.returncode,
           f"scores.csv identical to an uninterrupted run: {same}", temporaries(out) + ([] if same else ["DIFFERENT"]), 0,
           "Traceback" in res.stderr)

    # two runs at once on one directory
    out = root / "concurrent"
    args = [sys.executable, "-m", "n2g", "run", *map(str, base), "--layers", "0-1", "--neurons", "0-3", "--out", str(out)]
    procs = [subprocess.Popen(args, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    codes = [p.returncode for p in procs]
    same = (out / "scores.csv").exists() and scores(out) == scores(inp["run"])
    sw.add("two runs at once on one directory", "n2g run ... & n2g run ...", "/".join(map(str, codes)),
           f"scores.csv identical to a single run: {same}", temporaries(out) + ([] if same else ["DIFFERENT"]), "0/0",
           any("Traceback" in e for _, e in outs))

    # the run's tokenizer.json with a pattern that backtracks without end (the tokenizers library panics in Rust)
    run = copy_run(inp["run"], root / "tokenizer-redos")
    saved = json.loads((run / "tokenizer.json").read_text())
    definition = json.loads(saved["tokenizer"])
    definition["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Isolated", "invert": False}
    saved["tokenizer"] = json.dumps(definition)
    (run / "tokenizer.json").write_text(json.dumps(saved))
    res = sw.n2g(["predict", run, "a" * 40 + "!"])
    sw.add("tokenizer.json whose pattern never ends", "n2g predict RUN aaaa...a!", res.returncode,
           sw.message(res.stderr), temporaries(run), 2, "Traceback" in res.stderr or "panicked" in res.stderr)

    # a tokenizer.json n2g did not write: a warning, and typed text split by the run's own tokens
    run = copy_run(inp["run"], root / "tokenizer-foreign")
    (run / "tokenizer.json").write_text('{"kind": "something.else"}')
    res = sw.n2g(["predict", run, "the cat sat", "--neuron", "L0.N1"])
    sw.add("tokenizer.json n2g did not write", "n2g predict RUN TEXT --neuron L0.N1", res.returncode,
           sw.message(res.stderr), temporaries(run), 0, "Traceback" in res.stderr)

    # stdout closed before the command writes (`n2g report RUN | head -0`)
    run = copy_run(inp["run"], root / "pipe")
    r, w = os.pipe()
    os.close(r)
    res = subprocess.run([sys.executable, "-m", "n2g", "report", str(run)], env=ENV, stdout=w, stderr=subprocess.PIPE,
                         text=True, timeout=600)
    os.close(w)
    sw.add("stdout pipe closed by the reader", "n2g report RUN | head -0", res.returncode, sw.message(res.stderr),
           temporaries(run), 141, "Traceback" in res.stderr or "BrokenPipe" in res.stderr)


def disk_cases(sw: Sweep, inp: dict) -> None:
    root = sw.root

    # a read-only run directory
    mnt = root / "ro"
    with tmpfs(mnt, "16m") as made:
        if not made:
            sw.rows.append(Row("report on a read-only run", "n2g report RUN", "-", "skipped: needs root and mount", "-", True))
        else:
            run = copy_run(inp["run"], mnt / "run")
            for name in ("report.html", "report.json", "index.sqlite"):
                (run / name).unlink()
            subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
            res = sw.n2g(["report", run])
            sw.add("report on a read-only run", "n2g report RUN (read-only tmpfs)", res.returncode, sw.message(res.stderr),
                   temporaries(run), 2, "Traceback" in res.stderr)
            res = sw.n2g(["report", run, "--out", root / "ro-copy"])
            made = (root / "ro-copy" / "report.html").exists()
            sw.add("report of a read-only run into a copy", "n2g report RUN --out COPY", res.returncode,
                   f"COPY/report.html written: {made}", temporaries(root / "ro-copy") + ([] if made else ["NO REPORT"]), 0,
                   "Traceback" in res.stderr)

    # a disk that fills up during the report: the run without its outputs, on a tmpfs with 64 KiB to spare
    staged = copy_run(inp["run"], root / "staged")
    for p in [*staged.glob("neurons/*/graph.svg"), *staged.glob("neurons/*/graph.png"), staged / "report.html",
              staged / "index.sqlite"]:
        p.unlink()
    shutil.rmtree(staged / "viewer")
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in staged.rglob("*") if p.is_file())
    mnt = root / "full"
    with tmpfs(mnt, str(used + 64 * 1024)) as made:
        if not made:
            sw.rows.append(Row("disk full during report", "n2g report RUN", "-", "skipped: needs root and mount", "-", True))
        else:
            run = copy_run(staged, mnt / "run")
            res = sw.n2g(["report", run])
            sw.add("disk full during report", "n2g report RUN (small tmpfs)", res.returncode, sw.message(res.stderr),
                   temporaries(run), 2, "Traceback" in res.stderr)

    # an unwritable cache (N2G_CACHE below a file): the scan cache warns and the run goes on (a model
    # directory is not de-quantised, so the model cache is not involved; tests/test_hardening.py covers it)
    blocker = root / "cache-file"
    blocker.write_text("x")
    sw.cli_case("N2G_CACHE cannot be created", ["run", *inp["base"], "--neurons", "0", "--no-report", "--out",
                                                root / "uncached"], expect=0, env=dict(ENV, N2G_CACHE=str(blocker / "cache")))

    # a scan cache on a disk that fills while the scans are saved: warnings, the run finishes, no partial entry
    mnt = root / "full-cache"
    with tmpfs(mnt, "700k") as made:
        if not made:
            sw.rows.append(Row("scan cache disk fills during a run", "n2g run", "-", "skipped: needs root and mount", "-", True))
        else:
            res = sw.n2g(["run", *inp["base"], "--layers", "0-2", "--neurons", "0-1", "--no-report", "--out",
                          root / "full-cache-run"], env=dict(ENV, N2G_CACHE=str(mnt)))
            entries = sorted(p.name for p in (mnt / "scans").iterdir()) if (mnt / "scans").is_dir() else []
            saved = sum(1 for e in entries if e.endswith(".json"))
            left = [e for e in entries if not e.endswith((".json", ".safetensors", ".acts.npy"))]
            orphans = [e for e in entries if e.endswith(".acts.npy") and e[:-9] + ".json" not in entries]
            sw.add("scan cache disk fills during a run", "n2g run ... (N2G_CACHE on a 700 KB tmpfs)", res.returncode,
                   f"{sw.message(res.stderr)} ({saved} of 3 layers cached)", left + orphans, 0, "Traceback" in res.stderr)


def server_cases(sw: Sweep, inp: dict) -> None:
    root = sw.root
    run = copy_run(inp["run"], root / "served")
    secret = root / "secret.html"
    secret.write_text("TOP SECRET")
    os.symlink("/etc/passwd", run / "passwd.html")
    os.symlink("/etc", run / "etc")
    os.symlink(root, run / "home")
    (run / f".report.html.{4_194_303}.abcdefgh.tmp").write_text("<p>half-written</p>")
    con = sqlite3.connect(run / "index.sqlite")
    (token,) = con.execute("SELECT token FROM tokens WHERE role = 'activator' ORDER BY key LIMIT 1").fetchone()
    con.close()
    token = token.strip()
    (run / "index.sqlite").write_bytes(b"garbage" * 100)
    index = run / "viewer" / "index.html"
    index.write_text(index.read_text().replace('"use strict";', '"use strict"; /* other */', 1)
                     + '<script nonce="evilnonce">fetch("/api/predict")</script>')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "n2g", "serve", str(run), "--port", str(port)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and request(port, "/report.html")[0] != 200:
            time.sleep(0.2)

        def get(case: str, path: str, expect: int, leak: bytes | None = None, header: str | None = None):
            status, headers, body = request(port, path)
            if header:
                msg = f"{header}: {headers.get(header, 'MISSING')}"
            elif headers.get("Content-Type", "").startswith("application/json"):
                msg = body[:120].decode("utf-8", "replace")
            else:
                msg = f"{len(body)} bytes" + (f"; holds no {leak.decode()!r}" if leak is not None and leak not in body else "")
            bad = leak is not None and leak in body
            sw.add(case, f"GET {path}", status, msg, ["LEAKED"] if bad else [], expect)

        get("symlink to /etc/passwd", "/passwd.html", 404, b"root:")
        get("symlinked folder outside", "/etc/passwd", 404, b"root:")
        get("listing of a symlinked folder", "/home/", 404, b"secret")
        get("file outside via ..", "/../secret.html", 404, b"TOP SECRET")
        get("file outside via %2e%2e", "/%2e%2e/secret.html", 404, b"TOP SECRET")
        get("directory listing", "/neurons/", 404, b"L0.N")
        get("file type not needed by the pages", "/index.sqlite", 404, b"SQLite")
        get("temporary of a killed writer", f"/.report.html.{4_194_303}.abcdefgh.tmp", 404, b"half-written")
        get("SVG carries a no-script CSP", "/neurons/L0.N1/graph.svg", 200, header="Content-Security-Policy")
        get("viewer page written elsewhere: its nonce is not trusted", "/viewer/index.html", 200, b"evilnonce")
        get("nosniff on every file", "/report.csv", 200, header="X-Content-Type-Options")
        get("damaged index.sqlite, search", f"/api/search?token={quote(token)}", 200)
        status, _, body = request(port, "/api/similar?key=L9.N9")
        sw.add("API error message", "GET /api/similar?key=L9.N9", status, body.decode()[:120],
               ["ABSOLUTE PATH"] if str(run).encode() in body else [], 404)
        reply = raw(port, b"GET /report.html%00.png HTTP/1.0")
        sw.add("NUL in the URL path", "GET /report.html%00.png", int(reply.split()[1]), reply.split(b"\r\n")[0].decode(), [],
               400)
        reply = raw(port, b"GET /rep\x00ort.html HTTP/1.0")
        sw.add("raw NUL byte in the request line", "GET /rep\\0ort.html", int(reply.split()[1]),
               reply.split(b"\r\n")[0].decode(), [], 400)
        for _ in range(20):  # clients that hang up mid-response
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                s.sendall(b"GET /report.html HTTP/1.0\r\n\r\n")
        time.sleep(0.5)
        alive = request(port, "/report.html")[0]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    sw.add("20 clients hang up mid-response", "n2g serve RUN (stderr after)", alive,
           f"server still answers; {len(err.splitlines())} stderr lines", [], 200, "Traceback" in err)


def table(rows: list[Row]) -> str:
    def cell(x) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| case | command | exit code | message | files left | ok |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {cell(r.case)} | `{cell(r.command)}` | {cell(r.code)} | {cell(r.message)} | {cell(r.left)} | "
                     f"{'yes' if r.ok else '**no**'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the Markdown table here (e.g. evaluation/results/sweep.md)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="n2g-sweep-") as tmp:
        sw = Sweep(Path(tmp))
        inp = make_inputs(sw.root)
        cli_cases(sw, inp)
        model_cases(sw, inp)
        artifact_cases(sw, inp)
        disk_cases(sw, inp)
        server_cases(sw, inp)
    n_ok = sum(r.ok for r in sw.rows)
    head = (f"# Adversarial sweep\n\n{n_ok} of {len(sw.rows)} cases pass (expected exit code or HTTP status, one-line "
            "message, no traceback, nothing left behind). `$T` is the sweep's temporary directory; the subject is a "
            "tiny random Llama and a run of 8 of its neurons. Server rows give the HTTP status as the exit code.\n\n"
            f"Regenerate: `.venv/bin/python evaluation/sweep.py --out evaluation/results/sweep.md` "
            f"({time.perf_counter() - started:.0f} s on {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}).\n\n")
    text = head + table(sw.rows) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0 if n_ok == len(sw.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
