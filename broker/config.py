"""The pipeline configuration: typed, frozen, read once at start-up.

A TOML file may override any field, by section::

    state_dir = "var/state"
    [ingest]
    max_nan_fraction = 0.3
    [subtract]
    threshold = 5.0
    [[alert_topics]]          # one table per alert topic (default: one ``ocf`` topic ``alerts``)
    name = "alerts"
    framing = "ocf"

Each section is the config dataclass of one step; see that class for units and defaults.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from broker.archive.config import ArchiveConfig
from broker.context import ContextConfig
from broker.diffstore import DiffStoreConfig
from broker.errors import ConfigError
from broker.followup import FollowupConfig
from broker.history import HistoryConfig
from broker.ingest import IngestConfig
from broker.moving import MovingConfig
from broker.reference import ReferenceConfig
from broker.subtract import SubtractConfig

#: Framings an alert topic may use (``streams/framing.py``; ``docs/architecture.md``, "Alert framings").
ALERT_FRAMINGS = ("ocf", "confluent", "fink")
#: Avro container codecs of the ``ocf`` framing (``snappy`` needs cramjam).
OCF_CODECS = ("null", "deflate", "snappy")


@dataclass(frozen=True)
class AlertTopicConfig:
    """One alert topic and how it frames its alerts (``[[alert_topics]]`` in the TOML file).

    Attributes
    ----------
    name : str
        Topic name. Default ``alerts``, the topic of the pipeline before framings were configurable.
    framing : str
        One of :data:`ALERT_FRAMINGS`: ``ocf`` (default; ZTF's, read by hop-client, gcn-kafka and
        plain fastavro), ``confluent`` (Rubin's: magic byte and schema-registry id; needs
        ``schema_registry_url``) or ``fink`` (bare Avro body, writer schema as JSON in the key).
    codec : str
        Block codec of ``ocf`` containers, one of :data:`OCF_CODECS`. Default ``null``: an alert is
        mostly gzipped FITS cutouts that no codec shrinks further.
    per_filter : bool
        Also copy each alert to ``<name>.<filter>`` in the same framing. Default True, as the
        pipeline always did for ``alerts``.
    filter : str or None
        Only the alerts this expression holds for (the language of ``broker subscribe --filter``,
        compiled when the alert stage starts). Default None: every alert.
    watchlist : str or None
        Only the alerts within the radius of an entry of this watchlist CSV
        (:mod:`broker.watchlist`: read when the alert stage starts, and again when the file
        changes), each with the header ``watchlist`` (JSON: the entries' names and distances).
        Default None: no watchlist.
    watchlist_radius_arcsec : float
        Radius of the watchlist's entries without one (arcsec). Default 2
        (:data:`broker.watchlist.DEFAULT_RADIUS_ARCSEC`).
    watchlist_check_s : float
        Seconds between looks at the watchlist file for a change. Default 30: an edited list
        reaches the topic within half a minute, at one ``stat`` a topic per 30 s.
    """

    name: str = "alerts"
    framing: str = "ocf"
    codec: str = "null"
    per_filter: bool = True
    filter: str | None = None
    watchlist: str | None = None
    watchlist_radius_arcsec: float = 2.0
    watchlist_check_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.name or any(c not in _TOPIC_CHARS for c in self.name):
            raise ConfigError(f"invalid alert topic name {self.name!r} (letters, digits, '.', '_', '-')")
        if self.framing not in ALERT_FRAMINGS:
            raise ConfigError(f"unknown alert framing {self.framing!r}; one of {list(ALERT_FRAMINGS)}")
        if self.codec not in OCF_CODECS:
            raise ConfigError(f"unknown Avro codec {self.codec!r}; one of {list(OCF_CODECS)}")
        if self.codec != "null" and self.framing != "ocf":
            raise ConfigError(f"codec {self.codec!r} applies to the ocf framing only, not {self.framing!r}")
        if self.filter is not None and not self.filter.strip():
            raise ConfigError(f"alert topic {self.name}: an empty filter; leave it out to send every alert")
        if self.watchlist is not None and not self.watchlist.strip():
            raise ConfigError(f"alert topic {self.name}: an empty watchlist path; leave it out for none")
        if not 0.0 <= self.watchlist_check_s <= 86400.0:
            raise ConfigError(f"alert topic {self.name}: watchlist_check_s must be in [0, 86400], "
                              f"not {self.watchlist_check_s}")
        if not 0.0 < self.watchlist_radius_arcsec <= 3600.0:
            raise ConfigError(f"alert topic {self.name}: watchlist_radius_arcsec must be in (0, 3600], "
                              f"not {self.watchlist_radius_arcsec}")


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def parse_alert_topic(text: str) -> AlertTopicConfig:
    """An alert topic from the command-line form ``NAME=FRAMING[:CODEC]`` (e.g. ``alerts-rubin=confluent``).

    Raises
    ------
    ConfigError
        Malformed text, unknown framing or codec.
    """
    name, sep, rest = text.partition("=")
    if not sep:
        raise ConfigError(f"alert topic {text!r} is not NAME=FRAMING[:CODEC] (e.g. alerts=ocf:deflate)")
    framing, _, codec = rest.partition(":")
    return AlertTopicConfig(name.strip(), framing.strip(), codec.strip() or "null")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the stages need.

    Attributes
    ----------
    state_dir : Path
        Local state: references (``refs/``), object history (``history.sqlite``), difference images
        of recent frames for forced photometry (``diffs/``, :mod:`broker.diffstore`).
    frame_store : str
        fsspec URL or directory of the frame store for frames sent by reference.
    inline_limit_bytes : int
        Frames whose FITS bytes exceed this travel by reference (8 MiB: a 2048^2 16-bit frame
        compresses to ~4-5 MB and goes inline; 4096^2 frames go by reference).
    max_frame_bytes : int
        Hard limit on one frame's FITS bytes (1 GiB) against hostile or broken producers.
    rb_model, anomaly_model, lcclass_model : str or None
        Weights to load (a version name in ``broker/models/`` or a path); None: the shipped
        defaults (``realbogus.DEFAULT_VERSION``, ``anomaly.DEFAULT_VERSION``,
        ``lcclass.DEFAULT_VERSION``).
    openngc : str or None
        The OpenNGC database of the score stage's context (a path to a SQLite file of ``pyongc``'s
        schema); None (default): the one ``pyongc`` ships; ``""``: no catalog matches. A missing or
        corrupt file stops the stage at start-up (``ConfigError``).
    rb_views : int
        Dihedral views averaged per triplet by the real/bogus model (``ScoreConfig.views``: 1, 2,
        4 or 8); each costs one forward pass.
    torch_threads : int
        Threads of the classify stage's torch, 1 to 1024 (1: measured fastest when the other stages
        share the cores; bench/realbogus.py shows 2 threads slower than 1 on a busy 2-core machine).
    retain_freed_memory : bool
        The subtract stage keeps freed memory for the next frame (:mod:`broker.runtime`; True:
        4096^2 frames 7.7 s -> 4.5 s on the build machine, at the price of keeping the peak heap).
    max_consecutive_unexpected : int
        Unexpected errors (exceptions that are not a ``BrokerError``: bugs, not bad input) in a
        row after which a stage exits non-zero for its supervisor to restart it (count; 0: never).
        Default 5: one poison message is dead-lettered and the stage carries on; a bug that hits
        every message stops the stage within 5 messages instead of draining the stream into the
        dead-letter topic.
    dlq_value_bytes : int
        Bytes of the original value a dead-letter record keeps when the value is longer (1 MiB;
        ``streams.runner.DLQ_VALUE_BYTES``): the record then holds its first bytes, its length, its
        SHA-256 and ``truncated`` (``dlq/v2``), so a dead letter of a message near the 64 MiB limit
        still fits its topic; the whole message stays on its input topic at the offset the record
        names. At most 32 MiB.
    transaction_deadline_s : float
        Longest time one input's transaction (produce, send offsets, commit) may block before
        the stage exits with status 4 for its supervisor to restart it (s; 0: never). librdkafka
        can wait forever for a coordinator that restarted (seen on the embedded broker); the
        restarted stage resumes exactly once from its committed state. Default 120: twice the
        client's own commit timeout of 60 s.
    alert_topics : tuple of AlertTopicConfig
        The alert stage's output topics; several may carry the same alerts in different framings.
        Default: one ``ocf`` topic ``alerts`` (with its per-filter copies), as before framings.
    schema_registry_url : str or None
        Confluent-compatible schema registry (``http(s)://host:port``; ``mock://`` for tests in one
        process) where ``confluent`` topics register the alert schema at start-up. Default None:
        no registry (the alert stage then refuses to start with a ``confluent`` topic).
    context : ContextConfig
        Catalog matching, host and nuclear radii of the context (``[context]``;
        :class:`broker.context.ContextConfig`).
    moving : MovingConfig
        Moving-object linking (``[moving]``; :class:`broker.moving.MovingConfig`).
    followup : FollowupConfig
        Follow-up rules of the score stage (``[followup]`` with ``[[followup.rules]]``;
        :class:`broker.followup.FollowupConfig`).
    archive : ArchiveConfig
        The archive stage: where the Parquet archive lives (default ``<state_dir>/archive``) and
        how it batches (``[archive]``; :class:`broker.archive.config.ArchiveConfig`).
    kafka : dict
        The ``[kafka]`` table, kept as read: Kafka client security (``streams/security.py``) and
        the frame signatures checked by ingest (``[kafka.frame_auth]``, ``streams/frame_auth.py``).
        ``broker/`` never reads it. Default empty: plaintext, no frame signatures.
    """

    state_dir: Path = Path("var/state")
    frame_store: str = "var/frames"
    inline_limit_bytes: int = 8 * 1024 * 1024
    max_frame_bytes: int = 1024 * 1024 * 1024
    rb_model: str | None = None
    anomaly_model: str | None = None
    lcclass_model: str | None = None
    openngc: str | None = None
    rb_views: int = 1
    torch_threads: int = 1
    retain_freed_memory: bool = True
    max_consecutive_unexpected: int = 5
    dlq_value_bytes: int = 1024 * 1024
    transaction_deadline_s: float = 120.0
    alert_topics: tuple[AlertTopicConfig, ...] = (AlertTopicConfig(),)
    schema_registry_url: str | None = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)
    differences: DiffStoreConfig = field(default_factory=DiffStoreConfig)
    context: ContextConfig = field(default_factory=ContextConfig)
    moving: MovingConfig = field(default_factory=MovingConfig)
    followup: FollowupConfig = field(default_factory=FollowupConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    kafka: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.dlq_value_bytes <= 32 * 1024 * 1024:
            raise ConfigError(f"dlq_value_bytes must be 0 to 32 MiB, not {self.dlq_value_bytes}")
        if not 0 <= self.transaction_deadline_s < 86400:
            raise ConfigError(f"transaction_deadline_s must be 0 to 86400 s, not {self.transaction_deadline_s}")
        if self.max_consecutive_unexpected < 0:
            raise ConfigError(f"max_consecutive_unexpected must be 0 (never stop) or more, "
                              f"not {self.max_consecutive_unexpected}")
        if self.rb_views not in (1, 2, 4, 8):  # broker.realbogus's views, checked here without importing torch
            raise ConfigError(f"rb_views must be 1, 2, 4 or 8, not {self.rb_views}")
        if not 1 <= self.torch_threads <= 1024:  # 2**62 was a ValueError of torch when the classify stage started
            raise ConfigError(f"torch_threads must be 1 to 1024, not {self.torch_threads}")
        if not 0 < self.inline_limit_bytes <= self.max_frame_bytes:
            raise ConfigError(f"inline_limit_bytes must be above 0 and at most max_frame_bytes "
                              f"({self.max_frame_bytes}), not {self.inline_limit_bytes}")
        names = [t.name for t in self.alert_topics]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"alert_topics must name one or more distinct topics, not {names}")


