// The live page: the latest archived alerts, then every new alert as it arrives on the server-sent
// event stream (GET /api/v1/stream), both through the filter typed in the page (the language of
// `broker subscribe --filter`).

import { api, alertCard, authHeaders, el, parseJSON, tickAges } from "./common.js";

const MAX_CARDS = 300;
const PRESETS = [
  "rb > 0.8",
  "rb > 0.8 and snr > 10",
  "anomaly > 0.9",
  "ndet('r') >= 2",
  "classification.label == 'SN'",
  "not context.moving",
  "filter == 'g'",
];

const input = document.getElementById("filter");
const form = document.getElementById("filterform");
const problem = document.getElementById("filtererror");
const cards = document.getElementById("cards");
const dot = document.getElementById("streamdot");
const state = document.getElementById("streamstate");
const stats = document.getElementById("stats");
let controller = null;
let live = 0;
let retry = null;

function shownIds() { return new Set([...cards.children].map((c) => c.dataset.alertId)); }

function counts() {
  stats.textContent = `${cards.children.length} alert(s) shown · ${live} arrived live since the page opened`;
}

function setState(kind, text, detail) {
  dot.className = `dot ${kind}`;
  state.textContent = text;
  state.title = detail || text;
}

function add(alert, fresh) {
  if (shownIds().has(String(alert.alert_id))) return;
  const card = alertCard(alert, fresh ? { fresh: true, received: Date.now() } : {});
  if (fresh) cards.prepend(card); else cards.append(card);
  while (cards.children.length > MAX_CARDS) cards.lastElementChild.remove();
}

async function loadLatest(filter) {
  const q = new URLSearchParams({ limit: "60" });
  if (filter) q.set("filter", filter);
  const page = await api(`/api/v1/alerts?${q}`);
  cards.replaceChildren();
  for (const a of page.items) add(a, false);
  if (!page.items.length) cards.append(el("p", { class: "dim", id: "empty" }, "No archived alert matches yet: new ones appear here as they arrive."));
}

// Parse a text/event-stream body: calls onEvent(name, data) per event.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, data.join("\n"));
    }
  }
}

async function stream(filter) {
  controller = new AbortController();
  const mine = controller;
  const q = filter ? `?${new URLSearchParams({ filter })}` : "";
  setState("", "connecting…");
  try {
    const res = await fetch(`/api/v1/stream${q}`, { headers: { Accept: "text/event-stream", ...authHeaders() },
      signal: mine.signal });
    if (!res.ok) {
      let detail = `HTTP ${res.status}`;
      try { detail = (await res.json()).detail || detail; } catch (e) { /* not JSON */ }
      setState("down", res.status === 503 ? "archive only (no live stream)" : `no live stream (HTTP ${res.status})`, detail);
      if (res.status >= 500) retry = setTimeout(() => stream(filter), 10000);
      return;
    }
    setState("live", "live");
    await readEvents(res.body, (name, data) => {
      if (name === "alert") {
        document.getElementById("empty")?.remove();
        live += 1;
        add(parseJSON(data), true);
        counts();
      } else if (name === "status") {
        const s = JSON.parse(data);
        setState(s.state === "live" ? "live" : "down", s.state === "live" ? "live" : `stream ${s.state}`, s.message);
      }
    });
    setState("down", "stream ended; reconnecting…");
  } catch (e) {
    if (mine.signal.aborted) return;
    setState("down", "stream lost; reconnecting…");
  }
  if (!mine.signal.aborted) retry = setTimeout(() => stream(filter), 3000);
}

async function apply(filter) {
  clearTimeout(retry);
  if (controller) controller.abort();
  problem.textContent = "";
  const url = new URL(location.href);
  if (filter) url.searchParams.set("filter", filter); else url.searchParams.delete("filter");
  history.replaceState(null, "", url);
  try {
    await loadLatest(filter);
  } catch (e) {
    if (e.reason === "filter" || e.status === 400 || e.status === 422) {
      problem.textContent = e.message;
      setState("down", "filter refused");
      return;
    }
    cards.replaceChildren(el("p", { class: "notice" }, `Archive not readable: ${e.message}. Live alerts still appear.`));
  }
  counts();
  stream(filter);
}

for (const p of PRESETS) {
  document.getElementById("chips").append(el("button", { class: "chip", type: "button",
    onclick: () => { input.value = p; apply(p); } }, p));
}
form.addEventListener("submit", (ev) => { ev.preventDefault(); apply(input.value.trim()); });
document.getElementById("clear").addEventListener("click", () => { input.value = ""; apply(""); });
input.value = new URL(location.href).searchParams.get("filter") || "";
tickAges(cards);
apply(input.value.trim());
