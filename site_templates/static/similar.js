/* The "Similar units" panel of a unit page: the unit's nearest units of each kind the store holds (build/shards.py's
   `nb`, their pages in the shard's `nbp`) as links to their pages, with their score and, for units of this layer,
   their explanation; and a link to the unit on its layer's map (the host's data-map, where the layer has one).
   unit.js calls FA.similarSection(meta, shard, unit): the section, or null when there is nothing to show. */
(function (FA) {
  "use strict";
  var el = FA.el;
  var KINDS = {  // kind: [caption, what its score is]
    cooccurrence: ["Fire on the same tokens", "Jaccard"],
    decoder: ["Write alike (decoder direction)", "Cosine"],
    encoder: ["Read alike (encoder direction)", "Cosine"],
    output: ["Write alike (output weights)", "Cosine"],
    decoder_across: ["In other dictionaries (decoder direction)", "Cosine"]
  };

  /* The link (or, where the site has no page for it, the text) naming a neighbour: page is [href, source, layer,
     noun] from the shard's nbp; href "" is this layer's own unit page. */
  function unitLink(meta, page, u) {
    var here = page[0] === "";
    var label = page[3] + " " + u + (here ? "" : " \u00b7 " + FA.visible(page[1]) + " layer " + page[2]);
    if (page[0] === null || page[0] === undefined) return el("span", null, label);
    var a = el("a", null, label);
    a.href = page[0] + "#" + u;
    return a;
  }

  /* One kind's neighbours (rows: [page, unit, score, explanation?]), best first. */
  function kindTable(meta, shard, kind, rows) {
    var spec = KINDS[kind] || [kind, "Score"];
    var table = FA.table(spec[0], [meta.noun, spec[1]]);
    table.setAttribute("data-kind", kind);
    var body = el("tbody");
    rows.forEach(function (row) {
      var r = el("tr"), cell = el("td");
      cell.appendChild(unitLink(meta, shard.nbp[row[0]], row[1]));
      if (row.length > 3 && row[3] !== null) cell.appendChild(el("span", "muted expl", " " + FA.visible(row[3])));
      r.appendChild(cell);
      r.appendChild(el("td", null, FA.fmt(row[2], 3)));
      body.appendChild(r);
    });
    table.appendChild(body);
    return table;
  }

  FA.similarSection = function (meta, shard, unit) {
    var host = document.getElementById("unit");
    var mapHref = host ? host.getAttribute("data-map") : null;
    var lists = unit.nb || {}, kinds = Object.keys(lists);
    if (!kinds.length && !mapHref) return null;
    var sec = FA.section("similar", "Similar units");
    if (mapHref) {
      var p = el("p", "note"), a = el("a", null, "This " + meta.noun.toLowerCase() + " on the map");
      a.id = "map-link";
      a.href = mapHref + "#unit=" + unit.u;
      p.appendChild(a);
      p.appendChild(document.createTextNode(" of the layer's units, placed by their directions."));
      sec.appendChild(p);
    }
    if (!kinds.length) return sec;
    sec.appendChild(el("p", "note", "The nearest units by what they fire on (the share of tokens where either " +
      "fires on which both do) and by their weights (cosine of their directions), best first."));
    var tables = el("div", "logits");
    kinds.forEach(function (kind) { tables.appendChild(kindTable(meta, shard, kind, lists[kind])); });
    sec.appendChild(tables);
    return sec;
  };
})(window.FA);
