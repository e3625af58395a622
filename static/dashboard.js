// Times in the viewer's time zone, with UTC on hover. Pages render UTC; this only rewrites the text.
"use strict";
(function () {
  const format = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  function localise(root) {
    for (const el of root.querySelectorAll("time[datetime]")) {
      const at = new Date(el.getAttribute("datetime"));
      if (Number.isNaN(at.getTime()) || el.dataset.local) continue;
      el.title = at.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
      el.textContent = format.format(at);
      el.dataset.local = "1";
    }
  }
  document.addEventListener("DOMContentLoaded", () => localise(document));
  document.addEventListener("htmx:afterSwap", (event) => localise(event.target));
})();
