/* Tokens: untrusted token strings drawn visibly (hidden characters as glyphs), the compact number and token
   encodings of the data shards decoded, contexts drawn as shaded tokens, and the tooltip that shows a token's
   raw text and activation on hover and keyboard focus. Used by unit pages (examples, probe) and search. */
(function (FA) {
  "use strict";
  var el = FA.el, fmt = FA.fmt;

  /* ---- Visible text ---- */
  function hex(code, width) {
    return code.toString(16).padStart(width, "0");
  }
  /* Hidden and layout-changing characters, drawn as glyphs (the same sets as featureatlas/text.py). */
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
  FA.appendToken = appendToken;

  /* Any untrusted one-line string with hidden characters as glyphs. */
  FA.visible = function (text) {
    return String(text).replace(HIDDEN_CHAR, glyph);
  };

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
  FA.repr = repr;

  /* ---- Shard encodings ---- */
  /* Three base64url digits per activation (the inverse of build/numbers.py): a code (e + 50) * 2000 + (m + 1000)
     for the value m * 10^e rounded to three significant digits, or one of three codes above those for NaN,
     +inf and -inf. */
  var ACT_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  var ACT_SPECIAL = { 262000: NaN, 262001: Infinity, 262002: -Infinity };
  FA.decodeActivations = function (raw) {
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
  };

  /* A shard context's token indices: shard.tw base64url digits each (build/shards.py), decoded once. */
  var contextCache = new WeakMap();
  FA.contextTokens = function (shard, c) {
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
  };

  /* ---- Drawn tokens ---- */
  var BUCKETS = 9;  // a value's shade is round(value / scale * 9), clamped to -9..9 (a1..a9, n1..n9)
  var tokenInfo = new WeakMap(); // token element -> {raw, value, scale, relativeTo}

  function shade(node, value, scale) {
    var bucket = Math.round((value / scale) * BUCKETS);
    if (isNaN(bucket)) bucket = 0;
    bucket = Math.max(-BUCKETS, Math.min(BUCKETS, bucket));
    if (bucket > 0) node.classList.add("a" + bucket);
    else if (bucket < 0) node.classList.add("n" + -bucket);
  }

  /* One token of a context line (a <b> in a .ctx), shaded by value on scale, the |activation| that gets the
     strongest colour. flags.peak outlines it and makes it focusable (the max or min token); flags.bos greys it.
     Its tooltip gives the value as a share of the unit's relativeTo ("max", or "min" for bottom examples). */
  FA.token = function (raw, value, scale, relativeTo, flags) {
    var b = el("b");
    shade(b, value, scale);
    if (flags.peak) {
      b.classList.add("m");
      b.tabIndex = 0;
    }
    if (flags.bos) b.classList.add("bos");
    appendToken(b, raw, false);
    tokenInfo.set(b, { raw: raw, value: value, scale: relativeTo === "min" ? -scale : scale, relativeTo: relativeTo });
    return b;
  };

  /* ---- Tooltip on hover and keyboard focus ---- */
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
    if (info.note) tip.appendChild(el("div", "val", info.note));
    tip.hidden = false;
    if (shown && shown !== token) shown.classList.remove("on");
    shown = token;
    token.classList.add("on");
    token.setAttribute("aria-describedby", "tip");
    place(tip, token);
  }

  /* Below the token, or above it when there is no room below; never past the viewport's sides. */
  function place(box, token) {
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
  FA.hideTip = hide;

  /* A line more for a drawn token's tooltip (ablation.js: what removing the unit at the max does to it). */
  FA.tokenNote = function (token, text) {
    var info = tokenInfo.get(token);
    if (!info) return;
    info.note = text;
    if (shown === token) show(token);
  };

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

  /* Keys on a focused token (called by keys.js): arrows, Home and End move along its context, Escape hides the
     tooltip. True when the key was handled here. */
  FA.tokenKey = function (event) {
    var token = tokenOf(event.target);
    if (!token) return false;
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
      return true;
    }
    if (event.key === "Escape") {
      hide();
      return true;
    }
    return false;
  };
})(window.FA);
