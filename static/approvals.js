// The approvals inbox's keyboard: j/k select the next/previous request, a approves it, e opens and focuses
// its arguments editor, r focuses its comment (to reject). Keys typed into a field stay in the field;
// Escape leaves the field. The page states these keys in its hint (#keys-hint).
"use strict";
(function () {
  let current = -1;
  const requests = () => Array.from(document.querySelectorAll("[data-approval]"));

  function highlight(all) {
    all.forEach((el, i) => {
      el.classList.toggle("selected", i === current);
      if (i === current) el.setAttribute("aria-current", "true"); else el.removeAttribute("aria-current");
    });
  }

  function select(index) {
    const all = requests();
    if (!all.length) return null;
    current = Math.max(0, Math.min(index, all.length - 1));
    highlight(all);
    const chosen = all[current];
    chosen.focus({ preventScroll: true });
    chosen.scrollIntoView({ block: "nearest" });
    return chosen;
  }

  function selected() {
    const all = requests();
    return current >= 0 && current < all.length ? all[current] : select(0);
  }

  function typing(target) {
    return target instanceof HTMLElement &&
      (target.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
  }

  const actions = {
    j: () => select(current + 1),
    k: () => select(current < 0 ? 0 : current - 1),
    a: () => {
      const button = selected()?.querySelector("button[value=approve]");
      if (button) button.click();
    },
    e: () => {
      const request = selected();
      const editor = request?.querySelector("details.editor");
      if (!editor) return;
      editor.open = true;
      editor.querySelector("textarea")?.focus();
    },
    r: () => selected()?.querySelector("textarea[name=comment]")?.focus(),
  };

  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && typing(event.target) && event.target.closest("[data-approval]")) {
      event.target.closest("[data-approval]").focus();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    const action = actions[event.key];
    if (!action) return;
    event.preventDefault();
    action();
  });

  // A click inside a request selects it, so the keys then act on what the user last touched.
  document.addEventListener("focusin", (event) => {
    const request = event.target instanceof Element ? event.target.closest("[data-approval]") : null;
    if (!request) return;
    const all = requests();
    if (all.indexOf(request) !== current) {
      current = all.indexOf(request);
      highlight(all);
    }
  });
})();
