/* The live probe box of a unit page: run your own text through the unit, or find the layer's top units on it.
   It only works where `featureatlas serve SITE --store STORE` answers /api/probe (serve/server.py); from
   file:// or a static host it says how to start one. */
(function (FA) {
  "use strict";
  var el = FA.el, fmt = FA.fmt;
  var probeText = "";  // kept across the units a reader moves between

  var SERVE_HINT = "Run your own text through this unit: start `featureatlas serve SITE --store STORE.duckdb` " +
    "and open this page from the address it prints.";

  var asked = null;
  /* The server's answer to GET /api/probe, asked once a page and shared by the boxes (steer.js, ablation.js):
     a promise of [ok, body]; rejected where no server answers. */
  FA.serverStatus = function () {
    if (!asked) {
      asked = fetch(FA.ROOT + "api/probe", { headers: { Accept: "application/json" } }).then(function (response) {
        return response.json().then(function (body) { return [response.ok, body]; });
      });
    }
    return asked;
  };

  /* Whether a server's GET /api/probe answer runs the page's source and layer. */
  FA.serves = function (body, meta) {
    return body.sources.some(function (s) { return s[0] === meta.source && s[1] === meta.layer; });
  };

  /* POSTs request as JSON to the server's endpoint ("api/..."); the answer, or null once status (a text node
     holder) says what went wrong. */
  FA.postJSON = function (endpoint, request, status) {
    return fetch(FA.ROOT + endpoint, { method: "POST", headers: { "Content-Type": "application/json" },
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
  };

  /* The section, filled once the server has said which model and layers it runs. */
  FA.probeBox = function (meta, unit) {
    var sec = FA.section("probe", "Try your own text");
    var note = el("p", "note");
    sec.appendChild(note);
    if (location.protocol.indexOf("http") !== 0) { // file://: no server to ask
      note.textContent = SERVE_HINT;
      return sec;
    }
    note.textContent = "Checking for a model\u2026";
    FA.serverStatus().then(function (answer) {
      var ok = answer[0], body = answer[1];
      var served = ok && FA.serves(body, meta);
      if (!served) {
        note.textContent = ok ? "The server's model has no " + meta.source + " layer " + meta.layer + "." : SERVE_HINT;
        return;
      }
      note.textContent = "Runs " + FA.visible(body.model) + " on the server. Colours are on the same scale as " +
        "the examples.";
      probeForm(sec, meta, unit);
    }, function () {
      note.textContent = SERVE_HINT;
    });
    return sec;
  };

  /* The text box, its two buttons, a status line and where the answers go. */
  function probeForm(sec, meta, unit) {
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
    /* POSTs the text with extra; the answer, or null once the status line says what went wrong. */
    function ask(extra) {
      probeText = box.value;
      status.textContent = "Running\u2026";
      out.textContent = "";
      var request = { text: box.value, source: meta.source, layer: meta.layer };
      Object.keys(extra).forEach(function (k) { request[k] = extra[k]; });
      return FA.postJSON("api/probe", request, status);
    }
    run.addEventListener("click", function () {
      ask({ unit: unit.u }).then(function (result) { if (result) drawActivations(out, result); });
    });
    top.addEventListener("click", function () {
      ask({ top: 10 }).then(function (result) { if (result) drawTopUnits(out, meta, result); });
    });
  }

  /* The text's tokens shaded by the unit's activations, on the scale of its catalogue max when there is one. */
  function drawActivations(out, result) {
    var acts = result.activations.map(function (v) { return v === null ? NaN : v; });
    var scale = result.scale !== null && result.scale > 0 ? result.scale : Math.max.apply(null,
      acts.map(function (v) { return isFinite(v) ? Math.abs(v) : 0; }).concat([1e-30]));
    var line = el("div", "ctx");
    line.id = "probe-result";
    result.tokens.forEach(function (raw, i) {
      line.appendChild(FA.token(raw, acts[i], scale, "max",
                                { peak: i === result.max_position, bos: i < result.first_counted }));
    });
    var head = el("p", "meta", "max " + fmt(acts[result.max_position]) + " on " +
      FA.repr(result.tokens[result.max_position]) + (result.scale ? " \u00b7 the unit's max in the catalogue: " +
      fmt(result.scale) : ""));
    out.appendChild(head);
    out.appendChild(line);
  }

  /* The layer's units that fire most on the text, each linked to its page. */
  function drawTopUnits(out, meta, result) {
    var list = el("ol", "hits");
    list.id = "probe-top";
    result.units.forEach(function (u) {
      var li = el("li"), a = el("a", null, meta.noun + " " + u.unit);
      a.href = "#" + u.unit;
      li.appendChild(a);
      li.appendChild(el("span", "muted", " max " + fmt(u.max) + " on " + FA.repr(result.tokens[u.position])));
      list.appendChild(li);
    });
    out.appendChild(list);
  }
})(window.FA);
