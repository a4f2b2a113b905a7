"""Fault injection: hostile requests to the server, full and read-only disks, kill -9, damaged files.

Every case of issue 11 has a test here that failed before its fix. All of them run on the
synthetic run of tests/helpers_run.py or on tiny random models built in the test, so the file
takes seconds. Faults are injected where the operating system would raise them (``mkstemp``,
``fsync``, sqlite), so they run without root, a tmpfs or a full disk.
"""

from __future__ import annotations

import base64
import contextlib
import csv
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
from urllib.parse import quote

import pytest
import torch

from conftest import deny, tiny_model, tiny_tokenizer
from helpers_run import make_run, serving
from n2g import cli
from n2g.corpus import load_texts, make_excerpts
from n2g.errors import N2GError
from n2g.pipeline import parse_indices
from n2g.render import load_graph_json
from n2g.report import build_all
from n2g.viewer import INDEX_JS, NEURON_JS, make_server

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


def get(port: int, path: str, method: str = "GET"):
    """(status, headers, body) for a raw request path, sent exactly as given (an API request with the
    header the viewer's pages add)."""
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.putrequest(method, path, skip_accept_encoding=True)
        if path.startswith("/api/"):
            con.putheader("X-N2G-Request", "1")
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


@pytest.mark.parametrize("writer", ["killed", "live"])
def test_an_out_folder_holding_only_the_temporary_of_run_json_is_a_run_being_made(tmp_path, writer):
    # `n2g run` writes run.json under a temporary name, fsyncs it and links it into place. A run killed in
    # that moment left an --out holding that temporary alone, and another run on the same --out that looked
    # in that moment (two started at once, or on machines sharing the folder) saw the same: each was refused
    # as "a non-empty directory that is not an n2g run" (the rerun too, for good). Only n2g's temporaries there
    # make no folder of someone else's.
    from n2g.fileio import HOST

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        out = tmp_path / "run"
        out.mkdir()
        pid = 4_194_303 if writer == "killed" else sleeper.pid
        (out / f".run.json.{pid}-{HOST}.k3x_9abc.tmp").write_text('{"kind": "n2g.r')
        cli._check_out(out)  # no N2GError
        (out / "notes.txt").write_text("mine")
        with pytest.raises(N2GError, match="non-empty directory that is not an n2g run"):
            cli._check_out(out)
    finally:
        sleeper.kill()
        sleeper.wait()


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


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_ctrl_c_in_a_terminal_while_graphviz_draws_leaves_no_partial_drawing(tmp_path):
    # A terminal's Ctrl-C reaches every process of its foreground group, Graphviz's dot too, which then writes
    # what it has drawn so far and exits 0 (its own SIGINT handler): that partial drawing was put in place as
    # graph.png / graph.svg, newer than graph.json, so no later `n2g report` drew it again.
    run = make_run(tmp_path)
    real, started, go = shutil.which("dot"), tmp_path / "started", tmp_path / "go"
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "dot"  # dot as it behaves on SIGINT; the first drawing waits for the test's Ctrl-C
    fake.write_text(f"#!{sys.executable}\n" + "\n".join([
        "import os, signal, sys, time",
        "def partial(signum, frame):",
        "    for a in sys.argv[1:]:",
        "        if a.startswith('-o'):",
        "            open(a[2:], 'w').write('partial')",
        "    sys.exit(0)",
        "signal.signal(signal.SIGINT, partial)",
        "try:",
        f"    os.mkdir({str(started)!r})",
        "except FileExistsError:",
        "    pass",
        "else:",
        f"    while not os.path.exists({str(go)!r}):",
        "        time.sleep(0.02)",
        f"os.execv({real!r}, [{real!r}] + sys.argv[1:])", ""]))
    fake.chmod(0o755)
    env = dict(_env(), PATH=f"{fake.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    as_in_a_terminal = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                        "from n2g.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", as_in_a_terminal, "report", str(run)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert started.exists(), proc.communicate()[1]
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the report and the dot it started
        go.touch()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("n2g: interrupted; what was written is whole; re-run the same command "
                                            "to finish the report"), err
    assert "cannot draw" not in err, err  # the drawing was not the graph's fault
    drawings = lambda: {p: p.read_bytes() for p in run.glob("neurons/*/graph.*") if p.suffix in (".svg", ".png")}
    assert drawings() and not [p for p, data in drawings().items() if data == b"partial"]
    again = subprocess.run(_report_cmd(run), env=_env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert not [p for p, data in drawings().items() if data == b"partial"] and temporaries(run) == []


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


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device every write to fails with ENOSPC")
@pytest.mark.parametrize("command", [["search", "paris"], ["show", "L0.N1", "--paths", "all"], ["show", "L0.N1", "--json"]])
def test_stdout_on_a_full_device_is_one_line(command, tmp_path):
    # `n2g ... > /dev/full` (or a full disk): one line and exit 2, not a traceback, at a print or at the last flush
    run = make_run(tmp_path)
    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "n2g", command[0], str(run), *command[1:]], env=_env(), stdout=full,
                             stderr=subprocess.PIPE, text=True, timeout=120)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "Exception ignored" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1] == ("n2g: error: cannot write the output (No space left on device); free some "
                                           "space, or send the output elsewhere")


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


def test_a_report_into_a_copy_interrupted_says_how_to_finish_it(run, tmp_path, monkeypatch, capsys):
    # Ctrl-C after the copy was made said "re-run the same command to resume", and the same command refused
    # the copy it had made ("--out ... already exists"), with no word of how to finish it.
    import n2g.report

    def interrupted(run_dir):
        raise KeyboardInterrupt

    copy = tmp_path / "copy"
    with monkeypatch.context() as m:
        m.setattr(n2g.report, "build_all", interrupted)
        code, _, err = main(["report", run, "--out", copy], capsys)
    assert code == 130
    assert err.splitlines() == [f"n2g: interrupted; the copy {copy} is made; `n2g report {copy}` finishes its report"]
    code, _, err = main(["report", run, "--out", copy], capsys)
    assert code == 2 and f"`n2g report {copy}` finishes its report" in one_error_line(err)
    code, _, err = main(["report", copy], capsys)
    assert code == 0, err
    assert json.loads((copy / "report.json").read_text())["overall"]["n_neurons"] == 4


