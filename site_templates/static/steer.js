/* The steering box of a unit page: continue a prompt as the model does, and with the unit pushed, side by side.
   It appears only where `featureatlas serve SITE --store STORE` (or --model) runs the page's source and layer
   (GET /api/probe, POST /api/steer: serve/server.py; the push itself: harvest/steer.py). Attention heads have no
   single direction to push along, so their pages get none. */
(function (FA) {
  "use strict";
  var el = FA.el, fmt = FA.fmt;
  var promptText = "";  // kept across the units a reader moves between
  var MAX_NEW_TOKENS = 64, MAX_STRENGTH = 10000;  // the server's limits

  /* The section, hidden until the server says it runs this layer; it then lists itself in the page's contents. */
  FA.steerBox = function (meta, unit) {
    var sec = FA.section("steer", "Steer");
    sec.hidden = true;
    if (location.protocol.indexOf("http") !== 0 || meta.source === "attn") return sec;
    FA.serverStatus().then(function (answer) {
      if (!answer[0] || !FA.serves(answer[1], meta) || !sec.isConnected) return;
      sec.appendChild(el("p", "note", "Continues your prompt with " + FA.visible(answer[1].model) + " twice with " +
        "the same decoding: as the model does, and with this " + meta.noun.toLowerCase() + "'s direction added " +
        "(strength \u00d7 its direction) at every position."));
      steerForm(sec, meta, unit);
      sec.hidden = false;
      var toc = document.querySelector("#unit nav.toc");
      if (toc && !toc.querySelector("[data-target=steer]")) {
        var a = el("a", null, "Steer");
        a.href = "#" + unit.u + "/steer";
        a.setAttribute("data-target", "steer");
        toc.appendChild(a);
      }
    }, function () {});
    return sec;
  };

  /* The largest |activation| the unit reaches (its max, or |min| if it never fires positive): what the
     strength is measured against. */
  function unitScale(unit) {
    var s = unit.s, scale = s[0] > 0 ? s[0] : -s[1];
    return isFinite(scale) && scale > 0 ? scale : 1;
  }

  /* The largest of 1, 2 or 5 times a power of ten that is at most v: a slider step that reads well. */
  function niceStep(v) {
    var power = Math.pow(10, Math.floor(Math.log10(v)));
    return [5, 2, 1].map(function (m) { return m * power; }).filter(function (s) { return s <= v; })[0];
  }

  function labelled(id, text, control) {
    var label = el("label", null, text);
    label.htmlFor = id;
    control.id = id;
    var row = el("div", "field");
    row.appendChild(label);
    row.appendChild(control);
    return row;
  }

  function steerForm(sec, meta, unit) {
    var scale = unitScale(unit), step = niceStep(Math.min(10 * scale, MAX_STRENGTH) / 200);
    var range = step * 200;  // -/+ about ten times the unit's max, in steps that read well
    var box = el("textarea");
    box.rows = 2;
    box.maxLength = 2000;
    box.value = promptText;
    var slider = el("input");
    slider.type = "range";
    slider.min = String(-range);
    slider.max = String(range);
    slider.step = String(step);
    slider.value = String(Number((Math.round((4 * scale) / step) * step).toPrecision(6)));  // four times the max
    var shown = el("output");
    shown.htmlFor = "steer-strength";
    var showStrength = function () {
      shown.textContent = FA.signed(Number(slider.value)) + " (" + fmt(Number(slider.value) / scale, 3) +
        "\u00d7 the max)";
    };
    slider.addEventListener("input", showStrength);
    showStrength();
    var strengthRow = labelled("steer-strength", "Strength", slider);
    strengthRow.appendChild(shown);
    var newTokens = el("input");
    newTokens.type = "number";
    newTokens.min = "1";
    newTokens.max = String(MAX_NEW_TOKENS);
    newTokens.value = "30";
    var rows = [labelled("steer-text", "Prompt", box), strengthRow, labelled("steer-new", "New tokens", newTokens)];
    var clamp = null;
    if (meta.noun === "Feature") {  // a dictionary feature's activation can be set instead of added to
      clamp = el("input");
      clamp.type = "checkbox";
      var clampRow = el("div", "field"), clampLabel = el("label", null, " Clamp: set the feature's activation to the " +
        "strength instead of adding its direction");
      clamp.id = "steer-clamp";
      clampLabel.htmlFor = "steer-clamp";
      clampRow.appendChild(clamp);
      clampRow.appendChild(clampLabel);
      rows.push(clampRow);
    }
    var run = el("button", "button", "Steer " + meta.noun.toLowerCase() + " " + unit.u);
    run.type = "button";
    var status = el("p", "meta");
    status.setAttribute("role", "status");
    var out = el("div", "steer-out");
    rows.concat([run, status, out]).forEach(function (node) { sec.appendChild(node); });
    run.addEventListener("click", function () {
      promptText = box.value;
      status.textContent = "Generating\u2026";
      out.textContent = "";
      run.disabled = true;
      var request = { source: meta.source, layer: meta.layer, unit: unit.u, text: box.value,
                      strength: Number(slider.value), mode: clamp && clamp.checked ? "clamp" : "add",
                      max_new_tokens: Number(newTokens.value), seed: null };
      FA.postJSON("api/steer", request, status).then(function (result) {
        run.disabled = false;
        if (result) drawContinuations(out, result);
      });
    });
  }

  /* The two continuations in columns, after the prompt (all of it text: set with textContent). */
  function drawContinuations(out, result) {
    var pushed = result.mode === "clamp" ? "clamped to " + fmt(result.strength) : "strength " +
      FA.signed(result.strength);
    [["steer-unsteered", "Unsteered", result.unsteered], ["steer-steered", "Steered (" + pushed + ")",
                                                          result.steered]].forEach(function (column) {
      var figure = el("figure");
      figure.appendChild(el("figcaption", "meta", column[1]));
      var text = el("p");
      text.id = column[0];
      text.appendChild(el("span", "muted", result.prompt));
      text.appendChild(el("span", null, column[2]));
      figure.appendChild(text);
      out.appendChild(figure);
    });
  }
})(window.FA);
