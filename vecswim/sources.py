"""Sources: where events come from.

Contract: ``poll(max_events, timeout) -> {agent_type: RecordBatch} | None``. A poll returns
once ``max_events`` events are available or ``timeout`` seconds passed (possibly with no
events: an empty dict), and ``None`` when the source is exhausted. Batches are columnar: the
agent type's key column plus event fields; no per-event Python objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from vecswim.kernels import text as ktext

Batches = dict[str, pa.RecordBatch]


class ListSource:
    """Replays a prepared sequence of ticks' events, one element per poll (tests, benches)."""

    def __init__(self, ticks: Iterable[Batches]) -> None:
        self._it: Iterator[Batches] = iter(ticks)

    def poll(self, max_events: int, timeout: float) -> Batches | None:
        return next(self._it, None)


class GeneratorSource:
    """Events from a scenario generator, paced at ``rate`` events/s (0 = as fast as the engine
    takes them), for at most ``total`` events (None = endless).

    ``make(n)`` must return ``{agent_type: RecordBatch}`` with ``n`` events; it is called once
    per poll, so generation is vectorized. Pacing follows a virtual clock: a poll returns the
    events due by now, waiting up to ``timeout`` for ``max_events`` to become due; if the engine
    falls behind, polls return ``max_events`` until it has caught up (no unbounded backlog is
    materialized: events are generated when polled).
    """

    def __init__(
        self, make: Callable[[int], Batches], rate: float = 0.0, total: int | None = None
    ) -> None:
        self.make = make
        self.rate = float(rate)
        self.total = total
        self.produced = 0
        self._start: float | None = None

    def poll(self, max_events: int, timeout: float) -> Batches | None:
        if self.total is not None and self.produced >= self.total:
            return None
        cap = max_events if self.total is None else min(max_events, self.total - self.produced)
        if self.rate > 0:
            now = time.perf_counter()
            if self._start is None:
                self._start = now
            due_at_full = self._start + (self.produced + cap) / self.rate
            wake = min(due_at_full, now + timeout)
            if wake > now:
                time.sleep(wake - now)
            due = int((time.perf_counter() - self._start) * self.rate) - self.produced
            cap = max(0, min(cap, due))
        if cap == 0:
            return {}
        self.produced += cap
        return self.make(cap)


FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".arrows": "arrow",
    ".ipc": "arrow",
    ".feather": "arrow",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".json": "ndjson",
}


def file_format(path: str | Path, fmt: str | None = None) -> str:
    """ "parquet", "arrow" (IPC file or stream) or "ndjson": ``fmt`` ("json" = "ndjson") or
    by the suffix of ``path``."""
    if fmt is not None:
        fmt = {"json": "ndjson", "ipc": "arrow"}.get(fmt, fmt)
        if fmt not in ("parquet", "arrow", "ndjson"):
            raise ValueError(f"unknown event file format {fmt!r} (parquet, arrow, ndjson)")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown event file type {suffix!r} (parquet, arrow, ndjson)")
    return FORMATS[suffix]


