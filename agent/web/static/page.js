// Live updates of a server-rendered page: an event stream says a pass ended, the page fetches its new main part.
// Without event streams (or when the stream keeps failing) it polls instead. No framework, no external asset.
(function () {
  "use strict";
  var main = document.getElementById("main");
  var live = document.getElementById("live");
  if (!main || !live) { return; }
  var url = main.getAttribute("data-fragment");
  var pollTimer = null;
  var fetching = false;
  var again = false;

  function say(text, cls) { live.textContent = text; live.className = "live " + cls; }

  function refresh() {
    if (fetching) { again = true; return; }
    fetching = true;
    fetch(url, { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(new Error("HTTP " + r.status)); })
      .then(function (html) {
        var gen = /data-generation="(\d+)"/.exec(html);
        main.innerHTML = html;
        if (gen) { main.setAttribute("data-generation", gen[1]); }
      })
      .catch(function () { say("agent unreachable", "down"); })
      .then(function () {
        fetching = false;
        if (again) { again = false; refresh(); }
      });
  }

  function poll() {
    if (pollTimer === null) {
      say("polling", "poll");
      pollTimer = window.setInterval(refresh, 3000);
    }
  }

  if (!window.EventSource) { poll(); return; }
  var failures = 0;
  var source = new EventSource("/events");
  source.addEventListener("open", function () { failures = 0; say("live", "ok"); });
  source.addEventListener("changed", function (e) {
    var gen = parseInt(e.data, 10);
    if (!(gen <= parseInt(main.getAttribute("data-generation") || "0", 10))) { refresh(); }
  });
  source.addEventListener("error", function () {
    failures += 1;
    if (failures >= 3 || source.readyState === EventSource.CLOSED) {
      source.close();
      poll();
    } else {
      say("reconnecting", "poll");
    }
  });
})();