def test_a_run_with_a_file_it_cannot_read_copied_for_a_report_is_one_line(run, tmp_path, monkeypatch, capsys):
    # It printed shutil's list of (source, copy, error) tuples and asked for a writable --out.
    import shutil

    real = shutil.copyfile  # what copytree's copy2 calls to read a file
    svg = run / "neurons" / "L0.N1" / "graph.svg"

    def copyfile(src, dst, **kwargs):
        if Path(src) == svg:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(src))
        return real(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)
    code, _, err = main(["report", run, "--out", tmp_path / "copy"], capsys)
    assert code == 2
    line = one_error_line(err)
    assert f"cannot read {svg} of the run (permission denied)" in line and "readable" in line
    assert not (tmp_path / "copy").exists() and temporaries(tmp_path) == []


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
    lambda d: d["scores"].update({'=HYPERLINK("http://x.example","open")': d["scores"]["n2g"]}),  # a formula
    lambda d: d.update(ceiling=True),  # the token ceiling: a record of counts and an F1
    lambda d: d.update(ceiling={"n_firing": "12", "n_seen": 3, "f1": 0.4}),
    lambda d: d.update(ceiling={"n_firing": 2, "n_seen": 3, "f1": 0.4}),
    lambda d: d.update(ceiling={"n_firing": 5, "n_seen": 3, "f1": 7.0}),
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


def test_report_names_a_neuron_folder_it_cannot_open(run, monkeypatch, capsys, caplog):
    # A glob passes over a folder it cannot search without a word: the neuron vanished from the report.
    deny(monkeypatch, "os.stat", run / "neurons" / "L0.N1" / "result.json")
    with caplog.at_level(logging.WARNING, logger="n2g"):
        code, _, err = main(["report", run], capsys)
    assert code == 0, err
    warned = [r.getMessage() for r in caplog.records if "L0.N1" in r.getMessage()]
    assert len(warned) == 1 and "neuron folder" in warned[0] and "readable" in warned[0], warned
    rep = json.loads((run / "report.json").read_text())
    assert [n["key"] for n in rep["neurons"]] == ["L0.N2", "L1.N3", "L1.N4.neg"]


def test_report_of_a_neurons_folder_it_cannot_list_is_one_line(run, monkeypatch, capsys):
    # It said "no neuron results in RUN; run `n2g run` first" of a run with four.
    deny(monkeypatch, "os.scandir", run / "neurons")
    (run / "index.sqlite").unlink()  # so that search must build it
    for argv in (["report", run], ["search", run, "the"]):
        code, _, err = main(argv, capsys)
        assert code == 2
        line = one_error_line(err)
        assert "cannot list" in line and "neurons" in line and "readable" in line


def test_resuming_over_a_neuron_folder_it_cannot_open_is_one_line(run):
    # Path.exists raised PermissionError from inside `n2g run` (a traceback) before.
    from n2g.records import NeuronId
    from n2g.store import RunStore

    folder = run / "neurons" / "L0.N1"
    real = Path.exists

    def exists(self, *args, **kwargs):
        if self == folder / "result.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "exists", exists)
        with pytest.raises(N2GError, match="permission denied.*re-run the same command"):
            RunStore(run).is_done(NeuronId(0, 1))
        assert RunStore(run).is_done(NeuronId(0, 2))


def test_a_graph_file_that_cannot_be_read_says_so(run, monkeypatch):
    # It said "delete it and rerun `n2g run`" of a file that only needs its permissions back.
    path = run / "neurons" / "L0.N1" / "graph.json"
    deny(monkeypatch, "os.open", path)
    with pytest.raises(N2GError, match="cannot read graph file .*: permission denied; make it readable$"):
        load_graph_json(path)


def test_a_stored_result_that_cannot_be_read_is_redone_and_said_so(run, monkeypatch, caplog):
    from n2g.records import NeuronId
    from n2g.store import RunStore

    deny(monkeypatch, "os.open", run / "neurons" / "L0.N1" / "result.json")
    with caplog.at_level(logging.WARNING, logger="n2g"):
        assert not RunStore(run).is_done(NeuronId(0, 1))
    assert any("L0.N1" in r.getMessage() and "permission denied" in r.getMessage() and "redone" in r.getMessage()
               for r in caplog.records), caplog.text


