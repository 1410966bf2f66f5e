/* The dashboard: draws its three charts, then keeps the "Latest messages" table fresh by polling the JSON API.
   Rows are built with textContent only: a subject is whatever a stranger wrote. */
(function () {
  "use strict";
  var POLL_MS = 15000;

  function drawCharts() {
    var charts = window.MailgateCharts;
    var data = charts && charts.readData("dashboard-data");
    if (!data || !window.Chart) { return; }
    charts.stackedBar(document.getElementById("chart-hourly"), data.hourly);
    charts.stackedBar(document.getElementById("chart-daily"), data.daily);
    charts.simpleBar(document.getElementById("chart-scores"),
                     data.scores.labels.length ? data.scores.labels : ["—"],
                     data.scores.data.length ? data.scores.data : [0], "Messages", "#f59e0b");
    document.documentElement.dataset.chartsReady = "1";
  }

  var BADGES = { clean: "clean", spam: "spam", high_spam: "high-spam", virus: "virus",
                 blocked_attachment: "blocked", blocked_sender: "blocked-sender", unscannable: "unscannable" };
  var LABELS = { clean: "Clean", spam: "Spam", high_spam: "High spam", virus: "Virus",
                 blocked_attachment: "Blocked attachment", blocked_sender: "Blocked sender",
                 unscannable: "Unscannable" };

  function cell(text, className) {
    var td = document.createElement("td");
    if (className) { td.className = className; }
    td.textContent = text;
    return td;
  }

  function badge(m) {
    var span = document.createElement("span");
    if (m.state === "refused") {
      span.className = "badge badge-refused";
      span.textContent = (m.refusal_reason || "refused").replace(/_/g, " ");
    } else if (!m.verdict) {
      span.className = "badge badge-pending";
      span.textContent = m.state.replace(/_/g, " ");
    } else {
      span.className = "badge badge-" + (BADGES[m.verdict] || "other");
      span.textContent = LABELS[m.verdict] || m.verdict;
    }
    return span;
  }

  function row(m) {
    var tr = document.createElement("tr");
    var time = document.createElement("time");
    time.dateTime = m.received_at;
    // The API gives the appliance's local time with its offset; show its wall clock, as the server-drawn rows.
    time.textContent = m.received_at.slice(11, 19);
    var first = cell("", "nowrap");
    first.appendChild(time);
    tr.appendChild(first);
    tr.appendChild(cell(m.sender || "<>", "ellipsis"));
    tr.appendChild(cell(m.recipients.join(", "), "ellipsis"));
    var subject = cell("", "ellipsis");
    var link = document.createElement("a");
    link.href = new URL(m.url, window.location.href).pathname;
    link.textContent = m.subject || "(no subject)";
    subject.appendChild(link);
    tr.appendChild(subject);
    tr.appendChild(cell(m.spam_score === null ? "" : m.spam_score.toFixed(1), "num"));
    var verdict = cell("");
    verdict.appendChild(badge(m));
    tr.appendChild(verdict);
    return tr;
  }

  function poll() {
    var body = document.getElementById("latest-body");
    var status = document.getElementById("latest-status");
    if (!body || document.hidden) { return; }
    fetch(body.dataset.url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (data) {
        var rows = data.results.map(row);
        if (!rows.length) { return; }
        body.replaceChildren.apply(body, rows);
        if (status) { status.textContent = "Updated " + new Date().toLocaleTimeString([], { hour12: false }); }
      })
      .catch(function () {
        if (status) { status.textContent = "Could not refresh; retrying"; }
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    window.setInterval(poll, POLL_MS);
    document.addEventListener("visibilitychange", function () { if (!document.hidden) { poll(); } });
  });
})();
