// Cohort page: upload with a progress bar (XMLHttpRequest upload events) and status polling.
// The server only receives the files; the import runs in a background job whose status
// (queued / running / done / failed) is polled with the stages.
(function () {
  "use strict";
  function csrf() {
    var el = document.querySelector("input[name=csrfmiddlewaretoken]");
    return el ? el.value : "";
  }
  var form = document.getElementById("upload-form");
  var bar = document.getElementById("upload-progress");
  var msg = document.getElementById("upload-message");
  if (form) {
    form.addEventListener("submit", function (ev) {
      ev.preventDefault();
      var files = document.getElementById("upload-files").files;
      if (!files.length) { msg.textContent = "Choose a zip archive or DICOM files first."; return; }
      var data = new FormData();
      for (var i = 0; i < files.length; i++) data.append("files", files[i]);
      var xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      xhr.setRequestHeader("X-CSRFToken", csrf());
      xhr.setRequestHeader("X-Requested-With", "XMLHttpRequest");
      bar.hidden = false; bar.value = 0; msg.textContent = "Uploading…";
      xhr.upload.addEventListener("progress", function (e) {
        if (e.lengthComputable) bar.value = Math.round(100 * e.loaded / e.total);
      });
      xhr.upload.addEventListener("load", function () { msg.textContent = "Upload complete, storing the files…"; });
      xhr.addEventListener("load", function () {
        var body = {};
        try { body = JSON.parse(xhr.responseText); } catch (e) { body = {error: "server error " + xhr.status}; }
        if (xhr.status === 200 && body.ok) {
          msg.textContent = body.message;
          msg.className = "ok";
          window.setTimeout(function () { window.location.reload(); }, 800);
        } else {
          msg.textContent = "Upload refused: " + (body.error || ("HTTP " + xhr.status));
          msg.className = "error";
        }
      });
      xhr.addEventListener("error", function () { msg.textContent = "Network error during upload."; msg.className = "error"; });
      xhr.send(data);
    });
  }

  var table = document.getElementById("subjects");
  if (!table) return;
  var url = table.getAttribute("data-status-url");
  var known = table.querySelectorAll("tr[data-subject]").length;
  // reload when an upload appears or changes status (shows the new subjects or the error)
  function uploadsChanged(rows) {
    var changed = false;
    (rows || []).forEach(function (u) {
      var tr = document.querySelector('tr[data-upload="' + u.id + '"]');
      if (!tr || tr.getAttribute("data-status") !== u.status) changed = true;
    });
    return changed;
  }
  function poll() {
    fetch(url, {headers: {"Accept": "application/json"}, credentials: "same-origin"})
      .then(function (r) { return r.json(); })
      .then(function (data) {
        document.dispatchEvent(new CustomEvent("cohort:status", {detail: data}));
        var summary = document.getElementById("summary");
        if (summary) summary.textContent = data.counts.done + " / " + data.total + " stages done";
        if (data.subjects.length !== known || uploadsChanged(data.uploads)) {
          window.location.reload(); return;
        }
        var needReload = false;
        data.subjects.forEach(function (s) {
          s.stages.forEach(function (st) {
            var td = table.querySelector('td[data-stage-id="' + st.id + '"]');
            if (!td) return;
            var was = td.className;
            td.className = "stage " + st.status;
            var span = td.querySelector(".st");
            var text = st.status + (st.status === "running" ? " " + Math.round(100 * st.progress) + "%" : "");
            if (span) span.textContent = text;
            if (was !== td.className && (st.status === "failed" || st.status === "done")) needReload = needReload || st.status === "failed";
          });
        });
        if (needReload || (data.complete && !document.getElementById("reid-rank1") && data.reid)) {
          window.location.reload(); return;
        }
        if (!data.settled || !data.complete || data.importing) window.setTimeout(poll, 1500);
      })
      .catch(function () { window.setTimeout(poll, 5000); });
  }
  window.setTimeout(poll, 1000);
})();
