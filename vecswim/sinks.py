"""Sinks: where emissions go.

Contract: the engine calls ``write(tick, agent_type, batch)`` once per agent type per tick that
emitted anything; ``batch`` holds the key, ``tick`` and the emitted columns of the changed rows
(never unchanged ones). ``flush()`` is called at the end of every tick, before the source
acknowledges the tick's input, and makes everything written so far durable where the sink can.
``close()`` flushes and is idempotent. A sink that raises stops the run: sink errors are
surfaced, never swallowed.

Exactly-once in effect across kill -9 and restart (with checkpoints and the tick journal,
``vecswim.journal``: a restored engine emits the ticks after its checkpoint again, with the
same tick ids and the same rows). A sink that can undo or drop what it received after a
checkpoint takes part with a ``name`` (unique, stable across runs) and:
``snapshot() -> dict`` at the checkpoint's tick boundary (engine thread, after ``flush``);
``sync()`` from the checkpoint writer thread, before the checkpoint becomes durable: make
everything up to the snapshot durable; ``resume(tick, state)`` on the restored engine, before
the first tick: drop what was written after checkpoint ``tick`` (``state`` is that
checkpoint's snapshot, None if the sink was not in it). NDJSON files are truncated to the
checkpoint, Parquet files are written in parts committed at checkpoints, Pulsar topics drop
repeats by sequence id (``vecswim.pulsar_io.PulsarSink``). Other sinks (stdout, callbacks,
memory) see the replayed ticks again: identical rows with the same tick ids, so dropping
repeats by (tick, agent type, key) is safe.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from vecswim.journal import fsync_dir


class Sink(Protocol):
    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class CallbackSink:
    """Calls ``fn(tick, agent_type, batch)`` for every emission."""

    def __init__(self, fn: Callable[[int, str, pa.RecordBatch], None]) -> None:
        self.fn = fn

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self.fn(tick, agent_type, batch)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class MemorySink:
    """Keeps every emission in memory (tests, notebooks): ``batches[agent_type]``."""

    def __init__(self) -> None:
        self.batches: dict[str, list[pa.RecordBatch]] = {}

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self.batches.setdefault(agent_type, []).append(batch)

    def table(self, agent_type: str) -> pa.Table | None:
        """All emissions of one agent type, in tick order (None if it never emitted)."""
        b = self.batches.get(agent_type)
        return pa.Table.from_batches(b) if b else None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class ParquetSink:
    """Writes each agent type's emissions to its own Parquet dataset (a folder of parts).

    ``path="out.parquet"`` writes ``out.engine.parquet/``, ``out.fleet.parquet/``, ... (agent
    types have different columns, so they cannot share one file); ``paths`` lists them. Each
    folder holds ``part-<first tick>-<last tick>.parquet`` files, read as one table by
    ``pyarrow.parquet.read_table(folder)``, ``polars.read_parquet(folder)`` or DuckDB's
    ``read_parquet('folder/*.parquet')``. A part is written as ``.tmp`` and gets its name once
    complete: at every checkpoint (so a checkpoint never covers a half-written file) and at
    ``close``. After kill -9 a restored run removes the ``.tmp`` parts and the parts after its
    checkpoint, then writes those ticks again: no torn or repeated rows.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.name = f"parquet:{self.path.resolve()}"
        self.writers: dict[str, tuple[pq.ParquetWriter, Path, int, int]] = {}
        self.paths: dict[str, Path] = {}
        self._closed: list[tuple[Path, Path]] = []  # parts complete but not yet named
        self._resumed = False

    def folder(self, agent_type: str) -> Path:
        return self.path.with_name(f"{self.path.stem}.{agent_type}{self.path.suffix or '.parquet'}")

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        entry = self.writers.get(agent_type)
        if entry is None:
            d = self.folder(agent_type)
            if agent_type not in self.paths and not self._resumed and d.is_dir():
                for old in d.glob("part-*.parquet*"):  # a new run starts a new dataset
                    old.unlink()
            self.paths[agent_type] = d
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f"part-{tick:012d}.parquet.tmp"
            entry = (pq.ParquetWriter(tmp, batch.schema), tmp, tick, tick)
        w, tmp, first, _ = entry
        w.write_batch(batch)
        self.writers[agent_type] = (w, tmp, first, tick)

    def flush(self) -> None:
        """Parquet rows become readable when their part is complete (checkpoint or close)."""

    def _finish(self) -> None:
        for w, tmp, first, last in self.writers.values():
            w.close()
            self._closed.append((tmp, tmp.with_name(f"part-{first:012d}-{last:012d}.parquet")))
        self.writers.clear()

    def snapshot(self) -> dict:
        self._finish()
        return {}

    def sync(self) -> None:
        closed, self._closed = self._closed, []
        for tmp, final in closed:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(tmp, final)
            fsync_dir(final.parent)

    def resume(self, tick: int, state: dict | None) -> None:
        """Remove the parts after checkpoint ``tick`` and unfinished ones; keep the rest."""
        self._resumed = True
        for d in self.path.parent.glob(f"{self.path.stem}.*{self.path.suffix or '.parquet'}"):
            if not d.is_dir():
                continue
            for part in d.glob("part-*.parquet*"):
                first = part.name.removeprefix("part-")[:12]
                if part.name.endswith(".tmp") or (first.isdigit() and int(first) > tick):
                    part.unlink()

    def close(self) -> None:
        self._finish()
        self.sync()


