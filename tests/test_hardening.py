"""Fault injection: hostile requests to the server, full and read-only disks, kill -9, damaged files.

Every case of issue 11 has a test here that failed before its fix. All of them run on the
synthetic run of tests/helpers_run.py or on tiny random models built in the test, so the file
takes seconds. Faults are injected where the operating system would raise them (``mkstemp``,
``fsync``, sqlite), so they run without root, a tmpfs or a full disk.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from helpers_run import make_run
from n2g import cli
from n2g.corpus import load_texts, make_excerpts
from n2g.errors import N2GError
from n2g.pipeline import parse_indices
from n2g.render import load_graph_json
from n2g.report import build_all
from n2g.viewer import make_server

REPO = Path(__file__).resolve().parents[1]
TEMP_NAME = re.compile(r"^\..*\.tmp$")


# ---------------------------------------------------------------------------------------------
# helpers


@pytest.fixture
def run(tmp_path):
    """A fresh synthetic run with its report and viewer built (each test may damage it)."""
    run = make_run(tmp_path)
    build_all(run)
    return run


@contextlib.contextmanager
def serving(run_dir):
    server = make_server(run_dir, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str, method: str = "GET"):
    """(status, headers, body) for a raw request path, sent exactly as given."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.putrequest(method, path, skip_accept_encoding=True)
        con.endheaders()
        r = con.getresponse()
        return r.status, r.headers, r.read()
    finally:
        con.close()


