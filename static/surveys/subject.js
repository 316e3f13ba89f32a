// Subject page: live status. Polls the subject's status JSON, updates the stage rows
// (status, progress, attempts, errors) in place, and when a stage ends or the results
// change, reloads the page — or, when the researcher used the viewers in the last
// minute, offers the new results in a banner instead of pulling the page away.
(function () {
  "use strict";
  var table = document.getElementById("stages");
  if (!table) return;
  var url = table.dataset.statusUrl, signature = table.dataset.signature;
  var banner = document.getElementById("live-banner");
  var reloadBtn = document.getElementById("live-reload");
  if (reloadBtn) reloadBtn.addEventListener("click", function () { window.location.reload(); });

  function recentlyUsed() {
    var v = window.deidViewer && window.deidViewer.state.touched;
    var used = Math.max(v || 0, window.deidViewer3dTouched || 0);
    return used && Date.now() - used < 60000;
  }
  document.addEventListener("pointerdown", function (ev) {
    if (ev.target && ev.target.closest && ev.target.closest("#viewer3d")) window.deidViewer3dTouched = Date.now();
  });

  function update(data) {
    data.stages.forEach(function (st) {
      var tr = table.querySelector('tr[data-stage-id="' + st.id + '"]');
      if (!tr) return;
      var td = tr.querySelector("td.stage");
      td.className = "stage " + st.status;
      var span = td.querySelector(".st");
      if (span) span.textContent = st.status + (st.status === "running" ? " " + Math.round(100 * st.progress) + "%" : "");
      var err = td.querySelector(".err");
      if (st.error) {
        if (!err) { err = document.createElement("div"); err.className = "err"; td.appendChild(err); }
        err.textContent = st.error;
      } else if (err) { err.remove(); }
      var att = tr.querySelector(".attempts"); if (att) att.textContent = st.attempts;
    });
    document.body.dataset.stageStatus = data.stages.map(function (s) { return s.status; }).join(",");
  }

  function poll() {
    fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(function (data) {
        update(data);
        if (data.signature !== signature) {
          if (!recentlyUsed()) { window.location.reload(); return; }
          banner.hidden = false;
          document.body.dataset.newResults = "1";
        }
        var wait = data.settled ? 10000 : 1500;
        if (document.hidden) wait = Math.max(wait, 15000);
        window.setTimeout(poll, wait);
      })
      .catch(function () { window.setTimeout(poll, 10000); });
  }
  window.setTimeout(poll, 1500);
})();
