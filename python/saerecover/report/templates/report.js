// Sorting and filtering of the report's tables; no library, nothing fetched.
// A click on a header sorts by that column (again: the other way); the example table's
// controls filter its rows. The view can be set in the address: #sort=COLUMN:asc|desc,
// &mode=MODE, &recovered=yes|no|failed, &q=TEXT (COLUMN: a header's data-key or number).
(function () {
  "use strict";
  var errors = [];
  window.addEventListener("error", function (e) {
    errors.push(String(e.message));
    var box = document.getElementById("js-errors");
    if (box) { box.hidden = false; box.textContent = "script error: " + errors.join("\n"); }
  });

  // A cell's sort key: its data-value (a number, or "" for none) or its text; numbers first.
  function key(td) {
    var raw = td.hasAttribute("data-value") ? td.getAttribute("data-value") : td.textContent.trim();
    if (raw === "" || raw === "n/a") { return { num: false, v: "" }; }
    var x = Number(raw);
    return isNaN(x) ? { num: false, v: raw.toLowerCase() } : { num: true, v: x };
  }

  function compare(a, b) {
    if (a.num && b.num) { return a.v - b.v; }
    if (a.num !== b.num) { return a.num ? -1 : 1; }  // values before blanks
    return a.v < b.v ? -1 : a.v > b.v ? 1 : 0;
  }

  function sortBy(table, col, dir) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = dir === "desc" ? -1 : 1;
    rows = rows.map(function (r, i) { return { r: r, i: i, k: key(r.cells[col]) }; });
    rows.sort(function (a, b) {
      var blankA = !a.k.num && a.k.v === "", blankB = !b.k.num && b.k.v === "";
      if (blankA !== blankB) { return blankA ? 1 : -1; }  // blanks last either way
      return sign * compare(a.k, b.k) || a.i - b.i;
    });
    rows.forEach(function (x) { body.appendChild(x.r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, j) {
      if (j === col) { th.setAttribute("aria-sort", dir === "desc" ? "descending" : "ascending"); }
      else { th.removeAttribute("aria-sort"); }
    });
  }

  function column(table, name) {
    var ths = table.tHead.rows[0].cells;
    for (var j = 0; j < ths.length; j++) {
      if (ths[j].getAttribute("data-key") === name) { return j; }
    }
    var n = parseInt(name, 10);
    return isNaN(n) || n < 0 || n >= ths.length ? -1 : n;
  }

  function filterExamples() {
    var table = document.getElementById("examples");
    if (!table) { return; }
    var q = document.getElementById("filter-text").value.trim().toLowerCase();
    var mode = document.getElementById("filter-mode").value;
    var rec = document.getElementById("filter-recovered").value;
    var shown = 0, rows = table.tBodies[0].rows;
    for (var i = 0; i < rows.length; i++) {
      var r = rows[i];
      var ok = (!mode || r.getAttribute("data-mode") === mode) &&
               (!rec || r.getAttribute("data-recovered") === rec) &&
               (!q || r.textContent.toLowerCase().indexOf(q) >= 0);
      r.hidden = !ok;
      if (ok) { shown++; }
    }
    document.getElementById("example-count").textContent = "showing " + shown + " of " + rows.length;
  }

  function fromAddress() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var eq = part.indexOf("=");
      if (eq > 0) { out[decodeURIComponent(part.slice(0, eq))] = decodeURIComponent(part.slice(eq + 1)); }
    });
    return out;
  }

  function init() {
    Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, j) {
        th.addEventListener("click", function () {
          sortBy(table, j, th.getAttribute("aria-sort") === "ascending" ? "desc" : "asc");
        });
      });
    });
    var table = document.getElementById("examples");
    if (table) {
      var view = fromAddress();
      var controls = { "filter-text": view.q, "filter-mode": view.mode, "filter-recovered": view.recovered };
      Object.keys(controls).forEach(function (id) {
        var el = document.getElementById(id);
        if (controls[id] !== undefined) { el.value = controls[id]; }
        el.addEventListener("input", filterExamples);
        el.addEventListener("change", filterExamples);
      });
      if (view.sort) {
        var parts = view.sort.split(":"), col = column(table, parts[0]);
        if (col >= 0) { sortBy(table, col, parts[1] === "desc" ? "desc" : "asc"); }
      }
      filterExamples();
    }
    document.body.setAttribute("data-ready", errors.length ? "errors" : "yes");
  }

  // Figures are embedded; record how many decoded (a broken one shows as "n-1/n").
  window.addEventListener("load", function () {
    var imgs = document.images, ok = 0;
    for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) { ok++; } }
    document.body.setAttribute("data-images", ok + "/" + imgs.length);
  });

  init();
})();
