// 3D viewer of the subject page: original | de-identified skin and bone surfaces with
// NiiVue (installed from the npm registry at build time, served from /static/vendor/),
// linked cameras (rotating one turns the other), decimated meshes served by the
// permission-checked viewer views. NiiVue's font and matcap images are served as static
// files too, so the page keeps the site's strict Content-Security-Policy (no data: URLs).
(function () {
  "use strict";
  var root = document.getElementById("viewer3d");
  if (!root) return;
  var script = document.getElementById("viewer3d-script");
  var statusEl = document.getElementById("v3-status");
  var panes = document.getElementById("v3-panes");
  var COLORS = {skin: [226, 186, 158], bone: [238, 232, 214]};
  var FLAG = {original: [215, 35, 35], deid: [245, 205, 40]};
  var state = {nv: {}, meshes: {}, version: null, loading: null, ready: false};

  function setStatus(t) { statusEl.textContent = t; statusEl.hidden = !t; }
  if (typeof window.niivue === "undefined") { return; }  // the page says it is not installed

  function webgl2() {
    try { return !!document.createElement("canvas").getContext("webgl2"); } catch (e) { return false; }
  }

  function makeNv(id) {
    var nv = new window.niivue.Niivue({
      backColor: [0.08, 0.09, 0.11, 1], show3Dcrosshair: false, isOrientCube: true,
      loadingText: "", logLevel: "error", dragAndDropEnabled: false
    });
    // NiiVue's default font and matcap are data: URLs; load our static copies instead
    nv.DEFAULT_FONT_GLYPH_SHEET = script.dataset.font;
    nv.loadDefaultMatCap = function () { return nv.loadMatCapTexture(script.dataset.matcap); };
    return nv.attachTo(id).then(function () {
      nv.setSliceType(nv.sliceTypeRender);
      nv.onAzimuthElevationChange = function (a, e) {
        root.dataset.azimuth = String(Math.round(a));
        root.dataset.elevation = String(Math.round(e));
      };
      return nv;
    });
  }

  function parseMesh(buf) {
    var dv = new DataView(buf);
    var magic = String.fromCharCode(dv.getUint8(0), dv.getUint8(1), dv.getUint8(2), dv.getUint8(3));
    if (magic !== "DSM1") throw new Error("not a mesh");
    var nv = dv.getUint32(4, true), nf = dv.getUint32(8, true);
    var pts = new Float32Array(buf.slice(16, 16 + 12 * nv));
    var tris = new Uint32Array(buf.slice(16 + 12 * nv, 16 + 12 * nv + 12 * nf));
    var flags = new Uint8Array(buf.slice(16 + 12 * nv + 12 * nf, 16 + 12 * nv + 12 * nf + nv));
    return {pts: pts, tris: tris, flags: flags};
  }

  function colors(kind, variant, flags, showRemoved) {
    var base = COLORS[kind], flag = FLAG[variant], n = flags.length;
    var rgba = new Uint8Array(4 * n);
    for (var i = 0; i < n; i++) {
      var c = (showRemoved && kind === "skin" && flags[i]) ? flag : base;
      rgba[4 * i] = c[0]; rgba[4 * i + 1] = c[1]; rgba[4 * i + 2] = c[2]; rgba[4 * i + 3] = 255;
    }
    return rgba;
  }

  function opacity() { return parseInt(document.getElementById("v3-opacity").value, 10) / 100; }
  function showKind(kind) { return document.getElementById("v3-" + kind).checked; }
  function showRemoved() { return document.getElementById("v3-removed").checked; }

  function loadMesh(url, kind, variant) {
    return fetch(url, {credentials: "same-origin"}).then(function (r) {
      if (r.status === 404) return null;  // e.g. no bone in this series
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.arrayBuffer();
    }).then(function (buf) {
      if (!buf) return null;
      var d = parseMesh(buf), nv = state.nv[variant];
      var op = kind === "skin" ? opacity() : 1;
      var mesh = new window.niivue.NVMesh(d.pts, d.tris, kind + "-" + variant,
        colors(kind, variant, d.flags, showRemoved()), op, showKind(kind), nv.gl);
      nv.addMesh(mesh);
      state.meshes[kind + "-" + variant] = {mesh: mesh, flags: d.flags, nv: nv, kind: kind, variant: variant};
      return mesh;
    });
  }

  function clearMeshes() {
    Object.keys(state.meshes).forEach(function (k) {
      var m = state.meshes[k];
      try { m.nv.removeMesh(m.mesh); } catch (e) { /* already gone */ }
    });
    state.meshes = {};
  }

  function setView(az, el) {
    ["original", "deid"].forEach(function (v) { if (state.nv[v]) state.nv[v].setRenderAzimuthElevation(az, el); });
    root.dataset.azimuth = String(Math.round(az));
    root.dataset.elevation = String(Math.round(el));
  }

  function apply(fn) {
    Object.keys(state.meshes).forEach(function (k) {
      var m = state.meshes[k];
      fn(m);
    });
    ["original", "deid"].forEach(function (v) { if (state.nv[v]) state.nv[v].drawScene(); });
  }

  function load(manifest) {
    var sel = manifest.selected;
    if (!sel) { setStatus(manifest.message || "No surfaces yet."); panes.hidden = true; return; }
    if (state.version === sel.version) return;
    if (!webgl2()) { setStatus("The 3D viewer needs WebGL 2, which this browser does not offer."); return; }
    state.version = sel.version; state.ready = false; root.dataset.ready = "";
    setStatus("Loading the surfaces (made once per series; the first view can take a few seconds)…");
    panes.hidden = false;
    var t0 = performance.now();
    var setup = state.nv.original ? Promise.resolve() : Promise.all([makeNv("v3-original"), makeNv("v3-deid")])
      .then(function (nvs) {
        state.nv.original = nvs[0]; state.nv.deid = nvs[1];
        nvs[0].broadcastTo(nvs[1], {"3d": true, "2d": false});
        nvs[1].broadcastTo(nvs[0], {"3d": true, "2d": false});
      });
    var version = sel.version;
    state.loading = setup.then(function () {
      clearMeshes();
      return Promise.all([loadMesh(sel.meshes["skin-original"], "skin", "original"),
                          loadMesh(sel.meshes["skin-deid"], "skin", "deid")]);
    }).then(function () {
      if (state.version !== version) return;
      setView(180, 0);  // NiiVue: azimuth 180 looks at the face (0 = from behind)
      state.ready = true;
      root.dataset.ready = "1";
      if (!root.dataset.readyMs) root.dataset.readyMs = String(Math.round(performance.now()));
      root.dataset.loadMs = String(Math.round(performance.now() - t0));
      setStatus("");
      // bone after the skin, so the first picture comes sooner
      return Promise.all([loadMesh(sel.meshes["bone-original"], "bone", "original"),
                          loadMesh(sel.meshes["bone-deid"], "bone", "deid")]).then(function () {
        root.dataset.bone = "1";
        ["original", "deid"].forEach(function (v) { state.nv[v].drawScene(); });
      });
    }).catch(function (e) {
      setStatus("The surfaces could not be shown (" + e.message + ").");
    });
  }

  document.getElementById("v3-skin").addEventListener("change", function () {
    apply(function (m) { if (m.kind === "skin") m.nv.setMeshProperty(m.mesh.id, "visible", showKind("skin")); });
  });
  document.getElementById("v3-bone").addEventListener("change", function () {
    apply(function (m) { if (m.kind === "bone") m.nv.setMeshProperty(m.mesh.id, "visible", showKind("bone")); });
  });
  document.getElementById("v3-opacity").addEventListener("input", function () {
    apply(function (m) { if (m.kind === "skin") m.nv.setMeshProperty(m.mesh.id, "opacity", opacity()); });
  });
  document.getElementById("v3-removed").addEventListener("change", function () {
    apply(function (m) {
      if (m.kind === "skin") m.nv.setMeshProperty(m.mesh.id, "rgba255", colors(m.kind, m.variant, m.flags, showRemoved()));
    });
  });
  Array.prototype.forEach.call(root.querySelectorAll("#v3-views button"), function (b) {
    b.addEventListener("click", function () { setView(parseFloat(b.dataset.az), 0); });
  });
  document.addEventListener("viewer:manifest", function (ev) { load(ev.detail); });
  if (window.deidViewer && window.deidViewer.state.manifest) load(window.deidViewer.state.manifest);
  window.deidViewer3d = state;
})();