def _build(cls: type, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{where}]: {sorted(unknown)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and not isinstance(value, hint):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}.{name}] must be a table")
            kwargs[name] = _build(hint, value, f"{where}.{name}")
        elif _is_table_array(hint):
            item = typing.get_args(hint)[0]
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"[[{where}.{name}]] must be an array of tables")
            kwargs[name] = tuple(v if isinstance(v, item) else _build(item, _table(v, f"{where}.{name}"),
                                                                      f"{where}.{name}") for v in value)
        else:
            kwargs[name] = _typed(value, hint, f"[{where}] {name}")
            _check_sign(kwargs[name], f"[{where}] {name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid [{where}]: {exc}") from exc
    except ConfigError as exc:  # named by its table: a class may be several ([reference.stars], [subtract.stars])
        raise ConfigError(str(exc) if str(exc).startswith("[") else f"[{where}] {exc}") from exc


def _check_sign(value: object, what: str) -> None:
    """ConfigError for a negative number setting (or an array setting holding one).

    Every number setting is a size, count, time, threshold or fraction, and -1 made sense in none
    (``[subtract] threshold_sigma = -1`` took a simulated frame from 14 candidates to 29 of noise).
    Tables of numbers (``[archive] longitudes``) are not number settings.
    """
    items = value if isinstance(value, tuple) else (value,)
    if any(isinstance(v, int | float) and not isinstance(v, bool) and v < 0 for v in items):
        raise ConfigError(f"{what} must be 0 or more, not {value!r:.80}")


