/* Attributions on unit pages: under an attention head's example, where the head looked from the max token (its
   attention weights) and each earlier token's share of what it wrote there; under an example of a dictionary on
   attention's hook_z, what each earlier token added to the feature's pre-activation (direct feature attribution).
   From an example row's last element when it is an object (build/shards.py's `at`, the store's `attributions`):
   drawn when its disclosure is first opened, on the example's own tokens, with their tooltips and a line more. */
(function (FA) {
  "use strict";
  var el = FA.el, fmt = FA.fmt;
  var BUCKETS = 9;  // as tokens.js shades activations: a1..a9, n1..n9

  /* Adds the disclosure under the example drawn in block (called by unit.js for every example). */
  FA.attentionRows = function (block, shard, ex) {
    var at = ex[ex.length - 1];
    if (!at || typeof at !== "object" || Array.isArray(at) || typeof at.s !== "string") return;
    var head = typeof at.w === "string";
    var details = el("details", "attn");
    details.appendChild(el("summary", null, head ? "Where the head looked from the max token" :
                                                   "What each earlier token added (direct feature attribution)"));
    details.addEventListener("toggle", function () {
      if (details.open && details.childNodes.length === 1) draw(details, shard, ex, at, head);
    });
    block.appendChild(details);
  };

  function draw(details, shard, ex, at, head) {
    var shares = FA.decodeActivations(at.s), weights = head ? FA.decodeActivations(at.w) : null;
    var before = at.b || [null, 0], value = ex[3];
    var text = head ?
      "Attention weights from the max token (outlined) to each token up to it, and each token's share of what " +
      "the head writes there (weight \u00d7 \u2016v W_O\u2016)." :
      "What each token up to the max token (outlined) adds to the feature's pre-activation there, " +
      "through what attention moved from it; with what the biases add (" + fmt(at.c, 3) + ") they make " +
      fmt(value, 3) + ".";
    if (ex[1] > 0) {
      text += " The tokens before those shown: " + (head ? "weight " + fmt(before[0], 3) + ", share " :
                                                             "") + fmt(before[1], 3) + ".";
    }
    details.appendChild(el("p", "note", text));
    var notes = function (i) {
      return head ? "attention " + fmt(weights[i], 3) + " \u00b7 share of the write " + fmt(shares[i], 3) :
        "attribution " + FA.signed(shares[i]) + (value ? " \u00b7 " + FA.percent(shares[i] / value) +
                                                 " of the pre-activation " + fmt(value, 3) : "");
    };
    if (head) details.appendChild(row(shard, ex, "Attention weight", weights, notes));
    details.appendChild(row(shard, ex, head ? "Share of the write" : "Direct attribution", shares, notes));
  }

  /* One labelled line of the example's tokens from its first shown one to the max token, shaded by values. */
  function row(shard, ex, label, values, notes) {
    var ctx = shard.ctx[ex[0]], lo = ex[1], acts = FA.decodeActivations(ex[4]);
    var indices = FA.contextTokens(shard, ex[0]), bos = shard.bos;
    var wrap = el("div", "attn-row");
    wrap.appendChild(el("p", "attn-label", label));
    var line = el("div", "ctx");
    if (lo > 0) line.classList.add("cut-l");
    var scale = 0;
    values.forEach(function (v) { if (isFinite(v)) scale = Math.max(scale, Math.abs(v)); });
    for (var i = 0; i < values.length; i++) {
      var p = lo + i, raw = shard.toks[indices[p - ctx[2]]];
      var token = FA.token(raw, acts[i], 1, "attribution", { peak: p === ex[2], bos: p === 0 && bos !== null &&
                                                                                     raw === bos });
      shade(token, values[i], scale || 1);
      line.appendChild(token);
      if (FA.tokenNote) FA.tokenNote(token, notes(i));
      else token.title = notes(i);
    }
    wrap.appendChild(line);
    return wrap;
  }

  /* The token's shade by value on scale, in place of the activation's that FA.token gave it. */
  function shade(node, value, scale) {
    for (var b = 1; b <= BUCKETS; b++) node.classList.remove("a" + b, "n" + b);
    var bucket = Math.max(-BUCKETS, Math.min(BUCKETS, Math.round((value / scale) * BUCKETS)));
    if (bucket > 0) node.classList.add("a" + bucket);
    else if (bucket < 0) node.classList.add("n" + -bucket);
  }
})(window.FA);
