"""docker-compose.yml's own services started as written, without a container engine.

Every service the compose file builds from this repository (``topics``, the six stages, the
``producer``, the ``subscriber`` and the ``portal``) runs here with its own command or entrypoint,
environment and secret, on the embedded broker behind the SASL gateway (SASL_PLAINTEXT, as on
the compose network; :mod:`streams.secure_embedded`) with the in-memory schema registry. Only what
the container engine provides is put in its place (:class:`Host`):

- host names: ``kafka:9092`` and ``kafka:9094`` become the gateway, ``schema-registry:8081`` the
  local registry, ``0.0.0.0`` becomes ``127.0.0.1``;
- ports: the services share one host, so each one's ``8000`` becomes a free port;
- the ``state`` volume ``/app/var`` becomes a temporary folder and the image's ``/app`` its parent
  (the working directory, as the Dockerfile's ``WORKDIR``);
- the secret ``/run/secrets/<user>`` becomes that user's password file of the gateway.

Not run here: the image build, Apache Kafka's ACLs (``deploy/kafka/users.sh``; tansu has none,
``tests/test_deploy.py`` checks them against the stages), Prometheus and Grafana
(``tests/test_monitoring.py`` runs their configuration).
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from streams.embedded import free_port
from streams.stages import STAGE_NAMES
from tests.rehearsal import answers, base_env, listed, start, stop, wait_for

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
#: The compose file's services built from this repository, in the order they start.
BUILT = ("topics", *STAGE_NAMES, "portal", "producer", "subscriber")


@dataclass
class Host:
    """What the container engine provides, on this machine: addresses, the state volume, secrets."""

    bootstrap: str
    registry: str
    app: Path
    secrets: dict[str, Path]
    ports: dict[str, int] = field(default_factory=dict)  # service -> the port its 8000 became

    def argv(self, service: str, spec: dict) -> list[str]:
        """The service's command line: the image's ``broker`` entrypoint and its command, or its own entrypoint."""
        argv = [*spec.get("entrypoint", ["broker"]), *spec.get("command", [])]
        return [self.text(service, arg) for arg in argv]

    def text(self, service: str, arg: str) -> str:
        """One argument with the compose network's names and paths replaced by this host's."""
        for name, here in (("kafka:9092", self.bootstrap), ("kafka:9094", self.bootstrap),
                           ("http://schema-registry:8081", self.registry), ("0.0.0.0", "127.0.0.1"),
                           ("/app/var", str(self.app / "var")), ("/run/secrets/", "")):
            arg = arg.replace(name, here)
        if arg == "8000":
            arg = str(self.ports.setdefault(service, free_port()))
        return arg

    def env(self, service: str, spec: dict) -> dict[str, str]:
        """The service's environment, its secret's file in place of ``/run/secrets/<user>``."""
        env = base_env()
        for key, value in (spec.get("environment") or {}).items():
            env[key] = self.text(service, str(value))
        if "BROKER_KAFKA_PASSWORD_FILE" in env:
            env["BROKER_KAFKA_PASSWORD_FILE"] = str(self.secrets[env["BROKER_KAFKA_PASSWORD_FILE"]])
        return env

    def start(self, service: str, spec: dict, logs: Path) -> subprocess.Popen:
        """Start the service, its output in ``logs/<service>.out`` and ``.err``."""
        return start(service, self.argv(service, spec), self.env(service, spec), self.app, logs)


@contextmanager
def compose_up(compose: dict, tmp: Path) -> Iterator[tuple[Host, dict[str, subprocess.Popen], Path]]:
    """``docker compose up`` of the built services of ``compose``, the topics created first; stopped on exit."""
    from streams.registry import EmbeddedRegistry
    from streams.secure_embedded import SecureEmbeddedKafka

    services, logs = compose["services"], tmp / "logs"
    (tmp / "app" / "var").mkdir(parents=True)
    logs.mkdir()
    with ExitStack() as stack:
        kafka = stack.enter_context(SecureEmbeddedKafka(users=tuple(compose["secrets"]), tls=False,
                                                        directory=tmp / "kafka"))
        registry = stack.enter_context(EmbeddedRegistry())
        host = Host(kafka.bootstrap, registry.url, tmp / "app", {u: kafka.password_file(u) for u in compose["secrets"]})
        topics = host.start("topics", services["topics"], logs)
        assert topics.wait(120) == 0, (logs / "topics.err").read_text()[-3000:]
        procs = {name: host.start(name, services[name], logs) for name in (*STAGE_NAMES, "portal")}
        for proc in procs.values():
            stack.callback(stop, proc)
        yield host, procs, logs


@pytest.mark.kafka
@pytest.mark.slow
def test_the_compose_services_start_as_written_and_alerts_reach_the_subscriber_and_the_portal(tmp_path):
    """The compose file's services run a night: topics, stages, portal, producer, subscriber.

    ``topics`` logs in as the administrator (PLAIN), every other service as its own user (SCRAM);
    the producer sends 20 simulated frames, the portal lists archived alerts and the subscriber
    shows alerts.
    """
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    built = sorted(n for n, s in services.items() if s.get("build") == ".")
    assert sorted(BUILT) == built, built  # a service added to the compose file is started here too
    with compose_up(compose, tmp_path) as (host, procs, logs):
        portal = f"http://127.0.0.1:{host.ports['portal']}"
        wait_for(lambda: answers(f"{portal}/api/v1/health"), 120, "the portal's health", procs, logs)
        for stage in STAGE_NAMES:  # what the compose file's Prometheus scrapes
            wait_for(lambda s=stage: answers(f"http://127.0.0.1:{host.ports[s]}/metrics"), 120, f"{stage}'s metrics",
                  procs, logs)
        producer = host.start("producer", services["producer"], logs)
        assert producer.wait(600) == 0, (logs / "producer.err").read_text()[-3000:]
        alerts = wait_for(lambda: listed(f"{portal}/api/v1/alerts"), 600, "archived alerts on the portal", procs, logs)
        subscriber = host.start("subscriber", services["subscriber"], logs)
        procs["subscriber"] = subscriber
        wait_for(lambda: (logs / "subscriber.out").read_text().count("\n") >= 1, 120, "alerts shown by the subscriber",
              procs, logs)
        stop(subscriber, signal.SIGINT)
        subjects = httpx.get(f"{host.registry}/subjects", timeout=10).json()
    assert "alerts-rubin-value" in subjects  # the alert stage registered the schema of its confluent topic
    shown = re.search(r"(\d+) shown", (logs / "subscriber.err").read_text())
    assert alerts and shown and int(shown.group(1)) >= 1, (logs / "subscriber.err").read_text()[-2000:]
    sent = (logs / "producer.out").read_text().count("sent ")
    assert sent == 20, (logs / "producer.out").read_text()[-2000:]  # broker simulate --frames 20, all sent