class FileSource:
    """Replays events for one agent type from Parquet, Arrow IPC (file or stream) or NDJSON
    files, in order, ``max_events`` at a time, as fast as the engine takes them; exhausted
    after the last file.

    Files stream in bounded chunks and never sit in memory whole: Parquet by record batches
    of its row groups, Arrow IPC by record batches (memory-mapped, zero-copy), NDJSON by byte
    blocks of up to ``chunk_bytes`` split at newlines. Polls yield the data as it is (typed
    columns; for NDJSON a raw JSON batch of lines, see ``vecswim.decode.RAW_JSON``) and the
    engine decodes it against the agent type's schema (``vecswim.decode``): bad lines or
    values become dead letters with a reason, good rows of the same chunk are applied. An
    NDJSON line longer than ``chunk_bytes`` is dead-lettered (its first bytes kept) and
    skipped; whitespace-only lines are skipped; a truncated last line is a dead letter. A
    Parquet/IPC file that turns out corrupt mid-way yields one dead letter and the replay goes
    on with the next file.

    ``fmt``: "parquet", "arrow", "ndjson" for every file (default: by suffix). ``columns``:
    read only these columns where the format allows (Parquet). ``resume``: the
    ``positions()`` stored in a checkpoint: the replay continues right after what that
    checkpoint covers (the same files must be given).
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        agent_type: str,
        fmt: str | None = None,
        chunk_bytes: int = 16 << 20,
        columns: Sequence[str] | None = None,
        resume: dict | None = None,
    ) -> None:
        if isinstance(paths, str | Path):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise ValueError("no files to replay")
        self.formats = [file_format(p, fmt) for p in self.paths]
        for p in self.paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p}: no such file")
        self.agent_type = agent_type
        self.chunk_bytes = int(chunk_bytes)
        self.columns = list(columns) if columns is not None else None
        self.index = 0
        self.events = 0  # rows / lines polled so far
        start = 0
        if resume and "files" in resume:
            names = [str(p.resolve()) for p in self.paths]
            if resume["files"] != names:
                raise ValueError(
                    f"the checkpoint was taken replaying {resume['files']}, not {names}"
                )
            self.index = int(resume["file"])
            start = int(resume["position"])
            self.events = int(resume.get("events", 0))
        self._reader = None
        self._rows = 0  # rows of the last poll
        if self.index < len(self.paths):
            self._reader = self._open(self.index, start)
        if "ndjson" in self.formats:
            from vecswim import decode

            decode.warm_up()

    @property
    def path(self) -> Path:
        """The file being replayed."""
        return self.paths[min(self.index, len(self.paths) - 1)]

    def _open(self, i: int, start: int):
        fmt = self.formats[i]
        if fmt == "ndjson":
            return _NDJSONReader(self.paths[i], start, self.chunk_bytes)
        return _ArrowReader(self.paths[i], fmt, start, self.columns, self.chunk_bytes)

    replayable = True

    def _read(self, max_events: int) -> pa.Table | pa.RecordBatch | None:
        while self._reader is not None:
            got = self._reader.read(max_events)
            if got is not None:
                self.events += got.num_rows
                return got
            self._reader.close()
            self.index += 1
            self._reader = self._open(self.index, 0) if self.index < len(self.paths) else None
        return None

    def poll(self, max_events: int, timeout: float) -> Batches | None:
        got = self._read(max_events)
        self._rows = 0 if got is None else got.num_rows
        return None if got is None else {self.agent_type: got}

    def boundary(self) -> dict | None:
        """What the last ``poll`` read (rows, or NDJSON lines), for the tick journal."""
        return {"rows": self._rows} if self._rows else None

    def replay(self, boundary: dict, timeout: float) -> Batches:
        """Read exactly the rows a tick read before a restart (its ``boundary()``). Chunks
        fall differently after a resume, so this may take several reads. Raises ``ValueError``
        if the files end first (they changed since)."""
        need = int(boundary["rows"])
        parts = []
        while need > 0:
            got = self._read(need)
            if got is None:
                raise ValueError(
                    f"the replayed files end {need:,} rows before a tick the journal recorded: "
                    "they changed since the checkpoint"
                )
            parts.append(got if isinstance(got, pa.Table) else pa.Table.from_batches([got]))
            need -= got.num_rows
        self._rows = int(boundary["rows"])
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")
        return {self.agent_type: table}

    def positions(self) -> dict:
        """Where the replay stands (for checkpoints): the files, the current one and the
        position in it right after what was polled (NDJSON: byte offset of the next line;
        Parquet/Arrow: next row)."""
        pos = self._reader.position if self._reader is not None else 0
        return {
            "files": [str(p.resolve()) for p in self.paths],
            "file": self.index,
            "position": pos,
            "events": self.events,
        }

    def mark(self) -> int:
        return self.events

    def commit(self, token: int | None = None) -> None:
        """Nothing to acknowledge: a file is re-read from the checkpoint's positions."""

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


class _NDJSONReader:
    """Lines of an NDJSON file as raw JSON batches: at most ``max_lines`` lines and about
    ``chunk_bytes`` per read. Keeps one block (plus the unread rest of the previous one)."""

    def __init__(self, path: Path, offset: int, chunk_bytes: int) -> None:
        self.fh = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.fh.seek(offset)
        self.chunk = chunk_bytes
        self.base = offset  # file offset of data[0]
        self.data = b""
        self.pos = 0  # consumed bytes of data
        self.nls = np.zeros(0, np.int64)  # newline positions in data at or after pos
        self.k = 0
        self.eof = False

    @property
    def position(self) -> int:
        return self.base + self.pos

    def _fill(self) -> None:
        rest = self.data[self.pos :]
        more = self.fh.read(self.chunk)
        if not more:
            self.eof = True
        nls = np.empty(more.count(b"\n"), np.int64)
        ktext.newlines(np.frombuffer(more, np.uint8), nls)
        nls += len(rest)
        self.nls = np.concatenate([self.nls[self.k :] - self.pos, nls])
        self.k = 0
        self.base += self.pos
        self.data = rest + more
        self.pos = 0

    def read(self, max_lines: int) -> pa.RecordBatch | None:
        from vecswim import decode

        while True:
            avail = len(self.nls) - self.k
            if avail >= max_lines or self.eof:
                break
            if len(self.data) - self.pos > self.chunk:
                if avail:
                    break
                return self._long_line()
            self._fill()
        take = min(avail, max_lines)
        ends = self.nls[self.k : self.k + take] + 1
        last = int(ends[-1]) if take else self.pos
        if take < max_lines and self.eof and last < len(self.data):
            ends = np.append(ends, len(self.data))  # a last line without a newline
        if not len(ends):
            return None
        offsets = np.concatenate([[self.pos], ends]).astype(np.int64)
        self.k += take
        self.pos = int(ends[-1])
        extra = {"__offset": pa.array(offsets[:-1] + self.base)}
        newline = np.frombuffer(self.data, np.uint8)[offsets[1:] - 1] == 10
        long = np.diff(offsets) - newline > self.chunk
        if long.any():  # a line longer than a chunk that happened to be read whole
            reason = f"line longer than {self.chunk} bytes"
            extra[decode.RAW_ERROR] = pa.array(np.where(long, reason, None), pa.string())
        return decode.json_batch(self.data, offsets, extra)

    def _long_line(self) -> pa.RecordBatch:
        """The next line does not fit in a chunk: keep its head, skip to its end."""
        from vecswim import decode

        start = self.position
        keep = decode.DEAD_TEXT_BYTES
        head = self.data[self.pos : self.pos + keep]  # no newline after pos
        self.base = start + len(self.data) - self.pos
        self.data, self.pos, self.nls, self.k = b"", 0, np.zeros(0, np.int64), 0
        while True:
            block = self.fh.read(self.chunk)
            if not block:
                self.eof = True
                break
            nl = block.find(b"\n")
            if len(head) < keep:
                head += block[: min(keep - len(head), nl if nl >= 0 else len(block))]
            if nl >= 0:
                self.base += nl + 1
                self.fh.seek(self.base)
                break
            self.base += len(block)
        return decode.json_batch(
            head,
            np.array([0, len(head)], np.int64),
            {
                "__offset": pa.array([start], pa.int64()),
                decode.RAW_ERROR: pa.array([f"line longer than {self.chunk} bytes"]),
            },
        )

    def close(self) -> None:
        self.fh.close()


