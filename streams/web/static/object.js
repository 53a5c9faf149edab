// The object page: its light curve per band (with upper limits), classification, context, features
// and every alert of it with its cutouts.

import { api, bandTag, cutoutUrl, el, fmt, mjdDate, pathId, scoreMeter, sexagesimal } from "./common.js";
import { legend, lightCurveSVG, plotted } from "./lightcurve.js";

const objectId = pathId("/objects/");
const root = document.getElementById("object");

const FEATURES = [
  ["ndet", "detections", 0], ["nulim", "upper limits", 0], ["nbands", "bands", 0], ["duration", "duration (d)", 2],
  ["peak_mag", "peak mag", 2], ["amplitude", "amplitude (mag)", 2], ["rise_rate", "rise (mag/d)", 3],
  ["decline_rate", "decline (mag/d)", 3], ["colour", "colour (mag)", 2], ["frac_negative", "negative fraction", 2],
  ["period", "period (d)", 3], ["reduced_chi2", "reduced χ²", 2],
];

function probabilities(c) {
  const probs = Object.entries(c.probabilities || {}).sort((a, b) => b[1] - a[1]);
  return el("div", { class: "probs" }, probs.map(([k, v]) => el("div", { class: `p${k === c.label ? " top" : ""}` },
    el("span", {}, k.replace("_", " ")), el("span", { class: "bar" }, el("i", { style: `width:${Math.round(100 * v)}%` })),
    el("span", { class: "num" }, fmt(v, 2)))),
  el("p", { class: "dim" }, `model ${c.model || "?"}`));
}

function contextBlock(ctx) {
  if (!ctx) return el("p", { class: "dim" }, "no context (scored before the score stage had it)");
  const host = ctx.host;
  return el("dl", { class: "kv" },
    el("dt", {}, "host"), el("dd", {}, host ? `${host.name} (${host.catalog}), ${fmt(host.offset_arcsec, 1)}″`
      + (host.nuclear ? ", nuclear" : "") : "none"),
    el("dt", {}, "on a star"), el("dd", {}, ctx.on_star === null || ctx.on_star === undefined ? "unknown"
      : ctx.on_star ? "yes" : "no"),
    el("dt", {}, "moving"), el("dd", {}, ctx.moving ? `yes, ${fmt(ctx.moving_speed, 1)}″/d` : "no"),
    el("dt", {}, "catalog"), el("dd", {}, (ctx.matches || []).filter((m) => m.catalog !== "frame").slice(0, 3)
      .map((m) => m.name || m.id).join(", ") || "none"),
    el("dt", {}, "trail"), el("dd", {}, (ctx.matches || []).filter((m) => m.kind === "trail")
      .map((m) => `${m.name} of frame ${m.version}, ${fmt(m.size_arcsec, 0)}″ long`).join(", ") || "none"));
}

function featuresBlock(f) {
  if (!f) return el("p", { class: "dim" }, "no features");
  return el("dl", { class: "kv" }, FEATURES.filter(([k]) => typeof f[k] === "number")
    .map(([k, label, d]) => [el("dt", {}, label), el("dd", {}, fmt(f[k], d))]));
}

function alertsTable(alerts, onPick) {
  const rows = alerts.map((a) => el("tr", { dataset: { alertId: String(a.alert_id) }, onclick: () => onPick(a) },
    el("td", { class: "thumb" }, ["science", "difference"].map((w) =>
      el("img", { src: cutoutUrl(a.alert_id, w), alt: w, loading: "lazy" }))),
    el("td", {}, fmt(a.mjd, 4), el("div", { class: "dim" }, mjdDate(a.mjd))),
    el("td", {}, bandTag(a.band)),
    el("td", {}, typeof a.magpsf === "number" ? `${fmt(a.magpsf)} ± ${fmt(a.sigmapsf)}` : "–"),
    el("td", {}, fmt(a.snr, 1)),
    el("td", {}, scoreMeter("real/bogus", a.rb, "rb")),
    el("td", {}, scoreMeter("anomaly", a.anomaly, "anomaly")),
    el("td", {}, el("a", { href: `/frames/${encodeURIComponent(a.frame_id)}` }, a.frame_id))));
  return el("table", { class: "list" },
    el("thead", {}, el("tr", {}, ["cutouts", "MJD", "band", "mag", "S/N", "real/bogus", "anomaly", "frame"]
      .map((h) => el("th", {}, h)))), el("tbody", {}, rows));
}

