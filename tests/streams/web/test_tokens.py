"""API tokens: hashed at rest, scopes, revocation, and the FastAPI dependency."""

from __future__ import annotations

import sqlite3

import pytest

from broker.errors import ConfigError, Unauthenticated
from streams.web.tokens import TokenStore


@pytest.fixture
def store(tmp_path):
    s = TokenStore(tmp_path / "tokens.sqlite")
    yield s
    s.close()


def test_a_token_verifies_with_its_name_and_scopes(store):
    clear = store.add("alice", ["upload", "read", "read"])
    principal = store.verify(clear)
    assert principal.name == "alice" and principal.scopes == frozenset({"read", "upload"})


def test_the_file_holds_no_clear_secret(store, tmp_path):
    clear = store.add("alice", ["read"])
    secret = clear.split(".", 1)[1]
    raw = (tmp_path / "tokens.sqlite").read_bytes()
    assert secret.encode() not in raw
    rows = sqlite3.connect(tmp_path / "tokens.sqlite").execute("SELECT salt, digest FROM tokens").fetchall()
    assert len(rows[0][0]) == 16 and len(rows[0][1]) == 32


@pytest.mark.parametrize("mangle", [lambda t: t + "x", lambda t: t[:-1], lambda t: t.split(".")[0],
                                    lambda t: "ffffffff." + t.split(".")[1], lambda t: "", lambda t: "."])
def test_a_wrong_or_malformed_token_is_refused(store, mangle):
    clear = store.add("alice", ["read"])
    with pytest.raises(Unauthenticated):
        store.verify(mangle(clear))


def test_revoked_tokens_stop_working_and_stay_listed(store):
    a, b = store.add("alice", ["read"]), store.add("bob", ["vet"])
    assert store.revoke("alice") == 1 and store.revoke("alice") == 0
    with pytest.raises(Unauthenticated, match="revoked"):
        store.verify(a)
    assert store.verify(b).name == "bob"
    listed = {t.name: t for t in store.list()}
    assert listed["alice"].revoked is not None and listed["bob"].revoked is None
    assert store.revoke(b.split(".")[0]) == 1


def test_revoking_a_token_by_its_id_spares_a_token_named_like_that_id(store):
    a = store.add("alice", ["read"])
    twin = store.add(a.split(".")[0], ["read"])  # a name that is alice's id
    assert store.revoke(a.split(".")[0]) == 1
    assert store.verify(twin).name == a.split(".")[0]


@pytest.mark.parametrize(("name", "scopes"), [("alice", []), ("alice", ["admin"]), ("  ", ["read"])])
def test_unknown_scopes_and_empty_names_are_refused(store, name, scopes):
    with pytest.raises(ConfigError):
        store.add(name, scopes)


def test_reads_are_public_by_default_and_need_a_token_when_private(client, portal_config):
    from dataclasses import replace

    from fastapi.testclient import TestClient

    from streams.web.app import create_app

    assert client.get("/api/v1/alerts").status_code == 200
    with TestClient(create_app(replace(portal_config, public_read=False))) as private:
        response = private.get("/api/v1/alerts")
        assert response.status_code == 401 and response.json()["error"] == "unauthenticated"
        assert private.get("/api/v1/alerts", headers={"Authorization": "Basic abc"}).status_code == 401
        vetter = private.app.state.portal.tokens.add("vetter", ["vet"])
        assert private.get("/api/v1/alerts", headers={"Authorization": f"Bearer {vetter}"}).status_code == 403
        reader = private.app.state.portal.tokens.add("reader", ["read"])
        assert private.get("/api/v1/alerts", headers={"Authorization": f"Bearer {reader}"}).status_code == 200


def test_the_token_commands_add_list_and_revoke(tmp_path):
    from typer.testing import CliRunner

    from streams.cli import app

    runner = CliRunner()
    where = ["--state-dir", str(tmp_path)]
    added = runner.invoke(app, ["token", "add", "pipeline-bot", "--scope", "upload", "--scope", "read", *where])
    assert added.exit_code == 0, added.output
    clear = added.output.strip().splitlines()[-1]
    assert TokenStore(tmp_path / "tokens.sqlite").verify(clear).name == "pipeline-bot"
    listed = runner.invoke(app, ["token", "list", *where])
    assert "pipeline-bot" in listed.output and clear.split(".")[1] not in listed.output
    assert runner.invoke(app, ["token", "revoke", "pipeline-bot", *where]).exit_code == 0
    assert runner.invoke(app, ["token", "revoke", "pipeline-bot", *where]).exit_code == 2
    assert runner.invoke(app, ["token", "add", "x", "--scope", "admin", *where]).exit_code == 2
