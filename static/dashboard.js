// Times in the viewer's time zone, with UTC on hover (pages render UTC; this only rewrites the text), and
// live parts of pages refreshed when the server announces a change.
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
  // Live parts: an element with data-stream is refreshed (its htmx "changed" trigger) on each event of
  // that Server-Sent Events stream; the stream is closed once a refresh drops the attribute.
  const streams = new Map();
  function follow(root) {
    for (const el of root.querySelectorAll("[data-stream]")) {
      if (streams.has(el.id)) continue;
      const source = new EventSource(el.dataset.stream);
      source.addEventListener("changed", () => {
        const live = document.getElementById(el.id);
        if (live && window.htmx) window.htmx.trigger(live, "changed");
      });
      streams.set(el.id, source);
    }
    for (const [id, source] of streams) {
      const live = document.getElementById(id);
      if (!live || !live.hasAttribute("data-stream")) {
        source.close();
        streams.delete(id);
      }
    }
  }
  document.addEventListener("DOMContentLoaded", () => { localise(document); follow(document); });
  document.addEventListener("htmx:afterSwap", (event) => { localise(event.target); follow(document); });
})();