@pytest.mark.parametrize("err", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_permission_error_met_anywhere_is_one_line(err, run, tmp_path, monkeypatch, capsys):
    # e.g. an unreadable $N2G_CACHE: the model cache's is_file() raised from deep inside loading.
    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    for path, in_cache in ((tmp_path / "cache" / "models" / "m" / "model.safetensors", True),
                           (tmp_path / "elsewhere" / "run.json", False)):
        def refuse(args):
            raise PermissionError(err, os.strerror(err), str(path))

        monkeypatch.setattr(cli, "_report", refuse)
        code, _, err_text = main(["report", run], capsys)
        assert code == 2
        line = one_error_line(err_text)
        assert str(path) in line and ("read-only" if err == errno.EROFS else "permission denied") in line
        assert ("set $N2G_CACHE" in line) == in_cache


def test_text_from_result_files_never_becomes_a_spreadsheet_formula(run):
    from n2g.fileio import csv_cell
    from n2g.store import RunStore

    assert [csv_cell(v) for v in ("=1+1", "+1", "-x", "@SUM(A1)", "\tx", "fitted", -0.5, None)] == \
        ["'=1+1", "'+1", "'-x", "'@SUM(A1)", "'\tx", "fitted", -0.5, ""]
    path = run / "neurons" / "L0.N1" / "result.json"
    d = json.loads(path.read_text())
    d["status"] = "=cmd|' /C calc'!A0"
    d["scores"]["n2g"]["status"] = "@SUM(1+1)"
    path.write_text(json.dumps(d))
    RunStore(run).write_scores_table()
    rows = [r for r in csv.DictReader((run / "scores.csv").open()) if r["neuron"] == "L0.N1"]
    assert rows and {r["status"] for r in rows} == {"'=cmd|' /C calc'!A0"}
    assert [r["score_status"] for r in rows if r["method"] == "n2g"] == ["'@SUM(1+1)"]
    assert all(float(r["f1"]) >= 0 for r in rows if r["f1"])  # numbers are untouched


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


def test_a_viewer_page_another_version_wrote_cannot_name_its_own_script(run):
    """A run folder may come from anyone: a page whose script is not this version's is rendered again
    from the run's records, and its nonce (which would let any script in it run) is never allowed."""
    hostile = '<script nonce="evilnonce">fetch("/api/predict")</script>'
    index, page = run / "viewer" / "index.html", sorted((run / "viewer" / "neurons").glob("*.html"))[0]
    for f in (index, page):
        f.write_text(f.read_text().replace('"use strict";', '"use strict"; /* older viewer */') + hostile)
    with serving(run) as port:
        for path in ("/viewer/index.html", f"/viewer/neurons/{page.name}"):
            status, headers, body = get(port, path)
            csp = headers["Content-Security-Policy"]
            assert status == 200 and "evilnonce" not in csp and "nonce-" not in csp, path
            assert b"evilnonce" not in body and b"older viewer" not in body, path
            # this version's page, running its own fixed script by hash
            script = INDEX_JS if path.endswith("index.html") else NEURON_JS
            assert script.encode() in body and "'sha256-" in csp.split("script-src")[1], path
            assert int(headers["Content-Length"]) == len(body)


def test_a_foreign_index_page_is_rendered_again_beside_a_damaged_search_index(run):
    index = run / "viewer" / "index.html"
    index.write_text(index.read_text().replace('"use strict";', '"use strict"; /* other */')
                     + '<script nonce="evilnonce">alert(1)</script>')
    (run / "index.sqlite").write_bytes(b"garbage" * 100)
    with serving(run) as port:
        status, headers, body = get(port, "/viewer/index.html")
    assert status == 200 and b"evilnonce" not in body and INDEX_JS.encode() in body
    assert "'sha256-" in headers["Content-Security-Policy"]


def test_a_foreign_viewer_page_that_cannot_be_rendered_again_runs_no_script(run):
    pages = run / "viewer" / "neurons"
    stray = pages / "L99.N99.html"  # no such neuron in the run
    stray.write_text('<p>old</p><script nonce="evilnonce">alert(1)</script>')
    with serving(run) as port:
        status, headers, body = get(port, "/viewer/neurons/L99.N99.html")
    csp = headers["Content-Security-Policy"]
    assert status == 200 and b"<p>old</p>" in body
    assert "script-src" not in csp and "default-src 'none'" in csp


def test_missing_index_that_cannot_be_built_gives_a_json_error(run, monkeypatch):
    (run / "index.sqlite").unlink()
    _fail_writes(monkeypatch, errno.EROFS)
    with serving(run) as port:
        status, headers, body = get(port, "/api/search?token=Paris")
        assert status == 503 and "n2g report" in json.loads(body)["error"]
        assert get(port, "/report.html")[0] == 200


# ---------------------------------------------------------------------------------------------
# remaining holes: what a run directory from someone else (or a damaged one) can hold


def _edit_result(run: Path, key: str, change) -> None:
    path = run / "neurons" / key / "result.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))


def test_planted_markup_in_graph_svg_never_reaches_the_neuron_page(run, capsys):
    svg = run / "neurons" / "L0.N1" / "graph.svg"
    planted = ('<script>alert(1)</script><foreignObject><div>FOREIGN</div><meta http-equiv="refresh" '
               'content="0;url=https://evil.example/"/></foreignObject><style>body{display:none}</style>'
               '<a xlink:href="javascript:alert(2)"><text x="1" y="1" onclick="alert(3)">LINKED</text></a>'
               '<image href="https://evil.example/x.png"/><g id="try-form" style="x"><path d="M0 0" '
               'fill="url(https://evil.example/#p)" stroke="\\75 rl(x)"/></g></svg>')
    svg.write_text(svg.read_text().replace("</svg>", planted))
    code, _, err = main(["report", run], capsys)
    assert code == 0, err
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    drawn = page[page.index('<div class="graph" id="graph">'):page.index("<h2>Try your own text")]
    for bad in ("<script", "alert(", "foreignObject", "FOREIGN", "http-equiv", "evil.example", "<style", "onclick",
                "javascript:", "<image", 'id="try-form"', "style=", "\\75"):
        assert bad not in drawn, bad
    assert page.count('id="try-form"') == 1 and page.count("<script") == 1
    assert "LINKED" in drawn  # the drawing itself is kept: texts, shapes, classes, tooltips
    assert 'class="node activator' in drawn and "xlink:title=" in drawn and "<polygon" in drawn
    # the file itself is not linked (opened from disk it would run its script); a clean one is
    assert "graph.svg" not in page and "graph.json" in page
    clean = sorted(p for p in (run / "viewer" / "neurons").glob("*.html") if p.name != "L0.N1.html")
    assert clean and all("/graph.svg" in p.read_text() for p in clean
                         if (run / "neurons" / p.name[:-5] / "graph.svg").exists())


@pytest.mark.parametrize("prolog", ['<?xml-stylesheet type="text/xsl" href="evil.xsl"?>',
                                    '<!DOCTYPE svg [<!ENTITY e "x">]>'])
def test_a_graph_svg_with_a_stylesheet_or_entities_is_not_linked(prolog, run, capsys):
    svg = run / "neurons" / "L0.N1" / "graph.svg"
    text = svg.read_text()
    svg.write_text(text.replace("<svg", prolog + "<svg", 1))
    code, _, err = main(["report", run], capsys)
    assert code == 0, err
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert "graph.svg" not in page and '<div class="graph" id="graph"><svg' in page


def test_graph_svg_that_is_not_one_is_drawn_from_the_graph_instead(run, capsys):
    svg = run / "neurons" / "L0.N1" / "graph.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script')  # not even XML
    os.utime(svg, (time.time() + 60, time.time() + 60))  # newer than graph.json: the report keeps it
    code, _, err = main(["report", run], capsys)
    assert code == 0, err
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert "alert(1)" not in page and page.count("<script") == 1
    assert ('<div class="graph" id="graph"><svg' in page) or ('id="graph-dot"' in page)


def test_a_node_kind_cannot_add_attributes_to_the_drawing(tmp_path):
    from n2g.render import render, to_dot

    G = load_graph_json(make_run(tmp_path) / "neurons" / "L0.N1" / "graph.json")
    node = next(n for n, a in G.nodes(data=True) if a.get("kind") == "activator")
    G.nodes[node]["kind"] = 'context" URL="javascript:alert(1)" target="_top'
    dot = to_dot(G)
    assert "javascript" not in dot and "URL=" not in dot
    if shutil.which("dot"):
        paths = render(G, tmp_path / "graph", formats=("svg",))
        assert "javascript" not in paths[-1].read_text()


@pytest.mark.parametrize("histogram, bars", [
    ({"edges": [-1e308, 1e308], "counts": [1], "bands": []}, 0),  # a bin too wide for a float
    ({"edges": [0.0, 0.5, 1.0], "counts": [1, 10**400], "bands": []}, 1),  # a density that underflows to 0
    ({"edges": [0.0, 1.0, 0.5], "counts": [3, 3], "bands": []}, 0),  # edges out of order
])
def test_histogram_no_drawing_can_hold_is_left_out_of_the_page(histogram, bars, run, capsys):
    _edit_result(run, "L0.N1", lambda d: d.update(histogram=histogram))
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert page.count('<rect class="bar"') == bars
    assert ('id="histogram"' in page) == bool(bars) and ("no histogram stored" in page) == (not bars)


def test_ablation_and_steering_records_with_missing_or_odd_fields_render(run, capsys):
    def change(d):
        d["ablation"] = {"ce_clean": 1.0, "recovered": 0.5, "ce_increase": {"graph": 0.1}, "kl": {}}
        d["steering"] = {"prompt": "p <b>", "before": "b", "after": "a", "gainers": [["x", 0.1, 0.2]], "losers": [],
                         "scale": "four", "kl": [1]}
    _edit_result(run, "L0.N1", change)
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    page = (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    assert 'id="ablation"' in page and 'id="steer-gainers"' in page
    assert "clamped to — ×" in page and "p &lt;b&gt;" in page


def test_stored_null_activations_render(run, capsys):
    # Example.to_dict stores a non-finite activation as null; the pages must take it
    _edit_result(run, "L0.N1", lambda d: [e.update(activations=[None] * len(e["activations"])) for e in d["examples"]])
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "test-excerpts" in (run / "viewer" / "neurons" / "L0.N1.html").read_text()


def test_firing_rate_above_one_is_a_damaged_result(run, capsys, caplog):
    _edit_result(run, "L0.N1", lambda d: d["stats"].update(firing_rate=1e308))
    with caplog.at_level(logging.WARNING, logger="n2g"):
        code, _, err = main(["report", run], capsys)
    assert code == 0 and "Warning" not in err, err
    assert any("L0.N1" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)


def test_a_mean_that_overflows_is_null_in_report_json(run, capsys):
    # two finite but huge values average to infinity: report.json stays strict JSON
    for folder in sorted((run / "neurons").iterdir())[:2]:
        _edit_result(run, folder.name, lambda d: d.update(
            ablation={"recovered": 1e308, "ce_increase": {"graph": 1e308, "zero": 1.0, "mean": 1.0}}))
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    text = (run / "report.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"report.json holds {c}"))
    assert "Infinity" not in text and "NaN" not in text
    assert "layer-table" in (run / "report.html").read_text()


@pytest.mark.parametrize("change", [
    lambda d: d.update(model="toy"), lambda d: d.update(corpus=[1]), lambda d: d.update(partition="x"),
    lambda d: d.update(model={}, partition={"other": 1}),
])
def test_run_json_sections_of_another_shape_do_not_break_the_report(change, run, capsys):
    path = run / "run.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "layer-table" in (run / "report.html").read_text()


@pytest.mark.parametrize("change", [
    lambda d: d.update(schema_version=999),
    lambda d: d.update(match=7),
    lambda d: d.update(token_values=[[-5, 1.0]]),
    lambda d: d.update(end_activation=None),
])
def test_a_graph_the_server_refuses_is_refused_by_the_report_too(run, change, capsys, caplog):
    # `n2g serve` loads graphs with NeuronGraph.load and told the user to run `n2g report` to find a damaged one,
    # but the report's own loader drew and indexed these without a word
    from n2g.graph import NeuronGraph

    path = run / "neurons" / "L0.N1" / "graph.json"
    d = json.loads(path.read_text())
    change(d)
    path.write_text(json.dumps(d))
    with pytest.raises(N2GError):
        NeuronGraph.load(path)
    with pytest.raises(N2GError, match="is damaged"):
        load_graph_json(path, check=True)
    with caplog.at_level(logging.WARNING, logger="n2g"):
        code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert any("L0.N1" in r.getMessage() and "is damaged" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("text", ["", "[]", "null", '{"model": '])
def test_a_damaged_run_json_is_named_by_the_report(run, text, capsys, caplog):
    (run / "run.json").write_text(text)  # was: a report without the run's details, and not a word why
    with caplog.at_level(logging.WARNING, logger="n2g"):
        code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert any("run.json cannot be read" in r.getMessage() for r in caplog.records)


DEEP = '{"kind": "n2g.graph", "graph": ' + "[" * 100_000 + "]" * 100_000 + "}"


def test_deeply_nested_json_is_a_damaged_file_not_a_crash(run, tmp_path, capsys):
    from n2g.store import RunStore

    (run / "neurons" / "L0.N1" / "graph.json").write_text(DEEP)
    with pytest.raises(N2GError, match="cannot read graph file"):
        load_graph_json(run / "neurons" / "L0.N1" / "graph.json")
    code, _, err = main(["report", run], capsys)
    assert code == 0 and "Traceback" not in err, err
    assert "cannot draw the graph" in (run / "viewer" / "neurons" / "L0.N1.html").read_text()
    for text in (DEEP, "[1, 2]"):
        (tmp_path / "other").mkdir(exist_ok=True)
        (tmp_path / "other" / "run.json").write_text(text)
        with pytest.raises(N2GError):
            RunStore(tmp_path / "other").open({"model": "x"})


def test_report_never_writes_through_a_link_out_of_the_run(run, tmp_path, capsys):
    outside = tmp_path / "www"
    outside.mkdir()
    (outside / "index.html").write_text("VICTIM")
    shutil.rmtree(run / "viewer")
    os.symlink(outside, run / "viewer")
    code, _, err = main(["report", run], capsys)
    assert code == 2 and "viewer" in one_error_line(err)
    assert (outside / "index.html").read_text() == "VICTIM" and os.listdir(outside) == ["index.html"]


def test_a_neuron_folder_linking_out_of_the_run_is_neither_read_nor_written(run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(run / "neurons" / "L0.N1", elsewhere)
    for f in ("graph.svg", "graph.png", "graph.dot"):
        (elsewhere / f).unlink(missing_ok=True)
    shutil.rmtree(run / "neurons" / "L0.N1")
    os.symlink(elsewhere, run / "neurons" / "L0.N1")
    before = snapshot(elsewhere)
    code, _, err = main(["report", run], capsys)
    assert code == 0, err
    assert snapshot(elsewhere) == before  # no graph.svg/png/dot rendered into it
    rep = json.loads((run / "report.json").read_text())
    assert "L0.N1" not in [n["key"] for n in rep["neurons"]]


def test_run_store_never_saves_through_a_link_out_of_the_run(tmp_path):
    from n2g.records import NeuronId, NeuronResult, NeuronStats
    from n2g.store import RunStore

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "run" / "neurons").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "run" / "neurons" / "L0.N0")
    result = NeuronResult(neuron=NeuronId(0, 0), status="dead", stats=NeuronStats(max_activation=0.0))
    with pytest.raises(N2GError, match="leads out of the run"):
        RunStore(tmp_path / "run").save(result, None)
    assert os.listdir(elsewhere) == []


def test_a_resumed_run_never_counts_a_neuron_whose_result_links_out_of_the_run(tmp_path):
    from n2g.records import NeuronId, NeuronResult, NeuronStats
    from n2g.store import RunStore

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = NeuronResult(neuron=NeuronId(0, 0), status="dead", stats=NeuronStats(max_activation=0.0))
    (elsewhere / "result.json").write_text(json.dumps(result.to_dict()))
    store = RunStore(tmp_path / "run")
    (tmp_path / "run" / "neurons").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "run" / "neurons" / "L0.N0")  # a whole folder
    (tmp_path / "run" / "neurons" / "L0.N1").mkdir()
    os.symlink(elsewhere / "result.json", tmp_path / "run" / "neurons" / "L0.N1" / "result.json")  # one file
    assert store.load_result(NeuronId(0, 0)) is None and not store.is_done(NeuronId(0, 1))  # redone, not taken
    assert store.results() == []  # nor summarised
    with pytest.raises(N2GError, match="leads out of the run"):  # and the redo says what to do
        store.save(result, None)


def get_as(port: int, path: str, host: str):
    con = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        con.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        con.putheader("Host", host)
        con.endheaders()
        r = con.getresponse()
        return r.status, r.read()
    finally:
        con.close()


def test_server_on_loopback_answers_only_requests_for_this_machine(run):
    # a page on evil.example whose name is rebound to 127.0.0.1 (DNS rebinding) must not read the run
    with serving(run) as port:
        for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1.evil.example:{port}", "[2001:db8::1]:80",
                     "[::ffff:10.0.0.1]:80"):
            for path in ("/viewer/index.html", "/api/search?token=Paris", "/api/predict?key=L0.N1&text=x",
                         "/run.json"):
                status, body = get_as(port, path, host)
                assert status == 403 and b"Paris" not in body and b"toy/model" not in body, (host, path, status)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "LOCALHOST", f"[::1]:{port}", "127.0.0.2",
                     f"[::ffff:127.0.0.1]:{port}"):  # IPv4 loopback written as an IPv4-mapped IPv6 address
            assert get_as(port, "/report.html", host)[0] == 200, host