class _ArrowReader:
    """Rows of a Parquet or Arrow IPC file from row ``start``: at most ``max_rows`` and about
    ``chunk_bytes`` per read. Parquet reads record batches of its row groups (buffered, never
    a whole row group or file); Arrow IPC is memory-mapped and read zero-copy, batch by
    batch."""

    BATCH_ROWS = 65_536

    def __init__(
        self, path: Path, fmt: str, start: int, columns: list[str] | None, chunk_bytes: int
    ) -> None:
        self.path = path
        self.chunk = chunk_bytes
        self.position = start
        self._pending: pa.RecordBatch | None = None
        self._closers: list = []
        self._failed = False
        try:
            self._it = self._batches(fmt, start, columns)
        except (pa.ArrowException, OSError) as e:
            self._it = iter(())
            self._error = f"{path}: {_first_line(e)}"
        else:
            self._error = None

    def _batches(self, fmt: str, start: int, columns: list[str] | None) -> Iterator:
        skip = start
        if fmt == "parquet":
            pf = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
            self._closers.append(pf)
            meta = pf.metadata
            first = 0
            while first < meta.num_row_groups and skip >= meta.row_group(first).num_rows:
                skip -= meta.row_group(first).num_rows
                first += 1
            names = None
            if columns is not None:
                have = set(pf.schema_arrow.names)
                names = [c for c in columns if c in have]
            it = pf.iter_batches(
                batch_size=self.BATCH_ROWS,
                row_groups=range(first, meta.num_row_groups),
                columns=names,
                use_threads=False,
            )
        else:
            mm = pa.memory_map(str(self.path))
            self._closers.append(mm)
            if mm.read(6) == b"ARROW1":
                mm.seek(0)
                reader = ipc.open_file(mm)
                it = (reader.get_batch(i) for i in range(reader.num_record_batches))
            else:
                mm.seek(0)
                it = iter(ipc.open_stream(mm))
        return _skip_rows(it, skip)

    def read(self, max_rows: int) -> pa.Table | pa.RecordBatch | None:
        if self._error is not None and not self._failed:
            self._failed = True
            return _error_batch(self._error, self.position)
        parts = []
        got = size = 0
        while got < max_rows and size < self.chunk:
            if self._pending is None:
                try:
                    self._pending = next(self._it, None)
                except (pa.ArrowException, OSError) as e:
                    self._it = iter(())
                    if parts:
                        break
                    self._failed = True
                    return _error_batch(f"{self.path}: {_first_line(e)}", self.position)
                if self._pending is None:
                    break
                if self._pending.num_rows == 0:
                    self._pending = None
                    continue
            p = self._pending
            fit = (self.chunk - size) * p.num_rows // max(p.nbytes, 1)  # rows within budget
            take = min(max_rows - got, p.num_rows, max(fit, 1))
            parts.append(p.slice(0, take))
            size += parts[-1].nbytes
            rest = self._pending.num_rows - take
            self._pending = self._pending.slice(take) if rest else None
            got += take
        if not parts:
            return None
        self.position += got
        return parts[0] if len(parts) == 1 else pa.Table.from_batches(parts)

    def close(self) -> None:
        for c in self._closers:
            c.close()
        self._closers = []


def _skip_rows(it: Iterator[pa.RecordBatch], skip: int) -> Iterator[pa.RecordBatch]:
    for b in it:
        if skip >= b.num_rows:
            skip -= b.num_rows
            continue
        yield b.slice(skip) if skip else b
        skip = 0


def _error_batch(reason: str, position: int) -> pa.RecordBatch:
    """A one-row raw batch the engine dead-letters with ``reason`` (a file that cannot be
    read any further)."""
    from vecswim import decode

    return decode.json_batch(
        b"",
        np.zeros(2, np.int64),
        {"__offset": pa.array([position], pa.int64()), decode.RAW_ERROR: pa.array([reason])},
    )


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
