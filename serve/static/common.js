"use strict";
// Shared by the chat and the trace browser: elements, colours, the tooltip, API calls.
// Model text only ever reaches the page through textContent, so it never becomes markup.
const Lab = (function () {
  const SVGNS = "http://www.w3.org/2000/svg";
  const tip = document.getElementById("tip");
  const status = document.getElementById("status");

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function svg(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x) { return x === null || x === undefined ? "n/a" : (x >= 0 ? "+" : "") + x.toFixed(4); }

  // Symmetric around 0: white at 0, blue below, red above.
  function colour(v, scale) {
    if (v === null || v === undefined) return "";
    const x = Math.max(-1, Math.min(1, scale > 0 ? v / scale : 0));
    const end = x > 0 ? [214, 48, 39] : [49, 99, 206], a = Math.abs(x);
    return "rgb(" + end.map(e => Math.round(255 + (e - 255) * a)).join(",") + ")";
  }
  function paint(span, v, scale) {
    span.style.background = colour(v, scale);
    span.style.color = scale > 0 && Math.abs(v / scale) > 0.6 ? "#fff" : "#111";
    span.dataset.value = v === null || v === undefined ? "" : String(v);
  }
  function legend(scale) {
    document.getElementById("scale-lo").textContent = "-" + scale.toFixed(2);
    document.getElementById("scale-hi").textContent = "+" + scale.toFixed(2);
  }

  // rows: [[label, value, selected], ...] under a heading and the token's text.
  function showTip(ev, heading, text, rows) {
    tip.replaceChildren(el("div", null, heading), el("div", "toktext", JSON.stringify(text)));
    const table = el("table");
    for (const [label, value, sel] of rows) {
      const tr = el("tr", sel ? "sel" : "");
      tr.append(el("td", null, label), el("td", null, typeof value === "number" ? fmt(value) : String(value)));
      table.append(tr);
    }
    tip.append(table);
    tip.style.display = "block";
    moveTip(ev);
  }
  function moveTip(ev) {
    const pad = 14, w = tip.offsetWidth, h = tip.offsetHeight;
    tip.style.left = Math.min(ev.clientX + pad, window.innerWidth - w - 4) + "px";
    tip.style.top = (ev.clientY + pad + h > window.innerHeight ? ev.clientY - h - pad : ev.clientY + pad) + "px";
  }
  function hideTip() { tip.style.display = "none"; }

  function say(text, isError) {
    status.textContent = text || "";
    status.className = isError ? "muted error" : "muted";
  }

  function headers() {
    const h = { "Content-Type": "application/json" };
    const key = sessionStorage.getItem("pertoken-key");
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }
  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }
  async function failure(resp) {
    let message = resp.statusText;
    try { message = (await resp.json()).error.message; } catch (_) { /* not our JSON */ }
    return new ApiError(resp.status, message);
  }
  async function getJSON(path) {
    const resp = await fetch(path, { headers: headers() });
    if (!resp.ok) throw await failure(resp);
    return resp.json();
  }

  // POST a streamed chat completion; onChunk(parsed chunk) for every SSE data event.
  async function stream(body, onChunk, signal) {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal,
    });
    if (!resp.ok) throw await failure(resp);
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter(l => l.startsWith("data: ")).map(l => l.slice(6)).join("\n");
        if (!data || data === "[DONE]") continue;
        const parsed = JSON.parse(data);
        if (parsed.error) throw new ApiError(500, parsed.error.message);
        onChunk(parsed);
      }
    }
  }

  return { el, svg, fmt, colour, paint, legend, showTip, moveTip, hideTip, say, getJSON, stream, ApiError };
})();
