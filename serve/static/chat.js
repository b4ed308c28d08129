"use strict";
// The chat: sliders per vector, streamed replies coloured by projection, compare, edit and
// regenerate, and a chart of the last reply's projection over its tokens.
(function () {
  const $ = id => document.getElementById(id);
  const S = { info: null, turns: [], scale: 0, busy: false, abort: null };
  window.lab = S;  // for the curious (and the browser test)

  async function start() {
    try {
      S.info = await Lab.getJSON("/api/info");
    } catch (e) {
      if (e.status === 401) { $("key-form").hidden = false; Lab.say("this server needs its API key", true); return; }
      Lab.say(e.message, true);
      return;
    }
    $("key-form").hidden = true;
    const p = S.info.pertoken;
    $("model").textContent = S.info.id + " · " + p.backend + " · " + p.dtype;
    $("tab-traces").hidden = !p.traces;
    buildSliders(p);
    buildColour(p);
    Lab.say(p.vectors.length ? "" : "no vectors loaded: start the server with --vector NAME=V.pt");
    document.body.dataset.ready = "1";
    window.dispatchEvent(new CustomEvent("lab-ready", { detail: S.info }));
  }

  // ---------------------------------------------------------------- steering panel
  function buildSliders(p) {
    const box = $("sliders");
    box.replaceChildren();
    p.vectors.forEach((name, k) => {
      const div = Kit.el("div", "vec");
      div.dataset.vector = name;
      const row = Kit.el("select", "row");
      for (let L = 1; L <= p.n_layers; L++) row.append(new Option("layer " + L, L));
      row.value = String(p.layers[0] || Math.max(1, Math.floor(p.n_layers / 2)));
      // the operator: add coef * v, project v out, or cap the projection at the value
      const op = Kit.el("select", "op");
      for (const [v, label] of [["add", "add"], ["ablate", "ablate"], ["cap", "cap \u2264"]]) op.append(new Option(label, v));
      // The slider moves the value; the number box holds it exactly (any value).
      const coef = Kit.el("input", "coef");
      Object.assign(coef, { type: "range", value: "0", id: "coef-" + k });
      const exact = Kit.el("input", "exact");
      Object.assign(exact, { type: "number", value: "0", step: "any", id: "exact-" + k });
      exact.setAttribute("aria-label", name + " coefficient");
      coef.addEventListener("input", () => { exact.value = String(Number(coef.value)); });
      exact.addEventListener("input", () => { if (exact.value !== "") coef.value = exact.value; });
      op.addEventListener("change", () => { coef.disabled = exact.disabled = op.value === "ablate"; });
      op.id = "op-" + k;
      div.append(Kit.el("div", "name", name), row, op, coef, exact);
      box.append(div);
    });
    setRange();
  }
  function setRange() {
    const r = Math.max(0.1, Number($("range").value) || 8);
    for (const c of document.querySelectorAll("#sliders .coef")) {
      Object.assign(c, { min: String(-r), max: String(r), step: String(r / 100) });
    }
  }
  function steerTerms() {
    return [...document.querySelectorAll("#sliders .vec")]
      .map(d => steerTerm(d.dataset.vector, Number(d.querySelector(".row").value),
                          d.querySelector(".op").value, Number(d.querySelector(".exact").value)))
      .filter(t => t.op === "ablate" || (Number.isFinite(t.coef ?? t.hi) && (t.op !== "add" || t.coef !== 0)));
  }
  function steerTerm(vector, layer, op, value) {
    if (op === "ablate") return { vector, layer, op };
    if (op === "cap") return { vector, layer, op, hi: value };
    return { vector, layer, op: "add", coef: value };
  }
  function buildColour(p) {
    $("colour-vector").replaceChildren(...p.vectors.map((n, k) => new Option(n, k)));
    $("colour-row").replaceChildren(...p.layers.map((L, j) => new Option("layer " + L, j)));
  }
  function sel() { return [Number($("colour-vector").value || 0), Number($("colour-row").value || 0)]; }
  function monitoring() { return S.info && S.info.pertoken.vectors.length > 0 && S.info.pertoken.layers.length > 0; }

  // ---------------------------------------------------------------- conversation
  function history(t) {
    const msgs = [];
    const system = $("system").value.trim();
    if (system) msgs.push({ role: "system", content: system });
    for (let i = 0; i < t; i++) {
      msgs.push({ role: "user", content: S.turns[i].user });
      msgs.push({ role: "assistant", content: S.turns[i].replies[0] ? S.turns[i].replies[0].text : "" });
    }
    msgs.push({ role: "user", content: S.turns[t].user });
    return msgs;
  }

  async function runTurn(t) {
    if (S.busy) return;
    S.turns.length = t + 1;  // a changed turn makes the later ones moot
    const turn = S.turns[t], steer = steerTerms();
    turn.replies = [{ label: steer.length ? "steered" : "reply", steer }];
    if ($("compare").checked && steer.length) turn.replies.push({ label: "unsteered", steer: [] });
    for (const r of turn.replies) Object.assign(r, { text: "", tokens: [], proj: [], spans: [] });
    setBusy(true);
    renderTurns();
    S.abort = new AbortController();
    try {
      await Promise.all(turn.replies.map(r => streamReply(t, r)));
      Lab.say("");
    } catch (e) {
      if (e.name !== "AbortError") Lab.say(e.message, true);
    } finally {
      S.abort = null;
      setBusy(false);
      replyChart();
    }
  }

  async function streamReply(t, reply) {
    const body = {
      model: S.info.id, messages: history(t), stream: true,
      max_tokens: Number($("max-tokens").value) || 200,
      temperature: Number($("temperature").value) || 0,
      steer: reply.steer, positions: $("positions").value, monitor: monitoring(),
    };
    await Lab.stream(body, chunk => {
      const c = chunk.choices && chunk.choices[0];
      if (!c) return;
      const text = (c.delta && c.delta.content) || "";
      reply.text += text;
      if (chunk.pertoken) chunk.pertoken.tokens.forEach((piece, i) => addToken(reply, piece, chunk.pertoken.projections[i]));
      else if (text) addToken(reply, text, null);
    }, S.abort.signal);
  }

  function addToken(reply, piece, proj) {
    const i = reply.tokens.length;
    reply.tokens.push(piece);
    reply.proj.push(proj);
    const span = Kit.el("span", "tok", piece);
    span.dataset.index = String(i);
    span.addEventListener("mousemove", ev => tokenTip(ev, reply, i));
    span.addEventListener("mouseleave", Kit.hideTip);
    reply.spans.push(span);
    reply.box.append(span);
    const v = value(proj);
    if (v !== null && Math.abs(v) > S.scale) recolour();
    else Kit.paint(span, v, S.scale);
  }
  function value(proj) { const [k, j] = sel(); return proj ? proj[k][j] : null; }

  function recolour() {
    S.scale = 0;
    for (const r of allReplies()) for (const p of r.proj) { const v = value(p); if (v !== null) S.scale = Math.max(S.scale, Math.abs(v)); }
    for (const r of allReplies()) r.spans.forEach((s, i) => Kit.paint(s, value(r.proj[i]), S.scale));
    Kit.legend(S.scale || 1, 2);
  }
  // A tooltip row, every cell marked when it is the coloured one.
  function mark(cells, on) { return on ? cells.map(c => [c, "sel"]) : cells; }
  function allReplies() { return S.turns.flatMap(t => t.replies || []); }

  function tokenTip(ev, reply, i) {
    const p = S.info.pertoken, proj = reply.proj[i], [k0, j0] = sel(), rows = [];
    if (proj) p.vectors.forEach((n, k) => p.layers.forEach((L, j) => rows.push(mark([n + " @ layer " + L, proj[k][j]], k === k0 && j === j0))));
    Kit.showTip(ev, reply.label + " · token " + i, reply.tokens[i], Kit.table(null, rows));
  }

  // ---------------------------------------------------------------- rendering
  function renderTurns() {
    const box = $("turns");
    box.replaceChildren();
    S.turns.forEach((turn, t) => {
      const wrap = Kit.el("div", "turn");
      wrap.append(userCard(turn, t));
      const replies = Kit.el("div", "replies");
      for (const r of turn.replies || []) {
        const card = Kit.el("div", "card reply");
        card.dataset.label = r.label;
        const head = Kit.el("h3", null, r.label + (r.steer.length ? ": " + describe(r.steer) : ""));
        if (r === turn.replies[0]) head.prepend(actionButtons([["Regenerate", () => runTurn(t)]]));
        r.box = Kit.el("div", "tokens");
        r.box.append(...r.spans);
        card.append(head, r.box);
        replies.append(card);
      }
      wrap.append(replies);
      box.append(wrap);
    });
  }
  function describe(steer) { return steer.map(s => s.vector + "@" + s.layer + " " + describeOp(s)).join(", "); }
  function describeOp(s) {
    if (s.op === "ablate") return "ablated";
    if (s.op === "cap") return "cap \u2264 " + s.hi.toFixed(2);
    return (s.coef >= 0 ? "+" : "") + s.coef;
  }
  function actionButtons(list) {
    const span = Kit.el("span", "actions");
    for (const [label, fn] of list) {
      const b = Kit.el("button", null, label);
      b.type = "button";
      b.addEventListener("click", fn);
      span.append(b);
    }
    return span;
  }
  function userCard(turn, t) {
    const card = Kit.el("div", "card user");
    const text = Kit.el("div", "text", turn.user);
    card.append(actionButtons([["Edit", () => editTurn(card, turn, t)]]), text);
    return card;
  }
  function editTurn(card, turn, t) {
    if (S.busy) return;
    const area = Kit.el("textarea");
    area.value = turn.user;
    area.rows = 3;
    card.replaceChildren(area, actionButtons([
      ["Save and regenerate", () => { turn.user = area.value; runTurn(t); }],
      ["Cancel", renderTurns],
    ]));
    area.focus();
  }
  function setBusy(on) {
    S.busy = on;
    $("send").disabled = on;
    $("busy").hidden = !on;
    document.body.dataset.busy = on ? "1" : "0";
  }

  function replyChart() {
    const chart = $("chart"), last = S.turns[S.turns.length - 1];
    const replies = last ? last.replies.filter(r => r.proj.some(p => p)) : [];
    const n = Math.max(2, ...replies.map(r => r.proj.length));
    const colours = ["#d6302a", "#777777", "#1b6ac9"], key = $("chart-key");
    const lines = replies.map((r, ri) => ({ values: r.proj.map(p => p ? value(p) : null), colour: colours[ri % 3] }));
    const index = Kit.drawChart(chart, lines, { scale: S.scale || 1, n });
    key.replaceChildren();
    replies.forEach((r, ri) => {
      // The key: a swatch of each line's colour and what the line is.
      const item = Kit.el("span", "key");
      const swatch = Kit.el("span", "swatch");
      swatch.style.background = colours[ri % 3];
      item.append(swatch, Kit.el("span", null, r.label + (r.steer.length ? " (" + describe(r.steer) + ")" : "")));
      key.append(item);
    });
    chart.onmousemove = ev => {
      const idx = index(ev);
      document.querySelectorAll(".tok.hl").forEach(s => s.classList.remove("hl"));
      for (const r of replies) if (r.spans[idx]) { r.spans[idx].classList.add("hl"); tokenTip(ev, r, idx); }
    };
    chart.onmouseleave = () => { Kit.hideTip(); document.querySelectorAll(".tok.hl").forEach(s => s.classList.remove("hl")); };
  }

  // ---------------------------------------------------------------- wiring
  $("composer").addEventListener("submit", ev => {
    ev.preventDefault();
    const text = $("input").value;
    if (!text.trim() || S.busy || !S.info) return;
    $("input").value = "";
    S.turns.push({ user: text, replies: [] });
    runTurn(S.turns.length - 1);
  });
  $("input").addEventListener("keydown", ev => {
    if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
  });
  $("range").addEventListener("change", setRange);
  for (const id of ["colour-vector", "colour-row"]) $(id).addEventListener("change", () => { recolour(); replyChart(); });
  $("new-chat").addEventListener("click", () => {
    if (S.abort) S.abort.abort();
    S.turns = [];
    S.scale = 0;
    renderTurns();
    replyChart();
  });
  $("key-form").addEventListener("submit", ev => {
    ev.preventDefault();
    sessionStorage.setItem("pertoken-key", $("key").value);
    start();
  });
  start();
})();
