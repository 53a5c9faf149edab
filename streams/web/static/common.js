// What every page of the portal shares: the API client (with the stored token), a DOM builder that
// only ever makes text nodes of data, formatting, score meters, alert cards and the night mode.

const TOKEN_KEY = "broker.portal.token";
const NIGHT_KEY = "broker.portal.night";

export class ApiError extends Error {
  constructor(status, reason, detail) {
    super(detail || reason || `HTTP ${status}`);
    this.status = status;
    this.reason = reason;
  }
}

export function token() { return localStorage.getItem(TOKEN_KEY) || ""; }
export function setToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value.trim()); else localStorage.removeItem(TOKEN_KEY);
}
export function authHeaders() {
  const t = token();
  return t ? { Authorization: `Bearer ${t}` } : {};
}

// Alert ids are 63-bit integers, beyond the 2**53 a JavaScript number holds exactly: they are read
// as strings (and written back as bare digits by jsonBody).
const BIG_IDS = /"(alert_id|alertId|sourceId)":\s*(\d+)/g;
export function parseJSON(text) { return JSON.parse(text.replace(BIG_IDS, '"$1":"$2"')); }
export function jsonBody(obj) {
  return JSON.stringify(obj).replace(/"alert_id":"(\d+)"/g, '"alert_id":$1');
}

// JSON from the API; an ApiError with the server's reason and detail otherwise.
export async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: { Accept: "application/json", ...authHeaders() } };
  if (options.body instanceof FormData) init.body = options.body; // multipart: the browser sets its type
  else if (options.body !== undefined) {
    init.body = jsonBody(options.body);
    init.headers["Content-Type"] = "application/json";
  }
  if (options.signal) init.signal = options.signal;
  const res = await fetch(path, init);
  let data = null;
  try { data = parseJSON(await res.text()); } catch (e) { data = null; }
  if (!res.ok) throw new ApiError(res.status, data && data.error, data && data.detail);
  return data;
}

// el("a", {href: u, class: "x"}, "text", child, ...): attributes set as attributes, strings as text.
// The id a page's URL names after `prefix`, decoded; a malformed escape ("100%") is kept as written,
// so the API answers for it (404) instead of the page stopping at "loading".
export function pathId(prefix) {
  const raw = location.pathname.slice(prefix.length);
  try { return decodeURIComponent(raw); } catch { return raw; }
}

export function el(tag, attrs, ...children) {
  const svg = ["svg", "g", "line", "path", "circle", "rect", "text", "polygon", "title", "polyline"].includes(tag);
  const node = svg ? document.createElementNS("http://www.w3.org/2000/svg", tag) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "dataset") Object.assign(node.dataset, v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function fmt(x, digits = 2) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  const text = x.toFixed(digits);
  return /^-0\.?0*$/.test(text) ? text.slice(1) : text; // no "-0.00"
}

export function sexagesimal(ra, dec) {
  if (typeof ra !== "number" || typeof dec !== "number") return "";
  const part = (v, div) => {
    let h = Math.floor(v / div);
    let m = Math.floor((v / div - h) * 60);
    let s = ((v / div - h) * 60 - m) * 60;
    return [h, m, s];
  };
  const [h, m, s] = part(((ra % 360) + 360) % 360, 15);
  const sign = dec < 0 ? "−" : "+";
  const [d, dm, ds] = part(Math.abs(dec), 1);
  const p2 = (n) => String(n).padStart(2, "0");
  return `${p2(h)}:${p2(m)}:${s.toFixed(2).padStart(5, "0")} ${sign}${p2(d)}:${p2(dm)}:${ds.toFixed(1).padStart(4, "0")}`;
}

// MJD (days, UTC) as "YYYY-MM-DD HH:MM" UTC.
export function mjdDate(mjd) {
  if (typeof mjd !== "number") return "";
  const d = new Date((mjd - 40587) * 86400000);
  return d.toISOString().slice(0, 16).replace("T", " ");
}

