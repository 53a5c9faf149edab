// The frame page: the frame (or its difference image) with each candidate's alert marked on it, and
// the candidates as a table; a marker and its row light up together.

import { api, bandTag, cutoutUrl, el, fmt, mjdDate, pathId, scoreMeter } from "./common.js";

const frameId = pathId("/frames/");
const root = document.getElementById("frame");

// PNG row 0 is the top of the frame as ds9 shows it (FITS origin lower): y = ny - 1 there.
export function markerPosition(a, ny) { return { cx: a.x + 0.5, cy: ny - (a.y + 0.5) }; }

function overlay(f, onPick) {
  const [ny, nx] = f.shape;
  const r = Math.max(6, Math.round(Math.max(nx, ny) / 90));
  const svg = el("svg", { viewBox: `0 0 ${nx} ${ny}`, preserveAspectRatio: "none" });
  f.candidates.forEach((a, i) => {
    if (typeof a.x !== "number" || typeof a.y !== "number") return;
    const { cx, cy } = markerPosition(a, ny);
    const low = typeof a.rb === "number" && a.rb < 0.5;
    svg.append(el("circle", { cx, cy, r, class: `marker${low ? " low" : ""}`, dataset: { alertId: String(a.alert_id) },
      onclick: () => onPick(a) }, el("title", {}, `#${i + 1} ${a.object_id} rb ${fmt(a.rb)} S/N ${fmt(a.snr, 1)}`)));
    svg.append(el("text", { x: cx + r, y: cy - r, class: "mlabel", "font-size": Math.round(r * 1.8) }, String(i + 1)));
  });
  return svg;
}

function table(f, onPick) {
  return el("table", { class: "list" },
    el("thead", {}, el("tr", {}, ["#", "cutouts", "object", "x, y (px)", "mag", "S/N", "real/bogus", "anomaly", "class"]
      .map((h) => el("th", {}, h)))),
    el("tbody", {}, f.candidates.map((a, i) => el("tr", { dataset: { alertId: String(a.alert_id) }, onclick: () => onPick(a) },
      el("td", {}, String(i + 1)),
      el("td", { class: "thumb" }, el("img", { src: cutoutUrl(a.alert_id, "difference"), alt: "difference", loading: "lazy" })),
      el("td", {}, el("a", { href: `/objects/${encodeURIComponent(a.object_id)}`, class: "mono" }, a.object_id)),
      el("td", { class: "num" }, `${fmt(a.x, 1)}, ${fmt(a.y, 1)}`),
      el("td", {}, typeof a.magpsf === "number" ? `${fmt(a.magpsf)} ± ${fmt(a.sigmapsf)}` : "–"),
      el("td", {}, fmt(a.snr, 1)),
      el("td", {}, scoreMeter("real/bogus", a.rb, "rb")),
      el("td", {}, scoreMeter("anomaly", a.anomaly, "anomaly")),
      el("td", {}, a["class"] || "–")))));
}

function render(f) {
  f.candidates.sort((a, b) => (b.snr || 0) - (a.snr || 0));
  const pick = (a) => {
    for (const n of root.querySelectorAll("[data-alert-id]")) n.classList.toggle("on", n.dataset.alertId === String(a.alert_id));
    root.querySelector(`tr[data-alert-id="${a.alert_id}"]`)?.scrollIntoView({ block: "nearest" });
  };
  const view = f.image_url && f.shape
    ? el("div", { class: "frameview" }, el("img", { src: f.image_url, alt: `frame ${f.frame_id}` }), overlay(f, pick))
    : el("p", { class: "notice" }, "The frame's difference image is no longer kept (the pipeline keeps the newest "
      + "frames of each field); its candidates are listed.");
  root.replaceChildren(
    el("div", { class: "objhead" }, el("h1", {}, f.frame_id), bandTag(f.band), el("span", {}, f.telescope),
      el("span", { class: "dim" }, `MJD ${fmt(f.mjd, 5)} · ${mjdDate(f.mjd)} UTC`),
      el("span", { class: "dim" }, `${f.shape ? `${f.shape[1]} × ${f.shape[0]} px · ` : ""}${f.candidates.length} candidate(s)`)),
    el("div", { class: "row" },
      el("div", { class: "panel", style: "flex: 0 1 auto; max-width: 56%" }, view,
        el("p", { class: "dim" }, "The difference image (science − reference). Circles: candidates, numbered by S/N "
          + "(dashed: real/bogus below 0.5); click one.")),
      el("div", { class: "panel grow scroll" }, el("h2", {}, "candidates"), table(f, pick))));
}

document.title = `${frameId} · transient-broker`;
api(`/api/v1/frames/${encodeURIComponent(frameId)}`).then(render).catch((e) => {
  root.replaceChildren(el("p", { class: "error" }, `${frameId}: ${e.message}`));
});
