// End-to-end check of an n2g run's report and viewer in headless Chromium (no browser download:
// playwright-core drives the system Chromium). Driven by tests/test_browser.py, which serves a
// synthesised run and passes its address in N2G_BASE_URL. Prints one JSON line; exit 1 on failure.
"use strict";
const fs = require("fs");
const os = require("os");
const path = require("path");
const { chromium } = require("playwright-core");

const BASE = process.env.N2G_BASE_URL;
const MODEL_BASE = process.env.N2G_MODEL_BASE_URL || "";
const RUN_DIR = process.env.N2G_RUN_DIR;
const SHOTS = process.env.N2G_SCREENSHOT_DIR || "";
const SCRIPT = "<script>alert(1)</script>";
const QUOTED = "\"quoted\" 'single'";
const SPECIALS = "back\\slash {brace} | & <b>x</b>";

const problems = [];
const checks = [];
function check(cond, what) {
  if (cond) checks.push(what);
  else problems.push("check failed: " + what);
}

async function shot(page, name) {
  if (!SHOTS) return;
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, name), fullPage: true });
}

async function main() {
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), "n2g-chromium-"));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: process.env.N2G_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run"],
    viewport: { width: 1280, height: 900 },
  });
  let dialogs = 0;
  const watch = (page) => {
    page.on("console", (m) => { if (m.type() === "error") problems.push("console error: " + m.text()); });
    page.on("pageerror", (e) => problems.push("page error: " + e.message));
    page.on("dialog", async (d) => { dialogs += 1; problems.push("dialog fired: " + d.message()); await d.dismiss(); });
    page.on("requestfailed", (r) => problems.push("request failed: " + r.url()));
  };
  context.on("page", watch);
  // nothing may load from outside the local server
  await context.route("**/*", (route) => {
    const url = route.request().url();
    if (url.startsWith(BASE) || (MODEL_BASE && url.startsWith(MODEL_BASE)) || url.startsWith("data:") ||
        url.startsWith("file:")) return route.continue();
    problems.push("external request: " + url);
    return route.abort();
  });
  try {
    const page = context.pages()[0] || (await context.newPage());
    if (context.pages()[0] === page) watch(page);

    // positive control: the dialog detector sees a real alert
    let controlSeen = false;
    const control = (d) => { controlSeen = true; d.dismiss(); };
    page.removeAllListeners("dialog");
    page.on("dialog", control);
    await page.goto("about:blank");
    await page.evaluate(() => alert("control"));
    check(controlSeen, "dialog detector works (positive control)");
    page.off("dialog", control);
    page.on("dialog", async (d) => { dialogs += 1; problems.push("dialog fired: " + d.message()); await d.dismiss(); });

    // 1. report: per-layer table and embedded plots
    await page.goto(BASE + "/report.html", { waitUntil: "load" });
    const rows = await page.$$eval("#layer-table tbody tr", (trs) => trs.map((tr) => tr.getAttribute("data-layer")));
    check(JSON.stringify(rows) === JSON.stringify(["0", "1", "all"]), "report has layer rows 0, 1, all: " + rows);
    const allRow = await page.textContent("#layer-table tr.all");
    check(allRow.includes("0.650") && allRow.includes("0.433"), "pooled row shows F1 0.650 and Pearson 0.433");
    // a metric's name heads its group of columns at the group's start (it sat over the group's last columns, beside
    // the next group, so a reader scrolled into a group saw no name, or the neighbouring one's)
    const groups = await page.$$eval("#layer-table thead tr:first-child th[colspan]", (ths) => ths.map((th) => {
      const r = document.createRange(); r.selectNodeContents(th);
      return [th.textContent, Math.round(r.getBoundingClientRect().left - th.getBoundingClientRect().left)]; }));
    check(groups.length >= 7 && groups[0][0] === "firing F1" && groups.every((g) => g[1] <= 10),
          "each metric's name starts at its group's first column: " + JSON.stringify(groups));
    const imgs = await page.$$eval("img", (els) => els.map((i) => i.complete && i.naturalWidth > 0));
    check(imgs.length === 3 && imgs.every(Boolean), "3 plots rendered");
    await shot(page, "report.png");

    // 2. index page: sort, then search a token through the API
    await page.click("#report-link, nav a[href='viewer/index.html'], a[href='viewer/index.html']");
    await page.waitForURL("**/viewer/index.html");
    await page.click("#neurons th:nth-child(6)"); // N2G F1, descending
    const firstKey = await page.textContent("#neurons tbody tr:first-child td:first-child");
    check(firstKey.trim() === "L0.N1", "sorting by N2G F1 puts L0.N1 first: " + firstKey);
    // from the keyboard: Tab reaches a header, Enter sorts by it (here the other way), aria-sort says how
    await page.focus("#neurons th:nth-child(6)");
    await page.keyboard.press("Enter");
    const ascKey = await page.textContent("#neurons tbody tr:first-child td:first-child");
    const ariaSort = await page.getAttribute("#neurons th:nth-child(6)", "aria-sort");
    check(ascKey.trim() === "L1.N4.neg" && ariaSort === "ascending",
          "Enter on a focused header sorts by it, ascending: " + ascKey + " " + ariaSort);
    await page.keyboard.press(" ");
    check((await page.getAttribute("#neurons th:nth-child(6)", "aria-sort")) === "descending", "Space sorts it back, descending");
    await page.fill("#q", "Paris");
    await page.selectOption("#role", "activator");
    await page.click("#search-form button");
    await page.waitForSelector("#search-results:not([hidden]) tbody tr");
    const hits = await page.$$eval("#search-results tbody tr td:first-child", (tds) => tds.map((t) => t.textContent));
    check(JSON.stringify(hits) === JSON.stringify(["L1.N4.neg", "L0.N1", "L0.N2"]), "search 'Paris' finds " + hits);
    const okColour = await page.$eval("#search-msg", (m) => [m.textContent, getComputedStyle(m).color]);
    check(okColour[0].includes("match") && okColour[1] !== "rgb(170, 51, 51)", "a search's match count is not in error red: " + okColour);
    await shot(page, "search.png");
    // case-insensitive substring and prefix search
    await page.fill("#q", "ARI");
    await page.selectOption("#role", "");
    await page.click("#search-form button");
    await page.waitForFunction(() => document.querySelector("#search-msg").textContent.includes("match"));
    const sub = await page.$$eval("#search-results tbody tr", (trs) => trs.map((tr) => tr.cells[1].textContent + "|" + tr.cells[5].textContent));
    check(sub.length === 3 && sub.every((t) => t.includes("Paris|substring")), "substring search 'ARI' finds Paris 3 times: " + sub);
    await page.fill("#q", "word1");
    await page.click("#search-form button");
    await page.waitForFunction(() => document.querySelector("#search-results tbody tr td:nth-child(2)") &&
      document.querySelector("#search-results tbody tr td:nth-child(2)").textContent.includes("word"));
    const pre = await page.$$eval("#search-results tbody tr", (trs) => trs.map((tr) => tr.cells[0].textContent + "|" + tr.cells[5].textContent));
    check(pre.length === 1 && pre[0] === "L1.N5|exact", "search 'word1' finds the large neuron: " + pre);
    // which neurons fire on a text: the graphs of L0.N1 (" in [ Paris]") and L0.N2 (" in * [ London]")
    await page.fill("#fires-text", " in the London Paris");
    await page.click("#fires-button");
    await page.waitForSelector("#fires-results:not([hidden]) tbody tr");
    const firing = await page.$$eval("#fires-results tbody tr", (trs) => trs.map((tr) => tr.cells[0].textContent + "|" + tr.cells[4].textContent));
    check(JSON.stringify(firing) === JSON.stringify(["L0.N1|\u2423Paris 0.90", "L0.N2|\u2423London 0.60"]),
          "a typed text lists the neurons whose graphs fire on it, and where: " + firing);
    await page.fill("#q", "Paris");
    await page.click("#search-form button");
    await page.waitForSelector("#search-results a >> text=L1.N4.neg");

    // 3. open the hostile neuron from the results
    await page.click("#search-results a >> text=L1.N4.neg");
    await page.waitForURL("**/viewer/neurons/L1.N4.neg.html");
    const svgTexts = await page.$$eval("#graph svg text", (ts) => ts.map((t) => t.textContent));
    check(svgTexts.includes(SCRIPT), "graph SVG shows the script token as text");
    check(svgTexts.some((t) => t.includes("\"quoted\"")), "graph SVG shows quotes");
    const box = await page.$eval("#graph svg", (s) => s.getBoundingClientRect().width);
    check(box > 100, "graph SVG is drawn (width " + box + ")");
    const body = await page.innerText("body");
    check(body.includes(SCRIPT) && body.includes(QUOTED) && body.includes(SPECIALS), "hostile text shown literally");
    const nScripts = await page.evaluate(() => document.scripts.length);
    check(nScripts === 1, "one script element (try your own text) on the neuron page: " + nScripts);
    const title = await page.getAttribute("#train-excerpts span[title*='script']", "title");
    check(title && title.includes(SCRIPT), "token hover title holds the literal text");
    await shot(page, "neuron.png");

    // 4. similar-neuron link works
    await page.click("#similar a >> text=L0.N1");
    await page.waitForURL("**/viewer/neurons/L0.N1.html");
    check((await page.textContent("h1")).includes("L0.N1"), "similar link opens L0.N1");

    // 4b. the page explains first: summary paragraph above the excerpts, histogram drawn
    const summary = await page.textContent("#summary");
    check(summary.includes("L0.N1 fires on") && summary.includes("\u2423Paris") && summary.includes("(raw)"),
          "summary paragraph: " + summary.slice(0, 80));
    const sumBox = await page.$eval("#summary", (e) => e.getBoundingClientRect().top);
    const exBox = await page.$eval("#test-excerpts", (e) => e.getBoundingClientRect().top);
    const graphBox = await page.$eval("#graph", (e) => e.getBoundingClientRect().top);
    check(sumBox < exBox && exBox < graphBox, "summary, then true-vs-predicted excerpts, then the graph");
    const bars = await page.$$eval("#histogram rect.bar", (rs) => rs.map((r) => r.getBoundingClientRect().height));
    check(bars.length === 11 && bars.every((h) => h > 0), "histogram draws 11 visible bars: " + bars.length);
    check(Math.max(...bars) === bars[2], "the histogram's tallest bar is the bin holding most tokens");

    // 4c. try your own text, server started without a model: the graph's prediction per token
    await page.fill("#try-text", " in Paris. xyz");
    await page.click("#try-button");
    await page.waitForSelector("#try-out .try-row");
    const rowsNoModel = await page.$$eval("#try-out .try-row", (rs) => rs.map((r) => r.getAttribute("data-what")));
    check(JSON.stringify(rowsNoModel) === JSON.stringify(["predicted"]), "without a model: one predicted row: " + rowsNoModel);
    const fired = await page.$$eval("#try-out .try-row span.fire", (ss) => ss.map((s) => s.textContent));
    check(JSON.stringify(fired) === JSON.stringify([" Paris"]), "try-your-own-text fires on ' Paris': " + JSON.stringify(fired));
    // a strong token's text is black (white on the darkest) as on the page's excerpts, not the page's #222
    const colours = await page.$$eval("#try-out .try-row span", (ss) => ss.filter((s) => parseFloat(s.getAttribute("data-v")) >= 0.5)
      .map((s) => s.style.color));
    check(colours.length >= 1 && colours.every((c) => c === "rgb(0, 0, 0)" || c === "rgb(255, 255, 255)"),
          "strong tokens of try-your-own-text get black or white text: " + colours);
    check((await page.textContent("#try-msg")).includes("--model"), "message says --model adds the true activation");
    await shot(page, "neuron-try.png");

    // 4d. with a model: the true activation beside the prediction
    if (MODEL_BASE) {
      await page.goto(MODEL_BASE + "/viewer/neurons/L0.N1.html", { waitUntil: "load" });
      await page.fill("#try-text", "the cat sat");
      await page.click("#try-button");
      await page.waitForSelector("#try-out .try-row[data-what='true']");
      const what = await page.$$eval("#try-out .try-row", (rs) => rs.map((r) => r.getAttribute("data-what")));
      check(JSON.stringify(what) === JSON.stringify(["true", "predicted"]), "with a model: true and predicted rows: " + what);
      const trueVals = await page.$$eval("#try-out .try-row[data-what='true'] span", (ss) => ss.map((s) => s.getAttribute("data-v")));
      check(trueVals.length === 3 && trueVals.every((v) => v !== "" && isFinite(parseFloat(v))),
            "true activations are numbers: " + trueVals);
    }

    // 4e. a large graph (90 activating tokens) fits one screen, strongest path on top
    await page.goto(BASE + "/viewer/neurons/L1.N5.html", { waitUntil: "load" });
    const g = await page.$eval("#graph", (d) => { const r = d.querySelector("svg").getBoundingClientRect();
      return [r.width, r.height, d.scrollHeight, d.clientHeight]; });
    check(g[1] > 100 && g[1] <= 900 && g[0] <= 1280 && g[2] <= g[3] + 1,
          "large graph fits one 1280x900 screen without scrolling its box: " + g.map(Math.round));
    const tops = await page.$$eval("#graph svg g.activator", (gs) => gs.map((n) => [n.getBoundingClientRect().top,
      n.querySelector("text").textContent]));
    tops.sort((a, b) => a[0] - b[0]);
    check(tops.length <= 14 && tops[0][1] === "\u2423strongest", "strongest path on top of " + tops.length + " drawn: " + (tops[0] || [])[1]);
    check((await page.textContent("#graph svg")).includes("more paths"), "a +k more node stands for the rest");
    const pathRows = await page.$$eval("#paths tbody tr", (trs) => trs.length);
    check(pathRows === 113, "the page lists all 113 paths: " + pathRows);
    const pathBox = await page.$eval("#paths-scroll", (d) => [d.clientHeight, d.scrollHeight, window.innerHeight]);
    check(pathBox[0] <= 0.6 * pathBox[2] + 1 && pathBox[1] > pathBox[0], "the path list scrolls in its own box, not the page: " + pathBox);
    await page.evaluate(() => window.scrollTo(0, 0));
    await shot(page, "neuron-large.png");

    // 4f. a phone's width (420 px): no page scrolls sideways (wide tables scroll in their own box, the plots and the
    // histogram shrink), and a long run of spaces (a whitespace token) wraps inside its cell, not over the next one
    await page.setViewportSize({ width: 420, height: 900 });
    for (const url of ["/report.html", "/viewer/index.html", "/viewer/neurons/L0.N1.html",
                       "/viewer/neurons/L1.N4.neg.html", "/viewer/neurons/L1.N5.html", "/viewer/neurons/L1.N3.html"]) {
      await page.goto(BASE + url, { waitUntil: "load" });
      const w = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
      check(w[0] <= w[1], "at 420 px " + url + " fits the width: " + w);
      if (url.endsWith("index.html")) {  // its table scrolls in its box, each cell on one line ("1.00 %" broke in two)
        const lines = await page.$eval("#neurons tbody tr", (tr) => Array.prototype.map.call(tr.cells, (c) => {
          const r = document.createRange(); r.selectNodeContents(c);
          return Math.round(r.getBoundingClientRect().height / parseFloat(getComputedStyle(c).lineHeight)); }));
        check(lines.every((n) => n === 1), "at 420 px every cell of an index row is one line: " + lines);
      }
    }
    await page.goto(BASE + "/viewer/neurons/L0.N1.html", { waitUntil: "load" });
    await page.fill("#try-text", " in" + " ".repeat(90) + " Paris");
    await page.click("#try-button");
    await page.waitForSelector("#try-out .try-row");
    const spill = await page.$eval("#try-out", (out) => { const box = out.getBoundingClientRect();
      return Array.prototype.map.call(out.querySelectorAll("span"), (s) => Math.round(s.getBoundingClientRect().right - box.right)); });
    check(spill.length >= 2 && spill.every((d) => d <= 1), "at 420 px a run of spaces wraps inside the try-your-own-text box: " + spill);
    await shot(page, "neuron-420.png");
    await page.setViewportSize({ width: 1280, height: 900 });

    // 5. from disk: pages open without a server, search says it needs one
    if (RUN_DIR) {
      await page.goto("file://" + path.join(RUN_DIR, "viewer", "index.html"));
      const msg = await page.textContent("#search-msg");
      check(msg.includes("n2g serve RUN"), "offline index says search needs `n2g serve RUN`");
      check((await page.$eval("#search-msg", (m) => getComputedStyle(m).color)) === "rgb(170, 51, 51)", "offline notice in red");
      await page.click("#neurons a >> text=L1.N4.neg");
      await page.waitForURL("**/L1.N4.neg.html");
      check((await page.innerText("body")).includes(SCRIPT), "neuron page opens from disk");
    }
    // 6. a script planted in a graph SVG does not run when the SVG is opened through the server
    const planted = process.env.N2G_PLANTED_SVG;
    if (planted) {
      await page.waitForTimeout(100);
      const before = problems.length;
      await page.goto(BASE + planted, { waitUntil: "load" });
      await page.waitForTimeout(300);
      const ran = await page.evaluate(() => window.__n2gPlanted === 1);
      // the browser reports the blocked script as a console error: expected here, not a problem
      const other = problems.splice(before).filter((p) => !/Content Security Policy/i.test(p));
      problems.push(...other);
      check(!ran, "script planted in an SVG does not run when served");
    }
    await page.waitForTimeout(200); // let late console errors arrive
    check(dialogs === 0, "no dialog fired");
  } finally {
    await context.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main()
  .catch((e) => problems.push("driver error: " + (e && e.stack ? e.stack : e)))
  .finally(() => {
    console.log(JSON.stringify({ ok: problems.length === 0, problems, checks }));
    process.exit(problems.length === 0 ? 0 : 1);
  });
