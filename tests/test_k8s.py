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

import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from streams.embedded import free_port
from tests import pg
from tests.rehearsal import answers, base_env, listed, start, stop, wait_for

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

    def run(self, name: str, spec: dict, logs: Path, replica: int = 0) -> subprocess.Popen:
        """Start one replica of a workload: pod ``<name>-<replica>``, its port and logs under that name."""
        (container,) = spec["containers"]
        pod = f"{name}-{replica}"
        mounts = self.mounts(pod, spec, container)
        argv = [*container.get("command", ["broker"]), *container.get("args", [])]
        argv = [str(self.ports.setdefault(pod, free_port())) if a == "8000" else self.text(a, mounts) for a in argv]
        return start(pod, argv, self.env_of(pod, container, mounts), self.root, logs)


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
        procs = {f"{name}-{i}": cluster.run(name, spec, logs, i) for name, spec in workloads(docs).items()
                 for i in range(REPLICAS.get(name, 1))}
        for proc in procs.values():
            stack.callback(stop, proc)
        yield cluster, {"kafka": kafka, "registry": registry, "store": store, "db": db}, procs, logs


@pytest.mark.kafka
@pytest.mark.slow
@pytest.mark.skipif(pg.unavailable() is not None, reason=str(pg.unavailable()))
def test_the_k8s_workloads_start_as_written_and_a_night_reaches_the_archive_history_and_subscribers(tmp_path):
    """The stages and the portal as the manifests start them; a telescope sends frames over TLS.

    The alerts reach the archive in the object store (read back by the portal), the object history
    in PostgreSQL over TLS, the registry, and a subscriber reading with its own KafkaUser.
    """
    import psycopg

    with cluster_up(tmp_path) as (cluster, parts, procs, logs):
        assert sorted(procs) == ["alert-0", "archive-0", "classify-0", "ingest-0", "portal-0", "score-0",
                                 "subtract-0", "subtract-1"]
        portal = f"http://127.0.0.1:{cluster.ports['portal-0']}"
        wait_for(lambda: answers(f"{portal}/api/v1/health"), 120, "the portal's readiness probe", procs, logs)
        for stage in set(procs) - {"portal-0"}:  # what the PodMonitor scrapes
            wait_for(lambda s=stage: answers(f"http://127.0.0.1:{cluster.ports[s]}/metrics"), 120, f"{stage}'s metrics",
                     procs, logs)
        kafka = parts["kafka"]
        telescope = {**base_env(), **kafka.env("telescope")}
        sim = tmp_path / "telescope"
        subprocess.run(["broker", "simulate", str(sim), "--frames", str(FRAMES)], env=telescope, check=True,
                       capture_output=True, timeout=300)
        sent = subprocess.run(["broker", "produce", *map(str, sorted(sim.glob("*.fits.fz"))), "--bootstrap",
                               kafka.bootstrap], env=telescope, cwd=sim, capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0 and sent.stdout.count("sent ") == FRAMES, sent.stdout[-2000:] + sent.stderr[-2000:]
        alerts = wait_for(lambda: listed(f"{portal}/api/v1/alerts"), 600, "archived alerts on the portal", procs, logs)
        subscriber = subprocess.run(["broker", "subscribe", "--bootstrap", kafka.bootstrap, "--max-alerts", "3",
                                     "--timeout", "60"], env={**base_env(), **kafka.env("subscriber")},
                                    capture_output=True, text=True, timeout=180)
        archived = parts["store"].find("broker-archive/alerts")
        with psycopg.connect(parts["db"].dsn("broker"), autocommit=True) as conn:
            tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE tableowner = 'broker'")]
            rows = {t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}
        subjects = httpx.get(f"{parts['registry'].url}/subjects", timeout=10).json()
        for proc in procs.values():
            stop(proc, signal.SIGTERM)
        exits = {name: proc.returncode for name, proc in procs.items()}
    # each stage pod ran until its SIGTERM and stopped cleanly, none fenced by another; uvicorn re-raises
    # the SIGTERM once it has shut the portal down (Kubernetes reads 143, a normal stop)
    portal_exit = exits.pop("portal-0")
    assert set(exits.values()) == {0}, exits
    assert portal_exit in (0, -signal.SIGTERM) and "shutdown complete" in (logs / "portal-0.err").read_text()
    assert alerts and any(a.endswith(".parquet") for a in archived), archived
    assert subscriber.returncode == 0 and "3 shown" in subscriber.stderr, subscriber.stderr[-2000:]
    assert rows["frames"] == FRAMES and rows["objects"] > 0 and rows["detections"] >= rows["objects"], rows
    assert "alerts-rubin-value" in subjects
