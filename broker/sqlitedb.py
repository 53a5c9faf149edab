"""Opening the SQLite files a user can point the broker at (labels, feedback, tokens)."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from broker.errors import ConfigError


def open_database(path: str | Path, schema: str, what: str, **connect: Any) -> sqlite3.Connection:
    """Connect to the SQLite file ``path`` (created with its folder when absent) and apply ``schema``.

    Parameters
    ----------
    path : str or Path
        The file, or ``":memory:"``.
    schema : str
        SQL script of ``CREATE ... IF NOT EXISTS`` statements.
    what : str
        What the file holds, for the error message ("a feedback database").
    **connect
        Passed to :func:`sqlite3.connect`.

    Raises
    ------
    ConfigError
        ``path`` is a folder, another kind of file, a database of another schema, or out of reach:
        named, instead of SQLite's or the OS's own error.
    """
    try:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(str(path), **connect)
        db.executescript(schema)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigError(f"cannot open {path} as {what}: {exc}") from exc
    return db
