"""Apache Pulsar source and sink.

Source contract (see ``vecswim.sources``): ``poll`` returns the decoded events of one batch
receive (or several, up to ``max_events`` / ``timeout``); ``commit`` acknowledges every
message polled so far and is called by the engine only after the tick that applied them
completed and the sinks were flushed, so a message is never acknowledged before its effect
exists (at-least-once; exactly-once state comes with checkpoints). Messages that cannot be
decoded, or whose rows the engine rejects, are published to the dead-letter topic with the
reason as the ``reason`` property before they are acknowledged, and counted.

Decoding is the one decoder's (``vecswim.decode``, which states the cast rules), in bulk:
JSON payloads (one event per message) are checked to hold exactly one JSON object each (a
numba scan), joined into one NDJSON buffer and parsed by Arrow in one call against the agent
type's schema, so rows and message keys pair with their messages by construction; a bad
message is found by bisection only when a batch fails to parse. Arrow IPC payloads (many
events per message) are read zero-copy and cast per row. The only per-message Python is what
the client forces (``data()``, ``message_id()``, ``partition_key()``).

Backpressure: the consumer's receiver queue is bounded and the engine polls only when it is
ready for the next tick, so a slow engine stops pulling instead of buffering without limit.
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
import pulsar
import pyarrow as pa
import pyarrow.ipc as ipc

from vecswim import decode
from vecswim.schema import AgentType

SUBSCRIPTION_TYPES = {
    "exclusive": pulsar.ConsumerType.Exclusive,
    "failover": pulsar.ConsumerType.Failover,
    "shared": pulsar.ConsumerType.Shared,
    "key_shared": pulsar.ConsumerType.KeyShared,
}
POSITIONS = {"earliest": pulsar.InitialPosition.Earliest, "latest": pulsar.InitialPosition.Latest}
FORMATS = ("json", "arrow")


@dataclass
class ClientOptions:
    """Connection settings passed through to ``pulsar.Client``: an ``authentication`` object
    (e.g. ``pulsar.AuthenticationToken(...)``) and TLS files/flags."""

    authentication: object | None = None
    tls_trust_certs_file_path: str | None = None
    tls_allow_insecure_connection: bool = False
    tls_validate_hostname: bool = False
    tls_certificate_file_path: str | None = None
    tls_private_key_file_path: str | None = None
    extra: dict = field(default_factory=dict)


def client(service_url: str, options: ClientOptions | None = None) -> pulsar.Client:
    """A quiet ``pulsar.Client`` (client logs at error level only)."""
    o = options or ClientOptions()
    return pulsar.Client(
        service_url,
        authentication=o.authentication,
        tls_trust_certs_file_path=o.tls_trust_certs_file_path,
        tls_allow_insecure_connection=o.tls_allow_insecure_connection,
        tls_validate_hostname=o.tls_validate_hostname,
        tls_certificate_file_path=o.tls_certificate_file_path,
        tls_private_key_file_path=o.tls_private_key_file_path,
        logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error),
        **o.extra,
    )


class PulsarSource:
    """Events for one agent type from Pulsar topics.

    ``topics``: a topic name, a list of them, or ``topic_pattern`` (regex) instead.
    ``subscription_type``: exclusive, failover, shared or key_shared. ``fmt``: "json" (one
    event per message) or "arrow" (an Arrow IPC stream of events per message).
    ``key_from``: "payload" (the agent type's key field) or "message" (the message key).
    ``dlq_topic``: where undecodable or rejected events go (None: counted and dropped).
    ``max_payload_bytes``: larger messages are dead-lettered unread.
    ``batch_max_messages``: messages per batch receive (default 10,000 for JSON, 100 for
    Arrow, whose messages carry many events each).
    ``resume``: the ``positions()`` stored in the checkpoint being resumed from: redelivered
    messages it already covers are acknowledged but not applied again, and the counters
    continue from it (exactly-once effect on state).
    """

    def __init__(
        self,
        service_url: str,
        agent_type: AgentType,
        fields: dict[str, object],
        topics: str | Sequence[str] | None = None,
        topic_pattern: str | None = None,
        subscription: str = "vecswim",
        subscription_type: str = "exclusive",
        initial_position: str = "earliest",
        fmt: str = "json",
        key_from: str = "payload",
        dlq_topic: str | None = None,
        receiver_queue_size: int = 20_000,
        batch_max_messages: int | None = None,
        batch_timeout_ms: int = 5,
        max_payload_bytes: int = 1 << 20,
        options: ClientOptions | None = None,
        resume: dict | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        if (topics is None) == (topic_pattern is None):
            raise ValueError("give either topics or topic_pattern")
        if key_from not in ("payload", "message"):
            raise ValueError("key_from must be 'payload' or 'message'")
        if key_from == "message" and fmt == "arrow":
            raise ValueError("key_from='message' needs one event per message (fmt='json')")
        self.agent_type = agent_type
        self.fmt = fmt
        self.key_from_message = key_from == "message"
        self.plan = decode.plan_for(agent_type, fields, self.key_from_message)
        self.max_payload_bytes = max_payload_bytes
        self.sub_type = subscription_type.lower()
        self.client = client(service_url, options)
        topic = re.compile(topic_pattern) if topic_pattern else topics
        self.single_topic = isinstance(topics, str)
        self.consumer = self.client.subscribe(
            topic,
            subscription,
            consumer_type=SUBSCRIPTION_TYPES[self.sub_type],
            initial_position=POSITIONS[initial_position],
            receiver_queue_size=receiver_queue_size,
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(
                batch_max_messages or (10_000 if fmt == "json" else 100),
                64 << 20,
                batch_timeout_ms,
            ),
        )
        self.dlq = (
            self.client.create_producer(
                dlq_topic,
                batching_enabled=True,
                batching_max_publish_delay_ms=5,
                block_if_queue_full=True,
            )
            if dlq_topic
            else None
        )
        self._dlq_errors: list[str] = []
        self._pending: list = []
        self.counts = {"messages": 0, "events": 0, "dead_messages": 0, "dead_rows": 0}
        self._last: dict[str, tuple] = {}
        self._covered: dict[str, tuple] = {}
        if resume:
            self.counts.update(resume.get("counts", {}))
            self._covered = {t: tuple(v) for t, v in resume.get("last", {}).items()}
            self._last = dict(self._covered)

    # -- polling ------------------------------------------------------------------------------
    def poll(self, max_events: int, timeout: float) -> dict[str, pa.Table]:
        deadline = time.monotonic() + timeout
        msgs: list = []
        while len(msgs) < max_events:
            got = self.consumer.batch_receive()
            msgs += got
            if time.monotonic() >= deadline or (not got and msgs):
                break
            if self.fmt == "arrow" and msgs:
                break  # each message holds many events: one receive is a tick's worth
        if not msgs:
            return {}
        self._pending += msgs
        ids = [_position(m) for m in msgs]
        if self._covered:
            # redelivered messages the resumed checkpoint already applied: ack, don't apply
            fresh = [i for i, (t, p) in enumerate(ids) if p > self._covered.get(t, (-1,))]
            msgs = [msgs[i] for i in fresh]
            ids = [ids[i] for i in fresh]
            if not msgs:
                return {}
        for t, p in ids:
            if p > self._last.get(t, (-1,)):
                self._last[t] = p
        self.counts["messages"] += len(msgs)
        payloads = [m.data() for m in msgs]
        if self.fmt == "json":
            keys = [m.partition_key() for m in msgs] if self.key_from_message else None
            table, bad = decode_json(payloads, self.plan, self.max_payload_bytes, keys)
        else:
            table, bad, dead_rows = decode_arrow(payloads, self.plan, self.max_payload_bytes)
            for rows in dead_rows:  # rows of good messages that fail a cast
                self.dead_rows(0, self.agent_type.name, rows)
        for i, reason in bad:
            self._dead_message(msgs[i], reason)
        self.counts["dead_messages"] += len(bad)
        if table is None or table.num_rows == 0:
            return {}
        self.counts["events"] += table.num_rows
        return {self.agent_type.name: table}

    def _dead_message(self, msg, reason: str) -> None:
        if self.dlq is None:
            return
        props = {"reason": reason[:1000], "source_message_id": str(msg.message_id())}
        key = msg.partition_key()
        self.dlq.send_async(msg.data(), self._dlq_done, properties=props, partition_key=key or None)

    def dead_rows(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        """Dead-letter sink for rows the engine rejected after decoding (as JSON rows)."""
        self.counts["dead_rows"] += batch.num_rows
        if self.dlq is None:
            return
        reasons = batch.column("reason").to_pylist()
        body = pl.from_arrow(batch.drop_columns(["reason"]))
        buf = io.BytesIO()
        body.write_ndjson(buf)
        for line, reason in zip(buf.getvalue().splitlines(), reasons, strict=True):
            self.dlq.send_async(line, self._dlq_done, properties={"reason": reason})

    def _dlq_done(self, res, _msg_id) -> None:
        if res != pulsar.Result.Ok:
            self._dlq_errors.append(str(res))

    # -- commit -------------------------------------------------------------------------------
    def mark(self) -> int:
        """A commit token covering everything polled so far (for checkpoints)."""
        return len(self._pending)

    def positions(self) -> dict:
        """What a checkpoint taken now covers: the last applied message per topic, counters."""
        return {"last": {t: list(p) for t, p in self._last.items()}, "counts": dict(self.counts)}

    def commit(self, token: int | None = None) -> None:
        """Acknowledge the messages polled before ``token`` (default: all polled so far):
        their effect is durable (tick complete, or covered by a durable checkpoint) and
        their dead letters are published. Raises if a dead letter could not be published
        (nothing is acknowledged then)."""
        if self.dlq is not None:
            self.dlq.flush()
        if self._dlq_errors:
            err, self._dlq_errors = self._dlq_errors, []
            raise RuntimeError(f"dead-letter publish failed: {err[0]}")
        upto = len(self._pending) if token is None else token
        if upto == 0:
            return
        done = self._pending[:upto]
        if self.single_topic and self.sub_type in ("exclusive", "failover"):
            self.consumer.acknowledge_cumulative(done[-1])
        else:
            for m in done:
                self.consumer.acknowledge(m)
        del self._pending[:upto]

    def close(self) -> None:
        """Close consumer and client without acknowledging anything not committed."""
        if self.dlq is not None:
            self.dlq.flush()
            self.dlq.close()
        self.consumer.close()
        self.client.close()


def _position(msg) -> tuple[str, tuple[int, int, int]]:
    mid = msg.message_id()
    return msg.topic_name(), (mid.ledger_id(), mid.entry_id(), mid.batch_index())


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def decode_json(
    payloads: list[bytes],
    plan: decode.Plan,
    max_bytes: int,
    keys: list[str | None] | None = None,
) -> tuple[pa.Table | None, list[tuple[int, str]]]:
    """Decode one JSON object per payload (``vecswim.decode.decode_payloads``); returns
    (events of the good payloads in order, [(index, reason)] of the bad ones). ``keys``: the
    message keys when the plan takes the agent key from them; each is paired with its own
    payload (a payload that is not exactly one object is dead, never shifts the pairing)."""
    res = decode.decode_payloads(plan, payloads, keys, max_bytes)
    return res.table, res.bad


def decode_arrow(
    payloads: list[bytes], plan: decode.Plan, max_bytes: int
) -> tuple[pa.Table | None, list[tuple[int, str]], list[pa.RecordBatch]]:
    """Read each payload as an Arrow IPC stream (zero-copy) and decode it by the plan;
    returns (events of all payloads in order, [(index, reason)] of payloads that are unreadable
    or miss a column, dead rows of the others (original columns + ``reason``) per payload)."""
    tables = []
    bad: list[tuple[int, str]] = []
    dead: list[pa.RecordBatch] = []
    for i, p in enumerate(payloads):  # one message = many events: per-message work is amortized
        if len(p) > max_bytes:
            bad.append((i, f"payload exceeds {max_bytes} bytes"))
            continue
        try:
            t = ipc.open_stream(pa.py_buffer(p)).read_all()
        except (pa.ArrowException, ValueError, OSError) as e:
            bad.append((i, f"arrow: {_first_line(e)}"))
            continue
        missing = [f for f in plan.fields if f not in t.column_names]
        if missing:
            bad.append((i, f"arrow: missing field {missing[0]!r}"))
            continue
        good, rows = decode.decode_batch(plan, t)
        if rows is not None:
            dead.append(rows)
        if good is not None and good.num_rows:
            tables.append(good)
    if not tables:
        return None, bad, dead
    return (tables[0] if len(tables) == 1 else pa.concat_tables(tables)), bad, dead


class _Producer:
    """A batching producer whose send errors are collected from the client's callback thread
    and raised by ``flush`` (never swallowed)."""

    def __init__(
        self, service_url: str, topic: str, fmt: str, options: ClientOptions | None
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.client = client(service_url, options)
        self.producer = self.client.create_producer(
            topic,
            batching_enabled=True,
            batching_max_messages=1000,
            batching_max_allowed_size_in_bytes=1 << 20,
            batching_max_publish_delay_ms=5,
            block_if_queue_full=True,
            max_pending_messages=20_000,
        )
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._closed = False

    def _done(self, res, _msg_id) -> None:
        if res != pulsar.Result.Ok:
            with self._lock:
                self._errors.append(str(res))

    def _raise(self) -> None:
        with self._lock:
            if self._errors:
                err, self._errors = self._errors, []
                raise RuntimeError(f"Pulsar publish failed: {err[0]}")

    def flush(self) -> None:
        """Wait until everything sent so far is acknowledged by the broker."""
        self.producer.flush()
        self._raise()

    def close(self) -> None:
        if self._closed:
            return
        self.flush()
        self.producer.close()
        self.client.close()
        self._closed = True


class PulsarSink(_Producer):
    """Emissions of every agent type to one Pulsar topic.

    ``fmt="json"``: one message per changed row, key = the agent's key, properties
    ``agent_type`` and ``tick``. ``fmt="arrow"``: one Arrow IPC message per agent type per tick
    (up to ``rows_per_message`` rows), key = agent type. Producer batching is on; ``flush``
    waits for every send and raises the first producer error (errors are never swallowed).
    """

    def __init__(
        self,
        service_url: str,
        topic: str,
        fmt: str = "json",
        rows_per_message: int = 10_000,
        options: ClientOptions | None = None,
    ) -> None:
        super().__init__(service_url, topic, fmt, options)
        self.rows_per_message = rows_per_message
        self.sent = 0

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self._raise()
        props = {"agent_type": agent_type, "tick": str(tick)}
        if self.fmt == "json":
            keys = [str(k) for k in batch.column(0).to_pylist()]
            buf = io.BytesIO()
            pl.from_arrow(batch).with_columns(pl.lit(agent_type).alias("agent_type")).write_ndjson(
                buf
            )
            for line, key in zip(buf.getvalue().splitlines(), keys, strict=True):
                self.producer.send_async(line, self._done, properties=props, partition_key=key)
            self.sent += len(keys)
        else:
            for off in range(0, batch.num_rows, self.rows_per_message):
                payload = arrow_payload(batch.slice(off, self.rows_per_message))
                self.producer.send_async(
                    payload, self._done, properties=props, partition_key=agent_type
                )
                self.sent += 1


class EventPublisher(_Producer):
    """Publishes event batches to a topic: JSON (one event per message, key = the agent key)
    or Arrow IPC (``events_per_message`` events per message). Batching producer; ``flush``
    waits for all sends and raises the first error."""

    def __init__(
        self,
        service_url: str,
        topic: str,
        key: str,
        fmt: str = "json",
        events_per_message: int = 1000,
        options: ClientOptions | None = None,
    ) -> None:
        super().__init__(service_url, topic, fmt, options)
        self.key = key
        self.events_per_message = events_per_message
        self.messages = 0
        self.events = 0

    def publish(self, batch: pa.RecordBatch | pa.Table) -> None:
        """Send every event of ``batch`` (asynchronously)."""
        if self.fmt == "json":
            buf = io.BytesIO()
            pl.from_arrow(batch).write_ndjson(buf)
            keys = [str(k) for k in batch.column(self.key).to_pylist()]
            for line, key in zip(buf.getvalue().splitlines(), keys, strict=True):
                self.producer.send_async(line, self._done, partition_key=key)
            self.messages += len(keys)
        else:
            for off in range(0, batch.num_rows, self.events_per_message):
                self.send_raw(arrow_payload(batch.slice(off, self.events_per_message)))
        self.events += batch.num_rows

    def send_raw(self, payload: bytes, key: str | None = None) -> None:
        """Send one message as it is (tests of malformed input use this)."""
        self.producer.send_async(payload, self._done, partition_key=key)
        self.messages += 1


def arrow_payload(batch: pa.RecordBatch | pa.Table) -> bytes:
    """Events as one Arrow IPC stream message payload."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema) as w:
        w.write(batch)
    return sink.getvalue().to_pybytes()
