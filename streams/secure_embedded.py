"""The embedded broker with authentication and TLS: tansu behind :mod:`streams.gateway`.

``broker embedded --auth`` and the tests marked ``kafka`` that exercise security use it. It makes a
throw-away CA and a server certificate for ``127.0.0.1``/``localhost``, one SCRAM-SHA-512 user per
principal with a random password (written to ``<dir>/<user>.password``, mode 0600), starts tansu on a
private plaintext port advertising the gateway's, and the gateway on a free public port. Clients
connect as to Apache Kafka's ``SASL_SSL`` listener: :meth:`SecureEmbeddedKafka.env` gives the
``BROKER_KAFKA_*`` variables of a principal. With a ``metrics_port`` the gateway serves its
Prometheus metrics (:class:`streams.metrics.GatewayMetrics`) there.
"""

from __future__ import annotations

import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from broker.errors import BrokerError
from streams.certs import LocalCA
from streams.embedded import EmbeddedKafka, free_port
from streams.gateway import write_users
from streams.security import KafkaSecurity, write_secret
from streams.settings import KafkaSettings
from streams.stages import STAGE_NAMES

#: Principals created by default: an administrator (topics), one per stage, a telescope, a subscriber.
DEFAULT_USERS = ("admin", *STAGE_NAMES, "telescope", "subscriber")


