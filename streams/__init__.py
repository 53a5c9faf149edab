"""The Kafka runtime of the broker: stage table, runner, topics, serialisation, clients, CLI."""
