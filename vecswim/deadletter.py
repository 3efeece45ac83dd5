"""Event validation and the dead-letter sink.

Bad input never stops a tick: rows that cannot be applied leave the batch with a reason and
are handed to the dead letters, where they are counted, kept (bounded) and forwarded to any
dead-letter sinks. Validation is vectorized: a few Arrow/numpy passes per batch.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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


def _to_table(batch: pa.RecordBatch | pa.Table | Mapping) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, pa.RecordBatch):
        return pa.Table.from_batches([batch])
    return pa.table(dict(batch))


def _whole_batch(table: pa.Table, reason: str) -> pa.RecordBatch:
    t = table.append_column("reason", pa.array([reason] * table.num_rows, pa.string()))
    return t.combine_chunks().to_batches()[0] if t.num_rows else None


def validate_events(
    at: AgentType, fields: Mapping[str, np.dtype | str], batch: pa.RecordBatch | pa.Table
) -> tuple[pa.Table | None, pa.RecordBatch | None]:
    """Split ``batch`` into (good events, dead letters).

    Good events hold the key and every field in ``fields`` cast to its dtype (a dtype of
    "int64"/"string" for key-typed fields). Per-row rejections: null key, null field,
    non-finite float field. Whole-batch rejections (reason on every row): a missing column or
    a column that cannot be cast. Dead letters keep all original columns plus ``reason``.
    """
    table = _to_table(batch)
    n = table.num_rows
    if n == 0:
        return None, None
    wanted = {at.key: at.key_dtype, **fields}
    cols = {}
    for name, dt in wanted.items():
        if name not in table.column_names:
            return None, _whole_batch(table, f"missing field {name!r}")
        target = _arrow_type(dt)
        col = table.column(name)
        if col.type != target:
            try:
                col = col.cast(target)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                return None, _whole_batch(table, f"field {name!r}: {str(e).splitlines()[0]}")
        cols[name] = col
    reason = None
    messages: list[str] = []
    for name, col in cols.items():
        bad = None
        if col.null_count:
            bad = np.asarray(col.is_null().to_numpy(zero_copy_only=False))
            msg = "null key" if name == at.key else f"null field {name!r}"
            reason = _flag(reason, bad, messages, msg, n)
        if pa.types.is_floating(col.type):
            vals = col.to_numpy(zero_copy_only=False)
            finite = np.isfinite(vals)
            if not finite.all():
                bad = ~finite
                if col.null_count:
                    bad &= ~np.asarray(col.is_null().to_numpy(zero_copy_only=False))
                reason = _flag(reason, bad, messages, f"non-finite field {name!r}", n)
    good = pa.table(cols)
    if reason is None:
        return good, None
    ok = reason == 0
    dead = table.filter(pa.array(~ok))
    labels = np.array(messages, dtype=object)[reason[~ok] - 1]
    dead = dead.append_column("reason", pa.array(labels, pa.string()))
    return good.filter(pa.array(ok)), dead.combine_chunks().to_batches()[0]


def _flag(reason, bad, messages, msg, n):
    if not bad.any():
        return reason
    if reason is None:
        reason = np.zeros(n, np.int16)
    messages.append(msg)
    reason[(reason == 0) & bad] = len(messages)
    return reason


def _arrow_type(dt: np.dtype | str) -> pa.DataType:
    if isinstance(dt, str) and dt == "string":
        return pa.large_string()
    return pa.from_numpy_dtype(np.dtype(dt))
