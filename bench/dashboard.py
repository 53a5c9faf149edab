"""The monitoring seen working: a pipeline run scraped by a real Prometheus, and the dashboard drawn from it.

Grafana is not installed here, so ``docs/dashboard.png`` is each panel of
``deploy/grafana/dashboards/broker.json`` drawn with matplotlib from the panel's own PromQL
queries, evaluated over a range by a Prometheus server (Debian's ``prometheus`` package) that
scraped every stage of a pipeline run on the embedded broker. ``tests/test_monitoring.py`` uses
the same pieces (:class:`LocalPrometheus`, :func:`scraped_run`) to assert that every query
returns data.

    python -m bench.dashboard [--frames 24] [--interval 5] [--burst 10] [--out docs/dashboard.png] [--no-auth]

By default the pipeline runs behind the TLS/SASL gateway of ``broker embedded --auth`` (each stage
its own user), which Prometheus scrapes too, so the gateway's panels are drawn from its own traffic
and from a TCP health check, a plaintext client and a wrong password sent with each undecodable record.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.simulate import SimConfig
    from streams.embedded import EmbeddedKafka
    from streams.secure_embedded import SecureEmbeddedKafka
    from streams.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "broker.json"
#: The scrape job of the stages in ``deploy/prometheus/prometheus.yml``.
STAGES_JOB = "broker-stages"
#: The scrape job of the portal in ``deploy/prometheus/prometheus.yml``.
PORTAL_JOB = "broker-portal"
#: The scrape job of the SASL gateway of ``broker embedded --auth`` in ``deploy/prometheus/prometheus.yml``.
GATEWAY_JOB = "broker-gateway"
_METRICS_LINE = re.compile(r"^(\w+): metrics on http://([^/\s]+)/metrics", re.M)


def prometheus_binary() -> str | None:
    """The ``prometheus`` server on the PATH (Debian's package installs it in /usr/bin), or None."""
    return shutil.which("prometheus")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def local_config(targets: list[str], scrape_interval: str = "1s", portal: str | None = None,
                 gateway: str | None = None, rule_files: list[Path] | None = None) -> dict:
    """``deploy/prometheus/prometheus.yml`` adapted to a local run.

    The stages' job scrapes ``targets`` (``host:port``) every ``scrape_interval``, the portal's job
    ``portal`` and the SASL gateway's job ``gateway`` (``host:port``; None: the job is left out),
    rules are evaluated as often, and the rule files are the deployment's own (absolute paths), or
    ``rule_files`` when given.
    """
    import yaml

    cfg = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    cfg["global"] = {**cfg.get("global", {}), "scrape_interval": scrape_interval,
                     "evaluation_interval": scrape_interval}
    cfg["rule_files"] = [str(PROMETHEUS_DIR / f) for f in cfg.get("rule_files", [])] if rule_files is None \
        else [str(f) for f in rule_files]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == STAGES_JOB]
    job["static_configs"] = [{"targets": sorted(targets)}]
    (web,) = [j for j in cfg["scrape_configs"] if j["job_name"] == PORTAL_JOB]
    web["static_configs"] = [{"targets": [portal]}]
    (gw,) = [j for j in cfg["scrape_configs"] if j["job_name"] == GATEWAY_JOB]
    gw["static_configs"] = [{"targets": [gateway]}]
    cfg["scrape_configs"] = [job] + ([web] if portal else []) + ([gw] if gateway else [])
    return cfg


