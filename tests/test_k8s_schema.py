"""Every document of k8s/ against the schema its API server checks it with, offline.

Kubernetes' own kinds (Namespace, ConfigMap, Secret, Deployment, StatefulSet, Service, Ingress,
NetworkPolicy, PersistentVolumeClaim) are validated by kubernetes-validate against the OpenAPI schemas
of the Kubernetes versions in ``KUBERNETES_VERSIONS``, strictly: an unknown field is an error, as
``kubectl apply``'s server-side field validation makes it. The operators' custom resources (Strimzi,
CloudNativePG, KEDA, the Prometheus Operator) are validated by node against their CRD schemas, as the
npm packages of tests/crd_schemas/package.json carry them (``npm ci --prefix tests/crd_schemas``, which
.ci/run does): types, enums, patterns and required fields by the packages' validators, unknown fields
by TypeScript's check of each resource against the kind's declared type (tests/crd_schemas/validate.mjs).
Skipped, saying why, where node or the packages are absent.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[1]
CRD_SCHEMAS = ROOT / "tests" / "crd_schemas"
# The oldest Kubernetes minor release still supported upstream when this was written, and the newest
# kubernetes-validate (pyproject's test extra) has schemas for: k8s/ must apply on both.
KUBERNETES_VERSIONS = ("1.35", "1.37")
# The Kafka versions the Strimzi release named in k8s/00-namespace.yaml (1.2, which serves only
# kafka.strimzi.io/v1) runs, from its release notes: 1.1 dropped Kafka 4.1, 1.2 added 4.3.1.
STRIMZI_KAFKA_VERSIONS = {"4.2.0", "4.2.1", "4.3.0", "4.3.1"}


def _k8s_docs() -> list[tuple[str, dict]]:
    """Every document of k8s/*.yaml, each with where it is (file and position, e.g. 'stages.yaml#3')."""
    return [
        (f"{path.name}#{i}", doc)
        for path in sorted((ROOT / "k8s").glob("*.yaml"))
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc
    ]


def _is_core(doc: dict) -> bool:
    """Whether the document's kind is Kubernetes' own (group '' or apps, or a *.k8s.io group), not a CRD's."""
    group = doc["apiVersion"].rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _core_errors(doc: dict, version: str) -> str | None:
    """What the API server of Kubernetes ``version`` would reject in ``doc`` (None: nothing)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return e.message
    return None


def _crd_checker() -> Path:
    """The node script validating custom resources, or a skip saying what is missing."""
    if shutil.which("node") is None:
        pytest.skip("node is not installed: the CRD schemas are npm packages (Debian package nodejs)")
    if not (CRD_SCHEMAS / "node_modules" / "@kubernetes-models").is_dir():
        pytest.skip("the CRD schema packages are not installed: npm ci --prefix tests/crd_schemas")
    return CRD_SCHEMAS / "validate.mjs"


def _crd_errors(docs: list[dict]) -> list[str | None]:
    """What each custom resource's CRD schema rejects in it (None: nothing; else '; '-joined), in order."""
    script = _crd_checker()
    done = subprocess.run(
        ["node", str(script)], input=json.dumps(docs), capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    assert len(results) == len(docs)
    return ["; ".join(found) or None for found in results]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_kinds_match_the_api_schemas(version):
    docs = [(where, d) for where, d in _k8s_docs() if _is_core(d)]
    assert len(docs) >= 15  # Namespace, ConfigMap, Secret, Deployments, StatefulSets, Services, Ingress, ...
    errors = {f"{where} {d['kind']}/{d['metadata']['name']}": _core_errors(d, version) for where, d in docs}
    assert {k: e for k, e in errors.items() if e} == {}


def test_custom_resources_match_their_operators_crds():
    docs = [(where, d) for where, d in _k8s_docs() if not _is_core(d)]
    kinds = {d["kind"] for _, d in docs}
    assert {"Kafka", "KafkaNodePool", "KafkaTopic", "KafkaUser", "Cluster", "ScaledObject",
            "TriggerAuthentication", "PodMonitor", "PrometheusRule"} <= kinds
    errors = _crd_errors([d for _, d in docs])
    found = {f"{where} {d['kind']}/{d['metadata']['name']}": e for (where, d), e in zip(docs, errors, strict=True)}
    assert {k: e for k, e in found.items() if e} == {}


def test_strimzi_runs_the_kafka_that_compose_runs():
    strimzi = [d for _, d in _k8s_docs() if d["apiVersion"].startswith("kafka.strimzi.io/")]
    assert {d["apiVersion"] for d in strimzi} == {"kafka.strimzi.io/v1"}
    (kafka,) = [d for d in strimzi if d["kind"] == "Kafka"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    images = [s.get("image", "") for s in compose["services"].values()]
    images = {i.partition(":")[2] for i in images if i.startswith("apache/kafka:")}
    assert images == {kafka["spec"]["kafka"]["version"]}
    assert kafka["spec"]["kafka"]["version"] in STRIMZI_KAFKA_VERSIONS


def _named(kind: str, name: str) -> dict:
    (doc,) = [d for _, d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    return copy.deepcopy(doc)


def test_a_kubernetes_kind_with_a_misspelt_or_mistyped_field_is_rejected():
    version = KUBERNETES_VERSIONS[0]
    limit = _named("StatefulSet", "subtract")
    container = limit["spec"]["template"]["spec"]["containers"][0]
    container["resources"]["limit"] = container["resources"].pop("limits", {"memory": "1Gi"})
    assert "'limit' was unexpected" in (_core_errors(limit, version) or "")
    port = _named("Service", "portal")
    port["spec"]["ports"][0]["port"] = str(port["spec"]["ports"][0]["port"])
    assert "is not of type 'integer'" in (_core_errors(port, version) or "")
    ingress = _named("Ingress", "portal")
    ingress["spec"]["tls"][0]["secret"] = ingress["spec"]["tls"][0].pop("secretName")
    assert "'secret' was unexpected" in (_core_errors(ingress, version) or "")
    policy = _named("NetworkPolicy", "portal")
    policy["spec"]["podSelectors"] = policy["spec"].pop("podSelector")
    assert "podSelectors" in (_core_errors(policy, version) or "")
    assert _core_errors(_named("StatefulSet", "subtract"), version) is None  # the unmutated copy passes


def test_a_custom_resource_with_a_mistyped_or_missing_field_is_rejected():
    topic = _named("KafkaTopic", "frames")
    topic["spec"]["partitions"] = "12"
    user = _named("KafkaUser", "ingest")
    user["spec"]["authentication"]["type"] = "scram-sha-256"  # Strimzi's users log in with SCRAM-SHA-512 only
    pool = _named("KafkaNodePool", "pool")
    del pool["spec"]["roles"]
    scaler = _named("ScaledObject", "subtract")
    scaler["spec"]["maxReplicaCount"] = "4"
    postgres = _named("Cluster", "history")
    postgres["spec"]["instances"] = "two"
    rule = _named("PrometheusRule", "broker-stages")
    del rule["spec"]["groups"][0]["rules"][0]["expr"]
    monitor = _named("PodMonitor", "portal")
    monitor["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    errors = _crd_errors([topic, user, pool, scaler, postgres, rule, monitor, _named("KafkaTopic", "frames")])
    assert "spec/partitions must be integer" in errors[0]
    assert "spec/authentication/type must be equal to one of the allowed values" in errors[1]
    assert "data/spec must have required property roles" in errors[2]
    assert "spec/maxReplicaCount must be integer" in errors[3]
    assert "spec/instances must be integer" in errors[4]
    assert "data/spec/groups/0/rules/0 must have required property expr" in errors[5]
    assert "spec/podMetricsEndpoints/0/interval must match pattern" in errors[6]
    assert errors[7] is None  # the unmutated copy passes


def test_a_custom_resource_with_an_unknown_field_is_rejected():
    topic = _named("KafkaTopic", "frames")
    topic["spec"]["partitons"] = topic["spec"].pop("partitions")
    kafka = _named("Kafka", "alerts")
    kafka["spec"]["kafka"]["listeners"][0]["authentification"] = kafka["spec"]["kafka"]["listeners"][0].pop(
        "authentication"
    )
    scaler = _named("ScaledObject", "subtract")
    scaler["spec"]["maxReplicas"] = scaler["spec"].pop("maxReplicaCount")
    postgres = _named("Cluster", "history")
    postgres["spec"]["storage"]["sise"] = postgres["spec"]["storage"].pop("size")
    monitor = _named("PodMonitor", "broker-stages")
    monitor["spec"]["podMetricEndpoints"] = monitor["spec"].pop("podMetricsEndpoints")
    # a topic's config and a broker's config take any key (x-kubernetes-preserve-unknown-fields)
    configured = _named("KafkaTopic", "frames")
    configured["spec"]["config"]["message.timestamp.type"] = "LogAppendTime"
    kafka_config = _named("Kafka", "alerts")
    kafka_config["spec"]["kafka"]["config"]["num.io.threads"] = 16
    errors = _crd_errors([topic, kafka, scaler, postgres, monitor, configured, kafka_config])
    for misspelt, found in zip(["partitons", "authentification", "maxReplicas", "sise", "podMetricEndpoints"],
                               errors, strict=False):
        assert f"unknown field: \'\"{misspelt}\"\' does not exist in type" in (found or "")
    assert errors[5:] == [None, None]


def test_the_strimzi_v1_schema_refuses_what_only_v1beta2_took():
    # Strimzi's v1 API dropped KafkaUser's single `operation` (for the `operations` list, now required) and
    # the Kafka's `zookeeper` section; v1beta2 took both, so a resource written for it is refused here
    user = _named("KafkaUser", "ingest")
    acl = user["spec"]["authorization"]["acls"][0]
    acl["operation"] = acl.pop("operations")[0]
    kafka = _named("Kafka", "alerts")
    kafka["spec"]["zookeeper"] = {"replicas": 3, "storage": {"type": "ephemeral"}}
    old_user, old_kafka = copy.deepcopy(user), copy.deepcopy(kafka)
    old_user["apiVersion"] = old_kafka["apiVersion"] = "kafka.strimzi.io/v1beta2"
    errors = _crd_errors([user, kafka, old_user, old_kafka])
    assert "acls/0 must have required property operations" in (errors[0] or "")
    assert "unknown field: '\"operation\"' does not exist in type" in (errors[0] or "")
    assert "unknown field: '\"zookeeper\"' does not exist in type" in (errors[1] or "")
    assert errors[2:] == [None, None]  # the same mistakes under v1beta2: what the v1 schema is checked against
