/* Layer pages: the unit table filtered as the reader types and sorted by a column's button. The table is in
   the page itself, so without JavaScript it still lists every unit. */
(function () {
  "use strict";

  /* A number finds that unit; anything else searches the rows' text (snippets and explanations). */
  function setUpFilter(rows, filter, count) {
    var texts = null;
    filter.addEventListener("input", function () {
      var q = filter.value.trim().toLowerCase();
      var byUnit = /^\d+$/.test(q);
      if (!texts) texts = rows.map(function (row) { return row.textContent.toLowerCase(); });
      var n = 0;
      rows.forEach(function (row, i) {
        var hit = q === "" || (byUnit ? row.cells[0].textContent === q : texts[i].indexOf(q) !== -1);
        row.hidden = !hit;
        if (hit) n++;
      });
      if (count) count.textContent = q === "" ? "" : n + " of " + rows.length + " units";
    });
  }

  /* Each header button sorts by its column's number: descending first, then ascending; blanks sort last. */
  function setUpSorting(table, rows) {
    var body = table.tBodies[0];
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
  if (table) {
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var filter = document.getElementById("filter");
    if (filter) setUpFilter(rows, filter, document.getElementById("shown"));
    setUpSorting(table, rows);
  }
})();
