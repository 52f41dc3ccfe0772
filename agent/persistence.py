"""Where conversation threads live: SQLite under the user's data dir by default, Postgres for the scale path."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

from luciddrag.engine.errors import InputError


def default_db() -> Path:
    home = os.environ.get("LUCIDDRAG_HOME")
    if home:
        return Path(home).expanduser() / "threads.sqlite"
    from platformdirs import user_data_dir

    return Path(user_data_dir("luciddrag")) / "threads.sqlite"


def make_checkpointer(url: str | None = None) -> Any:
    """`None` or a path / `sqlite:///path` -> SqliteSaver; `postgresql://...` -> PostgresSaver (needs the
    `postgres` extra: pip install 'luciddrag[postgres]')."""
    url = url or os.environ.get("LUCIDDRAG_DB")
    if url and url.startswith(("postgres://", "postgresql://")):
        try:
            from langgraph.checkpoint.postgres import PostgresSaver
            from psycopg import Connection
        except ImportError:
            raise InputError("a Postgres URL needs the postgres extra: pip install 'luciddrag[postgres]'") from None
        conn = Connection.connect(url, autocommit=True, prepare_threshold=0)
        saver = PostgresSaver(conn)
        saver.setup()
        return saver
    from langgraph.checkpoint.sqlite import SqliteSaver

    path = Path(url[len("sqlite:///"):] if url and url.startswith("sqlite:///") else (url or default_db())).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))