def test_redirect_to_a_folder_with_any_name_is_percent_encoded(run):
    folder = run / "数据 a\r\nSet-Cookie: x=1"
    folder.mkdir()
    (folder / "index.html").write_text("<p>hi</p>")
    with serving(run) as port:
        status, headers, _ = get(port, "/" + quote(folder.name))
        assert status == 302
        assert headers["Location"] == "/" + quote(folder.name) + "/index.html"
        assert "Set-Cookie" not in headers
        assert get(port, headers["Location"])[0] == 200


@pytest.mark.parametrize("damage", ["UPDATE tokens SET weight = 'heavy'", "UPDATE tokens SET token_id = 'x'",
                                    "UPDATE tokens SET weight = 9e999", "UPDATE neurons SET layer = 'one'",
                                    "UPDATE neurons SET f1 = 'good'"])
def test_search_index_with_values_of_the_wrong_type(damage, run, capsys):
    con = sqlite3.connect(run / "index.sqlite")
    con.execute(damage)
    con.commit()
    con.close()
    code, _, err = main(["search", run, "Paris", "--json"], capsys)
    assert code == 2 and "n2g report" in one_error_line(err)
    with serving(run) as port:  # the server rebuilds it once and answers
        status, _, body = get(port, "/api/search?token=Paris&role=activator")
        assert status == 200 and [h["key"] for h in json.loads(body)["results"]] == ["L1.N4.neg", "L0.N1", "L0.N2"]
        status, _, body = get(port, "/api/similar?key=L0.N1")
        assert status == 200 and "error" not in json.loads(body)


