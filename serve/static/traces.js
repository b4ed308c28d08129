"use strict";
// The trace browser (pertoken serve --traces DIR): stores, their items, an item's tokens.
(function () {
  const $ = id => document.getElementById(id);
  const T = { store: null, items: null, tokens: null, item: null };

  function show(traces) {
    $("chat-view").hidden = traces;
    $("traces-view").hidden = !traces;
    $("tab-chat").classList.toggle("on", !traces);
    $("tab-traces").classList.toggle("on", traces);
    if (traces && !T.store) loadStores();
  }

  async function loadStores() {
    try {
      const { stores } = await Lab.getJSON("/api/traces");
      $("store").replaceChildren(...stores.map(s => new Option(storeLabel(s), s.name)));
      const first = stores.find(s => !s.damaged);
      if (first) { $("store").value = first.name; await loadItems(first.name); }
    } catch (e) { Lab.say(e.message, true); }
  }
  // A damaged store says so; one traced with another model names that model.
  function storeLabel(s) {
    return s.name + (s.damaged ? " (damaged)" : " (" + s.items + " items)") + (s.model ? " · traced with " + s.model : "");
  }

  async function loadItems(name) {
    T.store = name;
    T.items = await Lab.getJSON("/api/traces/" + encodeURIComponent(name) + "/items");
    const cols = T.items.columns;
    const numeric = cols.filter((c, j) => T.items.rows.some(r => typeof r[j] === "number"));
    $("sort").replaceChildren(new Option("(file order)", ""), ...numeric.map(c => new Option(c, c)));
    renderItems();
  }

  function shownColumns() {
    // The item's own fields and scores; per-vector statistics (dotted names) only when sorted by.
    const cols = T.items.columns.filter(c => !c.includes("."));
    const sort = $("sort").value;
    return sort && !cols.includes(sort) ? cols.concat([sort]) : cols;
  }

  function renderItems() {
    const cols = shownColumns(), all = T.items.columns, sort = $("sort").value;
    let rows = T.items.rows.slice();
    if (sort) {
      const j = all.indexOf(sort);
      rows.sort((a, b) => (b[j] ?? -Infinity) - (a[j] ?? -Infinity));
    }
    const head = Kit.el("tr");
    cols.forEach(c => head.append(Kit.el("th", null, c)));
    const table = $("items");
    table.replaceChildren(head);
    const itemCol = all.indexOf("item");
    for (const r of rows) {
      const tr = Kit.el("tr", "item");
      const id = itemCol >= 0 ? r[itemCol] : rows.indexOf(r);
      tr.dataset.item = String(id);
      for (const c of cols) {
        const v = r[all.indexOf(c)];
        tr.append(Kit.el("td", null, typeof v === "number" && !Number.isInteger(v) ? v.toFixed(3) : String(v ?? "")));
      }
      tr.addEventListener("click", () => loadTokens(String(id), tr));
      table.append(tr);
    }
  }

  async function loadTokens(item, tr) {
    document.querySelectorAll("#items tr.on").forEach(r => r.classList.remove("on"));
    tr.classList.add("on");
    try {
      T.tokens = await Lab.getJSON("/api/traces/" + encodeURIComponent(T.store) + "/tokens?item=" + encodeURIComponent(item));
    } catch (e) { Lab.say(e.message, true); return; }
    T.item = item;
    const keep = $("value").value, names = Object.keys(T.tokens.values);
    $("value").replaceChildren(...names.map(n => new Option(n, n)));
    if (names.includes(keep)) $("value").value = keep;
    renderTokens();
  }

  function renderTokens() {
    const box = $("item-tokens"), f = T.tokens.fields, col = $("value").value;
    const values = T.tokens.values[col] || [];
    const scale = Math.max(1e-9, ...values.filter(v => v !== null).map(Math.abs));
    $("item-title").textContent = T.store + " · item " + T.item;
    box.replaceChildren();
    (f.token || []).forEach((piece, i) => {
      if (f.turn && i > 0 && f.turn[i] !== f.turn[i - 1]) box.append(turnBreak(f, i));
      const span = Kit.el("span", "tok seg-" + (f.segment ? f.segment[i] : "answer"), piece);
      span.dataset.index = String(i);
      Kit.paint(span, values[i], scale);
      span.addEventListener("mousemove", ev => tip(ev, i, col));
      span.addEventListener("mouseleave", Kit.hideTip);
      box.append(span);
    });
    Kit.legend(scale, 2);
  }

  // A line between turns, naming the turn that starts.
  function turnBreak(f, i) {
    const sep = Kit.el("span", "turn-sep", "turn " + f.turn[i] + (f.role ? " · " + f.role[i] : ""));
    sep.setAttribute("role", "separator");
    return sep;
  }

  function tip(ev, i, col) {
    const f = T.tokens.fields, rows = [];
    for (const k of ["role", "segment", "turn", "pos"]) if (f[k]) rows.push([k, String(f[k][i])]);
    for (const [name, vals] of Object.entries(T.tokens.values)) rows.push(name === col ? [[name, "sel"], [vals[i], "sel"]] : [name, vals[i]]);
    Kit.showTip(ev, "token " + i, f.token[i], Kit.table(null, rows));
  }

  $("tab-chat").addEventListener("click", () => show(false));
  $("tab-traces").addEventListener("click", () => show(true));
  $("store").addEventListener("change", () => loadItems($("store").value).then(() => Lab.say(""), e => Lab.say(e.message, true)));
  $("sort").addEventListener("change", renderItems);
  $("value").addEventListener("change", () => { if (T.tokens) renderTokens(); });
})();
