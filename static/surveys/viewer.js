// Slice viewer of the subject page: original | de-identified side by side, in sync.
// Axial (native slices), coronal and sagittal (reformats made on the server), window
// presets, the removed region as an overlay, full resolution, keyboard and mouse wheel.
// Data come from the permission-checked viewer views (manifest JSON, one binary image
// pair per request: int16 original + int16 difference); nothing is fetched elsewhere.
// Decoded images are kept in memory (LRU) and the neighbours of the shown image are
// prefetched, so scrolling back and forth does not ask the server again.
(function () {
  "use strict";
  var root = document.getElementById("viewer");
  if (!root) return;
  var OUTSIDE = -32768;
  var CACHE_MAX = 32;  // decoded image pairs kept (512×512: about 3 MB each)
  var el = function (id) { return document.getElementById(id); };
  var statusEl = el("vw-status"), panesEl = el("vw-panes"), navEl = el("vw-nav");
  var slider = el("vw-slider"), strip = el("vw-strip"), posEl = el("vw-pos");
  var readout = el("vw-readout"), overlayBox = el("vw-overlay"), seriesSel = el("vw-series");
  var canvases = {original: el("vw-canvas-original"), deid: el("vw-canvas-deid")};
  var scrollers = Array.prototype.slice.call(root.querySelectorAll(".vw-scroll"));

  var S = {
    manifest: null, sel: null, view: "axial", index: {}, windowKey: null,
    width: 400, level: 40, overlay: true, zoom: "fit", point: null,
    shown: null, wanted: null, touched: 0
  };
  var cache = new Map(), inflight = new Map();
  var lut = new Uint8ClampedArray(65536);

  function setStatus(text) { statusEl.textContent = text; statusEl.hidden = !text; }

  // ------------------------------------------------------------------ data
  function key(view, n) { return S.sel.version + "/" + view + "/" + n; }
  function fetchImage(view, n) {
    var k = key(view, n);
    if (cache.has(k)) {
      var hit = cache.get(k); cache.delete(k); cache.set(k, hit);
      return Promise.resolve(hit);
    }
    if (inflight.has(k)) return inflight.get(k);
    var url = S.sel.base + view + "/" + n + ".bin";
    var p = fetch(url, {credentials: "same-origin"}).then(function (r) {
      if (r.status === 410) { reloadManifest(); throw new Error("stale"); }
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.arrayBuffer();
    }).then(function (buf) {
      var img = decode(buf);
      inflight.delete(k);
      cache.set(k, img);
      while (cache.size > CACHE_MAX) cache.delete(cache.keys().next().value);
      return img;
    }, function (e) { inflight.delete(k); throw e; });
    inflight.set(k, p);
    return p;
  }
  function decode(buf) {
    var dv = new DataView(buf);
    var magic = String.fromCharCode(dv.getUint8(0), dv.getUint8(1), dv.getUint8(2), dv.getUint8(3));
    if (magic !== "DSV1") throw new Error("not a slice");
    var w = dv.getUint32(4, true), h = dv.getUint32(8, true), nRemoved = dv.getUint32(12, true);
    var orig = new Int16Array(buf, 24, w * h), diff = new Int16Array(buf, 24 + 2 * w * h, w * h);
    var deid = new Int16Array(w * h), removed = new Uint8Array(w * h);
    for (var i = 0; i < w * h; i++) {
      var d = diff[i];
      deid[i] = orig[i] + d;
      if (d !== 0) removed[i] = 1;
    }
    return {w: w, h: h, orig: orig, deid: deid, removed: removed, nRemoved: nRemoved,
            pw: dv.getFloat32(16, true), ph: dv.getFloat32(20, true)};
  }

  // ------------------------------------------------------------------ drawing
  function buildLut() {
    var lo = S.level - S.width / 2, span = Math.max(1, S.width);
    for (var v = 0; v < 65536; v++) {
      var hu = v - 32768;
      var x = (hu - lo) / span * 255;
      lut[v] = x < 0 ? 0 : (x > 255 ? 255 : x);
    }
  }
  function paint(canvas, img, values, isOriginal) {
    if (canvas.width !== img.w || canvas.height !== img.h) { canvas.width = img.w; canvas.height = img.h; }
    var ctx = canvas.getContext("2d");
    var out = ctx.createImageData(img.w, img.h);
    var d = out.data, n = img.w * img.h, ov = S.overlay, rem = img.removed;
    for (var i = 0, p = 0; i < n; i++, p += 4) {
      var v = values[i];
      if (v === OUTSIDE) { d[p] = 16; d[p + 1] = 24; d[p + 2] = 48; d[p + 3] = 255; continue; }
      var g = lut[v + 32768];
      if (ov && rem[i]) {
        if (isOriginal) { d[p] = 0.45 * g + 140; d[p + 1] = 0.45 * g; d[p + 2] = 0.45 * g; }
        else { d[p] = 0.55 * g + 110; d[p + 1] = 0.55 * g + 20; d[p + 2] = 0.55 * g + 20; }
      } else { d[p] = g; d[p + 1] = g; d[p + 2] = g; }
      d[p + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    drawPoint(ctx, img);
  }
  function drawPoint(ctx, img) {
    var rc = S.point ? project(S.point) : null;
    if (!rc) return;
    ctx.save();
    ctx.strokeStyle = "rgba(80, 220, 255, 0.9)";
    ctx.lineWidth = Math.max(1, img.w / 400);
    var L = Math.max(6, img.w / 40);
    ctx.beginPath();
    ctx.moveTo(rc.c + 0.5 - L, rc.r + 0.5); ctx.lineTo(rc.c + 0.5 - L / 3, rc.r + 0.5);
    ctx.moveTo(rc.c + 0.5 + L / 3, rc.r + 0.5); ctx.lineTo(rc.c + 0.5 + L, rc.r + 0.5);
    ctx.moveTo(rc.c + 0.5, rc.r + 0.5 - L); ctx.lineTo(rc.c + 0.5, rc.r + 0.5 - L / 3);
    ctx.moveTo(rc.c + 0.5, rc.r + 0.5 + L / 3); ctx.lineTo(rc.c + 0.5, rc.r + 0.5 + L);
    ctx.stroke();
    ctx.restore();
  }
  function layout(img) {
    var avail = Math.max(200, (panesEl.clientWidth - 24) / 2);
    var aspect = img.ph / img.pw;
    var scale;
    if (S.zoom === "fit") {
      var maxH = Math.max(240, window.innerHeight * 0.78);
      scale = Math.min(avail / img.w, maxH / (img.h * aspect));
    } else { scale = parseFloat(S.zoom); }
    var cw = Math.round(img.w * scale), ch = Math.round(img.h * aspect * scale);
    ["original", "deid"].forEach(function (w) {
      var c = canvases[w];
      c.style.width = cw + "px"; c.style.height = ch + "px";
      c.classList.toggle("pixelated", scale >= 1.5);
    });
    scrollers.forEach(function (s) { s.classList.toggle("zoomed", S.zoom !== "fit"); });
    root.dataset.scale = scale.toFixed(3);
  }
  function render(img) {
    paint(canvases.original, img, img.orig, true);
    paint(canvases.deid, img, img.deid, false);
    layout(img);
    S.shown = img;
    var v = S.sel.views[S.view], n = S.index[S.view];
    root.dataset.view = S.view;
    root.dataset.index = String(n);
    root.dataset.drawn = S.view + ":" + n + ":" + (S.overlay ? "1" : "0") + ":" + S.windowKey;
    root.dataset.ready = "1";
    if (!root.dataset.readyMs) root.dataset.readyMs = String(Math.round(performance.now()));
    posEl.textContent = describe(v, n, img);
    drawStrip();
  }
  function describe(v, n, img) {
    var where;
    if (v.native) {
      var g = S.sel.geometry;
      where = "at " + (g.offsets_mm[n] - g.offsets_mm[0]).toFixed(1) + " mm along the stack (slab " +
        g.cells_mm[n].toFixed(2) + " mm)";
    } else {
      var axis = v.name === "coronal" ? "y" : "x";
      var pos = v.origin[v.name === "coronal" ? 1 : 0] + n * v.step_w;
      where = axis + " = " + pos.toFixed(1) + " mm (LPS)";
    }
    return v.name + " image " + (n + 1) + " of " + v.n + " · " + where + " · " + img.w + "×" + img.h +
      " px of " + img.pw.toFixed(2) + "×" + img.ph.toFixed(2) + " mm · removed voxels in this image: " +
      img.nRemoved + " · window W " + Math.round(S.width) + " L " + Math.round(S.level);
  }
  function drawStrip() {
    var v = S.sel.views[S.view], counts = v.removed, n = v.n;
    var w = strip.clientWidth || 600;
    if (strip.width !== w) strip.width = w;
    var ctx = strip.getContext("2d"), h = strip.height;
    ctx.fillStyle = "#e8e8e8"; ctx.fillRect(0, 0, w, h);
    var max = 0; for (var i = 0; i < n; i++) if (counts[i] > max) max = counts[i];
    if (max > 0) {
      for (var j = 0; j < n; j++) {
        if (!counts[j]) continue;
        var a = 0.25 + 0.75 * Math.log(1 + counts[j]) / Math.log(1 + max);
        ctx.fillStyle = "rgba(200, 0, 0, " + a.toFixed(3) + ")";
        var x0 = Math.floor(j * w / n), x1 = Math.max(x0 + 1, Math.floor((j + 1) * w / n));
        ctx.fillRect(x0, 0, x1 - x0, h);
      }
    }
    var cx = Math.floor((S.index[S.view] + 0.5) * w / n);
    ctx.fillStyle = "#1a6fd1"; ctx.fillRect(cx - 1, 0, 3, h);
  }

  // ------------------------------------------------------------------ navigation
  function show(view, n) {
    var v = S.sel.views[view];
    n = Math.max(0, Math.min(v.n - 1, n | 0));
    S.view = view; S.index[view] = n;
    slider.max = String(v.n - 1); slider.value = String(n);
    Array.prototype.forEach.call(root.querySelectorAll("#vw-views button"), function (b) {
      b.setAttribute("aria-pressed", b.dataset.view === view ? "true" : "false");
    });
    S.wanted = key(view, n);
    var want = S.wanted;
    fetchImage(view, n).then(function (img) {
      if (S.wanted !== want) return;  // the user has moved on
      render(img);
      prefetch(view, n);
    }).catch(function (e) { if (e.message !== "stale") setStatus("Could not load the image (" + e.message + ")."); });
  }
  function prefetch(view, n) {
    var v = S.sel.views[view];
    [1, -1, 2, -2, 3].forEach(function (d) {
      var m = n + d;
      if (m >= 0 && m < v.n) fetchImage(view, m).catch(function () {});
    });
  }
  function step(d) { if (S.sel) show(S.view, S.index[S.view] + d); }
  function jumpRemoved(dir) {
    var v = S.sel.views[S.view], c = v.removed, n = S.index[S.view];
    for (var m = n + dir; m >= 0 && m < v.n; m += dir) { if (c[m] > 0) { show(S.view, m); return; } }
  }
  function setWindow(w) {
    S.windowKey = w.key; S.width = w.width; S.level = w.level; buildLut();
    Array.prototype.forEach.call(el("vw-windows").querySelectorAll("button"), function (b) {
      b.setAttribute("aria-pressed", b.dataset.key === w.key ? "true" : "false");
    });
    root.dataset.window = w.key;
    if (S.shown) render(S.shown);
  }
  function setZoom(z) {
    S.zoom = z;
    Array.prototype.forEach.call(el("vw-zoom").querySelectorAll("button"), function (b) {
      b.setAttribute("aria-pressed", b.dataset.zoom === String(z) ? "true" : "false");
    });
    if (S.shown) layout(S.shown);
  }
  function setOverlay(on) {
    S.overlay = on; overlayBox.checked = on; root.dataset.overlay = on ? "1" : "0";
    if (S.shown) render(S.shown);
  }

  // ------------------------------------------------------------------ geometry (reference point)
  function dot(a, b) { return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]; }
  function sub(a, b) { return [a[0] - b[0], a[1] - b[1], a[2] - b[2]]; }
  function pixelToLps(v, n, r, c) {
    var g = S.sel.geometry;
    if (v.native) {
      var j = v.flip_rows ? v.height - 1 - r : r, i = v.flip_cols ? v.width - 1 - c : c;
      var o = g.origins[n], dj = g.pixel_mm[0], di = g.pixel_mm[1];
      return [0, 1, 2].map(function (a) { return o[a] + i * di * g.row[a] + j * dj * g.col[a]; });
    }
    return [0, 1, 2].map(function (a) {
      return v.origin[a] + c * v.pixel_mm[0] * v.u[a] + r * v.pixel_mm[1] * v.v[a] + n * v.step_w * v.w[a];
    });
  }
  function imageOf(v, p) {
    var g = S.sel.geometry;
    if (v.native) {
      var t = dot(sub(p, g.origins[0]), g.normal), best = 0, bd = Infinity;
      for (var k = 0; k < g.offsets_mm.length; k++) {
        var dd = Math.abs(g.offsets_mm[k] - t); if (dd < bd) { bd = dd; best = k; }
      }
      return best;
    }
    return Math.round(dot(sub(p, v.origin), v.w) / v.step_w);
  }
  function project(p) {  // pixel (r, c) of the point on the shown image
    var v = S.sel.views[S.view], n = S.index[S.view], g = S.sel.geometry;
    if (v.native) {
      var q = sub(p, g.origins[n]);
      var j = dot(q, g.col) / g.pixel_mm[0], i = dot(q, g.row) / g.pixel_mm[1];
      return {r: v.flip_rows ? v.height - 1 - j : j, c: v.flip_cols ? v.width - 1 - i : i};
    }
    var d = sub(p, v.origin);
    return {r: dot(d, v.v) / v.pixel_mm[1], c: dot(d, v.u) / v.pixel_mm[0]};
  }
  function eventPixel(ev) {
    var c = ev.currentTarget, rect = c.getBoundingClientRect();
    return {c: Math.floor((ev.clientX - rect.left) / rect.width * c.width),
            r: Math.floor((ev.clientY - rect.top) / rect.height * c.height)};
  }
  function switchView(view) {
    if (!S.sel) return;
    var v = S.sel.views[view];
    var n = S.point ? imageOf(v, S.point) : S.index[view];
    show(view, n);
  }

  // ------------------------------------------------------------------ manifest
  function reloadManifest(label) {
    var url = root.dataset.manifestUrl + (label ? "?series=" + encodeURIComponent(label) : "");
    setStatus("Preparing the viewer (the first view of a series reads it once; later views come from the cache)…");
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error("HTTP " + r.status); return r.json(); })
      .then(start)
      .catch(function (e) { setStatus("The viewer could not be loaded (" + e.message + ")."); });
  }
  function start(m) {
    S.manifest = m; S.sel = m.selected; cache.clear(); inflight.clear();
    seriesSel.innerHTML = "";
    m.series.forEach(function (s) {
      var o = document.createElement("option");
      o.value = s.label; o.disabled = !s.ready;
      o.textContent = s.label + " (" + s.slices + " slices)" + (s.primary ? ", primary" : "") + (s.ready ? "" : ", not de-identified");
      if (S.sel && s.label === S.sel.label) o.selected = true;
      seriesSel.appendChild(o);
    });
    document.dispatchEvent(new CustomEvent("viewer:manifest", {detail: m}));
    if (!S.sel) { setStatus(m.message || "No series to show yet."); panesEl.hidden = true; navEl.hidden = true; return; }
    var wins = el("vw-windows");
    wins.innerHTML = "";
    m.windows.forEach(function (w, i) {
      var b = document.createElement("button");
      b.type = "button"; b.dataset.key = w.key; b.textContent = w.label;
      b.title = "key " + (i + 1) + ": W " + w.width + " L " + w.level;
      b.addEventListener("click", function () { setWindow(w); });
      wins.appendChild(b);
    });
    Object.keys(S.sel.views).forEach(function (name) { S.index[name] = S.sel.views[name].start; });
    S.point = null;
    setStatus("");
    panesEl.hidden = false; navEl.hidden = false;
    if (!S.windowKey) setWindow(m.windows[0]); else setWindow(m.windows.filter(function (w) { return w.key === S.windowKey; })[0] || m.windows[0]);
    setZoom(S.zoom);
    root.dataset.version = S.sel.version;
    show(S.view, S.index[S.view]);
  }

  // ------------------------------------------------------------------ input
  Array.prototype.forEach.call(root.querySelectorAll("#vw-views button"), function (b) {
    b.addEventListener("click", function () { switchView(b.dataset.view); });
  });
  Array.prototype.forEach.call(el("vw-zoom").querySelectorAll("button"), function (b) {
    b.addEventListener("click", function () { setZoom(b.dataset.zoom); });
  });
  el("vw-prev-removed").addEventListener("click", function () { jumpRemoved(-1); });
  el("vw-next-removed").addEventListener("click", function () { jumpRemoved(1); });
  overlayBox.addEventListener("change", function () { setOverlay(overlayBox.checked); });
  slider.addEventListener("input", function () { if (S.sel) show(S.view, parseInt(slider.value, 10)); });
  seriesSel.addEventListener("change", function () { reloadManifest(seriesSel.value); });
  strip.addEventListener("click", function (ev) {
    if (!S.sel) return;
    var rect = strip.getBoundingClientRect(), v = S.sel.views[S.view];
    show(S.view, Math.floor((ev.clientX - rect.left) / rect.width * v.n));
  });
  var drag = null;
  Object.keys(canvases).forEach(function (which) {
    var c = canvases[which];
    c.addEventListener("wheel", function (ev) {
      if (!S.sel || ev.ctrlKey) return;
      ev.preventDefault();
      S.touched = Date.now();
      step((ev.deltaY > 0 ? 1 : -1) * (ev.shiftKey ? 10 : 1));
    }, {passive: false});
    c.addEventListener("contextmenu", function (ev) { ev.preventDefault(); });
    c.addEventListener("mousedown", function (ev) {
      if (!S.sel) return;
      S.touched = Date.now();
      if (ev.button === 2 || ev.shiftKey) {
        drag = {x: ev.clientX, y: ev.clientY, width: S.width, level: S.level, moved: false};
        ev.preventDefault();
      }
    });
    c.addEventListener("click", function (ev) {
      if (!S.sel || !S.shown || ev.shiftKey) return;
      var px = eventPixel(ev), v = S.sel.views[S.view];
      S.point = pixelToLps(v, S.index[S.view], px.r, px.c);
      root.dataset.point = S.point.map(function (x) { return x.toFixed(1); }).join(",");
      render(S.shown);
    });
    c.addEventListener("mousemove", function (ev) {
      if (!S.shown) return;
      var px = eventPixel(ev), img = S.shown;
      if (px.c < 0 || px.r < 0 || px.c >= img.w || px.r >= img.h) return;
      var i = px.r * img.w + px.c, a = img.orig[i], b = img.deid[i];
      readout.textContent = a === OUTSIDE ? "outside the scanned volume" :
        "HU at the pointer: original " + a + " · de-identified " + b + (img.removed[i] ? " (removed)" : "");
    });
  });
  window.addEventListener("mousemove", function (ev) {
    if (!drag) return;
    var dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) drag.moved = true;
    S.width = Math.max(1, drag.width + dx * 4); S.level = drag.level - dy * 2; S.windowKey = "custom";
    buildLut(); root.dataset.window = "custom";
    Array.prototype.forEach.call(el("vw-windows").querySelectorAll("button"), function (b) { b.setAttribute("aria-pressed", "false"); });
    if (S.shown) render(S.shown);
  });
  window.addEventListener("mouseup", function () { drag = null; });
  scrollers.forEach(function (s, i) {
    s.addEventListener("scroll", function () {
      var other = scrollers[1 - i];
      if (other && (other.scrollTop !== s.scrollTop || other.scrollLeft !== s.scrollLeft)) {
        other.scrollTop = s.scrollTop; other.scrollLeft = s.scrollLeft;
      }
    });
  });
  document.addEventListener("keydown", function (ev) {
    if (!S.sel || ev.altKey || ev.ctrlKey || ev.metaKey) return;
    var t = ev.target, tag = t && t.tagName;
    if (tag === "INPUT" && t.type !== "range" && t.type !== "checkbox") return;
    if (tag === "TEXTAREA" || tag === "SELECT") return;
    if (t && t.closest && t.closest("#viewer3d")) return;
    var k = ev.key, handled = true;
    if (k === "ArrowDown" || k === "ArrowRight") step(ev.shiftKey ? 10 : 1);
    else if (k === "ArrowUp" || k === "ArrowLeft") step(ev.shiftKey ? -10 : -1);
    else if (k === "PageDown") step(10);
    else if (k === "PageUp") step(-10);
    else if (k === "Home") show(S.view, 0);
    else if (k === "End") show(S.view, S.sel.views[S.view].n - 1);
    else if (k === "a" || k === "A") switchView("axial");
    else if (k === "c" || k === "C") switchView("coronal");
    else if (k === "s" || k === "S") switchView("sagittal");
    else if (k === "o" || k === "O") setOverlay(!S.overlay);
    else if (k === "n" || k === "N") jumpRemoved(1);
    else if (k === "p" || k === "P") jumpRemoved(-1);
    else if (k === "f" || k === "F") setZoom("fit");
    else if (k === "0") setZoom("1");
    else if (k === "+" || k === "=") setZoom(String(Math.min(8, (S.zoom === "fit" ? parseFloat(root.dataset.scale || "1") : parseFloat(S.zoom)) * 1.5).toFixed(3)));
    else if (k === "-") setZoom(String(Math.max(0.25, (S.zoom === "fit" ? parseFloat(root.dataset.scale || "1") : parseFloat(S.zoom)) / 1.5).toFixed(3)));
    else if (k >= "1" && k <= "9" && S.manifest.windows[parseInt(k, 10) - 1]) setWindow(S.manifest.windows[parseInt(k, 10) - 1]);
    else handled = false;
    if (handled) { ev.preventDefault(); S.touched = Date.now(); }
  });
  window.addEventListener("resize", function () { if (S.shown) { layout(S.shown); drawStrip(); } });
  window.deidViewer = {state: S, reload: reloadManifest};
  reloadManifest();
})();
