// The watchlist page: a CSV of targets (a file, or pasted) sent to POST /api/v1/crossmatch with the
// browser's token; the archived alerts near each target come back as a table, and as a CSV download.

import { ApiError, api, authHeaders, bandTag, el, fmt, mjdDate, scoreMeter } from "./common.js";

const form = document.getElementById("watchform");
const state = document.getElementById("watchstate");
const result = document.getElementById("matches");
const download = document.getElementById("download");

function watchlistBody() {
  const file = document.getElementById("watchfile").files[0];
  const text = document.getElementById("watchtext").value;
  const body = new FormData();
  body.append("watchlist", file || new Blob([text], { type: "text/csv" }), file ? file.name : "watchlist.csv");
  return body;
}

function query(format) {
  const q = new URLSearchParams({ radius_arcsec: document.getElementById("watchradius").value.trim() || "2",
    limit: "10000", format });
  const since = document.getElementById("watchsince").value.trim();
  if (since) q.set("since_mjd", since);
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
  result.replaceChildren(el("div", { class: "panel" },
    el("p", { id: "watchsummary" }, `${r.matched} alert(s) near ${r.entries_matched} of ${r.entries} target(s)${more}`),
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

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  state.textContent = "matching…";
  state.className = "dim";
  result.replaceChildren();
  download.disabled = true;
  try {
    render(await api(query("json"), { method: "POST", body: watchlistBody() }));
    state.textContent = "";
    download.disabled = false;
  } catch (e) { failed(e); }
});

download.addEventListener("click", async () => {
  try {
    const res = await fetch(query("csv"), { method: "POST", body: watchlistBody(), headers: authHeaders() });
    if (!res.ok) throw new ApiError(res.status, "", await res.text());
    const link = el("a", { href: URL.createObjectURL(await res.blob()), download: "watchlist-matches.csv" });
    link.click();
    URL.revokeObjectURL(link.href);
  } catch (e) { failed(e); }
});
