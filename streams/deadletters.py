"""Dead letters as an operator reads them: every refused message with its reason, and sending frames again.

Each stage writes what it cannot process to ``dlq.<stage>`` (``dlq/v2``,
:func:`streams.runner.dead_letter`): the original key, headers and value (the first
``dlq_value_bytes`` of a longer one), the error class, the reason and the message. :func:`dead_letters`
reads them back, from the start of each topic to its end, without joining a group;
:func:`resend` publishes the original record of a dead-lettered frame to ``frames`` again (read back
from ``frames`` where the dead letter keeps only part of it), once its cause is fixed (a telescope
profile added, the plate solver's back-off over).
Only frames are sent again: a later stage's input is an earlier stage's output, which its frame
remakes. ``broker dead-letters`` is the command.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.errors import DecodeError, NotResendable
from streams import serde, topics
from streams.monitor import fetch, scan
from streams.stages import LEFT_OUT_HEADER, STAGE_NAMES

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


def resend(letter: DeadLetter, producer: Producer, settings: KafkaSettings | None = None) -> None:
    """Produce the dead-lettered frame's original record to ``frames`` again (key, headers and value as they were).

    A dead letter that keeps only part of its record (``truncated``: a value over ``dlq_value_bytes``,
    or long headers) is sent again from the original record, read back from ``frames`` with
    ``settings`` while retention keeps it, once its value matches the recorded SHA-256.

    Raises
    ------
    NotResendable
        Not a dead letter; the search of a frame its field's new reference left out, failed or
        its batch refused (:func:`_left_out_message`); not a message of ``frames``; kept only in
        part and its record no longer on ``frames`` (or no ``settings``: send the frame again from
        its file); or a value that does not match its recorded SHA-256.
    """
    rec = letter.record
    where = f"{letter.topic}[{letter.partition}]@{letter.offset}"
    if rec is None:
        raise NotResendable(f"{where} is not a dead-letter record: {letter.problem}")
    if LEFT_OUT_HEADER in rec["headers"]:
        raise NotResendable(_left_out_message(where, rec))
    if rec["topic"] != topics.FRAMES:
        raise NotResendable(f"{where} is a message of {rec['topic']!r}, not a frame: only frames are sent again "
                            f"(send the frame it came from again instead)")
    key, value = rec["key"], rec["value"]
    headers: list[tuple[str, Any]] = list(rec["headers"].items())
    if rec["truncated"]:
        original = None if settings is None else fetch(settings, topics.FRAMES, rec["partition"], rec["offset"])
        if original is None:
            raise NotResendable(f"{where} holds only part of its frame's record ({rec['value_size']} bytes; "
                                f"dlq_value_bytes keeps fewer) and frames[{rec['partition']}]@{rec['offset']} "
                                f"is no longer there: send the frame again from its file")
        try:  # not original.headers(): a name that is not UTF-8 raises SystemError there, or crashes the process
            headers = list(serde.message_headers(original).items())
        except DecodeError as exc:
            raise NotResendable(f"{where}: frames[{rec['partition']}]@{rec['offset']} has {exc}: it cannot be "
                                "sent again as it was") from exc
        key, value = original.key(), original.value()
    if value is None:
        raise NotResendable(f"{where} has no value to send again")
    if rec["value_sha256"] is not None and hashlib.sha256(value).hexdigest() != rec["value_sha256"]:
        raise NotResendable(f"{where}: the value does not match its recorded SHA-256")
    producer.produce(topics.FRAMES, value, key, headers=headers)


def _left_out_message(where: str, rec: dict) -> str:
    """Why the dead letter of a left-out frame's search (header ``left_out_frame``) is not sent again.

    It has no value (the frame's record stays on ``ingested`` at the position it names), and the
    frame cannot be processed again: the frame ledger holds it (``REFERENCE_BUILDING``, then its
    search), so a copy sent to ``frames`` would be refused ``duplicate_frame`` ("Batch statuses").
    """
    frame_id = rec["headers"][LEFT_OUT_HEADER].decode(errors="backslashreplace")
    return (f"{where} is the search of frame {frame_id!r}, which its field's new reference left out, against that "
            f"reference, dead-lettered ({rec['reason']}: it failed, or its batch was refused); it holds no frame "
            f"(the frame's record stays on {rec['topic']}[{rec['partition']}]@{rec['offset']} for its retention) and "
            "is not sent again: the frame ledger holds the frame as processed, so a copy sent to frames would be "
            "refused duplicate_frame")
