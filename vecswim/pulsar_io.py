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
type's schema, so rows and message keys pair with their messages by construction; only
the messages Arrow refuses are decoded one by one. Arrow IPC payloads (many
events per message) are read zero-copy and cast per row. The only per-message Python is what
the client forces (``data()``, ``message_id()``, ``partition_key()``).

Backpressure: the consumer's receiver queue is bounded and the engine polls only when it is
ready for the next tick, so a slow engine stops pulling instead of buffering without limit.
"""

from __future__ import annotations

import contextlib
import io
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
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
# Errors that mean "the broker cannot be reached (yet)": retried, never fatal.
_UNREACHABLE = (
    pulsar.Timeout,
    pulsar.ConnectError,
    pulsar.NotConnected,
    pulsar.ServiceUnitNotReady,
    pulsar.LookupError,
    pulsar.TooManyLookupRequestException,
    pulsar.BrokerMetadataError,
    pulsar.BrokerPersistenceError,
)


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


def client(
    service_url: str, options: ClientOptions | None = None, operation_timeout: int = 30
) -> pulsar.Client:
    """A quiet ``pulsar.Client`` (client logs at error level only). ``operation_timeout``:
    seconds a lookup, subscribe or producer creation waits for the broker before failing."""
    o = options or ClientOptions()
    return pulsar.Client(
        service_url,
        operation_timeout_seconds=operation_timeout,
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
    ``receiver_queue_size``: messages the client prefetches (default 20,000 for JSON, 1,000
    for Arrow), the bound on what is buffered ahead of the engine.

    Faults (docs/FAULTS.md): an unreachable broker at start is retried every
    ``connect_timeout`` seconds (forever unless ``connect_retry_for`` is given), each attempt
    reported through ``log``; while connected, the client reconnects by itself, an outage is
    reported through ``log`` every ``report_every`` seconds, and acknowledgements wait for
    the connection. On an exclusive or failover subscription messages arrive in order per
    topic, so a message redelivered after a reconnect (polled, or acknowledged just before a
    broker crash) is recognized by its position and acknowledged without being applied again
    (``counts["redelivered"]``). ``gauges()``: lag, unacknowledged messages, connection.
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
        receiver_queue_size: int | None = None,
        batch_max_messages: int | None = None,
        batch_timeout_ms: int = 5,
        max_payload_bytes: int = 1 << 20,
        options: ClientOptions | None = None,
        resume: dict | None = None,
        log: Callable[[str], None] | None = None,
        connect_timeout: int = 10,
        connect_retry_for: float | None = None,
        report_every: float = 10.0,
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
        self.service_url = service_url
        self.log = log or (lambda _m: None)
        self.report_every = report_every
        topic = re.compile(topic_pattern) if topic_pattern else topics
        self.single_topic = isinstance(topics, str)
        # one consumer per topic in order: positions identify redeliveries
        self.ordered = self.sub_type in ("exclusive", "failover")
        self.cumulative = self.single_topic and self.ordered
        subscribe = dict(
            consumer_type=SUBSCRIPTION_TYPES[self.sub_type],
            initial_position=POSITIONS[initial_position],
            receiver_queue_size=receiver_queue_size or (20_000 if fmt == "json" else 1_000),
            batch_receive_policy=pulsar.ConsumerBatchReceivePolicy(
                batch_max_messages or (10_000 if fmt == "json" else 100),
                64 << 20,
                batch_timeout_ms,
            ),
        )
        t0 = time.monotonic()
        retried = False
        while True:
            self.client = client(service_url, options, connect_timeout)
            try:
                self.consumer = self.client.subscribe(topic, subscription, **subscribe)
                # a dead letter waits for the broker instead of failing after a timeout
                self.dlq = (
                    self.client.create_producer(
                        dlq_topic,
                        batching_enabled=True,
                        batching_max_publish_delay_ms=5,
                        block_if_queue_full=True,
                        send_timeout_millis=0,
                    )
                    if dlq_topic
                    else None
                )
                break
            except (*_UNREACHABLE, pulsar.TopicNotFound) as e:
                self.client.close()
                waited = time.monotonic() - t0
                # a broker that just came up may not have its namespaces yet
                starting = retried and isinstance(e, pulsar.TopicNotFound)
                if not starting and not isinstance(e, _UNREACHABLE):
                    raise
                if connect_retry_for is not None and waited >= connect_retry_for:
                    raise
                self.log(
                    f"vecswim: pulsar unreachable at {service_url}, retrying ({waited:.0f} s): "
                    f"{_first_line(e)}"
                )
                retried = True
                time.sleep(min(1.0, connect_timeout))
        if retried:
            self.log(f"vecswim: pulsar reachable at {service_url}, subscribed")
        self._dlq_errors: list[str] = []
        self._dlq_sent = 0  # dead letters sent (engine thread) ...
        self._dlq_confirmed = 0  # ... and answered by the broker (client thread)
        self._deferred = 0  # a commit token not acknowledged yet (broker unreachable/slow)
        # acknowledgement bookkeeping: what each poll received, as message ids (the payloads
        # are not kept): (messages received up to and including this poll, ids to ack)
        self._polled = 0
        self._acked = 0
        self._unacked: deque[tuple[int, list]] = deque()
        self.counts = {
            "messages": 0,
            "events": 0,
            "dead_messages": 0,
            "dead_rows": 0,
            "redelivered": 0,
        }
        self._last: dict[str, tuple] = {}
        self._covered: dict[str, tuple] = {}
        if resume:
            self.counts.update(resume.get("counts", {}))
            self._covered = {t: tuple(v) for t, v in resume.get("last", {}).items()}
            self._last = dict(self._covered)
        self.connected = True
        self._down_since: float | None = None
        self._reported = 0.0
        self._checked = 0.0
        self._lag_ms = 0

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
        self._watch_connection(bool(msgs))
        if not msgs:
            return {}
        self._received(msgs)
        ids = [_position(m) for m in msgs]
        # Redelivered messages already applied (before a broker reconnect, or covered by the
        # resumed checkpoint): acknowledged with the rest, not applied again.
        # In order per topic (exclusive/failover), a redelivery is at or before the last
        # position applied, even within this poll (a reconnect between two receives).
        if self.ordered:
            last = dict(self._last)
            fresh = []
            for i, (t, p) in enumerate(ids):
                if p > last.get(t, (-1,)):
                    last[t] = p
                    fresh.append(i)
        else:
            fresh = [i for i, (t, p) in enumerate(ids) if p > self._covered.get(t, (-1,))]
        if len(fresh) < len(msgs):
            self.counts["redelivered"] += len(msgs) - len(fresh)
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
        self._dlq_sent += 1
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
            self._dlq_sent += 1
            self.dlq.send_async(line, self._dlq_done, properties={"reason": reason})

    def _dlq_done(self, res, _msg_id) -> None:
        if res != pulsar.Result.Ok:
            self._dlq_errors.append(str(res))
        self._dlq_confirmed += 1

    def _received(self, msgs: list) -> None:
        """Note what to acknowledge for ``msgs`` (ids only: the payloads are not kept, so
        messages waiting for a checkpoint cost a few bytes each) and the lag."""
        self._polled += len(msgs)
        ids = [msgs[-1].message_id()] if self.cumulative else [m.message_id() for m in msgs]
        self._unacked.append((self._polled, ids))
        self._lag_ms = max(0, int(time.time() * 1000) - msgs[-1].publish_timestamp())

    def _watch_connection(self, got: bool) -> None:
        """Track the consumer's connection (checked at most once a second) and report an
        outage every ``report_every`` seconds, and its end."""
        now = time.monotonic()
        if got and self._down_since is None:
            return
        if now - self._checked < 1.0:
            return
        self._checked = now
        self.connected = self.consumer.is_connected()
        if not self.connected:
            if self._down_since is None:
                self._down_since = self._reported = now
                self.log(f"vecswim: pulsar unreachable at {self.service_url}, retrying")
            elif now - self._reported >= self.report_every:
                self._reported = now
                self.log(
                    f"vecswim: pulsar unreachable at {self.service_url}, retrying "
                    f"({now - self._down_since:.0f} s)"
                )
        elif self._down_since is not None:
            self.log(
                f"vecswim: pulsar at {self.service_url} reachable again after "
                f"{now - self._down_since:.0f} s"
            )
            self._down_since = None
        if not got:
            self._lag_ms = 0 if self.connected else self._lag_ms

    def gauges(self) -> dict[str, int]:
        """For the ``metrics`` table: ``source_lag_ms`` (age of the newest message polled,
        by publish time: how far behind the engine is), ``source_unacked`` (messages polled
        but not yet acknowledged), ``source_connected`` (0/1), ``source_redelivered``."""
        return {
            "source_lag_ms": self._lag_ms,
            "source_unacked": self._polled - self._acked,
            "source_connected": int(self.connected),
            "source_redelivered": self.counts["redelivered"],
        }

    # -- commit -------------------------------------------------------------------------------
    def mark(self) -> int:
        """A commit token covering everything polled so far (for checkpoints)."""
        return self._polled

    def positions(self) -> dict:
        """What a checkpoint taken now covers: the last applied message per topic, counters."""
        return {"last": {t: list(p) for t, p in self._last.items()}, "counts": dict(self.counts)}

    def commit(self, token: int | None = None, wait: float = 0.2) -> bool:
        """Acknowledge the messages polled before ``token`` (a ``mark()``; default: all
        polled so far): their effect is durable (tick complete, or covered by a durable
        checkpoint) and their dead letters are published. Raises if a dead letter could not
        be published (nothing is acknowledged then). While the broker is unreachable, or
        has not confirmed every dead letter within ``wait`` seconds, nothing is acknowledged
        and False is returned: a later commit (or ``close``) covers these messages too, and
        the engine never blocks on the broker here."""
        upto = self._polled if token is None else token
        if upto <= self._acked:
            return True
        self._deferred = upto
        if not self.consumer.is_connected() or (
            self.dlq is not None and not self.dlq.is_connected()
        ):
            return False
        deadline = time.monotonic() + wait
        while self._dlq_confirmed < self._dlq_sent:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)
        self._deferred = 0
        if self._dlq_errors:
            err, self._dlq_errors = self._dlq_errors, []
            raise RuntimeError(f"dead-letter publish failed: {err[0]}")
        last = None
        while self._unacked and self._unacked[0][0] <= upto:
            _, ids = self._unacked.popleft()
            if self.cumulative:
                last = ids[-1]
            else:
                for mid in ids:
                    self.consumer.acknowledge(mid)
        if last is not None:
            self.consumer.acknowledge_cumulative(last)
        self._acked = upto
        return True

    def close(self) -> None:
        """Close consumer and client without acknowledging anything not committed. With the
        broker unreachable it does not wait for it (unacknowledged messages are redelivered
        to the next run, and their dead letters published again)."""
        with contextlib.suppress(pulsar.PulsarException):
            if self._deferred:  # a last chance for a deferred acknowledgement
                self.commit(self._deferred, wait=10.0)
            if self.dlq is not None:
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
