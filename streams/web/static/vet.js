// The vetting page: one candidate at a time, labelled from the keyboard
//   r real · b bogus · i interesting · x not interesting · n / → next · p / ← previous · ? help
// Each label is POSTed to /api/v1/labels (token with scope "vet"); the server stores it with who, when
// and the model version and score of the alert. Real/bogus labels move on to the next candidate.

import { api, bandTag, cutoutUrl, el, fmt, mjdDate, scoreMeter, setToken, toast, token } from "./common.js";
import { lightCurveSVG } from "./lightcurve.js";

const KEYS = { r: "real", b: "bogus", i: "interesting", x: "not_interesting" };
const root = document.getElementById("vet");
const params = new URL(location.href).searchParams;
let queue = [];
let pos = 0;
let order = params.get("order") || "uncertain";
const given = new Map(); // alert id -> [labels given this session]
const log = [];

function tokenBox(message) {
  const input = el("input", { type: "password", placeholder: "<id>.<secret>", autocomplete: "off", id: "token" });
  const save = () => { setToken(input.value); start(); };
  input.addEventListener("keydown", (ev) => { if (ev.key === "Enter") save(); });
  root.replaceChildren(el("div", { class: "panel tokenbox" },
    el("h1", {}, "Vetting needs a token"),
    el("p", { class: "dim" }, "A token with scope ", el("code", {}, "vet"), " (", el("code", {}, "broker token add NAME --scope vet"),
      "). It stays in this browser (local storage) and goes only to this server."),
    message ? el("p", { class: "error" }, message) : null,
    input, el("button", { class: "primary", onclick: save }, "Use this token")));
  input.focus();
}

async function fill() {
  const q = new URLSearchParams({ limit: "100", order });
  const page = await api(`/api/v1/vet/queue?${q}`);
  const have = new Set(queue.map((a) => a.alert_id));
  for (const a of page.items) if (!have.has(a.alert_id) && !given.has(a.alert_id)) queue.push(a);
}

function verdicts(a) {
  return (given.get(a.alert_id) || []).map((l) => el("span", { class: `verdict ${l}` }, l.replace("_", " ")));
}

function card(a) {
  const lc = el("div", { class: "lightcurve", id: "minilc" }, el("p", { class: "dim" }, "light curve…"));
  api(`/api/v1/objects/${encodeURIComponent(a.object_id)}`).then((o) => {
    lc.replaceChildren(lightCurveSVG(o.lightcurve || [], { mark: a.mjd, width: 760, panelHeight: 90 }));
  }).catch(() => lc.replaceChildren(el("p", { class: "dim" }, "no light curve")));
  return el("div", { class: "panel", id: "current", dataset: { alertId: String(a.alert_id) } },
    el("div", { class: "objhead" },
      el("a", { href: `/objects/${encodeURIComponent(a.object_id)}`, class: "mono" }, a.object_id),
      bandTag(a.band),
      el("span", {}, typeof a.magpsf === "number" ? `${fmt(a.magpsf)} ± ${fmt(a.sigmapsf)} mag` : `flux S/N ${fmt(a.snr, 1)}`),
      el("span", { class: "dim" }, `alert ${a.alert_id} · ${pos + 1} of ${queue.length} in the queue`),
      el("span", { id: "verdicts" }, verdicts(a))),
    el("div", { class: "big" }, ["science", "reference", "difference"].map((w) =>
      el("figure", {}, el("img", { src: cutoutUrl(a.alert_id, w), alt: `${w} cutout` }), el("figcaption", {}, w)))),
    el("dl", { class: "facts", style: "margin-top:10px; grid-template-columns: repeat(4, auto 1fr)" },
      el("dt", {}, "real/bogus"), el("dd", {}, scoreMeter("real/bogus", a.rb, "rb")),
      el("dt", {}, "anomaly"), el("dd", {}, scoreMeter("anomaly", a.anomaly, "anomaly")),
      el("dt", {}, "S/N"), el("dd", {}, fmt(a.snr, 1)),
      el("dt", {}, "class"), el("dd", {}, a["class"] ? `${a["class"]} ${fmt(a.class_probability)}` : "–"),
      el("dt", {}, "MJD"), el("dd", {}, `${fmt(a.mjd, 4)} (${mjdDate(a.mjd)})`),
      el("dt", {}, "frame"), el("dd", {}, el("a", { href: `/frames/${encodeURIComponent(a.frame_id)}` }, a.frame_id)),
      el("dt", {}, "x, y"), el("dd", {}, `${fmt(a.x, 1)}, ${fmt(a.y, 1)} px`),
      el("dt", {}, "triplet"), el("dd", {}, el("a", { href: `/api/v1/alerts/${a.alert_id}/triplet.png`, target: "_blank" }, "annotated PNG"))),
    el("div", { class: "keys" }, Object.entries(KEYS).map(([k, l]) =>
      el("button", { class: l, type: "button", dataset: { label: l }, onclick: () => label(l) }, el("kbd", {}, k), l.replace("_", " ")))),
    lc);
}

