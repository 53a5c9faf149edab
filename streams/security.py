"""How every Kafka client of a process authenticates and encrypts: SASL (SCRAM) and TLS.

Read once at start-up from the ``[kafka]`` table of the pipeline config and the environment (the
environment wins), and applied by :class:`streams.settings.KafkaSettings` to every client:
stages, producer, subscriber, admin (topic creation, monitor, lineage, replay, archiver).

=================================  ========================  ===================================================
environment variable               ``[kafka]`` key           meaning
=================================  ========================  ===================================================
``BROKER_KAFKA_SECURITY_PROTOCOL``  ``security_protocol``     ``PLAINTEXT`` (default), ``SSL``, ``SASL_PLAINTEXT``,
                                                             ``SASL_SSL``
``BROKER_KAFKA_SASL_MECHANISM``     ``sasl_mechanism``        ``SCRAM-SHA-512`` (default), ``SCRAM-SHA-256``, ``PLAIN``
``BROKER_KAFKA_USERNAME``           ``username``              the SASL principal
``BROKER_KAFKA_PASSWORD``           (never in the file)       its password
``BROKER_KAFKA_PASSWORD_FILE``      ``password_file``         a file holding the password (trailing newline dropped)
``BROKER_KAFKA_CA``                 ``ca``                    PEM file of the CA(s) the broker's certificate is checked
                                                             against (default: the system's)
``BROKER_KAFKA_CERT``               ``cert``                  PEM client certificate (mutual TLS)
``BROKER_KAFKA_KEY``                ``key``                   PEM private key of ``cert`` (unencrypted)
``BROKER_KAFKA_CHECK_HOSTNAME``     ``check_hostname``        verify the broker's host name against its certificate
                                                             (default true)
=================================  ========================  ===================================================

The password is kept out of ``repr`` and never logged; the config file may not hold it (a config
file usually sits in a ConfigMap or a repository).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError, KafkaAuthError

#: Security protocols librdkafka knows.
PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
#: SASL mechanisms accepted (SCRAM for brokers that store credentials, PLAIN for those behind TLS).
MECHANISMS = ("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN")
#: Environment variables, by ``[kafka]`` key.
ENV = {"security_protocol": "BROKER_KAFKA_SECURITY_PROTOCOL", "sasl_mechanism": "BROKER_KAFKA_SASL_MECHANISM",
       "username": "BROKER_KAFKA_USERNAME", "password": "BROKER_KAFKA_PASSWORD",
       "password_file": "BROKER_KAFKA_PASSWORD_FILE", "ca": "BROKER_KAFKA_CA", "cert": "BROKER_KAFKA_CERT",
       "key": "BROKER_KAFKA_KEY", "check_hostname": "BROKER_KAFKA_CHECK_HOSTNAME"}
#: Keys of the ``[kafka]`` table that are not client security settings (read elsewhere).
OTHER_KEYS = frozenset({"frame_auth"})
REDACTED = "***"


@dataclass(frozen=True)
class KafkaSecurity:
    """Client authentication and encryption, shared by every client of a process.

    Attributes
    ----------
    security_protocol : str
        One of :data:`PROTOCOLS`. Default ``PLAINTEXT`` (no TLS, no SASL), as the embedded broker
        of the demo and the tests.
    sasl_mechanism : str
        One of :data:`MECHANISMS`, for ``SASL_*`` protocols. Default ``SCRAM-SHA-512`` (what
        Strimzi's ``scram-sha-512`` listeners and ``broker embedded --auth`` speak).
    username : str or None
        SASL principal; required by ``SASL_*``.
    password : str or None
        Its password, from ``BROKER_KAFKA_PASSWORD`` or a password file; never shown by ``repr``.
    ca : str or None
        PEM file of the CA(s) to trust for the broker's certificate; None: the system's store.
    cert, key : str or None
        PEM client certificate and its unencrypted key, for brokers that require mutual TLS.
    check_hostname : bool
        Whether the broker's certificate must name the host connected to (default True;
        librdkafka's ``ssl.endpoint.identification.algorithm=https``).
    """

    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str = "SCRAM-SHA-512"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    check_hostname: bool = True

    def __post_init__(self) -> None:
        if self.security_protocol not in PROTOCOLS:
            raise ConfigError(f"unknown Kafka security_protocol {self.security_protocol!r}; one of {list(PROTOCOLS)}")
        if self.sasl and self.sasl_mechanism not in MECHANISMS:
            raise ConfigError(f"unknown SASL mechanism {self.sasl_mechanism!r}; one of {list(MECHANISMS)}")
        if self.sasl and (not self.username or self.password is None):
            raise ConfigError(f"{self.security_protocol} needs a username and a password (BROKER_KAFKA_USERNAME and "
                              "BROKER_KAFKA_PASSWORD or BROKER_KAFKA_PASSWORD_FILE)")
        if (self.cert is None) != (self.key is None):
            raise ConfigError("a client certificate needs its key and a key its certificate (cert and key)")
        if self.cert and not self.tls:
            raise ConfigError(f"a client certificate needs TLS (SSL or SASL_SSL), not {self.security_protocol}")
        for name in ("ca", "cert", "key"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"Kafka {name} file {path} does not exist")

    @property
    def sasl(self) -> bool:
        """Whether the clients authenticate with SASL."""
        return self.security_protocol.startswith("SASL_")

    @property
    def tls(self) -> bool:
        """Whether the connections are TLS."""
        return self.security_protocol in ("SSL", "SASL_SSL")

    def __repr__(self) -> str:
        """Every setting, the password as ``***``."""
        shown = "None" if self.password is None else REDACTED
        return (f"KafkaSecurity(security_protocol={self.security_protocol!r}, sasl_mechanism={self.sasl_mechanism!r}, "
                f"username={self.username!r}, password={shown}, ca={self.ca!r}, cert={self.cert!r}, "
                f"key={self.key!r}, check_hostname={self.check_hostname!r})")

    def client_conf(self) -> dict[str, object]:
        """The librdkafka settings of every client (empty for ``PLAINTEXT``)."""
        if self.security_protocol == "PLAINTEXT":
            return {}
        conf: dict[str, object] = {"security.protocol": self.security_protocol}
        if self.sasl:
            conf.update({"sasl.mechanism": self.sasl_mechanism, "sasl.username": self.username,
                         "sasl.password": self.password})
        if self.tls:
            conf["ssl.endpoint.identification.algorithm"] = "https" if self.check_hostname else "none"
            for name, key in (("ca", "ssl.ca.location"), ("cert", "ssl.certificate.location"),
                              ("key", "ssl.key.location")):
                if getattr(self, name):
                    conf[key] = getattr(self, name)
        return conf

    def describe(self) -> str:
        """One line for logs and errors: protocol, mechanism and user, never the password."""
        if not self.sasl:
            return self.security_protocol
        return f"{self.security_protocol} {self.sasl_mechanism} as {self.username!r}"

    @classmethod
    def load(cls, table: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None) -> KafkaSecurity:
        """The settings of the ``[kafka]`` table, overridden by the environment (``os.environ`` by default).

        Raises
        ------
        ConfigError
            An unknown key, a password in the file, an unreadable password file, or an
            inconsistent combination (SASL without a user, a certificate without its key, ...).
        """
        env = os.environ if env is None else env
        values = {k: v for k, v in dict(table or {}).items() if k not in OTHER_KEYS}
        if "password" in values:
            raise ConfigError("[kafka] may not hold the password: use password_file, or BROKER_KAFKA_PASSWORD")
        unknown = set(values) - set(ENV)
        if unknown:
            raise ConfigError(f"unknown setting(s) in [kafka]: {sorted(unknown)}")
        for key, var in ENV.items():
            if env.get(var):
                values[key] = env[var]
        if isinstance(values.get("check_hostname"), str):
            values["check_hostname"] = _flag(str(values["check_hostname"]), "BROKER_KAFKA_CHECK_HOSTNAME")
        password_file = values.pop("password_file", None)
        if password_file and values.get("password") is None:
            values["password"] = read_secret(str(password_file), "Kafka password")
        return cls(**values)  # type: ignore[arg-type]


def read_secret(path: str, what: str) -> str:
    """The text of a secret file, one trailing newline dropped (as written by ``echo`` or Kubernetes)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    return text[:-1] if text.endswith("\n") else text


def _flag(text: str, what: str) -> bool:
    """A boolean setting written as text: true/yes/on/1 or false/no/off/0 (any case); ConfigError otherwise.

    Any other word read as true once: a misspelt ``flase`` left host names checked, and the reverse
    misspelling of a ``true`` would have turned the check off.
    """
    word = text.strip().lower()
    if word in ("1", "true", "yes", "on"):
        return True
    if word in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{what} must be true or false, not {text[:40]!r}")


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable and writable by its owner only (0600), an existing file included.

    ``Path.touch(mode=0o600)`` then a write left an existing file of a looser mode (0644) as loose
    as it was, with the new secret in it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(data)


def auth_error_callback(security: KafkaSecurity, bootstrap: str) -> Callable[[object], None]:
    """A librdkafka ``error_cb`` that turns authentication and TLS failures into :class:`KafkaAuthError`.

    librdkafka retries a refused login for ever; raised from the callback, the error surfaces
    from the client's next ``poll``/``flush``/``consume`` instead, naming the user and the
    broker (never the password), so a wrong password stops a process instead of hanging it.
    """
    from confluent_kafka import KafkaError

    fatal = {KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError.SASL_AUTHENTICATION_FAILED}

    def on_error(err: object) -> None:
        if isinstance(err, KafkaError) and err.code() in fatal:
            raise KafkaAuthError(f"Kafka at {bootstrap} refused the connection ({security.describe()}): "
                                 f"{redact(err.str(), security)}")

    return on_error


def redact(text: str, security: KafkaSecurity) -> str:
    """``text`` with the password (if any) replaced by ``***``."""
    return text.replace(security.password, REDACTED) if security.password else text
