"use strict";
// Shared by the chat and the trace browser: the status line and API calls (elements, colours,
// the tooltip and the chart come from the page kit, kit.js).
const Lab = (function () {
  const status = document.getElementById("status");

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

  return { say, getJSON, stream, ApiError };
})();
