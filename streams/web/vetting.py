"""Vetting over HTTP: the queue of alerts to label, and the labels (:mod:`broker.vetting`).

``POST /api/v1/labels`` takes ``{"alert_id": int, "label": "real" | "bogus" | "interesting" |
"not_interesting"}`` from a token with scope ``vet``; the server reads the alert from the archive
and stores the label with the token's name, the time, and the model version and score of the alert
(the real/bogus ones for real/bogus, the anomaly ones otherwise), so a client cannot claim scores
the alert never had. ``GET /api/v1/labels`` lists them; ``GET /api/v1/vet/queue`` gives the
archived alerts without a label, most uncertain first by default (real/bogus score nearest 0.5:
the labels a fine-tuning learns most from). The SQLite work runs in the portal's thread pool.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from broker.errors import ConfigError, Unavailable
from broker.vetting import ANOMALY, MAX_ALERT_ID, LabelStore, Verdict, check_verdict
from streams.web import queries
from streams.web.app import Portal
from streams.web.limits import costly
from streams.web.records import clean
from streams.web.tokens import Principal

router = APIRouter(tags=["vetting"])
#: A token of scope ``vet``; each request reads the archive or the labels: costly (:mod:`streams.web.limits`).
Vetter = Annotated[Principal, Depends(costly("vet"), scope="function")]

#: SQL order of each queue order.
ORDERS = {
    "uncertain": "ORDER BY abs(rb - 0.5) ASC NULLS LAST, mjd DESC, alert_id DESC",
    "newest": "ORDER BY mjd DESC, alert_id DESC",
    "anomaly": "ORDER BY anomaly DESC NULLS LAST, mjd DESC, alert_id DESC",
}


class LabelIn(BaseModel):
    """A label as posted: the alert and the verdict; nothing else is accepted."""

    model_config = ConfigDict(extra="forbid", strict=True)
    alert_id: int = Field(ge=0, le=MAX_ALERT_ID, description="The alert's alertId.")
    label: Literal["real", "bogus", "interesting", "not_interesting"]


def verdict_of(record: dict, label: str, who: str) -> Verdict:
    """The verdict on an archived alert: its ids and the model version and score the label judges."""
    scores = record.get("scores") or {}
    kind = "anomaly" if label in ANOMALY else "rb"
    score = scores.get(kind)
    return Verdict(alert_id=int(record["alertId"]), object_id=str(record.get("objectId") or "unknown"),
                   candid=str(record.get("candid") or "unknown"), label=label, who=who,
                   model_version=str(scores.get(f"{kind}_model") or "unknown"),
                   score=float(score) if isinstance(score, int | float) else None)


def _as_json(v: Verdict) -> dict:
    return clean(asdict(v))


@contextmanager
def _store(portal: Portal) -> Iterator[LabelStore]:
    """The portal's label store; :class:`Unavailable` (HTTP 503) when its file is not one."""
    try:
        store = LabelStore(portal.config.labels_path)
    except ConfigError as exc:  # a corrupt or foreign file: the server's fault, not the request's
        raise Unavailable(f"the portal's labels database cannot be used: {exc}") from exc
    with store:
        yield store


def _record(portal: Portal, body: LabelIn, who: str) -> dict:
    record = queries.alert_record(portal.require_archive(), body.alert_id)
    verdict, now = verdict_of(record, body.label, who), time.time()
    with _store(portal) as store:
        store.record(verdict, now=now)
    return _as_json(replace(check_verdict(verdict), at=now))


@router.post("/api/v1/labels", status_code=201)
async def post_label(body: LabelIn, request: Request, principal: Vetter) -> dict:
    """Store a label of an archived alert, with who, when, and the alert's model version and score.

    404 when the archive has no such alert; 401/403 without a token of scope ``vet``.
    """
    portal: Portal = request.app.state.portal
    return await portal.run(_record, portal, body, principal.name)


def _labels(portal: Portal, limit: int) -> dict:
    if not portal.config.labels_path.is_file():
        return {"items": [], "counts": {}}
    with _store(portal) as store:
        rows = store.all()
        counts = store.counts()
    return {"items": [_as_json(v) for v in reversed(rows[-limit:])], "counts": counts}


@router.get("/api/v1/labels")
async def get_labels(request: Request, principal: Vetter,
                     limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict:
    """The latest ``limit`` labels, newest first, and the number given of each label."""
    portal: Portal = request.app.state.portal
    return await portal.run(_labels, portal, limit)


def _queue(portal: Portal, limit: int, order: str) -> dict:
    archive = portal.require_archive()
    labelled: set[int] = set()
    if portal.config.labels_path.is_file():
        with _store(portal) as store:
            labelled = store.labelled()
    where = f"alert_id NOT IN ({', '.join(map(str, sorted(labelled)))})" if labelled else "true"
    return {"items": queries.summaries(archive, where, ORDERS[order], limit), "labelled": len(labelled)}


@router.get("/api/v1/vet/queue")
async def vet_queue(request: Request, principal: Vetter, limit: Annotated[int, Query(ge=1, le=500)] = 50,
                    order: Literal["uncertain", "newest", "anomaly"] = "uncertain") -> dict:
    """Archived alerts nobody has labelled yet, in ``order`` (most uncertain real/bogus score first)."""
    portal: Portal = request.app.state.portal
    return await portal.run(_queue, portal, limit, order)
