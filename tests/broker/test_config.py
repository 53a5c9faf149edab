"""The pipeline configuration: alert topics as TOML arrays of tables and as command-line text."""

from __future__ import annotations

import pytest

from broker.config import AlertTopicConfig, PipelineConfig, load_config, parse_alert_topic
from broker.errors import ConfigError


def test_default_is_one_ocf_topic_alerts_with_per_filter_copies():
    assert load_config().alert_topics == (AlertTopicConfig("alerts", "ocf", "null", True),)
    assert load_config().schema_registry_url is None


def test_alert_topics_are_an_array_of_tables(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('schema_registry_url = "http://registry:8081"\n'
                    '[[alert_topics]]\nname = "alerts"\ncodec = "deflate"\n'
                    '[[alert_topics]]\nname = "alerts-rubin"\nframing = "confluent"\nper_filter = false\n')
    cfg = load_config(path)
    assert cfg.alert_topics == (AlertTopicConfig("alerts", "ocf", "deflate"),
                                AlertTopicConfig("alerts-rubin", "confluent", per_filter=False))
    assert cfg.schema_registry_url == "http://registry:8081"


@pytest.mark.parametrize("toml,match", [
    ('[alert_topics]\nname = "a"\n', "array of tables"),
    ('[[alert_topics]]\nname = "a"\nframing = "protobuf"\n', "unknown alert framing"),
    ('[[alert_topics]]\nname = "a"\nframing = "fink"\ncodec = "deflate"\n', "ocf framing only"),
    ('[[alert_topics]]\nname = "a b"\n', "invalid alert topic name"),
    ('[[alert_topics]]\nname = "a"\n[[alert_topics]]\nname = "a"\n', "distinct"),
    ('[[alert_topics]]\nname = "a"\nsubject = "x"\n', "unknown setting"),
    ("alert_topics = []\n", "distinct"),
])
def test_bad_alert_topics_are_config_errors(tmp_path, toml, match):
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_command_line_form():
    assert parse_alert_topic("alerts-rubin=confluent") == AlertTopicConfig("alerts-rubin", "confluent")
    assert parse_alert_topic("alerts=ocf:snappy") == AlertTopicConfig("alerts", "ocf", "snappy")
    with pytest.raises(ConfigError, match="NAME=FRAMING"):
        parse_alert_topic("confluent")
    cfg = load_config(alert_topics=(parse_alert_topic("x=fink"),))
    assert isinstance(cfg, PipelineConfig) and cfg.alert_topics[0].framing == "fink"


def test_dead_letters_keep_1_mib_of_a_long_value_unless_configured():
    assert load_config().dlq_value_bytes == 1024 * 1024
    assert load_config(dlq_value_bytes=4096).dlq_value_bytes == 4096
    for bad in (-1, 33 * 1024 * 1024):
        with pytest.raises(ConfigError, match="dlq_value_bytes"):
            load_config(dlq_value_bytes=bad)