@pytest.mark.parametrize("graph", ["[1]", DEEP, '{"kind": "n2g.graph", "graph": []}'])
def test_predict_on_a_damaged_graph_answers_json(graph, run):
    (run / "neurons" / "L0.N1" / "graph.json").write_text(graph)
    with serving(run) as port:
        status, headers, body = get(port, "/api/predict?key=L0.N1&text=%20Paris")
        assert status in (404, 500) and "re-run" in json.loads(body)["error"], body
        assert get(port, "/api/predict?key=L1.N4.neg&text=%20Paris")[0] == 200  # and it goes on serving


def test_serve_with_a_model_on_a_run_json_of_another_shape_is_one_line(run, capsys):
    path = run / "run.json"
    d = json.loads(path.read_text())
    d["model"] = {"spec": "toy/model", "sae": "layer-3-resid"}
    path.write_text(json.dumps(d))
    code, _, err = main(["serve", run, "--model", "default", "--port", "0"], capsys)
    assert code == 2 and "SAE latents (layer-3-resid)" in one_error_line(err)


def test_damaged_graph_files_load_as_one_line_errors(tmp_path):
    # The Python API's NeuronGraph.load, on files n2g never writes: each is an N2GError naming the
    # file, never another exception (a list, nesting too deep, a number too large, a non-finite END).
    import json as _json

    from n2g.errors import N2GError
    from n2g.graph import NeuronGraph

    good = NeuronGraph("mean", "search")
    good.add_path([(5, 1.0), (6, 1.0)], 0.9)
    d = good.to_dict()
    nan_end = _json.loads(_json.dumps(d))
    for node in nan_end["graph"]["nodes"]:
        if node["kind"] == "end":
            node["activation"] = float("nan")
    bodies = {
        "list.json": "[1]",
        "graph-list.json": _json.dumps({"kind": "n2g.graph", "graph": []}),
        "deep.json": "[" * 100_000,
        "huge-schema.json": '{"kind": "n2g.graph", "schema_version": 1e400, "graph": {}}',
        "nan-end.json": _json.dumps(nan_end),
    }
    for name, body in bodies.items():
        path = tmp_path / name
        path.write_text(body)
        with pytest.raises(N2GError, match="cannot read graph|not an n2g graph"):
            NeuronGraph.load(path)
    ok = tmp_path / "ok.json"
    good.save(ok)
    assert NeuronGraph.load(ok).predict_sequence([6, 5])[-1] == pytest.approx(0.9)


def test_an_idle_connection_is_closed_and_the_server_keeps_answering(run, monkeypatch):
    import socket
    import time as _time

    from n2g import viewer

    assert viewer._Handler.timeout == 30
    monkeypatch.setattr(viewer._Handler, "timeout", 0.5)
    with serving(run) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]  # say nothing
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /report.html HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a request never finished
        assert get(port, "/report.html")[0] == 200  # others are answered meanwhile
        start = _time.time()
        for s in idle + [partial]:
            s.settimeout(5)
            assert s.recv(1024) == b""  # closed by the server (without the timeout: recv times out)
            s.close()
        assert _time.time() - start < 5


@pytest.mark.parametrize("max_excerpts", [0, -1, "5", 2.5, True])
def test_fit_neuron_refuses_a_bad_max_excerpts_with_a_corpus_object(max_excerpts, tiny_llama):
    import torch

    import n2g
    from n2g.corpus import Corpus

    corpus = Corpus("words", 8, torch.arange(4 * 8).view(4, 8) % 60 + 4)
    with pytest.raises(n2g.N2GError, match="max_excerpts must be a positive integer"):
        n2g.fit_neuron(tiny_llama, 0, 0, corpus=corpus, max_excerpts=max_excerpts, progress=False)


