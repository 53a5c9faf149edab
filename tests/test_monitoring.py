"""Monitoring seen working: the alerting rules and their unit tests, and Prometheus scraping a live run.

``promtool`` and ``prometheus`` come from Debian's ``prometheus`` package (CI installs it); the
tests that need them are skipped, saying so, where they are absent.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from bench.dashboard import (  # noqa: E402
    dashboard_queries,
    finite,
    prometheus_binary,
    scraped_run,
    sky_config,
    wait_for_dashboard_data,
)
from broker.reference import ReferenceStore  # noqa: E402
from streams.framestore import FrameStore  # noqa: E402
from streams.metrics import GatewayMetrics, StageMetrics  # noqa: E402
from streams.stages import STAGE_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = ("BrokerStageDown", "BrokerStageMissing", "BrokerConsumerLagGrowing", "BrokerDeadLetterRate",
          "BrokerAlertLatencyOverSLO", "BrokerUnexpectedErrors", "BrokerLineageRejected", "BrokerKafkaUnreachable",
          "BrokerStageWaitingOnOutage", "BrokerStageRestarting", "BrokerPortalBusy", "BrokerStateDiskFilling",
          "BrokerFramesWaitingForReference",
          "BrokerGatewayDown", "BrokerGatewayLoginFailures", "BrokerGatewayUpstreamUnreachable",
          "BrokerGatewayRefusing")

#: Counters that follow a frame from ingest to the published alerts.
_FLOW = (("broker_messages_in_total", "ingest"), ("broker_errors_total", "ingest"),
         ("broker_messages_out_total", "alert"))


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool is not installed (Debian package prometheus: apt-get install prometheus)")
    return path


def _rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"]]


def test_prometheus_config_and_rules_pass_promtool_check():
    res = subprocess.run([_promtool(), "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(ALERTS)} rules found" in res.stdout + res.stderr  # the config loads alerts.yml


def test_alerting_rules_pass_their_unit_tests():
    res = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


def test_every_alert_is_unit_tested_and_the_missing_stage_rule_names_every_stage():
    assert sorted(r["alert"] for r in _rules()) == sorted(ALERTS)
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    fired = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t["exp_alerts"]}
    assert fired == set(ALERTS)  # each rule has a case where it fires (and the files have cases where it does not)
    (missing,) = [r for r in _rules() if r["alert"] == "BrokerStageMissing"]
    assert sorted(re.findall(r'stage="(\w+)"', missing["expr"])) == sorted(STAGE_NAMES)


def test_the_k8s_prometheus_rule_holds_the_same_rules():
    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "monitoring.yaml").read_text()) if d]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    stages = [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    assert any(d["kind"] == "PodMonitor" for d in stages)  # the operator scrapes what the rules read


def test_rules_and_dashboard_name_only_exported_metrics(tmp_path):
    metrics = StageMetrics("x")
    metrics.watch_disk(tmp_path)
    metrics.watch_references(ReferenceStore(tmp_path / "refs"))
    registries = (metrics.registry, GatewayMetrics(("PLAIN",)).registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {m.name + s for r in registries for m in r.collect() for s in suffixes.get(m.type, ("",))} | {"up"}
    exprs = [r["expr"] for r in _rules()] + [q for _, q in dashboard_queries()]
    used = {n for e in exprs for n in re.findall(r"\b(broker_[a-z_]+|process_[a-z_]+|up)\b(?=[\[{\s)]|$)", e)}
    expected = {"broker_consumer_lag", "process_start_time_seconds", "broker_gateway_auth_failures_total",
                "broker_reference_oldest_waiting_seconds", "broker_reference_frames_waiting",
                "broker_reference_frames_set_aside_total", "broker_left_out_searched_total"}
    assert expected <= used <= names, used - names


@pytest.mark.prometheus
def test_a_filling_state_disk_puts_the_deployed_disk_rule_in_pending(small_disk, tmp_path):
    """A real disk (a 64 MiB tmpfs) filled to 95 % under a stage's state: BrokerStateDiskFilling goes pending.

    The stage's metrics as ``broker stage subtract`` serves them, scraped every second by Prometheus with
    the deployed rules; firing takes the rule's ``for: 10m`` more (promtool's test).
    """
    from bench.dashboard import LocalPrometheus

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus: apt-get install prometheus)")
    metrics = StageMetrics("subtract")
    metrics.watch_disk(small_disk / "state")  # not made yet: the disk it will be on is read
    port = metrics.serve(0)
    with LocalPrometheus([f"127.0.0.1:{port}"], tmp_path / "prometheus") as prom:
        (roomy,) = prom.wait_for('broker_state_disk_free_bytes{stage="subtract"}', timeout=20)
        size = shutil.disk_usage(small_disk).total
        assert float(roomy["value"][1]) > 0.9 * size
        assert prom.query('ALERTS{alertname="BrokerStateDiskFilling"}') == []
        (small_disk / "ballast").write_bytes(b"\0" * int(0.95 * size))
        (active,) = prom.wait_for('ALERTS{alertname="BrokerStateDiskFilling"}', timeout=30)
    assert (active["metric"]["stage"], active["metric"]["alertstate"]) == ("subtract", "pending"), active


def _plain_login(kafka, password: str) -> bytes:
    """One SASL/PLAIN login as ``subscriber`` over TLS to ``kafka``'s gateway: its SaslAuthenticate answer."""
    import socket
    import ssl

    from tests.streams.test_gateway import PLAIN, _authenticate, _handshake

    host, port = kafka.bootstrap.rsplit(":", 1)
    tls = ssl.create_default_context(cafile=str(kafka.ca))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            tls.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(_handshake(PLAIN))
        conn.recv(1 << 16)
        conn.sendall(_authenticate(b"\0subscriber\0" + password.encode()))
        return conn.recv(1 << 16)


