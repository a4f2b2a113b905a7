(function () {
  "use strict";
  var body = document.body, key = body.getAttribute("data-key");
  var threshold = parseFloat(body.getAttribute("data-threshold"));
  var form = document.getElementById("try-form");
  var msg = document.getElementById("try-msg");
  var out = document.getElementById("try-out");
  var served = location.protocol === "http:" || location.protocol === "https:";
  var latent = body.getAttribute("data-sae") === "1";  // an SAE run's server reads true activations with --model and --sae
  var withModel = latent ? "--model MODEL --sae SAE to see the latent's" : "--model to see the neuron's";
  if (!served) {
    msg.textContent = "Trying your own text needs the server: run `n2g serve RUN` (add " + withModel +
      " true activation too) and open this page at the address it prints.";
  }
  function bg(v) {
    if (v === null || isNaN(v)) return "transparent";
    var a = Math.min(1, Math.abs(v)).toFixed(3);
    return v >= 0 ? "rgba(214,39,40," + a + ")" : "rgba(31,119,180," + a + ")";
  }
  function lum(a, rgb) {  // WCAG relative luminance of rgb at opacity a laid over white
    var c = rgb.map(function (x) { var s = (255 + (x - 255) * a) / 255; return s <= 0.03928 ? s / 12.92 : Math.pow((s + 0.055) / 1.055, 2.4); });
    return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
  }
  function fg(v) {  // as the pages' excerpts: from 0.5 up black, or white where it contrasts more (the darkest)
    if (v === null || isNaN(v) || Math.abs(v) < 0.5) return "";
    var L = lum(Math.round(Math.min(1, Math.abs(v)) * 1000) / 1000, v >= 0 ? [214, 39, 40] : [31, 119, 180]);
    return 1.05 / (L + 0.05) > (L + 0.05) / 0.05 ? "#fff" : "#000";
  }
  function visibleChars(t) { return t.replace(/[\u0000-\u0008\u000b\u000c\u000e-\u001f\u007f-\u009f]/g, function (c) { return "\\x" + c.charCodeAt(0).toString(16).padStart(2, "0"); }).replace(/[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, function (c) { return "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0"); }); }  // control and bidi characters shown, never obeyed (as the pages and the terminal show them)
  function sideFixed(v, thr, n) {  // v with n decimals on its own side of the fire threshold (0.49999997 reads 0.499, not 0.500)
    var t = v.toFixed(n), p = Math.pow(10, n);
    if (typeof thr === "number" && !isNaN(thr) && (parseFloat(t) >= thr) !== (v >= thr))
      t = ((v >= thr ? Math.ceil(v * p) : Math.floor(v * p)) / p).toFixed(n);
    return t;
  }
  function shown(t) { return visibleChars(t.replace(/\r/g, "\u240d").replace(/\t/g, "\u2192   ").replace(/\n/g, "\u21b5\n")); }
  function line(label, toks, values, what) {
    var row = document.createElement("div");
    row.className = "try-row";
    row.setAttribute("data-what", what);
    var lab = document.createElement("div");
    lab.className = "muted";
    lab.textContent = label;
    row.appendChild(lab);
    toks.forEach(function (t, i) {
      var v = values[i], s = document.createElement("span");
      s.textContent = shown(t);
      s.style.background = bg(v);
      s.style.color = fg(v);
      s.title = t + "  " + what + " " + (v === null ? "\u2014" : sideFixed(v, threshold, 3));
      s.setAttribute("data-v", v === null ? "" : String(v));
      if (v !== null && v >= threshold) s.className = "fire";
      row.appendChild(s);
    });
    return row;
  }
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    if (!served) return;
    var text = document.getElementById("try-text").value;
    if (!text.trim()) { msg.textContent = "Type some text first."; return; }
    msg.textContent = "predicting\u2026";
    fetch("../../api/predict?key=" + encodeURIComponent(key) + "&text=" + encodeURIComponent(text),
          {headers: {"X-N2G-Request": "1"}})
      .then(function (r) { return r.json(); })
      .then(function (d) {
        while (out.firstChild) out.removeChild(out.firstChild);
        if (d.error) { msg.textContent = d.error; return; }
        if (d["true"]) out.appendChild(line("true activation (normalised)", d.tokens, d["true"], "true"));
        out.appendChild(line("graph prediction (normalised)", d.tokens, d.predicted, "predicted"));
        msg.textContent = d.tokens.length + " tokens, split by " + d.tokenizer + "." +
          (d["true"] ? "" : " Start the server with " + withModel + " true activation beside it.");
      })
      .catch(function (e) { msg.textContent = "prediction failed: " + e; });
  });
})();