function side() {
  const counts = {};
  for (const e of log) counts[e.label] = (counts[e.label] || 0) + 1;
  return el("div", { class: "side", style: "width:auto" },
    el("div", { class: "panel" }, el("h2", {}, "queue"),
      el("label", { class: "dim" }, "order ", el("select", { id: "order", onchange: (ev) => { order = ev.target.value; restart(); } },
        [["uncertain", "most uncertain first"], ["newest", "newest first"], ["anomaly", "most anomalous first"]]
          .map(([v, t]) => el("option", { value: v, selected: v === order }, t))))),
    el("div", { class: "panel" }, el("h2", {}, "this session"),
      el("p", { id: "sessioncounts" }, log.length ? Object.entries(counts).map(([k, v]) => `${k.replace("_", " ")} ${v}`).join(" · ") : "no labels yet"),
      el("table", { class: "list" }, el("tbody", {}, log.slice(-12).reverse().map((e) => el("tr", {},
        el("td", { class: "mono" }, String(e.alert_id)), el("td", {}, el("span", { class: `verdict ${e.label}` }, e.label)),
        el("td", { class: "dim" }, new Date(e.at * 1000).toISOString().slice(11, 19))))))),
    el("div", { class: "panel help" }, el("h2", {}, "keys"),
      el("p", {}, el("kbd", {}, "r"), " real  ", el("kbd", {}, "b"), " bogus  (then the next one)"),
      el("p", {}, el("kbd", {}, "i"), " interesting  ", el("kbd", {}, "x"), " not interesting  (anomaly feedback)"),
      el("p", {}, el("kbd", {}, "n"), " / ", el("kbd", {}, "→"), " next  ", el("kbd", {}, "p"), " / ", el("kbd", {}, "←"), " previous"),
      el("p", {}, "A label can be changed: the latest one counts.")));
}

function show() {
  if (pos >= queue.length) {
    root.replaceChildren(el("div", { class: "vet" }, el("div", { class: "panel" }, el("h1", {}, "Nothing left to vet"),
      el("p", { class: "dim" }, "Every archived alert of this queue has a label. New alerts join it once archived.")), side()));
    return;
  }
  root.replaceChildren(el("div", { class: "vet" }, card(queue[pos]), side()));
}

async function label(name) {
  const a = queue[pos];
  if (!a) return;
  const button = root.querySelector(`.keys button[data-label="${name}"]`);
  button?.classList.add("flash");
  try {
    const saved = await api("/api/v1/labels", { method: "POST", body: { alert_id: a.alert_id, label: name } });
    const kind = (l) => (l === "real" || l === "bogus" ? "realbogus" : "anomaly");
    given.set(a.alert_id, [...(given.get(a.alert_id) || []).filter((l) => kind(l) !== kind(name)), name]);
    log.push(saved);
    toast(`${name.replace("_", " ")} ✓ (alert ${a.alert_id})`);
    if (name === "real" || name === "bogus") await move(1); else show();
  } catch (e) {
    if (e.status === 401 || e.status === 403) tokenBox(e.message);
    else toast(`not saved: ${e.message}`);
  } finally {
    button?.classList.remove("flash");
  }
}

async function move(step) {
  pos = Math.max(0, pos + step);
  if (pos >= queue.length - 5) {
    try { await fill(); } catch (e) { toast(`queue: ${e.message}`); }
  }
  show();
}

async function restart() {
  queue = [];
  pos = 0;
  const url = new URL(location.href);
  url.searchParams.set("order", order);
  history.replaceState(null, "", url);
  await start();
}

async function start() {
  if (!token()) { tokenBox(); return; }
  try {
    await api("/api/v1/labels?limit=1");
    const wanted = params.get("alert");
    if (wanted && /^\d+$/.test(wanted) && !queue.length) {
      const rec = await api(`/api/v1/alerts/${wanted}`);
      queue.push(rec.summary);
    }
    await fill();
  } catch (e) {
    if (e.status === 401 || e.status === 403) { tokenBox(e.message); return; }
    root.replaceChildren(el("p", { class: "error" }, `Cannot load the queue: ${e.message}`));
    return;
  }
  show();
}

document.addEventListener("keydown", (ev) => {
  if (ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement || ev.ctrlKey || ev.metaKey || ev.altKey) return;
  const k = ev.key.toLowerCase();
  if (KEYS[k]) { ev.preventDefault(); label(KEYS[k]); }
  else if (k === "n" || ev.key === "ArrowRight") { ev.preventDefault(); move(1); }
  else if (k === "p" || ev.key === "ArrowLeft") { ev.preventDefault(); move(-1); }
});

start();
