"""The pipeline configuration: typed, frozen, read once at start-up.

A TOML file may override any field, by section::

    state_dir = "var/state"
    [ingest]
    max_nan_fraction = 0.3
    [subtract]
    threshold = 5.0

Each section is the config dataclass of one step; see that class for units and defaults.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from broker.errors import ConfigError
from broker.history import HistoryConfig
from broker.ingest import IngestConfig
from broker.reference import ReferenceConfig
from broker.subtract import SubtractConfig


@dataclass(frozen=True)
class PipelineConfig:
    """Everything the stages need.

    Attributes
    ----------
    state_dir : Path
        Local state: references (``refs/``), object history (``history.sqlite``).
    frame_store : str
        fsspec URL or directory of the frame store for frames sent by reference.
    inline_limit_bytes : int
        Frames whose FITS bytes exceed this travel by reference (8 MiB: a 2048^2 16-bit frame
        compresses to ~4-5 MB and goes inline; 4096^2 frames go by reference).
    max_frame_bytes : int
        Hard limit on one frame's FITS bytes (1 GiB) against hostile or broken producers.
    rb_model, anomaly_model : str or None
        Weights to load (a version name in ``broker/models/`` or a path); None: the shipped
        defaults (``realbogus.DEFAULT_VERSION``, ``anomaly.DEFAULT_VERSION``).
    rb_views : int
        Dihedral views averaged per triplet by the real/bogus model (``ScoreConfig.views``: 1, 2,
        4 or 8); each costs one forward pass.
    torch_threads : int
        Threads of the classify stage's torch (1: measured fastest when the other stages share the
        cores; bench/realbogus.py shows 2 threads slower than 1 on a busy 2-core machine).
    retain_freed_memory : bool
        The subtract stage keeps freed memory for the next frame (:mod:`broker.runtime`; True:
        4096^2 frames 7.7 s -> 4.5 s on the build machine, at the price of keeping the peak heap).
    max_consecutive_unexpected : int
        Unexpected errors (exceptions that are not a ``BrokerError``: bugs, not bad input) in a
        row after which a stage exits non-zero for its supervisor to restart it (count; 0: never).
        Default 5: one poison message is dead-lettered and the stage carries on; a bug that hits
        every message stops the stage within 5 messages instead of draining the stream into the
        dead-letter topic.
    """

    state_dir: Path = Path("var/state")
    frame_store: str = "var/frames"
    inline_limit_bytes: int = 8 * 1024 * 1024
    max_frame_bytes: int = 1024 * 1024 * 1024
    rb_model: str | None = None
    anomaly_model: str | None = None
    rb_views: int = 1
    torch_threads: int = 1
    retain_freed_memory: bool = True
    max_consecutive_unexpected: int = 5
    ingest: IngestConfig = field(default_factory=IngestConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    subtract: SubtractConfig = field(default_factory=SubtractConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)


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
        elif typing.get_origin(hint) is tuple or hint is tuple:
            kwargs[name] = tuple(value)
        elif hint is Path:
            kwargs[name] = Path(value)
        else:
            kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid [{where}]: {exc}") from exc


def load_config(path: str | Path | None = None, **overrides) -> PipelineConfig:
    """Defaults, then the TOML file at ``path`` (if any), then keyword overrides."""
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    return _build(PipelineConfig, values, "pipeline")
