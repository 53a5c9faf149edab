"""Astronomers' own clients read a real pipeline run's alerts, unmodified, in each framing.

One pipeline run (the five stages as processes, on the embedded broker, with the embedded schema
registry) is shared by the module: it writes the same alerts to an ``ocf``, a ``confluent`` and a
``fink`` topic, and its alert stage SIGKILLs itself inside the transaction of its first alerts and is
restarted, so the restart guard must know them made on every configured topic. Each client
then runs the snippet of README.md's "Read alerts with your own client" as it is written there
(only the addresses are replaced), and must get exactly the alerts of the run.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from broker.config import load_config
from broker.simulate import SimConfig, SkySimulator
from streams import serde, topics
from streams.demo import start_stages, stop_stages, wait_until_drained
from streams.framestore import FrameStore
from streams.framing import decode_alert
from streams.monitor import read_all
from streams.producer import FrameProducer
from streams.runner import FAILPOINT_ENV
from streams.stages import STAGE_NAMES, pipeline_topics

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

README = Path(__file__).resolve().parents[2] / "README.md"
SIM = SimConfig(shape=(512, 512), fields=("F001",), n_stars=250, n_galaxies=25, n_transients=6,
                n_variables=4, n_moving=1, n_cosmic_rays=10.0)
CONFIG = """
schema_registry_url = "{registry}"
[[alert_topics]]
name = "alerts"
framing = "ocf"
[[alert_topics]]
name = "alerts-rubin"
framing = "confluent"
per_filter = false
[[alert_topics]]
name = "alerts-fink"
framing = "fink"
per_filter = false
[[alert_topics]]
name = "alerts-watched"
per_filter = false
filter = "scores.rb > 0.5"
watchlist = "{watchlist}"
watchlist_radius_arcsec = 3
"""
TOPICS = ("alerts", "alerts-rubin", "alerts-fink")
#: The topic of the alerts within 3 arcsec of the simulated transients (the watchlist) with rb > 0.5.
WATCHED = "alerts-watched"


@dataclass
class Run:
    """A finished pipeline run: where it is and what it published."""

    bootstrap: str
    registry: str
    expected: dict[int, str]  # alertId -> canonical JSON of each alert on the ocf topic
    by_topic: dict[str, list[dict]]  # the alerts of each topic, read with decode_alert
    n_candidates: int  # candidates in the alert stage's input
    watchlist: Path  # the simulated transients' positions
    watched: list[dict]  # the alerts of WATCHED, read with decode_alert


def canonical(alert: dict) -> str:
    """An alert as comparable text (NaN and bytes spelled out)."""

    def fix(v: object) -> object:
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, bytes):
            return v.hex()
        if isinstance(v, float) and math.isnan(v):
            return "NaN"
        return v

    return json.dumps(fix(alert), sort_keys=True)


def snippets() -> dict[str, str]:
    """The client snippets of README.md, by client name."""
    found = re.findall(r"<!-- client: ([\w-]+) -->\s*```python\n(.*?)```", README.read_text(), re.S)
    return dict(found)


def _publish_and_crash_alert_stage(bootstrap: str, workdir: Path, config: Path) -> None:
    from streams.settings import KafkaSettings

    settings = KafkaSettings(bootstrap, app_id="clients-test")
    procs = start_stages(bootstrap, settings.app_id, workdir, config, env={FAILPOINT_ENV: "alert:1"})
    try:
        producer = FrameProducer(settings, FrameStore(str(workdir / "frames")), 8 << 20, 1 << 30)
        for frame, _ in SkySimulator(SIM, seed=3).frames(5):  # epochs 0-2 build the reference, 3-4 are subtracted
            producer.publish_frame(frame, time.time())
        producer.flush()
        alert = STAGE_NAMES.index("alert")
        assert procs[alert].wait(timeout=400) == -signal.SIGKILL  # inside its first transaction with alerts
        (procs[alert],) = start_stages(bootstrap, settings.app_id, workdir, config, stages=("alert",))
        wait_until_drained(settings, procs, timeout=600)
    finally:
        stop_stages(procs)
    assert [p.returncode for p in procs] == [0] * len(STAGE_NAMES)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The shared pipeline run."""
    from streams.embedded import EmbeddedKafka
    from streams.registry import EmbeddedRegistry
    from streams.settings import KafkaSettings

    workdir = tmp_path_factory.mktemp("clients")
    with EmbeddedKafka() as kafka, EmbeddedRegistry() as registry:
        config, watchlist = workdir / "pipeline.toml", workdir / "transients.csv"
        subtracted = list(SkySimulator(SIM, seed=3).frames(5))[3:]
        watchlist.write_text("name,ra,dec\n" + "".join(f"{i.source_id},{float(i.ra)!r},{float(i.dec)!r}\n"
                                                       for _, truth in subtracted for i in truth.injections
                                                       if i.kind == "transient"))
        config.write_text(CONFIG.format(registry=registry.url, watchlist=watchlist))
        topics.create_topics(kafka.bootstrap, pipeline_topics(SIM.filters, config=load_config(config)))
        _publish_and_crash_alert_stage(kafka.bootstrap, workdir, config)
        settings = KafkaSettings(kafka.bootstrap, app_id="clients-check")
        batches = [serde.decode("candidates", m.value(), dict(m.headers()))
                   for m in read_all(settings, [topics.SCORED])]
        n_candidates = sum(len(b["candidates"]) for b in batches)
        by_topic = {t: [a for m in read_all(settings, [t]) for a in decode_alert(m.key(), m.value(),
                                                                              dict(m.headers() or []))]
                    for t in TOPICS}
        expected = {a["alertId"]: canonical(a) for a in by_topic["alerts"]}
        watched = [a for m in read_all(settings, [WATCHED]) for a in decode_alert(m.key(), m.value())]
        yield Run(kafka.bootstrap, registry.url, expected, by_topic, n_candidates, watchlist, watched)


