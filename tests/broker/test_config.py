"""The pipeline configuration: alert topics as TOML arrays of tables and as command-line text."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

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


@pytest.mark.parametrize("toml,match", [
    ('inline_limit_bytes = "8MB"\n', r"\[pipeline\] inline_limit_bytes must be an integer, not '8MB'"),
    ("inline_limit_bytes = 1.5\n", "inline_limit_bytes must be an integer"),
    ('retain_freed_memory = "no"\n', "retain_freed_memory must be true or false"),
    ("state_dir = 5\n", "state_dir must be a path"),
    ('transaction_deadline_s = "60"\n', "transaction_deadline_s must be a number"),
    ('[ingest]\nsubtract_skip_on = "few_stars"\n', r"\[pipeline.ingest\] subtract_skip_on must be an array of strings"),
    ("[ingest]\nfwhm_range = [1.0, 2.0, 3.0]\n", "fwhm_range must be an array of 2 numbers"),
    ('[ingest.plausibility]\ngain_max = "1000"\n', r"\[pipeline.ingest.plausibility\] gain_max must be a number"),
    ("[history]\ndsn = 5\n", "dsn must be a string"),
    ('[archive]\nlongitudes = {LSST = "west"}\n', "longitudes.LSST must be a number"),
    ("[followup]\nrules = 5\n", "array of tables"),
    ("max_consecutive_unexpected = -1\n", "max_consecutive_unexpected must be 0"),
    ("torch_threads = 0\n", r"\[pipeline\] torch_threads must be 1 to 1024"),
    ("torch_threads = 4611686018427387904\n", "torch_threads must be 1 to 1024"),
    ("rb_views = 3\n", r"\[pipeline\] rb_views must be 1, 2, 4 or 8, not 3"),
    ("inline_limit_bytes = 0\n", "inline_limit_bytes must be above 0"),
    ("max_frame_bytes = 1024\n", "at most max_frame_bytes"),
    ("[reference.stars]\nmax_stars = 0\n", r"\[pipeline.reference.stars\] max_stars must be 1 or more"),
    ("[subtract.stars]\nmax_stars = 0\n", r"\[pipeline.subtract.stars\] max_stars must be 1 or more"),
    ("[differences]\ncache_frames = 0\nmin_psf_fraction = 2\n", r"^\[differences\] min_psf_fraction"),
])
def test_a_setting_of_the_wrong_type_or_out_of_range_is_a_config_error(tmp_path, toml, match):
    """Refused at start-up, not used as they are.

    ``"few_stars"`` became the skip reasons 'f', 'e', 'w', ..., ``"no"`` was true, ``-1`` unexpected
    errors stopped the stage after its first message, ``state_dir = 5`` was a TypeError.
    """
    path = tmp_path / "pipeline.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_settings_of_the_right_types_load_as_their_fields_hold_them(tmp_path):
    path = tmp_path / "pipeline.toml"
    path.write_text('state_dir = "s"\ntransaction_deadline_s = 60\n[ingest]\nsubtract_skip_on = []\n'
                    'fwhm_range = [1, 9.5]\n[archive]\nlongitudes = {LSST = -70}\n[history]\ndsn = "postgresql://h/db"\n')
    cfg = load_config(path)
    assert cfg.state_dir == Path("s") and cfg.transaction_deadline_s == 60.0
    assert isinstance(cfg.transaction_deadline_s, float)
    assert cfg.ingest.subtract_skip_on == () and cfg.ingest.fwhm_range == (1.0, 9.5)
    assert cfg.archive.longitudes == {"LSST": -70.0} and cfg.history.dsn == "postgresql://h/db"


def _number_settings(cls: type, where: tuple[str, ...] = ()):
    """(table path, name, type) of every int or float setting under ``cls``, nested tables included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        kinds = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]  # X | None -> X
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            yield from _number_settings(hint, (*where, f.name))
        elif len(kinds) == 1 and kinds[0] in (int, float):
            yield where, f.name, kinds[0]


def _toml(where: tuple[str, ...], name: str, value: str) -> str:
    return (f"[{'.'.join(where)}]\n" if where else "") + f"{name} = {value}\n"


def test_every_number_setting_at_its_extremes_is_a_config_or_a_config_error(tmp_path):
    """Nothing but a ConfigError at start-up, whatever number a setting holds; NaN and negatives are refused.

    NaN compares false with every bound, so ``max_nan_fraction = nan`` disabled its check; 141 of
    the 156 number settings took -1 (``[subtract] threshold_sigma = -1``: 14 candidates became 29).
    """
    settings = list(_number_settings(PipelineConfig))
    assert len(settings) > 100  # the walk reaches the nested tables
    path = tmp_path / "pipeline.toml"
    for where, name, kind in settings:
        values = ("-1", "0", "4611686018427387904") if kind is int else ("-1", "0", "inf", "-inf", "1e308", "nan")
        for value in values:
            path.write_text(_toml(where, name, value))
            try:
                load_config(path)
            except ConfigError as exc:
                assert str(exc), (where, name, value)
            else:
                assert value not in ("nan", "-1", "-inf"), f"{'.'.join((*where, name))} = {value} was accepted"


def test_a_config_that_is_not_utf8_text_is_a_config_error(tmp_path):
    """A binary or Latin-1 file given as --config was a UnicodeDecodeError traceback."""
    path = tmp_path / "pipeline.toml"
    path.write_bytes(b'state_dir = "/data/\xe9toiles"\n')
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(path)
