"""The broker's request journal: every accepted request, durable across a restart.

Runs in the broker process, owned by its server loop (one thread, one SQLite
connection). A request is written, with its validated parameters and tensor inputs,
before ACCEPTED leaves the broker, and marked ended (finished, failed, cancelled) when
its answer is sent. A broker that starts reads the requests that never ended and runs
them again from the start: results are deterministic from the seed, so the answer is
the one the first run would have given.

SQLite in WAL mode: one file in the run directory, no server, atomic commits, readers
never block the writer. `synchronous=NORMAL` survives a killed broker process (what a
restart is); a power cut may lose the last commits, which is the trade the file
system's own metadata makes too. Parameters are msgpack (never pickle); tensors are
raw bytes with their descriptions. Ended entries are pruned after `retention_s`, so the
file's size follows the load, not the uptime. A journal that cannot be read stops the
broker with `JournalError` naming the file: silently starting empty would lose work.

The same file keeps the workflows registered at run time (ADMIN_REGISTER; table
`workflows`: name, msgpack definition), written before the reply that accepts one and
never pruned: a restarted broker registers them again before it re-runs the requests,
which may use them. A file written before that table existed gets it when opened.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import msgpack

ENDED = ("finished", "failed", "cancelled")
SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE,
    client BLOB NOT NULL,
    workflow TEXT NOT NULL,
    params BLOB NOT NULL,
    tensors BLOB NOT NULL,
    progress INTEGER NOT NULL,
    accepted_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'accepted',
    ended_at REAL,
    user TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS requests_open ON requests (status, seq);
CREATE TABLE IF NOT EXISTS workflows (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    definition BLOB NOT NULL,
    registered_at REAL NOT NULL
);
"""


class JournalError(RuntimeError):
    """The journal file cannot be opened, read or written; the message names it."""


@dataclass(frozen=True)
class Entry:
    """One accepted request as the journal keeps it."""

    request_id: str
    client: bytes  # the client's ZeroMQ identity: answers go back to it when it reconnects
    workflow: str
    params: dict
    tensors: list  # [(desc map, raw bytes)] in the order the client sent them
    progress: bool
    accepted_at: float  # wall-clock seconds
    # Keys on: the key (User-Id) that submitted it; a restarted broker gives the client's
    # routing id back to that key only. "" with keys off.
    user: str = ""


class Journal:
    def __init__(self, path: str | Path, retention_s: float = 3600.0):
        self.path, self.retention_s = Path(path), retention_s
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            (check,) = self.db.execute("PRAGMA quick_check").fetchone()
            if check != "ok":
                raise sqlite3.DatabaseError(check)
            self.db.executescript(SCHEMA)
            columns = {row[1] for row in self.db.execute("PRAGMA table_info(requests)")}
            if "user" not in columns:  # a journal written before keys were journaled
                self.db.execute("ALTER TABLE requests ADD COLUMN user TEXT NOT NULL DEFAULT ''")
        except sqlite3.Error as exc:
            raise JournalError(f"request journal {self.path}: unreadable ({exc}); move it aside to start "
                               "without its requests, or restore it") from None
        self.path.chmod(0o600)

    def accepted(self, entry: Entry) -> None:
        """Record an accepted request; returns once it is committed. An id whose earlier
        request has ended (and is not pruned yet) is a new request: it replaces that entry;
        one still open is refused (ValueError)."""
        tensors = msgpack.packb([[desc, bytes(raw)] for desc, raw in entry.tensors], use_bin_type=True)
        self._write("BEGIN IMMEDIATE", ())
        try:
            self._write("DELETE FROM requests WHERE request_id = ? AND status != 'accepted'", (entry.request_id,))
            self._write("INSERT INTO requests (request_id, client, workflow, params, tensors, progress, accepted_at, "
                        "user) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (entry.request_id, entry.client, entry.workflow, msgpack.packb(entry.params, use_bin_type=True),
                         tensors, int(entry.progress), entry.accepted_at, entry.user))
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.db.rollback()
            raise
        self._write("COMMIT", ())

    def ended(self, request_id: str, status: str, now: float | None = None) -> None:
        if status not in ENDED:
            raise ValueError(f"status: expected one of {ENDED}, got {status!r}")
        self._write("UPDATE requests SET status = ?, ended_at = ? WHERE request_id = ? AND status = 'accepted'",
                    (status, time.time() if now is None else now, request_id))

    def unfinished(self) -> list[Entry]:
        """Every request that never ended, in the order they were accepted."""
        rows = self._read("SELECT request_id, client, workflow, params, tensors, progress, accepted_at, user "
                          "FROM requests WHERE status = 'accepted' ORDER BY seq")
        return [Entry(rid, bytes(client), workflow, msgpack.unpackb(params, raw=False),
                      [(desc, raw) for desc, raw in msgpack.unpackb(tensors, raw=False)], bool(progress), at, user)
                for rid, client, workflow, params, tensors, progress, at, user in rows]

    def register_workflow(self, name: str, definition: dict, now: float | None = None) -> None:
        """Record a workflow registered at run time (a later one of the same name replaces it)."""
        self._write("INSERT OR REPLACE INTO workflows (name, definition, registered_at) VALUES (?, ?, ?)",
                    (name, msgpack.packb(definition, use_bin_type=True), time.time() if now is None else now))

    def workflows(self) -> list[tuple[str, dict]]:
        """Every registered workflow as (name, definition), in the order they were registered."""
        rows = self._read("SELECT name, definition FROM workflows ORDER BY seq")
        return [(name, msgpack.unpackb(definition, raw=False)) for name, definition in rows]

    def status(self, request_id: str) -> str | None:
        rows = self._read("SELECT status FROM requests WHERE request_id = ?", (request_id,))
        return rows[0][0] if rows else None

    def prune(self, now: float | None = None) -> int:
        """Forget requests that ended more than `retention_s` ago; how many."""
        cutoff = (time.time() if now is None else now) - self.retention_s
        return self._write("DELETE FROM requests WHERE status != 'accepted' AND ended_at < ?", (cutoff,))

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, args: tuple) -> int:
        try:
            return self.db.execute(sql, args).rowcount
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"request_id: {args[0]!r} is already journaled ({exc})") from None
        except sqlite3.Error as exc:
            raise JournalError(f"request journal {self.path}: write failed ({exc})") from None

    def _read(self, sql: str, args: tuple = ()) -> list:
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise JournalError(f"request journal {self.path}: read failed ({exc})") from None
