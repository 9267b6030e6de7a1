/* Keys on every page: / to search, j k (or arrows on a unit page) to the next and previous unit, p n u to the
   pager's links; on a focused token (tokens.js), arrows move along its context. Loaded last, after the page's
   other scripts. */
(function (FA) {
  "use strict";

  /* Focus the visible item step places after (before) the focused one, or the first (last). */
  function moveFocus(selector, step) {
    var items = Array.prototype.filter.call(document.querySelectorAll(selector), function (a) {
      return a.offsetParent !== null;
    });
    if (!items.length) return;
    var i = items.indexOf(document.activeElement);
    var next = items[Math.max(0, Math.min(items.length - 1, i < 0 ? (step > 0 ? 0 : items.length - 1) : i + step))];
    next.focus();
  }

  document.addEventListener("keydown", function (event) {
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    if (FA.tokenKey && FA.tokenKey(event)) return;
    var tag = event.target && event.target.tagName;
    if (tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || event.shiftKey) return;
    if (event.key === "/") {
      var box = document.getElementById("q");
      if (box) {
        event.preventDefault();
        box.focus();
        box.select();
      }
      return;
    }
    var onUnit = document.getElementById("unit") !== null;
    var rel = { p: "prev", n: "next", u: "up", k: "prev", j: "next" }[event.key];
    if (onUnit && !rel) rel = { ArrowLeft: "prev", ArrowRight: "next" }[event.key];
    if (rel && (onUnit || rel === "up" || event.key === "p" || event.key === "n")) {
      var link = document.querySelector(".pager a[rel='" + rel + "']");
      if (link) {
        event.preventDefault();
        link.click();
      }
      return;
    }
    if (event.key === "j" || event.key === "k") {
      var list = document.getElementById("units") ? "#units tbody tr:not([hidden]) td:first-child a" : ".hits a";
      event.preventDefault();
      moveFocus(list, event.key === "j" ? 1 : -1);
    }
  });
})(window.FA);
