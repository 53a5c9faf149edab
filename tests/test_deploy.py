"""The deployment files parse and agree with the code (they cannot be run here: no container engine)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from streams.metrics import StageMetrics  # noqa: E402
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


def test_k8s_has_a_deployment_and_scaler_per_stage():
    docs = [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for stage in STAGE_NAMES:
        assert ("Deployment", stage) in kinds and ("ScaledObject", stage) in kinds


def test_dashboard_queries_name_real_metrics():
    registry = StageMetrics("x").registry
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = {m.name + suffix for m in registry.collect() for suffix in suffixes[m.type]}
    dash = json.loads((ROOT / "deploy/grafana/dashboards/broker.json").read_text())
    used = {n for p in dash["panels"] for t in p["targets"] for n in re.findall(r"broker_[a-z_]+", t["expr"])}
    assert used and used <= names, used - names


def test_k8s_pipeline_config_loads_and_its_alert_topics_exist():
    import tomllib

    from broker.config import load_config

    docs = [d for f in sorted((ROOT / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "broker-config"]
    text = config_map["data"]["pipeline.toml"]
    cfg = load_config(**tomllib.loads(text))
    topics = {d["metadata"]["name"] for d in docs if d["kind"] == "KafkaTopic"}
    assert {t.name for t in cfg.alert_topics} <= topics
    if any(t.framing == "confluent" for t in cfg.alert_topics):  # the registry it names runs in the cluster
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        assert cfg.schema_registry_url and cfg.schema_registry_url.split("//")[1].split(":")[0] in services
