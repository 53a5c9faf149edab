"""The command line on bad input: clear messages and exit codes, no tracebacks."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from streams.cli import app

runner = CliRunner()


def test_produce_reports_each_bad_file_and_fails(tmp_path):
    (tmp_path / "empty.fits").write_bytes(b"")
    (tmp_path / "junk.fits").write_bytes(b"\x00" * 5000)
    res = runner.invoke(app, ["produce", str(tmp_path / "empty.fits"), str(tmp_path / "junk.fits"),
                              "--bootstrap", "127.0.0.1:1"])
    assert res.exit_code == 1
    assert "rejected" in res.output and "empty payload" in res.output and "(corrupt)" in res.output
    assert "Traceback" not in res.output


@pytest.mark.parametrize("args,message", [
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "rb >"], "invalid filter expression"),
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "open('x')"], "unknown name(s) ['open']"),
    (["subscribe", "--bootstrap", "127.0.0.1:1", "--filter", "rb.__class__"], "not allowed"),
    (["stage", "nonsense", "--bootstrap", "127.0.0.1:1"], "unknown stage"),
    (["train-realbogus", "--workers", "-1"], "greater than or equal to 0"),
])
def test_bad_arguments_are_explained(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == 2 and message in res.output, res.output


def test_bad_config_file_is_explained(tmp_path):
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text("[ingest]\nmax_nan_fractio = 0.3\n")
    res = runner.invoke(app, ["stage", "ingest", "--bootstrap", "127.0.0.1:1", "--config", str(cfg),
                              "--metrics-port", "-1"])
    assert res.exit_code == 2 and "unknown setting" in res.output and "max_nan_fractio" in res.output


def test_a_stage_stopped_by_repeated_bugs_exits_non_zero(monkeypatch):
    """``broker stage`` turns a StageFailure into exit code 3 (for the supervisor), not a traceback."""
    from broker.errors import StageFailure
    from streams.runner import StageRunner

    def fail(self, *args, **kwargs):
        raise StageFailure("alert: 5 unexpected errors in a row")

    monkeypatch.setattr(StageRunner, "run", fail)
    res = runner.invoke(app, ["stage", "alert", "--bootstrap", "127.0.0.1:1", "--metrics-port", "-1"])
    assert res.exit_code == 3 and "5 unexpected errors in a row" in res.output, res.output


def test_stage_help_names_every_stage():
    from streams.stages import STAGE_NAMES

    res = runner.invoke(app, ["stage", "--help"])
    assert " | ".join(STAGE_NAMES) in res.output
