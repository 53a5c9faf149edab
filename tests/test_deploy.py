"""The deployment files parse and agree with the code (they cannot be run here: no container engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from broker.reference import ReferenceStore  # noqa: E402
from streams.metrics import GatewayMetrics, StageMetrics  # noqa: E402
from streams.stages import STAGE_NAMES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_compose_runs_every_stage_with_metrics():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for stage in STAGE_NAMES:
        assert services[stage]["command"][:2] == ["stage", stage]
    targets = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    scraped = targets["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in scraped) == sorted(STAGE_NAMES)
    jobs = {j["job_name"]: j["static_configs"][0]["targets"] for j in targets["scrape_configs"]}
    command = services["portal"]["command"]
    assert jobs["broker-portal"] == [f"portal:{command[command.index('--port') + 1]}"]  # BrokerPortalBusy reads it


def _k8s_docs() -> list[dict]:
    return [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def _named(kind: str, name: str) -> dict:
    (doc,) = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _container(stage: str) -> dict:
    (container,) = _named("StatefulSet", stage)["spec"]["template"]["spec"]["containers"]
    return container


def _k8s_config():
    import tomllib

    from broker.config import load_config

    return load_config(**tomllib.loads(_named("ConfigMap", "broker-config")["data"]["pipeline.toml"]))


def test_k8s_has_a_statefulset_and_scaler_per_stage():
    kinds = {(d["kind"], d["metadata"]["name"]) for d in _k8s_docs()}
    for stage in STAGE_NAMES:
        assert ("StatefulSet", stage) in kinds and ("ScaledObject", stage) in kinds
        target = _named("ScaledObject", stage)["spec"]["scaleTargetRef"]
        assert (target.get("kind"), target["name"]) == ("StatefulSet", stage)
        assert _named("StatefulSet", stage)["spec"]["serviceName"] in {n for k, n in kinds if k == "Service"}


def test_dashboard_queries_name_real_metrics(tmp_path):
    metrics = StageMetrics("x")
    metrics.watch_disk(tmp_path)
    metrics.watch_references(ReferenceStore(tmp_path / "refs"))
    registries = (metrics.registry, GatewayMetrics(("PLAIN",)).registry)  # the gateway's panels
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {m.name + suffix for r in registries for m in r.collect() for suffix in suffixes[m.type]}
    dash = json.loads((ROOT / "deploy/grafana/dashboards/broker.json").read_text())
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"broker_[a-z_]+", t["expr"])}
    assert used and used <= names, used - names


def test_k8s_pipeline_config_loads_and_its_alert_topics_exist():
    docs = _k8s_docs()
    cfg = _k8s_config()
    topics = {d["metadata"]["name"] for d in docs if d["kind"] == "KafkaTopic"}
    assert {t.name for t in cfg.alert_topics} <= topics
    if any(t.framing == "confluent" for t in cfg.alert_topics):  # the registry it names runs in the cluster
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        assert cfg.schema_registry_url and cfg.schema_registry_url.split("//")[1].split(":")[0] in services


def test_every_k8s_replica_gets_its_own_stable_transactional_id():
    """``BROKER_INSTANCE`` is the pod's name (``score-0``, ``score-1``, ...), which ``--instance`` reads."""
    import typer.main

    from streams.cli import app

    for stage in STAGE_NAMES:
        env = {e["name"]: e for e in _container(stage).get("env", [])}
        assert env["BROKER_INSTANCE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", stage
        assert "--instance" not in _container(stage)["args"]  # it would override the pod name
    (option,) = [p for p in typer.main.get_command(app).commands["stage"].params if p.name == "instance"]
    assert option.envvar == "BROKER_INSTANCE" and option.default == "0"  # a name, not only an index


def _extras_installed_by_the_image() -> set[str]:
    """Requirements of the extras the Dockerfile installs (``'.[a,b]'``), as written in pyproject.toml."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (names,) = re.findall(r"'\.\[([a-z0-9_,-]+)\]'", (ROOT / "Dockerfile").read_text())
    todo, reqs = list(names.split(",")), set()
    while todo:
        name = todo.pop()
        assert name in extras, f"the Dockerfile installs the extra {name!r}, which pyproject.toml lacks"
        for req in extras[name]:
            inner = re.fullmatch(r"transient-broker\[([a-z0-9_,-]+)\]", req)
            todo += inner.group(1).split(",") if inner else []
            reqs.add(re.split(r"[<>=\[; ]", req)[0].lower())
    return reqs


def test_the_image_installs_the_stores_that_the_k8s_config_names():
    cfg = _k8s_config()
    reqs = _extras_installed_by_the_image()
    urls = [cfg.frame_store, cfg.archive.path or ""]
    if any(u.startswith(("s3://", "s3a://")) for u in urls):
        assert "s3fs" in reqs
    if any(u.startswith(("gs://", "gcs://")) for u in urls):
        assert "gcsfs" in reqs
    if cfg.history.dsn:
        assert "psycopg" in reqs
    assert "torch" in reqs  # the one image runs classify too


def test_the_compose_portal_reads_the_stages_state_with_the_web_extra():
    from broker.config import PipelineConfig

    portal = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["portal"]
    cmd = portal["command"]
    assert cmd[0] == "serve" and "state:/app/var" in portal["volumes"]
    assert Path(cmd[cmd.index("--state-dir") + 1]) == Path("/app") / PipelineConfig().state_dir  # WORKDIR /app
    assert {"fastapi", "uvicorn"} <= _extras_installed_by_the_image()
    assert "astrometry.net" in (ROOT / "Dockerfile").read_text()  # ingest solves frames without a WCS


def test_k8s_state_lives_on_a_shared_volume_or_in_a_database():
    """The subtract stage's state_dir is a ReadWriteMany claim; the score stage scales only with PostgreSQL.

    Several subtract replicas need the frame ledger in PostgreSQL too: SQLite's locks do not hold
    over a network volume.
    """
    cfg = _k8s_config()
    claims = {d["metadata"]["name"]: d for d in _k8s_docs() if d["kind"] == "PersistentVolumeClaim"}
    pod = _named("StatefulSet", "subtract")["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts[str(cfg.state_dir)]]
    claim = claims[volume["persistentVolumeClaim"]["claimName"]]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # a field moves between replicas
    score_max = _named("ScaledObject", "score")["spec"]["maxReplicaCount"]
    subtract_max = _named("ScaledObject", "subtract")["spec"]["maxReplicaCount"]
    if not cfg.history.dsn:  # SQLite: one writer
        assert score_max == subtract_max == 1
        return
    assert score_max > 1
    (cluster,) = [d for d in _k8s_docs() if d["kind"] == "Cluster"]  # CloudNativePG
    name = cluster["metadata"]["name"]
    assert cfg.history.dsn.split("@")[1].split(":")[0] == f"{name}-rw"  # the operator's primary Service
    assert "password" not in cfg.history.dsn.split("@")[0].split("//")[1]  # no secret in the ConfigMap
    for stage in ("score", "subtract"):  # the history, and the frame ledger beside it
        env = {e["name"]: e for e in _container(stage).get("env", [])}
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": f"{name}-app", "key": "password"}


def test_k8s_portal_serves_the_stages_state_as_the_read_only_user():
    """k8s/portal.yaml: a valid ``broker serve`` over the stages' config, volume, history and Kafka."""
    import typer.main

    from streams.cli import app

    cfg = _k8s_config()
    pod = _named("Deployment", "portal")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    args = container["args"]
    serve = typer.main.get_command(app).commands[args[0]]
    params = serve.make_context("serve", list(args[1:])).params  # every option exists and parses
    assert Path(params["state_dir"]) == cfg.state_dir and params["archive"] is None  # the config's [archive]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert mounts[str(Path(params["config"]).parent)]["configMap"]["name"] == "broker-config"
    assert mounts[str(cfg.state_dir)]["persistentVolumeClaim"]["claimName"] == "broker-state"
    env = {e["name"]: e for e in container["env"]}
    user = env["BROKER_KAFKA_USERNAME"]["value"]
    acls = _named("KafkaUser", user)["spec"]["authorization"]["acls"]
    assert all(op in ("Read", "Describe") for a in acls for op in a["operations"])  # reads alerts, nothing else
    assert mounts[str(Path(cfg.kafka["password_file"]).parent)]["secret"]["secretName"] == user
    score_env = {e["name"]: e for e in _container("score")["env"]}
    assert env["PGPASSWORD"] == score_env["PGPASSWORD"]  # the history's password, as the score stage has it
    labels = _named("Deployment", "portal")["spec"]["template"]["metadata"]["labels"]
    assert _named("Service", "portal")["spec"]["selector"].items() <= labels.items()
    (rule,) = _named("Ingress", "portal")["spec"]["rules"]
    assert rule["http"]["paths"][0]["backend"]["service"]["name"] == "portal"
    assert _named("Ingress", "portal")["spec"]["tls"]  # tokens travel in a header: HTTPS only
    if env.get("FORWARDED_ALLOW_IPS", {}).get("value") == "*":  # X-Forwarded-For trusted: only proxies get in
        policy = _named("NetworkPolicy", "portal")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= labels.items() and policy["policyTypes"] == ["Ingress"]
        assert all(peer.keys() == {"namespaceSelector"} for rule in policy["ingress"] for peer in rule["from"])


def _compose_bands() -> tuple[str, ...]:
    command = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["topics"]["command"]
    return tuple(command[command.index("--filters") + 1].split(","))


def test_k8s_declares_every_pipeline_topic_with_its_configs():
    """Every topic a stage reads or writes, per-band and dead-letter topics included, with its limits."""
    from streams.stages import STAGES, pipeline_topics
    from streams.topics import MAX_MESSAGE_BYTES

    declared = {d["metadata"].get("name"): d["spec"] for d in _k8s_docs() if d["kind"] == "KafkaTopic"}
    specs = pipeline_topics(_compose_bands(), 1, _k8s_config())
    assert {"alerts.g", "dlq.ingest", "dlq.archive"} <= {s.name for s in specs}
    for spec in specs:
        assert spec.name in declared, f"{spec.name} is not declared in k8s/kafka.yaml"
        wanted = {"max.message.bytes": str(MAX_MESSAGE_BYTES), **dict(getattr(spec, "config", ()))}
        have = {k: str(v) for k, v in declared[spec.name].get("config", {}).items()}
        assert {k: have.get(k) for k in wanted} == wanted, spec.name
    for stage in STAGES:  # replicas beyond the input's partitions would sit idle
        scaler = _named("ScaledObject", stage.name)["spec"]
        assert scaler["maxReplicaCount"] <= declared[stage.input]["partitions"], stage.name
        if getattr(stage, "progress", None):  # one progress partition per input partition
            assert declared[stage.progress]["partitions"] == declared[stage.input]["partitions"], stage.name


def test_k8s_resources_live_in_a_namespace_created_first():
    files = sorted((ROOT / "k8s").glob("*.yaml"))
    first = [d for d in yaml.safe_load_all(files[0].read_text()) if d]
    assert [d["kind"] for d in first] == ["Namespace"]  # `kubectl apply -f k8s/` goes in file order
    namespace = first[0]["metadata"]["name"]
    for doc in _k8s_docs():
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, (doc["kind"], doc["metadata"]["name"])


# --- authentication and authorisation (docs/architecture.md, "Security") -------------------------
def _acls(user: str) -> set[tuple[str, str, str, str]]:
    """(resource type, name, pattern, operation) of a KafkaUser of k8s/users.yaml."""
    spec = _named("KafkaUser", user)["spec"]
    assert spec["authentication"]["type"] == "scram-sha-512" and spec["authorization"]["type"] == "simple"
    return {(a["resource"]["type"], a["resource"]["name"], a["resource"].get("patternType", "literal"), op)
            for a in spec["authorization"]["acls"] for op in a["operations"]}


def _writable(acls: set, topic: str) -> bool:
    return any(t == "topic" and op == "Write" and (name == topic if pat == "literal" else topic.startswith(name))
               for t, name, pat, op in acls)


def test_strimzi_listener_needs_scram_over_tls_and_every_client_uses_it():
    from streams.security import ENV

    kafka = _named("Kafka", "alerts")["spec"]["kafka"]
    assert [(x["tls"], x["authentication"]["type"]) for x in kafka["listeners"]] == [(True, "scram-sha-512")]
    assert kafka["authorization"]["type"] == "simple"
    assert "userOperator" in _named("Kafka", "alerts")["spec"]["entityOperator"]
    table = _k8s_config().kafka
    assert table["security_protocol"] == "SASL_SSL" and set(table) <= set(ENV)
    port = str(kafka["listeners"][0]["port"])
    for doc in _k8s_docs():
        text = json.dumps(doc)
        assert "alerts-kafka-bootstrap:9092" not in text, doc["metadata"]["name"]
        if doc["kind"] == "ScaledObject":
            (trigger,) = doc["spec"]["triggers"]
            assert trigger["authenticationRef"]["name"] == "keda-kafka" and trigger["metadata"]["tls"] == "enable"
            assert trigger["metadata"]["bootstrapServers"].endswith(port)


def test_strimzi_user_per_stage_with_only_its_topics():
    from streams.stages import STAGES

    cfg = _k8s_config()
    for stage in STAGES:
        acls = _acls(stage.name)
        assert ("topic", stage.input, "literal", "Read") in acls, stage.name
        for topic in (*stage.outputs(cfg), stage.dead_letters, *([stage.progress] if stage.progress else [])):
            assert _writable(acls, topic), (stage.name, topic)
        others = {t for s in STAGES if s is not stage for t in (*s.outputs(cfg), s.dead_letters)} - set(
            stage.outputs(cfg))
        assert not any(_writable(acls, t) for t in others), stage.name
        assert ("transactionalId", f"broker.{stage.name}.", "prefix", "Write") in acls
        container = _container(stage.name)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["BROKER_KAFKA_USERNAME"] == stage.name
        volumes = _named("StatefulSet", stage.name)["spec"]["template"]["spec"]["volumes"]
        assert {"name": "kafka-user", "secret": {"secretName": stage.name}} in volumes
    telescope, subscriber = _acls("telescope"), _acls("subscriber")
    assert {(t, n, op) for t, n, _, op in telescope} == {
        ("topic", "frames", "Write"), ("topic", "frames", "Describe"),  # frames out, follow-up requests in
        ("topic", "followup", "Read"), ("topic", "followup", "Describe"), ("group", "broker.followup", "Read"),
        ("topic", "dlq.followup", "Write"), ("topic", "dlq.followup", "Describe")}
    assert {op for *_, op in subscriber} <= {"Read", "Describe"} and ("topic", "alerts", "prefix", "Read") in subscriber


def test_compose_kafka_needs_scram_and_each_principal_has_its_acls():
    import subprocess

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    kafka = services["kafka"]["environment"]
    assert "CLIENT:SASL_PLAINTEXT" in kafka["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
    assert kafka["KAFKA_LISTENER_NAME_CLIENT_SASL_ENABLED_MECHANISMS"] == "SCRAM-SHA-512"
    assert kafka["KAFKA_ALLOW_EVERYONE_IF_NO_ACL_FOUND"] == "false"
    assert "Authorizer" in kafka["KAFKA_AUTHORIZER_CLASS_NAME"]
    script = ROOT / "deploy/kafka/users.sh"
    assert subprocess.run(["sh", "-n", str(script)]).returncode == 0
    lines = [line.split() for line in script.read_text().splitlines() if line and not line.startswith((" ", "#"))]
    staged = {words[1]: words[2:] for words in lines if words[0] == "stage"}
    from streams.stages import STAGES

    for stage in STAGES:
        env = services[stage.name]["environment"]
        assert env["BROKER_KAFKA_USERNAME"] == stage.name and services[stage.name]["secrets"] == [stage.name]
        assert env["BROKER_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT"
        inp, *outs = staged[stage.name]
        assert inp == stage.input and {o for o in outs if not o.endswith(".")} == set(stage.outputs(_k8s_config()))
    grants = {tuple(words[1:]) for words in lines if words[0] == "allow"}
    assert {g for g in grants if g[0] == "telescope"} == {
        ("telescope", "Write", "topic", "frames"), ("telescope", "Describe", "topic", "frames"),
        ("telescope", "Read", "topic", "followup"), ("telescope", "Describe", "topic", "followup"),
        ("telescope", "Read", "group", "broker.followup", "prefixed"), ("telescope", "Write", "topic", "dlq.followup"),
        ("telescope", "Describe", "topic", "dlq.followup")}
    assert {g[1] for g in grants if g[0] == "subscriber"} == {"Read", "Describe"}
    assert services["producer"]["environment"]["BROKER_KAFKA_USERNAME"] == "telescope"
    assert services["subscriber"]["environment"]["BROKER_KAFKA_USERNAME"] == "subscriber"
    assert set(compose["secrets"]) >= {*(s.name for s in STAGES), "telescope", "subscriber", "admin"}


def _group_of_the_portal_live_stream(monkeypatch) -> str:
    """The consumer group the portal's live stream joins (``streams.web.live``), as its code names it."""
    from types import SimpleNamespace

    from broker.config import load_config
    from streams import subscriber
    from streams.web import live

    class Joined(Exception):
        pass

    def consumer(conf: dict) -> None:
        raise Joined(conf["group.id"])

    config = SimpleNamespace(bootstrap="127.0.0.1:9", pipeline=load_config(), alerts_topic="alerts")
    portal = SimpleNamespace(config=config, extras={}, registry=None, archive=None)
    hub = live.live_hub(SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(portal=portal))))
    monkeypatch.setattr(subscriber, "Consumer", consumer)
    with pytest.raises(Joined) as joined:
        subscriber.Subscription(hub.settings, hub.topic).open()
    return str(joined.value)


def test_the_portal_live_stream_may_join_its_group_as_the_subscriber(monkeypatch):
    """Compose and k8s run the portal as ``subscriber``, whose ACLs must allow its live stream's group.

    The group is ``portal.subscriber-<hex>`` (app id ``portal``): Kafka refused it
    (GROUP_AUTHORIZATION_FAILED) and the live page stayed down.
    """
    group = _group_of_the_portal_live_stream(monkeypatch)
    assert group.startswith("portal.")
    k8s = [n for t, n, pat, op in _acls("subscriber") if t == "group" and op == "Read" and pat == "prefix"]
    assert any(group.startswith(prefix) for prefix in k8s), (group, k8s)
    script = (ROOT / "deploy/kafka/users.sh").read_text().splitlines()
    compose = [w[4] for w in (line.split() for line in script)
               if w[:4] == ["allow", "subscriber", "Read", "group"] and w[5:] == ["prefixed"]]
    assert any(group.startswith(prefix) for prefix in compose), (group, compose)
