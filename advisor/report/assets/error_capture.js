// Runs first: records uncaught errors, rejected promises, console.error calls and blocked loads
// into <pre id="fa-js-errors">, so a headless browser test (and a curious reader) can see them.
(function () {
  "use strict";
  var log = [];
  window.__faErrors = log;
  function flush() {
    var el = document.getElementById("fa-js-errors");
    if (el) { el.textContent = log.join("\n"); }
  }
  function record(message) {
    log.push(String(message));
    flush();
  }
  window.addEventListener("error", function (e) {
    var what = e.message || (e.target && (e.target.src || e.target.href)) || "unknown error";
    record("error: " + what + (e.filename ? " (" + e.filename + ":" + e.lineno + ")" : ""));
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    var r = e.reason;
    record("unhandled rejection: " + ((r && r.message) || r));
  });
  document.addEventListener("securitypolicyviolation", function (e) {
    record("blocked: " + (e.blockedURI || "inline") + " (" + e.violatedDirective + ")");
  });
  var consoleError = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.map.call(arguments, String).join(" "));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", flush);
})();
