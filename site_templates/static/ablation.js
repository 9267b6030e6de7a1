/* Ablation effects on a unit page's top examples: the tooltip of a token after the max token says how removing
   the unit's contribution at the max token changes the model's log-probability of that token (harvest/ablation.py).
   From the shard where the store has them (`harvest --ablation-effects`: the unit's "ab"), else, where
   `featureatlas serve SITE --store STORE` runs the layer, computed on the first hover or focus of such a token or
   with the example's "Ablation effects" button (POST /api/ablate), then kept for the page's life. */
(function (FA) {
  "use strict";
  var el = FA.el;
  var known = {};  // "source/layer/unit/context_id/position" -> effects, as the server gave them

  function note(value) {
    return typeof value === "number" && isFinite(value) ?
      "ablating the max token changes log p(this token) by " + FA.signed(value) : "";
  }

  /* Gives the tokens after the max token of top example i (drawn in block by unit.js) their tooltip line. */
  FA.ablationEffects = function (block, meta, shard, unit, i) {
    var ex = unit.ex.top[i], ctx = shard.ctx[ex[0]], lo = ex[1], position = ex[2];
    var tokens = block.querySelectorAll(".ctx > b");
    function apply(effects) {
      for (var j = 0; j < effects.length && position + 1 + j - lo < tokens.length; j++) {
        FA.tokenNote(tokens[position + 1 + j - lo], note(effects[j]));
      }
    }
    if (unit.ab && unit.ab[i]) return apply(FA.decodeActivations(unit.ab[i]));
    var contextId = ctx[5];
    if (location.protocol.indexOf("http") !== 0 || typeof contextId !== "number" ||
        position + 1 - lo >= tokens.length) return;
    var key = [meta.source, meta.layer, unit.u, contextId, position].join("/");
    if (known[key]) return apply(known[key]);
    FA.serverStatus().then(function (answer) {
      if (!answer[0] || !answer[1].ablate || !FA.serves(answer[1], meta) || !block.isConnected) return;
      offerOnDemand(block, meta, unit, key, { source: meta.source, layer: meta.layer, unit: unit.u,
                                              context_id: contextId, position: position }, apply, tokens, lo);
    }, function () {});
  };

  /* A button in the example's head, and the first hover or focus of a following token, ask the server once. */
  function offerOnDemand(block, meta, unit, key, request, apply, tokens, lo) {
    var head = block.firstChild;
    var button = el("button", "button", "Ablation effects");
    button.type = "button";
    button.title = "How removing this " + meta.noun.toLowerCase() + " at the max token changes the log-probability " +
      "of each token after it; shown on hover";
    var status = el("span", "muted");
    status.setAttribute("role", "status");
    head.appendChild(button);
    head.appendChild(status);
    var pending = null;
    function ask() {
      if (pending) return;
      button.disabled = true;
      status.textContent = " computing\u2026";
      pending = FA.postJSON("api/ablate", request, status).then(function (result) {
        if (!result) {
          button.disabled = false;
          pending = null;
          return;
        }
        known[key] = result.effects;
        apply(result.effects);
        button.hidden = true;
        status.textContent = " ablation effects: hover a token after the max";
      });
    }
    function following(event) {
      var token = event.target.closest && event.target.closest(".ctx > b");
      var index = Array.prototype.indexOf.call(tokens, token);
      if (index >= 0 && index + lo > request.position) ask();
    }
    button.addEventListener("click", ask);
    block.addEventListener("mouseover", following);
    block.addEventListener("focusin", following);
  }
})(window.FA);
