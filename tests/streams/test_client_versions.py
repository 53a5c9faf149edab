"""Astronomers' own clients read a topic whose alerts span every published schema version.

One topic per framing holds the sample alert of each version of ``schemas/alert/`` (v1 first, as
a topic written before and after upgrades would), each with its own writer schema: in the container
(``ocf``), by registry id (``confluent``), as JSON in the key (``fink``). hop-client, gcn-kafka with
fastavro, Rubin's ``AvroDeserializer`` (with the writer schema, and with an old and a new reader
schema), fink-client's own decoding and ``broker subscribe``'s :class:`Subscription` must each get
every alert.
"""

from __future__ import annotations

import copy
import io
import json
import time

import fastavro
import pytest

import schemas
from streams import topics
from streams.framing import AlertEncoder, FramingConfig, register, registry_client, schema_json

pytestmark = pytest.mark.kafka

VERSIONS = schemas.versions("alert")
#: librdkafka settings for a quick group join on tansu.
QUICK_JOIN = {"session.timeout.ms": 6000, "auto.offset.reset": "earliest"}


def _samples() -> list[tuple[int, dict]]:
    """(version, sample alert) of every version, each with an alertId of its own."""
    out = []
    for version in VERSIONS:
        with open(schemas.ROOT / "alert" / "samples" / f"v{version}.avro", "rb") as f:
            record = copy.deepcopy(next(iter(fastavro.reader(f))))
        assert isinstance(record, dict)
        record["alertId"] += version
        out.append((version, record))
    return out


def _messages(version: int, record: dict, registry: str) -> dict[str, tuple[bytes | None, bytes]]:
    """(key, value) of ``record`` written with ``version`` in each framing, by topic."""
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schemas.load("alert", version), record)
    container = io.BytesIO()
    fastavro.writer(container, schemas.load("alert", version), [record])
    schema_id = register(registry_client(registry), "versions-rubin", version)
    return {"versions-ocf": (None, container.getvalue()),
            "versions-rubin": (None, b"\x00" + schema_id.to_bytes(4, "big") + body.getvalue()),
            "versions-fink": (schema_json(version).encode(), body.getvalue())}


@pytest.fixture(scope="module")
def mixed():
    """The embedded broker and registry, and the three topics of every version's sample."""
    from confluent_kafka import Producer

    from streams.embedded import EmbeddedKafka
    from streams.registry import EmbeddedRegistry

    samples = _samples()
    with EmbeddedKafka() as kafka, EmbeddedRegistry() as registry:
        topics.create_topics(kafka.bootstrap, [topics.TopicSpec(t) for t in
                                               ("versions-ocf", "versions-rubin", "versions-fink")])
        producer = Producer({"bootstrap.servers": kafka.bootstrap})
        for version, record in samples:
            for topic, (key, value) in _messages(version, record, registry.url).items():
                headers = {"_format": b"avro"} if topic == "versions-ocf" else {}
                producer.produce(topic, value, key, headers={**headers, "schema": f"alert/{version}".encode()})
        assert producer.flush(15) == 0
        assert AlertEncoder(FramingConfig("confluent", registry_url=registry.url), "versions-rubin").schema_id \
            == register(registry_client(registry.url), "versions-rubin")  # the stage's id: the newest version's
        yield kafka.bootstrap, registry.url, [record for _, record in samples]


def _consume(consumer, topic: str, n: int) -> list:
    """The first ``n`` messages of ``topic`` (30 s at most), the consumer closed after."""
    consumer.subscribe([topic])
    out, deadline = [], time.monotonic() + 30
    try:
        while len(out) < n and time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is not None:
                assert msg.error() is None, msg.error()
                out.append(msg)
    finally:
        consumer.close()
    return out


def test_hop_client_reads_every_version(mixed):
    from hop import Stream
    from hop.io import StartPosition

    bootstrap, _, samples = mixed
    with Stream(auth=False, start_at=StartPosition.EARLIEST, until_eos=True).open(
            f"kafka://{bootstrap}/versions-ocf", "r") as messages:
        assert [m.content for m in messages] == samples


def test_gcn_kafka_with_fastavro_reads_every_version(mixed):
    from gcn_kafka import Consumer

    bootstrap, _, samples = mixed
    consumer = Consumer(config={"bootstrap.servers": bootstrap, "security.protocol": "PLAINTEXT", **QUICK_JOIN})
    messages = _consume(consumer, "versions-ocf", len(samples))
    assert [r for m in messages for r in fastavro.reader(io.BytesIO(m.value()))] == samples


@pytest.mark.parametrize("reader", [None, VERSIONS[0], VERSIONS[-1]])
def test_rubins_deserializer_reads_every_version_with_any_reader_schema(mixed, reader):
    from confluent_kafka import DeserializingConsumer
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer

    bootstrap, registry, samples = mixed
    client = SchemaRegistryClient({"url": registry})
    deserializer = AvroDeserializer(client, None if reader is None else schema_json(reader))
    consumer = DeserializingConsumer({"bootstrap.servers": bootstrap, "group.id": f"rubin-{reader}", **QUICK_JOIN,
                                      "value.deserializer": deserializer})
    alerts = [m.value() for m in _consume(consumer, "versions-rubin", len(samples))]
    if reader is None:
        assert alerts == samples
    else:  # resolved: every alert in the reader's fields, none lost
        fields = [f["name"] for f in json.loads(schema_json(reader))["fields"]]
        assert [a["alertId"] for a in alerts] == [s["alertId"] for s in samples]
        assert all(sorted(a) == sorted(fields) for a in alerts)  # fields the writer lacks come last


def test_fink_clients_decoding_reads_every_version(mixed):
    from confluent_kafka import Consumer
    from fink_client.consumer import AlertConsumer

    bootstrap, _, samples = mixed
    messages = _consume(Consumer({"bootstrap.servers": bootstrap, "group.id": "fink", **QUICK_JOIN}),
                        "versions-fink", len(samples))
    fink = AlertConsumer([], {"bootstrap.servers": bootstrap, "group.id": "fink-decoder"}, survey="ztf")
    try:  # what its poll() does with each message, without its slow group join
        assert [fink.process_message(m)[1] for m in messages] == samples
    finally:
        fink.close()


@pytest.mark.parametrize("topic", ["versions-ocf", "versions-rubin", "versions-fink"])
def test_broker_subscribe_reads_every_version_in_every_framing(mixed, topic):
    from streams.settings import KafkaSettings
    from streams.subscriber import Subscription

    bootstrap, registry, samples = mixed
    with Subscription(KafkaSettings(bootstrap, app_id="versions"), topic, registry=registry) as sub:
        assert [a for a, _ in sub.alerts(timeout=1.5)] == samples
        assert not sub.stats.skipped