def test_every_topic_carries_each_alert_once_in_its_framing(run):
    assert run.n_candidates > 0 and len(run.expected) == run.n_candidates  # one alert per candidate
    for topic, alerts in run.by_topic.items():  # none twice on any topic, the same alerts in every framing
        assert sorted(canonical(a) for a in alerts) == sorted(run.expected.values()), topic


def test_a_watchlist_topic_carries_the_alerts_near_its_entries_that_pass_its_filter(run):
    from astropy.coordinates import SkyCoord

    from broker.watchlist import load_watchlist

    wl = load_watchlist(run.watchlist)
    targets = SkyCoord(wl.ra, wl.dec, unit="deg")
    near = {a["alertId"] for a in run.by_topic["alerts"] if a["scores"]["rb"] > 0.5
            and SkyCoord(a["source"]["ra"], a["source"]["dec"], unit="deg").separation(targets).arcsec.min() <= 3}
    assert near and sorted(a["alertId"] for a in run.watched) == sorted(near)
    assert all(canonical(a) == run.expected[a["alertId"]] for a in run.watched)


CLIENTS = ("hop", "gcn-kafka", "fink-client", "rubin")


def _run_snippet(run: Run, client: str) -> list[dict]:
    """The ``alerts`` that the README's snippet of ``client`` collects (only the addresses replaced)."""
    code = snippets()[client].replace("localhost:9092", run.bootstrap).replace("http://localhost:8081", run.registry)
    namespace: dict = {}
    exec(compile(code, f"README.md ({client})", "exec"), namespace)  # the README's own snippet
    return namespace["alerts"]


@pytest.fixture(scope="module")
def client_reads(run):
    """Each client's alerts (or its exception), the clients run side by side.

    In parallel because each waits for its group join (about half of the client's default 45 s
    session timeout on tansu) and 30 s without an alert before it stops.
    """
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        futures = {c: pool.submit(_run_snippet, run, c) for c in CLIENTS}
        return {c: f.exception() or f.result() for c, f in futures.items()}


def test_the_readme_has_a_snippet_per_client():
    assert sorted(snippets()) == sorted(CLIENTS)


@pytest.mark.parametrize("client", CLIENTS)
def test_client_reads_the_alerts_unmodified(run, client_reads, client):
    alerts = client_reads[client]
    if isinstance(alerts, BaseException):
        raise alerts
    assert len(alerts) == len(run.expected)
    assert {a["alertId"]: canonical(a) for a in alerts} == run.expected
