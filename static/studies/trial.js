/* Rater trial page: preload the trial's images, then show them and start the clock;
   answer by click or keys 1..k (then confidence 1..5 if asked); one submission only;
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
