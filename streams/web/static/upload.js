// The upload page: a FITS frame (and optionally its reference) sent to POST /api/v1/frames?mode=predict
// with the browser's token; the candidates come back with their scores and cutouts (inline PNGs).

import { ApiError, api, el, fmt, scoreMeter, token } from "./common.js";

const form = document.getElementById("uploadform");
const state = document.getElementById("uploadstate");
const result = document.getElementById("result");

export async function predict(frame, references, telescope) {
  const body = new FormData();
  body.append("frame", frame);
  for (const reference of [references || []].flat()) body.append("reference", reference);
  const q = new URLSearchParams({ mode: "predict" });
  if (telescope) q.set("telescope", telescope);
  return api(`/api/v1/frames?${q}`, { method: "POST", body });
}

function stamps(c) {
  return el("div", { class: "stamps" }, ["science", "reference", "difference"].map((w) =>
    el("figure", {}, el("img", { src: c.cutouts[w], alt: `${w} cutout` }), el("figcaption", {}, w))));
}

function row(c, i) {
  const cls = c.classification || {};
  return el("tr", { class: "candidate" },
    el("td", {}, String(i + 1)),
    el("td", {}, stamps(c)),
    el("td", { class: "num" }, `${fmt(c.x, 1)}, ${fmt(c.y, 1)}`),
    el("td", { class: "mono" }, `${fmt(c.ra, 5)} ${fmt(c.dec, 5)}`),
    el("td", {}, fmt(c.snr, 1)),
    el("td", {}, scoreMeter("real/bogus", c.rb, "rb")),
    el("td", {}, scoreMeter("anomaly", c.anomaly, "anomaly")),
    el("td", {}, cls.label ? `${cls.label} ${fmt((cls.probabilities || {})[cls.label])}` : "–"),
    el("td", { class: "mono" }, c.object ? c.object.object_id : "–"));
}

export function render(r) {
  const cands = [...(r.candidates || [])].sort((a, b) => Math.abs(b.snr || 0) - Math.abs(a.snr || 0));
  const flags = r.quality_flags && r.quality_flags.length ? ` · quality flags: ${r.quality_flags.join(", ")}` : "";
  result.replaceChildren(el("div", { class: "panel" },
    el("div", { class: "objhead" }, el("h2", {}, r.frame_id), el("span", {}, `${r.telescope} · ${r.field} · ${r.band}`),
      el("span", { class: "dim", id: "summary" }, `${r.status} · ${cands.length} candidate(s) · reference ${r.reference.source}`
        + ` · ${fmt(r.timing_s.subtract + r.timing_s.score, 1)} s${flags}`)),
    cands.length
      ? el("table", { class: "list", id: "candidates" },
        el("thead", {}, el("tr", {}, ["#", "cutouts", "x, y (px)", "RA Dec (deg)", "S/N", "real/bogus", "anomaly", "class",
          "object"].map((h) => el("th", {}, h)))),
        el("tbody", {}, cands.map(row)))
      : el("p", { class: "dim", id: "note" }, r.note || "No candidate at 5 sigma.")));
}

form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const frame = document.getElementById("framefile").files[0];
  const references = [...document.getElementById("referencefile").files];
  const telescope = document.getElementById("telescope").value.trim();
  if (!token()) { state.textContent = "No token: set one with the token button (scope upload)."; state.className = "error"; return; }
  state.textContent = "subtracting and scoring…";
  state.className = "dim";
  result.replaceChildren();
  try {
    render(await predict(frame, references, telescope));
    state.textContent = "";
  } catch (e) {
    state.textContent = e instanceof ApiError ? `${e.status} ${e.reason || ""}: ${e.message}` : String(e);
    state.className = "error";
  }
});
