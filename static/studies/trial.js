/* Rater trial page: preload the trial's images, then show them and start the clock;
   answer by click or keys 1..k (then confidence 1..5 if asked); one submission only;
   enlarge a face next to the target (⤢, Shift+number, T) and answer from there;
   optional countdown that submits "no answer" when time is up. No external resources. */
(function () {
  "use strict";
  var form = document.getElementById("trial-form");
  if (!form) return;
  var k = parseInt(form.dataset.k, 10);
  var askConfidence = form.dataset.confidence === "1";
  var stage = document.getElementById("stage");
  var loading = document.getElementById("loading");
  var rtField = document.getElementById("rt_ms");
  var confBox = document.getElementById("confidence");
  var timerEl = document.getElementById("timer");
  var t0 = null, choice = null, sent = false, rt = null;

  stage.style.visibility = "hidden";
  var imgs = Array.prototype.slice.call(stage.querySelectorAll("img"));
  var pending = imgs.length;
  function ready() {
    if (t0 !== null) return;
    stage.style.visibility = "visible";
    if (loading) loading.hidden = true;
    t0 = performance.now();
    document.body.dataset.ready = "1";
    startTimer();
  }
  function oneLoaded() { pending -= 1; if (pending <= 0) ready(); }
  imgs.forEach(function (img) {
    if (img.complete && img.naturalWidth > 0) { oneLoaded(); }
    else { img.addEventListener("load", oneLoaded); img.addEventListener("error", oneLoaded); }
  });
  if (imgs.length === 0) ready();

  function hidden(name, value) {
    var el = form.querySelector("input[type=hidden][name=" + name + "]");
    if (!el) { el = document.createElement("input"); el.type = "hidden"; el.name = name; form.appendChild(el); }
    el.value = value;
  }
  function submit() {
    if (sent) return;
    sent = true;
    rtField.value = rt === null ? "" : rt.toFixed(1);
    if (choice !== null) hidden("choice", String(choice));
    Array.prototype.forEach.call(form.querySelectorAll("button"), function (b) { b.disabled = true; });
    form.submit();
  }
  // ---- enlarge: a face next to the target, as large as the screen allows
  var dialog = document.getElementById("zoom-dialog");
  var enlargedField = document.getElementById("enlarged");
  var enlarged = {}, zoomSlot = null;
  function recordEnlarged(n) {
    enlarged[n] = true;
    if (enlargedField) enlargedField.value = Object.keys(enlarged).sort().join(",");
  }
  function zoom(n, viaTarget) {
    if (!dialog || sent || t0 === null || choice !== null) return;
    if (n < 1 || n > k) return;
    zoomSlot = n;
    document.getElementById("zoom-target").src = document.getElementById("target-img").src;
    document.getElementById("zoom-cand").src = document.querySelector("#cand-" + n + " img").src;
    document.getElementById("zoom-caption").textContent = "Face " + n + " of " + k;
    document.getElementById("zoom-choose").textContent = "Choose face " + n + " (Enter)";
    if (viaTarget) recordEnlarged(0);
    recordEnlarged(n);
    if (!dialog.open) dialog.showModal();
    document.body.dataset.zoom = String(n);
  }
  function unzoom() {
    if (dialog && dialog.open) dialog.close();
    zoomSlot = null;
    document.body.dataset.zoom = "";
  }
  if (dialog) {
    dialog.addEventListener("close", function () { zoomSlot = null; document.body.dataset.zoom = ""; });
    document.getElementById("zoom-close").addEventListener("click", unzoom);
    document.getElementById("zoom-prev").addEventListener("click", function () { zoom(zoomSlot > 1 ? zoomSlot - 1 : k); });
    document.getElementById("zoom-next").addEventListener("click", function () { zoom(zoomSlot < k ? zoomSlot + 1 : 1); });
    document.getElementById("zoom-choose").addEventListener("click", function () { var n = zoomSlot; unzoom(); choose(n); });
    dialog.addEventListener("click", function (e) { if (e.target === dialog) unzoom(); });  // backdrop
  }
  Array.prototype.forEach.call(document.querySelectorAll("button.zoom"), function (b) {
    b.addEventListener("click", function (e) {
      e.preventDefault();
      var n = parseInt(b.dataset.slot, 10);
      if (n === 0) zoom(1, true); else zoom(n);
    });
  });

  function choose(n) {
    if (sent || t0 === null || choice !== null) return;
    choice = n;
    rt = performance.now() - t0;
    var btn = document.getElementById("cand-" + n);
    if (btn) btn.classList.add("chosen");
    if (askConfidence && confBox) { confBox.hidden = false; } else { submit(); }
  }
  function confide(c) {
    if (sent || choice === null) return;
    var radio = form.querySelector("input[name=confidence][value='" + c + "']");
    if (radio) radio.checked = true;
    submit();
  }
  form.addEventListener("submit", function (e) {
    e.preventDefault();
    var b = e.submitter;
    if (b && b.name === "choice") choose(parseInt(b.value, 10));
  });
  if (confBox) {
    confBox.addEventListener("change", function (e) { if (e.target.name === "confidence") confide(e.target.value); });
  }
  document.addEventListener("keydown", function (e) {
    if (e.altKey || e.ctrlKey || e.metaKey) return;
    var digit = /^(Digit|Numpad)([0-9])$/.exec(e.code || "");
    if (zoomSlot !== null) {  // the enlarged view is open
      if (e.key === "ArrowLeft") { e.preventDefault(); zoom(zoomSlot > 1 ? zoomSlot - 1 : k); return; }
      if (e.key === "ArrowRight") { e.preventDefault(); zoom(zoomSlot < k ? zoomSlot + 1 : 1); return; }
      if (e.key === "Enter") { e.preventDefault(); var z = zoomSlot; unzoom(); choose(z); return; }
      if (digit && e.shiftKey) { e.preventDefault(); zoom(parseInt(digit[2], 10)); return; }
      if (digit && choice === null) {
        var m = parseInt(digit[2], 10);
        if (m >= 1 && m <= k) { e.preventDefault(); unzoom(); choose(m); }
        return;
      }
      return;  // Esc: the dialog closes itself
    }
    if (choice === null && e.shiftKey && digit) { e.preventDefault(); zoom(parseInt(digit[2], 10)); return; }
    if (choice === null && (e.key === "t" || e.key === "T")) { e.preventDefault(); zoom(1, true); return; }
    var n = parseInt(e.key, 10);
    if (isNaN(n)) return;
    if (choice === null) { if (n >= 1 && n <= k) { e.preventDefault(); choose(n); } }
    else if (askConfidence && n >= 1 && n <= 5) { e.preventDefault(); confide(n); }
  });
  function startTimer() {
    if (!timerEl) return;
    var left = parseFloat(timerEl.dataset.seconds);
    var end = performance.now() + left * 1000;
    function tick() {
      var s = Math.max(0, (end - performance.now()) / 1000);
      timerEl.textContent = Math.ceil(s) + " s";
      if (s <= 0) {
        if (choice === null) { rt = performance.now() - t0; }
        submit();
        return;
      }
      setTimeout(tick, 200);
    }
    tick();
  }
})();
