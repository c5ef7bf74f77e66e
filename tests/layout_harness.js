// Loaded by tests/test_report_layout.py in a page that frames a report: checks its layout as a
// reader would see it, at desktop width, after a resize to 1000 px, and on a phone, and writes
// what it found as JSON into <pre id="layout-results">.
(function () {
  "use strict";
  var results = {};
  var out = document.getElementById("layout-results");

  function rect(el) { var r = el.getBoundingClientRect(); return {l: r.left, t: r.top, r: r.right, b: r.bottom}; }
  function overlaps(a, b) { return a.l < b.r - 1 && b.l < a.r - 1 && a.t < b.b - 1 && b.t < a.b - 1; }
  // What a reader sees: not the insides of a closed <details>.
  function shown(el) {
    if (el.checkVisibility) { return el.checkVisibility(); }
    var closed = el.closest("details:not([open])");
    return !closed || el.closest("summary") !== null;
  }
  function label(el) {
    return el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
      (el.getAttribute("data-figure") ? "[" + el.getAttribute("data-figure") + "]" : "") +
      " '" + (el.textContent || "").trim().slice(0, 40) + "'";
  }

  function measure(frame) {
    var win = frame.contentWindow, doc = frame.contentDocument;
    var found = {errors: [], overlaps: [], clipped: [], broken_tokens: [], wide: []};
    var log = doc.getElementById("fa-js-errors");
    if (log && log.textContent) { found.errors.push(log.textContent); }
    var charts = Array.prototype.slice.call(doc.querySelectorAll("[data-figure]"));
    found.charts = charts.length;
    found.charts_rendered = doc.body.getAttribute("data-charts-rendered");
    // A chart must not cover a heading, a caption or another chart.
    var others = Array.prototype.slice.call(doc.querySelectorAll("h1, h2, h3, p.caption, table, [data-figure]"))
      .filter(shown);
    charts.forEach(function (chart) {
      var cr = rect(chart);
      others.forEach(function (o) {
        if (o !== chart && !chart.contains(o) && overlaps(cr, rect(o))) {
          found.overlaps.push(label(chart) + " covers " + label(o));
        }
      });
      // What plotly drew (the plot, its axes, its legend) stays inside the chart's box.
      Array.prototype.forEach.call(chart.querySelectorAll("svg.main-svg, g.legend g.traces, g.infolayer > g, g.annotation, g.xtick, g.ytick"),
        function (part) {
          var pr = rect(part);
          if (pr.r - pr.l < 1) { return; }
          if (pr.t < cr.t - 2 || pr.b > cr.b + 2 || pr.l < cr.l - 2 || pr.r > cr.r + 2) {
            found.clipped.push(label(chart) + ": " + part.tagName + "." + (part.getAttribute("class") || "") +
              " '" + (part.textContent || "").slice(0, 60) + "'" +
              " " + JSON.stringify(pr) + " outside " + JSON.stringify(cr));
          }
        });
    });
    // A file:line or module path is one token: it never wraps onto two lines.
    Array.prototype.forEach.call(doc.querySelectorAll("code.tok"), function (code) {
      if (shown(code) && code.getClientRects().length > 1) { found.broken_tokens.push(code.textContent); }
    });
    // Nothing pushes the page sideways: wide content scrolls inside its own box.
    found.page_width = doc.documentElement.scrollWidth;
    found.viewport_width = win.innerWidth;
    if (found.page_width > found.viewport_width) {
      Array.prototype.forEach.call(doc.querySelectorAll("main *"), function (el) {
        if (rect(el).r > found.viewport_width + 1 && !el.closest(".scroll, pre, .chart")) {
          found.wide.push(label(el));
        }
      });
      found.wide = found.wide.slice(0, 10);
    }
    var first = doc.querySelector("#rec-1 .change");
    var pre = first ? first.querySelector("details.change-box pre") : null;
    found.first_change = pre ? pre.textContent.length : 0;
    found.first_change_kind = pre ? pre.className + "#" + pre.id : "";
    found.first_change_open = pre ? pre.closest("details").open : false;
    return found;
  }

  function whenDrawn(frame, then) {
    var tries = 0;
    (function poll() {
      var doc = frame.contentDocument;
      var charts = doc ? doc.querySelectorAll("[data-figure]").length : -1;
      var drawn = doc && doc.body && (charts === 0 || doc.body.getAttribute("data-charts-rendered") === String(charts));
      if (drawn || tries++ > 100) { then(); } else { setTimeout(poll, 100); }
    })();
  }

  function finish() {
    out.textContent = JSON.stringify(results);
    document.body.setAttribute("data-layout-done", "yes");
  }

  var wide = document.getElementById("wide"), phone = document.getElementById("phone");
  wide.addEventListener("load", function () {
    whenDrawn(wide, function () {
      results.desktop = measure(wide);
      // The window narrows; the charts follow its width (report.js, on the resize event): measure
      // once every chart has its box's width again, or after a while (and then fail on it).
      var tries = 0;
      var fitted = function () {
        var doc = wide.contentDocument;
        return Array.prototype.every.call(doc.querySelectorAll("[data-figure]"), function (chart) {
          var svg = chart.querySelector("svg.main-svg");
          return svg && Math.abs(svg.getBoundingClientRect().width - chart.clientWidth) <= 2;
        });
      };
      var waitResized = function () {
        if (fitted() || tries++ > 80) {
          results.resized = measure(wide);
          results.resized.resize_polls = tries;
          phone.src = wide.getAttribute("data-src");
        } else {
          setTimeout(waitResized, 100);
        }
      };
      // Headless Chromium under virtual time does not always deliver a frame's resize event:
      // deliver it, as a browser window does, when it has not come.
      var resized = false;
      wide.contentWindow.addEventListener("resize", function () { resized = true; });
      setTimeout(function () {
        if (!resized) { wide.contentWindow.dispatchEvent(new Event("resize")); }
        setTimeout(waitResized, 300);
      }, 300);
      wide.style.width = "1000px";
    });
  });
  phone.addEventListener("load", function () {
    whenDrawn(phone, function () {
      results.phone = measure(phone);
      finish();
    });
  });
  wide.src = wide.getAttribute("data-src");
})();