#: The types of settings that :func:`_typed` checks, as its errors name them.
_TYPE_NAMES: dict[object, str] = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                                  Path: "a path (string)", tuple: "an array", dict: "a table"}


def _is_table_array(hint: object) -> bool:
    """Whether ``hint`` is ``tuple[SomeDataclass, ...]``: an array of tables in TOML."""
    item = (typing.get_args(hint) or (None,))[0]
    return typing.get_origin(hint) is tuple and isinstance(item, type) and dataclasses.is_dataclass(item)


def _typed(value: object, hint: object, what: str) -> object:
    """``value`` as the setting ``what`` of type ``hint`` holds it (an int as a float, an array as a tuple).

    Raises
    ------
    ConfigError
        ``value`` is not of that type (a string for a number, a string for an array of strings, ...):
        used as it is, it would fail later or mean something else.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        kinds = [a for a in args if a is not type(None)]
        if len(kinds) != 1:
            return value  # no such setting yet: left to the dataclass
        hint, origin, args = kinds[0], typing.get_origin(kinds[0]), typing.get_args(kinds[0])
    if hint not in _TYPE_NAMES and origin not in (tuple, dict):
        return value  # a type this check does not know: left to the dataclass
    if isinstance(value, bool):
        if hint is bool:
            return value
    elif hint is int and isinstance(value, int):
        return value
    elif hint is float and isinstance(value, (int, float)):
        if math.isnan(value):  # TOML's nan: every bound compared with it is false, so it would disable a check
            raise ConfigError(f"{what} must be a number, not nan")
        return float(value)
    if (hint is str and isinstance(value, str)) or (hint is Path and isinstance(value, (str, Path))):
        return hint(value)
    if (origin is tuple or hint is tuple) and isinstance(value, (list, tuple)):
        return _typed_tuple(value, hint, what)
    if (origin is dict or hint is dict) and isinstance(value, dict):
        return {k: _typed(v, args[1], f"{what}.{k}") for k, v in value.items()} if args else value
    raise ConfigError(f"{what} must be {_type_name(hint)}, not {value!r:.80}")


def _typed_tuple(value: list | tuple, hint: object, what: str) -> tuple:
    """The items of an array setting of type ``hint``: ``tuple[X, ...]``, or one type per item."""
    args = typing.get_args(hint)
    if len(args) == 2 and args[1] is Ellipsis:
        args = (args[0],) * len(value)
    elif args and len(args) != len(value):
        raise ConfigError(f"{what} must be {_type_name(hint)}, not {list(value)!r:.80}")
    return tuple(_typed(v, a, what) for v, a in zip(value, args, strict=True)) if args else tuple(value)


def _type_name(hint: object) -> str:
    """How an error message names a setting's type."""
    items = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}
    if typing.get_origin(hint) is tuple or hint is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"an array of {items.get(args[0], 'values')}"
        return f"an array of {len(args)} {items.get(args[0], 'values')}" if args else "an array"
    if typing.get_origin(hint) is dict:
        return "a table"
    return _TYPE_NAMES.get(hint, str(hint))


def _table(value: object, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"[[{where}]] must be an array of tables")
    return value


def load_config(path: str | Path | None = None, **overrides) -> PipelineConfig:
    """Defaults, then the TOML file at ``path`` (if any), then keyword overrides."""
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:  # absent, not UTF-8, not TOML
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(PipelineConfig, values, "pipeline")
