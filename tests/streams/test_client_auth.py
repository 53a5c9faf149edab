"""Astronomers' own clients log in to a broker that requires SCRAM-SHA-512, as README.md says they do.

README.md's "With a login" block is run as it is written (only the password file, the CA and the
address replaced), and each client reads an alert with what it defines: hop-client, gcn-kafka and
Rubin's ``DeserializingConsumer`` over TLS (``SASL_SSL``), fink-client over ``SASL_PLAINTEXT`` from
``broker embedded --auth --no-tls`` (its ``AlertConsumer`` drops every librdkafka key of its config
and never uses TLS: given them, as the README once said, it read nothing, without an error).
"""

from __future__ import annotations

import io
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fastavro
import pytest

import schemas
from streams import topics
from streams.framing import AlertEncoder, FramingConfig

pytestmark = pytest.mark.kafka

README = Path(__file__).resolve().parents[2] / "README.md"
#: librdkafka settings the test adds to the README's login for a quick group join on tansu.
QUICK_JOIN = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}


def _sample() -> dict:
    with open(schemas.ROOT / "alert" / "samples" / f"v{schemas.CURRENT['alert']}.avro", "rb") as f:
        return next(iter(fastavro.reader(f)))  # type: ignore[return-value]


def login_block(directory: Path, bootstrap: str) -> dict:
    """The names README.md's ``client-auth`` block defines, for the user files in ``directory``."""
    (code,) = re.findall(r"<!-- client-auth -->\s*```python\n(.*?)```", README.read_text(), re.S)
    code = (code.replace('Path("subscriber.password")', f"Path({str(directory / 'subscriber.password')!r})")
            .replace('"ca.pem"', repr(str(directory / "ca.pem"))).replace("localhost:9092", bootstrap))
    namespace: dict = {}
    exec(compile(code, "README.md (client-auth)", "exec"), namespace)  # the README's own block
    return namespace


def _publish(settings, registry_url: str | None, framings: dict[str, str]) -> dict:
    """One sample alert on each topic of ``framings`` (topic -> framing), created first."""
    from confluent_kafka import Producer

    topics.create_topics(settings, [topics.TopicSpec(t) for t in framings])
    producer, alert = Producer(settings.producer()), _sample()
    for topic, framing in framings.items():
        out = AlertEncoder(FramingConfig(framing, registry_url=registry_url), topic).encode(alert, b"OBJ")
        producer.produce(topic, out.value, key=out.key, headers=out.headers)
    assert producer.flush(15) == 0
    return alert


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory):
    """The embedded broker behind its TLS gateway, a registry, and an alert on an ocf and a confluent topic."""
    from streams.registry import EmbeddedRegistry
    from streams.secure_embedded import SecureEmbeddedKafka

    directory = tmp_path_factory.mktemp("auth")
    with SecureEmbeddedKafka(users=("admin", "subscriber"), directory=directory) as kafka, \
            EmbeddedRegistry() as registry:
        alert = _publish(kafka.settings("admin"), registry.url, {"alerts": "ocf", "alerts-rubin": "confluent"})
        yield kafka, registry.url, login_block(directory, kafka.bootstrap), alert


def _poll_one(consumer, read) -> list:
    """What ``read`` makes of the first message ``consumer`` gets within 30 s."""
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None:
                assert msg.error() is None, msg.error()
                return read(msg)
        return []
    finally:
        consumer.close()


def test_hop_client_reads_with_the_readmes_auth(tls_broker):
    from hop import Stream
    from hop.io import StartPosition

    kafka, _, names, alert = tls_broker
    stream = Stream(auth=names["hop_auth"], start_at=StartPosition.EARLIEST, until_eos=True)
    with stream.open(f"kafka://{kafka.bootstrap}/alerts", "r") as messages:
        assert [m.content for m in messages] == [alert]


def test_gcn_kafka_reads_with_the_readmes_login(tls_broker):
    from gcn_kafka import Consumer

    kafka, _, names, alert = tls_broker
    consumer = Consumer(config={"bootstrap.servers": kafka.bootstrap, **names["login"], **QUICK_JOIN})
    consumer.subscribe(["alerts"])
    assert _poll_one(consumer, lambda m: list(fastavro.reader(io.BytesIO(m.value())))) == [alert]


def test_rubins_deserializing_consumer_reads_with_the_readmes_login(tls_broker):
    from confluent_kafka import DeserializingConsumer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    kafka, registry, names, alert = tls_broker
    consumer = DeserializingConsumer({"bootstrap.servers": kafka.bootstrap, "group.id": "rubin", **names["login"],
                                      **QUICK_JOIN,
                                      "value.deserializer": AvroDeserializer(SchemaRegistryClient({"url": registry}))})
    consumer.subscribe(["alerts-rubin"])
    assert _poll_one(consumer, lambda m: [m.value()]) == [alert]


def _embedded_without_tls(directory: Path) -> tuple[subprocess.Popen, str]:
    """``broker embedded --auth --no-tls`` and its bootstrap, once its settings are printed."""
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "embedded", "--auth", "--no-tls", "--no-registry",
                             "--no-create", "--auth-dir", str(directory)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    while not any("BROKER_KAFKA_PASSWORD_FILE" in line for line in lines):
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            pytest.fail(f"broker embedded --auth --no-tls exited: {lines}")
        lines.append(line)
    assert any("BROKER_KAFKA_SECURITY_PROTOCOL=SASL_PLAINTEXT" in line for line in lines), lines
    assert not any("BROKER_KAFKA_CA" in line for line in lines), lines
    return proc, next(x.split(": ", 1)[1].strip() for x in lines if x.startswith("bootstrap:"))


@pytest.mark.slow  # fink-client's own session timeout (45 s): its group join takes ~25 s on tansu
def test_fink_client_reads_with_the_readmes_config_over_sasl_plaintext(tmp_path):
    from fink_client.consumer import AlertConsumer, _get_kafka_config

    from streams.security import KafkaSecurity
    from streams.settings import KafkaSettings

    proc, bootstrap = _embedded_without_tls(tmp_path)
    try:
        admin = KafkaSettings(bootstrap, security=KafkaSecurity.load({}, {
            "BROKER_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "BROKER_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "BROKER_KAFKA_USERNAME": "admin", "BROKER_KAFKA_PASSWORD_FILE": str(tmp_path / "admin.password")}))
        alert = _publish(admin, None, {"alerts-fink": "fink"})
        names = login_block(tmp_path, bootstrap)
        # what the README says of fink-client: librdkafka's keys are dropped, the login is SASL_PLAINTEXT
        kept = _get_kafka_config({**names["fink_config"], **names["login"]})
        assert kept["security.protocol"] == "sasl_plaintext" and "ssl.ca.location" not in kept
        consumer = AlertConsumer(["alerts-fink"], names["fink_config"], survey="ztf")
        try:
            deadline, got = time.monotonic() + 60, None
            while got is None and time.monotonic() < deadline:  # fink-client's group join: half of 45 s on tansu
                _, got, _ = consumer.poll(timeout=1.0)
        finally:
            consumer.close()
        assert got == alert
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(20)
        assert proc.stdout is not None
        proc.stdout.close()
