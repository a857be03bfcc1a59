"""The video jobs of one server, kept in SQLite (standard library) under its ``--data-dir``, so that they outlive it.

One connection behind a lock (the event loop's handlers, the engine's thread and the encoder all write), WAL journal
so that a reader never waits for a writer's fsync. A job's life: ``queued`` -> ``in_progress`` -> ``completed`` or
``failed``; a finished job expires (its row goes, its file with it) ``ttl`` seconds after it finished. Jobs left
unfinished by a process that died are marked ``failed`` with a reason by the next one (``fail_unfinished``): never
lost silently. One process per folder: an exclusive ``flock`` on ``lock`` refuses a second (it would mark the
first's running jobs failed), and the kernel releases it when the holder dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path

STATUSES = ("queued", "in_progress", "completed", "failed")
FINISHED = ("completed", "failed")
SCHEMA_VERSION = 1
_COLUMNS = ("id", "status", "progress", "created_at", "started_at", "completed_at", "expires_at", "model", "size",
            "frames", "fps", "seed", "error_code", "error_message", "file")


class JobLimit(RuntimeError):
    """As many jobs as the server takes are queued or running."""


class DataDirInUse(ValueError):
    """Another process serves from this ``--data-dir``."""


class JobStore:
    """The jobs table of ``data_dir/jobs.sqlite3``. Rows are dicts of ``_COLUMNS``; times are Unix seconds (floats:
    the job object rounds them down, as OpenAI's are integers)."""

    def __init__(self, data_dir: str | os.PathLike):
        self.folder = Path(data_dir)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.folder / "lock", "a+")  # noqa: SIM115 (held for the store's life)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "?"
            self._lock_file.close()
            raise DataDirInUse(f"data_dir {self.folder} is in use by another fastcache process (pid {holder}); give "
                               f"each server a --data-dir of its own") from None
        self._lock_file.truncate(0)
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()
        self._lock = threading.Lock()
        self.closed = False
        self._db = sqlite3.connect(self.folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed job survives a process crash
            self._db.execute("""CREATE TABLE IF NOT EXISTS jobs (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
                progress INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL, completed_at REAL,
                expires_at REAL, model TEXT NOT NULL, size TEXT NOT NULL, frames INTEGER NOT NULL,
                fps INTEGER NOT NULL, seed INTEGER, error_code TEXT, error_message TEXT, file TEXT)""")
            self._db.execute("CREATE INDEX IF NOT EXISTS jobs_expiry ON jobs (expires_at)")
            self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database and release the folder; later writes (a job finishing as the server stops) do
        nothing."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._db.close()
        self._lock_file.close()  # releases the flock

    # -- writing ---------------------------------------------------------------------------------------------

    def create(self, *, model: str, size: str, frames: int, fps: int, seed: int, max_active: int) -> dict:
        """A new ``queued`` job; ``JobLimit`` when ``max_active`` jobs are queued or running already."""
        job = dict(id=f"video_{uuid.uuid4().hex}", status="queued", progress=0, created_at=time.time(), model=model,
                   size=size, frames=frames, fps=fps, seed=seed)
        with self._lock:
            active = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'in_progress')")
            count = active.fetchone()[0]
            if count >= max_active:
                raise JobLimit(f"{count} video jobs are queued or running (at most {max_active})")
            self._db.execute(f"INSERT INTO jobs ({', '.join(job)}) VALUES ({', '.join('?' * len(job))})",
                             tuple(job.values()))
        return self.get(job["id"])

    def start(self, job_id: str) -> bool:
        """Mark a queued job ``in_progress``; False if it is gone (deleted while queued)."""
        return self._update(job_id, "status = 'queued'", status="in_progress", started_at=time.time())

    def set_progress(self, job_id: str, progress: int) -> bool:
        return self._update(job_id, "status = 'in_progress'", progress=progress)

    def complete(self, job_id: str, file: str, ttl: float) -> bool:
        """Mark a running job ``completed`` with its file's name; False if it is gone (deleted while it ran)."""
        now = time.time()
        return self._update(job_id, "status = 'in_progress'", status="completed", progress=100, file=file,
                            completed_at=now, expires_at=now + ttl)

    def fail(self, job_id: str, code: str, message: str, ttl: float) -> bool:
        now = time.time()
        return self._update(job_id, "status IN ('queued', 'in_progress')", status="failed", error_code=code,
                            error_message=message, completed_at=now, expires_at=now + ttl)

    def fail_unfinished(self, code: str, message: str, ttl: float, statuses=("queued", "in_progress")) -> list[str]:
        """Mark every job in ``statuses`` failed with ``message`` (a restart: what the last process left
        unfinished); their ids."""
        now = time.time()
        marks = ", ".join("?" * len(statuses))
        with self._lock:
            ids = [row[0] for row in self._db.execute(f"SELECT id FROM jobs WHERE status IN ({marks})", statuses)]
            self._db.execute(f"UPDATE jobs SET status = 'failed', error_code = ?, error_message = ?, completed_at = ?, "
                             f"expires_at = ? WHERE status IN ({marks})", (code, message, now, now + ttl, *statuses))
        return ids

    def delete(self, job_id: str) -> dict | None:
        """Remove a job's row; the row it had (its ``file`` is the caller's to remove), or None."""
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return _as_job(row)

    def expire(self, now: float | None = None) -> list[dict]:
        """Remove the finished jobs whose time is up; the rows removed (their files are the caller's to remove)."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs WHERE expires_at <= ?", (now,)).fetchall()
            self._db.execute("DELETE FROM jobs WHERE expires_at <= ?", (now,))
        return [_as_job(row) for row in rows]

    def _update(self, job_id: str, condition: str, **values) -> bool:
        assignments = ", ".join(f"{name} = ?" for name in values)
        with self._lock:
            if self.closed:
                return False
            cursor = self._db.execute(f"UPDATE jobs SET {assignments} WHERE id = ? AND {condition}",
                                      (*values.values(), job_id))
        return cursor.rowcount == 1

    # -- reading ---------------------------------------------------------------------------------------------

    def get(self, job_id: str) -> dict | None:
        with self._lock:
            return _as_job(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def page(self, limit: int, after: str | None = None, order: str = "desc") -> tuple[list[dict], bool]:
        """Up to ``limit`` jobs in order of creation (``asc`` or ``desc``), after the job ``after``; and whether more
        follow. ``KeyError`` if ``after`` is not a job."""
        newer = order == "asc"
        with self._lock:
            bound = None
            if after is not None:
                row = self._db.execute("SELECT seq FROM jobs WHERE id = ?", (after,)).fetchone()
                if row is None:
                    raise KeyError(after)
                bound = row[0]
            where = "" if bound is None else f"WHERE seq {'>' if newer else '<'} ?"
            rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY seq {'ASC' if newer else 'DESC'} LIMIT ?",
                                    (*(() if bound is None else (bound,)), limit + 1)).fetchall()
        return [_as_job(row) for row in rows[:limit]], len(rows) > limit

    def counts(self) -> dict[str, int]:
        """Jobs held, by status (every status, 0 included)."""
        with self._lock:
            rows = self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        return dict(dict.fromkeys(STATUSES, 0), **{status: count for status, count in rows})

    def files(self) -> set[str]:
        """The file names of the completed jobs (anything else in the folder is left over)."""
        with self._lock:
            return {row[0] for row in self._db.execute("SELECT file FROM jobs WHERE file IS NOT NULL")}


def _as_job(row: sqlite3.Row | None) -> dict | None:
    return None if row is None else {name: row[name] for name in _COLUMNS}