@pytest.mark.kafka
@pytest.mark.prometheus
def test_the_sasl_gateway_is_scraped_and_failed_logins_fire_the_deployed_rule(tmp_path):
    """``broker embedded --auth --metrics-port``'s gateway, scraped every second with the deployed config and rules.

    12 logins with a wrong password fire BrokerGatewayLoginFailures (no ``for``), and every query of the
    gateway's dashboard panels returns data; once tansu behind it is gone, logins with the right password
    (admitted, then no broker to pipe to) put BrokerGatewayUpstreamUnreachable in pending (firing takes its
    ``for: 2m`` more; promtool's unit tests show that).
    """
    from bench.dashboard import GATEWAY_JOB, LocalPrometheus
    from streams.secure_embedded import SecureEmbeddedKafka

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus: apt-get install prometheus)")
    with SecureEmbeddedKafka(users=("admin", "subscriber"), metrics_port=0) as kafka:
        assert kafka.metrics_url is not None
        target = kafka.metrics_url.split("/")[2]
        with LocalPrometheus([], tmp_path / "prometheus", gateway=target) as prom:
            assert prom.wait_for(f'up{{job="{GATEWAY_JOB}", instance="{target}"}} == 1', timeout=30)
            assert prom.query('ALERTS{alertname=~"BrokerGateway.*"}') == []
            for _ in range(12):
                _plain_login(kafka, "wrong-password")
            rule = 'ALERTS{alertname="BrokerGatewayLoginFailures", alertstate="firing"}'
            (firing,) = prom.wait_for(rule, timeout=30)
            assert (firing["metric"]["instance"], firing["metric"]["severity"]) == (target, "warning"), firing
            refused = 'broker_gateway_auth_failures_total{mechanism="PLAIN", reason="credentials"}'
            assert finite(prom.query(refused)) == [12.0]
            panels = wait_for_dashboard_data(prom, timeout=20, gateway=True)
            assert panels and all(finite(r) for r in panels.values()), panels
            kafka.kafka.stop()
            password = kafka.password_file("subscriber").read_text().strip()
            rule = 'ALERTS{alertname="BrokerGatewayUpstreamUnreachable"}'
            deadline = time.monotonic() + 30
            while not (pending := prom.query(rule)) and time.monotonic() < deadline:
                _plain_login(kafka, password)
                time.sleep(0.5)
    assert [(a["metric"]["alertstate"], a["metric"]["severity"]) for a in pending] == [("pending", "critical")]


