"""The tick journal: what each tick since the last checkpoint consumed, durable before that
tick's output leaves the engine.

Why: emissions and dead letters that a killed run sent after its last checkpoint must be sent
again *identically* by the restored run, so that a broker (Pulsar deduplication by producer
name and sequence id) or a file sink (truncated to the checkpoint) can drop the repeats. A
tick's output is a function of the state before it and of exactly which input it consumed;
the state comes from the checkpoint, and the journal says which input: one record per tick
that consumed any, written and fsynced after the poll, in the background while the tick
computes, and durable before the tick's first emission leaves (``Engine.run``). A restored
engine replays the records after its checkpoint with the same tick ids and the same
boundaries, then goes on live.

Layout: ``DIR/journal/ticks-<base>.log``, one segment per checkpoint, holding the records of
ticks after checkpoint ``base``. A record is one line ``<json>\\t<crc32 hex>\\n``; a torn or
corrupt last line (kill -9 mid-write) is cut off when the journal is opened: its tick's
output never left, since output waits for the record to be durable.

Cost: one ``open`` + ``write`` + ``fdatasync`` of ~100 bytes per tick with input, none per
event, overlapped with the tick (``python -m bench.exactly_once_bench``).
"""

from __future__ import annotations

import contextlib
import json
import os
import zlib
from pathlib import Path


class JournalError(Exception):
    """The journal cannot be read; the message says which file and why."""


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a created, renamed or removed file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _frame(record: dict) -> bytes:
    body = json.dumps(record, separators=(",", ":"))
    return f"{body}\t{zlib.crc32(body.encode()):08x}\n".encode()


def _parse(line: bytes) -> dict | None:
    """The record of one complete line, None if it is torn or corrupt."""
    body, sep, crc = line.rstrip(b"\n").rpartition(b"\t")
    if not sep or not line.endswith(b"\n"):
        return None
    try:
        if int(crc, 16) != zlib.crc32(body):
            return None
        return json.loads(body)
    except ValueError:
        return None


class TickJournal:
    """Append-only records ``{"tick": t, "input": <source boundary>}`` under ``directory``.

    ``open(after)`` returns the records of ticks after checkpoint tick ``after`` to replay,
    and positions appends after them. An empty start (``after`` 0) also finds the *start
    record* (tick 0, ``start``) an earlier empty start wrote: where its output began (sink
    states, the dead-letter sequence), since no checkpoint holds that. ``append`` is durable
    when it returns (``fdatasync``); an ``OSError`` (disk full, read-only) propagates and
    nothing is written. ``rotate(tick)`` starts the segment of a checkpoint at ``tick``;
    ``prune(oldest)`` removes segments that no kept checkpoint needs.
    """

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory) / "journal"
        self._path: Path | None = None
        self._base: int | None = None
        self.appended = 0
        self.start: dict | None = None  # the start record of an empty start (tick 0)

    def _segments(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = []
        for p in self.dir.glob("ticks-*.log"):
            try:
                found.append((int(p.stem.removeprefix("ticks-")), p))
            except ValueError:
                continue
        return sorted(found)

    def open(self, after: int) -> list[dict]:
        """The records of ticks after ``after`` (the restored checkpoint's tick, 0 for an
        empty start), in tick order; later appends go after them. A torn last line is cut
        off; a corrupt line elsewhere raises :class:`JournalError`."""
        self.dir.mkdir(parents=True, exist_ok=True)
        segs = [(b, p) for b, p in self._segments() if b >= after]
        records: list[dict] = []
        for i, (_, path) in enumerate(segs):
            data = path.read_bytes()
            good = 0
            for line in data.splitlines(keepends=True):
                rec = _parse(line)
                if rec is None:
                    if i == len(segs) - 1 and good + len(line) == len(data):
                        break  # torn by a kill mid-write: that tick's output never left
                    raise JournalError(f"{path}: corrupt record at byte {good}")
                good += len(line)
                if rec["tick"] == 0 and after == 0:
                    self.start = rec
                elif rec["tick"] > after and (not records or rec["tick"] > records[-1]["tick"]):
                    records.append(rec)
            if good < len(data):
                with open(path, "r+b") as fh:
                    fh.truncate(good)
                    os.fsync(fh.fileno())
        # Segments before ``after`` belong to older checkpoints; appends go to the newest
        # segment at or after it (or a new one based at ``after``).
        base = segs[-1][0] if segs else after
        self._switch(base)
        return records

    def _switch(self, base: int) -> None:
        path = self.dir / f"ticks-{base:012d}.log"
        if not path.exists():
            path.touch()
            fsync_dir(self.dir)
        self._path = path
        self._base = base

    def append(self, tick: int, boundary: dict | None, **extra) -> None:
        """Make ``{"tick": tick, "input": boundary, **extra}`` durable (write + fdatasync).
        The segment is opened for each append (a few microseconds) so that no file stays
        open for writing between ticks: a filesystem can be remounted read-only."""
        if self._path is None:
            raise JournalError("the journal is not open")
        rec = _frame({"tick": tick, "input": boundary, **extra})
        with open(self._path, "ab") as fh:
            pos = fh.tell()
            try:
                fh.write(rec)
                fh.flush()
                os.fdatasync(fh.fileno())
            except OSError:
                # leave no partial record behind for the next append to follow
                with contextlib.suppress(OSError):
                    fh.truncate(pos)
                raise
        self.appended += 1

    def rotate(self, tick: int) -> None:
        """Start the segment of the checkpoint captured at ``tick`` (later ticks go there)."""
        if self._base != tick:
            self._switch(tick)

    def prune(self, oldest: int) -> None:
        """Remove segments of checkpoints older than ``oldest`` (the oldest one kept)."""
        for base, path in self._segments():
            if base < oldest and base != self._base:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self._path = None
