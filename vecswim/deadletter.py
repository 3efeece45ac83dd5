"""Event validation and the dead-letter sink.

Bad input never stops a tick: rows that cannot be applied leave the batch with a reason and
are handed to the dead letters, where they are counted, kept (bounded) and forwarded to any
dead-letter sinks. Validation is the decoder's (``vecswim.decode``): vectorized, per row.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping

import pyarrow as pa
import pyarrow.compute as pc

from vecswim import decode
from vecswim.schema import AgentType

DeadLetterSink = Callable[[int, str, pa.RecordBatch], None]


class DeadLetters:
    """Counts rejected events by reason, keeps the most recent ``keep_rows`` of them and
    forwards every rejected batch (original columns + ``reason``) to the registered sinks."""

    def __init__(self, keep_rows: int = 10_000) -> None:
        self.keep_rows = keep_rows
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.recent: deque[pa.RecordBatch] = deque()
        self._kept = 0
        self.sinks: list[DeadLetterSink] = []

    def add_sink(self, sink: DeadLetterSink) -> None:
        """Call ``sink(tick, agent_type, batch)`` for every rejected batch."""
        self.sinks.append(sink)

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self.count += batch.num_rows
        vc = pc.value_counts(batch.column("reason"))
        for item in vc.to_pylist():  # one entry per distinct reason, not per event
            self.reasons[item["values"]] += item["counts"]
        self.recent.append(batch)
        self._kept += batch.num_rows
        while self._kept - self.recent[0].num_rows >= self.keep_rows:
            self._kept -= self.recent.popleft().num_rows
        for s in self.sinks:
            s(tick, agent_type, batch)


def validate_events(
    at: AgentType, fields: Mapping[str, object], batch: pa.RecordBatch | pa.Table | Mapping
) -> tuple[pa.Table | None, pa.RecordBatch | None]:
    """Split ``batch`` into (good events, dead letters) with the one decoder
    (``vecswim.decode``, whose docstring states the cast rules).

    ``fields``: ``{field: dtype}`` (dtype "int64"/"string" for key-typed fields) or
    ``{output: (field, dtype)}`` when one field feeds several dtypes. Good events hold the key
    and every output at its dtype; a batch that a source already decoded for the same plan
    passes through untouched. ``batch`` may be typed Arrow (any types: per-row casts) or a raw
    JSON batch (``decode.RAW_JSON`` column, one JSON item per row, as ``FileSource`` yields for
    NDJSON). Dead letters keep all original columns (raw JSON: the item text in ``json``) plus
    ``reason``; a missing column dead-letters every row with ``missing field 'x'``.
    """
    return decode.decode_batch(decode.plan_for(at, fields), batch)
