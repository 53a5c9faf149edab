"""The object history in PostgreSQL (``[history] dsn``), so that the score stage can run several replicas.

The tables are those of SQLite (:func:`broker.history.schema`, with ``DOUBLE PRECISION``) and the
association is the same code (:class:`broker.history.ObjectHistory`); this module only connects,
creates the tables, and runs a frame's transaction.

Concurrency (``docs/architecture.md``, "State"): two replicas that associate candidates at the same
position at the same time must not both start an object there. Each frame's transaction runs at
READ COMMITTED and first takes ``pg_advisory_xact_lock`` on every sky cell its candidates' search
circles touch (:func:`broker.history.sky_cells`), in ascending key order (so two transactions
never wait on each other in a cycle); the locks are released at commit or rollback. Each statement
after the locks sees every transaction committed before it (READ COMMITTED takes a snapshot per
statement; REPEATABLE READ would keep the one taken before the lock and miss them). A unique
constraint on a cell key was the other choice, but it can only say "one object per cell": two
objects 2 arcsec apart are legitimate, and two detections 1 arcsec apart across a cell boundary
would still start two objects. The locks cost one round trip per frame.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from broker.errors import ConfigError, HistoryUnavailable
from broker.history import ADDED, schema

log = logging.getLogger(__name__)

#: The advisory lock under which the tables are created (replicas starting together).
_SCHEMA_LOCK = 0x0B5E << 40 | 0xFFFFFFFF


def redacted(dsn: str) -> str:
    """``dsn`` without its password (for messages and logs)."""
    try:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        parts = conninfo_to_dict(dsn)
    except Exception:  # unparseable, or no psycopg: say nothing of it
        return "<unparseable connection string>"
    return make_conninfo("", **{k: ("***" if k == "password" else v) for k, v in parts.items()})


class PostgresStore:
    """The history's tables in the PostgreSQL database at ``dsn`` (psycopg 3).

    Parameters
    ----------
    dsn : str
        libpq connection string or URL; the password best comes from ``PGPASSWORD``/``PGPASSFILE``.
    connect_timeout_s : float
        How long (s) to keep trying to connect, at start and after a lost connection.
    statements, added : optional
        The tables (the history's by default, :func:`broker.history.schema` and
        :data:`broker.history.ADDED`; the frame ledger passes its own, :func:`broker.ledger.schema`).

    Raises
    ------
    ConfigError
        psycopg is not installed, or the database cannot be reached within ``connect_timeout_s``.
    """

    def __init__(self, dsn: str, connect_timeout_s: float = 60.0, statements: Sequence[str] | None = None,
                 added: Sequence[tuple[str, str, str]] = ADDED) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError(f"[history] dsn needs psycopg ({exc}): pip install 'transient-broker[postgres]'") from exc
        self._psycopg = psycopg
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        try:
            self.db = self._connect()
        except HistoryUnavailable as exc:
            raise ConfigError(str(exc)) from exc
        self._create_tables(schema("DOUBLE PRECISION") if statements is None else statements, added)

    def _connect(self) -> Any:
        """A new autocommit connection (transactions are explicit), retried for ``connect_timeout_s``."""
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            try:
                return self._psycopg.connect(self.dsn, autocommit=True, connect_timeout=10)
            except self._psycopg.OperationalError as exc:
                if time.monotonic() >= deadline:
                    raise HistoryUnavailable(f"cannot connect to the history database {redacted(self.dsn)}: "
                                             f"{str(exc).strip()}") from exc
                time.sleep(1.0)

    def _create_tables(self, statements: Sequence[str], added: Sequence[tuple[str, str, str]]) -> None:
        """Create the tables and the columns ``added``, under a lock (replicas start together)."""
        self.db.execute("BEGIN")
        try:
            self.db.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
            for statement in statements:
                self.db.execute(statement)
            for table, name, kind in added:
                kind = "DOUBLE PRECISION" if kind == "REAL" else kind
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {kind}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (``?`` placeholders); the cursor."""
        return self.db.execute(sql.replace("?", "%s"), tuple(params))

    def transaction(self, cells: list[int], work: Callable[[], None]) -> None:
        """Run ``work`` at READ COMMITTED holding the advisory locks of ``cells`` (ascending).

        A lost connection (the server restarted, a fail-over) is reopened and the whole transaction
        run again, which the history's idempotence per candidate id makes safe.

        Raises
        ------
        HistoryUnavailable
            The database stayed unreachable for ``connect_timeout_s``.
        """
        for attempt in (1, 2):
            try:
                self._run(cells, work)
                return
            except self._psycopg.OperationalError as exc:
                if attempt == 2:
                    raise HistoryUnavailable(f"the history database {redacted(self.dsn)} failed twice: "
                                             f"{str(exc).strip()}") from exc
                log.warning("history database: %s; reconnecting", str(exc).strip())
                self.db.close()
                self.db = self._connect()

    def _run(self, cells: list[int], work: Callable[[], None]) -> None:
        self.db.execute("BEGIN ISOLATION LEVEL READ COMMITTED")
        try:
            # unnest yields the (sorted) array in order, so the locks are taken in ascending order
            self.db.execute("SELECT pg_advisory_xact_lock(k) FROM unnest(%s::bigint[]) AS k", (cells,))
            work()
            self.db.execute("COMMIT")
        except BaseException:
            if not self.db.closed:
                try:
                    self.db.execute("ROLLBACK")
                except self._psycopg.OperationalError:
                    self.db.close()
            raise

    def close(self) -> None:
        """Close the connection."""
        self.db.close()