class SecureEmbeddedKafka:
    """tansu behind a TLS + SCRAM-SHA-512 gateway, with users; a context manager.

    Parameters
    ----------
    users : tuple of str
        Principals to create, each with a random password.
    tls : bool
        Serve TLS (``SASL_SSL``; default) or not (``SASL_PLAINTEXT``).
    client_certs : bool
        Also require a client certificate signed by the local CA (mutual TLS); :meth:`env` then
        names one issued for the principal.
    directory : Path or None
        Where certificates, users and passwords go (default: a temporary directory, removed on stop).
    port : int or None
        Public (gateway) port; default a free one.
    metrics_port : int
        Port of the gateway's ``/metrics`` (0: a free one, then in :attr:`metrics_url`). Default -1: none.
    metrics_addr : str
        Address the gateway's ``/metrics`` listens on (default 127.0.0.1).
    """

    def __init__(self, users: tuple[str, ...] = DEFAULT_USERS, tls: bool = True, client_certs: bool = False,
                 directory: Path | None = None, port: int | None = None, metrics_port: int = -1,
                 metrics_addr: str = "127.0.0.1") -> None:
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="broker-auth-"))
        self.users, self.tls, self.client_certs = users, tls, client_certs
        self.port = port or free_port()
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.kafka = EmbeddedKafka(advertised_port=self.port)
        self._gateway: subprocess.Popen | None = None
        self.ca: Path | None = None
        self.metrics_port, self.metrics_addr = metrics_port, metrics_addr
        self.metrics_url: str | None = None  # the gateway's /metrics, once started with a metrics_port

    def start(self) -> SecureEmbeddedKafka:
        """Write the CA, certificates and users, start tansu and the gateway, wait until both answer."""
        self.directory.mkdir(parents=True, exist_ok=True)
        passwords = {u: secrets.token_urlsafe(18) for u in self.users}
        for user, password in passwords.items():
            write_secret(self.password_file(user), (password + "\n").encode())
        write_users(self.directory / "users.json", passwords)
        cmd = [sys.executable, "-m", "streams.gateway", "--listen", self.bootstrap,
               "--upstream", self.kafka.bootstrap, "--users", str(self.directory / "users.json"),
               "--metrics-port", str(self.metrics_port), "--metrics-addr", self.metrics_addr]
        if self.tls:
            ca = LocalCA(self.directory)
            self.ca = ca.cert
            server = ca.issue("localhost", ("localhost", "127.0.0.1"))
            cmd += ["--cert", str(server.cert), "--key", str(server.key)]
            if self.client_certs:
                cmd += ["--client-ca", str(ca.cert)]
                for user in self.users:
                    ca.issue(f"client-{user}", client=True)
        self.kafka.start()
        log = open(self.directory / "gateway.log", "a")  # noqa: SIM115 - the gateway writes to it until stop
        self._gateway = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         text=True, cwd=Path(__file__).resolve().parents[1])
        log.close()
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        assert self._gateway is not None and self._gateway.stdout is not None
        deadline = time.monotonic() + timeout
        line = self._gateway.stdout.readline()  # "ready on ...[; metrics on URL]" once listening, "" if it died
        if not line.startswith("ready"):
            self._gateway.wait(5)
            said = [x for x in (self.directory / "gateway.log").read_text(errors="replace").splitlines() if x.strip()]
            why = said[-1].removeprefix("error: ") if said and said[-1].startswith("error: ") else None
            self.stop()
            raise BrokerError(f"the gateway did not start: {why}" if why else
                              f"the gateway did not start; log: {self.directory / 'gateway.log'}")
        if metrics := re.search(r"metrics on (\S+)", line):
            self.metrics_url = metrics.group(1)
        settings = self.settings("admin")
        while time.monotonic() < deadline:
            try:
                from confluent_kafka.admin import AdminClient

                AdminClient(settings.admin()).list_topics(timeout=2.0)
                return
            except Exception:  # not answering yet
                time.sleep(0.1)
        self.stop()
        raise BrokerError(f"the gateway on {self.bootstrap} did not answer within {timeout} s")

    def describe(self) -> str:
        """What a user needs to connect: the users, their password files and the variables to set."""
        lines = [f"authentication: SCRAM-SHA-512 over {'TLS' if self.tls else 'plaintext'}; "
                 f"users {', '.join(self.users)}; passwords in {self.directory}/<user>.password",
                 "connect as a user (here: subscriber) with:"]
        lines += [f"  export {k}={v}" for k, v in self.env("subscriber" if "subscriber" in self.users
                                                         else self.users[0]).items()]
        if self.metrics_url:
            lines.append(f"gateway metrics: {self.metrics_url}")
        return "\n".join(lines)

    def password_file(self, user: str) -> Path:
        """The file holding ``user``'s password."""
        return self.directory / f"{user}.password"

    def env(self, user: str, password_file: bool = True) -> dict[str, str]:
        """``BROKER_KAFKA_*`` variables that make a process connect as ``user``."""
        env = {"BROKER_KAFKA_SECURITY_PROTOCOL": "SASL_SSL" if self.tls else "SASL_PLAINTEXT",
               "BROKER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "BROKER_KAFKA_USERNAME": user}
        if password_file:
            env["BROKER_KAFKA_PASSWORD_FILE"] = str(self.password_file(user))
        else:
            env["BROKER_KAFKA_PASSWORD"] = self.password_file(user).read_text().strip()
        if self.ca is not None:
            env["BROKER_KAFKA_CA"] = str(self.ca)
        if self.client_certs:
            env["BROKER_KAFKA_CERT"] = str(self.directory / f"client-{user}.pem")
            env["BROKER_KAFKA_KEY"] = str(self.directory / f"client-{user}.key")
        return env

    def settings(self, user: str, app_id: str = "broker") -> KafkaSettings:
        """Client settings of ``user``."""
        return KafkaSettings(self.bootstrap, app_id=app_id, security=KafkaSecurity.load({}, self.env(user)))

    def stop(self) -> None:
        """Stop the gateway and tansu; remove the temporary directory (if it made it)."""
        if self._gateway is not None:
            self._gateway.terminate()
            try:
                self._gateway.wait(5)
            except subprocess.TimeoutExpired:
                self._gateway.kill()
                self._gateway.wait()
            if self._gateway.stdout:
                self._gateway.stdout.close()
            self._gateway = None
        self.kafka.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SecureEmbeddedKafka:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
