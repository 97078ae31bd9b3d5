"""The snapshot metadata store: SQLite in WAL mode, one transaction (`Tx`) per Snapshots call.

Vocabulary and rules are containerd's (``snapshots/storage`` of containerd 1.6): what a snapshot is in
`snapshotter.service.records`, the rules each call follows in `snapshotter.service.transaction`.

Each snapshot has a numeric `id`, unique across namespaces and never reused (AUTOINCREMENT), that
names its directory; the driver (`snapshotter.service.overlay`) owns those directories, this module owns no
file but the database. Schema (``PRAGMA user_version`` = `SCHEMA_VERSION`)::

    snapshots(id INTEGER PRIMARY KEY AUTOINCREMENT, namespace, key, kind, parent_id -> snapshots.id,
              labels JSON, created_ns, updated_ns, size, inodes, UNIQUE(namespace, key))

Timestamps are integer nanoseconds since the epoch (UTC), so what a client stored it reads back
bit-exact. Every connection belongs to one thread; a writer takes the database lock at BEGIN
(``BEGIN IMMEDIATE``), so the callers' filesystem work inside `MetaStore.write` is serialised with
every other writer, as under containerd's bolt write transaction.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from pathlib import Path

from ..errors import UnavailableError
from .transaction import Tx

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    key TEXT NOT NULL,
    kind INTEGER NOT NULL,
    parent_id INTEGER REFERENCES snapshots(id),
    labels TEXT NOT NULL DEFAULT '{}',
    created_ns INTEGER NOT NULL,
    updated_ns INTEGER NOT NULL,
    size INTEGER NOT NULL DEFAULT 0,
    inodes INTEGER NOT NULL DEFAULT 0,
    UNIQUE (namespace, key)
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent_id);
"""


class MetaStore:
    """The database file and one connection per thread."""

    def __init__(self, path: Path, busy_timeout: float = 30.0) -> None:
        self.path = path
        self._busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: list[sqlite3.Connection] = []
        self._closed = False
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = self._conn()
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise UnavailableError(
                    f"metadata {path} has schema version {version}, newer than this damselfly's "
                    f"{SCHEMA_VERSION}; run a newer damselfly or move the file away"
                )
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as e:
            raise self._unavailable(e) from e

    def _unavailable(self, e: sqlite3.Error) -> UnavailableError:
        return UnavailableError(
            f"metadata store {self.path}: {e}; retry, and check the disk and that no other "
            "damselfly serve uses the same root"
        )

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        with self._lock:
            if self._closed:
                raise UnavailableError(f"metadata store {self.path} is closed (the service is stopping)")
            # Each connection serves one thread; check_same_thread=False only lets close() run elsewhere.
            conn = sqlite3.connect(
                self.path, timeout=self._busy_timeout, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is durable before the caller removes or renames directories after it.
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._conns.append(conn)
        self._local.conn = conn
        return conn

    @contextmanager
    def _transaction(self, namespace: str | None, begin: str) -> Iterator[Tx]:
        if self._closed:
            raise UnavailableError(f"metadata store {self.path} is closed (the service is stopping)")
        conn = self._conn()
        try:
            conn.execute(begin)
        except sqlite3.Error as e:
            raise self._unavailable(e) from e
        try:
            yield Tx(conn, namespace)
        except BaseException as exc:
            with suppress(sqlite3.Error):  # the original error is what the caller must see
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable(exc) from exc
            raise
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise self._unavailable(e) from e

    def read(self, namespace: str | None) -> AbstractContextManager[Tx]:
        """A read transaction of `namespace` (None: all): a consistent view, concurrent with writers."""
        return self._transaction(namespace, "BEGIN")

    def write(self, namespace: str | None) -> AbstractContextManager[Tx]:
        """A write transaction, holding the database's write lock from its start to its end.

        Commits when the block ends normally; rolls back when it raises.
        """
        return self._transaction(namespace, "BEGIN IMMEDIATE")

    def close(self) -> None:
        """Close every connection; later calls raise `UnavailableError`. Idempotent."""
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