def raw_request(port: int, line: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(line + b"\r\n\r\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def temporaries(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if TEMP_NAME.match(p.name)]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv, capsys) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("n2g: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# item 2: the server serves only regular files inside the run, of the types the pages need


def test_server_never_follows_a_link_out_of_the_run(run, tmp_path):
    secret = tmp_path / "secret.html"
    secret.write_text("TOP SECRET")
    os.symlink("/etc/passwd", run / "passwd.html")
    os.symlink("/etc", run / "etc")
    os.symlink(secret, run / "viewer" / "leak.html")
    os.symlink(tmp_path, run / "home")
    with serving(run) as port:
        for path in ("/passwd.html", "/etc/passwd", "/etc/", "/etc", "/viewer/leak.html", "/home/secret.html",
                     "/home/", "/../secret.html", "/viewer/../../secret.html", "/%2e%2e/secret.html",
                     "/viewer/..%2f..%2fsecret.html", "//etc/passwd", "/neurons/L0.N1/../../../secret.html"):
            status, _, body = get(port, path)
            assert status in (400, 404), (path, status)
            assert b"root:" not in body and b"TOP SECRET" not in body and b"secret.html" not in body, path
        status, _, body = get(port, "/report.html")  # the run's own files still come through
        assert status == 200 and b"layer-table" in body


def test_server_lists_no_directory_and_serves_only_page_types(run):
    (run / "notes.txt").write_text("private")
    (run / "script.js").write_text("alert(1)")
    with serving(run) as port:
        for path in ("/neurons/", "/neurons", "/neurons/L0.N1/", "/viewer/neurons/", "/index.sqlite", "/notes.txt",
                     "/script.js"):
            status, _, body = get(port, path)
            assert status == 404, (path, status)
            assert b"L0.N1" not in body and b"private" not in body
        status, headers, _ = get(port, "/viewer/")
        assert status == 302 and headers["Location"] == "/viewer/index.html"
        for path, ctype in (("/run.json", "application/json"), ("/report.csv", "text/csv"),
                            ("/neurons/L0.N1/graph.svg", "image/svg+xml"), ("/neurons/L0.N1/graph.png", "image/png"),
                            ("/neurons/L0.N1/graph.dot", "text/plain"), ("/viewer/neurons/L1.N4.neg.html", "text/html")):
            status, headers, _ = get(port, path)
            assert status == 200 and headers["Content-Type"].startswith(ctype), path
        status, headers, body = get(port, "/report.html", method="HEAD")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000


# ---------------------------------------------------------------------------------------------
# item 3: security headers; a script planted in an SVG cannot run through the server


def test_every_response_forbids_scripts_except_the_pages_own(run):
    svg = run / "neurons" / "L0.N1" / "graph.svg"
    svg.write_text(svg.read_text().replace("</svg>", "<script>alert(document.domain)</script></svg>"))
    with serving(run) as port:
        for path in ("/neurons/L0.N1/graph.svg", "/report.html", "/run.json",
                     "/nothing-here.html", "/api/search?token=Paris", "/api/predict?key=L0.N1&text=x"):
            _, headers, _ = get(port, path)
            assert headers["X-Content-Type-Options"] == "nosniff", path
            csp = headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "script-src" not in csp, (path, csp)
        pages = [get(port, p) for p in ("/viewer/index.html", "/viewer/neurons/L0.N1.html")]
    for _, headers, body in pages:  # the index (search) and neuron pages (try your own text) run one fixed script
        csp = headers["Content-Security-Policy"]
        (script,) = re.findall(rb"<script nonce=\"[^\"]+\">(.*?)</script>", body, re.S)
        digest = base64.b64encode(hashlib.sha256(script).digest()).decode()
        assert f"script-src 'sha256-{digest}'" in csp  # exactly the page's own script, nothing else
        assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]


# ---------------------------------------------------------------------------------------------
# item 12: a NUL byte gets 400 and the server keeps going


def test_nul_in_the_path_answers_400(run):
    with serving(run) as port:
        for line in (b"GET /report.html%00.png HTTP/1.0", b"GET /rep\x00ort.html HTTP/1.0",
                     b"GET /api/search?token=a%00b HTTP/1.0", b"GET /%ff%fe HTTP/1.0"):
            reply = raw_request(port, line)
            assert reply.startswith(b"HTTP/1.0 400"), (line, reply[:80])
        assert get(port, "/report.html")[0] == 200


# ---------------------------------------------------------------------------------------------
# item 14: temporaries of a killed run are removed by the next one and never served


def test_stale_temporaries_are_removed_and_never_served(run):
    dead = 4_194_303  # above any pid the kernel hands out by default
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stale = [run / f".report.html.{dead}.abcd_123.tmp", run / "neurons" / "L0.N1" / f".graph.svg.{dead}.zz_yy_xx.tmp"]
        live = run / f".report.json.{sleeper.pid}.qwertyui.tmp"
        old_legacy, new_legacy = run / ".report.csv.old_1234.tmp", run / ".report.csv.new_1234.tmp"
        for p in [*stale, live, old_legacy, new_legacy]:
            p.write_text("<html>half-written secret</html>")
        os.utime(old_legacy, (time.time() - 3600, time.time() - 3600))
        with serving(run) as port:
            for p in [*stale, live, old_legacy]:
                status, _, body = get(port, "/" + str(p.relative_to(run)))
                assert status == 404 and b"secret" not in body
        build_all(run)
        assert not any(p.exists() for p in [*stale, old_legacy])
        assert live.exists() and new_legacy.exists()  # a live writer's file, a file that may still be written
    finally:
        sleeper.kill()
        sleeper.wait()


def _report_cmd(run):
    return [sys.executable, "-m", "n2g", "report", str(run)]


def _env():
    return dict(os.environ, PYTHONPATH=str(REPO))


def test_report_killed_at_random_points_resumes_to_the_same_files(tmp_path):
    reference = make_run(tmp_path / "a")
    assert subprocess.run(_report_cmd(reference), env=_env(), capture_output=True).returncode == 0
    start = time.perf_counter()
    killed = make_run(tmp_path / "b")
    assert subprocess.run(_report_cmd(killed), env=_env(), capture_output=True).returncode == 0
    took = time.perf_counter() - start
    shutil.rmtree(killed)
    killed = make_run(tmp_path / "b")
    rng = random.Random(11)
    for _ in range(2):
        proc = subprocess.Popen(_report_cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.0) * took)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    again = subprocess.run(_report_cmd(killed), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert temporaries(killed) == []
    for name in ("report.json", "report.csv"):
        assert (killed / name).read_text() == (reference / name).read_text()
    assert sorted(p.relative_to(killed) for p in killed.rglob("*")) == \
        sorted(p.relative_to(reference) for p in reference.rglob("*"))


def test_concurrent_reports_on_one_run_both_succeed(tmp_path):
    run = make_run(tmp_path)
    procs = [subprocess.Popen(_report_cmd(run), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert temporaries(run) == []
    assert json.loads((run / "report.json").read_text())["overall"]["n_neurons"] == 4
    assert sqlite3.connect(run / "index.sqlite").execute("SELECT COUNT(*) FROM neurons").fetchone() == (4,)


# ---------------------------------------------------------------------------------------------
# item 8: a closed stdout pipe ends quietly


@pytest.mark.parametrize("command", ["report", "info"])
def test_closed_stdout_pipe_exits_quietly(command, tmp_path):
    if command == "report":
        args = ["report", make_run(tmp_path)]
    else:
        tiny_model("llama").save_pretrained(tmp_path / "model")
        tiny_tokenizer().save_pretrained(tmp_path / "model")
        args = ["info", "--model", tmp_path / "model"]
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) is already gone
    try:
        res = subprocess.run([sys.executable, "-m", "n2g", *map(str, args)],
                             env=_env(), stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in res.stderr and "BrokenPipe" not in res.stderr, res.stderr
    assert res.returncode == 141


# ---------------------------------------------------------------------------------------------
# item 10: the port is validated


@pytest.mark.parametrize("port", ["70000", "-1", "65536", "http", "1e3", ""])
def test_bad_port_is_one_line(port, run, capsys):
    code, _, err = main(["serve", run, "--port", port], capsys)
    assert code == 2
    assert "--port" in one_error_line(err)


def test_make_server_checks_the_port(run):
    for port in (70000, -1, 2**70, "x", None, 1.5):
        with pytest.raises(N2GError, match="--port"):
            make_server(run, "127.0.0.1", port)


# ---------------------------------------------------------------------------------------------
# item 4: --neurons bounds are checked before a range is built


def test_huge_neuron_range_is_refused_without_building_it():
    tracemalloc.start()
    started = time.perf_counter()
    for spec in ("0-99999999999", "5,0-999999999999999999", "99999999999-99999999999"):
        with pytest.raises(N2GError, match="out of range"):
            parse_indices(spec, 1536, "neuron")
    with pytest.raises(N2GError, match="cannot read"):
        parse_indices("0-" + "9" * 5000, 1536, "neuron")  # not even int() of 5,000 digits
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - started < 1.0 and peak < 1_000_000
    assert parse_indices("0-3,2,1535", 1536, "neuron") == [0, 1, 2, 3, 1535]


# ---------------------------------------------------------------------------------------------
# items 5 and 6: disk full and read-only run directories during the report


def _fail_writes(monkeypatch, err: int):
    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("n2g.fileio.tempfile.mkstemp", refuse)


def test_report_on_a_read_only_run_is_one_line(run, monkeypatch, capsys):
    before = snapshot(run)
    _fail_writes(monkeypatch, errno.EROFS)
    code, _, err = main(["report", run], capsys)
    assert code == 2
    line = one_error_line(err)
    assert "cannot write" in line and "--out" in line
    assert snapshot(run) == before


def test_report_of_a_read_only_run_can_go_into_a_copy(run, tmp_path, capsys):
    (run / "report.html").unlink()
    os.symlink("/etc", run / "etc")  # a link is copied as a link, never followed
    before = snapshot(run)
    copy = tmp_path / "copy"
    code, out, err = main(["report", run, "--out", copy], capsys)
    assert code == 0, err
    assert snapshot(run) == before
    assert (copy / "report.html").exists() and (copy / "viewer" / "index.html").exists()
    assert (copy / "etc").is_symlink() and temporaries(tmp_path) == []
    assert json.loads((copy / "report.json").read_text())["overall"]["n_neurons"] == 4
    for bad in (copy, run / "inside"):  # not over an existing copy, not inside the run
        code, _, err = main(["report", run, "--out", bad], capsys)
        assert code == 2 and "--out" in one_error_line(err)


@pytest.mark.parametrize("where", ["fsync", "sqlite"])
def test_disk_full_during_the_report_is_one_line_and_leaves_nothing(where, run, monkeypatch, capsys):
    for name in ("report.html", "report.json", "index.sqlite"):
        (run / name).unlink()
    before = snapshot(run)
    if where == "fsync":  # the temporary is written, then the disk fills: it must not stay behind
        def full(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr("n2g.fileio.os.fsync", full)
    else:
        real_connect = sqlite3.connect

        class Full:
            def __init__(self, *a, **k):
                self.con = real_connect(*a, **k)

            def executemany(self, *a):
                raise sqlite3.OperationalError("database or disk is full")

            def __getattr__(self, name):
                return getattr(self.con, name)

        monkeypatch.setattr("n2g.search.sqlite3.connect", Full)
    code, _, err = main(["report", run], capsys)
    assert code == 2
    assert "disk full" in one_error_line(err)
    assert temporaries(run) == []
    after = snapshot(run)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {"index.sqlite"}  # whole files only: the index was finished first
    if "index.sqlite" in after:
        assert sqlite3.connect(run / "index.sqlite").execute("PRAGMA integrity_check").fetchone() == ("ok",)


# ---------------------------------------------------------------------------------------------
# item 9: a result.json with fields of the wrong type is named and skipped


@pytest.mark.parametrize("damage", [
    lambda d: d.update(scores=[1, 2]),
    lambda d: d.update(stats={"max_activation": "big", "firing_rate": 0.1}),
    lambda d: d.update(examples=[5]),
    lambda d: d["examples"][0].update(activations="hot"),
    lambda d: d["scores"]["n2g"].update(f1="good"),
    lambda d: d.update(status=7),
    lambda d: d.update(promoted=[[3, 1.0]]),
    lambda d: d.update(neuron={"layer": "zero", "index": 1}),
])
def test_report_names_and_skips_a_damaged_result(damage, run, capsys, caplog):
    path = run / "neurons" / "L0.N1" / "result.json"
    d = json.loads(path.read_text())
    damage(d)
    path.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="n2g"):
        code, _, err = main(["report", run], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    warned = [r.getMessage() for r in caplog.records if "L0.N1" in r.getMessage()]
    assert len(warned) == 1 and "damaged" in warned[0] and "n2g run" in warned[0], warned
    rep = json.loads((run / "report.json").read_text())
    assert [n["key"] for n in rep["neurons"]] == ["L0.N2", "L1.N3", "L1.N4.neg"]


def test_report_of_only_damaged_results_says_so(run, capsys):
    for path in run.glob("neurons/*/result.json"):
        path.write_text("[1, 2")
    code, _, err = main(["report", run], capsys)
    assert code == 2
    assert "none of the 4 neuron results" in one_error_line(err)


def test_graph_json_with_wrong_node_types_is_a_user_error(run):
    path = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(path.read_text())
    d["graph"]["nodes"][1]["token"] = 5
    path.write_text(json.dumps(d))
    with pytest.raises(N2GError, match="damaged"):
        load_graph_json(path)
    d["graph"] = {"nodes": "x"}
    path.write_text(json.dumps(d))
    with pytest.raises(N2GError, match="damaged"):
        load_graph_json(path)


# ---------------------------------------------------------------------------------------------
# item 11 and weak cases: damaged search index, error messages, client disconnects


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_damaged_search_index_is_rebuilt_under_serve(damage, run):
    index = run / "index.sqlite"
    if damage == "garbage":
        index.write_bytes(b"not a database" * 100)
    else:
        index.write_bytes(index.read_bytes()[:1500])
    with serving(run) as port:
        status, _, body = get(port, "/api/search?token=Paris&role=activator")
        assert status == 200, body
        assert [h["key"] for h in json.loads(body)["results"]] == ["L1.N4.neg", "L0.N1", "L0.N2"]
        status, _, body = get(port, "/api/similar?key=L0.N1")
        assert status == 200 and json.loads(body)["results"]


def test_unrebuildable_index_gives_a_json_error(run, monkeypatch):
    (run / "index.sqlite").write_bytes(b"\0" * 4096)

    def read_only(run_dir):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr("n2g.viewer.build_index", read_only)
    with serving(run) as port:
        status, headers, body = get(port, "/api/search?token=Paris")
    assert status == 503 and headers["Content-Type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert "n2g report" in error and str(run) not in error


def test_server_errors_do_not_show_the_run_path(run):
    with serving(run) as port:
        for path in ("/api/similar?key=L9.N9", "/api/search?token=", "/api/search?token=x&role=nope",
                     "/api/search?token=x&limit=many", "/missing.html"):
            _, _, body = get(port, path)
            assert str(run).encode() not in body and str(run.parent).encode() not in body, path


def test_client_disconnects_are_not_logged_as_tracebacks(run, caplog):
    server = make_server(run, "127.0.0.1", 0)
    try:
        stderr = io.StringIO()
        with caplog.at_level(logging.DEBUG, logger="n2g"), contextlib.redirect_stderr(stderr):
            for exc in (BrokenPipeError(32, "Broken pipe"), ConnectionResetError(104, "reset")):
                try:
                    raise exc
                except OSError:
                    server.handle_error(None, ("127.0.0.1", 5555))
        assert stderr.getvalue() == ""
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not any(r.exc_info for r in caplog.records)
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------
# item 13 and item 7 (model cache): checksum of the de-quantised cache, read-only cache


@pytest.fixture
def tiny_cache(tmp_path, monkeypatch):
    from n2g import models

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model, tok = tiny_model("llama"), tiny_tokenizer()
    target = models.cache_dir() / "models" / "tiny-1234"
    models._save_cache(model, tok, target)
    return model, target


def test_model_cache_with_finite_garbage_is_detected_and_removed(tiny_cache, caplog):
    from n2g import models

    model, target = tiny_cache
    loaded, _ = models._load_cache(target)
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    # overwrite the last 4 KiB of tensor data with other finite float32 values
    data[-4096:] = torch.full((1024,), 0.125).numpy().tobytes()
    weights.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="n2g"):
        assert models._load_cache(target) is None
    assert "damaged" in caplog.text and "checksum" in caplog.text
    assert not target.exists()  # so the next load rebuilds it


def test_model_cache_without_a_checksum_gets_one(tiny_cache):
    from n2g import models

    _, target = tiny_cache
    (target / models.CHECKSUM_NAME).unlink()
    assert models._load_cache(target) is not None
    assert (target / models.CHECKSUM_NAME).read_text().split()[0] == models._sha256(target / "model.safetensors")


def test_unwritable_model_cache_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    from n2g import models

    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("N2G_CACHE", str(blocker / "cache"))  # cannot be created
    with caplog.at_level(logging.WARNING, logger="n2g"):
        models._save_cache(tiny_model("llama"), tiny_tokenizer(), models.cache_dir() / "models" / "tiny")
    assert "cannot write the model cache" in caplog.text


# ---------------------------------------------------------------------------------------------
# weak cases


def test_fifo_and_device_corpus_say_what_they_are(tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    for source in (fifo, "/dev/null"):
        with pytest.raises(N2GError, match="not a regular file"):
            load_texts(str(source))


def test_folder_of_several_gguf_files_names_them(tmp_path):
    from n2g.models import load_model

    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(b"GGUF")
    with pytest.raises(N2GError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        load_model(str(tmp_path))


def test_out_into_an_unrelated_directory_is_refused(tmp_path, capsys):
    (tmp_path / "thesis.tex").write_text("precious")
    code, _, err = main(["run", "--model", tmp_path / "no-model", "--out", tmp_path, "-q"], capsys)
    assert code == 2
    assert "not an n2g run" in one_error_line(err)
    assert [p.name for p in tmp_path.iterdir()] == ["thesis.tex"]


def test_max_excerpts_tokenises_only_what_it_needs():
    words = [f"w{i}" for i in range(50)]
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(200_000))  # ~7 MB
    tok = tiny_tokenizer()
    seen = []

    def encode(t):
        seen.append(len(t))
        return tok.encode(t, add_special_tokens=False)

    got = make_excerpts([text], encode, length=16, max_excerpts=64)
    assert sum(seen) < 500_000
    whole = tok.encode(text[:200_000], add_special_tokens=False)
    assert got.tolist() == torch.tensor(whole[: 64 * 16]).view(64, 16).tolist()


# ---------------------------------------------------------------------------------------------
# a hostile corpus through every output: DOT parsed by dot, SVG parsed as XML, pages parsed as HTML

HOSTILE_WORDS = ["<script>alert(1)</script>", '"];evil[label="x', "}digraph{", "<b>bold</b>", "&amp;", "\\\\n",
                 "{brace}|pipe", "'single'", "<!--", "]]>", "<?xml", "javascript:alert(1)"]


def hostile_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<bos>", "<eos>", "<pad>", *HOSTILE_WORDS] + [f"w{i}" for i in range(40)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_hostile_corpus_reaches_every_output_as_text(tmp_path):
    import xml.etree.ElementTree as ET
    from html.parser import HTMLParser

    from n2g.corpus import Corpus
    from n2g.models import SubjectModel
    from n2g.pipeline import RunOptions, run as run_pipeline

    torch.manual_seed(0)
    tok = hostile_tokenizer()
    model = SubjectModel(tiny_model("llama"), tok, spec="tiny-hostile")
    rng = random.Random(0)
    words = HOSTILE_WORDS * 3 + [f"w{i}" for i in range(40)]
    text = " ".join(rng.choice(words) for _ in range(24 * 100))
    corpus = Corpus("hostile", 24, make_excerpts([text], model.encode, length=24))
    out = tmp_path / "run"
    run_pipeline(RunOptions(layers="0", neurons="0-5", out=str(out), group_size=6, progress=False),
                 model=model, corpus=corpus)
    neurons = [p for p in (out / "neurons").iterdir() if (p / "graph.json").exists()]
    assert neurons
    shown = set()
    for folder in neurons:
        assert "evil [" not in (folder / "graph.dot").read_text()
        if shutil.which("dot"):  # dot parsed the source; the SVG it made is well-formed XML
            svg = ET.parse(folder / "graph.svg")
            assert not [e for e in svg.iter() if e.tag.endswith("script")]
            shown |= {t.text for t in svg.iter() if t.tag.endswith("text") and t.text}

    class Tags(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self.handlers, self.text = 0, [], []

        def handle_starttag(self, tag, attrs):
            self.scripts += tag == "script"
            self.nonces = getattr(self, "nonces", []) + [dict(attrs).get("nonce")] * (tag == "script")
            self.handlers += [k for k, v in attrs if k.startswith("on")
                              or (k in ("href", "src", "action", "xlink:href") and "javascript:" in (v or ""))]

        def handle_data(self, data):
            self.text.append(data)

    from n2g.viewer import NEURON_JS

    for page in [*(out / "viewer" / "neurons").glob("*.html"), out / "report.html"]:
        p = Tags()
        raw = page.read_text()
        p.feed(raw)
        assert not p.handlers, page
        if page.name == "report.html":
            assert p.scripts == 0
        else:  # a neuron page runs only its fixed try-your-own-text script, by nonce
            assert p.scripts == 1 and raw.count(NEURON_JS) == 1 and p.nonces[0] and f"'nonce-{p.nonces[0]}'" in raw, page
    if shutil.which("dot"):
        assert any("<script>" in t or "digraph" in t or "evil" in t for t in shown)  # hostile tokens drawn as text
    index = Tags()
    index.feed((out / "viewer" / "index.html").read_text())
    assert index.scripts == 1 and not index.handlers


def test_disk_full_when_a_run_starts_writing_is_one_line(tmp_path, monkeypatch):
    from n2g.corpus import Corpus
    from n2g.models import SubjectModel
    from n2g.pipeline import RunOptions, run as run_pipeline

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("n2g.fileio.os.fsync", full)
    model = SubjectModel(tiny_model("llama"), tiny_tokenizer(), spec="tiny-llama")
    corpus = Corpus("planted", 16, torch.randint(4, 68, (40, 16)))
    out = tmp_path / "run"
    with pytest.raises(N2GError, match="disk full"):
        run_pipeline(RunOptions(layers="0", neurons="0-1", out=str(out), progress=False), model=model, corpus=corpus)
    assert temporaries(tmp_path) == []


def test_index_page_of_another_version_keeps_its_own_script_only(run):
    index = run / "viewer" / "index.html"
    page = index.read_text()
    nonce = re.search(r'<script nonce="([^"]+)">', page).group(1)
    index.write_text(page.replace('"use strict";', '"use strict"; /* older viewer */'))
    with serving(run) as port:
        _, headers, _ = get(port, "/viewer/index.html")
    csp = headers["Content-Security-Policy"]
    assert f"script-src 'nonce-{nonce}'" in csp and "unsafe-inline" not in csp.split("script-src")[1]


def test_missing_index_that_cannot_be_built_gives_a_json_error(run, monkeypatch):
    (run / "index.sqlite").unlink()
    _fail_writes(monkeypatch, errno.EROFS)
    with serving(run) as port:
        status, headers, body = get(port, "/api/search?token=Paris")
        assert status == 503 and "n2g report" in json.loads(body)["error"]
        assert get(port, "/report.html")[0] == 200
