// Screenshots of a real run's report and one neuron page, opened from disk (no server) in Debian's
// headless Chromium via playwright-core (install it with scripts/setup.sh --test).
//   node evaluation/screenshots.js RUN_DIR OUT_DIR [NEURON_KEY]
// The committed ones: `n2g run --layers 0,5 --neurons 0-7 --max-excerpts 512 --out graphs/demo`, then
// this script with L5.N2 (a large graph: 111 activating tokens, drawn summarised) and with L0.N2.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require(path.join(__dirname, "..", "tests", "browser", "node_modules", "playwright-core"));

async function main() {
  const [runDir, outDir, wanted] = process.argv.slice(2);
  if (!runDir || !outDir) {
    console.error("usage: node evaluation/screenshots.js RUN_DIR OUT_DIR [NEURON_KEY]");
    process.exit(2);
  }
  const run = path.resolve(runDir);
  const pages = path.join(run, "viewer", "neurons");
  const keys = fs.readdirSync(pages).filter((f) => f.endsWith(".html")).map((f) => f.slice(0, -5)).sort();
  const key = wanted || keys[0];
  fs.mkdirSync(outDir, { recursive: true });
  const context = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), "n2g-shots-")), {
    executablePath: process.env.N2G_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"],
    viewport: { width: 1280, height: 900 },
  });
  const errors = [];
  const page = await context.newPage();
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  for (const [url, name] of [[path.join(run, "report.html"), "report.png"],
                             [path.join(pages, key + ".html"), `neuron-${key}.png`]]) {
    await page.goto("file://" + url);
    await page.waitForLoadState("load");
    // Neuron pages list every excerpt and run long: keep the top (graph, scores, first excerpts).
    const height = await page.evaluate(() => document.documentElement.scrollHeight);
    await page.screenshot({ path: path.join(outDir, name), fullPage: true,
                            clip: { x: 0, y: 0, width: 1280, height: Math.min(height, 2400) } });
    console.log(path.join(outDir, name));
  }
  await context.close();
  if (errors.length) {
    console.error("console errors:\n" + errors.join("\n"));
    process.exit(1);
  }
}
main().catch((e) => { console.error(String(e)); process.exit(1); });
