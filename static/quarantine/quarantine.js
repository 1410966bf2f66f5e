// Quarantine page: tick all, confirm a bulk action, and show the progress of bulk jobs.
// A file rather than inline code: the Content-Security-Policy allows scripts from 'self' only.
// (Single forms ask for confirmation through data-confirm, handled by js/app.js.)
(function () {
  "use strict";

  function csrfToken() {
    var input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  var selectAll = document.getElementById("q-select-all");
  if (selectAll) {
    selectAll.addEventListener("change", function () {
      document.querySelectorAll("input[name=ids]").forEach(function (box) {
        box.checked = selectAll.checked;
      });
    });
  }

  var bulkForm = document.getElementById("q-bulk-form");
  if (bulkForm) {
    bulkForm.addEventListener("submit", function (event) {
      var action = bulkForm.elements.action;
      var target = bulkForm.elements.target;
      if (!action || !target) { return; }
      var ticked = bulkForm.querySelectorAll("input[name=ids]:checked").length;
      if (target.value === "selected" && ticked === 0) {
        event.preventDefault();
        window.alert("Tick the messages first, or choose 'all that match'.");
        return;
      }
      var what = target.value === "all" ? target.options[target.selectedIndex].text : ticked + " ticked message(s)";
      var label = action.options[action.selectedIndex].text;
      if (!window.confirm(label.charAt(0).toUpperCase() + label.slice(1) + ": " + what + "?")) {
        event.preventDefault();
      }
    });
  }

  // A running bulk job: ask for its progress until it is done. The poll is a POST because, when no
  // Celery worker is configured, the poll is what works the next chunk (a GET never changes anything).
  function poll(box) {
    var url = box.getAttribute("data-status-url");
    var bar = box.querySelector(".q-job-bar");
    var count = box.querySelector(".q-job-count");
    var summary = box.querySelector(".q-job-summary");
    var reload = box.querySelector(".q-job-reload");
    var failures = 0;

    function step() {
      fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: {"X-CSRFToken": csrfToken(), "Accept": "application/json"}
      }).then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      }).then(function (job) {
        failures = 0;
        bar.max = Math.max(job.total, 1);
        bar.value = job.done;
        count.textContent = job.done + " / " + job.total;
        if (job.finished) {
          box.classList.add("q-job-finished");
          summary.textContent = job.summary;
          reload.hidden = false;
        } else {
          summary.textContent = "";
          window.setTimeout(step, 500);
        }
      }).catch(function () {
        failures += 1;
        summary.textContent = "Waiting for the server…";
        window.setTimeout(step, Math.min(10000, 1000 * failures));
      });
    }
    step();
  }
  document.querySelectorAll(".q-job[data-status-url]").forEach(poll);
})();
