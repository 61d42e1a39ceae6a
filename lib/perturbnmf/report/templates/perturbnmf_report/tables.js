// Sortable, searchable, paginated report tables, fully offline (no library, nothing fetched).
// Each div.pnmf-itable holds its rows as JSON (display strings, as the static table
// shows them) and a static first page for readers without scripts; this script takes it over.
// A link to the page with ?search=JAK2 opens every table of the page searched for JAK2.
(function () {
  "use strict";
  var PAGE_SIZES = [10, 25, 100, 500];

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function count(n) { return n.toLocaleString("en-US"); }

  // numbers sort by value, the missing mark "–" last; text naturally (TGT2 before TGT10)
  function sortKey(text, isNumber) {
    if (!isNumber) return text;
    var value = parseFloat(text);
    return Number.isNaN(value) ? null : value;
  }

  function compare(a, b, isNumber) {
    if (a === null || b === null) return a === b ? 0 : (a === null ? 1 : -1);
    return isNumber ? a - b : a.localeCompare(b, undefined, {numeric: true, sensitivity: "base"});
  }

  // Space-separated terms must all match (case-insensitive substrings of any cell);
  // a term in double quotes must equal a whole cell ("IRF1" does not match IRF10).
  function matcher(query) {
    var terms = query.match(/"[^"]*"|\S+/g) || [];
    var tests = terms.map(function (term) {
      if (term.length > 1 && term[0] === '"' && term[term.length - 1] === '"') {
        var exact = term.slice(1, -1).toLowerCase();
        return function (cells) { return cells.indexOf(exact) >= 0; };
      }
      var part = term.toLowerCase();
      return function (cells, joined) { return joined.indexOf(part) >= 0; };
    });
    return function (cells, joined) { return tests.every(function (t) { return t(cells, joined); }); };
  }

  function setup(box) {
    var data = JSON.parse(box.querySelector("script[type='application/json']").textContent);
    var table = box.querySelector("table");
    var body = table.tBodies[0] || table.appendChild(document.createElement("tbody"));
    var headers = Array.prototype.slice.call(table.tHead.rows[table.tHead.rows.length - 1].cells);
    var lower = data.rows.map(function (row) { return row.map(function (c) { return String(c).toLowerCase(); }); });
    var joined = lower.map(function (cells) { return cells.join("\u0001"); });
    var state = {shown: data.rows.map(function (_, i) { return i; }), page: 0, size: data.page_size,
                 column: null, ascending: true};

    var bar = element("div", "pnmf-itable-bar");
    var search = element("input");
    search.type = "search";
    search.placeholder = 'Search, e.g. IRF1 ("IRF1": whole cell)';
    search.setAttribute("aria-label", "Search the table");
    var sizes = element("select");
    sizes.setAttribute("aria-label", "Rows per page");
    PAGE_SIZES.concat([state.size]).filter(function (v, i, all) { return all.indexOf(v) === i; })
      .sort(function (a, b) { return a - b; }).forEach(function (n) {
        var option = element("option", null, n + " rows");
        option.value = n;
        option.selected = n === state.size;
        sizes.appendChild(option);
      });
    var previous = element("button", null, "‹ previous");
    var next = element("button", null, "next ›");
    var info = element("span", "pnmf-itable-info");
    [search, sizes, previous, next, info].forEach(function (n) { bar.appendChild(n); });
    box.insertBefore(bar, table);

    function render() {
      var pages = Math.max(1, Math.ceil(state.shown.length / state.size));
      state.page = Math.min(state.page, pages - 1);
      var start = state.page * state.size;
      var rows = state.shown.slice(start, start + state.size);
      var fragment = document.createDocumentFragment();
      rows.forEach(function (i) {
        var tr = element("tr");
        data.rows[i].forEach(function (cell, j) {
          tr.appendChild(element("td", data.numeric[j] ? "pnmf-number" : null, String(cell)));
        });
        fragment.appendChild(tr);
      });
      body.replaceChildren(fragment);
      var total = data.rows.length;
      info.textContent = state.shown.length
        ? "rows " + count(start + 1) + "–" + count(start + rows.length) + " of " + count(state.shown.length)
          + (state.shown.length < total ? " (filtered from " + count(total) + ")" : "")
          + (data.n_total > total ? "; the table holds the first " + count(total) + " of " + count(data.n_total) : "")
        : "no matching rows of " + count(total);
      previous.disabled = state.page === 0;
      next.disabled = state.page >= pages - 1;
      box.setAttribute("data-shown", String(state.shown.length));
    }

    function filter() {
      var test = matcher(search.value.trim());
      state.shown = [];
      for (var i = 0; i < data.rows.length; i++) if (test(lower[i], joined[i])) state.shown.push(i);
      sortShown();
      state.page = 0;
      render();
    }

    function sortShown() {
      if (state.column === null) return;
      var j = state.column, isNumber = data.numeric[j], sign = state.ascending ? 1 : -1;
      var keys = data.rows.map(function (row) { return sortKey(String(row[j]), isNumber); });
      state.shown.sort(function (a, b) {
        var missing = keys[a] === null || keys[b] === null;
        var order = compare(keys[a], keys[b], isNumber);
        return (missing ? order : sign * order) || a - b;
      });
    }

    headers.forEach(function (th, j) {
      th.classList.add("pnmf-sortable");
      th.tabIndex = 0;
      th.title = "Sort by this column";
      function sortBy() {
        state.ascending = state.column === j ? !state.ascending : true;
        state.column = j;
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", state.ascending ? "ascending" : "descending");
        sortShown();
        state.page = 0;
        render();
      }
      th.addEventListener("click", sortBy);
      th.addEventListener("keydown", function (event) { if (event.key === "Enter") sortBy(); });
    });
    search.addEventListener("input", filter);
    sizes.addEventListener("change", function () { state.size = parseInt(sizes.value, 10); state.page = 0; render(); });
    previous.addEventListener("click", function () { state.page -= 1; render(); });
    next.addEventListener("click", function () { state.page += 1; render(); });
    box.classList.add("pnmf-itable-ready");
    var linked = new URLSearchParams(window.location.search).get("search");
    if (linked) {
      search.value = linked;
      filter();
    } else {
      render();
    }
  }

  function setupAll() {
    document.querySelectorAll("div.pnmf-itable:not(.pnmf-itable-ready)").forEach(setup);
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", setupAll);
  else setupAll();
})();
