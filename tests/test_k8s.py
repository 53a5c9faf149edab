"""``k8s/``'s own workloads started as written, without a cluster.

The six stage StatefulSets and the portal Deployment run here with their container's ``args``,
``env`` and volumes, and the ConfigMap ``broker-config`` as each pod sees it, against local
stand-ins of what the cluster's operators provide (:class:`Cluster`):

- Strimzi's Kafka: the embedded broker behind the TLS + SCRAM-SHA-512 gateway
  (:mod:`streams.secure_embedded`), with a user per ``KafkaUser`` and every ``KafkaTopic`` created
  with its partitions and configs (one replica: one broker here); the cluster CA Secret and each
  user's Secret mounted where the pods mount them;
- CloudNativePG's ``history``: PostgreSQL with TLS (``sslmode=require``), its database and owner,
  and the Secret ``history-app``;
- the object store: moto's S3 server (no S3 server runs here; the manifests name real buckets,
  which an operator creates), reached through the pods' ``AWS_*`` environment as
  ``k8s/config.yaml`` says;
- Confluent's registry: the in-memory one of :mod:`streams.registry`;
- Services' names and ports become 127.0.0.1 and free ports; a ``persistentVolumeClaim`` is a folder
  shared by the pods that claim it, the rest of a container's file system a folder of its own.

Not run: KEDA, the PodMonitor and rules (``tests/test_monitoring.py`` runs the rules), the Ingress,
NetworkPolicies, Strimzi's ACLs (the gateway has none; ``tests/test_deploy.py`` checks them), the image.
"""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from streams.embedded import free_port
from streams.runner import FAILPOINT_ENV
from tests import pg
from tests.rehearsal import answers, base_env, listed, running, start, stop, wait_for

yaml = pytest.importorskip("yaml")
pytest.importorskip("moto.server", reason="moto's S3 server (pip install 'moto[server]') stands in for the store")
pytest.importorskip("s3fs", reason="s3fs (the image's s3 extra) reads and writes the object store")

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "ghcr.io/transient-broker/broker"
#: Paths a container writes outside its mounts (``state_dir`` of pods without the state volume): its own.
CONTAINER_PATHS = ("/var/broker",)
#: Frames the telescope sends (the first three of each field and filter build its reference).
FRAMES = 8
#: Replicas started of a StatefulSet, as KEDA scales it up: pods of one stage must not fence each other.
REPLICAS = {"subtract": 2}
#: A node failure: a subtract pod dies (SIGKILL) inside the transaction of its first frame, and the
#: StatefulSet starts it again under its name (:func:`until_drained`).
CRASH = {FAILPOINT_ENV: "subtract:1"}


