"""Alert records as the API shows them: summaries, JSON-safe records, light curves, page cursors.

Pure functions over the alert records of any schema version (a field a version lacks is null).
"""

from __future__ import annotations

import base64
import math
from typing import Any

from broker.errors import InvalidQuery

#: The cutout kinds of the API, and the alert field of each.
CUTOUT_FIELDS = {"science": "cutoutScience", "reference": "cutoutTemplate", "difference": "cutoutDifference"}


def clean(value: Any) -> Any:
    """``value`` made JSON-safe: non-finite floats as null, bytes left out (None), containers cleaned."""
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items() if not isinstance(v, bytes)}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def summary_of(record: dict) -> dict:
    """The ``AlertSummary`` of a full alert record (``docs/portal.md``): ids, time, place, photometry, scores."""
    source = record.get("source") or {}
    scores = record.get("scores") or {}
    provenance = record.get("provenance") or {}
    classification = record.get("classification") or {}
    label = classification.get("label")
    probabilities = classification.get("probabilities") or {}
    return {
        "alert_id": int(record["alertId"]), "object_id": record.get("objectId"), "candid": record.get("candid"),
        "frame_id": provenance.get("frame_id"), "telescope": provenance.get("telescope"),
        "mjd": _num(source.get("mjd")), "ra": _num(source.get("ra")), "dec": _num(source.get("dec")),
        "band": source.get("filter"), "magpsf": _num(source.get("magpsf")), "sigmapsf": _num(source.get("sigmapsf")),
        "snr": _num(source.get("snr")), "rb": _num(scores.get("rb")), "anomaly": _num(scores.get("anomaly")),
        "class": label, "class_probability": _num(probabilities.get(label)) if label else None,
        "x": _num(source.get("x")), "y": _num(source.get("y")),
    }


def summary_of_row(row: dict) -> dict:
    """The ``AlertSummary`` of a row of the summary query (:data:`streams.web.queries.SUMMARY_COLUMNS`)."""
    out = {k: row.get(k) for k in ("alert_id", "object_id", "candid", "frame_id", "telescope", "band")}
    out.update({k: _num(row.get(k)) for k in ("mjd", "ra", "dec", "magpsf", "sigmapsf", "snr", "rb", "anomaly",
                                               "x", "y")})
    out.update(class_fields(row.get("classification")))
    if "distance_arcsec" in row:
        out["distance_arcsec"] = _num(row["distance_arcsec"])
    return out


def class_fields(classification: dict | None) -> dict:
    """``{"class", "class_probability"}`` of an archived classification (its label and that label's probability)."""
    label = (classification or {}).get("label")
    probabilities = dict((classification or {}).get("probabilities") or {})
    return {"class": label, "class_probability": _num(probabilities.get(label)) if label else None}


def public_record(record: dict, base_url: str) -> dict:
    """A full alert record for the API: cutout bytes removed, its summary and its cutout URLs added."""
    out = clean(record)
    alert_id = int(record["alertId"])
    out["summary"] = summary_of(record)
    out["cutouts"] = {kind: f"{base_url}/api/v1/alerts/{alert_id}/cutouts/{kind}.png" for kind in CUTOUT_FIELDS}
    return out


def magnitude(flux: float | None, magzp: float | None) -> float | None:
    """``magzp - 2.5 log10(flux)`` (mag); None for a non-positive flux or without a zero point."""
    if flux is None or magzp is None or not flux > 0:
        return None
    return float(magzp - 2.5 * math.log10(flux))


def _point(mjd: Any, band: Any, telescope: Any, kind: str, flux: Any = None, flux_err: Any = None,
           magzp: Any = None, limit_mag: Any = None) -> dict:
    flux, flux_err, zp = _num(flux), _num(flux_err), _num(magzp)
    mag = magnitude(abs(flux), zp) if flux is not None else None
    mag_err = 2.5 / math.log(10) * flux_err / abs(flux) if mag is not None and flux and flux_err is not None else None
    return {"mjd": _num(mjd), "band": band, "telescope": telescope, "kind": kind, "flux": flux,
            "flux_err": flux_err, "mag": mag, "mag_err": mag_err, "limit_mag": _num(limit_mag),
            "isdiffpos": flux >= 0 if flux is not None else None}


def lightcurve(latest: dict | None, detections: list[dict]) -> list[dict]:
    """An object's light curve: detections, forced photometry and upper limits, by MJD.

    Parameters
    ----------
    latest : dict or None
        The object's newest alert record: its forced photometry (``prv_forced_sources``), upper
        limits (``prv_nondetections``) and, without ``detections``, its own and previous sources.
    detections : list of dict
        The object's detections from the history (keys of the ``detections`` table), all of them
        (an alert carries at most ``max_history``); empty without a history.
    """
    telescope = ((latest or {}).get("provenance") or {}).get("telescope")
    points = [_point(d["mjd"], d["filter"], d.get("telescope") or telescope, "detection", d["flux"],
                     d["flux_err"], d.get("magzp")) for d in detections]
    if latest is not None:
        if not detections:
            zp = (latest.get("source") or {}).get("magzpsci")
            for s in [*(latest.get("prv_sources") or []), latest.get("source") or {}]:
                points.append(_point(s.get("mjd"), s.get("filter"), telescope, "detection", s.get("flux"),
                                     s.get("flux_err"), s.get("magzpsci", zp)))
        for f in latest.get("prv_forced_sources") or []:
            points.append(_point(f.get("mjd"), f.get("filter"), telescope, "forced", f.get("flux"),
                                 f.get("flux_err"), f.get("magzpsci")))
        for n in latest.get("prv_nondetections") or []:
            points.append(_point(n.get("mjd"), n.get("filter"), telescope, "upper_limit",
                                 limit_mag=n.get("diffmaglim")))
    unique = {(p["mjd"], p["band"], p["kind"]): p for p in points if p["mjd"] is not None}
    return sorted(unique.values(), key=lambda p: (p["mjd"], p["kind"]))


def encode_cursor(mjd: float, alert_id: int) -> str:
    """The opaque cursor after an alert of a newest-first listing (its MJD and id)."""
    return base64.urlsafe_b64encode(f"{mjd!r}:{alert_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[float, int]:
    """(MJD, alert id) of a cursor from :func:`encode_cursor`.

    Raises
    ------
    InvalidQuery
        A cursor this server did not write.
    """
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        mjd, alert_id = text.split(":")
        value = float(mjd), int(alert_id)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidQuery(f"invalid cursor {cursor[:40]!r}: pass back the 'next' of a previous page") from exc
    if not math.isfinite(value[0]):
        raise InvalidQuery(f"invalid cursor {cursor[:40]!r}")
    return value