export function ago(unixMs) {
  const s = Math.max(0, (Date.now() - unixMs) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

export function bandTag(band) {
  const b = String(band || "?");
  return el("span", { class: `band ${b.toLowerCase()}`, title: `band ${b}` }, b);
}

export function scoreMeter(label, value, kind) {
  const known = typeof value === "number" && Number.isFinite(value);
  const pct = known ? Math.round(Math.min(1, Math.max(0, value)) * 100) : 0;
  const low = kind === "rb" && known && value < 0.5;
  return el("span", { class: `score ${kind}${low ? " low" : ""}`, title: `${label} ${known ? value.toFixed(3) : "unknown"}` },
    el("span", { class: "meter" }, el("i", { style: `width:${pct}%` })),
    known ? value.toFixed(2) : "–");
}

export function cutoutUrl(alertId, which) { return `/api/v1/alerts/${alertId}/cutouts/${which}.png`; }

// An <img> of an API picture that tries again (every 3 s, for a minute) while the server answers
// 404: the server keeps the alerts its live stream read (the newest 256), and an older one reaches
// the archive, and so its cutouts, up to a batch later.
export function picture(src, alt, attrs = {}) {
  let tries = 0;
  const img = el("img", { src, alt, ...attrs });
  img.addEventListener("error", () => {
    if (++tries <= 20) setTimeout(() => { img.src = `${src}?try=${tries}`; }, 3000);
  });
  return img;
}

export function triplet(alertId) {
  return el("div", { class: "triplet" },
    ["science", "reference", "difference"].map((w) => el("figure", {},
      picture(cutoutUrl(alertId, w), `${w} cutout`, { loading: "lazy" }),
      el("figcaption", {}, w === "reference" ? "ref" : w === "difference" ? "diff" : "sci"))));
}

export function magText(a) {
  if (typeof a.magpsf !== "number") return `S/N ${fmt(a.snr, 1)}`;
  return `${a.magpsf.toFixed(2)} ± ${fmt(a.sigmapsf, 2)}`;
}

// The context of a live alert as tags: host galaxy, a star under it, motion, catalog object, a trail.
export function contextTags(c) {
  if (!c) return null;
  const tags = [];
  if (c.host) tags.push(el("span", { class: "tag", title: "host galaxy, offset" },
    `host ${c.host} ${fmt(c.host_offset_arcsec, 1)}″${c.nuclear ? " nuclear" : ""}`));
  if (c.on_star) tags.push(el("span", { class: "tag warn", title: "a point source of the reference under it" }, "on a star"));
  if (c.moving) tags.push(el("span", { class: "tag warn", title: "linked into a tracklet of linear motion" }, "moving"));
  if (c.catalog) tags.push(el("span", { class: "tag", title: "nearest catalog object (OpenNGC)" }, c.catalog));
  if (c.trail) tags.push(el("span", { class: "tag warn", title: "in a row of candidates on its frame: a satellite trail or glint" }, "trail"));
  if (!tags.length) tags.push(el("span", { class: "tag", title: "no host, star, motion, catalog object or trail" }, "hostless"));
  return el("div", { class: "tags" }, tags);
}

// One alert as a card: its triplet, scores, class, and links to its object and frame.
export function alertCard(a, options = {}) {
  const objLink = el("a", { class: "obj", href: `/objects/${encodeURIComponent(a.object_id)}` }, a.object_id);
  const cls = a["class"] ? `${String(a["class"]).replace("_", " ")} ${fmt(a.class_probability, 2)}` : "–";
  const exposure = `exposure MJD ${fmt(a.mjd, 5)} (${mjdDate(a.mjd)} UTC)`;
  const when = options.received
    ? el("span", { class: "when", title: `received; ${exposure}`, dataset: { received: String(options.received) } },
      ago(options.received))
    : el("span", { class: "when", title: exposure }, mjdDate(a.mjd));
  return el("article", { class: `card${options.fresh ? " fresh" : ""}`, dataset: { alertId: String(a.alert_id) } },
    el("div", { class: "head" }, objLink, bandTag(a.band), el("span", { class: "num" }, magText(a)), when),
    triplet(a.alert_id),
    el("dl", { class: "facts" },
      el("dt", {}, "real/bogus"), el("dd", {}, scoreMeter("real/bogus", a.rb, "rb")),
      el("dt", {}, "anomaly"), el("dd", {}, scoreMeter("anomaly", a.anomaly, "anomaly")),
      el("dt", {}, "class"), el("dd", {}, cls),
      el("dt", {}, "S/N"), el("dd", {}, fmt(a.snr, 1)),
      a.context !== undefined ? el("dd", { style: "grid-column: 1 / -1" }, contextTags(a.context)) : null),
    el("div", { class: "context" },
      el("span", { class: "mono", title: `${fmt(a.ra, 5)}° ${fmt(a.dec, 5)}°` }, sexagesimal(a.ra, a.dec)),
      el("span", {}, ` · ${a.telescope} · frame `),
      el("a", { href: `/frames/${encodeURIComponent(a.frame_id)}` }, a.frame_id),
      options.context ? el("span", {}, " · ", options.context) : null));
}

// Refresh "12 s ago" labels once a second.
export function tickAges(root) {
  setInterval(() => {
    for (const n of root.querySelectorAll("[data-received]")) n.textContent = ago(Number(n.dataset.received));
  }, 1000);
}

export function toast(text) {
  let t = document.querySelector(".toast");
  if (!t) { t = el("div", { class: "toast", role: "status" }); document.body.append(t); }
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(t._timer);
  t._timer = setTimeout(() => t.classList.remove("show"), 1600);
}

function setupHeader() {
  if (localStorage.getItem(NIGHT_KEY) === "1") document.documentElement.classList.add("night");
  const night = document.getElementById("night");
  if (night) night.addEventListener("click", () => {
    const on = document.documentElement.classList.toggle("night");
    localStorage.setItem(NIGHT_KEY, on ? "1" : "0");
  });
  const tokenButton = document.getElementById("tokenbutton");
  if (tokenButton) tokenButton.addEventListener("click", () => {
    const value = window.prompt("API token (<id>.<secret>) for this server; empty to forget it", "");
    if (value !== null) { setToken(value); location.reload(); }
  });
  const go = document.getElementById("goto");
  if (go) go.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const v = go.querySelector("input").value.trim();
    if (!v) return;
    if (/^\d+$/.test(v)) location.href = `/vet?alert=${v}`;
    else if (/^OBJ/i.test(v)) location.href = `/objects/${encodeURIComponent(v)}`;
    else location.href = `/frames/${encodeURIComponent(v)}`;
  });
}

setupHeader();