class NDJSONSink:
    """Writes emissions as newline-delimited JSON, one object per changed row with an
    ``agent_type`` field; ``path="-"`` writes to stdout. Encoded in bulk by polars.

    A file (not stdout) takes part in checkpoints: ``snapshot`` records its length at the
    checkpoint, ``sync`` fsyncs it, and a restored run truncates the file to that length
    before it writes the ticks after the checkpoint again (a torn last line goes too).

    When the reader of a pipe goes away (``... --emit - | head``) ``write``/``flush`` raise
    ``BrokenPipeError`` (which stops the run) and ``close`` no longer touches the pipe."""

    def __init__(self, path: str | Path = "-") -> None:
        self.path = path
        self.name = None if path == "-" else f"ndjson:{Path(path).resolve()}"
        self._fh: IO[bytes] | None = None
        self._broken = False
        self._start: int | None = None  # resume: the length to truncate to

    def _file(self) -> IO[bytes]:
        if self._fh is None:
            if self.path == "-":
                self._fh = sys.stdout.buffer
            elif self._start is None:
                self._fh = open(self.path, "wb")  # noqa: SIM115
            else:
                self._fh = open(self.path, "r+b")  # noqa: SIM115
                self._fh.truncate(self._start)
                self._fh.seek(self._start)
        return self._fh

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        df = pl.from_arrow(batch).with_columns(pl.lit(agent_type).alias("agent_type"))
        with self._pipe():
            df.write_ndjson(self._file())

    def flush(self) -> None:
        if self._fh is not None:
            with self._pipe():
                self._fh.flush()

    def snapshot(self) -> dict:
        fh = self._file()
        fh.flush()
        return {"bytes": fh.tell()}

    def sync(self) -> None:
        if self._fh is not None and not self._fh.closed:
            os.fsync(self._fh.fileno())

    def resume(self, tick: int, state: dict | None) -> None:
        """Truncate the file to its length at checkpoint ``tick`` (``state``); a file that
        is shorter than that was changed outside vecswim: ``ValueError``. Without a state the
        file is started anew, as on a first run."""
        if state is None or self.path == "-":
            return
        size = Path(self.path).stat().st_size if Path(self.path).exists() else None
        if size is None or size < state["bytes"]:
            raise ValueError(
                f"{self.path} holds {size or 0:,} bytes but the checkpoint at tick {tick:,} "
                f"recorded {state['bytes']:,}: it was changed outside vecswim; move it away "
                "(and the checkpoints) to start anew"
            )
        self._start = int(state["bytes"])
        self._file()

    def close(self) -> None:
        if self._fh is not None:
            with contextlib.suppress(BrokenPipeError):
                if not self._broken:
                    self.flush()
            if self._fh is not sys.stdout.buffer:
                self._fh.close()
            self._fh = None

    @contextlib.contextmanager
    def _pipe(self):
        """A closed pipe as ``BrokenPipeError`` (polars reports it as a plain OSError)."""
        if self._broken:
            raise BrokenPipeError(errno.EPIPE, f"{self.path}: the reader closed the pipe")
        try:
            yield
        except OSError as e:
            if isinstance(e, BrokenPipeError) or "Broken pipe" in str(e):
                self._broken = True
                raise BrokenPipeError(
                    errno.EPIPE, f"{self.path}: the reader closed the pipe"
                ) from e
            raise


class RecentEmissions:
    """The most recent emitted rows of each agent type, at most ``keep_rows`` per type (for
    the ``emissions`` SQL tables). Keeps references to the emitted batches: O(1) per batch."""

    def __init__(self, keep_rows: int = 100_000) -> None:
        self.keep_rows = keep_rows
        self._batches: dict[str, deque[pa.RecordBatch]] = {}
        self._rows: dict[str, int] = {}
        self._schemas: dict[str, pa.Schema] = {}

    def declare(self, agent_type: str, schema: pa.Schema) -> None:
        """Make ``agent_type``'s table exist (empty) before its first emission."""
        self._batches.setdefault(agent_type, deque())
        self._rows.setdefault(agent_type, 0)
        self._schemas[agent_type] = schema

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        q = self._batches.setdefault(agent_type, deque())
        self._schemas[agent_type] = batch.schema
        q.append(batch)
        self._rows[agent_type] = self._rows.get(agent_type, 0) + batch.num_rows
        while self._rows[agent_type] - q[0].num_rows >= self.keep_rows:
            self._rows[agent_type] -= q.popleft().num_rows

    def snapshot(self) -> dict[str, tuple[list[pa.RecordBatch], pa.Schema]]:
        """The current batches per agent type (a cheap copy of the lists, for snapshots)."""
        return {at: (list(q), self._schemas[at]) for at, q in self._batches.items()}

    def tables(self) -> dict[str, pa.Table]:
        """Agent type -> its recent emissions (oldest first)."""
        return {
            at: pa.Table.from_batches(list(q), schema=self._schemas[at])
            for at, q in self._batches.items()
        }
