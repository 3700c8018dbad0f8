// Live updates: the server announces each committed step on /events; the page then fetches
// itself again and swaps its <main>, so what is shown is always committed state. No reload,
// no framework.
(function () {
  "use strict";
  var live = document.getElementById("live");
  if (!window.EventSource || !live) return;
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.text(); })
      .then(function (html) {
        var next = new DOMParser().parseFromString(html, "text/html").getElementById("main");
        var main = document.getElementById("main");
        if (next && main) main.replaceWith(next);
      })
      .catch(function () { live.textContent = "live (refresh failed; retrying)"; })
      .finally(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource("/events");
  source.addEventListener("state", function (e) {
    var state = JSON.parse(e.data);
    var main = document.getElementById("main");
    live.className = "live on";
    live.textContent = "live · " + state.entries + " ledger entries";
    if (main && main.dataset.version !== String(state.version)) refresh();
  });
  source.onerror = function () { live.className = "live"; live.textContent = "reconnecting…"; };
})();
