"use strict";
// The page kit shared by pertoken's pages (the trace store page, the lab): elements, colours,
// the tooltip and the line chart. Token text only ever reaches a page through textContent,
// so it never becomes markup.
const Kit = (function () {
  const SVGNS = "http://www.w3.org/2000/svg";
  const tip = () => document.getElementById("tip");

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
  function fmt(x) { return x === null || x === undefined ? "n/a" : (x >= 0 ? "+" : "") + Number(x).toFixed(4); }

  // Symmetric around 0: white at 0, blue below, red above.
  function colour(v, scale) {
    if (v === null || v === undefined) return "";
    const x = Math.max(-1, Math.min(1, scale > 0 ? v / scale : 0));
    const end = x > 0 ? [214, 48, 39] : [49, 99, 206], a = Math.abs(x);
    return "rgb(" + end.map(e => Math.round(255 + (e - 255) * a)).join(",") + ")";
  }
  // A token span coloured by its value; data-value holds the value itself.
  function paint(span, v, scale) {
    const none = v === null || v === undefined;
    span.style.backgroundColor = colour(v, scale);
    span.style.color = none ? "" : scale > 0 && Math.abs(v / scale) > 0.6 ? "#fff" : "#111";
    span.dataset.value = none ? "" : String(v);
  }
  function legend(scale, digits) {
    document.getElementById("scale-lo").textContent = (-scale).toFixed(digits);
    document.getElementById("scale-hi").textContent = "+" + scale.toFixed(digits);
  }

  // The tooltip: a heading, the token's text (as JSON, so spaces and newlines show), then
  // the given nodes.
  function showTip(ev, heading, text, ...nodes) {
    const head = el("div");
    head.append(el("b", "", heading + ": "), el("span", "toktext", JSON.stringify(text)));
    tip().replaceChildren(head, ...nodes);
    tip().style.display = "block";
    moveTip(ev);
  }
  function moveTip(ev) {
    const t = tip(), pad = 14, w = t.offsetWidth, h = t.offsetHeight;
    let x = ev.clientX + pad, y = ev.clientY + pad;
    if (x + w > window.innerWidth) x = Math.max(0, ev.clientX - w - pad);
    if (y + h > window.innerHeight) y = Math.max(0, ev.clientY - h - pad);
    t.style.left = x + "px"; t.style.top = y + "px";
  }
  function hideTip() { tip().style.display = "none"; }
  // A table: a header row (or null), then rows of cells; a cell is text, a number (shown by
  // fmt) or [value, class].
  function table(head, rows) {
    const t = el("table");
    const row = (cells, tag) => {
      const tr = el("tr");
      for (const c of cells) {
        const [v, cls] = Array.isArray(c) ? c : [c, ""];
        tr.append(el(tag, cls, typeof v === "number" || v === null ? fmt(v) : String(v)));
      }
      t.append(tr);
    };
    if (head) row(head, "th");
    rows.forEach(cells => row(cells, "td"));
    return t;
  }

  // Lines of values over tokens on a symmetric y scale in a 1000 x 170 svg. opts: scale
  // (default: the largest |value|), n (tokens on the x axis), bands [{from, to, fill, name}]
  // drawn behind. Returns index(ev): the token under the pointer.
  function drawChart(chart, lines, opts) {
    const W = 1000, H = 170, L = 48, R = 10, T = 10, B = 22;
    const o = opts || {}, n = o.n || Math.max(1, ...lines.map(l => l.values.length));
    let m = o.scale || 0;
    if (!m) lines.forEach(l => l.values.forEach(v => { if (v !== null) m = Math.max(m, Math.abs(v)); }));
    m = m || 1;
    chart.replaceChildren();
    const step = n > 1 ? (W - L - R) / (n - 1) : W - L - R;
    const x = i => L + (n > 1 ? i * step : (W - L - R) / 2);
    const y = v => T + (H - T - B) * (1 - (v / m + 1) / 2);
    for (const b of o.bands || []) {
      const band = svg("rect", { x: Math.max(L, x(b.from) - step / 2), y: T, width: Math.max(1, (b.to - b.from + 1) * step), height: H - T - B, fill: b.fill, "fill-opacity": 0.12 });
      band.dataset.segment = b.name;
      chart.append(band);
    }
    chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
    chart.append(svg("line", { class: "zero", x1: L, y1: y(0), x2: W - R, y2: y(0) }));
    for (const [v, t] of [[m, "+" + m.toPrecision(3)], [0, "0"], [-m, "-" + m.toPrecision(3)]]) {
      const e = svg("text", { x: L - 4, y: y(v) + 4, "text-anchor": "end" });
      e.textContent = t;
      chart.append(e);
    }
    for (const line of lines) {
      const pts = line.values.map((v, i) => v === null ? null : x(i).toFixed(1) + "," + y(v).toFixed(1)).filter(Boolean);
      const attrs = { points: pts.join(" "), fill: "none", stroke: line.colour || "#333", "stroke-width": 1.5, "vector-effect": "non-scaling-stroke" };
      chart.append(svg("polyline", line.id ? { id: line.id, ...attrs } : attrs));
    }
    return ev => {
      const box = chart.getBoundingClientRect(), px = (ev.clientX - box.left) * W / box.width;
      return Math.max(0, Math.min(n - 1, Math.round((px - L) / (n > 1 ? step : 1))));
    };
  }

  return { el, svg, fmt, colour, paint, legend, showTip, moveTip, hideTip, table, drawChart };
})();