def test_fit_neuron_refuses_excerpts_longer_than_the_models_context():
    import torch

    import n2g
    from conftest import tiny_model, tiny_tokenizer
    from n2g.corpus import Corpus
    from n2g.models import SubjectModel

    model = SubjectModel(tiny_model("gpt2"), tiny_tokenizer(), spec="tiny-gpt2")  # 128 positions
    corpus = Corpus("words", 200, torch.arange(4 * 200).view(4, 200) % 60 + 4)
    with pytest.raises(n2g.N2GError, match="longer than this model's context"):
        n2g.fit_neuron(model, 0, 0, corpus=corpus, progress=False)


@pytest.mark.parametrize("excerpts", ["hello", ["a b c", "d"], [[[1, 2], [3]]], None, 5, [[1.5, 2.0, 3.0]] * 10,
                                      [[True, False]] * 10, [[-1, 2, 3]] * 10, [[10**20, 1]] * 10,
                                      "3d", "float tensor"])
def test_distill_refuses_excerpts_that_are_not_token_ids_in_one_line(excerpts):
    import n2g
    from n2g.errors import N2GError

    if excerpts == "3d":
        excerpts = torch.zeros(2, 3, 4, dtype=torch.long)
    elif excerpts == "float tensor":
        excerpts = torch.zeros(3, 4)
    with pytest.raises(N2GError, match="token id|excerpt"):
        n2g.distill(lambda ids: (ids % 7).float(), excerpts)


def test_distill_refuses_a_bad_feature_option_or_occlusion_id_in_one_line():
    import n2g
    from n2g.errors import N2GError

    good = [[1, 2, 3, 4]] * 10
    feature = lambda ids: (ids % 7).float()
    with pytest.raises(N2GError, match="must be callable"):
        n2g.distill(5, good)
    with pytest.raises(N2GError, match="the feature returned str"):
        n2g.distill(lambda ids: "x", good)
    with pytest.raises(N2GError, match="unknown option 'nosuch'"):
        n2g.distill(feature, good, nosuch=1)
    with pytest.raises(N2GError, match="occlusion_token_id"):
        n2g.distill(feature, good, occlusion_token_id=-5)
    for option, value, message in (("n_top", "5", "n_top must be an int"), ("n_top", True, "n_top must be an int"),
                                   ("min_gain", "x", "min_gain must be a finite float"),
                                   ("set_cost", float("nan"), "set_cost must be a finite float"),
                                   ("calibrate", "yes", "calibrate must be a bool"), ("match", 3, "match must be a str")):
        with pytest.raises(N2GError, match=message):
            n2g.distill(feature, good, **{option: value})
    assert n2g.distill(feature, good, min_gain=5, n_prune=None).status_ == "fitted"  # an int is a float; None where allowed
    import numpy as np

    from n2g.config import preset

    cfg = preset("default", n_top=np.int64(12), min_gain=np.float32(15))  # NumPy numbers become Python ones
    assert json.loads(json.dumps(cfg.to_dict()))["n_top"] == 12 and type(cfg.min_gain) is float
    assert n2g.distill(feature, torch.arange(64).reshape(4, 16) % 50).status_ == "fitted"  # an int tensor is fine


@pytest.mark.parametrize("name", ["neurons/L0.N1/result.json", "neurons/L0.N1/graph.json", "run.json"])
def test_a_pipe_in_place_of_a_run_file_is_refused_not_waited_on(name, run):
    # opening a FIFO blocks until someone writes to it: a run folder from elsewhere must not hang n2g
    (run / name).unlink()
    os.mkfifo(run / name)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "n2g", "report", str(run)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    if name != "run.json":
        assert "is not a regular file (a pipe, device or socket)" in p.stderr
    assert "layer-table" in (run / "report.html").read_text()


def test_a_pipe_named_like_a_page_is_not_served(run):
    os.mkfifo(run / "viewer" / "neurons" / "L9.N9.html")
    with serving(run) as port:
        status, _, _ = get(port, "/viewer/neurons/L9.N9.html")  # the helper gives up after 10 s
        assert status == 404
        assert get(port, "/report.html")[0] == 200


def test_read_bytes_refuses_what_is_not_a_regular_file_or_too_large(tmp_path):
    from n2g.fileio import UnreadableFile, read_bytes

    big = tmp_path / "big.json"
    big.write_bytes(b"x" * 100)
    assert read_bytes(big) == b"x" * 100
    with pytest.raises(UnreadableFile, match="100 bytes, more than the 99"):
        read_bytes(big, limit=99)
    with pytest.raises(UnreadableFile, match="not a regular file"):
        read_bytes("/dev/zero")


# ---------------------------------------------------------------------------------------------
# second audit: what the first pass missed


def test_a_search_token_too_long_for_sqlite_is_one_line_and_never_rebuilds_the_index(run, capsys):
    index = run / "index.sqlite"
    stamp = index.stat().st_mtime_ns
    code, _, err = main(["search", run, "a" * 60_000], capsys)
    assert code == 2 and "at most 1,000 characters" in one_error_line(err)
    with serving(run) as port:
        status, _, body = get(port, "/api/search?token=" + "a" * 60_000)
    assert status == 400 and "at most 1,000 characters" in json.loads(body)["error"]
    assert index.stat().st_mtime_ns == stamp  # SQLite's "pattern too complex" was taken for a damaged index


def _secret_neuron_elsewhere(run: Path, tmp_path: Path) -> Path:
    """A copy of L0.N1 outside the run, as L0.N9, with a token only it holds."""
    elsewhere = tmp_path / "elsewhere" / "L0.N9"
    shutil.copytree(run / "neurons" / "L0.N1", elsewhere)
    result = json.loads((elsewhere / "result.json").read_text())
    result["neuron"]["index"] = 9
    for e in result["examples"]:
        if e.get("tokens"):
            e["tokens"][0] = "SECRET_OUTSIDE"
    (elsewhere / "result.json").write_text(json.dumps(result))
    graph = (elsewhere / "graph.json").read_text().replace('" Paris"', '"SECRET_OUTSIDE"')
    (elsewhere / "graph.json").write_text(graph)
    return elsewhere


def test_server_never_renders_or_predicts_from_a_neuron_folder_linking_out_of_the_run(run, tmp_path):
    elsewhere = _secret_neuron_elsewhere(run, tmp_path)
    os.symlink(elsewhere, run / "neurons" / "L0.N9")
    (run / "viewer" / "neurons" / "L0.N9.html").write_text("<p>a page of another version</p>")
    with serving(run) as port:
        status, _, body = get(port, "/viewer/neurons/L0.N9.html")
        assert b"SECRET_OUTSIDE" not in body
        status, _, body = get(port, "/api/predict?key=L0.N9&text=SECRET_OUTSIDE")
        assert status == 404 and "no readable result" in json.loads(body)["error"]


