// Draws the charts from the figure specs embedded in this page (built by fusion_advisor.report.charts).
(function () {
  "use strict";
  var figures = JSON.parse(document.getElementById("fa-figures").textContent);
  var config = {displaylogo: false, responsive: true, toImageButtonOptions: {format: "png", scale: 2}};
  var divs = document.querySelectorAll("[data-figure]");
  if (divs.length && typeof Plotly === "undefined") {
    console.error("plotly.js is missing from this page: the charts cannot be drawn");
    return;
  }
  var pending = [];
  Array.prototype.forEach.call(divs, function (div) {
    var name = div.getAttribute("data-figure");
    var fig = figures[name];
    if (!fig) {
      console.error("no figure named " + name + " in this report");
      return;
    }
    pending.push(Promise.resolve(Plotly.newPlot(div, fig.data, fig.layout, config)).then(function () {
      div.setAttribute("data-rendered", "yes");
    }));
  });
  Promise.all(pending).then(function () {
    document.body.setAttribute("data-charts-rendered", String(pending.length));
  }, function (err) {
    console.error("a chart failed to draw: " + ((err && err.message) || err));
  });
})();
