// The analyst console's only script (served by the app; the pages work without it).
// A pending narrative is polled until the LLM has written it; the text is set with textContent,
// never as HTML, so nothing in it can become markup.
"use strict";
(function () {
  const box = document.getElementById("narrative");
  if (!box || box.dataset.status !== "pending") return;
  const id = box.dataset.decision;
  let tries = 0;
  async function poll() {
    tries += 1;
    try {
      const answer = await fetch("/decisions/" + encodeURIComponent(id) + "/explanation", {
        headers: { accept: "application/json" },
      });
      if (answer.ok) {
        const body = await answer.json();
        if (body.status !== "pending") {
          document.getElementById("narrative-text").textContent = body.narrative;
          document.getElementById("narrative-state").textContent =
            body.source + (body.reason ? " (" + body.reason + ")" : "");
          box.dataset.status = body.status;
          box.classList.remove("pending");
          return;
        }
      }
    } catch (error) {
      // the server is unreachable for a moment: try again
    }
    if (tries < 60) setTimeout(poll, 3000);
  }
  setTimeout(poll, 2000);
})();