def test_a_graph_json_linking_out_of_the_run_is_neither_drawn_nor_indexed(run, tmp_path, capsys):
    elsewhere = _secret_neuron_elsewhere(run, tmp_path)
    gpath = run / "neurons" / "L0.N1" / "graph.json"
    gpath.unlink()
    os.symlink(elsewhere / "graph.json", gpath)
    for f in ("graph.svg", "graph.png", "graph.dot"):
        (run / "neurons" / "L0.N1" / f).unlink(missing_ok=True)
    (run / "index.sqlite").unlink()
    code, _, err = main(["report", run], capsys)
    assert code == 0, err
    drawn = [f for f in (run / "neurons" / "L0.N1").glob("graph.*") if f != gpath]
    for f in [*drawn, run / "viewer" / "neurons" / "L0.N1.html"]:
        assert b"SECRET_OUTSIDE" not in f.read_bytes(), f
    with pytest.raises(N2GError, match="leads out of the run"):
        load_graph_json(gpath, run)
    assert main(["search", run, "SECRET_OUTSIDE"], capsys)[0] == 1


def test_bidi_and_control_characters_of_tokens_are_shown_never_obeyed(run):
    from n2g.render import display_token
    from n2g.search import read_result
    from n2g.viewer import neuron_page

    assert display_token("a\u202eb") == "a\\u202eb" and display_token("\u2067x\u200f") == "\\u2067x\\u200f"
    path = run / "neurons" / "L0.N1" / "result.json"
    result = json.loads(path.read_text())
    result["examples"][0]["tokens"][0] = "\u202eevil\x00\x1b[31m\u2066"
    path.write_text(json.dumps(result))
    page = neuron_page(run, read_result(path.parent))
    for raw in ("\u202e", "\u2066", "\x00", "\x1b"):
        assert raw not in page, repr(raw)
    assert "\\u202eevil␀␛[31m\\u2066" in page


def test_serve_refuses_an_empty_host_and_listens_on_ipv6_loopback(run, capsys, monkeypatch):
    # the socket layer reads "" as every interface: `--host "$UNSET"` would open the run to the network
    from n2g import viewer

    monkeypatch.setattr(viewer._Server, "serve_forever", lambda self, *a: None)  # never block the test
    code, _, err = main(["serve", run, "--host", "", "--port", "0"], capsys)
    assert code == 2 and "--host '' names no address" in one_error_line(err)
    monkeypatch.undo()
    if not socket.has_ipv6:
        return
    try:
        server = make_server(run, "[::1]", 0)
    except N2GError as e:  # no IPv6 on this machine
        pytest.skip(str(e))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        con = http.client.HTTPConnection("::1", server.server_address[1], timeout=10)
        con.request("GET", "/report.html")
        assert con.getresponse().status == 200
        con.close()
    finally:
        server.shutdown()
        server.server_close()


def test_serve_on_a_host_name_of_undecodable_bytes_is_one_line(run, capsys, monkeypatch):
    # `--host $'\xff'`: the byte reaches Python as a lone surrogate, which the socket layer cannot encode
    from n2g import viewer

    monkeypatch.setattr(viewer._Server, "serve_forever", lambda self, *a: None)  # never block the test
    code, _, err = main(["serve", run, "--host", "\udcff", "--port", "0"], capsys)
    assert code == 2 and "cannot listen on" in one_error_line(err) and "check --host" in one_error_line(err)


def test_quiet_serve_on_port_0_still_says_where_it_listens(run, capsys, monkeypatch):
    from n2g import viewer

    monkeypatch.setattr(viewer._Server, "serve_forever", lambda self, *a: None)  # never block the test
    code, _, err = main(["serve", run, "-q", "--port", "0"], capsys)
    port = re.search(r"^n2g: serving .* at http://127\.0\.0\.1:([0-9]+)/ \(Ctrl-C to stop\)$", err.strip(), re.M)
    assert code == 0 and port and int(port.group(1)) > 0, err


@pytest.mark.parametrize("query", ["/api/search?token=Paris&limit=1e3", "/api/similar?key=L0.N1&limit=nan",
                                   "/api/similar?key=L0.N1&limit=99999999999999999999",
                                   "/api/search?token=Paris&limit=0"])  # `n2g search --limit 0` is refused too
def test_api_limit_that_is_not_a_small_whole_number_is_400_with_a_hint(query, run):
    with serving(run) as port:
        status, _, body = get(port, query)
    assert status == 400 and "is not a whole number of at least 1; pass e.g. limit=" in json.loads(body)["error"]


def test_search_prints_no_terminal_escape_from_a_tampered_index(run, capsys):
    con = sqlite3.connect(run / "index.sqlite")
    with con:
        con.execute("UPDATE neurons SET key = ? WHERE key = 'L0.N1'", ("L0.N1\x1b]0;pwned\x07\x1b[2J",))
        con.execute("UPDATE tokens SET key = ? WHERE key = 'L0.N1'", ("L0.N1\x1b]0;pwned\x07\x1b[2J",))
    con.close()
    code, out, err = main(["search", run, "Paris"], capsys)
    assert code == 0 and "L0.N1" in out, err
    assert "\x1b" not in out and "\x07" not in out and "\\x1b" in out


# ---------------------------------------------------------------------------------------------
# hostile or broken model folders: no code from the folder runs, no random weights, one line


@pytest.fixture()
def model_folder(tmp_path):
    import torch

    from conftest import tiny_model, tiny_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "m"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _edit_json(path, **changes):
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_model_weights_that_cannot_be_read_are_named(model_folder, monkeypatch):
    # safetensors, then transformers, called such a file missing ("No such file or directory").
    from n2g.models import load_model

    deny(monkeypatch, "n2g.models.open", model_folder / "model.safetensors")
    with pytest.raises(N2GError, match=r"cannot read .*model.safetensors \(permission denied\); make the model's files readable"):
        load_model(str(model_folder), device="cpu")


EVIL = "import pathlib\npathlib.Path(__file__).with_name('PWNED').write_text('ran')\nclass EvilConfig: pass\nclass EvilModel: pass\nclass EvilTok: pass\n"


