"""Stored responses, for the Responses API's `store: true` and `previous_response_id`.

A stored response is kept with its conversation: every input item that led to it, the earlier turns'
included, followed by its own output items. A next turn that names it as `previous_response_id` then
replays that one list and never has to walk back through the chain, so deleting or evicting an earlier
response does not break the turns after it (OpenAI's API behaves the same way).

The store is one SQLite file (Python's sqlite3, nothing to install), so stored responses survive a
restart of the server. It is bounded by bytes, not by count: conversations grow with every turn, and a
count would bound nothing. When a put takes the total past `max_bytes`, the oldest responses go first;
the one just put always stays, since its caller is about to hand out its id.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from gptoss.errors import GptossError

DEFAULT_MAX_BYTES = 256 * 2**20

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    created REAL NOT NULL,
    previous_id TEXT,
    body TEXT NOT NULL,
    conversation TEXT NOT NULL,
    bytes INTEGER NOT NULL
);
-- Sizes and ages from the index alone: `bytes` comes after the two big texts, so reading it from the
-- table would follow their overflow pages, and summing the sizes would read the whole store.
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created, bytes);
"""


def default_store_path() -> Path:
    """$GPTOSS_HOME/responses.sqlite3, next to the downloaded and generated checkpoints."""
    home = Path(os.environ.get("GPTOSS_HOME", Path.home() / ".cache" / "gptoss"))
    return home / "responses.sqlite3"


class StoreError(GptossError):
    """The store's file cannot be used: corrupt, not a database, or in a folder that cannot be written."""


def _dumps(obj: object) -> str:
    # Compact and UTF-8 as is: the bytes counted against max_bytes are then close to the bytes on disk.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class ResponseStore:
    """Responses by id, each with the conversation a next turn replays, in one SQLite file.

    One connection shared by every thread (FastAPI runs plain endpoints in a thread pool, async ones on
    the event loop), used under a lock: sqlite3 connections are not safe to use from two threads at once.
    """

    def __init__(self, path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES):
        self.path, self.max_bytes = Path(path), max_bytes
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False)
            # sqlite3 reads nothing on connect: a bad file shows up at the first statement, so the
            # pragmas and the schema go here too, where their errors become one StoreError.
            try:
                # WAL: readers do not wait for a writer, and a commit appends instead of rewriting pages.
                # NORMAL is durable across a crash of the server; only a power loss may lose the last puts.
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                self._db.executescript(_SCHEMA)
            except sqlite3.DatabaseError:
                self._db.close()
                raise
        except (sqlite3.DatabaseError, OSError) as e:
            raise StoreError(f"{self.path}: not a usable response store ({e}); "
                             "delete it or pass another --store-path") from e

    def put(self, response: dict, conversation: list[dict]) -> None:
        """Stores `response` under its id (replacing one stored before), then evicts the oldest others
        until the store fits in max_bytes.

        `conversation`: every input item of the conversation so far, then this response's output items.
        """
        body, items = _dumps(response), _dumps(conversation)
        size = len(body.encode()) + len(items.encode())
        with self._lock, self._db:  # one transaction: the new row and its evictions land together
            self._db.execute(
                "INSERT OR REPLACE INTO responses (id, created, previous_id, body, conversation, bytes) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (response["id"], time.time(), response.get("previous_response_id"), body, items, size))
            self._evict(keep=response["id"])

    def _evict(self, keep: str) -> None:
        total = self._total()
        if total <= self.max_bytes:
            return
        doomed = []
        # rowid breaks ties in `created`: a later insert has a larger one.
        oldest = self._db.execute("SELECT id, bytes FROM responses WHERE id != ? ORDER BY created, rowid", (keep,))
        for rid, size in oldest:
            if total <= self.max_bytes:
                break
            doomed.append((rid,))
            total -= size
        oldest.close()  # done reading before deleting from the same table
        self._db.executemany("DELETE FROM responses WHERE id = ?", doomed)

    def _total(self) -> int:
        return self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM responses").fetchone()[0]

    def get(self, response_id: str) -> dict | None:
        """The stored response object, or None if it was never stored, deleted or evicted."""
        text = self._one("body", response_id)
        return None if text is None else json.loads(text)

    def conversation(self, response_id: str) -> list[dict] | None:
        """The input items a turn with previous_response_id=response_id replays first, or None."""
        text = self._one("conversation", response_id)
        return None if text is None else json.loads(text)

    def _one(self, column: str, response_id: str) -> str | None:
        with self._lock:
            row = self._db.execute(f"SELECT {column} FROM responses WHERE id = ?", (response_id,)).fetchone()
        return None if row is None else row[0]

    def delete(self, response_id: str) -> bool:
        """Forgets a response; True if it was stored. Later turns that replay it keep their own copies."""
        with self._lock, self._db:
            return self._db.execute("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def total_bytes(self) -> int:
        """The bytes counted against max_bytes: the JSON of every stored response and conversation."""
        with self._lock:
            return self._total()

    def close(self) -> None:
        with self._lock:
            self._db.close()
