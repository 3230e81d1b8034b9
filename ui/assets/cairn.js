// Cairn UI: small progressive enhancements. Every page works without this script.
// 1. Live pages (<main data-live>) re-render <main> when the cluster changes, from the
//    event stream (/ui/live, the API's SSE), at most once a second.
// 2. Task logs (<pre data-follow>) follow new output over server-sent events.
// 3. Forms with data-confirm ask first; text inputs with data-pattern are checked as typed.
(function () {
  "use strict";

  function liveMain() {
    var main = document.querySelector("main[data-live]");
    if (!main || !window.EventSource) return;
    var pending = false, last = 0, es = new EventSource("/ui/live");
    function busy() {
      var a = document.activeElement;
      return a && main.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
    }
    function refresh() {
      pending = false;
      if (busy()) { schedule(); return; }
      last = Date.now();
      fetch(window.location.href, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) {
          if (!html) return;
          var doc = new DOMParser().parseFromString(html, "text/html");
          var fresh = doc.querySelector("main");
          if (fresh) {
            var open = Array.prototype.map.call(main.querySelectorAll("details[open]"), function (d) {
              return d.querySelector("summary") ? d.querySelector("summary").textContent : "";
            });
            main.innerHTML = fresh.innerHTML;
            Array.prototype.forEach.call(main.querySelectorAll("details"), function (d) {
              var s = d.querySelector("summary");
              if (s && open.indexOf(s.textContent) >= 0) d.open = true;
            });
            document.dispatchEvent(new Event("cairn:refreshed"));
          }
        })
        .catch(function () {});
    }
    function schedule() {
      if (pending) return;
      pending = true;
      setTimeout(refresh, Math.max(300, 1000 - (Date.now() - last)));
    }
    ["task", "workload", "agent", "deployment", "service", "kv", "message"].forEach(function (t) {
      es.addEventListener(t, schedule);
    });
    // Changes between the page's render and the stream's start are not in the stream:
    // re-render once it is open (and after every reconnect).
    es.addEventListener("open", schedule);
  }

  function followLogs() {
    Array.prototype.forEach.call(document.querySelectorAll("pre[data-follow]"), function (pre) {
      if (!window.EventSource || pre.dataset.following) return;
      pre.dataset.following = "1";
      var es = new EventSource(pre.dataset.follow);
      es.onmessage = function (e) {
        var atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        var text;
        try { text = JSON.parse(e.data); } catch (err) { return; }
        pre.appendChild(document.createTextNode(text));
        if (atEnd) pre.scrollTop = pre.scrollHeight;
      };
      es.addEventListener("end", function () { es.close(); });
    });
  }

  function checkPatterns() {
    Array.prototype.forEach.call(document.querySelectorAll("input[data-pattern]"), function (input) {
      var re;
      try { re = new RegExp("^(?:" + input.dataset.pattern + ")$"); } catch (e) { return; }
      input.addEventListener("input", function () {
        var ok = input.value === "" || re.test(input.value);
        input.setCustomValidity(ok ? "" : "does not match " + input.dataset.pattern);
        input.setAttribute("aria-invalid", ok ? "false" : "true");
      });
    });
  }

  function start() { liveMain(); followLogs(); checkPatterns(); }
  document.addEventListener("cairn:refreshed", followLogs);
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