class LocalPrometheus:
    """A Prometheus server on a free 127.0.0.1 port with temporary storage, scraping ``targets``.

    Parameters
    ----------
    targets : list of str
        ``host:port`` of the stages' ``/metrics``.
    workdir : Path
        Where its configuration, storage and log go.
    scrape_interval : str
        Scrape and rule-evaluation interval (Prometheus duration). Default ``1s``.
    portal, gateway : str or None
        ``host:port`` of the portal's and of the SASL gateway's ``/metrics`` (None: not scraped).
    rule_files : list of Path or None
        Rule files evaluated; None (the default): the deployment's (``deploy/prometheus/alerts.yml``).
    """

    def __init__(self, targets: list[str], workdir: Path, scrape_interval: str = "1s",
                 portal: str | None = None, gateway: str | None = None, rule_files: list[Path] | None = None) -> None:
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
        self.binary, self.workdir = binary, workdir
        self.targets, self.scrape_interval, self.portal, self.gateway = targets, scrape_interval, portal, gateway
        self.rule_files = rule_files
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> LocalPrometheus:
        import yaml

        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump(local_config(self.targets, self.scrape_interval, self.portal,
                                                      self.gateway, self.rule_files)))
        with open(self.workdir / "prometheus.log", "ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30.0
        while not self._ready():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                raise RuntimeError(f"prometheus did not start; see {self.workdir / 'prometheus.log'}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def api(self, path: str, **params: object) -> dict | list:
        """The ``data`` of ``GET /api/v1/<path>?params`` (raises on an API error)."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            body = json.load(resp)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path}: {body}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        """The instant vector ``expr`` at ``at`` (Unix s; default now): ``[{metric, value: [t, "v"]}]``."""
        data = self.api("query", query=expr, time=at)
        assert isinstance(data, dict)
        return list(data["result"])

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """The range vector of ``expr`` over [start, end] every ``step`` s: ``[{metric, values}]``."""
        data = self.api("query_range", query=expr, start=start, end=end, step=step)
        assert isinstance(data, dict)
        return list(data["result"])

    def wait_for(self, expr: str, timeout: float) -> list[dict]:
        """Poll the instant query ``expr`` until it returns a series (its result; [] on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result or time.monotonic() > deadline:
                return result
            time.sleep(0.5)


def metrics_targets(log_dir: Path, stages: tuple[str, ...], timeout: float = 60.0) -> dict[str, str]:
    """``host:port`` of each stage's ``/metrics``, read from the line each stage logs at start."""
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, str] = {}
        for path in log_dir.glob("*.log"):
            found.update(_METRICS_LINE.findall(path.read_text(errors="replace")))
        if set(stages) <= set(found) or time.monotonic() > deadline:
            missing = set(stages) - set(found)
            if missing:
                raise TimeoutError(f"no metrics address logged by {sorted(missing)} in {log_dir}")
            return {s: found[s] for s in stages}
        time.sleep(0.2)


def wait_for_dashboard_data(prom: LocalPrometheus, timeout: float, gateway: bool = False) -> dict[str, list[dict]]:
    """Poll until every query of the dashboard returns a finite value; the last result of each query.

    The queries of the pipeline's panels, or with ``gateway`` those of the SASL gateway's (see
    :func:`dashboard_queries`).
    """
    deadline = time.monotonic() + timeout
    while True:
        results = {expr: prom.query(expr) for _, expr in dashboard_queries(gateway=gateway)}
        if all(finite(r) for r in results.values()) or time.monotonic() > deadline:
            return results
        time.sleep(0.5)


def finite(result: list[dict]) -> list[float]:
    """The finite values of an instant-query result."""
    return [float(s["value"][1]) for s in result if math.isfinite(float(s["value"][1]))]


def dashboard_queries(dashboard: Path = DASHBOARD, gateway: bool | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel of the Grafana dashboard.

    ``gateway`` True: only the SASL gateway's panels (those reading ``broker_gateway_*``, which only
    ``broker embedded --auth --metrics-port`` exports); False: the others; None: all.
    """
    dash = json.loads(dashboard.read_text())
    panels = [p for p in dash["panels"]
              if gateway is None or gateway == any("broker_gateway_" in t["expr"] for t in p.get("targets", []))]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


@dataclass
class ScrapedRun:
    """A pipeline run on the embedded broker whose stages a :class:`LocalPrometheus` scrapes."""

    prometheus: LocalPrometheus
    kafka: EmbeddedKafka | SecureEmbeddedKafka  # the run's broker (stopping it is an outage of Kafka)
    targets: dict[str, str]  # stage -> host:port of its /metrics
    portal: str  # host:port of the portal (broker serve) on the run's state folder
    gateway: str | None  # host:port of the SASL gateway's /metrics (a run with auth), else None
    started: float  # Unix s, when the stages were started
    processes: dict[str, subprocess.Popen]  # stage -> its process
    frame_store: str  # root of the frame store the stages read
    frames: list[str] = field(default_factory=list)  # frame ids published
    garbage: int = 0  # undecodable records published


@contextmanager
def _portal(state_dir: Path, *options: str) -> Iterator[str]:
    """``broker serve`` on ``state_dir`` (the run's) on a free port: its ``host:port``; stopped on exit."""
    from bench.portal import start_server

    port = free_port()
    proc = start_server(state_dir, port, *options)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def sky_config() -> SimConfig:
    """The simulated sky of :func:`scraped_run`: frames of 512x512 of one field, ``F001``."""
    from broker.simulate import SimConfig

    return SimConfig(shape=(512, 512), fields=("F001",), n_stars=250, n_galaxies=25, n_transients=6,
                     n_variables=4, n_moving=1, n_cosmic_rays=10.0)


@dataclass
class _Broker:
    """The run's broker, and the Kafka settings of each of its clients."""

    kafka: EmbeddedKafka | SecureEmbeddedKafka
    admin: KafkaSettings  # topics, the drained check
    telescope: KafkaSettings  # the frames' producer
    env: dict[str, dict[str, str]]  # stage -> the environment of its process (its user's credentials)
    gateway: str | None  # host:port of the SASL gateway's /metrics, with auth


def _broker(stack: ExitStack, auth: bool) -> _Broker:
    """The embedded broker, entered on ``stack``: plaintext, or with ``auth`` behind the TLS/SASL gateway.

    With ``auth`` (``broker embedded --auth --metrics-port 0``), each stage logs in as its own user,
    the frames are sent as ``telescope``, and the gateway's ``/metrics`` is scraped.
    """
    from streams.embedded import EmbeddedKafka
    from streams.secure_embedded import SecureEmbeddedKafka
    from streams.settings import KafkaSettings
    from streams.stages import STAGE_NAMES

    if not auth:
        kafka = stack.enter_context(EmbeddedKafka())
        plain = KafkaSettings(kafka.bootstrap, app_id="monitoring")
        return _Broker(kafka, plain, plain, {s: {} for s in STAGE_NAMES}, None)
    secure = stack.enter_context(SecureEmbeddedKafka(metrics_port=0))
    assert secure.metrics_url is not None
    return _Broker(secure, secure.settings("admin", "monitoring"), secure.settings("telescope", "monitoring"),
                   {s: secure.env(s) for s in STAGE_NAMES}, secure.metrics_url.split("/")[2])


def misuse_gateway(kafka: SecureEmbeddedKafka) -> None:
    """What a TLS/SASL gateway meets besides its clients: a TCP health check, a plaintext client, a wrong password.

    Each on a connection of its own, so that the gateway's probe, ``tls_handshake`` refusal and
    ``credentials`` login failure are counted (its dashboard panels are drawn from them).
    """
    import ssl
    import struct

    def request(api_key: int, version: int, body: bytes) -> bytes:
        payload = struct.pack(">hhih", api_key, version, 1, -1) + body
        return struct.pack(">i", len(payload)) + payload

    plain = b"PLAIN"
    handshake = request(17, 1, struct.pack(">h", len(plain)) + plain)
    login = b"\0subscriber\0not-the-password"
    authenticate = request(36, 1, struct.pack(">i", len(login)) + login)
    host, port = kafka.bootstrap.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=10).close()  # the health check
    with socket.create_connection((host, int(port)), timeout=10) as conn:  # no TLS
        conn.sendall(handshake)
        conn.recv(1 << 16)
    tls = ssl.create_default_context(cafile=str(kafka.ca))
    with socket.create_connection((host, int(port)), timeout=10) as raw, \
            tls.wrap_socket(raw, server_hostname="localhost") as conn:
        conn.sendall(handshake)
        conn.recv(1 << 16)
        conn.sendall(authenticate)
        conn.recv(1 << 16)


@contextmanager
def scraped_run(workdir: Path, n_frames: int = 5, interval: float = 0.0, burst: int = 0, garbage_every: int = 0,
                seed: int = 3, portal_options: tuple[str, ...] = (), auth: bool = False) -> Iterator[ScrapedRun]:
    """Run every stage on small simulated frames while Prometheus scrapes them; yield when drained.

    ``n_frames`` frames of 512x512 of one field (the first 3 build the reference, the rest are
    subtracted) are sent ``interval`` s apart, then ``burst`` more at once. An undecodable record
    on ``frames`` goes first (dead-lettered by ingest, so the dead-letter series exist) and another
    before every ``garbage_every``-th frame (0: none). The portal runs with ``portal_options``
    (``broker serve`` options). With ``auth`` the broker is behind the TLS/SASL gateway
    (:func:`_broker`), scraped too, and :func:`misuse_gateway` runs with each undecodable record.
    Stages and Prometheus are stopped on exit.
    """
    from broker.simulate import SkySimulator
    from streams import topics
    from streams.demo import start_stages, stop_stages, wait_until_drained
    from streams.framestore import FrameStore
    from streams.producer import FrameProducer, frame_headers
    from streams.stages import STAGE_NAMES, pipeline_topics

    sim = sky_config()
    with ExitStack() as stack:
        broker = _broker(stack, auth)
        kafka, settings = broker.kafka, broker.admin
        topics.create_topics(settings, pipeline_topics(sim.filters))
        started = time.time()
        procs = [p for s in STAGE_NAMES for p in start_stages(kafka.bootstrap, settings.app_id, workdir, stages=(s,),
                                                              env=broker.env[s])]
        stack.callback(stop_stages, procs)
        targets = metrics_targets(workdir / "logs", STAGE_NAMES)
        portal = stack.enter_context(_portal(workdir / "state", *portal_options))
        prom = stack.enter_context(LocalPrometheus(list(targets.values()), workdir / "prometheus", portal=portal,
                                                   gateway=broker.gateway))
        run = ScrapedRun(prom, kafka, targets, portal, broker.gateway, started,
                         dict(zip(STAGE_NAMES, procs, strict=True)), str(workdir / "frames"))
        stack.callback(lambda: stop_stages(list(run.processes.values())))  # stages a test started again too
        # every series a stage exports from its start has a first sample before any message
        prom.wait_for(f'count(up{{job="{STAGES_JOB}"}} == 1) == {len(targets)}', timeout=30)
        prom.wait_for(f'up{{job="{PORTAL_JOB}"}} == 1', timeout=30)
        producer = FrameProducer(broker.telescope, FrameStore(run.frame_store), 8 << 20, 1 << 30)
        for i, (frame, truth) in enumerate(SkySimulator(sim, seed=seed).frames(n_frames + burst)):
            if 0 < i < n_frames and interval:
                time.sleep(interval)
            if i == 0 or (garbage_every and i % garbage_every == 0):
                headers: dict[str, str | bytes | None] = {**frame_headers(time.time())}
                producer.producer.produce(topics.FRAMES, b"\x00not an avro frame record", b"TEST/F001",
                                          headers=headers)
                run.garbage += 1
                if broker.gateway is not None:
                    misuse_gateway(kafka)  # type: ignore[arg-type]
            producer.publish_frame(frame, time.time())
            producer.flush()
            run.frames.append(truth.frame_id)
        wait_until_drained(settings, procs, timeout=600)
        del producer  # flushed: closed now, not after the broker is gone
        yield run


def _legend(fmt: str, labels: dict[str, str]) -> str:
    """A Grafana ``legendFormat`` filled with a series' labels."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip() or "value"


_UNITS = {"ops": ("/ s", 1.0), "s": ("s", 1.0), "bytes": ("MiB", 1.0 / 2**20), "short": ("", 1.0)}


def render(prom: LocalPrometheus, start: float, end: float, out: Path, dashboard: Path = DASHBOARD,
           step: float = 2.0) -> int:
    """Draw every panel of ``dashboard`` from its queries over [start, end] into ``out``; return the series drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(dashboard.read_text())
    panels = dash["panels"]
    ncols = 3
    nrows = math.ceil(len(panels) / ncols)
    drawn = 0
    with plt.style.context("dark_background"):
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 3.1 * nrows), squeeze=False,
                                 constrained_layout=True)
        for ax, panel in zip(axes.flat, panels, strict=False):
            unit, scale = _UNITS.get(panel["fieldConfig"]["defaults"].get("unit", "short"), ("", 1.0))
            for target in panel["targets"]:
                for series in prom.query_range(target["expr"], start, end, step):
                    t = [float(v[0]) - start for v in series["values"]]
                    y = [float(v[1]) * scale for v in series["values"]]
                    ax.plot(t, y, lw=1.4, label=_legend(target.get("legendFormat", ""), series["metric"]))
                    drawn += 1
            for step_ in panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", []):
                if step_.get("value") is not None:
                    ax.axhline(step_["value"] * scale, color="tab:red", ls="--", lw=1, label="SLO")
            ax.set_title(panel["title"], fontsize=10, loc="left")
            ax.set_ylabel(unit, fontsize=8)
            ax.set_xlabel("s since the stages started", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.2)
            top = ax.get_ylim()[1]
            ax.set_ylim(0, top * 1.05 if top > 0 else 1)  # every panel is a count, a rate or a time
            if ax.lines:
                ax.legend(fontsize=6, ncol=2, loc="upper left", frameon=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{dash['title']}: deploy/grafana/dashboards/broker.json drawn from a live Prometheus "
                     f"({time.strftime('%Y-%m-%d', time.gmtime(end))}, python -m bench.dashboard)", fontsize=11)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=90)
        plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> None:
    """Run a paced pipeline under Prometheus and draw the dashboard into ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=24, help="paced frames (the first 3 build the reference)")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between frames")
    ap.add_argument("--burst", type=int, default=10, help="frames sent at once after the paced ones (lag)")
    ap.add_argument("--garbage-every", type=int, default=6, help="an undecodable record before every n-th frame")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--no-auth", action="store_true", help="the plaintext embedded broker, no SASL gateway (whose "
                    "panels are then empty); default: behind the gateway, as broker embedded --auth runs it")
    args = ap.parse_args(argv)
    if prometheus_binary() is None:
        raise SystemExit("prometheus is not installed (Debian: apt-get install prometheus)")
    with tempfile.TemporaryDirectory() as tmp, scraped_run(Path(tmp), args.frames, args.interval, args.burst,
                                                           args.garbage_every, auth=not args.no_auth) as run:
        time.sleep(5.0)  # a few scrapes after the last message
        n = render(run.prometheus, run.started, time.time(), args.out)
    print(f"{args.out}: {n} series from {len(dashboard_queries())} queries")


if __name__ == "__main__":
    main()
