// atomnode console: live refresh without reloading the page.
// Every couple of seconds the header's counts come from /api/status (the console's JSON
// API) and the page's main region is fetched again as a fragment (?fragment=1) and swapped
// in, unless the reader is busy in it (a focused form field, an open <details>, a
// selection). Without JavaScript the pages work the same, only without refreshing.
(function () {
  "use strict";
  var main = document.getElementById("main");
  if (!main) return;
  var every = parseFloat(main.getAttribute("data-refresh") || "0");
  var statusEvery = 2;
  var base = document.body.getAttribute("data-base") || "";

  function set(field, text) {
    var el = document.querySelector('[data-field="' + field + '"]');
    if (el && el.textContent !== String(text)) el.textContent = text;
  }

  function duration(s) {
    s = Math.floor(s);
    if (s < 60) return s + "s";
    if (s < 3600) return Math.floor(s / 60) + "m " + (s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h " + Math.floor(s % 3600 / 60) + "m";
    return Math.floor(s / 86400) + "d " + Math.floor(s % 86400 / 3600) + "h";
  }

  function refreshStatus() {
    return fetch(base + "/api/status", {headers: {"Accept": "application/json"}, credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (doc) {
        if (!doc) return;
        var q = doc.queue || {};
        set("queued", q.queued);
        set("running", q.running);
        set("failed", q.failed === null || q.failed === undefined ? "?" : q.failed);
        set("uptime", duration(doc.uptime || 0));
        var store = document.querySelector('[data-field="store"]');
        if (store) {
          store.textContent = q.store_healthy ? "healthy" : "FAILING";
          store.className = q.store_healthy ? "ok" : "bad";
        }
      })
      .catch(function () {});
  }

  function busy() {
    var a = document.activeElement;
    if (a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName)) return true;
    if (main.querySelector("details[open]")) return true;
    var sel = window.getSelection && window.getSelection();
    return !!(sel && !sel.isCollapsed && main.contains(sel.anchorNode));
  }

  function refreshMain() {
    if (busy() || document.hidden) return Promise.resolve();
    var url = new URL(window.location.href);
    url.searchParams.set("fragment", "1");
    return fetch(url, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (html === null || busy()) return;
        // Keep keyboard focus where it was: remember the focused control by its text/name.
        var a = document.activeElement, key = null;
        if (a && main.contains(a)) key = a.outerHTML;
        main.innerHTML = html;
        if (key) {
          var all = main.querySelectorAll("a, button");
          for (var i = 0; i < all.length; i++) {
            if (all[i].outerHTML === key) { all[i].focus(); break; }
          }
        }
      })
      .catch(function () {});
  }

  setInterval(refreshStatus, statusEvery * 1000);
  if (every > 0) setInterval(refreshMain, every * 1000);
})();
