"""Runs on Ray: a local 2-worker cluster gives the single-process results, and a worker killed with
-9 mid-run costs only its in-flight neurons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from test_pipeline import REPO, cli, run_args, stored, tiny_dir  # noqa: F401  (tiny_dir is a fixture)

from n2g.distributed import units_of
from n2g.records import NeuronId

pytest.importorskip("ray", reason="Ray is part of the test extra: bash scripts/setup.sh --test installs it")


def test_units_keep_layers_whole_when_there_are_enough():
    todo = [NeuronId(l, i) for l in range(3) for i in range(10)]
    assert [len(u) for u in units_of(todo, 2, 4)] == [10, 10, 10]
    assert all(len({n.layer for n in u}) == 1 for u in units_of(todo, 8, 2))
    cut = units_of(todo, 6, 2)  # fewer layers than workers: each layer in ranges
    assert len(cut) == 6 and sorted(n for u in cut for n in u) == sorted(todo)


def ray_workers() -> list[int]:
    found = subprocess.run(["pgrep", "-f", "ray::Fitter"], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


def test_ray_run_equals_one_process_and_survives_a_killed_worker(tiny_dir, tmp_path):
    neurons = ["--neurons", "0-15", "--group-size", "1"]
    reference = tmp_path / "reference"
    res = cli(*run_args(tiny_dir, reference, *neurons))
    assert res.returncode == 0, res.stderr
    out = tmp_path / "ray"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "n2g", *run_args(tiny_dir, out, *neurons, "--ray", "--ray-workers", "2")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(out.glob("neurons/*/result.json"))) < 3 and proc.poll() is None:
        time.sleep(0.05)
    finished = {p: p.stat().st_mtime_ns for p in out.glob("neurons/*/result.json")}
    victims = ray_workers()
    assert proc.poll() is None and victims, "the run should still be going with live Ray workers"
    os.kill(victims[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert stored(out) == stored(reference)  # identical to one process, every neuron done
    assert len(stored(out)) == 48
    # neurons finished before the kill were not fitted again
    assert all(p.stat().st_mtime_ns == t for p, t in finished.items())
    again = cli(*run_args(tiny_dir, out, *neurons, "--ray", "--ray-workers", "2"))  # nothing left: a no-op
    assert again.returncode == 0 and stored(out) == stored(reference)


def test_unreachable_ray_address_is_one_line(tiny_dir, tmp_path):
    work = tmp_path / "cwd"
    work.mkdir()
    res = cli("run", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus.txt"), "--neurons", "0",
              "--excerpt-length", "32", "-q", "--out", str(work / "run"), "--ray", "127.0.0.1:9", timeout=180)
    assert res.returncode == 2, res.stderr
    lines = [l for l in res.stderr.splitlines() if l.startswith("n2g: error:")]
    assert len(lines) == 1 and "ray cluster at 127.0.0.1:9" in lines[0].lower(), res.stderr
    assert "Traceback" not in res.stderr
    assert list(work.iterdir()) == []  # checked before anything was written
