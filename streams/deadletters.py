"""Dead letters as an operator reads them: every refused message with its reason, and sending frames again.

Each stage writes what it cannot process to ``dlq.<stage>`` (``dlq/v2``,
:func:`streams.runner.dead_letter`): the original key, headers and value (the first
``dlq_value_bytes`` of a longer one), the error class, the reason and the message. :func:`dead_letters`
reads them back, from the start of each topic to its end, without joining a group;
:func:`resend` publishes the original record of a dead-lettered frame to ``frames`` again, once its
cause is fixed (a telescope profile added, the plate solver's back-off over).
Only frames are sent again: a later stage's input is an earlier stage's output, which its frame
remakes. ``broker dead-letters`` is the command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.errors import DecodeError, NotResendable
from streams import serde, topics
from streams.monitor import scan
from streams.stages import STAGE_NAMES

if TYPE_CHECKING:
    from confluent_kafka import Producer

    from streams.settings import KafkaSettings

#: The stages that write dead letters: the pipeline's, and a telescope's follow-up listener.
DEAD_LETTER_STAGES = (*STAGE_NAMES, "followup")


@dataclass(frozen=True)
class DeadLetter:
    """One record of a ``dlq.<stage>`` topic.

    Attributes
    ----------
    topic, partition, offset : str, int, int
        Where the dead letter itself is.
    record : dict or None
        The ``dlq`` record (``stage``, ``reason``, ``message``, the original ``topic``,
        ``partition``, ``offset``, ``key``, ``value``, ``headers``, ...); None when the bytes are not one.
    problem : str
        Why they are not one ("" when they are).
    """

    topic: str
    partition: int
    offset: int
    record: dict | None
    problem: str = ""

    @property
    def reason(self) -> str:
        """The stage's reason, or ``undecodable`` for bytes that are no dead-letter record."""
        return str(self.record["reason"]) if self.record is not None else "undecodable"


def dead_letters(settings: KafkaSettings, stages: Sequence[str] = DEAD_LETTER_STAGES,
                 timeout: float = 60.0) -> Iterator[DeadLetter]:
    """The dead letters now on the ``dlq.<stage>`` topics of ``stages`` (missing topics have none)."""
    for msg in scan(settings, [topics.dlq(s) for s in stages], timeout):
        where = (msg.topic() or "", msg.partition() or 0, msg.offset() or 0)
        try:
            yield DeadLetter(*where, serde.decode("dlq", msg.value(), serde.message_headers(msg)))
        except DecodeError as exc:
            yield DeadLetter(*where, None, str(exc))


def resend(letter: DeadLetter, producer: Producer) -> None:
    """Produce the dead-lettered frame's original record to ``frames`` again (key, headers and value as they were).

    Raises
    ------
    NotResendable
        Not a dead letter, not a message of ``frames``, or one whose value, key or headers the
        dead letter holds only part of (``truncated``; send the frame again from its file), or
        whose value no longer matches its recorded SHA-256.
    """
    rec = letter.record
    where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
    if rec is None:
        raise NotResendable(f"{where} is not a dead-letter record: {letter.problem}")
    if rec["topic"] != topics.FRAMES:
        raise NotResendable(f"{where} is a message of {rec['topic']!r}, not a frame: only frames are sent again "
                            f"(send the frame it came from again instead)")
    value = rec["value"]
    if rec["truncated"] or value is None:
        raise NotResendable(f"{where} holds only part of its frame's record ({rec['value_size']} bytes; "
                            f"dlq_value_bytes keeps fewer): send the frame again from its file")
    if rec["value_sha256"] is not None and hashlib.sha256(value).hexdigest() != rec["value_sha256"]:
        raise NotResendable(f"{where}: the kept value does not match its recorded SHA-256")
    producer.produce(topics.FRAMES, value, rec["key"], headers=list(rec["headers"].items()))
