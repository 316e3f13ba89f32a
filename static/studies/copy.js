/* Copy buttons: copy data-copy to the clipboard and say so on the button. */
(function () {
  "use strict";
  function done(btn, text) {
    var old = btn.textContent;
    btn.textContent = text;
    setTimeout(function () { btn.textContent = old; }, 1500);
  }
  document.addEventListener("click", function (e) {
    var btn = e.target.closest("button.copy");
    if (!btn) return;
    var value = btn.dataset.copy;
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(value).then(function () { done(btn, "Copied"); },
                                                function () { done(btn, "Copy failed"); });
      return;
    }
    var ta = document.createElement("textarea");  // http:// (no Clipboard API)
    ta.value = value; ta.setAttribute("readonly", ""); ta.style.position = "absolute";
    ta.style.left = "-9999px"; document.body.appendChild(ta); ta.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (err) { ok = false; }
    document.body.removeChild(ta);
    done(btn, ok ? "Copied" : "Press Ctrl+C");
  });
})();

/* Forms with data-confirm ask before they are sent (no inline handlers: the CSP forbids them). */
(function () {
  "use strict";
  document.addEventListener("submit", function (e) {
    var form = e.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) e.preventDefault();
  });
})();