@pytest.mark.parametrize("where", ["config", "tokenizer"])
def test_code_shipped_in_a_model_folder_never_runs(model_folder, where, monkeypatch):
    from n2g.models import load_model

    (model_folder / "evil.py").write_text(EVIL)
    if where == "config":  # an architecture transformers does not ship, with code to run for it
        _edit_json(model_folder / "config.json", model_type="evil",
                   auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    else:  # a known architecture whose tokenizer asks for code
        _edit_json(model_folder / "tokenizer_config.json", tokenizer_class="EvilTok",
                   auto_map={"AutoTokenizer": ["evil.EvilTok", None]})
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # a prompt answered yes must not matter: there is none
    with pytest.raises(N2GError) as err:
        load_model(str(model_folder), device="cpu")
    assert not (model_folder / "PWNED").exists()
    assert "\n" not in str(err.value)
    assert ("'evil' of" in str(err.value) and "not supported" in str(err.value)) if where == "config" \
        else "custom code" in str(err.value)


@pytest.mark.parametrize("change, says", [
    (dict(num_hidden_layers=6), "config.json says 6 layers but the weights hold 3"),
    (dict(num_hidden_layers=20000), "config.json says 20000 layers but the weights hold 3"),
    (dict(num_hidden_layers=0), "says 0 layers; a model needs at least one"),
    (dict(vocab_size=20_000_000), "says 20000000 tokens but the weights embed 128"),
])
def test_a_config_the_weights_cannot_fill_is_refused_before_loading(model_folder, change, says):
    from n2g.models import load_model

    _edit_json(model_folder / "config.json", **change)
    with pytest.raises(N2GError, match=says):
        load_model(str(model_folder), device="cpu")


def test_weights_missing_from_the_checkpoint_are_refused_not_filled_at_random(model_folder):
    from safetensors.torch import load_file, save_file

    from n2g.models import load_model

    weights = load_file(model_folder / "model.safetensors")
    del weights["model.layers.1.mlp.down_proj.weight"]
    save_file(weights, model_folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(N2GError, match=r"lacks 1 weight tensor\(s\) .*model.layers.1.mlp.down_proj.weight.*random"):
        load_model(str(model_folder), device="cpu")
    save_file({k: v for k, v in weights.items() if "embed_tokens" not in k}, model_folder / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(N2GError, match="hold no token embedding"):
        load_model(str(model_folder), device="cpu")


def test_a_tokenizer_that_does_not_fit_the_model_fails_in_one_line(model_folder):
    from n2g.models import load_model

    tok = json.loads((model_folder / "tokenizer.json").read_text())
    tok["model"]["vocab"]["cat"] = 500  # beyond the 128 embedded ids
    (model_folder / "tokenizer.json").write_text(json.dumps(tok))
    model = load_model(str(model_folder), device="cpu")
    assert model.encode("the mat") == [4, 8]
    with pytest.raises(N2GError, match="gives token id 500, but the model embeds only ids 0-127"):
        model.encode("the cat sat")
    tok["model"]["vocab"] = {}  # no unknown token: encoding anything fails
    (model_folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(N2GError, match="cannot encode the text .*check its tokenizer files"):
        load_model(str(model_folder), device="cpu").encode("the cat")


def test_a_model_cache_copy_left_by_a_killed_writer_is_removed_by_the_next(tmp_path, monkeypatch):
    from n2g import models

    monkeypatch.setenv("N2G_CACHE", str(tmp_path / "cache"))
    target = models.cache_dir() / "models" / "tiny-1234"
    target.parent.mkdir(parents=True)
    dead = target.parent / ".tiny-1234.999999999.abcd"  # no such process: killed while writing
    alive = target.parent / f".tiny-1234.{os.getpid()}.efgh"  # a writer still at work
    for folder in (dead, alive):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    models._save_cache(tiny_model("llama"), tiny_tokenizer(), target)
    assert not dead.exists() and alive.exists() and (target / "model.safetensors").exists()
    assert sorted(p.name for p in target.parent.iterdir()) == sorted([target.name, alive.name])


def test_a_writer_on_another_machine_keeps_its_temporaries_in_a_shared_run(run, monkeypatch):
    # `n2g run` on each machine that shares the run directory, or `n2g report` on one while another fits: the
    # tidying of the one deleted the other's temporaries in flight (its pid is no process here), and that
    # writer's rename into place then failed (FileNotFoundError: its run or report stopped with an error).
    import n2g.fileio as fileio

    target = run / "neurons" / "L0.N1" / "result.json"
    with monkeypatch.context() as m:  # a writer on another machine: a pid this one does not run, another host
        m.setattr(os, "getpid", lambda: 4_194_303)
        m.setattr(fileio, "HOST", "0123abcd", raising=False)
        writing = fileio.replacing(target)
        tmp = writing.__enter__()
    tmp.write_text('{"written": "on another machine"}')
    assert fileio.remove_stale_temporaries(run) == 0  # what `n2g run` and `n2g report` do here first
    build_all(run)
    writing.__exit__(None, None, None)  # the other machine's write goes into place
    assert json.loads(target.read_text()) == {"written": "on another machine"}
    abandoned = run / ".report.html.4194303-0123abcd.ab12cd34.tmp"  # one that machine's writer left, long ago
    abandoned.write_text("x")
    os.utime(abandoned, (time.time() - 3600, time.time() - 3600))
    assert fileio.remove_stale_temporaries(run) == 1 and not abandoned.exists()


def test_a_killed_writers_leftovers_are_removed_sidecars_and_half_copies_included(tmp_path):
    from n2g.fileio import remove_dead_copies, remove_stale_temporaries

    dead, mine = 999999999, os.getpid()
    names = [f".index.sqlite.{dead}.ab12cd34.tmp", f".index.sqlite.{dead}.ab12cd34.tmp-journal",
             f".index.sqlite.{dead}.ab12cd34.tmp-wal", f".result.json.{mine}.zz12cd34.tmp", "notes.tmp-journal"]
    for name in names:
        (tmp_path / name).write_text("x")
    assert remove_stale_temporaries(tmp_path) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[3:])
    (tmp_path / f".copy.{dead}.abcd").mkdir()  # a report copy killed half-way
    (tmp_path / f".copy.{mine}.efgh").mkdir()  # one still being written
    (tmp_path / ".copy.ijkl").mkdir()  # no pid in its name: not ours to judge
    remove_dead_copies(tmp_path / "copy")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".copy")) == sorted([".copy.ijkl", f".copy.{mine}.efgh"])


class _PickledCall:
    def __reduce__(self):
        return (os.getcwd, ())


def test_pickled_weights_holding_code_are_refused_in_one_line(model_folder):
    from n2g.models import load_model

    (model_folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": _PickledCall()}, model_folder / "pytorch_model.bin")
    with pytest.raises(N2GError, match=r"^the weights of .* are a pickle \(.bin\) holding more than tensors; "
                                       r"n2g never runs pickled code: use a checkpoint saved as safetensors$"):
        load_model(str(model_folder), device="cpu")


def test_graphviz_on_a_full_disk_says_so(tmp_path, monkeypatch):
    import collections

    from n2g import render

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(render.shutil, "disk_usage", lambda path: usage(10, 10, 0))
    target = tmp_path / "gone" / "g.svg"  # dot cannot write there
    with pytest.raises(N2GError, match="disk is full .*free some space or choose another --out"):
        render._run_dot_to("digraph { a -> b }", {"svg": target})
