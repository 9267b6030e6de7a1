/* featureatlas: token tooltips and keyboard moves on unit pages, sort and filter on layer pages.
   Loaded from the site itself ('self'), no inline code, no network. Untrusted text only ever goes
   through textContent, never innerHTML. */
(function () {
  "use strict";
  document.documentElement.classList.add("js");

  var GLYPHS = { "\u00b7": " ", "\u21e5": "\t" };
  var ESCAPE_WIDTH = { x: 2, u: 4, U: 8 };
  var INVISIBLE = /[\u00ad\u061c\u180e\u200b\u200e\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff\ufff9-\ufffb]/;

  /* The raw token behind a token element: text as is, <i> contents decoded (the inverse of build/tokens.py). */
  function decodeGlyphs(text) {
    var chars = Array.from(text), out = "";
    for (var i = 0; i < chars.length; i++) {
      var c = chars[i], next = chars[i + 1];
      if (c === "\u23ce") {
        out += "\n";
        if (next === "\n") i++;
      } else if (GLYPHS[c] !== undefined) {
        out += GLYPHS[c];
      } else if (c === "\\" && next === "r") {
        out += "\r";
        i++;
      } else if (c === "\\" && ESCAPE_WIDTH[next]) {
        var width = ESCAPE_WIDTH[next];
        out += String.fromCodePoint(parseInt(chars.slice(i + 2, i + 2 + width).join(""), 16));
        i += 1 + width;
      } else {
        out += c;
      }
    }
    return out;
  }

  function rawToken(token) {
    var out = "";
    token.childNodes.forEach(function (node) {
      out += node.nodeType === 1 ? decodeGlyphs(node.textContent) : node.nodeValue;
    });
    return out;
  }

  function hex(code, width) {
    return code.toString(16).padStart(width, "0");
  }

  /* Like Python's repr: quotes, and whitespace, controls and invisible characters escaped. */
  function repr(s) {
    var out = "'";
    Array.from(s).forEach(function (c) {
      var code = c.codePointAt(0);
      if (c === "\\") out += "\\\\";
      else if (c === "'") out += "\\'";
      else if (c === "\n") out += "\\n";
      else if (c === "\t") out += "\\t";
      else if (c === "\r") out += "\\r";
      else if (code < 0x20 || (code >= 0x7f && code <= 0x9f)) out += "\\x" + hex(code, 2);
      else if (INVISIBLE.test(c)) out += "\\u" + hex(code, 4);
      else if (code >= 0xe0000 && code <= 0xe007f) out += "\\U" + hex(code, 8);
      else out += c;
    });
    return out + "'";
  }

  function formatValue(v) {
    if (typeof v !== "number" || isNaN(v)) return "n/a";
    return String(parseFloat(v.toPrecision(3)));
  }

  /* ---- Unit pages: tooltip on hover and on keyboard focus ---- */

  /* data-acts holds three base64url digits per token (the inverse of build/numbers.py): a code
     (e + 50) * 2000 + (m + 1000) for the value m * 10^e rounded to three significant digits, or one of three
     codes above those for NaN, +inf and -inf. */
  var ACT_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  var ACT_SPECIAL = { 262000: NaN, 262001: Infinity, 262002: -Infinity };
  function decodeActivation(raw, i) {
    var code = 0;
    for (var j = i; j < i + 3; j++) {
      var digit = ACT_DIGITS.indexOf(raw.charAt(j));
      if (digit < 0) return NaN;
      code = code * 64 + digit;
    }
    if (code >= 262000) return code in ACT_SPECIAL ? ACT_SPECIAL[code] : NaN;
    var mantissa = (code % 2000) - 1000, exponent = Math.floor(code / 2000) - 50;
    return Number(mantissa + "e" + exponent);
  }

  var actsCache = new WeakMap();
  function activations(ctx) {
    var acts = actsCache.get(ctx);
    if (!acts) {
      var raw = ctx.getAttribute("data-acts") || "";
      acts = [];
      for (var i = 0; i + 3 <= raw.length; i += 3) acts.push(decodeActivation(raw, i));
      actsCache.set(ctx, acts);
    }
    return acts;
  }

  function tokenOf(node) {
    var el = node && node.nodeType === 1 ? node : node && node.parentElement;
    var token = el && el.closest ? el.closest(".ctx > b") : null;
    return token;
  }

  var tip = null, shown = null;
  function ensureTip() {
    if (!tip) {
      tip = document.createElement("div");
      tip.id = "tip";
      tip.setAttribute("role", "tooltip");
      tip.hidden = true;
      document.body.appendChild(tip);
    }
    return tip;
  }

  function show(token) {
    var ctx = token.parentElement;
    var index = Array.prototype.indexOf.call(ctx.children, token);
    var value = activations(ctx)[index];
    var box = ensureTip();
    // Colours, and so the percentage, are relative to the unit's max; in bottom examples to its min.
    var holder = ctx.closest(".examples");
    var relativeTo = holder && holder.hasAttribute("data-min") ? "min" : "max";
    var scale = holder ? parseFloat(holder.getAttribute("data-" + relativeTo)) : NaN;

    box.textContent = "";
    var tok = document.createElement("div");
    tok.className = "tok";
    tok.textContent = repr(rawToken(token));
    var val = document.createElement("div");
    val.className = "val";
    var text = "activation " + formatValue(value);
    if ((relativeTo === "max" ? scale > 0 : scale < 0) && typeof value === "number" && !isNaN(value)) {
      text += " \u00b7 " + Math.round((100 * value) / scale) + "% of " + relativeTo;
    }
    val.textContent = text;
    box.appendChild(tok);
    box.appendChild(val);
    box.hidden = false;

    if (shown && shown !== token) shown.classList.remove("on");
    shown = token;
    token.classList.add("on");
    token.setAttribute("aria-describedby", "tip");

    var r = token.getBoundingClientRect();
    var width = box.offsetWidth, height = box.offsetHeight;
    var left = Math.min(Math.max(4, r.left), document.documentElement.clientWidth - width - 4);
    var top = r.bottom + 6;
    if (top + height > window.innerHeight && r.top - height - 6 > 0) top = r.top - height - 6;
    box.style.left = left + window.scrollX + "px";
    box.style.top = top + window.scrollY + "px";
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

  function moveTo(from, to) {
    if (!to) return;
    if (!to.hasAttribute("tabindex")) to.tabIndex = -1;
    to.focus();
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    var token = tokenOf(event.target);
    if (token) {
      var ctx = token.parentElement;
      var moves = {
        ArrowRight: token.nextElementSibling,
        ArrowLeft: token.previousElementSibling,
        Home: ctx.firstElementChild,
        End: ctx.lastElementChild
      };
      if (event.key in moves) {
        event.preventDefault();
        moveTo(token, moves[event.key]);
        return;
      }
      if (event.key === "Escape") {
        hide();
        return;
      }
    }
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || event.shiftKey) return;
    var rel = { p: "prev", n: "next", u: "up" }[event.key];
    if (rel) {
      var link = document.querySelector(".pager a[rel='" + rel + "']");
      if (link) link.click();
    }
  });

  /* ---- Layer pages: filter and sort the unit table ---- */
  function setUpTable(table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var filter = document.getElementById("filter");
    var count = document.getElementById("shown");
    var texts = null;

    if (filter) {
      // A number finds that unit; anything else searches the snippets' text.
      filter.addEventListener("input", function () {
        var q = filter.value.trim().toLowerCase();
        var byUnit = /^\d+$/.test(q);
        if (!texts) texts = rows.map(function (row) { return row.cells[row.cells.length - 1].textContent.toLowerCase(); });
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

  var table = document.getElementById("units");
  if (table) setUpTable(table);
})();
