// ocsync web pages: live progress and confirmations. Every page works
// without this script; it only saves reloads and asks before an abort.
(function () {
  'use strict';

  var POLL_MS = 1000;

  // Elements marked data-live are runs that have not ended: their
  // progress, counts and error count are refreshed in place; when a run's
  // status changes the page is reloaded, so the server renders what the
  // new status shows (end time, "(Aborted)", the error report link).
  function liveRuns() {
    return Array.prototype.slice.call(document.querySelectorAll('[data-live][data-run-id]'));
  }

  function setText(root, selector, text) {
    root.querySelectorAll(selector).forEach(function (el) { el.textContent = String(text); });
  }

  function update(node, run) {
    setText(node, '[data-field="done"]', run.done);
    setText(node, '[data-field="total"]', run.total === null ? '?' : run.total);
    setText(node, '[data-field="errors"]', run.errors);
    node.querySelectorAll('progress').forEach(function (bar) {
      if (run.total) {
        bar.max = run.total;
        bar.value = Math.min(run.done, run.total);
        bar.textContent = run.done + ' of ' + run.total;
      } else {
        bar.textContent = run.done + ' subjects';
      }
    });
    node.querySelectorAll('[data-count]').forEach(function (el) {
      var key = el.getAttribute('data-count').split('.');
      var entity = run.counts[key[0]];
      if (entity && key[1] in entity) { el.textContent = String(entity[key[1]]); }
    });
  }

  function poll() {
    var nodes = liveRuns();
    if (nodes.length === 0) { return; }
    var ids = nodes.map(function (n) { return n.getAttribute('data-run-id'); });
    fetch('/ui/progress?ids=' + encodeURIComponent(ids.join(',')), {
      credentials: 'same-origin',
      headers: { 'Accept': 'application/json' }
    }).then(function (res) {
      if (!res.ok) { throw new Error('HTTP ' + res.status); }
      return res.json();
    }).then(function (data) {
      var changed = false;
      data.runs.forEach(function (run) {
        nodes.forEach(function (node) {
          if (node.getAttribute('data-run-id') !== run.id) { return; }
          if (node.getAttribute('data-status') !== run.status) {
            changed = true;
          } else {
            update(node, run);
          }
        });
      });
      if (changed) {
        window.location.reload();
      } else {
        window.setTimeout(poll, POLL_MS);
      }
    }).catch(function () {
      // Signed out, or the server is away: the page stays as it was.
    });
  }

  // Forms with data-confirm ask first; the answer travels as
  // confirmed=yes. Without this script the server asks on a page.
  document.addEventListener('submit', function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute('data-confirm');
    if (!question) { return; }
    if (!window.confirm(question)) {
      ev.preventDefault();
      return;
    }
    var confirmed = form.querySelector('input[name="confirmed"]');
    if (confirmed) { confirmed.value = 'yes'; }
  });

  // Synchronize Records: the subject list belongs to "Selected subjects".
  function syncForm() {
    var list = document.getElementById('subjects');
    if (!list) { return; }
    var radios = document.querySelectorAll('input[name="mode"]');
    function apply() {
      var selected = document.getElementById('mode-subjects');
      list.disabled = !(selected && selected.checked);
    }
    radios.forEach(function (r) { r.addEventListener('change', apply); });
    apply();
  }

  function start() {
    syncForm();
    if (liveRuns().length > 0) { window.setTimeout(poll, POLL_MS); }
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', start);
  } else {
    start();
  }
}());
