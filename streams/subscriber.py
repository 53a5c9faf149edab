"""Alert subscribers: read alert topics, filter on alert fields, save cutout triplets as PNG."""

from __future__ import annotations

import ast
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from confluent_kafka import Consumer
from simpleeval import EvalWithCompoundTypes, InvalidExpression

import schemas
from broker.alert import read_stamp
from broker.errors import DecodeError, FilterExpressionError
from streams import serde
from streams.settings import KafkaSettings

#: Names a filter may use besides the ``source`` and ``scores`` fields of the alert schema.
_EXTRA_NAMES = ("ndet", "first_mjd", "objectId", "candid", "alertId", "telescope", "field", "latency")


def flatten(alert: dict) -> dict:
    """The names a filter expression can use: source fields, scores, object fields and ids.

    ``rb``, ``anomaly``, ``snr``, ``flux``, ``magpsf``, ``ra``, ``dec``, ``filter``, ``fwhm``,
    ``elongation``, ``ndet``, ``objectId``, ``candid``, ``telescope``, ``field``, ``latency`` ...
    """
    src, obj, scores = alert["source"], alert["object"], alert["scores"]
    return {**src, **scores, "ndet": obj["ndet"], "first_mjd": obj["first_mjd"],
            "objectId": alert["objectId"], "candid": alert["candid"], "alertId": alert["alertId"],
            "telescope": alert["provenance"]["telescope"], "field": alert["provenance"]["field"],
            "latency": alert["timing"]["alert_time"] - alert["timing"]["exposure_end"]}


def filter_names() -> set[str]:
    """Every name :func:`flatten` provides, from the current alert schema."""
    fields = {f["name"]: f["type"] for f in schemas.load("alert")["fields"]}
    return {f["name"] for f in fields["source"]["fields"]} | {f["name"] for f in fields["scores"]["fields"]} \
        | set(_EXTRA_NAMES)


class AlertFilter:
    """A boolean expression over :func:`flatten`'s names, e.g. ``rb > 0.8 and snr > 7``.

    Evaluated with simpleeval: only literals, names, comparisons, boolean and arithmetic operators
    and ``abs/min/max``; attribute access, calls of anything else and comprehensions are refused.
    Names are checked once, here; an alert on which the expression cannot be evaluated (e.g. a
    null ``rb`` compared with a number) does not match.
    """

    def __init__(self, expression: str | None) -> None:
        self.expression = (expression or "").strip()
        if len(self.expression) > 1000:
            raise FilterExpressionError("filter expression longer than 1000 characters")
        self._eval = EvalWithCompoundTypes(functions={"abs": abs, "min": min, "max": max})
        if not self.expression:
            return
        try:
            tree = ast.parse(self.expression, mode="eval")
        except SyntaxError as exc:
            raise FilterExpressionError(f"invalid filter expression {self.expression!r}: {exc.msg}") from exc
        known = filter_names() | {"abs", "min", "max", "True", "False", "None"}
        unknown = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} - known
        if unknown:
            raise FilterExpressionError(f"unknown name(s) {sorted(unknown)}; known: {sorted(known)}")
        probe = {name: 1.0 for name in known}  # refuse what simpleeval refuses, before any alert arrives
        self._eval.names = probe
        try:
            self._eval.eval(self.expression)
        except InvalidExpression as exc:
            raise FilterExpressionError(f"filter expression not allowed: {exc}") from exc
        except Exception:
            pass  # e.g. comparing the probe's numbers with strings: fine for real alerts

    def __call__(self, alert: dict) -> bool:
        """Whether ``alert`` passes the filter (always, without an expression)."""
        if not self.expression:
            return True
        self._eval.names = flatten(alert)
        try:
            return bool(self._eval.eval(self.expression))
        except InvalidExpression as exc:
            raise FilterExpressionError(f"cannot evaluate {self.expression!r}: {exc}") from exc
        except (TypeError, ZeroDivisionError, ValueError):
            return False


def alerts(settings: KafkaSettings, topic: str, group: str | None = None, from_start: bool = True,
           timeout: float | None = None, max_alerts: int | None = None,
           stop: Callable[[], bool] = lambda: False) -> Iterator[tuple[dict, float]]:
    """Yield (alert, receipt time) from ``topic`` as they arrive.

    Stops after ``max_alerts``, ``timeout`` s without a message, or when ``stop()`` is true.
    An alert whose ``alertId`` was seen among the last 100 000 is dropped: on a broker that can
    repeat a crashed transaction (the embedded one, see :mod:`streams.lineage`) nobody sees it
    twice. Messages that are not Avro container files are skipped with a warning record
    ``{"_error": ...}`` so one bad message does not end a subscription.
    """
    conf = settings.consumer(group or f"subscriber-{uuid.uuid4().hex[:8]}", "earliest" if from_start else "latest")
    conf["enable.auto.commit"] = True
    consumer = Consumer(conf)
    consumer.subscribe([topic])
    n, last = 0, time.monotonic()
    seen: OrderedDict[object, None] = OrderedDict()
    try:
        while (max_alerts is None or n < max_alerts) and not stop():
            msg = consumer.poll(0.5)
            if msg is None:
                if timeout is not None and time.monotonic() - last > timeout:
                    return
                continue
            if msg.error():
                continue
            last = time.monotonic()
            try:
                records = serde.decode_ocf(msg.value() or b"")
            except DecodeError as exc:
                yield {"_error": str(exc), "_offset": msg.offset()}, time.time()
                continue
            for rec in records:
                if rec.get("alertId") in seen:
                    continue
                seen[rec.get("alertId")] = None
                if len(seen) > 100_000:
                    seen.popitem(last=False)
                n += 1
                yield rec, time.time()
    finally:
        consumer.close()


def save_triplet_png(alert: dict, path: str | Path) -> Path:
    """Write the science / reference / difference cutouts of ``alert`` side by side as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    for ax, key, title in zip(axes, ("cutoutScience", "cutoutTemplate", "cutoutDifference"),
                              ("science", "reference", "difference"), strict=True):
        img = read_stamp(alert[key]["stampData"])
        finite = img[np.isfinite(img)]
        lo, hi = np.percentile(finite, [1, 99.5]) if finite.size else (0, 1)
        ax.imshow(img, origin="lower", cmap="gray", vmin=lo, vmax=hi)
        ax.set_title(title)
        ax.set_xticks([])
        ax.set_yticks([])
    s = alert["source"]
    fig.suptitle(f"{alert['candid']}  rb={alert['scores']['rb']:.2f}  S/N={s['snr']:.1f}  "
                 f"RA={s['ra']:.5f} Dec={s['dec']:.5f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