def manifests() -> list[dict]:
    """Every document of ``k8s/*.yaml``."""
    return [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


@dataclass
class Cluster:
    """What Kubernetes and its operators provide, on this machine: Services, Secrets, volumes, ports."""

    root: Path
    services: dict[str, str]  # "name:port" of a Service -> "127.0.0.1:port" here
    secrets: dict[str, dict[str, str]]  # Secret -> key -> value
    config_maps: dict[str, dict[str, str]]
    env: dict[str, str]  # what every pod gets besides its own env (the object store's AWS_*)
    ports: dict[str, int] = field(default_factory=dict)  # workload -> the port its 8000 became

    def text(self, value: str, mounts: dict[str, Path]) -> str:
        """``value`` with Service addresses and mounted paths as they are on this machine."""
        for name, here in self.services.items():
            value = value.replace(name, here)
        for path in sorted(mounts, key=len, reverse=True):
            value = value.replace(path, str(mounts[path]))
        return value.replace("0.0.0.0", "127.0.0.1")

    def mounts(self, pod: str, spec: dict, container: dict) -> dict[str, Path]:
        """The folder of each mount path of ``pod``, the container's own paths included."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts = {m["mountPath"]: self._volume(pod, volumes[m["name"]]) for m in container.get("volumeMounts", [])}
        for path in CONTAINER_PATHS:
            if not any(path.startswith(m) for m in mounts):
                mounts[path] = self.root / "pods" / pod / "fs" / path.strip("/")
                mounts[path].mkdir(parents=True, exist_ok=True)
        for m in container.get("volumeMounts", []):  # a ConfigMap's files see the pod's own mounts
            source = volumes[m["name"]].get("configMap")
            if source:
                for key, content in self.config_maps[source["name"]].items():
                    (mounts[m["mountPath"]] / key).write_text(self.text(content, mounts))
        return mounts

    def _volume(self, pod: str, volume: dict) -> Path:
        if "persistentVolumeClaim" in volume:
            folder = self.root / "claims" / volume["persistentVolumeClaim"]["claimName"]
        else:
            folder = self.root / "pods" / pod / "volumes" / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            for key, value in self.secrets[volume["secret"]["secretName"]].items():
                (folder / key).write_text(value)
        return folder

    def env_of(self, pod: str, container: dict, mounts: dict[str, Path]) -> dict[str, str]:
        """The container's environment: values, the pod's fields and Secrets' keys."""
        env = {**base_env(), **self.env}
        for var in container.get("env", []):
            source = var.get("valueFrom", {})
            if "value" in var:
                env[var["name"]] = self.text(str(var["value"]), mounts)
            elif "fieldRef" in source:
                env[var["name"]] = {"metadata.name": pod, "status.podIP": "127.0.0.1"}[source["fieldRef"]["fieldPath"]]
            else:
                ref = source["secretKeyRef"]
                env[var["name"]] = self.secrets[ref["name"]][ref["key"]]
        return env

    def run(self, name: str, spec: dict, logs: Path, replica: int = 0,
            env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start one replica of a workload: pod ``<name>-<replica>``, its port and logs under that name."""
        (container,) = spec["containers"]
        pod = f"{name}-{replica}"
        mounts = self.mounts(pod, spec, container)
        argv = [*container.get("command", ["broker"]), *container.get("args", [])]
        argv = [str(self.ports.setdefault(pod, free_port())) if a == "8000" else self.text(a, mounts) for a in argv]
        return start(pod, argv, {**self.env_of(pod, container, mounts), **(env or {})}, self.root, logs)


def workloads(docs: list[dict]) -> dict[str, dict]:
    """The pod specs of the StatefulSets and Deployments that run this project's image."""
    out = {}
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment"):
            spec = doc["spec"]["template"]["spec"]
            if all(c["image"].startswith(IMAGE) for c in spec["containers"]):
                out[doc["metadata"]["name"]] = spec
    return out


def create_topics(docs: list[dict], admin_settings: dict) -> list[str]:
    """Every KafkaTopic, as Strimzi's topic operator creates it (one replica here); the names."""
    from confluent_kafka.admin import AdminClient, NewTopic

    topics = [NewTopic(d["spec"].get("topicName", d["metadata"]["name"]), d["spec"]["partitions"], 1,
                       config={k: str(v) for k, v in d["spec"].get("config", {}).items()})
              for d in docs if d["kind"] == "KafkaTopic"]
    admin = AdminClient(admin_settings)  # kept until every future is done
    for future in admin.create_topics(topics).values():
        future.result(60)
    return [t.topic for t in topics]


@contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """The S3 server of moto on 127.0.0.1: the ``AWS_*`` environment that reaches it."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "rehearsal",
               "AWS_SECRET_ACCESS_KEY": "rehearsal-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    finally:
        server.stop()


@contextmanager
def history_database(tmp: Path) -> Iterator[tuple[pg.LocalPostgres, str]]:
    """CloudNativePG's ``history`` cluster: TLS, database ``broker`` owned by ``broker``; its password."""
    import secrets

    import psycopg

    from streams.certs import LocalCA

    server = LocalCA(tmp / "pg-ca").issue("history-rw", ("localhost", "127.0.0.1"))
    password = secrets.token_urlsafe(18)
    # the owner logs in with its password over TLS only, as CloudNativePG's app user does
    hba = ("hostssl broker broker 127.0.0.1/32 scram-sha-256", "host broker broker 127.0.0.1/32 reject")
    with pg.LocalPostgres(tls=(server.cert, server.key), hba=hba) as db:
        with psycopg.connect(db.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE broker LOGIN PASSWORD '{password}'")
            conn.execute("CREATE DATABASE broker OWNER broker")
        yield db, password


@contextmanager
def cluster_up(tmp: Path) -> Iterator[tuple[Cluster, dict, dict[str, subprocess.Popen], Path]]:
    """The stand-ins, the topics, then every workload; all stopped on exit."""
    import s3fs

    from streams.registry import EmbeddedRegistry
    from streams.secure_embedded import SecureEmbeddedKafka

    docs = manifests()
    users = tuple(d["metadata"]["name"] for d in docs if d["kind"] == "KafkaUser")
    logs = tmp / "logs"
    logs.mkdir()
    with ExitStack() as stack:
        kafka = stack.enter_context(SecureEmbeddedKafka(users=(*users, "admin"), directory=tmp / "kafka"))
        registry = stack.enter_context(EmbeddedRegistry())
        db, db_password = stack.enter_context(history_database(tmp))
        aws = stack.enter_context(s3_server())
        store = s3fs.S3FileSystem(endpoint_url=aws["AWS_ENDPOINT_URL"], key=aws["AWS_ACCESS_KEY_ID"],
                                  secret=aws["AWS_SECRET_ACCESS_KEY"])
        for bucket in ("broker-frames", "broker-archive"):  # the buckets k8s/config.yaml names
            store.mkdir(bucket)
        assert kafka.ca is not None
        secret_data = {u: {"password": kafka.password_file(u).read_text().strip()} for u in users}
        secret_data["alerts-cluster-ca-cert"] = {"ca.crt": kafka.ca.read_text()}
        secret_data["history-app"] = {"username": "broker", "password": db_password}
        services = {"alerts-kafka-bootstrap:9093": kafka.bootstrap, "history-rw:5432": f"127.0.0.1:{db.port}",
                    "schema-registry:8081": registry.url.removeprefix("http://")}
        config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        cluster = Cluster(tmp, services, secret_data, config_maps, aws)
        create_topics(docs, kafka.settings("admin").admin())
        specs = workloads(docs)
        procs = {f"{name}-{i}": cluster.run(name, spec, logs, i, CRASH if name == "subtract" else None)
                 for name, spec in specs.items() for i in range(REPLICAS.get(name, 1))}
        stack.callback(_stop_all, procs)  # the restarted ones too
        yield cluster, {"kafka": kafka, "registry": registry, "store": store, "db": db, "specs": specs}, procs, logs


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    for proc in procs.values():
        stop(proc)


def send_frames(kafka, folder: Path) -> None:
    """A telescope outside the cluster: ``broker simulate`` and ``broker produce`` as its KafkaUser, over TLS."""
    telescope = {**base_env(), **kafka.env("telescope")}
    subprocess.run(["broker", "simulate", str(folder), "--frames", str(FRAMES)], env=telescope, check=True,
                   capture_output=True, timeout=300)
    sent = subprocess.run(["broker", "produce", *map(str, sorted(folder.glob("*.fits.fz"))), "--bootstrap",
                           kafka.bootstrap], env=telescope, cwd=folder, capture_output=True, text=True, timeout=300)
    assert sent.returncode == 0 and sent.stdout.count("sent ") == FRAMES, sent.stdout[-2000:] + sent.stderr[-2000:]


def until_drained(cluster: Cluster, parts: dict, procs: dict[str, subprocess.Popen], logs: Path,
                  portal: str, timeout: float = 600) -> tuple[dict[str, int], list[str]]:
    """Restart each subtract pod that crashed, until every frame is in the ledger and every alert archived.

    Drained: all frames in the ledger, two subscriptions in turn read the same alerts, and the
    archive and the portal hold as many. Returns the counts (ledger frames, alerts read, archived,
    listed by the portal, duplicates the subscriber dropped) and the pods restarted.
    """
    from broker.archive.reader import Archive

    restarted: list[str] = []
    last = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod, proc in list(procs.items()):
            if pod.startswith("subtract-") and proc.poll() == -signal.SIGKILL and restarted.count(pod) < 2:
                procs[pod] = cluster.run("subtract", parts["specs"]["subtract"], logs, int(pod.rsplit("-", 1)[1]))
                restarted.append(pod)
        running(procs, logs, "draining")  # any other exit fails
        ledger = _ledger_frames(parts["db"])
        read = _subscribed(parts["kafka"]) if ledger == FRAMES else None
        if read and read == last:
            listing = listed(f"{portal}/api/v1/alerts?limit=500")
            counts = {"ledger": ledger, "alerts": read[0], "archived": Archive("s3://broker-archive/alerts").count(),
                      "listed": len(listing), "distinct": len({a["alert_id"] for a in listing}), "duplicates": read[1]}
            if counts["archived"] == counts["listed"] == read[0]:
                return counts, restarted
        last = read
        time.sleep(2)
    pytest.fail(f"not drained within {timeout} s (restarted {restarted})")


def _ledger_frames(db: pg.LocalPostgres) -> int:
    import psycopg

    with psycopg.connect(db.dsn("broker"), autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('frames')").fetchone()[0]
        return conn.execute("SELECT count(*) FROM frames").fetchone()[0] if exists else 0


def _subscribed(kafka) -> tuple[int, int] | None:
    """(alerts, duplicates dropped) of a new subscription to ``alerts`` read to its end; None before any."""
    res = subprocess.run(["broker", "subscribe", "--bootstrap", kafka.bootstrap, "--timeout", "5"],
                         env={**base_env(), **kafka.env("subscriber")}, capture_output=True, text=True, timeout=180)
    found = re.search(r"shown; (\d+) alerts.*?(?:, (\d+) duplicates dropped)?$", res.stderr.strip())
    return (int(found[1]), int(found[2] or 0)) if res.returncode == 0 and found and int(found[1]) else None


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.skipif(pg.unavailable() is not None, reason=str(pg.unavailable()))
def test_the_k8s_workloads_start_as_written_and_a_night_survives_a_pod_killed_mid_frame(tmp_path, monkeypatch):
    """The stages and the portal as the manifests start them; a telescope sends frames over TLS.

    A subtract pod dies inside a frame's transaction and is started again under its name. Every
    frame reaches the ledger in PostgreSQL (over TLS) once, every alert the archive in the object
    store once (read back by the portal), as a subscriber reads them with its own KafkaUser.
    """
    with cluster_up(tmp_path) as (cluster, parts, procs, logs):
        for key, value in cluster.env.items():  # this process reads the archive as the portal does
            monkeypatch.setenv(key, value)
        assert sorted(procs) == ["alert-0", "archive-0", "classify-0", "ingest-0", "portal-0", "score-0",
                                 "subtract-0", "subtract-1"]
        portal = f"http://127.0.0.1:{cluster.ports['portal-0']}"
        wait_for(lambda: answers(f"{portal}/api/v1/health"), 120, "the portal's readiness probe", procs, logs)
        for pod in set(procs) - {"portal-0"}:  # what the PodMonitor scrapes
            wait_for(lambda p=pod: answers(f"http://127.0.0.1:{cluster.ports[p]}/metrics"), 120, f"{pod}'s metrics",
                     procs, logs)
        send_frames(parts["kafka"], tmp_path / "telescope")
        counts, restarted = until_drained(cluster, parts, procs, logs, portal)
        subjects = httpx.get(f"{parts['registry'].url}/subjects", timeout=10).json()
        for proc in procs.values():
            stop(proc, signal.SIGTERM)
        exits = {name: proc.returncode for name, proc in procs.items()}
    assert restarted, "no subtract pod crashed at its failpoint"
    assert counts["duplicates"] == 0 and counts["distinct"] == counts["listed"] == counts["alerts"] > 0, counts
    assert "alerts-rubin-value" in subjects
    # each stage pod ran until its SIGTERM and stopped cleanly, none fenced by another; uvicorn re-raises
    # the SIGTERM once it has shut the portal down (Kubernetes reads 143, a normal stop)
    portal_exit = exits.pop("portal-0")
    assert set(exits.values()) == {0}, exits
    assert portal_exit in (0, -signal.SIGTERM) and "shutdown complete" in (logs / "portal-0.err").read_text()
