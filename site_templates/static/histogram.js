/* A unit's activation histogram: the store's log bins of |activation| (store/schema.sql), four per octave,
   drawn as an SVG bar chart with log-scale heights; colours come from the stylesheet's classes (the CSP allows
   no inline style). */
(function (FA) {
  "use strict";
  var el = FA.el;
  var SVG = "http://www.w3.org/2000/svg";
  var HALF = 130, W = 640, H = 210, LEFT = 36, RIGHT = 10, TOP = 12, BOTTOM = 20;
  var PLOT_W = W - LEFT - RIGHT, PLOT_H = H - TOP - BOTTOM, BASE = TOP + PLOT_H;

  function svg(tag, attrs) {
    var node = document.createElementNS(SVG, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  /* The [lo, hi) range of |activation| of bin b (its sign is the activation's). */
  function binEdges(b) {
    var m = Math.abs(b);
    if (m === 0) return [0, 0];
    if (m === 1) return [0, Math.pow(2, -16)];
    if (m === HALF) return [Math.pow(2, 16), Infinity];
    function edge(i) { return Math.pow(2, Math.floor((i - 2) / 4) - 16) * (1 + ((i - 2) % 4) / 4); }
    return [edge(m), edge(m + 1)];
  }
  FA.binEdges = binEdges;

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

  /* A shard's histogram, [first bin, counts from there on], as the non-empty bins and their counts. */
  FA.expandHistogram = function (h) {
    var bins = [], counts = [];
    h[1].forEach(function (c, i) {
      if (c > 0) {
        bins.push(h[0] + i);
        counts.push(c);
      }
    });
    return [bins, counts];
  };

  /* The x axis: a slot per bin from the lowest to the highest |bin| present, mirrored left of a zero slot when
     any bin is negative, at least 24 slots wide and centred. */
  function xScale(bins) {
    var mags = bins.filter(function (b) { return b !== 0; }).map(Math.abs);
    var low = mags.length ? Math.min.apply(null, mags) : 1, high = mags.length ? Math.max.apply(null, mags) : 1;
    var negative = bins[0] < 0, sideN = high - low + 1, zero = negative ? sideN : 0;
    var nSlots = zero + 1 + sideN, slot = PLOT_W / Math.max(nSlots, 24), left = LEFT + (PLOT_W - nSlots * slot) / 2;
    return {
      low: low, high: high, negative: negative, zero: zero, slot: slot, left: left,
      slotOf: function (b) { return b === 0 ? zero : b > 0 ? zero + 1 + b - low : high + b; },
      valueX: function (v) {  // where an activation value falls, between its bin's edges
        var a = Math.abs(v), octave = Math.floor(Math.log2(a));
        var pos = 2 + 4 * (octave + 16) + 4 * (a / Math.pow(2, octave) - 1);
        return left + (v > 0 ? zero + 1 + pos - low : high + 1 - pos) * slot;
      }
    };
  }

  /* The y axis: height log10(1 + count), up to the power of ten above the largest count. */
  function yScale(counts) {
    var maxCount = Math.max.apply(null, counts);
    var decades = Math.max(1, Math.ceil(Math.log10(Math.max(maxCount, 1)) - 1e-9));
    return { decades: decades, unitH: PLOT_H / Math.log10(1 + Math.pow(10, decades)) };
  }

  /* Gridlines and labels at powers of ten (every other one past six). */
  function drawGrid(chart, y) {
    var grid = "", ylab = svg("g", { "class": "ylab" });
    for (var k = 0; k <= y.decades; k += y.decades <= 6 ? 1 : 2) {
      var top = BASE - y.unitH * Math.log10(1 + Math.pow(10, k));
      grid += "M" + LEFT + " " + top.toFixed(1) + "H" + (W - RIGHT);
      var label = svg("text", { x: LEFT - 4, y: (top + 3).toFixed(1) });
      label.textContent = short(Math.pow(10, k));
      ylab.appendChild(label);
    }
    chart.appendChild(svg("path", { "class": "grid", d: grid }));
    chart.appendChild(ylab);
  }

  /* One bar per bin, titled with its range and count, grouped by sign for the stylesheet's colours. */
  function drawBars(chart, x, y, bins, counts) {
    var matrix = "matrix(" + x.slot.toFixed(3) + " 0 0 -1 " + x.left.toFixed(1) + " " + BASE + ")";
    var bars = svg("g", { transform: matrix });
    var groups = { hn: svg("g", { "class": "hn" }), hz: svg("g", { "class": "hz" }), hp: svg("g", { "class": "hp" }) };
    bins.forEach(function (b, i) {
      var rect = svg("rect", { x: x.slotOf(b), width: ".86",
                               height: Math.max(Math.round(y.unitH * Math.log10(1 + counts[i])), 1) });
      var title = svg("title");
      title.textContent = binLabel(b) + ": " + FA.thousands(counts[i]);
      rect.appendChild(title);
      groups[b < 0 ? "hn" : b === 0 ? "hz" : "hp"].appendChild(rect);
    });
    ["hn", "hz", "hp"].forEach(function (g) { if (groups[g].childNodes.length) bars.appendChild(groups[g]); });
    chart.appendChild(bars);
  }

  /* Ticks at round activations in the drawn range (powers of ten, or 1-2-5 steps in a short range), mirrored
     when negative, at least 40 units apart, and always one at 0: [[x, label], ...]. */
  function xTicks(x) {
    var lo = Math.max(binEdges(x.low)[0], Math.pow(2, -16)), hi = Math.min(binEdges(x.high)[1], Math.pow(2, 16));
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
      ticks.push([x.valueX(v), short(v)]);
      if (x.negative) ticks.push([x.valueX(-v), "-" + short(v)]);
    });
    ticks.sort(function (a, b) { return a[0] - b[0]; });
    var kept = [[x.left + (x.zero + 0.5) * x.slot, "0"]];
    ticks.forEach(function (t) {
      var clear = kept.every(function (q) { return Math.abs(t[0] - q[0]) >= 40; });
      if (clear && t[0] >= LEFT && t[0] <= W - RIGHT / 2) kept.push(t);
    });
    return kept;
  }

  function drawXAxis(chart, ticks) {
    var marks = "M" + LEFT + " " + BASE + "H" + (W - RIGHT), xlab = svg("g", { "class": "xlab" });
    ticks.forEach(function (t) {
      marks += "M" + t[0].toFixed(1) + " " + BASE + "v3";
      var label = svg("text", { x: t[0].toFixed(1), y: H - 5 });
      label.textContent = t[1];
      xlab.appendChild(label);
    });
    chart.appendChild(svg("path", { "class": "axis", d: marks }));
    chart.appendChild(xlab);
  }

  function caption(counts, every, negative) {
    var total = counts.reduce(function (a, c) { return a + c; }, 0);
    var node = el("figcaption", null, FA.thousands(total) + " tokens counted" +
      (every > 1 ? " (every token of 1 context in " + every + ")" : "") + ". Bars are bins of |activation|, four " +
      "per octave; heights are log-scale counts." + (negative ? " Negative values are mirrored left of 0." : "") +
      " Hover a bar for its range and count.");
    node.id = "hist-cap";
    return node;
  }

  /* The histogram figure of the non-empty bins and their counts, counted on 1 context in every. */
  FA.histogram = function (bins, counts, every) {
    var x = xScale(bins), y = yScale(counts);
    var figure = el("figure", "hist");
    var chart = svg("svg", { viewBox: "0 0 " + W + " " + H, "aria-labelledby": "hist-cap" });
    drawGrid(chart, y);
    drawBars(chart, x, y, bins, counts);
    drawXAxis(chart, xTicks(x));
    figure.appendChild(chart);
    figure.appendChild(caption(counts, every, x.negative));
    return figure;
  };
})(window.FA);
