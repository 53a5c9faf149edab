// A light curve as plain SVG: one panel per band, detections with error bars, forced photometry as
// open circles, upper limits as downward triangles (fainter than the limit), magnitudes increasing
// downwards. Falls back to difference flux when no point has a magnitude (no zero point).

import { el } from "./common.js";

const BAND_ORDER = ["u", "g", "r", "i", "z", "y"];
const BAND_COLOUR = { u: "#b19cd9", g: "#6fbf8a", r: "#d9776b", i: "#c99a6b", z: "#a88a7a", y: "#8a7a70" };
const AXIS = "#4f5b69";
const LABEL = "#7d8a99";

// About n "nice" tick values spanning [lo, hi].
export function niceTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return [lo];
  const raw = (hi - lo) / n;
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => s >= raw) || 10 * mag;
  const out = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  return out;
}

function bands(points) {
  const rank = (b) => (BAND_ORDER.includes(b) ? BAND_ORDER.indexOf(b) : 99);
  const seen = [...new Set(points.map((p) => p.band))];
  return seen.sort((a, b) => rank(a) - rank(b) || String(a).localeCompare(String(b)));
}

// The y value, error and kind of one point in the chosen unit ("mag" or "flux"); null: not drawn.
export function plotted(p, unit) {
  const num = (v) => typeof v === "number" && Number.isFinite(v);
  if (unit === "mag") {
    if (p.kind === "upper_limit") return num(p.limit_mag) ? { y: p.limit_mag, err: 0, kind: "limit" } : null;
    return num(p.mag) ? { y: p.mag, err: num(p.mag_err) ? p.mag_err : 0, kind: p.kind } : null;
  }
  if (p.kind === "upper_limit") return null;
  return num(p.flux) ? { y: p.flux, err: num(p.flux_err) ? p.flux_err : 0, kind: p.kind } : null;
}

function extent(values, pad) {
  let lo = Math.min(...values), hi = Math.max(...values);
  if (!(hi > lo)) { lo -= 0.5; hi += 0.5; }
  const m = (hi - lo) * pad;
  return [lo - m, hi + m];
}

// Draw `points` (the API's lightcurve items) into an <svg>; `mark` highlights one MJD (the alert shown).
export function lightCurveSVG(points, options = {}) {
  const width = options.width || 760;
  const left = 56, right = 14, top = 20, gap = 26, bottom = 34;
  const unit = points.some((p) => plotted(p, "mag") && p.kind !== "upper_limit") ? "mag" : "flux";
  const drawn = points.map((p) => ({ p, v: plotted(p, unit) })).filter((d) => d.v);
  const bs = bands(drawn.map((d) => d.p));
  const panelH = options.panelHeight || [0, 230, 170, 140][Math.min(bs.length, 3)];
  const height = top + bs.length * panelH + Math.max(0, bs.length - 1) * gap + bottom;
  const svg = el("svg", { viewBox: `0 0 ${width} ${Math.max(height, 60)}`, role: "img",
    "aria-label": `light curve, ${drawn.length} points in ${bs.length} band(s)` });
  if (!drawn.length) {
    svg.append(el("text", { x: width / 2, y: 34, fill: LABEL, "text-anchor": "middle" }, "no photometry to draw"));
    return svg;
  }
  const mjds = drawn.map((d) => d.p.mjd);
  const [x0, x1] = extent(mjds, 0.04);
  const sx = (m) => left + ((m - x0) / (x1 - x0)) * (width - left - right);
  bs.forEach((band, i) => {
    const mine = drawn.filter((d) => d.p.band === band);
    const oy = top + i * (panelH + gap);
    drawPanel(svg, mine, { band, unit, oy, panelH, sx, width, left, right, mark: options.mark });
  });
  const yAxis = top + bs.length * panelH + (bs.length - 1) * gap;
  for (const t of niceTicks(x0, x1, 6)) {
    svg.append(el("line", { x1: sx(t), x2: sx(t), y1: yAxis, y2: yAxis + 4, stroke: AXIS }));
    svg.append(el("text", { x: sx(t), y: yAxis + 16, fill: LABEL, "font-size": 11, "text-anchor": "middle" },
      String(t)));
  }
  svg.append(el("text", { x: (left + width - right) / 2, y: yAxis + 30, fill: LABEL, "font-size": 11,
    "text-anchor": "middle" }, "MJD (UTC)"));
  return svg;
}

