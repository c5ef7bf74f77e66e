// Draws the charts from the figure specs embedded in this page (built by fusion_advisor.report.charts),
// and wires the copy buttons of the diffs.
(function () {
  "use strict";
  var figures = JSON.parse(document.getElementById("fa-figures").textContent);
  // Each chart's box has an explicit height (set from its figure): a chart fills its box's width
  // and never grows past its height, so a resize cannot push a chart over the next heading. The
  // charts follow the window's width through the resize handler below.
  var config = {displaylogo: false, responsive: false, toImageButtonOptions: {format: "png", scale: 2}};
  // On a phone the mode bar would cover the legend: it shows on hover elsewhere.
  if (window.innerWidth < 700) { config.displayModeBar = false; }
  var divs = document.querySelectorAll("[data-figure]");
  if (divs.length && typeof Plotly === "undefined") {
    console.error("plotly.js is missing from this page: the charts cannot be drawn");
    return;
  }
  var narrow = window.innerWidth < 700;
  var pending = [];
  Array.prototype.forEach.call(divs, function (div) {
    var name = div.getAttribute("data-figure");
    var fig = figures[name];
    if (!fig) {
      console.error("no figure named " + name + " in this report");
      return;
    }
    var layout = JSON.parse(JSON.stringify(fig.layout));
    if (narrow) {
      // A phone: one legend entry a row, in a smaller font, and the height to hold them; the
      // roofline's side labels would run off the right edge: the legend's colours say the same.
      var entries = fig.data.filter(function (t) { return t.showlegend !== false; }).length;
      layout.legend = Object.assign({}, layout.legend || {},
                                    {font: {size: 10}, entrywidth: 1, entrywidthmode: "fraction", xref: "container", x: 0});
      Object.keys(layout).forEach(function (key) {
        if (/^[xy]axis/.test(key) && layout[key].title) {
          layout[key].title = Object.assign({}, layout[key].title, {font: {size: 10}});
        }
      });
      layout.height = (layout.height || 420) + 60 + 18 * entries;
      layout.margin = Object.assign({}, layout.margin || {}, {l: 50, r: 10});
      layout.annotations = [];
    }
    div.style.height = (layout.height || 420) + "px";
    pending.push(Promise.resolve(Plotly.newPlot(div, fig.data, layout, config)).then(function () {
      div.setAttribute("data-rendered", "yes");
    }));
  });
  var resizing = null;
  window.addEventListener("resize", function () {
    clearTimeout(resizing);
    resizing = setTimeout(function () {
      Array.prototype.forEach.call(divs, function (div) {
        // An explicit width (the box's): plotly's own responsive resize skipped charts at times.
        if (div.getAttribute("data-rendered") === "yes" && div.clientWidth > 0) {
          Plotly.relayout(div, {width: div.clientWidth});
        }
      });
    }, 150);
  });
  Promise.all(pending).then(function () {
    document.body.setAttribute("data-charts-rendered", String(pending.length));
  }, function (err) {
    console.error("a chart failed to draw: " + ((err && err.message) || err));
  });

  Array.prototype.forEach.call(document.querySelectorAll("button.copy"), function (button) {
    button.addEventListener("click", function () {
      var source = document.getElementById(button.getAttribute("data-copy"));
      if (!source) { return; }
      var text = Array.prototype.map.call(source.querySelectorAll("span"), function (s) { return s.textContent; });
      text = text.length ? text.join("\n") + "\n" : source.textContent;
      var done = function () { button.textContent = "Copied"; setTimeout(function () { button.textContent = "Copy"; }, 1500); };
      if (navigator.clipboard && navigator.clipboard.writeText) {
        navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
      } else {
        fallback(text);
        done();
      }
    });
  });

  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.style.position = "fixed";
    area.style.opacity = "0";
    document.body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing more to try offline */ }
    document.body.removeChild(area);
  }
})();
