// The runs list: its live part is not refreshed while rows are selected (a refresh would drop the
// selection); a refresh missed meanwhile happens once the selection is cleared. A bulk action's answer
// clears the selection, refreshes the list and moves focus to the per-run results; a refused bulk
// action shows why instead of doing nothing.
"use strict";
(function () {
  let missed = false;
  const selected = () => document.querySelectorAll('#runs-live input[name="run"]:checked').length > 0;
  function refresh() {
    const live = document.getElementById("runs-live");
    if (live && window.htmx) window.htmx.trigger(live, "changed");
  }
  function note() {
    const el = document.getElementById("live-note");
    if (el) el.textContent = selected() && missed ? "Runs changed: the list refreshes when no run is selected." : "";
  }
  document.addEventListener("htmx:beforeRequest", (event) => {
    if (event.detail.elt.id === "runs-live" && selected()) {
      event.preventDefault();
      missed = true;
      note();
    }
  });
  document.addEventListener("change", (event) => {
    if (!event.target.matches('#runs-live input[name="run"]')) return;
    if (!selected() && missed) {
      missed = false;
      refresh();
    }
    note();
  });
  document.addEventListener("htmx:afterRequest", (event) => {
    if (event.detail.elt.id !== "bulk") return;
    if (event.detail.successful) {
      for (const box of document.querySelectorAll('input[name="run"]:checked')) box.checked = false;
      missed = false;
      note();
      refresh();
      const title = document.getElementById("bulk-title");
      if (title) title.focus();
      return;
    }
    // An error page (422 too many runs or none selected, 403, ...): show its message in the results.
    const results = document.getElementById("bulk-results");
    const page = new DOMParser().parseFromString(event.detail.xhr.responseText || "", "text/html");
    const detail = page.querySelector(".error-detail");
    if (results) {
      const p = document.createElement("p");
      p.className = "error-detail";
      p.textContent = "Not done: " + (detail ? detail.textContent.trim() : "the server refused (" + event.detail.xhr.status + ")");
      results.replaceChildren(p);
    }
  });
})();
