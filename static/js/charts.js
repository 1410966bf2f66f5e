/* Chart helpers shared by the dashboard and the reports. Data comes from <script type="application/json">
   islands written by Django's json_script (parsed, never evaluated), so the page needs no inline script. */
(function () {
  "use strict";

  var COLOURS = {
    clean: "#16a34a", spam: "#f59e0b", high_spam: "#ea580c", virus: "#dc2626",
    blocked_attachment: "#7c3aed", blocked_sender: "#db2777", unscannable: "#0f766e", refused: "#94a3b8"
  };

  function readData(id) {
    var node = document.getElementById(id);
    if (!node) { return null; }
    try { return JSON.parse(node.textContent); } catch (e) { return null; }
  }

  function baseOptions(stacked) {
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: { duration: 300 },
      interaction: { mode: "index", intersect: false },
      plugins: { legend: { position: "bottom", labels: { boxWidth: 12, boxHeight: 12 } } },
      scales: {
        x: { stacked: stacked, grid: { display: false }, ticks: { maxRotation: 0, autoSkipPadding: 12 } },
        y: { stacked: stacked, beginAtZero: true, ticks: { precision: 0 } }
      }
    };
  }

  /* A bar chart stacked by verdict; series whose values are all zero are left out of the legend. */
  function stackedBar(canvas, data) {
    var datasets = (data.series || []).filter(function (s) {
      return s.data.some(function (v) { return v > 0; });
    }).map(function (s) {
      return { label: s.label, data: s.data, backgroundColor: COLOURS[s.key] || "#64748b", borderWidth: 0,
               borderRadius: 2, maxBarThickness: 28 };
    });
    if (!datasets.length) {
      datasets = [{ label: "Messages", data: data.labels.map(function () { return 0; }), backgroundColor: "#cbd5e1" }];
    }
    return new window.Chart(canvas, { type: "bar", data: { labels: data.labels, datasets: datasets },
                                      options: baseOptions(true) });
  }

  function simpleBar(canvas, labels, values, label, colour) {
    var options = baseOptions(false);
    options.plugins.legend.display = false;
    return new window.Chart(canvas, {
      type: "bar",
      data: { labels: labels, datasets: [{ label: label, data: values, backgroundColor: colour || "#2563eb",
                                           borderRadius: 2, maxBarThickness: 28 }] },
      options: options
    });
  }

  window.MailgateCharts = { readData: readData, stackedBar: stackedBar, simpleBar: simpleBar, colours: COLOURS };
})();
