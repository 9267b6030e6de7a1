/* The search page: unit addresses need no index; tokens and words are looked up in hashed term files
   (build/search_index.py), and each hit is shown with its card (max, firing, explanation, strongest snippet). */
(function (FA) {
  "use strict";
  var el = FA.el, visible = FA.visible;
  var SHOWN = 20;  // hits drawn per group

  /* 32-bit FNV-1a of the UTF-8 bytes: which term file holds a term (the same in build/search_index.py). */
  function fnv1a(text) {
    var bytes = new TextEncoder().encode(text), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) {
      h ^= bytes[i];
      h = Math.imul(h, 0x01000193) >>> 0;
    }
    return h >>> 0;
  }

  /* Unit addresses: "L12 N345", "12/345", "mlp/12/345", "sae:res14 123", "resid 3 507" -> [layer index, unit]. */
  function addresses(q, manifest) {
    var text = q.trim(), m, found = [];
    var layers = manifest.layers;
    function add(filter, unit) {
      layers.forEach(function (l, i) {
        if (filter(l) && unit <= l.max_unit) found.push([i, unit]);
      });
    }
    if ((m = text.match(/^L\s*(\d+)\s*[/ ,]?\s*N\s*(\d+)$/i))) {
      add(function (l) { return l.source === "mlp" && l.layer === Number(m[1]); }, Number(m[2]));
    } else if ((m = text.match(/^(\d+)\s*[/ ,:]\s*(\d+)$/))) {
      add(function (l) { return l.layer === Number(m[1]); }, Number(m[2]));
      found.sort(function (a, b) { return (layers[b[0]].source === "mlp") - (layers[a[0]].source === "mlp"); });
    } else if ((m = text.match(/^(\S+?)\s*[/ ]\s*(?:L?(\d+)\s*[/ ]\s*)?N?(\d+)$/i))) {
      var name = m[1].toLowerCase(), layer = m[2] === undefined ? null : Number(m[2]);
      add(function (l) {
        var source = l.source.toLowerCase();
        var named = source === name || source.split(":").pop() === name ||
          l.model.toLowerCase() + "/" + source === name;
        return named && (layer === null || l.layer === layer);
      }, Number(m[3]));
    }
    return found;
  }

  /* The postings of each term: [[kind, layer index, unit, score], ...], [] where its term file is missing. */
  function postings(terms, manifest) {
    return Promise.all(terms.map(function (t) {
      return FA.load("search/t/" + (fnv1a(t) % manifest.shards)).then(function (shard) {
        return Object.prototype.hasOwnProperty.call(shard, t) ? shard[t] : [];
      }, function () { return []; });
    }));
  }

  /* [title, hits] groups for the query: unit addresses, units that peak on it as a token, units that promote it,
     and units whose explanation has every word of it. lists: the postings of terms (the query, then its words). */
  function groupsFor(q, manifest, terms, words, lists) {
    var groups = [];
    var direct = addresses(q, manifest);
    if (direct.length) groups.push(["Unit address", direct]);
    var byKind = function (list, kind) {
      return list.filter(function (p) { return p[0] === kind; }).map(function (p) { return [p[1], p[2]]; });
    };
    var peaks = byKind(lists[0], 0), logits = byKind(lists[0], 1);
    if (peaks.length) groups.push(["Top examples peak on \u201c" + visible(q) + "\u201d", peaks]);
    if (logits.length) groups.push(["Promotes \u201c" + visible(q) + "\u201d (top logits)", logits]);
    var wordLists = terms.map(function (t, i) { return words.indexOf(t) >= 0 ? byKind(lists[i], 2) : null; })
      .filter(function (l) { return l !== null; });
    if (wordLists.length) {
      var keyOf = function (h) { return h[0] + "/" + h[1]; };
      var common = wordLists[0].filter(function (h) {
        return wordLists.every(function (l) { return l.some(function (o) { return keyOf(o) === keyOf(h); }); });
      });
      if (common.length) groups.push(["Explanations mention \u201c" + visible(words.join(" ")) + "\u201d", common]);
    }
    return groups;
  }

  /* A hit's card: [unit, max, min, firing, snippet tokens, marked position, explanation], or null. */
  function cardFor(manifest, hit) {
    var layer = manifest.layers[hit[0]];
    return FA.load(layer.path + "/c/" + Math.floor(hit[1] / manifest.shard_units)).then(function (cards) {
      for (var i = 0; i < cards.units.length; i++) if (cards.units[i][0] === hit[1]) return cards.units[i];
      return null;
    }, function () { return null; });
  }

  function resultItem(manifest, hit, card) {
    var layer = manifest.layers[hit[0]];
    var li = el("li", "result");
    var a = el("a", null, layer.noun + " " + hit[1]);
    a.href = FA.ROOT + layer.path + "/unit.html#" + hit[1];
    var head = el("p");
    head.appendChild(a);
    head.appendChild(el("span", "muted", layer.source + " \u00b7 layer " + layer.layer +
      (manifest.models > 1 ? " \u00b7 " + visible(layer.model) : "")));
    if (card) {
      head.appendChild(el("span", "act", "max " + FA.fmt(card[1])));
      if (card[3] !== null) head.appendChild(el("span", "muted", "fires on " + FA.percent(card[3])));
    }
    li.appendChild(head);
    if (card && card[6]) li.appendChild(el("p", "expl", visible(card[6])));
    if (card && card[4].length) {
      var snippet = el("p", "snippet");
      card[4].forEach(function (tok, i) {
        if (i === card[5]) {
          var mark = el("mark");
          FA.appendToken(mark, tok, true);
          snippet.appendChild(mark);
        } else FA.appendToken(snippet, tok, true);
      });
      li.appendChild(snippet);
    } else if (card) li.appendChild(el("p", "muted", "no examples"));
    return li;
  }

  /* A promise of one group's section: its title, its count and its first hits with their cards. */
  function groupSection(manifest, group) {
    var hits = group[1].slice(0, SHOWN);
    return Promise.all(hits.map(function (hit) { return cardFor(manifest, hit); })).then(function (cards) {
      var sec = el("section", "results");
      var h = el("h2", null, group[0]);
      h.appendChild(el("span", "count", group[1].length + " unit" + (group[1].length === 1 ? "" : "s") +
        (group[1].length > hits.length ? ", the first " + hits.length + " shown" : "")));
      sec.appendChild(h);
      var list = el("ol", "hits");
      hits.forEach(function (hit, i) { list.appendChild(resultItem(manifest, hit, cards[i])); });
      sec.appendChild(list);
      return sec;
    });
  }

  function runSearch(q, out, status) {
    out.textContent = "";
    status.textContent = "";
    q = q.trim();
    if (!q) {
      status.textContent = "Type a unit address (L12 N345, 12/345, sae:res14 123), a token or a word.";
      return Promise.resolve();
    }
    status.textContent = "Searching\u2026";
    return FA.load("search/manifest").then(function (manifest) {
      manifest.models = new Set(manifest.layers.map(function (l) { return l.model; })).size;
      var term = q.toLowerCase(), words = (term.match(/[\p{L}\p{N}_]{2,}/gu) || []);
      var terms = [term].concat(words.filter(function (w) { return w !== term; }));
      return postings(terms, manifest).then(function (lists) {
        var groups = groupsFor(q, manifest, terms, words, lists);
        if (!groups.length) {
          status.textContent = "Nothing found for \u201c" + visible(q) + "\u201d.";
          return;
        }
        status.textContent = "";
        return Promise.all(groups.map(function (g) { return groupSection(manifest, g); })).then(function (sections) {
          sections.forEach(function (sec) { out.appendChild(sec); });
        });
      });
    }, function () {
      status.textContent = "This site has no search index.";
    });
  }

  /* Searches the page's ?q= on load, then as the reader types (the address follows, for sharing). */
  function searchPage(out) {
    var input = document.getElementById("q"), status = document.getElementById("search-status");
    var q = new URLSearchParams(location.search).get("q") || "";
    input.value = q;
    runSearch(q, out, status);
    var timer = null;
    input.addEventListener("input", function () {
      clearTimeout(timer);
      timer = setTimeout(function () {
        history.replaceState(null, "", "?q=" + encodeURIComponent(input.value));
        runSearch(input.value, out, status);
      }, 150);
    });
    input.form.addEventListener("submit", function (event) {
      event.preventDefault();
      history.replaceState(null, "", "?q=" + encodeURIComponent(input.value));
      runSearch(input.value, out, status);
    });
  }

  var results = document.getElementById("results");
  if (results) searchPage(results);
})(window.FA);
