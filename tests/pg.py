"""A throwaway PostgreSQL server for tests: Debian's PostgreSQL 15 binaries, a temp dir, a free port."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

#: Where Debian's postgresql-15 package puts initdb, pg_ctl and postgres.
PG_BIN = Path(os.environ.get("BROKER_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def unavailable() -> str | None:
    """Why no test server can be started here (None: it can)."""
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        return f"PostgreSQL server binaries not found in {PG_BIN} (apt-get install postgresql-15)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'transient-broker[postgres]')"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as (initdb refuses root)"
    return None


class LocalPostgres:
    """PostgreSQL on 127.0.0.1 in a temp dir, trust authentication, no fsync (a test server only).

    As root (CI), the server runs as the ``postgres`` user, since initdb refuses root. Use as a
    context manager; :meth:`create_database` gives each test a database of its own.
    """

    def __init__(self, tls: tuple[Path, Path] | None = None, hba: tuple[str, ...] = ()) -> None:
        from streams.embedded import free_port

        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="broker-pg-"))
        self.tls = tls  # (certificate, key) PEM files: the server then takes TLS (sslmode=require)
        self.hba = hba  # pg_hba.conf lines put before the trust of every local connection
        self._owner: tuple[int, int] | None = None
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            self._owner = (user.pw_uid, user.pw_gid)
            os.chown(self.dir, *self._owner)
            self._as_user = ["runuser", "-u", "postgres", "--"]

    def dsn(self, database: str = "postgres") -> str:
        """The URL of ``database`` on this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *cmd: str) -> None:
        res = subprocess.run([*self._as_user, *cmd], capture_output=True, text=True, timeout=60)
        if res.returncode:
            raise RuntimeError(f"{cmd[0]} failed ({res.returncode}): {res.stdout}{res.stderr}")

    def start(self) -> LocalPostgres:
        """Create the cluster (initdb), start the server, wait until it accepts connections."""
        data = self.dir / "data"
        self._run(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        if self.hba:
            conf = data / "pg_hba.conf"
            conf.write_text("\n".join(self.hba) + "\n" + conf.read_text())
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        if self.tls:
            opts += f" -c ssl=on -c ssl_cert_file={self._own(self.tls[0])} -c ssl_key_file={self._own(self.tls[1])}"
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(self.dir / "log"), "-w", "start")
        return self

    def _own(self, path: Path) -> Path:
        """A copy of ``path`` in the server's folder, readable by the server's user alone (as PostgreSQL requires)."""
        copy = self.dir / path.name
        shutil.copyfile(path, copy)
        os.chmod(copy, 0o600)
        if self._owner:
            os.chown(copy, *self._owner)
        return copy

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; its DSN."""
        import psycopg

        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.dsn(name)

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if (self.dir / "data" / "postmaster.pid").exists():
            subprocess.run([*self._as_user, str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast",
                            "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> LocalPostgres:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
