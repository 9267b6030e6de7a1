/* Unit pages: a layer's unit.html draws the unit its #fragment names from the layer's data shard
   (build/shards.py): heading and pager, statistics, histogram, logit effects, the probe box, the examples of
   each kind, similar units (similar.js), and the unit's data as JSON and SQL. Moving between units changes only the fragment. */
(function (FA) {
  "use strict";
  var el = FA.el, fmt = FA.fmt, section = FA.section;
  var KINDS = ["top", "bottom", "quantile", "random"];
  var SECTIONS = {  // kind: [section id, title, note]
    top: ["top", "Top activations", "The contexts whose max activation is highest, around their max token."],
    bottom: ["bottom", "Bottom activations", "The contexts whose min activation is lowest, around their min " +
      "token; blue is scaled to the unit's min."],
    quantile: ["quantiles", "Quantile intervals", "Contexts sampled by the interval their max falls in, " +
      "highest first, around their max token."],
    random: ["random", "Random sample", "Contexts where the unit fires, at random, around their max token."]
  };

  /* ---- Heading ---- */
  /* The page title, heading, breadcrumb and pager (prev, up, next; neighbours: [prev unit, next unit] or null). */
  function drawHeading(meta, u, neighbours) {
    var noun = meta.noun, title = noun + " " + u;
    document.title = title + " \u00b7 layer " + meta.layer + " \u00b7 " + meta.source + " \u00b7 " + meta.model;
    document.getElementById("unit-title").textContent = title;
    var crumb = document.getElementById("crumb-unit");
    if (crumb) crumb.textContent = noun.toLowerCase() + " " + u;
    var pager = document.getElementById("pager");
    pager.textContent = "";
    pager.appendChild(pageLink("prev", neighbours[0], neighbours[0] === null ? "\u2190" : "\u2190 " + neighbours[0]));
    var up = el("a", null, "layer " + meta.layer);
    up.rel = "up";
    up.href = "index.html";
    up.title = "layer page (u)";
    pager.appendChild(up);
    pager.appendChild(pageLink("next", neighbours[1], neighbours[1] === null ? "\u2192" : neighbours[1] + " \u2192"));
  }

  function pageLink(rel, target, label) {
    if (target === null || target === undefined) return el("span", "off", label);
    var a = el("a", null, label);
    a.rel = rel;
    a.href = "#" + target;
    a.title = rel === "prev" ? "previous (k, p)" : "next (j, n)";
    return a;
  }

  /* ---- Numbers ---- */
  /* Rows of one text by one author (say, its detection and its fuzzing score) are shown once, with each score
     labelled by what it measures. */
  function groupedExplanations(rows) {  // rows: [text, score, author, score_kind]
    var groups = [], byKey = {};
    rows.forEach(function (x) {
      var key = JSON.stringify([x[0], x[2]]);
      if (!byKey[key]) { byKey[key] = { text: x[0], author: x[2], scores: [] }; groups.push(byKey[key]); }
      if (x[1] !== null) byKey[key].scores.push(x[3] ? x[3] + " " + fmt(x[1], 3) : "score " + fmt(x[1], 3));
    });
    return groups;
  }

  function explanationSection(rows) {
    var groups = groupedExplanations(rows);
    var sec = section("explanation", groups.length === 1 ? "Explanation" : "Explanations");
    var list = el("ul", "explanations");
    groups.forEach(function (g) {
      var li = el("li");
      li.appendChild(el("span", "text", FA.visible(g.text)));
      var by = g.scores.map(FA.visible);
      if (g.author) by.push(FA.visible(g.author));
      if (by.length) li.appendChild(el("span", "muted", " \u2014 " + by.join(", ")));
      list.appendChild(li);
    });
    sec.appendChild(list);
    return sec;
  }

  /* A <dl> of [term, value, dd class ("code": value in <code>), div class, note]; empty values are left out. */
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

  /* s: [max, min, tokens counted, tokens firing, mean, std]. */
  function statsSection(meta, s) {
    var seen = s[2] > 0, frequency = seen ? s[3] / s[2] : null;
    var sec = section("stats", "Statistics");
    sec.appendChild(factsList([
      ["Max", fmt(s[0]), "big"], ["Min", fmt(s[1]), "big"],
      ["Fires on (> 0)", FA.percent(frequency), "big", null, FA.oneIn(frequency)],
      ["Mean", seen ? fmt(s[4]) : "\u2014", "big"], ["Std", seen ? fmt(s[5]) : "\u2014", "big"],
      ["Tokens counted", FA.thousands(s[2]), "big"],
      ["Hook", meta.hookName || meta.hook, "code", null, meta.hookName && meta.hook ? meta.hook : null],
      ["Writes to", meta.hookOut, "code"], ["Architecture", meta.architecture],
      ["Dictionary", meta.dictionary, "code", "wide"]
    ]));
    return sec;
  }

  function histogramSection(meta, unit) {
    var sec = section("histogram", "Activation histogram");
    if (unit.h) {
      var expanded = FA.expandHistogram(unit.h);
      sec.appendChild(FA.histogram(expanded[0], expanded[1], meta.histogramEvery));
    } else {
      sec.appendChild(el("p", "empty", unit.s[2] > 0 ? "No histogram in this store." :
                                                        "No histogram: this unit was never seen in the harvest."));
    }
    return sec;
  }

  function logitSection(meta, shard, unit) {
    var sec = section("logits", "Logit effects");
    if ((unit.lt && unit.lt.length) || (unit.lb && unit.lb.length)) {
      sec.appendChild(el("p", "note", "Tokens whose logits the unit's output direction raises most and lowers most."));
      var tables = el("div", "logits");
      tables.appendChild(logitTable("Promoted", shard, unit.lt || []));
      tables.appendChild(logitTable("Suppressed", shard, unit.lb || []));
      sec.appendChild(tables);
    } else sec.appendChild(el("p", "empty", meta.source === "attn" ? "An attention head has no logit effects: what " +
      "it writes depends on where it looks, not on one direction. See where it looked under each example." :
      "No logit effects in this store for this unit."));
    return sec;
  }

  /* rows: [token index in shard.toks or null, token id, effect]. */
  function logitTable(caption, shard, rows) {
    var table = FA.table(caption, ["Token", "Effect"]);
    var body = el("tbody");
    rows.forEach(function (row) {
      var r = el("tr"), cell = el("td");
      if (row[0] === null) cell.appendChild(el("span", "muted", "id " + row[1]));
      else {
        var chip = el("span", "tok");
        FA.appendToken(chip, shard.toks[row[0]], true);
        cell.appendChild(chip);
      }
      r.appendChild(cell);
      r.appendChild(el("td", null, FA.signed(row[2])));
      body.appendChild(r);
    });
    table.appendChild(body);
    return table;
  }

  /* ---- Examples ---- */
  /* The |activation| that gets the strongest colour: the unit's max (its min, for bottom examples); for a unit
     never positive, the largest |activation| among the examples. */
  function colourScale(unit, kind) {
    var scale = kind === "bottom" ? -unit.s[1] : unit.s[0];
    if (scale > 0) return scale;
    var peak = 0;
    KINDS.forEach(function (k) {
      (unit.ex[k] || []).forEach(function (ex) {
        FA.decodeActivations(ex[4]).forEach(function (v) {
          if (isFinite(v)) peak = Math.max(peak, Math.abs(v));
        });
      });
    });
    return peak > 0 ? peak : 1;
  }

  /* The colour key above the examples. */
  function scaleBar() {
    var bar = el("div", "scale");
    bar.setAttribute("aria-hidden", "true");
    [["muted", "negative"], ["n9"], ["n6"], ["n3"], ["n1"], ["muted", "0"], ["a1"], ["a3"], ["a6"], ["a9"],
     ["muted", "max"], ["hint", "Hover a token, or Tab to an example and use \u2190 \u2192, to see its activation."]]
      .forEach(function (p) { bar.appendChild(el("span", p[0], p[1])); });
    return bar;
  }

  /* One kind of examples: a heading with their count, then the examples (quantiles grouped by interval), or why
     there are none. */
  function exampleSection(meta, shard, unit, kind) {
    var spec = SECTIONS[kind], rows = unit.ex[kind] || [], s = unit.s;
    var sec = section(spec[0], spec[1]);
    sec.className = "examples";
    sec.firstChild.appendChild(el("span", "count", rows.length + " example" + (rows.length === 1 ? "" : "s")));
    if (!rows.length) {
      var noun = meta.noun.toLowerCase(), seen = s[2] > 0;
      var why = !seen ? "No examples: this " + noun + " was never seen in the harvest." :
        s[3] === 0 && kind !== "bottom" ? "No examples: this " + noun + " never fired." : "None in this store.";
      sec.appendChild(el("p", "empty", why));
      return sec;
    }
    sec.appendChild(el("p", "note", spec[2]));
    var scale = colourScale(unit, kind), relativeTo = kind === "bottom" ? "min" : "max";
    if (kind === "quantile") appendIntervals(sec, shard, rows, s[0], scale);
    else rows.forEach(function (ex, i) {
      var block = sec.appendChild(exampleBlock(shard, ex, i + 1, scale, relativeTo));
      if (kind === "top" && FA.ablationEffects) FA.ablationEffects(block, meta, shard, unit, i);  // ablation.js
    });
    return sec;
  }

  /* Quantile examples in a sub-section per interval (rows are sorted by it; ex[5], ex[6] are its bounds). */
  function appendIntervals(sec, shard, rows, max, scale) {
    var start = 0;
    for (var i = 1; i <= rows.length; i++) {
      if (i < rows.length && rows[i][5] === rows[start][5] && rows[i][6] === rows[start][6]) continue;
      var group = el("section", "interval"), h = el("h3", null, fmt(rows[start][5]) + " to " + fmt(rows[start][6]));
      var share = max > 0 ? Math.round((100 * rows[start][5]) / max) + "\u2013" +
        Math.round((100 * rows[start][6]) / max) + "% of max \u00b7 " : "";
      h.appendChild(el("span", "count", share + (i - start) + " example" + (i - start === 1 ? "" : "s")));
      group.appendChild(h);
      for (var j = start; j < i; j++) group.appendChild(exampleBlock(shard, rows[j], j + 1, scale, "max"));
      sec.appendChild(group);
      start = i;
    }
  }

  /* One example (ex: [context, first position shown, peak position, peak value, activations, interval lo, hi]):
     its header line and its tokens, coloured on scale. */
  function exampleBlock(shard, ex, rank, scale, relativeTo) {
    var ctx = shard.ctx[ex[0]], lo = ex[1], acts = FA.decodeActivations(ex[4]);
    var indices = FA.contextTokens(shard, ex[0]), bos = shard.bos;
    var block = el("div", "ex");
    block.appendChild(exampleHead(shard, ex, rank));
    var line = el("div", "ctx");
    if (lo > 0) line.classList.add("cut-l");
    if (lo + acts.length < ctx[3]) line.classList.add("cut-r");
    for (var i = 0; i < acts.length; i++) {
      var p = lo + i, raw = shard.toks[indices[p - ctx[2]]];
      line.appendChild(FA.token(raw, acts[i], scale, relativeTo,
                                { peak: p === ex[2], bos: p === 0 && bos !== null && raw === bos }));
    }
    block.appendChild(line);
    if (FA.attentionRows) FA.attentionRows(block, shard, ex);  // attention.js: where a head looked
    return block;
  }

  /* Rank, peak value, document and where in it the shown tokens start (not counting a BOS token). */
  function exampleHead(shard, ex, rank) {
    var ctx = shard.ctx[ex[0]];
    var head = el("p");
    head.appendChild(el("span", "rank", "#" + rank));
    head.appendChild(el("span", "act", fmt(ex[3])));
    var doc = FA.visible(shard.docs[ctx[0]]);
    var docSpan = el("span", "doc", doc);
    docSpan.title = doc;
    head.appendChild(docSpan);
    head.appendChild(el("span", null, "from token " + (ctx[1] + Math.max(ex[1] - (shard.bos !== null ? 1 : 0), 0))));
    return head;
  }

  /* ---- Data: the unit as JSON, and the SQL for its examples ---- */
  function dataSection(meta, shard, unit) {
    var sec = section("data", "Data");
    var download = el("a", "button", "Download this unit's data (JSON)");
    var blob = new Blob([JSON.stringify(unitJSON(meta, shard, unit), null, 1)], { type: "application/json" });
    download.href = URL.createObjectURL(blob);
    download.download = meta.source.replace(/[^\w.-]+/g, "-") + "-" + meta.layer + "-" + unit.u + ".json";
    sec.appendChild(download);
    sec.appendChild(el("p", "note", "Its examples in the store, with SQL (duckdb STORE.duckdb):"));
    var sql = "SELECT example_kind, rank, max_activation, max_position, activations\nFROM examples\nWHERE model = " +
      sqlString(meta.model) + " AND source = " + sqlString(meta.source) + " AND layer = " + meta.layer +
      " AND unit = " + unit.u + "\nORDER BY example_kind, interval_hi DESC, rank;";
    var pre = el("pre", "sql", sql);
    pre.tabIndex = 0;
    sec.appendChild(pre);
    sec.appendChild(copyButton(pre, sql));
    return sec;
  }

  function sqlString(s) {
    return "'" + String(s).replace(/'/g, "''") + "'";
  }

  /* Copies text to the clipboard where the page may (a secure context), else selects it in pre for Ctrl+C. */
  function copyButton(pre, text) {
    var copy = el("button", "button", "Copy SQL");
    copy.type = "button";
    copy.addEventListener("click", function () {
      var done = function () { copy.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) navigator.clipboard.writeText(text).then(done, selectText);
      else selectText();
      function selectText() {
        var range = document.createRange();
        range.selectNodeContents(pre);
        var sel = window.getSelection();
        sel.removeAllRanges();
        sel.addRange(range);
        copy.textContent = "Selected: press Ctrl+C";
      }
    });
    return copy;
  }

  /* What the page shows of the unit, as the JSON a reader downloads. */
  function unitJSON(meta, shard, unit) {
    var ctxOf = function (ex, kind, rank) {
      var ctx = shard.ctx[ex[0]], acts = FA.decodeActivations(ex[4]), tokens = [];
      var indices = FA.contextTokens(shard, ex[0]);
      for (var i = 0; i < acts.length; i++) tokens.push(shard.toks[indices[ex[1] + i - ctx[2]]]);
      var out = { kind: kind, max_activation: ex[3], max_position: ex[2], first_position: ex[1],
                  document: shard.docs[ctx[0]], start_token: ctx[1], tokens: tokens, activations: acts };
      if (kind === "quantile") out.interval = [ex[5], ex[6]];
      var at = ex[ex.length - 1];  // attributions (attention.js), from the first shown token to the max token
      if (at && typeof at === "object" && !Array.isArray(at) && typeof at.s === "string") {
        out.attribution = typeof at.w === "string" ?
          { kind: "attention", weights: FA.decodeActivations(at.w), shares_of_the_write: FA.decodeActivations(at.s),
            before_shown: { weight: (at.b || [])[0], share: (at.b || [])[1] } } :
          { kind: "direct feature attribution", contributions: FA.decodeActivations(at.s), constant: at.c,
            before_shown: (at.b || [])[1] };
      }
      if (kind === "top" && unit.ab && unit.ab[rank]) {  // ablation.js: each following token's change in log p
        out.ablation_effects = FA.decodeActivations(unit.ab[rank]);
      }
      return out;
    };
    var logits = function (rows) {
      return rows.map(function (r) {
        return { token: r[0] === null ? null : shard.toks[r[0]], token_id: r[1], effect: r[2] };
      });
    };
    var histogram = function (h) {
      var expanded = FA.expandHistogram(h);
      return expanded[0].map(function (b, i) {
        var e = FA.binEdges(b);
        return { bin: b, lo: e[0], hi: e[1] === Infinity ? null : e[1], count: expanded[1][i] };
      });
    };
    var s = unit.s, examples = [];
    KINDS.forEach(function (k) {
      (unit.ex[k] || []).forEach(function (ex, rank) { examples.push(ctxOf(ex, k, rank)); });
    });
    return {
      format: "featureatlas.page-unit", version: 1, model: meta.model, source: meta.source, layer: meta.layer,
      unit: unit.u, note: "What this page shows: examples are windows around their max token; " +
        "`featureatlas export` writes whole contexts.",
      statistics: { max: s[0], min: s[1], n_tokens: s[2], n_firing: s[3], mean: s[4], std: s[5] },
      histogram: unit.h ? histogram(unit.h) : [],
      logits: { top: logits(unit.lt || []), bottom: logits(unit.lb || []) },
      explanations: (unit.x || []).map(function (x) {
        return { text: x[0], score: x[1], author: x[2], score_kind: x[3] };
      }),
      examples: examples
    };
  }

  /* ---- The page ---- */
  /* Draws unit into host, each section listed in the page's table of contents. */
  function renderUnit(host, meta, shard, unit, neighbours) {
    drawHeading(meta, unit.u, neighbours);
    host.textContent = "";
    var toc = el("nav", "toc");
    toc.setAttribute("aria-label", "On this page");
    host.appendChild(toc);
    function listed(id, label) {
      var a = el("a", null, label);
      a.href = "#" + unit.u + "/" + id;
      a.setAttribute("data-target", id);
      toc.appendChild(a);
    }
    function add(sec, label) {
      host.appendChild(sec);
      listed(sec.id, label);
    }
    if (unit.x && unit.x.length) add(explanationSection(unit.x), "Explanation");
    add(statsSection(meta, unit.s), "Statistics");
    var pair = el("div", "pair");
    pair.appendChild(histogramSection(meta, unit));
    pair.appendChild(logitSection(meta, shard, unit));
    host.appendChild(pair);
    listed("histogram", "Histogram");
    listed("logits", "Logit effects");
    add(FA.probeBox(meta, unit), "Try your own text");  // a hypothesis from the examples is one step from a test
    if (FA.steerBox) host.appendChild(FA.steerBox(meta, unit));  // steer.js; lists itself once a server runs it
    if (KINDS.some(function (k) { return unit.ex[k] && unit.ex[k].length; })) host.appendChild(scaleBar());
    KINDS.forEach(function (kind) {
      if (kind !== "bottom" || meta.signed) add(exampleSection(meta, shard, unit, kind), SECTIONS[kind][1]);
    });
    var similar = FA.similarSection ? FA.similarSection(meta, shard, unit) : null;  // similar.js
    if (similar) add(similar, "Similar units");
    add(dataSection(meta, shard, unit), "Data");
  }

  /* The layer's settings, from the host element's data attributes (site_templates/unit.html). */
  function readMeta(host) {
    return {
      model: host.getAttribute("data-model"), source: host.getAttribute("data-source"),
      layer: Number(host.getAttribute("data-layer")), noun: host.getAttribute("data-noun"),
      signed: host.getAttribute("data-signed") === "1", hook: host.getAttribute("data-hook"),
      hookName: host.getAttribute("data-hook-name"), hookOut: host.getAttribute("data-hook-out"),
      architecture: host.getAttribute("data-architecture"), dictionary: host.getAttribute("data-dictionary"),
      histogramEvery: Number(host.getAttribute("data-histogram-every") || 1),
      shardUnits: Number(host.getAttribute("data-shard-units")), path: host.getAttribute("data-path")
    };
  }

  /* Draws the unit of the fragment ("#7", or "#7/quantiles" to scroll to a section) whenever it changes. */
  function unitPage(host) {
    var meta = readMeta(host), current = null;
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
      FA.load(meta.path + "/d/" + shardIndex).then(function (shard) {
        var units = shard.units, i = -1;
        for (var k = 0; k < units.length; k++) if (units[k].u === unitNumber) i = k;
        if (i < 0) {
          message("This layer has no unit " + unitNumber + ".");
          return drawn(null);
        }
        var prev = i > 0 ? units[i - 1].u : shard.prev, next = i + 1 < units.length ? units[i + 1].u : shard.next;
        FA.hideTip();
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

  var host = document.getElementById("unit");
  if (host) unitPage(host);
})(window.FA);
