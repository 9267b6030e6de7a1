/* featureatlas: draws unit pages from their data shards, searches, sorts and filters layer tables, and gives
   token tooltips and keyboard moves. Loaded from the site itself ('self'): no inline code, no network. Data
   files are classic scripts that call FA.put (the only way to load data that also works from file://).
   Untrusted text only ever goes through textContent or setAttribute, never innerHTML. */
(function () {
  "use strict";
  document.documentElement.classList.add("js");
  var ROOT = document.body.getAttribute("data-root") || "";
  var KINDS = ["top", "bottom", "quantile", "random"];

  /* ---- Loading data files ---- */
  var registry = {}, pending = {};
  window.FA = {
    put: function (key, value) {
      registry[key] = value;
    }
  };
  function load(key) {
    if (key in registry) return Promise.resolve(registry[key]);
    if (!pending[key]) {
      pending[key] = new Promise(function (resolve, reject) {
        var script = document.createElement("script");
        script.src = ROOT + key + ".js";
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
  }

  /* ---- Small helpers ---- */
  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }
  function hex(code, width) {
    return code.toString(16).padStart(width, "0");
  }
  function fmt(v, digits) {
    if (typeof v !== "number" || isNaN(v)) return "\u2014";
    return String(parseFloat(v.toPrecision(digits || 4)));
  }
  function signed(v) {
    var s = fmt(v, 3);
    return v > 0 ? "+" + s : s;
  }
  function percent(f) {
    return typeof f === "number" ? String(parseFloat((100 * f).toPrecision(3))) + "%" : "\u2014";
  }
  function oneIn(f) {
    if (typeof f !== "number") return "no token seen";
    if (f <= 0) return "never";
    var n = Math.round(1 / f);
    return n <= 1 ? "every token" : "1 in " + n.toLocaleString("en-US") + " tokens";
  }
  function thousands(n) {
    return Number(n).toLocaleString("en-US");
  }

  /* Hidden and layout-changing characters, drawn as glyphs (the same sets as build/tokens.py). */
  var HIDDEN = "\\x00-\\x1f\\x7f-\\x9f\\u00ad\\u061c\\u180e\\u200b\\u200e\\u200f\\u2028-\\u202e" +
    "\\u2060-\\u2064\\u2066-\\u2069\\ufeff\\ufff9-\\ufffb\\u{e0000}-\\u{e007f}";
  var SPECIAL = new RegExp("[" + HIDDEN + "]+| {2,}", "gu");
  var SPECIAL_IN_BLANK = new RegExp("[" + HIDDEN + " ]+", "gu");
  var HIDDEN_CHAR = new RegExp("[" + HIDDEN + "]", "gu");
  var GLYPHS = { "\n": "\u23ce", " ": "\u00b7", "\t": "\u21e5", "\r": "\\r" };
  function glyph(c) {
    if (GLYPHS[c] !== undefined) return GLYPHS[c];
    var code = c.codePointAt(0);
    if (code <= 0xff) return "\\x" + hex(code, 2);
    return code <= 0xffff ? "\\u" + hex(code, 4) : "\\U" + hex(code, 8);
  }
  /* A token's visible form appended to parent: text, with glyph runs in <i> (a newline glyph breaks the line). */
  function appendToken(parent, raw, oneLine) {
    var pattern = /[^ \t\n\r]/.test(raw) ? SPECIAL : SPECIAL_IN_BLANK;
    pattern.lastIndex = 0;
    var last = 0, match;
    while ((match = pattern.exec(raw)) !== null) {
      if (match.index > last) parent.appendChild(document.createTextNode(raw.slice(last, match.index)));
      var glyphs = "";
      Array.from(match[0]).forEach(function (c) {
        glyphs += glyph(c) + (c === "\n" && !oneLine ? "\n" : "");
      });
      parent.appendChild(el("i", null, glyphs));
      last = pattern.lastIndex;
    }
    if (last < raw.length) parent.appendChild(document.createTextNode(raw.slice(last)));
  }
  /* Any untrusted one-line string with hidden characters as glyphs. */
  function visible(text) {
    return String(text).replace(HIDDEN_CHAR, glyph);
  }
  /* Like Python's repr: quotes, and whitespace, controls and invisible characters escaped. */
  function repr(s) {
    var out = "'";
    Array.from(s).forEach(function (c) {
      if (c === "\\") out += "\\\\";
      else if (c === "'") out += "\\'";
      else if (c === "\n") out += "\\n";
      else if (c === "\t") out += "\\t";
      else if (c === "\r") out += "\\r";
      else if (c.match(HIDDEN_CHAR)) out += glyph(c);
      else out += c;
    });
    return out + "'";
  }

  /* Three base64url digits per activation (the inverse of build/numbers.py): a code (e + 50) * 2000 + (m + 1000)
     for the value m * 10^e rounded to three significant digits, or one of three codes above those for NaN,
     +inf and -inf. */
  var ACT_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  var ACT_SPECIAL = { 262000: NaN, 262001: Infinity, 262002: -Infinity };
  function decodeActivations(raw) {
    var out = [];
    for (var i = 0; i + 2 <= raw.length; i += 3) {
      if (raw.charAt(i) === "~") { // a run of zeros: "~" and a digit d stand for d + 1 zeros
        for (var z = ACT_DIGITS.indexOf(raw.charAt(i + 1)); z >= 0; z--) out.push(0);
        i -= 1;
        continue;
      }
      var code = 0;
      for (var j = i; j < i + 3; j++) code = code * 64 + ACT_DIGITS.indexOf(raw.charAt(j));
      if (code >= 262000) out.push(code in ACT_SPECIAL ? ACT_SPECIAL[code] : NaN);
      else out.push(Number(((code % 2000) - 1000) + "e" + (Math.floor(code / 2000) - 50)));
    }
    return out;
  }

  /* A shard context's token indices: shard.tw base64url digits each (build/shards.py). */
  var contextCache = new WeakMap();
  function contextTokens(shard, c) {
    var ctx = shard.ctx[c], cache = contextCache.get(ctx);
    if (!cache) {
      var digits = ctx[4], width = shard.tw;
      cache = [];
      for (var i = 0; i < digits.length; i += width) {
        var v = 0;
        for (var k = 0; k < width; k++) v = v * 64 + ACT_DIGITS.indexOf(digits.charAt(i + k));
        cache.push(v);
      }
      contextCache.set(ctx, cache);
    }
    return cache;
  }

  /* ---- Tooltip on hover and keyboard focus (unit pages and search results) ---- */
  var tokenInfo = new WeakMap(); // token element -> {raw, value, scale, relativeTo}
  var tip = null, shown = null;
  function tokenOf(node) {
    var elem = node && node.nodeType === 1 ? node : node && node.parentElement;
    return elem && elem.closest ? elem.closest(".ctx > b") : null;
  }
  function show(token) {
    var info = tokenInfo.get(token);
    if (!info) return;
    if (!tip) {
      tip = el("div");
      tip.id = "tip";
      tip.setAttribute("role", "tooltip");
      document.body.appendChild(tip);
    }
    tip.textContent = "";
    tip.appendChild(el("div", "tok", repr(info.raw)));
    var text = "activation " + fmt(info.value, 3);
    var scaled = info.relativeTo === "max" ? info.scale > 0 : info.scale < 0;
    if (scaled && typeof info.value === "number" && isFinite(info.value)) {
      text += " \u00b7 " + Math.round((100 * info.value) / info.scale) + "% of " + info.relativeTo;
    }
    tip.appendChild(el("div", "val", text));
    tip.hidden = false;
    if (shown && shown !== token) shown.classList.remove("on");
    shown = token;
    token.classList.add("on");
    token.setAttribute("aria-describedby", "tip");
    var r = token.getBoundingClientRect();
    var width = tip.offsetWidth, height = tip.offsetHeight;
    var left = Math.min(Math.max(4, r.left), document.documentElement.clientWidth - width - 4);
    var top = r.bottom + 6;
    if (top + height > window.innerHeight && r.top - height - 6 > 0) top = r.top - height - 6;
    tip.style.left = left + window.scrollX + "px";
    tip.style.top = top + window.scrollY + "px";
  }
  function hide() {
    if (tip) tip.hidden = true;
    if (shown) {
      shown.classList.remove("on");
      shown.removeAttribute("aria-describedby");
      shown = null;
    }
  }
  document.addEventListener("mouseover", function (event) {
    var token = tokenOf(event.target);
    if (token) show(token);
  });
  document.addEventListener("mouseout", function (event) {
    var token = tokenOf(event.target);
    if (!token || tokenOf(event.relatedTarget) === token) return;
    var focused = tokenOf(document.activeElement);
    if (focused) show(focused);
    else hide();
  });
  document.addEventListener("focusin", function (event) {
    var token = tokenOf(event.target);
    if (token) show(token);
  });
  document.addEventListener("focusout", function (event) {
    if (tokenOf(event.target)) hide();
  });

  /* ---- Unit pages ---- */
  var BUCKETS = 9;
  var SECTIONS = {
    top: ["top", "Top activations", "The contexts whose max activation is highest, around their max token."],
    bottom: ["bottom", "Bottom activations", "The contexts whose min activation is lowest, around their min " +
      "token; blue is scaled to the unit's min."],
    quantile: ["quantiles", "Quantile intervals", "Contexts sampled by the interval their max falls in, " +
      "highest first, around their max token."],
    random: ["random", "Random sample", "Contexts where the unit fires, at random, around their max token."]
  };

  /* One example: its header line and its tokens, coloured on a scale relative to the unit's max (min). */
  function exampleBlock(shard, ex, rank, scale, relativeTo) {
    var ctx = shard.ctx[ex[0]], lo = ex[1], position = ex[2], acts = decodeActivations(ex[4]);
    var indices = contextTokens(shard, ex[0]);
    var bos = shard.bos;
    var block = el("div", "ex");
    var head = el("p");
    head.appendChild(el("span", "rank", "#" + rank));
    head.appendChild(el("span", "act", fmt(ex[3])));
    var doc = visible(shard.docs[ctx[0]]);
    var docSpan = el("span", "doc", doc);
    docSpan.title = doc;
    head.appendChild(docSpan);
    head.appendChild(el("span", null, "from token " + (ctx[1] + Math.max(lo - (bos !== null ? 1 : 0), 0))));
    block.appendChild(head);
    var line = el("div", "ctx");
    if (lo > 0) line.classList.add("cut-l");
    if (lo + acts.length < ctx[3]) line.classList.add("cut-r");
    for (var i = 0; i < acts.length; i++) {
      var p = lo + i, raw = shard.toks[indices[p - ctx[2]]];
      var value = acts[i], b = el("b");
      var bucket = Math.round((value / scale) * BUCKETS);
      if (isNaN(bucket)) bucket = 0;
      bucket = Math.max(-BUCKETS, Math.min(BUCKETS, bucket));
      if (bucket > 0) b.classList.add("a" + bucket);
      else if (bucket < 0) b.classList.add("n" + -bucket);
      if (p === position) {
        b.classList.add("m");
        b.tabIndex = 0;
      }
      if (p === 0 && bos !== null && raw === bos) b.classList.add("bos");
      appendToken(b, raw, false);
      tokenInfo.set(b, { raw: raw, value: value, scale: relativeTo === "min" ? -scale : scale,
                         relativeTo: relativeTo });
      line.appendChild(b);
    }
    block.appendChild(line);
    return block;
  }

  /* The |activation| that gets the strongest colour: the unit's max (its min, for bottom examples); for a unit
     never positive, the largest |activation| among the examples. */
  function colourScale(unit, shard, kind) {
    var scale = kind === "bottom" ? -unit.s[1] : unit.s[0];
    if (scale > 0) return scale;
    var peak = 0;
    KINDS.forEach(function (k) {
      (unit.ex[k] || []).forEach(function (ex) {
        decodeActivations(ex[4]).forEach(function (v) {
          if (isFinite(v)) peak = Math.max(peak, Math.abs(v));
        });
      });
    });
    return peak > 0 ? peak : 1;
  }

  function factsList(items) {
    var dl = el("dl", "facts");
    items.forEach(function (item) {
      if (item[1] === null || item[1] === undefined || item[1] === "") return;
      var div = el("div", item[3] || null);
      div.appendChild(el("dt", null, item[0]));
      var dd = el("dd", item[2] || null);
      if (item[2] === "code") {
        dd.className = "";
        dd.appendChild(el("code", null, item[1]));
      } else dd.textContent = item[1];
      div.appendChild(dd);
      if (item[4]) div.appendChild(el("dd", "muted", item[4]));
      dl.appendChild(div);
    });
    return dl;
  }

  function section(id, title) {
    var s = el("section");
    s.id = id;
    s.appendChild(el("h2", null, title));
    return s;
  }

  function logitTable(caption, shard, rows) {
    var table = el("table", "lt");
    table.appendChild(el("caption", null, caption));
    var head = el("thead"), tr = el("tr");
    ["Token", "Effect"].forEach(function (name) {
      var th = el("th", null, name);
      th.scope = "col";
      tr.appendChild(th);
    });
    head.appendChild(tr);
    table.appendChild(head);
    var body = el("tbody");
    rows.forEach(function (row) {
      var r = el("tr"), cell = el("td");
      if (row[0] === null) cell.appendChild(el("span", "muted", "id " + row[1]));
      else {
        var chip = el("span", "tok");
        appendToken(chip, shard.toks[row[0]], true);
        cell.appendChild(chip);
      }
      r.appendChild(cell);
      r.appendChild(el("td", null, signed(row[2])));
      body.appendChild(r);
    });
    table.appendChild(body);
    return table;
  }

  /* ---- Histogram: the store's log bins (schema.sql), as an SVG bar chart like build/histogram.py drew ---- */
  var SVG = "http://www.w3.org/2000/svg";
  var HALF = 130, W = 640, H = 210, LEFT = 36, RIGHT = 10, TOP = 12, BOTTOM = 20;
  var PLOT_W = W - LEFT - RIGHT, PLOT_H = H - TOP - BOTTOM, BASE = TOP + PLOT_H;
  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }
  function binEdges(b) {
    var m = Math.abs(b);
    if (m === 0) return [0, 0];
    if (m === 1) return [0, Math.pow(2, -16)];
    if (m === HALF) return [Math.pow(2, 16), Infinity];
    function edge(i) { return Math.pow(2, Math.floor((i - 2) / 4) - 16) * (1 + ((i - 2) % 4) / 4); }
    return [edge(m), edge(m + 1)];
  }
  function short(v) {
    if (v >= 1e6) return parseFloat((v / 1e6).toPrecision(3)) + "M";
    if (v >= 1e3) return parseFloat((v / 1e3).toPrecision(3)) + "k";
    return String(parseFloat(v.toPrecision(3)));
  }
  function binLabel(b) {
    var e = binEdges(b);
    if (b === 0) return "exactly 0";
    if (e[1] === Infinity) return b > 0 ? short(e[0]) + " and above" : "-" + short(e[0]) + " and below";
    return b > 0 ? short(e[0]) + " to " + short(e[1]) : "-" + short(e[1]) + " to -" + short(e[0]);
  }
  function histogram(bins, counts, every) {
    var mags = bins.filter(function (b) { return b !== 0; }).map(Math.abs);
    var low = mags.length ? Math.min.apply(null, mags) : 1, high = mags.length ? Math.max.apply(null, mags) : 1;
    var negative = bins[0] < 0, sideN = high - low + 1, zero = negative ? sideN : 0;
    var nSlots = zero + 1 + sideN, slot = PLOT_W / Math.max(nSlots, 24), left = LEFT + (PLOT_W - nSlots * slot) / 2;
    function slotOf(b) { return b === 0 ? zero : b > 0 ? zero + 1 + b - low : high + b; }
    function valueX(v) {
      var a = Math.abs(v), octave = Math.floor(Math.log2(a));
      var pos = 2 + 4 * (octave + 16) + 4 * (a / Math.pow(2, octave) - 1);
      return left + (v > 0 ? zero + 1 + pos - low : high + 1 - pos) * slot;
    }
    var maxCount = Math.max.apply(null, counts), total = counts.reduce(function (a, c) { return a + c; }, 0);
    var decades = Math.max(1, Math.ceil(Math.log10(Math.max(maxCount, 1)) - 1e-9));
    var unitH = PLOT_H / Math.log10(1 + Math.pow(10, decades));
    var figure = el("figure", "hist"), chart = svg("svg", { viewBox: "0 0 " + W + " " + H, "aria-labelledby": "hist-cap" });
    var grid = "", ylab = svg("g", { "class": "ylab" });
    for (var k = 0; k <= decades; k += decades <= 6 ? 1 : 2) {
      var y = BASE - unitH * Math.log10(1 + Math.pow(10, k));
      grid += "M" + LEFT + " " + y.toFixed(1) + "H" + (W - RIGHT);
      var label = svg("text", { x: LEFT - 4, y: (y + 3).toFixed(1) });
      label.textContent = short(Math.pow(10, k));
      ylab.appendChild(label);
    }
    chart.appendChild(svg("path", { "class": "grid", d: grid }));
    chart.appendChild(ylab);
    var bars = svg("g", { transform: "matrix(" + slot.toFixed(3) + " 0 0 -1 " + left.toFixed(1) + " " + BASE + ")" });
    var groups = { hn: svg("g", { "class": "hn" }), hz: svg("g", { "class": "hz" }), hp: svg("g", { "class": "hp" }) };
    bins.forEach(function (b, i) {
      var rect = svg("rect", { x: slotOf(b), width: ".86",
                               height: Math.max(Math.round(unitH * Math.log10(1 + counts[i])), 1) });
      var title = svg("title");
      title.textContent = binLabel(b) + ": " + thousands(counts[i]);
      rect.appendChild(title);
      groups[b < 0 ? "hn" : b === 0 ? "hz" : "hp"].appendChild(rect);
    });
    ["hn", "hz", "hp"].forEach(function (g) { if (groups[g].childNodes.length) bars.appendChild(groups[g]); });
    chart.appendChild(bars);
    // round activations in the drawn range: powers of ten, or 1-2-5 steps in a short range
    var lo = Math.max(binEdges(low)[0], Math.pow(2, -16)), hi = Math.min(binEdges(high)[1], Math.pow(2, 16));
    var values = [];
    [[1], [1, 2, 5]].some(function (steps) {
      values = [];
      for (var d = Math.floor(Math.log10(lo)); d <= Math.ceil(Math.log10(hi)); d++) {
        steps.forEach(function (s) { var v = s * Math.pow(10, d); if (v >= lo && v < hi) values.push(v); });
      }
      return values.length >= 3;
    });
    var ticks = [];
    values.forEach(function (v) {
      ticks.push([valueX(v), short(v)]);
      if (negative) ticks.push([valueX(-v), "-" + short(v)]);
    });
    ticks.sort(function (a, b) { return a[0] - b[0]; });
    var kept = [[left + (zero + 0.5) * slot, "0"]];
    ticks.forEach(function (t) {
      var clear = kept.every(function (q) { return Math.abs(t[0] - q[0]) >= 40; });
      if (clear && t[0] >= LEFT && t[0] <= W - RIGHT / 2) kept.push(t);
    });
    var marks = "M" + LEFT + " " + BASE + "H" + (W - RIGHT), xlab = svg("g", { "class": "xlab" });
    kept.forEach(function (t) {
      marks += "M" + t[0].toFixed(1) + " " + BASE + "v3";
      var label = svg("text", { x: t[0].toFixed(1), y: H - 5 });
      label.textContent = t[1];
      xlab.appendChild(label);
    });
    chart.appendChild(svg("path", { "class": "axis", d: marks }));
    chart.appendChild(xlab);
    figure.appendChild(chart);
    var caption = el("figcaption", null, thousands(total) + " tokens counted" +
      (every > 1 ? " (every token of 1 context in " + every + ")" : "") + ". Bars are bins of |activation|, four " +
      "per octave; heights are log-scale counts." + (negative ? " Negative values are mirrored left of 0." : "") +
      " Hover a bar for its range and count.");
    caption.id = "hist-cap";
    figure.appendChild(caption);
    return figure;
  }

  /* A shard's histogram, [first bin, counts from there on], as the non-empty bins and their counts. */
  function expandHistogram(h) {
    var bins = [], counts = [];
    h[1].forEach(function (c, i) {
      if (c > 0) {
        bins.push(h[0] + i);
        counts.push(c);
      }
    });
    return [bins, counts];
  }

  function sqlString(s) {
    return "'" + String(s).replace(/'/g, "''") + "'";
  }

  function unitJSON(meta, shard, unit) {
    var ctxOf = function (ex, kind) {
      var ctx = shard.ctx[ex[0]], acts = decodeActivations(ex[4]), tokens = [], indices = contextTokens(shard, ex[0]);
      for (var i = 0; i < acts.length; i++) tokens.push(shard.toks[indices[ex[1] + i - ctx[2]]]);
      var out = { kind: kind, max_activation: ex[3], max_position: ex[2], first_position: ex[1],
                  document: shard.docs[ctx[0]], start_token: ctx[1], tokens: tokens, activations: acts };
      if (kind === "quantile") out.interval = [ex[5], ex[6]];
      return out;
    };
    var logits = function (rows) {
      return rows.map(function (r) { return { token: r[0] === null ? null : shard.toks[r[0]], token_id: r[1], effect: r[2] }; });
    };
    var s = unit.s, examples = [];
    KINDS.forEach(function (k) { (unit.ex[k] || []).forEach(function (ex) { examples.push(ctxOf(ex, k)); }); });
    return {
      format: "featureatlas.page-unit", version: 1, model: meta.model, source: meta.source, layer: meta.layer,
      unit: unit.u, note: "What this page shows: examples are windows around their max token; " +
        "`featureatlas export` writes whole contexts.",
      statistics: { max: s[0], min: s[1], n_tokens: s[2], n_firing: s[3], mean: s[4], std: s[5] },
      histogram: unit.h ? expandHistogram(unit.h)[0].map(function (b, i) {
        var e = binEdges(b);
        return { bin: b, lo: e[0], hi: e[1] === Infinity ? null : e[1], count: expandHistogram(unit.h)[1][i] };
      }) : [],
      logits: { top: logits(unit.lt || []), bottom: logits(unit.lb || []) },
      explanations: (unit.x || []).map(function (x) { return { text: x[0], score: x[1], author: x[2] }; }),
      examples: examples
    };
  }

  function renderUnit(host, meta, shard, unit, neighbours) {
    var noun = meta.noun, title = noun + " " + unit.u;
    document.title = title + " \u00b7 layer " + meta.layer + " \u00b7 " + meta.source + " \u00b7 " + meta.model;
    document.getElementById("unit-title").textContent = title;
    var crumb = document.getElementById("crumb-unit");
    if (crumb) crumb.textContent = noun.toLowerCase() + " " + unit.u;
    var pager = document.getElementById("pager");
    pager.textContent = "";
    function pageLink(rel, target, label) {
      if (target === null || target === undefined) {
        pager.appendChild(el("span", "off", label));
        return;
      }
      var a = el("a", null, label);
      a.rel = rel;
      a.href = "#" + target;
      a.title = rel === "prev" ? "previous (k, p)" : "next (j, n)";
      pager.appendChild(a);
    }
    pageLink("prev", neighbours[0], neighbours[0] === null ? "\u2190" : "\u2190 " + neighbours[0]);
    var up = el("a", null, "layer " + meta.layer);
    up.rel = "up";
    up.href = "index.html";
    up.title = "layer page (u)";
    pager.appendChild(up);
    pageLink("next", neighbours[1], neighbours[1] === null ? "\u2192" : neighbours[1] + " \u2192");

    host.textContent = "";
    var s = unit.s, seen = s[2] > 0, frequency = seen ? s[3] / s[2] : null;
    var toc = el("nav", "toc");
    toc.setAttribute("aria-label", "On this page");
    host.appendChild(toc);
    function tocLink(id, label) {
      var a = el("a", null, label);
      a.href = "#" + unit.u + "/" + id;
      a.setAttribute("data-target", id);
      toc.appendChild(a);
    }

    if (unit.x && unit.x.length) {
      var ex = section("explanation", unit.x.length === 1 ? "Explanation" : "Explanations");
      var list = el("ul", "explanations");
      unit.x.forEach(function (x) {
        var li = el("li");
        li.appendChild(el("span", "text", visible(x[0])));
        var by = [];
        if (x[1] !== null) by.push("score " + fmt(x[1], 3));
        if (x[2]) by.push(visible(x[2]));
        if (by.length) li.appendChild(el("span", "muted", " \u2014 " + by.join(", ")));
        list.appendChild(li);
      });
      ex.appendChild(list);
      host.appendChild(ex);
      tocLink("explanation", "Explanation");
    }

    var stats = section("stats", "Statistics");
    stats.appendChild(factsList([
      ["Max", fmt(s[0]), "big"], ["Min", fmt(s[1]), "big"],
      ["Fires on (> 0)", percent(frequency), "big", null, oneIn(frequency)],
      ["Mean", seen ? fmt(s[4]) : "\u2014", "big"], ["Std", seen ? fmt(s[5]) : "\u2014", "big"],
      ["Tokens counted", thousands(s[2]), "big"],
      ["Hook", meta.hookName || meta.hook, "code", null, meta.hookName && meta.hook ? meta.hook : null],
      ["Writes to", meta.hookOut, "code"], ["Architecture", meta.architecture],
      ["Dictionary", meta.dictionary, "code", "wide"]
    ]));
    host.appendChild(stats);
    tocLink("stats", "Statistics");

    var pair = el("div", "pair");
    var hist = section("histogram", "Activation histogram");
    if (unit.h) hist.appendChild(histogram.apply(null, expandHistogram(unit.h).concat([meta.histogramEvery])));
    else hist.appendChild(el("p", "empty", seen ? "No histogram in this store." :
                                                   "No histogram: this unit was never seen in the harvest."));
    pair.appendChild(hist);
    var logits = section("logits", "Logit effects");
    if ((unit.lt && unit.lt.length) || (unit.lb && unit.lb.length)) {
      logits.appendChild(el("p", "note", "Tokens whose logits the unit's output direction raises most and lowers most."));
      var tables = el("div", "logits");
      tables.appendChild(logitTable("Promoted", shard, unit.lt || []));
      tables.appendChild(logitTable("Suppressed", shard, unit.lb || []));
      logits.appendChild(tables);
    } else logits.appendChild(el("p", "empty", "No logit effects in this store for this unit."));
    pair.appendChild(logits);
    host.appendChild(pair);
    tocLink("histogram", "Histogram");
    tocLink("logits", "Logit effects");
    host.appendChild(probeBox(meta, unit));  // a hypothesis from the examples is one step from a test
    tocLink("probe", "Try your own text");

    var any = KINDS.some(function (k) { return unit.ex[k] && unit.ex[k].length; });
    if (any) {
      var scaleBar = el("div", "scale");
      scaleBar.setAttribute("aria-hidden", "true");
      [["muted", "negative"], ["n9"], ["n6"], ["n3"], ["n1"], ["muted", "0"], ["a1"], ["a3"], ["a6"], ["a9"],
       ["muted", "max"], ["hint", "Hover a token, or Tab to an example and use \u2190 \u2192, to see its activation."]]
        .forEach(function (p) { scaleBar.appendChild(el("span", p[0], p[1])); });
      host.appendChild(scaleBar);
    }
    var nounLower = noun.toLowerCase();
    KINDS.forEach(function (kind) {
      if (kind === "bottom" && !meta.signed) return;
      var spec = SECTIONS[kind], rows = unit.ex[kind] || [];
      var sec = section(spec[0], spec[1]);
      sec.className = "examples";
      sec.firstChild.appendChild(el("span", "count", rows.length + " example" + (rows.length === 1 ? "" : "s")));
      tocLink(spec[0], spec[1]);
      if (!rows.length) {
        var why = !seen ? "No examples: this " + nounLower + " was never seen in the harvest." :
          s[3] === 0 && kind !== "bottom" ? "No examples: this " + nounLower + " never fired." : "None in this store.";
        sec.appendChild(el("p", "empty", why));
        host.appendChild(sec);
        return;
      }
      sec.appendChild(el("p", "note", spec[2]));
      var scale = colourScale(unit, shard, kind), relativeTo = kind === "bottom" ? "min" : "max";
      if (kind === "quantile") {
        var start = 0;
        for (var i = 1; i <= rows.length; i++) {
          if (i < rows.length && rows[i][5] === rows[start][5] && rows[i][6] === rows[start][6]) continue;
          var group = el("section", "interval"), h = el("h3", null, fmt(rows[start][5]) + " to " + fmt(rows[start][6]));
          var share = s[0] > 0 ? Math.round((100 * rows[start][5]) / s[0]) + "\u2013" +
            Math.round((100 * rows[start][6]) / s[0]) + "% of max \u00b7 " : "";
          h.appendChild(el("span", "count", share + (i - start) + " example" + (i - start === 1 ? "" : "s")));
          group.appendChild(h);
          for (var j = start; j < i; j++) group.appendChild(exampleBlock(shard, rows[j], j + 1, scale, relativeTo));
          sec.appendChild(group);
          start = i;
        }
      } else {
        rows.forEach(function (ex, i) { sec.appendChild(exampleBlock(shard, ex, i + 1, scale, relativeTo)); });
      }
      host.appendChild(sec);
    });

    var data = section("data", "Data");
    var download = el("a", "button", "Download this unit's data (JSON)");
    var blob = new Blob([JSON.stringify(unitJSON(meta, shard, unit), null, 1)], { type: "application/json" });
    download.href = URL.createObjectURL(blob);
    download.download = meta.source.replace(/[^\w.-]+/g, "-") + "-" + meta.layer + "-" + unit.u + ".json";
    data.appendChild(download);
    data.appendChild(el("p", "note", "Its examples in the store, with SQL (duckdb STORE.duckdb):"));
    var sql = "SELECT example_kind, rank, max_activation, max_position, activations\nFROM examples\nWHERE model = " +
      sqlString(meta.model) + " AND source = " + sqlString(meta.source) + " AND layer = " + meta.layer +
      " AND unit = " + unit.u + "\nORDER BY example_kind, interval_hi DESC, rank;";
    var pre = el("pre", "sql", sql);
    pre.tabIndex = 0;
    data.appendChild(pre);
    var copy = el("button", "button", "Copy SQL");
    copy.type = "button";
    copy.addEventListener("click", function () {
      var done = function () { copy.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(sql).then(done, selectSql);
      else selectSql();
      function selectSql() {
        var range = document.createRange();
        range.selectNodeContents(pre);
        var sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        copy.textContent = "Selected: press Ctrl+C";
      }
    });
    data.appendChild(copy);
    host.appendChild(data);
    tocLink("data", "Data");
  }

  /* ---- The live probe box: only where `featureatlas serve --store` answers (build/serve.py) ---- */
  var probeText = "";
  function probeBox(meta, unit) {
    var sec = section("probe", "Try your own text");
    var note = el("p", "note");
    sec.appendChild(note);
    var serveHint = "Run your own text through this unit: start `featureatlas serve SITE --store STORE.duckdb` " +
      "and open this page from the address it prints.";
    if (location.protocol.indexOf("http") !== 0) { // file://: no server to ask
      note.textContent = serveHint;
      return sec;
    }
    note.textContent = "Checking for a model\u2026";
    fetch(ROOT + "api/probe", { headers: { Accept: "application/json" } }).then(function (response) {
      return response.json().then(function (body) { return [response.ok, body]; });
    }).then(function (answer) {
      var ok = answer[0], body = answer[1];
      var served = ok && body.sources.some(function (s) { return s[0] === meta.source && s[1] === meta.layer; });
      if (!served) {
        note.textContent = ok ? "The server's model has no " + meta.source + " layer " + meta.layer + "." : serveHint;
        return;
      }
      note.textContent = "Runs " + visible(body.model) + " on the server. Colours are on the same scale as the examples.";
      var label = el("label", null, "Text");
      label.htmlFor = "probe-text";
      var box = el("textarea");
      box.id = "probe-text";
      box.rows = 3;
      box.maxLength = 20000;
      box.value = probeText;
      var run = el("button", "button", "Run through " + meta.noun.toLowerCase() + " " + unit.u);
      run.type = "button";
      var top = el("button", "button", "Top units of this layer");
      top.type = "button";
      var status = el("p", "meta");
      status.setAttribute("role", "status");
      var out = el("div", "probe-out");
      [label, box, run, top, status, out].forEach(function (node) { sec.appendChild(node); });
      function ask(extra) {
        probeText = box.value;
        status.textContent = "Running\u2026";
        out.textContent = "";
        var request = { text: box.value, source: meta.source, layer: meta.layer };
        Object.keys(extra).forEach(function (k) { request[k] = extra[k]; });
        return fetch(ROOT + "api/probe", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(request) })
          .then(function (response) { return response.json(); })
          .then(function (result) {
            if (result.error) {
              status.textContent = result.error;
              return null;
            }
            status.textContent = "";
            return result;
          }, function () { status.textContent = "The server did not answer."; return null; });
      }
      run.addEventListener("click", function () {
        ask({ unit: unit.u }).then(function (result) {
          if (!result) return;
          var acts = result.activations.map(function (v) { return v === null ? NaN : v; });
          var scale = result.scale !== null && result.scale > 0 ? result.scale : Math.max.apply(null,
            acts.map(function (v) { return isFinite(v) ? Math.abs(v) : 0; }).concat([1e-30]));
          var line = el("div", "ctx");
          line.id = "probe-result";
          result.tokens.forEach(function (raw, i) {
            var b = el("b"), bucket = Math.round((acts[i] / scale) * BUCKETS);
            bucket = isNaN(bucket) ? 0 : Math.max(-BUCKETS, Math.min(BUCKETS, bucket));
            if (bucket > 0) b.classList.add("a" + bucket);
            else if (bucket < 0) b.classList.add("n" + -bucket);
            if (i === result.max_position) {
              b.classList.add("m");
              b.tabIndex = 0;
            }
            if (i < result.first_counted) b.classList.add("bos");
            appendToken(b, raw, false);
            tokenInfo.set(b, { raw: raw, value: acts[i], scale: scale, relativeTo: "max" });
            line.appendChild(b);
          });
          var head = el("p", "meta", "max " + fmt(acts[result.max_position]) + " on " +
            repr(result.tokens[result.max_position]) + (result.scale ? " \u00b7 the unit's max in the catalogue: " +
            fmt(result.scale) : ""));
          out.appendChild(head);
          out.appendChild(line);
        });
      });
      top.addEventListener("click", function () {
        ask({ top: 10 }).then(function (result) {
          if (!result) return;
          var list = el("ol", "hits");
          list.id = "probe-top";
          result.units.forEach(function (u) {
            var li = el("li"), a = el("a", null, meta.noun + " " + u.unit);
            a.href = "#" + u.unit;
            li.appendChild(a);
            li.appendChild(el("span", "muted", " max " + fmt(u.max) + " on " + repr(result.tokens[u.position])));
            list.appendChild(li);
          });
          out.appendChild(list);
        });
      });
    }, function () {
      note.textContent = serveHint;
    });
    return sec;
  }

  function unitPage(host) {
    var meta = {
      model: host.getAttribute("data-model"), source: host.getAttribute("data-source"),
      layer: Number(host.getAttribute("data-layer")), noun: host.getAttribute("data-noun"),
      signed: host.getAttribute("data-signed") === "1", hook: host.getAttribute("data-hook"),
      hookName: host.getAttribute("data-hook-name"), hookOut: host.getAttribute("data-hook-out"),
      architecture: host.getAttribute("data-architecture"), dictionary: host.getAttribute("data-dictionary"),
      histogramEvery: Number(host.getAttribute("data-histogram-every") || 1),
      shardUnits: Number(host.getAttribute("data-shard-units")), path: host.getAttribute("data-path")
    };
    var current = null;
    /* Tells scripts driving the page (tests, crawlers) that a unit is drawn: detail is its number, or null. */
    function drawn(unitNumber) {
      document.dispatchEvent(new CustomEvent("featureatlas:unit", { detail: unitNumber }));
    }
    function message(text) {
      host.textContent = "";
      host.appendChild(el("p", "empty", text));
    }
    function route() {
      var parts = location.hash.replace(/^#/, "").split("/");
      var unitNumber = Number(parts[0]), target = parts[1];
      if (parts[0] === "" || !/^\d+$/.test(parts[0])) {
        if (current === null) message("No unit chosen: the layer page lists them all.");
        return;
      }
      var done = function () {
        if (target) {
          var node = document.getElementById(target);
          if (node) node.scrollIntoView();
        } else window.scrollTo(0, 0);
      };
      if (current === unitNumber) return done();
      var shardIndex = Math.floor(unitNumber / meta.shardUnits);
      load(meta.path + "/d/" + shardIndex).then(function (shard) {
        var units = shard.units, i = -1;
        for (var k = 0; k < units.length; k++) if (units[k].u === unitNumber) i = k;
        if (i < 0) {
          message("This layer has no unit " + unitNumber + ".");
          return drawn(null);
        }
        var prev = i > 0 ? units[i - 1].u : shard.prev, next = i + 1 < units.length ? units[i + 1].u : shard.next;
        hide();
        renderUnit(host, meta, shard, units[i], [prev, next]);
        current = unitNumber;
        done();
        drawn(unitNumber);
      }, function () {
        message("This layer has no unit " + unitNumber + ".");
        drawn(null);
      });
    }
    window.addEventListener("hashchange", route);
    route();
  }

  /* ---- Search: unit addresses need no index; tokens and words come from hashed term files ---- */
  function fnv1a(text) {
    var bytes = new TextEncoder().encode(text), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h >>> 0;
  }

  /* Unit addresses: "L12 N345", "12/345", "mlp/12/345", "sae:res14 123", "resid 3 507" -> [layer index, unit]. */
  function addresses(q, manifest) {
    var text = q.trim(), m, found = [];
    var layers = manifest.layers;
    function add(filter, unit) {
      layers.forEach(function (l, i) {
        if (filter(l) && unit <= l.max_unit) found.push([i, unit]);
      });
    }
    if ((m = text.match(/^L\s*(\d+)\s*[/ ,]?\s*N\s*(\d+)$/i))) {
      add(function (l) { return l.source === "mlp" && l.layer === Number(m[1]); }, Number(m[2]));
    } else if ((m = text.match(/^(\d+)\s*[/ ,:]\s*(\d+)$/))) {
      add(function (l) { return l.layer === Number(m[1]); }, Number(m[2]));
      found.sort(function (a, b) { return (layers[b[0]].source === "mlp") - (layers[a[0]].source === "mlp"); });
    } else if ((m = text.match(/^(\S+?)\s*[/ ]\s*(?:L?(\d+)\s*[/ ]\s*)?N?(\d+)$/i))) {
      var name = m[1].toLowerCase(), layer = m[2] === undefined ? null : Number(m[2]);
      add(function (l) {
        var source = l.source.toLowerCase();
        var named = source === name || source.split(":").pop() === name || l.model.toLowerCase() + "/" + source === name;
        return named && (layer === null || l.layer === layer);
      }, Number(m[3]));
    }
    return found;
  }

  function cardFor(manifest, hit) {
    var layer = manifest.layers[hit[0]];
    return load(layer.path + "/c/" + Math.floor(hit[1] / manifest.shard_units)).then(function (cards) {
      for (var i = 0; i < cards.units.length; i++) if (cards.units[i][0] === hit[1]) return cards.units[i];
      return null;
    }, function () { return null; });
  }

  function resultItem(manifest, hit, card) {
    var layer = manifest.layers[hit[0]];
    var li = el("li", "result");
    var a = el("a", null, layer.noun + " " + hit[1]);
    a.href = ROOT + layer.path + "/unit.html#" + hit[1];
    var head = el("p");
    head.appendChild(a);
    head.appendChild(el("span", "muted", layer.source + " \u00b7 layer " + layer.layer +
      (manifest.models > 1 ? " \u00b7 " + visible(layer.model) : "")));
    if (card) {
      head.appendChild(el("span", "act", "max " + fmt(card[1])));
      if (card[3] !== null) head.appendChild(el("span", "muted", "fires on " + percent(card[3])));
    }
    li.appendChild(head);
    if (card && card[6]) li.appendChild(el("p", "expl", visible(card[6])));
    if (card && card[4].length) {
      var snippet = el("p", "snippet");
      card[4].forEach(function (tok, i) {
        if (i === card[5]) {
          var mark = el("mark");
          appendToken(mark, tok, true);
          snippet.appendChild(mark);
        } else appendToken(snippet, tok, true);
      });
      li.appendChild(snippet);
    } else if (card) li.appendChild(el("p", "muted", "no examples"));
    return li;
  }

  function runSearch(q, out, status) {
    out.textContent = "";
    status.textContent = "";
    q = q.trim();
    if (!q) {
      status.textContent = "Type a unit address (L12 N345, 12/345, sae:res14 123), a token or a word.";
      return Promise.resolve();
    }
    status.textContent = "Searching\u2026";
    return load("search/manifest").then(function (manifest) {
      manifest.models = new Set(manifest.layers.map(function (l) { return l.model; })).size;
      var groups = [];
      var direct = addresses(q, manifest);
      if (direct.length) groups.push(["Unit address", direct]);
      var term = q.toLowerCase(), words = (term.match(/[\p{L}\p{N}_]{2,}/gu) || []);
      var terms = [term].concat(words.filter(function (w) { return w !== term; }));
      return Promise.all(terms.map(function (t) {
        return load("search/t/" + (fnv1a(t) % manifest.shards)).then(function (shard) {
          return Object.prototype.hasOwnProperty.call(shard, t) ? shard[t] : [];
        }, function () { return []; });
      })).then(function (lists) {
        var byKind = function (list, kind) {
          return list.filter(function (p) { return p[0] === kind; }).map(function (p) { return [p[1], p[2]]; });
        };
        var peaks = byKind(lists[0], 0), logits = byKind(lists[0], 1);
        if (peaks.length) groups.push(["Top examples peak on \u201c" + visible(q) + "\u201d", peaks]);
        if (logits.length) groups.push(["Promotes \u201c" + visible(q) + "\u201d (top logits)", logits]);
        // explanations: units whose explanation has every word of the query
        var wordLists = words.length ? terms.map(function (t, i) { return words.indexOf(t) >= 0 ? byKind(lists[i], 2) : null; })
          .filter(function (l) { return l !== null; }) : [];
        if (wordLists.length) {
          var keyOf = function (h) { return h[0] + "/" + h[1]; };
          var common = wordLists[0].filter(function (h) {
            return wordLists.every(function (l) { return l.some(function (o) { return keyOf(o) === keyOf(h); }); });
          });
          if (common.length) groups.push(["Explanations mention \u201c" + visible(words.join(" ")) + "\u201d", common]);
        }
        if (!groups.length) {
          status.textContent = "Nothing found for \u201c" + visible(q) + "\u201d.";
          return;
        }
        status.textContent = "";
        return Promise.all(groups.map(function (g) {
          var hits = g[1].slice(0, 20);
          return Promise.all(hits.map(function (hit) { return cardFor(manifest, hit); })).then(function (cards) {
            var sec = el("section", "results");
            var h = el("h2", null, g[0]);
            h.appendChild(el("span", "count", g[1].length + " unit" + (g[1].length === 1 ? "" : "s") +
              (g[1].length > hits.length ? ", the first " + hits.length + " shown" : "")));
            sec.appendChild(h);
            var list = el("ol", "hits");
            hits.forEach(function (hit, i) { list.appendChild(resultItem(manifest, hit, cards[i])); });
            sec.appendChild(list);
            return sec;
          });
        })).then(function (sections) {
          sections.forEach(function (sec) { out.appendChild(sec); });
        });
      });
    }, function () {
      status.textContent = "This site has no search index.";
    });
  }

  function searchPage(out) {
    var input = document.getElementById("q"), status = document.getElementById("search-status");
    var q = new URLSearchParams(location.search).get("q") || "";
    input.value = q;
    runSearch(q, out, status);
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        history.replaceState(null, "", "?q=" + encodeURIComponent(input.value));
        runSearch(input.value, out, status);
      }, 150);
    });
    input.form.addEventListener("submit", function (event) {
      event.preventDefault();
      history.replaceState(null, "", "?q=" + encodeURIComponent(input.value));
      runSearch(input.value, out, status);
    });
  }

  /* ---- Layer pages: filter and sort the unit table ---- */
  function setUpTable(table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var filter = document.getElementById("filter");
    var count = document.getElementById("shown");
    var texts = null;
    if (filter) {
      // A number finds that unit; anything else searches the snippets' and explanations' text.
      filter.addEventListener("input", function () {
        var q = filter.value.trim().toLowerCase();
        var byUnit = /^\d+$/.test(q);
        if (!texts) texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
        var n = 0;
        rows.forEach(function (row, i) {
          var hit = q === "" || (byUnit ? row.cells[0].textContent === q : texts[i].indexOf(q) !== -1);
          row.hidden = !hit;
          if (hit) n++;
        });
        if (count) count.textContent = q === "" ? "" : n + " of " + rows.length + " units";
      });
    }
    table.querySelectorAll("th button[data-sort]").forEach(function (button) {
      button.addEventListener("click", function () {
        var column = Number(button.getAttribute("data-sort"));
        var th = button.parentElement;
        var descending = th.getAttribute("aria-sort") !== "descending";
        table.querySelectorAll("th[aria-sort]").forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", descending ? "descending" : "ascending");
        var keyed = rows.map(function (row) {
          var v = parseFloat(row.cells[column].textContent);
          return [isNaN(v) ? -Infinity : v, row];
        });
        keyed.sort(function (a, b) { return descending ? b[0] - a[0] : a[0] - b[0]; });
        var fragment = document.createDocumentFragment();
        keyed.forEach(function (pair) { fragment.appendChild(pair[1]); });
        body.appendChild(fragment);
      });
    });
  }

  /* ---- Keyboard: / search, j k (or arrows) between units, p n u, arrows within an example ---- */
  function moveFocus(selector, step) {
    var items = Array.prototype.filter.call(document.querySelectorAll(selector), function (a) {
      return a.offsetParent !== null;
    });
    if (!items.length) return;
    var i = items.indexOf(document.activeElement);
    var next = items[Math.max(0, Math.min(items.length - 1, i < 0 ? (step > 0 ? 0 : items.length - 1) : i + step))];
    next.focus();
  }
  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    var token = tokenOf(event.target);
    if (token) {
      var ctx = token.parentElement;
      var moves = { ArrowRight: token.nextElementSibling, ArrowLeft: token.previousElementSibling,
                    Home: ctx.firstElementChild, End: ctx.lastElementChild };
      if (event.key in moves) {
        event.preventDefault();
        var to = moves[event.key];
        if (to) {
          if (!to.hasAttribute("tabindex")) to.tabIndex = -1;
          to.focus();
        }
        return;
      }
      if (event.key === "Escape") {
        hide();
        return;
      }
    }
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || event.shiftKey) return;
    if (event.key === "/") {
      var box = document.getElementById("q");
      if (box) {
        event.preventDefault();
        box.focus();
        box.select();
      }
      return;
    }
    var onUnit = document.getElementById("unit") !== null;
    var rel = { p: "prev", n: "next", u: "up", k: "prev", j: "next" }[event.key];
    if (onUnit && !rel) rel = { ArrowLeft: "prev", ArrowRight: "next" }[event.key];
    if (rel && (onUnit || rel === "up" || event.key === "p" || event.key === "n")) {
      var link = document.querySelector(".pager a[rel='" + rel + "']");
      if (link) {
        event.preventDefault();
        link.click();
      }
      return;
    }
    if (event.key === "j" || event.key === "k") {
      var list = document.getElementById("units") ? "#units tbody tr:not([hidden]) td:first-child a" : ".hits a";
      event.preventDefault();
      moveFocus(list, event.key === "j" ? 1 : -1);
    }
  });

  var table = document.getElementById("units");
  if (table) setUpTable(table);
  var host = document.getElementById("unit");
  if (host) unitPage(host);
  var results = document.getElementById("results");
  if (results) searchPage(results);
})();
