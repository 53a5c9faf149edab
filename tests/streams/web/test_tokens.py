"""API tokens: hashed at rest, scopes, revocation, and the FastAPI dependency."""

from __future__ import annotations

import sqlite3

import pytest

from broker.errors import ConfigError, Forbidden, Unauthenticated
from streams.web.tokens import Principal, TokenStore, bound_names, check_publish


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


# --- telescope bindings --------------------------------------------------------------------------------------

#: The token table as the first version wrote it, before telescope bindings.
OLD_SCHEMA = ("CREATE TABLE tokens (token_id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, "
              "digest BLOB NOT NULL, scopes TEXT NOT NULL, created REAL NOT NULL, revoked REAL)")


def old_token_file(path, name: str, scopes: list[str]) -> tuple:
    """A token file of the old schema holding one token, written as the old ``TokenStore.add`` did; (path, token)."""
    import hashlib
    import secrets
    import time

    token_id, secret, salt = secrets.token_hex(4), secrets.token_urlsafe(32), secrets.token_bytes(16)
    db = sqlite3.connect(path)
    db.execute(OLD_SCHEMA)
    db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, NULL)", (
        token_id, name, salt, hashlib.sha256(salt + secret.encode()).digest(), ",".join(scopes), time.time()))
    db.commit()
    db.close()
    return path, f"{token_id}.{secret}"


def test_a_token_file_of_the_old_schema_opens_and_its_tokens_are_bound_to_none(tmp_path):
    path, clear = old_token_file(tmp_path / "old.sqlite", "legacy", ["upload"])
    store = TokenStore(path)
    assert store.verify(clear) == Principal("legacy", frozenset({"upload"}), frozenset())
    assert [t.telescopes for t in store.list()] == [()]
    bound = store.add("observatory", ["upload"], ["LSST"])  # the migrated file takes bound tokens
    assert store.verify(bound).telescopes == frozenset({"LSST"})
    store.close()
    again = TokenStore(path)  # opened twice: migrated once
    assert again.verify(clear).name == "legacy" and again.verify(bound).telescopes == frozenset({"LSST"})
    again.close()


def test_bindings_are_stored_and_verified(store):
    clear = store.add("observatory", ["upload", "read"], [" LSST ", "ESO/VLT", "LSST"])
    assert store.verify(clear).telescopes == frozenset({"LSST", "ESO/VLT"})
    assert {t.name: t.telescopes for t in store.list()} == {"observatory": ("ESO/VLT", "LSST")}


@pytest.mark.parametrize("telescope", ["", "   ", "LSST\x00", "LS\tST", "LSST\n", "\x1b[2JLSST", "Ω-cam", "x" * 69])
def test_empty_control_character_and_overlong_telescopes_are_refused(store, telescope):
    with pytest.raises(ConfigError, match="telescope"):
        store.add("observatory", ["upload"], [telescope])
    assert store.list() == []


def test_a_binding_needs_scope_upload(store):
    with pytest.raises(ConfigError, match="scope 'upload'"):
        store.add("reader", ["read"], ["LSST"])


def test_a_binding_covers_its_name_and_what_ingest_makes_of_it():
    from broker.telescopes import TelescopeProfile

    profiles = (TelescopeProfile("seestar-s50", match=("Seestar S50",)),)
    assert bound_names(["ESO/VLT"]) == {"ESO/VLT", "ESO_VLT"}
    assert bound_names(["seestar s50"], profiles) == {"seestar s50", "seestar-s50"}
    assert bound_names(["LSST"], profiles) == {"LSST"}
    with pytest.raises(Forbidden, match="'LSST'.*bound to \\['lsst'\\]"):
        check_publish(Principal("o", frozenset({"upload"}), frozenset({"lsst"})), "LSST")
    with pytest.raises(Forbidden, match="bound to no telescope"):
        check_publish(Principal("o", frozenset({"upload"})), "LSST")
    check_publish(Principal("o", frozenset({"upload"}), frozenset({"Seestar S50"})), "seestar-s50", profiles)


def test_the_token_commands_bind_telescopes_and_list_them(tmp_path):
    from typer.testing import CliRunner

    from streams.cli import app

    runner, where = CliRunner(), ["--state-dir", str(tmp_path)]
    added = runner.invoke(app, ["token", "add", "vlt", "--scope", "upload", "--telescope", "ESO/VLT",
                                "--telescope", "LSST", *where])
    assert added.exit_code == 0, added.output
    assert "'ESO/VLT'" in added.output and "'LSST'" in added.output
    clear = added.output.strip().splitlines()[-1]
    assert TokenStore(tmp_path / "tokens.sqlite").verify(clear).telescopes == frozenset({"ESO/VLT", "LSST"})
    unbound = runner.invoke(app, ["token", "add", "amateur", "--scope", "upload", *where])
    assert unbound.exit_code == 0 and "predict only" in unbound.output
    listed = " ".join(runner.invoke(app, ["token", "list", *where]).output.split())  # 80 columns: cells wrap
    assert "telescopes" in listed and "ESO/VLT," in listed and "LSST" in listed and "predict" in listed


@pytest.mark.parametrize(("telescope", "says"), [
    ("", "not an empty one"), ("  ", "not an empty one"), ("LSST\x00", "control characters"),
    ("LSST\n", "control characters"), ("\tLSST", "control characters")])
def test_token_add_refuses_empty_and_control_character_telescopes(tmp_path, telescope, says):
    from typer.testing import CliRunner

    from streams.cli import app

    result = CliRunner().invoke(app, ["token", "add", "obs", "--scope", "upload", "--telescope", telescope,
                                      "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "error:" in result.output and says in " ".join(result.output.split())
    assert "\x00" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "tokens.sqlite").exists()  # refused before the file is made


def test_token_add_refuses_a_binding_without_scope_upload(tmp_path):
    from typer.testing import CliRunner

    from streams.cli import app

    result = CliRunner().invoke(app, ["token", "add", "r", "--scope", "read", "--telescope", "LSST",
                                      "--state-dir", str(tmp_path)])
    assert result.exit_code == 2 and "scope 'upload'" in result.output