function drawPanel(svg, mine, o) {
  const { band, unit, oy, panelH, sx, width, left, right } = o;
  const colour = BAND_COLOUR[String(band).toLowerCase()] || "#c3ccd6";
  const ys = mine.flatMap((d) => [d.v.y - d.v.err, d.v.y + d.v.err]);
  const [lo, hi] = extent(ys, 0.08);
  // magnitudes: bright (small) at the top; flux: large at the top
  const sy = unit === "mag" ? (v) => oy + ((v - lo) / (hi - lo)) * panelH : (v) => oy + ((hi - v) / (hi - lo)) * panelH;
  svg.append(el("rect", { x: left, y: oy, width: width - left - right, height: panelH, fill: "#0d1219", stroke: AXIS }));
  for (const t of niceTicks(lo, hi, Math.max(3, Math.round(panelH / 40)))) {
    svg.append(el("line", { x1: left, x2: width - right, y1: sy(t), y2: sy(t), stroke: "#19222d" }));
    svg.append(el("text", { x: left - 6, y: sy(t) + 4, fill: LABEL, "font-size": 11, "text-anchor": "end" }, String(t)));
  }
  if (unit === "flux" && lo < 0 && hi > 0) {
    svg.append(el("line", { x1: left, x2: width - right, y1: sy(0), y2: sy(0), stroke: AXIS, "stroke-dasharray": "4 3" }));
  }
  svg.append(el("text", { x: left + 2, y: oy - 5, fill: colour, "font-size": 13, "font-weight": 700 }, band));
  svg.append(el("text", { x: 12, y: oy + panelH / 2 + 8, fill: LABEL, "font-size": 11, "text-anchor": "middle",
    transform: `rotate(-90 12 ${oy + panelH / 2 + 8})` }, unit === "mag" ? "mag" : "diff. flux (ADU)"));
  if (typeof o.mark === "number") {
    svg.append(el("line", { x1: sx(o.mark), x2: sx(o.mark), y1: oy, y2: oy + panelH, stroke: "#d9a35f",
      "stroke-opacity": 0.5, "stroke-dasharray": "2 3" }));
  }
  for (const { p, v } of mine) drawPoint(svg, p, v, sx(p.mjd), sy, colour, unit);
}

function drawPoint(svg, p, v, x, sy, colour, unit) {
  const title = el("title", {}, `${p.band} ${p.kind} MJD ${p.mjd.toFixed(4)}: ${v.y.toFixed(unit === "mag" ? 2 : 1)}`
    + (v.err ? ` ± ${v.err.toFixed(unit === "mag" ? 2 : 1)}` : "") + (p.telescope ? ` (${p.telescope})` : ""));
  if (v.kind === "limit") {
    const y = sy(v.y);
    svg.append(el("polygon", { points: `${x - 5},${y - 4} ${x + 5},${y - 4} ${x},${y + 5}`, fill: "none",
      stroke: colour, "stroke-opacity": 0.7, class: "limit" }, title));
    return;
  }
  if (v.err) svg.append(el("line", { x1: x, x2: x, y1: sy(v.y - v.err), y2: sy(v.y + v.err), stroke: colour,
    "stroke-opacity": 0.8 }));
  const fading = typeof p.flux === "number" && p.flux < 0;
  const forced = v.kind === "forced";
  const attrs = { fill: forced ? "none" : colour, stroke: colour, "stroke-width": 1.4,
    class: forced ? "forced" : "detection" };
  const y = sy(v.y);
  svg.append(fading
    ? el("rect", { ...attrs, x: x - 3.5, y: y - 3.5, width: 7, height: 7 }, title)
    : el("circle", { ...attrs, cx: x, cy: y, r: forced ? 3 : 3.8 }, title));
}

export function legend(unit) {
  return `● detection   ○ forced photometry   ■ fainter than the reference (negative difference)   `
    + (unit === "flux" ? "(no zero point: difference flux; upper limits not drawn)" : "▽ upper limit (5σ)");
}
