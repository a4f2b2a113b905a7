"""End to end in a real headless Chromium: report, graph render, token search, neuron pages, injection.

Also: case-insensitive prefix/substring search, the summary paragraph and histogram, try-your-own-text
with and without a model, a 90-activator graph that fits one screen with its strongest path on top,
and no console error anywhere.

Drives Debian's Chromium through playwright-core (installed from npm into tests/browser/node_modules
when missing; no browser is ever downloaded). Skips only when node or Chromium cannot be found or
playwright-core cannot be installed. Set N2G_SCREENSHOT_DIR to keep screenshots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from helpers_run import add_histogram, add_large_neuron, make_run
from n2g.report import build_all
from n2g.viewer import make_server

HERE = Path(__file__).parent / "browser"


def _chromium() -> str | None:
    for cand in (os.environ.get("N2G_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).exists():
            return cand
    return None


@pytest.fixture(scope="module")
def driver():
    node, npm, chromium = shutil.which("node"), shutil.which("npm"), _chromium()
    if node is None:
        pytest.skip("node is not installed; the browser test drives Chromium with playwright-core from npm")
    if chromium is None:
        pytest.skip("no Chromium found (/usr/bin/chromium, chromium, google-chrome; or set N2G_CHROMIUM)")
    if not (HERE / "node_modules" / "playwright-core").is_dir():
        if npm is None:
            pytest.skip("npm is not installed, so playwright-core cannot be installed")
        proc = subprocess.run(
            [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(HERE), "playwright-core"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1"},
        )
        if proc.returncode != 0:
            pytest.skip(f"cannot install playwright-core from npm: {proc.stderr.strip()[-300:]}")
    return node, chromium


def test_report_viewer_search_and_injection_in_chromium(driver, tmp_path, tiny_llama):
    node, chromium = driver
    run = make_run(tmp_path)
    add_histogram(run)
    add_large_neuron(run)
    build_all(run)
    svg = run / "neurons" / "L0.N1" / "graph.svg"  # a planted script must not run through the server
    svg.write_text(svg.read_text().replace("</svg>", "<script>window.__n2gPlanted = 1; alert('planted')</script></svg>"))
    servers = [make_server(run, "127.0.0.1", 0), make_server(run, "127.0.0.1", 0, model=tiny_llama)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    port, model_port = (s.server_address[1] for s in servers)
    try:
        env = {**os.environ, "N2G_BASE_URL": f"http://127.0.0.1:{port}", "N2G_RUN_DIR": str(run),
               "N2G_MODEL_BASE_URL": f"http://127.0.0.1:{model_port}",
               "N2G_CHROMIUM": chromium, "N2G_PLANTED_SVG": "/neurons/L0.N1/graph.svg"}
        proc = subprocess.run([node, str(HERE / "e2e.js")], capture_output=True, text=True, timeout=180,
                              env=env, cwd=HERE)
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert lines, f"driver printed no result\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
    result = json.loads(lines[-1])
    assert result["ok"], "\n".join(result["problems"]) + "\nstderr: " + proc.stderr[-2000:]
    assert proc.returncode == 0
    assert len(result["checks"]) >= 30, result["checks"]
