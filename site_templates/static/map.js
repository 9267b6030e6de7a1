/* Map pages (build/map_page.py): every unit of a layer as a point on one canvas, placed by harvest/layout.py so
   that units whose directions are alike lie close. Drag or arrow keys pan, the wheel, a pinch or + - zoom; the
   point under the pointer shows its unit's card and a click opens the unit's page; colour by firing frequency or
   max activation (by rank, so a long tail does not wash the rest out) or by whether an explanation exists.
   map.html#unit=N rings unit N (a unit page links here so). Each frame paints every point into one ImageData in
   a single pass (a few milliseconds for 100,000 points) and the point under the pointer is found through a grid
   of cells, so panning and zooming do not stutter. A plain script on window.FA (core.js: FA.load, FA.el and the
   number formats); explanations, untrusted, only ever go through textContent. */
(function (FA) {
  "use strict";
  var canvas = document.getElementById("map");
  if (!canvas || !FA || !canvas.getContext) return;
  var frame = document.getElementById("map-frame"), card = document.getElementById("map-card");
  var chosenBox = document.getElementById("map-selected"), legend = document.getElementById("map-legend");
  var colourBy = document.getElementById("map-colour"), findForm = document.getElementById("map-find");
  var findInput = document.getElementById("map-unit"), reset = document.getElementById("map-reset");
  var noun = canvas.getAttribute("data-noun") || "Unit";
  var ctx = canvas.getContext("2d");
  var HIT = 8; // CSS pixels from a point's centre that still reach it
  var VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 73, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
                 [53, 183, 121], [110, 206, 88], [181, 222, 43], [253, 231, 37]];
  var NO_VALUE = [150, 156, 163], EXPLAINED = [232, 112, 26];

  var n = 0, units, xs, ys, maxes, freqs, texts, rowOf = {}, width = 1, height = 1;
  var colours, order, cells, cellStart, G = 1;
  var view = { cx: 0.5, cy: 0.5, s: 1 }, fitScale = 1, dpr = 1, image = null, pixels = null, queued = false;
  var hover = -1, chosen = -1, pointers = {}, drag = null;

  function packed(rgb) { // ImageData's bytes read as one little-endian 32-bit word: A B G R
    return ((255 << 24) | (rgb[2] << 16) | (rgb[1] << 8) | rgb[0]) >>> 0;
  }

  function ramp(t) {
    var p = Math.max(0, Math.min(1, t)) * (VIRIDIS.length - 1), i = Math.min(VIRIDIS.length - 2, Math.floor(p));
    var a = VIRIDIS[i], b = VIRIDIS[i + 1], u = p - i;
    return [0, 1, 2].map(function (k) { return Math.round(a[k] + (b[k] - a[k]) * u); });
  }

  function number(v) {
    return typeof v === "number" && isFinite(v) ? v : null;
  }

  /* ---- Data ---- */
  function prepare(data) {
    n = data.u.length;
    var span = Math.max(Number(data.span[0]) || 0, Number(data.span[1]) || 0, 1);
    units = new Int32Array(n);
    xs = new Float64Array(n);
    ys = new Float64Array(n);
    maxes = data.max;
    freqs = data.f;
    texts = new Array(n);
    for (var i = 0; i < n; i++) {
      units[i] = data.u[i];
      xs[i] = Number(data.x[i]) / span;
      ys[i] = Number(data.y[i]) / span;
      rowOf[units[i]] = i;
    }
    (data.e || []).forEach(function (pair) {
      if (pair[0] >= 0 && pair[0] < n) texts[pair[0]] = String(pair[1]);
    });
    width = Math.max(Number(data.span[0]) / span, 1e-9);
    height = Math.max(Number(data.span[1]) / span, 1e-9);
    buildGrid();
  }

  /* Points sorted into G x G cells over the unit square (counting sort): cellStart[c] .. cellStart[c + 1]. */
  function buildGrid() {
    G = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(n / 2))));
    var cellOf = new Int32Array(n), counts = new Int32Array(G * G + 1);
    for (var i = 0; i < n; i++) {
      cellOf[i] = cellIndex(ys[i]) * G + cellIndex(xs[i]);
      counts[cellOf[i] + 1]++;
    }
    for (var c = 0; c < G * G; c++) counts[c + 1] += counts[c];
    cellStart = counts;
    cells = new Int32Array(n);
    var next = counts.slice(0, G * G);
    for (i = 0; i < n; i++) cells[next[cellOf[i]]++] = i;
  }

  function cellIndex(v) {
    return Math.max(0, Math.min(G - 1, Math.floor(v * G)));
  }

  /* The point nearest world (wx, wy) within radius (world units), or -1. */
  function nearest(wx, wy, radius) {
    var best = -1, bestD = radius * radius;
    var x0 = cellIndex(wx - radius), x1 = cellIndex(wx + radius), y0 = cellIndex(wy - radius), y1 = cellIndex(wy + radius);
    for (var cy = y0; cy <= y1; cy++) {
      for (var cx = x0; cx <= x1; cx++) {
        var c = cy * G + cx;
        for (var k = cellStart[c]; k < cellStart[c + 1]; k++) {
          var i = cells[k], dx = xs[i] - wx, dy = ys[i] - wy, d = dx * dx + dy * dy;
          if (d < bestD || (d === bestD && i < best)) {
            best = i;
            bestD = d;
          }
        }
      }
    }
    return best;
  }

  /* ---- Colour ---- */
  function recolour() {
    var mode = colourBy ? colourBy.value : "f";
    colours = new Uint32Array(n);
    var key = new Float64Array(n);
    legend.textContent = "";
    if (mode === "e") {
      var explained = 0;
      for (var i = 0; i < n; i++) {
        var has = texts[i] !== undefined;
        colours[i] = packed(has ? EXPLAINED : NO_VALUE);
        key[i] = has ? 1 : 0;
        if (has) explained++;
      }
      legend.appendChild(swatch(EXPLAINED));
      legend.appendChild(FA.el("span", null, "explained (" + FA.thousands(explained) + ")"));
      legend.appendChild(swatch(NO_VALUE));
      legend.appendChild(FA.el("span", null, "not (" + FA.thousands(n - explained) + ")"));
    } else {
      var values = mode === "max" ? maxes : freqs, known = [];
      for (i = 0; i < n; i++) {
        if (number(values[i]) !== null) known.push(i);
        else {
          colours[i] = packed(NO_VALUE);
          key[i] = -1;
        }
      }
      known.sort(function (a, b) { return values[a] - values[b] || a - b; });
      known.forEach(function (row, rank) {
        var t = known.length > 1 ? rank / (known.length - 1) : 1;
        colours[row] = packed(ramp(t));
        key[row] = t;
      });
      if (known.length) {
        var show = mode === "max" ? function (v) { return FA.fmt(v, 3); } : FA.percent;
        legend.appendChild(FA.el("span", null, show(values[known[0]])));
        legend.appendChild(gradient());
        legend.appendChild(FA.el("span", null, show(values[known[known.length - 1]])));
        legend.appendChild(FA.el("span", "muted", "(by rank; median " + show(values[known[known.length >> 1]]) + ")"));
      }
    }
    order = new Int32Array(n); // drawn low to high: the brightest (or the explained) on top
    var rows = [];
    for (i = 0; i < n; i++) rows.push(i);
    rows.sort(function (a, b) { return key[a] - key[b] || a - b; });
    order.set(rows);
    redraw();
  }

  function swatch(rgb) {
    var s = FA.el("span", "map-swatch");
    s.style.background = "rgb(" + rgb.join(",") + ")";
    return s;
  }

  function gradient() {
    var g = document.createElement("canvas");
    g.width = 96;
    g.height = 1;
    g.className = "map-gradient";
    var c = g.getContext("2d");
    for (var x = 0; x < g.width; x++) {
      c.fillStyle = "rgb(" + ramp(x / (g.width - 1)).join(",") + ")";
      c.fillRect(x, 0, 1, 1);
    }
    return g;
  }

  /* ---- View ---- */
  function size() {
    dpr = window.devicePixelRatio || 1;
    var w = Math.max(1, Math.round(canvas.clientWidth * dpr)), h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w || canvas.height !== h) {
      var oldFit = fitScale;
      canvas.width = w;
      canvas.height = h;
      fitScale = 0.92 * Math.min(canvas.clientWidth / width, canvas.clientHeight / height);
      view.s *= fitScale / oldFit;
    }
  }

  function fit() {
    fitScale = 0.92 * Math.min(canvas.clientWidth / width, canvas.clientHeight / height);
    view = { cx: width / 2, cy: height / 2, s: fitScale };
  }

  /* CSS pixels in the canvas <-> world coordinates (y up). */
  function toScreen(i) {
    return [(xs[i] - view.cx) * view.s + canvas.clientWidth / 2, canvas.clientHeight / 2 - (ys[i] - view.cy) * view.s];
  }

  function toWorld(px, py) {
    return [view.cx + (px - canvas.clientWidth / 2) / view.s, view.cy - (py - canvas.clientHeight / 2) / view.s];
  }

  function zoomAt(px, py, factor) {
    var s = Math.max(fitScale * 0.5, Math.min(fitScale * 4000, view.s * factor));
    var w = toWorld(px, py);
    view.s = s;
    view.cx = w[0] - (px - canvas.clientWidth / 2) / s;
    view.cy = w[1] + (py - canvas.clientHeight / 2) / s;
    redraw();
  }

  function pan(dx, dy) { // CSS pixels
    view.cx -= dx / view.s;
    view.cy += dy / view.s;
    redraw();
  }

  function redraw() {
    if (!queued) {
      queued = true;
      window.requestAnimationFrame(paint);
    }
  }

  /* Every point in one pass into one ImageData, then the rings of the chosen and the hovered point. */
  function paint() {
    queued = false;
    size();
    var W = canvas.width, H = canvas.height;
    if (!image || image.width !== W || image.height !== H) {
      image = ctx.createImageData(W, H);
      pixels = new Uint32Array(image.data.buffer);
    }
    pixels.fill(0);
    var zoom = view.s / fitScale, base = n < 2000 ? 5 : n < 20000 ? 3 : 2;
    var r = Math.max(1, Math.round(Math.min(base + Math.log2(Math.max(zoom, 1)), 10) * dpr)), half = r >> 1;
    var k = view.s * dpr, ox = W / 2 - view.cx * k - half, oy = H / 2 + view.cy * k - half, drawn = 0;
    for (var j = 0; j < n; j++) {
      var i = order[j], px = Math.round(xs[i] * k + ox), py = Math.round(oy - ys[i] * k);
      if (px <= -r || py <= -r || px >= W || py >= H) continue;
      drawn++;
      var c = colours[i], x0 = px < 0 ? 0 : px, x1 = px + r > W ? W : px + r, y1 = py + r > H ? H : py + r;
      for (var y = py < 0 ? 0 : py; y < y1; y++) pixels.fill(c, y * W + x0, y * W + x1);
    }
    ctx.putImageData(image, 0, 0);
    ring(chosen, r / dpr / 2 + 6, 3, true);
    ring(hover, r / dpr / 2 + 4, 2, false);
    canvas.setAttribute("data-points", String(drawn));
  }

  function ring(i, radius, line, accent) {
    if (i < 0) return;
    var p = toScreen(i), style = getComputedStyle(canvas);
    ctx.save();
    ctx.scale(dpr, dpr);
    ctx.beginPath();
    ctx.arc(p[0], p[1], radius, 0, 2 * Math.PI);
    ctx.lineWidth = line;
    ctx.strokeStyle = accent ? style.getPropertyValue("--accent").trim() || "#c05000" : style.color;
    ctx.stroke();
    ctx.restore();
  }

  /* ---- Cards ---- */
  function fill(box, i, link) {
    box.textContent = "";
    var title = FA.el("p", "map-card-title");
    if (link) {
      var a = FA.el("a", null, "Open " + noun + " " + units[i]);
      a.href = "unit.html#" + units[i];
      title.appendChild(a);
    } else title.textContent = noun + " " + units[i];
    box.appendChild(title);
    var f = number(freqs[i]);
    box.appendChild(FA.el("p", "map-card-stats", "max " + FA.fmt(number(maxes[i]), 4) + " \u00b7 fires " +
      FA.percent(f) + (f === null ? "" : " (" + FA.oneIn(f) + ")")));
    if (texts[i] !== undefined) box.appendChild(FA.el("p", "expl", texts[i]));
  }

  function showCard(i, px, py) {
    if (i < 0) {
      card.hidden = true;
      return;
    }
    fill(card, i, false);
    card.appendChild(FA.el("p", "muted", "click to open"));
    card.hidden = false;
    var left = px + 14, top = py + 14;
    if (left + card.offsetWidth > frame.clientWidth) left = Math.max(0, px - 14 - card.offsetWidth);
    if (top + card.offsetHeight > frame.clientHeight) top = Math.max(0, py - 14 - card.offsetHeight);
    card.style.left = left + "px";
    card.style.top = top + "px";
  }

  function setHover(i, px, py) {
    if (i !== hover) {
      hover = i;
      canvas.style.cursor = i >= 0 ? "pointer" : "";
      redraw();
    }
    showCard(i, px, py);
  }

  function open(i) {
    if (i >= 0) window.location.href = "unit.html#" + units[i];
  }

  /* map.html#unit=N: ring unit N, bring it into view, and describe it below the map with a link to it. */
  function route() {
    var match = /^#unit=(\d+)$/.exec(window.location.hash);
    if (!match) {
      chosen = -1;
      chosenBox.textContent = "";
      canvas.removeAttribute("data-selected");
      return redraw();
    }
    var unit = Number(match[1]), i = rowOf.hasOwnProperty(unit) ? rowOf[unit] : -1;
    chosen = i;
    if (i < 0) {
      chosenBox.textContent = "";
      chosenBox.appendChild(FA.el("p", "empty", "This map has no " + noun.toLowerCase() + " " + unit + "."));
      canvas.removeAttribute("data-selected");
      return redraw();
    }
    canvas.setAttribute("data-selected", String(unit));
    if (findInput) findInput.value = String(unit);
    fill(chosenBox, i, true);
    var p = toScreen(i);
    if (p[0] < 0 || p[1] < 0 || p[0] > canvas.clientWidth || p[1] > canvas.clientHeight) {
      view.cx = xs[i];
      view.cy = ys[i];
    }
    redraw();
  }

  /* ---- Input ---- */
  function local(event) {
    var box = canvas.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  }

  function hitAt(p) {
    var w = toWorld(p[0], p[1]);
    return nearest(w[0], w[1], HIT / view.s);
  }

  function listen() {
    canvas.addEventListener("pointerdown", function (event) {
      var p = local(event);
      pointers[event.pointerId] = p;
      canvas.setPointerCapture(event.pointerId);
      var ids = Object.keys(pointers);
      if (ids.length === 1) drag = { start: p, last: p, moved: false };
      else if (ids.length === 2) {
        var a = pointers[ids[0]], b = pointers[ids[1]];
        drag = { pinch: Math.hypot(a[0] - b[0], a[1] - b[1]) || 1, moved: true };
      }
    });
    canvas.addEventListener("pointermove", function (event) {
      var p = local(event);
      if (!(event.pointerId in pointers)) return setHover(hitAt(p), p[0], p[1]);
      pointers[event.pointerId] = p;
      var ids = Object.keys(pointers);
      if (ids.length >= 2 && drag && drag.pinch) {
        var a = pointers[ids[0]], b = pointers[ids[1]], d = Math.hypot(a[0] - b[0], a[1] - b[1]) || 1;
        zoomAt((a[0] + b[0]) / 2, (a[1] + b[1]) / 2, d / drag.pinch);
        drag.pinch = d;
      } else if (drag && !drag.pinch) {
        if (Math.hypot(p[0] - drag.start[0], p[1] - drag.start[1]) > 4) drag.moved = true;
        if (drag.moved) {
          pan(p[0] - drag.last[0], p[1] - drag.last[1]);
          setHover(-1);
        }
        drag.last = p;
      }
    });
    function release(event) {
      var p = local(event), click = drag && !drag.moved && event.type === "pointerup";
      delete pointers[event.pointerId];
      if (!Object.keys(pointers).length) drag = null;
      if (click) open(hitAt(p));
    }
    canvas.addEventListener("pointerup", release);
    canvas.addEventListener("pointercancel", release);
    canvas.addEventListener("pointerleave", function () {
      if (!Object.keys(pointers).length) setHover(-1);
    });
    canvas.addEventListener("wheel", function (event) {
      event.preventDefault();
      var p = local(event), delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
      zoomAt(p[0], p[1], Math.exp(-delta * 0.0015));
      setHover(-1);
    }, { passive: false });
    canvas.addEventListener("keydown", function (event) {
      if (event.altKey || event.ctrlKey || event.metaKey) return;
      var step = 0.1 * Math.min(canvas.clientWidth, canvas.clientHeight), cw = canvas.clientWidth / 2,
        ch = canvas.clientHeight / 2;
      var actions = {
        ArrowLeft: function () { pan(step, 0); }, ArrowRight: function () { pan(-step, 0); },
        ArrowUp: function () { pan(0, step); }, ArrowDown: function () { pan(0, -step); },
        "+": function () { zoomAt(cw, ch, 1.5); }, "=": function () { zoomAt(cw, ch, 1.5); },
        "-": function () { zoomAt(cw, ch, 1 / 1.5); }, "0": function () { fit(); redraw(); },
        Enter: function () { open(chosen >= 0 ? chosen : hover); }
      };
      if (actions[event.key]) {
        event.preventDefault();
        event.stopPropagation();
        actions[event.key]();
      }
    });
    if (colourBy) colourBy.addEventListener("change", recolour);
    if (reset) reset.addEventListener("click", function () { fit(); redraw(); });
    if (findForm) findForm.addEventListener("submit", function (event) {
      event.preventDefault();
      var v = findInput.value.trim();
      if (/^\d+$/.test(v)) {
        if (window.location.hash === "#unit=" + v) route();
        else window.location.hash = "unit=" + v;
      }
    });
    window.addEventListener("hashchange", route);
    window.addEventListener("resize", redraw);
  }

  /* Where unit u is drawn, in the page's client coordinates, or null: for scripts driving the page (tests). */
  FA.mapPoint = function (u) {
    if (!rowOf.hasOwnProperty(u)) return null;
    var p = toScreen(rowOf[u]), box = canvas.getBoundingClientRect();
    return { x: box.left + p[0], y: box.top + p[1] };
  };

  FA.load(canvas.getAttribute("data-path") + "/points").then(function (data) {
    prepare(data);
    size();
    fit();
    listen();
    recolour();
    route();
    window.requestAnimationFrame(function () {
      document.dispatchEvent(new CustomEvent("featureatlas:map", { detail: n }));
    });
  }, function (error) {
    chosenBox.textContent = "";
    chosenBox.appendChild(FA.el("p", "empty", "The map's points could not be loaded (" + error.message + ")."));
  });
})(window.FA);
