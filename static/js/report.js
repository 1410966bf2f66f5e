/* A report's chart, drawn from its JSON data island. */
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    var charts = window.MailgateCharts;
    var data = charts && charts.readData("report-data");
    var canvas = document.getElementById("report-chart");
    if (!data || !canvas || !window.Chart) { return; }
    if (data.type === "stacked") {
      charts.stackedBar(canvas, data);
    } else {
      charts.simpleBar(canvas, data.labels, data.series[0].data, data.series[0].label, "#f59e0b");
    }
    document.documentElement.dataset.chartsReady = "1";
  });
})();
