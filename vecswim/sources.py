"""Sources: where events come from.

Contract: ``poll(max_events, timeout) -> {agent_type: RecordBatch} | None``. A poll returns
once ``max_events`` events are available or ``timeout`` seconds passed (possibly with no
events: an empty dict), and ``None`` when the source is exhausted. Batches are columnar: the
agent type's key column plus event fields; no per-event Python objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.json as pajson
import pyarrow.parquet as pq

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


class FileSource:
    """Replays events for one agent type from a Parquet, Arrow IPC (file or stream) or NDJSON
    file, ``max_events`` at a time, as fast as the engine takes them."""

    def __init__(self, path: str | Path, agent_type: str) -> None:
        self.path = Path(path)
        self.agent_type = agent_type
        self.table = _read(self.path)
        self.pos = 0

    def poll(self, max_events: int, timeout: float) -> Batches | None:
        if self.pos >= self.table.num_rows:
            return None
        part = self.table.slice(self.pos, max_events)
        self.pos += part.num_rows
        return {self.agent_type: part}


def _read(path: Path) -> pa.Table:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path)
    if suffix in (".ndjson", ".jsonl", ".json"):
        return pajson.read_json(path)
    if suffix in (".arrow", ".ipc", ".feather", ".arrows"):
        with open(path, "rb") as fh:
            head = fh.read(6)
        if head == b"ARROW1":
            return ipc.open_file(path).read_all()
        return ipc.open_stream(path).read_all()
    raise ValueError(f"{path}: unknown event file type {suffix!r} (parquet, arrow, ndjson)")