function detail(a) {
  return el("div", {},
    el("h2", {}, `alert ${a.alert_id}`),
    el("div", { class: "triplet" }, ["science", "reference", "difference"].map((w) =>
      el("figure", {}, el("img", { src: cutoutUrl(a.alert_id, w), alt: w, style: "width:104px;height:104px" }),
        el("figcaption", {}, w)))),
    el("p", {},
      el("a", { href: `/api/v1/alerts/${a.alert_id}/triplet.png`, target: "_blank" }, "annotated triplet"), " · ",
      el("a", { href: `/api/v1/alerts/${a.alert_id}/attribution.png`, target: "_blank" }, "attribution map"), " · ",
      el("a", { href: `/api/v1/alerts/${a.alert_id}`, target: "_blank" }, "JSON"), " · ",
      el("a", { href: `/vet?alert=${a.alert_id}` }, "vet")));
}

function render(o) {
  const alerts = [...(o.alerts || [])].sort((a, b) => b.mjd - a.mjd);
  const lc = o.lightcurve || [];
  const unit = lc.some((p) => plotted(p, "mag") && p.kind !== "upper_limit") ? "mag" : "flux";
  const counts = { detection: 0, forced: 0, upper_limit: 0 };
  for (const p of lc) counts[p.kind] = (counts[p.kind] || 0) + 1;
  const picked = el("div", { class: "panel" }, alerts.length ? detail(alerts[0]) : el("p", { class: "dim" }, "no alerts"));
  const svgBox = el("div", { class: "lightcurve" },
    lightCurveSVG(lc, { mark: alerts.length ? alerts[0].mjd : undefined }),
    el("div", { class: "legend" }, legend(unit)));
  const pick = (a) => {
    picked.replaceChildren(detail(a));
    svgBox.replaceChildren(lightCurveSVG(lc, { mark: a.mjd }), el("div", { class: "legend" }, legend(unit)));
    for (const tr of root.querySelectorAll("tr[data-alert-id]")) tr.classList.toggle("on", tr.dataset.alertId === String(a.alert_id));
  };
  const cls = o.classification;
  root.replaceChildren(
    el("div", { class: "objhead" },
      el("h1", {}, o.object_id),
      el("span", { class: "mono" }, sexagesimal(o.ra, o.dec)),
      el("span", { class: "dim num" }, `${fmt(o.ra, 5)}°  ${fmt(o.dec, 5)}°`),
      el("span", {}, `${o.n_alerts} alert(s)`),
      el("span", { class: "dim" }, `${counts.detection} detections · ${counts.forced} forced · ${counts.upper_limit} upper limits`),
      el("a", { href: `/api/v1/forced?ra=${encodeURIComponent(o.ra)}&dec=${encodeURIComponent(o.dec)}`,
                title: "every kept difference image at this position, any telescope (JSON)" }, "forced photometry here"),
      el("span", { class: "dim" }, "light curve:",
        ["csv", "votable"].map((f) => [" ", el("a", { href: `/api/v1/objects/${encodeURIComponent(o.object_id)}/lightcurve?format=${f}`,
          id: `lc-${f}`, title: "the points of the plot, for pandas, a spreadsheet or TOPCAT" }, f === "csv" ? "CSV" : "VOTable")])),
      cls ? el("span", { class: "tag" }, String(cls.label).replace("_", " ")) : null),
    el("div", { class: "row" },
      el("div", { class: "grow" },
        el("div", { class: "panel" }, el("h2", {}, "light curve"), svgBox),
        el("div", { class: "panel", style: "margin-top:14px" }, el("h2", {}, "alerts"), alertsTable(alerts, pick))),
      el("div", { class: "side" },
        picked,
        el("div", { class: "panel" }, el("h2", {}, "classification"),
          cls ? probabilities(cls) : el("p", { class: "dim" }, "not classified")),
        el("div", { class: "panel" }, el("h2", {}, "context"), contextBlock(o.context)),
        el("div", { class: "panel" }, el("h2", {}, "features"), featuresBlock(o.features)))));
  if (alerts.length) pick(alerts[0]);
}

document.title = `${objectId} · transient-broker`;
api(`/api/v1/objects/${encodeURIComponent(objectId)}`).then(render).catch((e) => {
  root.replaceChildren(el("p", { class: "error" }, `${objectId}: ${e.message}`));
});
