// The watchlist page: a CSV of targets (a file, or pasted) sent to POST /api/v1/crossmatch with the
// browser's token; the archived alerts near each target come back as a table, and as a CSV download.
// With a token, the lists saved under it (/api/v1/watchlists) are listed: save the list in the form
// under a name, load one into the form, show its matches (since the MJD of the form), delete one.

import { ApiError, api, authHeaders, bandTag, el, fmt, mjdDate, scoreMeter, token } from "./common.js";

const form = document.getElementById("watchform");
const state = document.getElementById("watchstate");
const result = document.getElementById("matches");
const download = document.getElementById("download");
const SAVED = "/api/v1/watchlists";
// What "Download CSV" downloads: the matches of the form's list, or of the saved list shown.
let shown = null;

function watchlistBody() {
  const file = document.getElementById("watchfile").files[0];
  const text = document.getElementById("watchtext").value;
  const body = new FormData();
  body.append("watchlist", file || new Blob([text], { type: "text/csv" }), file ? file.name : "watchlist.csv");
  return body;
}

function radius() { return document.getElementById("watchradius").value.trim() || "2"; }

function query(format) {
  const q = new URLSearchParams({ limit: "10000", format });
  const since = document.getElementById("watchsince").value.trim();
  if (since) q.set("since_mjd", since);
  if (shown !== null) return `${SAVED}/${encodeURIComponent(shown)}/matches?${q}`;
  q.set("radius_arcsec", radius());
  return `/api/v1/crossmatch?${q}`;
}

function row(m) {
  return el("tr", { class: "match" },
    el("td", {}, m.watch.name),
    el("td", { class: "num" }, fmt(m.distance_arcsec, 2)),
    el("td", {}, el("a", { href: `/objects/${encodeURIComponent(m.object_id)}` }, m.object_id)),
    el("td", {}, mjdDate(m.mjd)),
    el("td", {}, bandTag(m.band)),
    el("td", { class: "num" }, fmt(m.magpsf, 2)),
    el("td", {}, scoreMeter("real/bogus", m.rb, "rb")),
    el("td", {}, m.class ? `${m.class} ${fmt(m.class_probability)}` : "–"),
    el("td", {}, el("a", { href: `/frames/${encodeURIComponent(m.frame_id)}` }, m.frame_id)));
}

export function render(r) {
  const more = r.matched > r.items.length ? ` (the first ${r.items.length} shown)` : "";
  const of = shown === null ? "" : ` of the saved list ${shown}`;
  result.replaceChildren(el("div", { class: "panel" },
    el("p", { id: "watchsummary" },
      `${r.matched} alert(s) near ${r.entries_matched} of ${r.entries} target(s)${of}${more}`),
    r.items.length
      ? el("table", { class: "list", id: "matchtable" },
        el("thead", {}, el("tr", {}, ["target", "distance (\")", "object", "time (UTC)", "band", "mag", "real/bogus",
          "class", "frame"].map((h) => el("th", {}, h)))),
        el("tbody", {}, r.items.map(row)))
      : el("p", { class: "dim" }, "No archived alert lies within a target's radius.")));
}

function failed(e) {
  state.textContent = e instanceof ApiError ? `${e.status} ${e.reason || ""}: ${e.message}` : String(e);
  state.className = "error";
}

async function match(name) {
  shown = name;
  state.textContent = "matching…";
  state.className = "dim";
  result.replaceChildren();
  download.disabled = true;
  try {
    render(await (name === null ? api(query("json"), { method: "POST", body: watchlistBody() }) : api(query("json"))));
    state.textContent = "";
    download.disabled = false;
  } catch (e) { failed(e); }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  match(null);
});

download.addEventListener("click", async () => {
  try {
    const init = shown === null ? { method: "POST", body: watchlistBody() } : {};
    const res = await fetch(query("csv"), { ...init, headers: authHeaders() });
    if (!res.ok) throw new ApiError(res.status, "", await res.text());
    const link = el("a", { href: URL.createObjectURL(await res.blob()), download: "watchlist-matches.csv" });
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (e) { failed(e); }
});

// --- saved watchlists (a token's own) ---
const savedState = document.getElementById("savedstate");
const savedLists = document.getElementById("savedlists");
const saveForm = document.getElementById("saveform");

function savedUrl(name) { return `${SAVED}/${encodeURIComponent(name)}`; }
function when(unixS) { return `${new Date(unixS * 1000).toISOString().slice(0, 16).replace("T", " ")} UTC`; }

function savedFailed(e) {
  savedState.textContent = e instanceof ApiError ? `${e.status} ${e.reason || ""}: ${e.message}` : String(e);
  savedState.className = "error";
}

async function load(name) {
  try {
    const res = await fetch(`${savedUrl(name)}?format=csv`, { headers: authHeaders() });
    if (!res.ok) throw new ApiError(res.status, "", await res.text());
    document.getElementById("watchtext").value = await res.text();
    document.getElementById("watchfile").value = "";
    document.getElementById("savename").value = name;
    savedState.textContent = `${name} loaded into the form above`;
    savedState.className = "dim";
  } catch (e) { savedFailed(e); }
}

async function remove(name) {
  if (!window.confirm(`Delete the saved watchlist ${name}?`)) return;
  try {
    await api(savedUrl(name), { method: "DELETE" });
    await refresh(`${name} deleted`);
  } catch (e) { savedFailed(e); }
}

function savedRow(s) {
  return el("tr", { class: "saved" },
    el("td", {}, s.name),
    el("td", { class: "num" }, String(s.entries)),
    el("td", {}, when(s.updated)),
    el("td", {},
      el("button", { type: "button", class: "primary", onclick: () => match(s.name) }, "matches"), " ",
      el("button", { type: "button", onclick: () => load(s.name) }, "load"), " ",
      el("button", { type: "button", onclick: () => remove(s.name) }, "delete")));
}

async function refresh(message) {
  try {
    const r = await api(SAVED);
    savedState.textContent = message || `${r.items.length} of ${r.limits.lists} lists saved under your token`;
    savedState.className = "dim";
    savedLists.replaceChildren(r.items.length
      ? el("table", { class: "list", id: "savedtable" },
        el("thead", {}, el("tr", {}, ["name", "targets", "saved", ""].map((h) => el("th", {}, h)))),
        el("tbody", {}, r.items.map(savedRow)))
      : el("p", { class: "dim" }, "No saved watchlist yet: fill in the form above, name it and save it."));
  } catch (e) { savedFailed(e); }
}

saveForm.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const name = document.getElementById("savename").value.trim();
  if (!name) { savedFailed("Name the list first."); return; }
  try {
    const s = await api(`${savedUrl(name)}?${new URLSearchParams({ radius_arcsec: radius() })}`,
      { method: "PUT", body: watchlistBody() });
    await refresh(`${s.entries} target(s) saved as ${s.name}`);
  } catch (e) { savedFailed(e); }
});

if (token()) {
  saveForm.hidden = false;
  refresh();
}
