"""The portal's settings (``broker serve``): where it reads, who may write, and its limits."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from broker.config import PipelineConfig
from broker.errors import ConfigError
from broker.history import HistoryConfig
from broker.ingest import IngestConfig

#: Where ``broker demo`` keeps its state: the folder ``broker serve`` reads by default.
DEMO_STATE_DIR = Path("var/demo/state")


@dataclass(frozen=True)
class WebConfig:
    """Settings of the web portal, frozen at start-up.

    Attributes
    ----------
    host : str
        Interface to listen on. Default ``127.0.0.1``: only this machine; serve further through a
        reverse proxy with TLS.
    port : int
        TCP port. Default 8000.
    archive : str or None
        Directory or fsspec URL of the alert archive (``<state_dir>/archive`` for the pipeline's
        default). Default None: no archive; the alert endpoints answer 503.
    state_dir : Path or None
        The pipeline's state folder: ``history.sqlite`` (the object history) and ``diffs/`` (the
        kept difference images). Default None: no history.
    history : HistoryConfig
        The object history's settings (its PostgreSQL ``dsn``, if any). Default: SQLite in ``state_dir``.
    tokens_path : Path
        SQLite file of the API tokens (salted hashes only). Default ``var/portal/tokens.sqlite``;
        :meth:`for_state_dir` puts it in the state folder.
    labels_path : Path
        SQLite file of the vetting labels. Default ``var/portal/labels.sqlite``.
    bootstrap : str or None
        Kafka bootstrap servers, for uploads published to ``frames_topic`` and the live stream of
        ``alerts_topic``. Default None: no Kafka; publishing uploads answers 503.
    alerts_topic, frames_topic : str
        The topics read live and written by uploads. Defaults ``alerts`` and ``frames``.
    cors_origins : tuple of str
        Origins allowed to call the API from a browser page of theirs. Default none: CORS closed.
    public_read : bool
        Whether the read endpoints answer without a token. Default True: the demo serves public alerts.
    max_upload_bytes : int
        Largest upload body (bytes), refused from its ``Content-Length`` before it is read and cut
        off while streaming otherwise. Default 64 MiB: a 4k x 4k float32 frame is 64 MiB uncompressed.
    max_upload_pixels : int
        Largest image an upload's header may announce (pixels), refused before decompression.
        Default 2**25 (a 5.8k x 5.8k frame; the pipeline's own limit is ``IngestConfig.max_pixels``).
    max_expansion : float
        Largest ratio of decompressed to compressed size of a tile-compressed upload (the
        decompression-bomb guard of :func:`broker.frame.decode_fits`). Default 64, as the ingest stage.
    uploads_per_minute : int
        Uploads one token may make per minute (count, a sliding 60 s window). Default 10:
        ``predict`` runs the pipeline synchronously (~1 s to tens of s per frame).
    references_dir : Path or None
        Folder of stored references (``<state_dir>/refs`` by :meth:`for_state_dir`, the pipeline's) that
        ``predict`` uses when the upload brings none. Default None.
    pipeline : PipelineConfig
        The pipeline's configuration (``broker serve --config``): the models, subtraction and
        validation settings ``predict`` runs with, and the frame store, limits and Kafka security
        ``publish`` sends with. Default: the pipeline's defaults.
    query_threads : int
        Threads that run blocking reads (DuckDB, SQLite) and predictions off the event loop (count).
        Default 4.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    archive: str | None = None
    state_dir: Path | None = None
    history: HistoryConfig = field(default_factory=HistoryConfig)
    tokens_path: Path = Path("var/portal/tokens.sqlite")
    labels_path: Path = Path("var/portal/labels.sqlite")
    bootstrap: str | None = None
    alerts_topic: str = "alerts"
    frames_topic: str = "frames"
    cors_origins: tuple[str, ...] = ()
    public_read: bool = True
    max_upload_bytes: int = 64 * 1024 * 1024
    max_upload_pixels: int = 2 ** 25
    max_expansion: float = 64.0
    uploads_per_minute: int = 10
    references_dir: Path | None = None
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    query_threads: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port must be within 1..65535, not {self.port}")
        if min(self.max_upload_bytes, self.max_upload_pixels, self.uploads_per_minute, self.query_threads) < 1:
            raise ConfigError("max_upload_bytes, max_upload_pixels, uploads_per_minute and query_threads must be >= 1")
        if not self.max_expansion > 1:
            raise ConfigError(f"max_expansion must be > 1, not {self.max_expansion}")
        if "*" in self.cors_origins:
            raise ConfigError("cors_origins must name origins; '*' would open the API to every page")

    @classmethod
    def for_state_dir(cls, state_dir: Path, **overrides: object) -> WebConfig:
        """The settings of a pipeline's state folder: its archive, history, references, tokens and labels."""
        state_dir = Path(state_dir)
        base = cls(archive=str(state_dir / "archive"), state_dir=state_dir,
                   tokens_path=state_dir / "tokens.sqlite", labels_path=state_dir / "labels.sqlite",
                   references_dir=state_dir / "refs")
        return replace(base, **overrides)  # type: ignore[arg-type]

    def ingest(self) -> IngestConfig:
        """The ingest validation applied to uploads, with the portal's pixel and expansion limits."""
        return replace(self.pipeline.ingest, max_pixels=min(self.max_upload_pixels, self.pipeline.ingest.max_pixels),
                       max_expansion=min(self.max_expansion, self.pipeline.ingest.max_expansion))
