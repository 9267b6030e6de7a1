/* featureatlas's page scripts share one namespace, window.FA. They are plain scripts, not ES modules (modules do
   not load from file://), loaded with defer from the site itself ('self': no inline code, no network) in the
   order the templates list them: core.js first, then what the page draws (tokens, histogram, probe, unit,
   search, table), keys.js last. Data files are classic scripts that call FA.put, the one way to load data that
   also works from file://. Untrusted text only ever goes through textContent or setAttribute, never innerHTML.
   This file: the data loader and the small formatting helpers every page script uses. */
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  var registry = {}, pending = {};
  var FA = window.FA = {
    ROOT: document.body.getAttribute("data-root") || ""
  };

  /* What a data file calls to hand over its value. */
  FA.put = function (key, value) {
    registry[key] = value;
  };

  /* A promise of the value in the data file ROOT + key + ".js", loaded once with a <script> tag. */
  FA.load = function (key) {
    if (key in registry) return Promise.resolve(registry[key]);
    if (!pending[key]) {
      pending[key] = new Promise(function (resolve, reject) {
        var script = document.createElement("script");
        script.src = FA.ROOT + key + ".js";
        script.onload = function () {
          if (key in registry) resolve(registry[key]);
          else reject(new Error("no data in " + key + ".js"));
        };
        script.onerror = function () {
          delete pending[key];
          reject(new Error("missing " + key + ".js"));
        };
        document.head.appendChild(script);
      });
    }
    return pending[key];
  };

  /* A new element with an optional class and text (set as text, never parsed). */
  FA.el = function (tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  };

  /* A <section> with its id and heading. */
  FA.section = function (id, title) {
    var s = FA.el("section");
    s.id = id;
    s.appendChild(FA.el("h2", null, title));
    return s;
  };

  /* A small <table class="lt"> with its caption and a header row of column names; rows go in its <tbody>. */
  FA.table = function (caption, columns) {
    var table = FA.el("table", "lt"), head = FA.el("thead"), tr = FA.el("tr");
    table.appendChild(FA.el("caption", null, caption));
    columns.forEach(function (name) {
      var th = FA.el("th", null, name);
      th.scope = "col";
      tr.appendChild(th);
    });
    head.appendChild(tr);
    table.appendChild(head);
    return table;
  };

  FA.fmt = function (v, digits) {
    if (typeof v !== "number" || isNaN(v)) return "\u2014";
    return String(parseFloat(v.toPrecision(digits || 4)));
  };

  FA.signed = function (v) {
    var s = FA.fmt(v, 3);
    return v > 0 ? "+" + s : s;
  };

  FA.percent = function (f) {
    return typeof f === "number" ? String(parseFloat((100 * f).toPrecision(3))) + "%" : "\u2014";
  };

  /* A firing frequency in words: "1 in 250 tokens". */
  FA.oneIn = function (f) {
    if (typeof f !== "number") return "no token seen";
    if (f <= 0) return "never";
    var n = Math.round(1 / f);
    return n <= 1 ? "every token" : "1 in " + n.toLocaleString("en-US") + " tokens";
  };

  FA.thousands = function (n) {
    return Number(n).toLocaleString("en-US");
  };
})();
