"""Where conversation threads live: SQLite under the user's data dir by default, Postgres for the scale path.

With Postgres, any number of worker processes (web, chat, graph.invoke; on one machine or many) share threads: a
turn started by one continues on another, because every checkpoint is written to the database as the graph runs.
What they must also share is `LUCIDDRAG_HOME` (or the run's artifacts folder): checkpoints hold images by reference
(agent/serde.py), so the folder must be the same path on every worker (a shared volume). See docs/scale-out.md.
"""

from __future__ import annotations

import os
import re
import sqlite3
from pathlib import Path
from typing import Any

from luciddrag.engine.errors import InputError, ResourceError

POSTGRES_SCHEMES = ("postgres://", "postgresql://")


def default_db() -> Path:
    home = os.environ.get("LUCIDDRAG_HOME")
    if home:
        return Path(home).expanduser() / "threads.sqlite"
    from platformdirs import user_data_dir

    return Path(user_data_dir("luciddrag")) / "threads.sqlite"


def is_postgres(url: str | None) -> bool:
    return bool(url) and url.startswith(POSTGRES_SCHEMES)  # type: ignore[union-attr]


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


# Every connection: autocommit (otherwise other processes do not see a checkpoint until some later commit) and no
# server-side prepared statements (they break behind PgBouncer-style poolers in transaction mode).
CONNECTION_KWARGS = {"autocommit": True, "prepare_threshold": 0}


def postgres_checkpointer(url: str, max_connections: int | None = None, timeout_s: float = 10.0) -> Any:
    """A PostgresSaver over a connection pool (safe for the web app's threads), its tables created if missing.
    `max_connections`: pool size (LUCIDDRAG_DB_POOL, default 4)."""
    try:
        from langgraph.checkpoint.postgres import PostgresSaver
        from psycopg.rows import dict_row
        from psycopg_pool import ConnectionPool, PoolTimeout
    except ImportError:
        raise InputError("a Postgres URL needs the postgres extra: pip install 'luciddrag[postgres]'") from None
    size = max_connections or int(os.environ.get("LUCIDDRAG_DB_POOL", "4"))
    pool = ConnectionPool(url, min_size=1, max_size=max(size, 1), open=False, check=ConnectionPool.check_connection,
                          kwargs={**CONNECTION_KWARGS, "row_factory": dict_row})
    try:
        pool.open(wait=True, timeout=timeout_s)
    except PoolTimeout:
        pool.close()
        raise ResourceError(f"cannot connect to the thread database {redact(url)} within {timeout_s:.0f} s: is the "
                            "server up, and are the host, port, user and database right?") from None
    saver = PostgresSaver(pool)
    saver.setup()  # idempotent migrations; concurrent workers may all run it
    return saver


def make_checkpointer(url: str | None = None) -> Any:
    """`None` or a path / `sqlite:///path` -> SqliteSaver; `postgresql://...` -> PostgresSaver (needs the
    `postgres` extra: pip install 'luciddrag[postgres]'). Default: LUCIDDRAG_DB, else SQLite under LUCIDDRAG_HOME."""
    url = url or os.environ.get("LUCIDDRAG_DB")
    if is_postgres(url):
        return postgres_checkpointer(url)  # type: ignore[arg-type]
    from langgraph.checkpoint.sqlite import SqliteSaver

    path = Path(url[len("sqlite:///"):] if url and url.startswith("sqlite:///") else (url or default_db())).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return SqliteSaver(sqlite3.connect(str(path), check_same_thread=False))


def close_checkpointer(saver: Any) -> None:
    """Release what `make_checkpointer` opened (the pool, or the SQLite connection)."""
    conn = getattr(saver, "conn", None)
    close = getattr(conn, "close", None)
    if callable(close):
        close()