def _hastened_rules(path: Path, factor: int = 60) -> Path:
    """A copy of the deployed rules at ``path`` with every ``for`` divided by ``factor`` (2m: 2s; 15m: 15s).

    Expressions, labels and annotations are the deployed ones: only the wait before firing is shorter,
    so that a test sees a rule fire on a real Prometheus (the waits themselves: promtool's unit tests).
    """
    seconds = {"s": 1, "m": 60, "h": 3600}
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"] if "for" in r):
        n, unit = re.fullmatch(r"(\d+)([smh])", rule["for"]).groups()  # type: ignore[union-attr]
        rule["for"] = f"{max(1, int(n) * seconds[unit] // factor)}s"
    path.write_text(yaml.safe_dump(rules))
    return path


def _tcp_probe(address: str) -> None:
    """A TCP health check: connect, then close without a byte."""
    import socket

    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=10).close()


def _no_tls(address: str) -> None:
    """A client speaking plaintext Kafka to the TLS gateway: a failed TLS handshake."""
    import socket

    from tests.streams.test_gateway import PLAIN, _handshake

    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(_handshake(PLAIN))
        conn.recv(1 << 16)


@pytest.mark.kafka
@pytest.mark.prometheus
def test_the_gateway_refusing_and_down_rules_fire_and_tcp_probes_fire_nothing(tmp_path):
    """BrokerGatewayRefusing and BrokerGatewayDown seen firing on a real Prometheus, the deployed rules hastened.

    ``broker embedded --auth --metrics-port``'s gateway scraped every second; the rules are
    ``deploy/prometheus/alerts.yml`` with each ``for`` 60 times shorter (:func:`_hastened_rules`).
    30 TCP health checks (connect, close) are probes, not refusals: nothing is even pending (they
    were refused TLS handshakes, over the rule's 6 a minute); 30 plaintext clients are refused
    ``tls_handshake``: BrokerGatewayRefusing fires with that reason; the gateway stopped,
    BrokerGatewayDown fires.
    """
    from bench.dashboard import GATEWAY_JOB, LocalPrometheus
    from streams.secure_embedded import SecureEmbeddedKafka

    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus: apt-get install prometheus)")
    rules = _hastened_rules(tmp_path / "alerts.yml")
    kafka = SecureEmbeddedKafka(users=("admin",), metrics_port=0).start()
    try:
        assert kafka.metrics_url is not None
        target = kafka.metrics_url.split("/")[2]
        with LocalPrometheus([], tmp_path / "prometheus", gateway=target, rule_files=[rules]) as prom:
            assert prom.wait_for(f'up{{job="{GATEWAY_JOB}", instance="{target}"}} == 1', timeout=30)
            for _ in range(30):
                _tcp_probe(kafka.bootstrap)
            assert prom.wait_for("broker_gateway_connections_total >= 30", timeout=10)
            time.sleep(3)  # rules evaluated every second over the probes' counts
            assert prom.query('ALERTS{alertname=~"BrokerGateway.*"}') == []
            assert finite(prom.query("sum(broker_gateway_refused_total)")) == [0.0]
            assert finite(prom.query("broker_gateway_probes_total")) == [30.0]
            for _ in range(30):
                _no_tls(kafka.bootstrap)
            rule = 'ALERTS{alertname="BrokerGatewayRefusing", alertstate="firing"}'
            (refusing,) = prom.wait_for(rule, timeout=45)
            kafka.stop()
            (down,) = prom.wait_for('ALERTS{alertname="BrokerGatewayDown", alertstate="firing"}', timeout=30)
    finally:
        kafka.stop()
    assert (refusing["metric"]["reason"], refusing["metric"]["severity"]) == ("tls_handshake", "warning"), refusing
    assert (down["metric"]["instance"], down["metric"]["severity"]) == (target, "critical"), down


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pipeline run (5 frames of 512x512 and a garbage record) scraped every second by Prometheus.

    About 45 s on 2 cores: the stages start (torch for classify) and join their groups, and the
    archive stage commits its batch after 10 s.
    """
    if prometheus_binary() is None:
        pytest.skip("prometheus is not installed (Debian package prometheus: apt-get install prometheus)")
    # one slot of costly work in the portal, so that a burst of image requests overruns it (BrokerPortalBusy)
    with scraped_run(tmp_path_factory.mktemp("monitoring"), interval=1.0, portal_options=("--max-costly", "1")) as run:
        # the drained state reaches the gauges within 1 s and Prometheus within the next scrape
        run.prometheus.wait_for(f"count(sum by (stage) (broker_consumer_lag) == 0) == {len(STAGE_NAMES)}", timeout=20)
        wait_for_dashboard_data(run.prometheus, timeout=20)
        yield run


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_prometheus_scrapes_every_stage(run):
    targets = run.prometheus.api("targets")
    assert isinstance(targets, dict)
    active = {t["labels"]["instance"]: t["health"] for t in targets["activeTargets"]}
    assert active == {addr: "up" for addr in [*run.targets.values(), run.portal]}


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_the_portals_refusals_are_scraped_for_its_alert(run):
    """BrokerPortalBusy reads ``portal_refused_total{limit="busy"}``: the portal exports it from its start, at 0."""
    refused = run.prometheus.query(f'portal_refused_total{{instance="{run.portal}"}}')
    assert sorted(r["metric"]["limit"] for r in refused) == ["busy", "client_budget", "client_concurrency"]
    assert finite(refused) == [0.0, 0.0, 0.0]


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
@pytest.mark.parametrize(("title", "expr"), dashboard_queries(gateway=False),
                         ids=[t for t, _ in dashboard_queries(gateway=False)])
def test_dashboard_query_returns_data(run, title, expr):
    """Every query of the pipeline's panels (the SASL gateway's: ``test_the_sasl_gateway_is_scraped_...``)."""
    result = run.prometheus.query(expr)
    assert finite(result), f"{title}: {expr} returned {result}"


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_every_stage_exports_its_consumer_lag_and_a_drained_run_reads_zero(run):
    lag = run.prometheus.query("broker_consumer_lag")
    by_stage = {s["metric"]["stage"]: float(s["value"][1]) for s in lag}
    assert by_stage == dict.fromkeys(STAGE_NAMES, 0.0)  # transaction markers are not lag
    inputs = {s["metric"]["stage"]: s["metric"]["topic"] for s in lag}
    assert inputs["ingest"] == "frames" and inputs["archive"] == "alerts"


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_every_stage_reports_its_kafka_connection(run):
    """``broker_kafka_brokers_up`` (read by BrokerKafkaUnreachable), from each stage's consumer statistics."""
    (count,) = run.prometheus.wait_for(f"count(broker_kafka_brokers_up == 1) == {len(STAGE_NAMES)}", timeout=20)
    up = run.prometheus.query("broker_kafka_brokers_up")
    assert sorted(u["metric"]["stage"] for u in up) == sorted(STAGE_NAMES)  # one broker, embedded


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_the_stages_that_keep_state_on_disk_report_its_free_space(run):
    """``broker_state_disk_{free,size}_bytes`` (read by BrokerStateDiskFilling) of subtract, score and archive."""
    free = {s["metric"]["stage"]: float(s["value"][1]) for s in run.prometheus.query("broker_state_disk_free_bytes")}
    size = {s["metric"]["stage"]: float(s["value"][1]) for s in run.prometheus.query("broker_state_disk_size_bytes")}
    assert set(free) == set(size) == {"subtract", "score", "archive"}  # the others keep nothing on a disk
    assert all(0 < free[s] <= size[s] for s in free)


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_the_garbage_record_is_a_dead_letter_and_messages_add_up(run):
    q = run.prometheus.query
    assert finite(q('broker_errors_total{stage="ingest", reason="decode"}')) == [1.0]
    ingested = finite(q('broker_messages_in_total{stage="ingest"}'))
    assert run.garbage == 1 and ingested == [float(len(run.frames) + run.garbage)]


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_the_deployment_rules_evaluate_on_the_live_series_and_none_fires(run):
    data = run.prometheus.api("rules")
    assert isinstance(data, dict)
    rules = [r for g in data["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == sorted(ALERTS)
    assert all(r["health"] == "ok" for r in rules), json.dumps(rules, indent=1)[:4000]
    firing = run.prometheus.query('ALERTS{alertstate="firing"}')
    assert not firing, firing


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_burst_the_portal_refuses_as_busy_puts_the_deployed_portal_busy_rule_in_pending(run):
    """The deployed BrokerPortalBusy, on the live scrape, goes pending once the portal refuses costly work.

    96 triplet PNGs at once from 96 addresses (``X-Forwarded-For``, which uvicorn believes from the
    local host) against one slot of costly work: those that would wait past ``costly_wait_s`` are
    answered 503 ``busy``. Firing takes the rule's ``for: 10m`` more (promtool's unit tests show that).
    """
    import httpx

    portal = f"http://{run.portal}"
    (alert,) = httpx.get(f"{portal}/api/v1/alerts", params={"limit": 1}, timeout=30).json()["items"]

    def get(i: int) -> int:
        headers = {"X-Forwarded-For": f"198.51.100.{i}"}
        return httpx.get(f"{portal}/api/v1/alerts/{alert['alert_id']}/triplet.png", headers=headers,
                         timeout=120).status_code

    with ThreadPoolExecutor(96) as pool:
        answers = list(pool.map(get, range(96)))
    assert answers.count(503) >= 20 and set(answers) == {200, 503}, answers
    query = f'ALERTS{{alertname="BrokerPortalBusy", instance="{run.portal}"}}'
    (active,) = run.prometheus.wait_for(query, timeout=30)
    assert active["metric"]["alertstate"] == "pending" and active["metric"]["severity"] == "warning", active
    busy = f'portal_refused_total{{instance="{run.portal}", limit="busy"}} == {answers.count(503)}'
    assert run.prometheus.wait_for(busy, timeout=10), "every 503 is counted as busy"


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_hostile_records_put_the_deployed_dead_letter_and_lineage_rules_in_action(run):
    """Six undecodable records on ``frames``, each with a forged lineage (``src``) header.

    Ingest ignores the claims (it has no upstream topic) and dead-letters the records: BrokerLineageRejected
    fires at once (it has no ``for``), and BrokerDeadLetterRate goes pending (7 of 12 inputs dead-lettered in
    10 min; firing takes its ``for: 10m`` more).
    """
    from confluent_kafka import Producer

    from streams.producer import frame_headers

    producer = Producer({"bootstrap.servers": run.kafka.bootstrap})
    for i in range(6):
        producer.produce("frames", b"\x00not an avro frame record", b"TEST/F001",
                         headers={**frame_headers(time.time()), "src": f"subtracted:0:{i}".encode()})
    assert producer.flush(30) == 0
    del producer
    lineage = run.prometheus.wait_for('ALERTS{alertname="BrokerLineageRejected", alertstate="firing"}', timeout=30)
    assert [(a["metric"]["stage"], a["metric"]["reason"]) for a in lineage] == [("ingest", "wrong_topic")]
    (dead,) = run.prometheus.wait_for('ALERTS{alertname="BrokerDeadLetterRate"}', timeout=30)
    assert (dead["metric"]["stage"], dead["metric"]["alertstate"]) == ("ingest", "pending"), dead
    errors = run.prometheus.query('broker_errors_total{stage="ingest"}')
    assert {e["metric"]["reason"]: finite([e])[0] for e in errors} == {"decode": 7.0}


def _send(run, n: int, store: FrameStore | None = None, late_s: float = 0.0) -> None:
    """The run's next ``n`` frames of its field (``scraped_run``'s seed), their shutters closed ``late_s`` s ago.

    Through ``store`` when given, every frame by reference (inline limit 0); else inline, as the run sent its own.
    """
    from broker.simulate import SkySimulator
    from streams.producer import FrameProducer
    from streams.settings import KafkaSettings

    frames = list(SkySimulator(sky_config(), seed=3).frames(len(run.frames) + n))[len(run.frames):]
    by_reference = store is not None
    producer = FrameProducer(KafkaSettings(run.kafka.bootstrap, app_id="monitoring"),
                             store if by_reference else FrameStore(run.frame_store), 0 if by_reference else 8 << 20,
                             1 << 30)
    for frame, truth in frames:
        producer.publish_frame(frame, time.time() - late_s)
        run.frames.append(truth.frame_id)
    producer.flush()


class _MountLostAfterPut(FrameStore):
    """The run's frame store, whose root stops answering (a link loop, as a stale mount) right after a write."""

    def put(self, payload: bytes) -> tuple[str, str]:
        out = super().put(payload)
        root = Path(self.root)
        root.rename(f"{root}.kept")
        Path(f"{root}.loop").symlink_to(root)
        root.symlink_to(f"{root}.loop")
        return out


def _restore(root: str) -> None:
    Path(root).unlink()
    Path(f"{root}.loop").unlink()
    Path(f"{root}.kept").rename(root)


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_frame_store_outage_puts_the_deployed_waiting_rule_in_pending_and_the_frame_goes_through_after(run):
    """A frame sent through the store while the store does not answer: ingest keeps it and retries.

    BrokerStageWaitingOnOutage goes pending for ingest with the outage's reason (firing takes its ``for: 5m``
    more; promtool's unit tests show that); once the store answers again, the kept frame is ingested, not
    dead-lettered, and its alerts are published.
    """
    q = run.prometheus.query
    before = {(name, stage): finite(q(f'sum({name}{{stage="{stage}"}})')) for name, stage in _FLOW}
    try:
        _send(run, 1, store=_MountLostAfterPut(run.frame_store))
        rule = 'ALERTS{alertname="BrokerStageWaitingOnOutage", stage="ingest", reason="frame_store_unavailable"}'
        (active,) = run.prometheus.wait_for(rule, timeout=30)
        assert active["metric"]["alertstate"] == "pending" and active["metric"]["severity"] == "critical", active
    finally:
        _restore(run.frame_store)
    for name, stage in (_FLOW[0], _FLOW[2]):  # the kept frame, then its alerts (retries are 1, 5, 15, 30 s apart)
        run.prometheus.wait_for(f'sum({name}{{stage="{stage}"}}) > {before[(name, stage)][0]}', timeout=90)
    after = {(name, stage): finite(q(f'sum({name}{{stage="{stage}"}})')) for name, stage in _FLOW}
    assert after[("broker_messages_in_total", "ingest")] == [before[("broker_messages_in_total", "ingest")][0] + 1]
    assert after[("broker_errors_total", "ingest")] == before[("broker_errors_total", "ingest")]  # not dead-lettered
    assert after[("broker_messages_out_total", "alert")] > before[("broker_messages_out_total", "alert")]


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_frame_delivered_late_puts_the_deployed_latency_slo_rule_in_pending(run):
    """A frame sent 5 min after its shutter closed (a telescope's uplink was down): its alerts are 5 min late.

    They are most of the run's alerts of the last 10 minutes, so the p95 latency is over the 60 s SLO and
    BrokerAlertLatencyOverSLO goes pending (firing takes its ``for: 10m`` more).
    """
    rule = 'ALERTS{alertname="BrokerAlertLatencyOverSLO"}'
    assert not run.prometheus.query(rule)
    _send(run, 1, late_s=300)
    (active,) = run.prometheus.wait_for(rule, timeout=90)
    assert (active["metric"]["alertstate"], active["metric"]["severity"]) == ("pending", "critical"), active


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_burst_of_frames_puts_the_deployed_lag_rule_in_pending(run):
    """24 frames sent at once: ingest's lag rises above 5 offsets and BrokerConsumerLagGrowing goes pending.

    Firing takes its ``for: 15m`` more, which a burst the stage then drains never reaches (promtool's unit
    tests show both).
    """
    _send(run, 24)
    (active,) = run.prometheus.wait_for('ALERTS{alertname="BrokerConsumerLagGrowing", stage="ingest"}', timeout=60)
    assert active["metric"]["alertstate"] == "pending", active  # a later stage may follow once ingest passes on


def _crash_and_restart(run, stage: str, log: Path, started: float) -> float:
    """SIGKILL ``stage`` (started at ``started``) and start it again as it was, on its metrics port; the new start."""
    old = run.processes[stage]
    old.kill()
    old.wait(10)
    args = list(old.args)
    args[args.index("--metrics-port") + 1] = run.targets[stage].rsplit(":", 1)[1]
    with log.open("ab") as out:
        run.processes[stage] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    query = f'process_start_time_seconds{{instance="{run.targets[stage]}"}} > {started}'
    (new,) = run.prometheus.wait_for(query, timeout=60)  # scraped under the same instance, a new start time
    return float(new["value"][1])


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_stage_in_a_crash_loop_makes_the_deployed_restarting_rule_fire(run, tmp_path):
    """Killed and restarted twice under its scrape address, as Kubernetes restarts a crashing container.

    ``process_start_time_seconds`` of that instance changes twice, and BrokerStageRestarting (no ``for``)
    fires for it alone. The stage is left running.
    """
    stage = "score"
    (start,) = run.prometheus.query(f'process_start_time_seconds{{instance="{run.targets[stage]}"}}')
    restarted = _crash_and_restart(run, stage, tmp_path / "score.log", float(start["value"][1]))
    _crash_and_restart(run, stage, tmp_path / "score.log", restarted)
    query = 'ALERTS{alertname="BrokerStageRestarting", alertstate="firing"}'
    firing = run.prometheus.wait_for(query, timeout=30)
    assert [a["metric"]["instance"] for a in firing] == [run.targets[stage]], firing
    assert run.prometheus.wait_for(f'up{{instance="{run.targets[stage]}"}} == 1', timeout=10)


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_a_stage_that_stops_puts_the_deployed_stage_down_and_missing_rules_in_pending(run):
    """The deployed BrokerStageDown and BrokerStageMissing, evaluated by Prometheus on the live scrape, go pending.

    Firing takes the rule's ``for: 2m`` more (promtool's unit tests show that). Runs last but one: it stops a stage.
    """
    stage = "alert"
    run.processes[stage].terminate()
    run.processes[stage].wait(20)
    query = f'ALERTS{{alertname="BrokerStageDown", instance="{run.targets[stage]}"}}'
    run.prometheus.wait_for(f'count({query}) == 1', timeout=30)
    (active,) = run.prometheus.query(query)
    assert active["metric"]["alertstate"] == "pending" and active["metric"]["severity"] == "critical", active
    others = run.prometheus.query('ALERTS{alertname="BrokerStageDown"}')
    assert [a["metric"]["instance"] for a in others] == [run.targets[stage]]  # the other stages stay up
    # its series went stale with the failed scrape: no replica of the stage is left
    (missing,) = run.prometheus.wait_for('ALERTS{alertname="BrokerStageMissing"}', timeout=30)
    assert (missing["metric"]["stage"], missing["metric"]["alertstate"]) == (stage, "pending"), missing


@pytest.mark.kafka
@pytest.mark.prometheus
@pytest.mark.slow
def test_kafka_gone_puts_the_deployed_kafka_unreachable_rule_in_pending_and_every_stage_waits(run):
    """With the broker stopped, each running stage reports no broker up and BrokerKafkaUnreachable goes pending.

    The stages' ``up`` stays 1 (they keep running and answer scrapes), so only ``broker_kafka_brokers_up``, set
    from librdkafka's statistics every 15 s, shows the outage. Firing takes the rule's ``for: 2m`` more
    (promtool's unit tests show that). Runs last: it stops the broker.
    """
    running = sorted(s for s, p in run.processes.items() if p.poll() is None)
    assert len(running) >= 5  # the stage-down test stops one
    # The earlier bursts drained first, every stage idle for 5 s: a stage inside a transaction's commit when
    # the broker goes polls (and so reports its statistics) only once that call gives up, up to 90 s later.
    busy = "|".join(s for s in running if s != "archive")
    assert run.prometheus.wait_for(f'sum(broker_consumer_lag{{stage=~"{busy}"}}) == 0', timeout=120)
    assert run.prometheus.wait_for(f'sum(increase(broker_messages_in_total{{stage=~"{busy}"}}[5s])) == 0', timeout=60)
    run.kafka.stop()
    query = 'ALERTS{alertname="BrokerKafkaUnreachable"}'
    run.prometheus.wait_for(f"count({query}) == {len(running)}", timeout=60)
    active = run.prometheus.query(query)
    assert sorted(a["metric"]["stage"] for a in active) == running
    assert {(a["metric"]["alertstate"], a["metric"]["severity"]) for a in active} == {("pending", "critical")}
    assert [s for s in running if run.processes[s].poll() is not None] == []  # no stage exits for an outage
    up = run.prometheus.query('up{job="broker-stages"} == 1')
    assert sorted(u["metric"]["instance"] for u in up) == sorted(run.targets[s] for s in running)
