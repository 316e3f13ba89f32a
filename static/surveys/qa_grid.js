// Cohort page: the QA grid. Sorts the subjects' cards by a QA figure (missing values last),
// filters to flagged subjects, remembers the choice for the session, and swaps in fresh
// cards when the status poll (cohort.js) reports that a subject's QA changed.
(function () {
  "use strict";
  var grid = document.getElementById("qa-grid");
  if (!grid) return;
  var sortSel = document.getElementById("qa-sort"), dirBtn = document.getElementById("qa-dir");
  var onlyFlagged = document.getElementById("qa-only-flagged"), countEl = document.getElementById("qa-count");
  var STORE = "qa-grid:" + grid.dataset.url;
  try {
    var saved = JSON.parse(window.sessionStorage.getItem(STORE) || "null");
    if (saved) { sortSel.value = saved.key; dirBtn.dataset.dir = saved.dir; onlyFlagged.checked = saved.only; }
  } catch (e) { /* private mode: no memory */ }

  function value(card, key) {
    if (key === "pseudonym") return card.dataset.subject;
    if (key === "flagged") return card.dataset.flagged === "1" ? 1 : 0;
    var v = card.dataset[key];
    return v === undefined || v === "" ? null : parseFloat(v);
  }
  function apply() {
    var key = sortSel.value, desc = dirBtn.dataset.dir === "desc";
    dirBtn.textContent = key === "pseudonym" ? (desc ? "Z → A" : "A → Z") : (desc ? "largest first" : "smallest first");
    dirBtn.setAttribute("aria-pressed", desc ? "true" : "false");
    var cards = Array.prototype.slice.call(grid.querySelectorAll(".qa-card"));
    cards.sort(function (a, b) {
      var x = value(a, key), y = value(b, key);
      if (x === null && y === null) return a.dataset.subject < b.dataset.subject ? -1 : 1;
      if (x === null) return 1;
      if (y === null) return -1;
      var c = typeof x === "string" ? x.localeCompare(y) : x - y;
      if (c === 0) return a.dataset.subject < b.dataset.subject ? -1 : 1;
      return desc ? -c : c;
    });
    var shown = 0;
    cards.forEach(function (c) {
      grid.appendChild(c);
      c.hidden = onlyFlagged.checked && c.dataset.flagged !== "1";
      if (!c.hidden) shown += 1;
    });
    var flagged = cards.filter(function (c) { return c.dataset.flagged === "1"; }).length;
    countEl.textContent = shown + " of " + cards.length + " subjects shown · " + flagged + " flagged";
    grid.dataset.order = cards.filter(function (c) { return !c.hidden; }).map(function (c) { return c.dataset.subject; }).join(",");
    try {
      window.sessionStorage.setItem(STORE, JSON.stringify({key: key, dir: dirBtn.dataset.dir, only: onlyFlagged.checked}));
    } catch (e) { /* ignore */ }
  }
  sortSel.addEventListener("change", function () {
    // figures: the largest (most removed, most changed) first; names and Dice: ascending
    dirBtn.dataset.dir = (sortSel.value === "pseudonym" || sortSel.value === "bone_dice") ? "asc" : "desc";
    apply();
  });
  dirBtn.addEventListener("click", function () { dirBtn.dataset.dir = dirBtn.dataset.dir === "desc" ? "asc" : "desc"; apply(); });
  onlyFlagged.addEventListener("change", apply);

  var refreshing = false;
  document.addEventListener("cohort:status", function (ev) {
    var qa = ev.detail.qa || {}, changed = false;
    Object.keys(qa).forEach(function (p) {
      var card = grid.querySelector('.qa-card[data-subject="' + p + '"]');
      if (!card || card.dataset.signature !== qa[p]) changed = true;
    });
    if (!changed || refreshing) return;
    refreshing = true;
    fetch(grid.dataset.url, {credentials: "same-origin"})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.text(); })
      .then(function (html) { grid.innerHTML = html; apply(); grid.dataset.refreshed = String(Date.now()); })
      .catch(function () { /* next poll tries again */ })
      .then(function () { refreshing = false; });
  });
  apply();
})();
