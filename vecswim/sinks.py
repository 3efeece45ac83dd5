"""Sinks: where emissions go.

Contract: the engine calls ``write(tick, agent_type, batch)`` once per agent type per tick that
emitted anything; ``batch`` holds the key, ``tick`` and the emitted columns of the changed rows
(never unchanged ones). ``flush()`` is called at the end of every tick, before the source
acknowledges the tick's input, and makes everything written so far durable where the sink can
(emissions are at-least-once). ``close()`` flushes and is idempotent. A sink that raises
stops the run: sink errors are surfaced, never swallowed.
"""

from __future__ import annotations

import contextlib
import errno
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Protocol

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq


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
    """Writes each agent type's emissions to its own Parquet file.

    ``path="out.parquet"`` writes ``out.engine.parquet``, ``out.fleet.parquet``, ... (agent
    types have different columns, so they cannot share one file). ``paths`` lists them.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.writers: dict[str, pq.ParquetWriter] = {}
        self.paths: dict[str, Path] = {}

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        w = self.writers.get(agent_type)
        if w is None:
            p = self.path.with_name(
                f"{self.path.stem}.{agent_type}{self.path.suffix or '.parquet'}"
            )
            w = self.writers[agent_type] = pq.ParquetWriter(p, batch.schema)
            self.paths[agent_type] = p
        w.write_batch(batch)

    def flush(self) -> None:
        """Parquet row groups become durable only when the file is closed."""

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class NDJSONSink:
    """Writes emissions as newline-delimited JSON, one object per changed row with an
    ``agent_type`` field; ``path="-"`` writes to stdout. Encoded in bulk by polars.

    When the reader of a pipe goes away (``... --emit - | head``) ``write``/``flush`` raise
    ``BrokenPipeError`` (which stops the run) and ``close`` no longer touches the pipe."""

    def __init__(self, path: str | Path = "-") -> None:
        self.path = path
        self._fh: IO[bytes] | None = None
        self._broken = False

    def _file(self) -> IO[bytes]:
        if self._fh is None:
            self._fh = sys.stdout.buffer if self.path == "-" else open(self.path, "wb")  # noqa: SIM115
        return self._fh

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        df = pl.from_arrow(batch).with_columns(pl.lit(agent_type).alias("agent_type"))
        with self._pipe():
            df.write_ndjson(self._file())

    def flush(self) -> None:
        if self._fh is not None:
            with self._pipe():
                self._fh.flush()

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
