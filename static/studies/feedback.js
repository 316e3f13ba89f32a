/* Practice feedback page: Enter continues (same as the Continue link). */
(function () {
  "use strict";
  var link = document.getElementById("continue");
  if (!link) return;
  document.addEventListener("keydown", function (e) {
    if (e.key === "Enter") { e.preventDefault(); window.location.href = link.href; }
  });
})();
