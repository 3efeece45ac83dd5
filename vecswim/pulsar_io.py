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
import pyarrow.compute as pc
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

    idle_seconds = 1.0  # receives empty for this long: caught up, the lag gauge reads 0

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
        dlq_producer_name: str | None = None,
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
                    _create_producer(
                        self.client,
                        dlq_topic,
                        producer_name=dlq_producer_name,
                        # each dead letter its own entry: judged per sequence id (_Sequence)
                        batching_enabled=False,
                        block_if_queue_full=True,
                        send_timeout_millis=0,
                    )
                    if dlq_topic
                    else None
                )
                break
            except (*_UNREACHABLE, pulsar.TopicNotFound, pulsar.ProducerBusy) as e:
                self.client.close()
                waited = time.monotonic() - t0
                # a broker that just came up may not have its namespaces yet; a killed run's
                # dead-letter producer holds its name until the broker notices it is gone
                starting = retried and isinstance(e, pulsar.TopicNotFound)
                if not starting and not isinstance(e, (*_UNREACHABLE, pulsar.ProducerBusy)):
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
        # received but not applied yet: beyond a replayed tick's boundary
        self._held: list = []
        self._boundary: dict | None = None  # what the last poll applied
        self._replay_got: list = []  # messages of a replayed tick gathered so far
        self._replay_waiting = 0.0
        self._dead_pending: list[tuple[bytes, dict, str | None]] = []
        self.dlq_seq = _Sequence(
            self.dlq, resume.get("dlq_seq") if resume else None, self.log, batched=False
        )
        if resume:
            self.counts.update(resume.get("counts", {}))
            self._covered = {t: tuple(v) for t, v in resume.get("last", {}).items()}
            self._last = dict(self._covered)
        self.connected = True
        self._down_since: float | None = None
        self._reported = 0.0
        self._checked = 0.0
        self._lag_ms = 0
        self._got_at = time.monotonic()  # when a receive last brought messages

    # -- polling ------------------------------------------------------------------------------
    @property
    def replayable(self) -> bool:
        """Whether a tick's input can be polled again exactly (``replay``): messages arrive
        in order per topic only on exclusive and failover subscriptions."""
        return self.ordered

    def _receive(self, max_events: int, timeout: float) -> list:
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
        return msgs

    def _fresh(self, msgs: list, floor: dict | None = None) -> tuple[list, list]:
        """Split ``msgs`` into (new, already applied). In order per topic
        (exclusive/failover), a redelivery is at or before the last position applied, even
        within one poll (a reconnect between two receives); otherwise only what the resumed
        checkpoint covers is recognized."""
        fresh, old = [], []
        if self.ordered:
            last = dict(self._last if floor is None else floor)
            for m in msgs:
                t, p = _position(m)
                if p > last.get(t, (-1,)):
                    last[t] = p
                    fresh.append(m)
                else:
                    old.append(m)
        else:
            for m in msgs:
                t, p = _position(m)
                (fresh if p > self._covered.get(t, (-1,)) else old).append(m)
        return fresh, old

    def poll(self, max_events: int, timeout: float) -> dict[str, pa.Table]:
        self.release()
        self._boundary = None
        msgs, self._held = self._held, []
        if len(msgs) < max_events:
            msgs += self._receive(max_events - len(msgs), timeout)
        if self.fmt == "json" and len(msgs) > max_events:
            # a batch receive can bring more than the tick takes: the rest waits for the next
            msgs, self._held = msgs[:max_events], msgs[max_events:]
        if not msgs:
            return {}
        fresh, old = self._fresh(msgs)
        return self._apply(fresh, old)

    def replay(self, boundary: dict, timeout: float) -> dict[str, pa.Table] | None:
        """Poll exactly the messages a tick applied before a restart (its ``boundary()``),
        in the same order; None while the broker has not redelivered all of them yet (call
        again). Messages past the boundary are kept for the next poll. If the broker no longer
        has some of them (a gap), the tick applies what it has and this is logged."""
        self.release()
        end = {t: tuple(p) for t, p in boundary["end"].items()}
        msgs = self._held + self._receive(max(1, boundary["n"] - len(self._replay_got)), timeout)
        self._held = []
        got = self._replay_got
        floor = dict(self._last)
        for t, p in map(_position, got):
            floor[t] = max(p, floor.get(t, p))
        fresh, old = self._fresh(msgs, floor)
        for m in fresh:
            t, p = _position(m)
            (got if t in end and p <= end[t] else self._held).append(m)
        seen = {t: p for t, p in map(_position, got)}
        past = {_position(m)[0] for m in self._held}
        done = all(seen.get(t, (-1,)) >= e or t in past for t, e in end.items())
        if old:  # redeliveries of what the checkpoint covers: acknowledged with this tick
            self._received(old)
        if not done:
            now = time.monotonic()
            if now - self._replay_waiting >= self.report_every:
                if self._replay_waiting:
                    self.log(
                        f"vecswim: replaying a tick: {len(got):,} of {boundary['n']:,} "
                        "messages redelivered so far, waiting for the rest"
                    )
                self._replay_waiting = now
            return None
        self._replay_got, self._replay_waiting = [], 0.0
        if len(got) != boundary["n"]:
            self.log(
                f"vecswim: the broker redelivered {len(got):,} of the {boundary['n']:,} "
                "messages of a replayed tick (retention or a deleted topic?): its output may "
                "differ from what was sent before the restart"
            )
        return self._apply(got, [])

    def _apply(self, fresh: list, old: list) -> dict[str, pa.Table]:
        """Decode and count the messages a tick applies; note what to acknowledge."""
        if not self.single_topic:
            # Several topics interleave in arrival order, which a replay cannot reproduce:
            # a tick applies its messages by topic, then position.
            fresh.sort(key=_position)
        self._received(old + fresh)
        if old:
            self.counts["redelivered"] += len(old)
        if not fresh:
            self._boundary = None
            return {}
        end: dict[str, tuple] = {}
        for t, p in map(_position, fresh):
            end[t] = max(p, end.get(t, p))
            if p > self._last.get(t, (-1,)):
                self._last[t] = p
        self._boundary = {"end": {t: list(p) for t, p in end.items()}, "n": len(fresh)}
        self.counts["messages"] += len(fresh)
        payloads = [m.data() for m in fresh]
        if self.fmt == "json":
            keys = [m.partition_key() for m in fresh] if self.key_from_message else None
            table, bad = decode_json(payloads, self.plan, self.max_payload_bytes, keys)
        else:
            table, bad, dead_rows = decode_arrow(payloads, self.plan, self.max_payload_bytes)
            for rows in dead_rows:  # rows of good messages that fail a cast
                self.dead_rows(0, self.agent_type.name, rows)
        for i, reason in bad:
            self._dead_message(fresh[i], reason)
        self.counts["dead_messages"] += len(bad)
        if table is None or table.num_rows == 0:
            return {}
        self.counts["events"] += table.num_rows
        return {self.agent_type.name: table}

    def boundary(self) -> dict | None:
        """What the last ``poll`` applied (per topic the last position, and the number of
        messages), for the tick journal; None if it applied nothing."""
        return self._boundary

    def _dead_message(self, msg, reason: str) -> None:
        if self.dlq is None:
            return
        props = {"reason": reason[:1000], "source_message_id": str(msg.message_id())}
        self._dead_pending.append((msg.data(), props, msg.partition_key() or None))

    def dead_rows(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        """Dead-letter sink for rows the engine rejected after decoding (as JSON rows).
        Published at ``release``."""
        self.counts["dead_rows"] += batch.num_rows
        if self.dlq is None:
            return
        reasons = batch.column("reason").to_pylist()
        body = pl.from_arrow(batch.drop_columns(["reason"]))
        buf = io.BytesIO()
        body.write_ndjson(buf)
        for line, reason in zip(buf.getvalue().splitlines(), reasons, strict=True):
            self._dead_pending.append((line, {"reason": reason}, None))

    def resume_output(self, positions: dict) -> None:
        """Number dead letters on from ``positions()`` as an earlier empty start recorded
        them (the tick journal's start record), so that its repeats are dropped too."""
        if positions.get("dlq_seq") is not None and self.dlq is not None:
            self.dlq_seq = _Sequence(self.dlq, positions["dlq_seq"], self.log, batched=False)

    def release(self) -> None:
        """Publish the dead letters of what was polled so far. The engine calls it once the
        tick's journal record is durable (dead letters are output too: a replayed tick
        publishes the same ones under the same sequence ids, which the broker drops)."""
        pending, self._dead_pending = self._dead_pending, []
        if pending:
            self._dlq_sent += self.dlq_seq.send_group(pending, self._dlq_done)

    def _dlq_done(self, res, _msg_id) -> None:
        if res != pulsar.Result.Ok:
            self._dlq_errors.append(str(res))
        self._dlq_confirmed += 1

    def _received(self, msgs: list) -> None:
        """Note what to acknowledge for ``msgs`` (ids only: the payloads are not kept, so
        messages waiting for a checkpoint cost a few bytes each) and the lag."""
        if not msgs:
            return
        self._polled += len(msgs)
        ids = [msgs[-1].message_id()] if self.cumulative else [m.message_id() for m in msgs]
        self._unacked.append((self._polled, ids))
        self._lag_ms = max(0, int(time.time() * 1000) - msgs[-1].publish_timestamp())
        self._got_at = time.monotonic()

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
        # caught up only once receives stay empty for a while: under overload the receiver
        # queue runs empty for a moment between fetches while the backlog is large
        if not got and self.connected and now - self._got_at >= self.idle_seconds:
            self._lag_ms = 0

    def gauges(self) -> dict[str, int]:
        """For the ``metrics`` table: ``source_lag_ms`` (age of the newest message polled,
        by publish time: how far behind the engine is; 0 once receives brought nothing for
        ``idle_seconds``), ``source_unacked`` (messages polled
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
        """What a checkpoint taken now covers: the last applied message per topic, counters,
        the dead-letter producer's next sequence id."""
        return {
            "last": {t: list(p) for t, p in self._last.items()},
            "counts": dict(self.counts),
            "dlq_seq": self.dlq_seq.next,
        }

    def commit(self, token: int | None = None, wait: float = 0.2) -> bool:
        """Acknowledge the messages polled before ``token`` (a ``mark()``; default: all
        polled so far): their effect is durable (tick complete, or covered by a durable
        checkpoint) and their dead letters are published. Raises if a dead letter could not
        be published (nothing is acknowledged then). While the broker is unreachable, or
        has not confirmed every dead letter within ``wait`` seconds, nothing is acknowledged
        and False is returned: a later commit (or ``close``) covers these messages too, and
        the engine never blocks on the broker here."""
        self.release()
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


class _Sequence:
    """Sequence ids for one named producer, so that broker-side deduplication drops what a
    restored run sends again.

    Pulsar (with deduplication on) admits a message only if its sequence id is above the
    highest one it took from that producer name, but it judges a producer *batch* by its
    first id alone: a batch that starts at or below that mark is dropped whole, even the
    part of it that reaches past the mark (measured on Pulsar 4.0.7). And the mark a
    restarted producer is told (``last_sequence_id()``) can lag behind batches of the killed
    run that were still in flight (measured: 2,001 repeats over 5 kills when a restart
    resumed mid-batch). So messages go out in *groups* (a tick's emissions) whose batch
    boundaries are the same in every run: a group is flushed at its end, batches are cut
    only by message count and bytes, never by a timer (``_Producer`` sets the delay to an
    hour), and a restored run skips a group only when all of it is at or below the mark,
    otherwise it sends all of it. Every batch then either repeats one the broker has
    (dropped) or is new (admitted): no repeats, no losses (measured: 0 and 0 over 8 kills).
    An unbatched producer (``batched=False``) is judged per message, so it may skip a group's
    prefix.

    ``resume``: the next id at the checkpoint (None: a fresh start, which continues after
    whatever the broker has for this name, from 1 at least: the Python client sends a message
    given ``sequence_id=0`` with an id of its own, so a repeated first batch got through)."""

    def __init__(
        self, producer, resume: int | None, log: Callable[[str], None], batched: bool = True
    ) -> None:
        self.producer = producer
        self.batched = batched
        self.skipped = 0
        last = producer.last_sequence_id() if producer is not None else -1
        if resume is None:
            # from 1: the client takes sequence_id=0 for "none given" and numbers it itself
            self.next = max(last + 1, 1)
            self.upto = -1
        else:
            self.next = int(resume)
            self.upto = last
            if last < 0 < self.next:
                log(
                    f"vecswim: {producer.topic()} has no sequence ids for producer "
                    f"{producer.producer_name()!r}: broker-side deduplication looks off, so "
                    "repeats sent after this restart will not be dropped (enable "
                    "brokerDeduplicationEnabled, or the namespace's or topic's deduplication)"
                )

    def send_group(self, msgs: list[tuple[bytes, dict, str | None]], callback) -> int:
        """Send ``(payload, properties, key)`` messages with the next sequence ids; returns
        how many were sent (the rest the broker has already)."""
        first = self.next
        self.next += len(msgs)
        if self.batched:
            start = len(msgs) if self.next - 1 <= self.upto else 0
        else:
            start = min(len(msgs), max(0, self.upto + 1 - first))
        self.skipped += start
        for i in range(start, len(msgs)):
            payload, props, key = msgs[i]
            self.producer.send_async(
                payload, callback, properties=props, partition_key=key, sequence_id=first + i
            )
        return len(msgs) - start


class _Producer:
    """A batching producer whose send errors are collected from the client's callback thread
    and raised by ``flush`` (never swallowed)."""

    def __init__(
        self,
        service_url: str,
        topic: str,
        fmt: str,
        options: ClientOptions | None,
        producer_name: str | None = None,
    ) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.fmt = fmt
        self.client = client(service_url, options)
        if producer_name is not None and len(self.client.get_topic_partitions(topic)) > 1:
            self.client.close()
            raise ValueError(
                f"{topic} is partitioned: exactly-once output needs a non-partitioned topic "
                "(sequence ids are per producer and partition)"
            )
        self.producer = _create_producer(
            self.client,
            topic,
            producer_name=producer_name,
            batching_enabled=True,
            batching_max_messages=1000,
            batching_max_allowed_size_in_bytes=1 << 20,
            # named (exactly-once) producers: batches are cut by count and bytes and at
            # ``flush`` only, so they fall the same in a replay (see _Sequence)
            batching_max_publish_delay_ms=5 if producer_name is None else 3_600_000,
            block_if_queue_full=True,
            max_pending_messages=20_000,
        )
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._closed = False
        self.confirmed = 0  # messages the broker acknowledged (persisted)

    def _done(self, res, _msg_id) -> None:
        if res != pulsar.Result.Ok:
            with self._lock:
                self._errors.append(str(res))
        else:
            self.confirmed += 1  # one callback thread: the only writer

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

    Exactly-once in effect (with a checkpoint directory, see ``vecswim.journal``): give a
    ``producer_name`` that stays the same across restarts; a restored engine calls ``resume``
    with what ``snapshot()`` returned at its checkpoint. Messages then carry sequence ids
    (one per message, counted from the checkpoint), a tick's rows go out in key order, and
    what the broker already has is not sent again (``_Sequence``); the topic needs
    broker-side deduplication and must not be partitioned.
    """

    def __init__(
        self,
        service_url: str,
        topic: str,
        fmt: str = "json",
        rows_per_message: int = 10_000,
        options: ClientOptions | None = None,
        producer_name: str | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(service_url, topic, fmt, options, producer_name)
        self.name = f"pulsar:{topic}"
        self.rows_per_message = rows_per_message
        self.sent = 0
        self.log = log or (lambda _m: None)
        self.seq = _Sequence(self.producer, None, self.log) if producer_name is not None else None
        self._group: list[tuple[bytes, dict, str | None]] = []

    def write(self, tick: int, agent_type: str, batch: pa.RecordBatch) -> None:
        self._raise()
        props = {"agent_type": agent_type, "tick": str(tick)}
        if self.seq is not None:
            # a restored engine may find a tick's changed rows in another order
            batch = batch.take(pc.sort_indices(batch.column(0)))
        if self.fmt == "json":
            keys = [str(k) for k in batch.column(0).to_pylist()]
            buf = io.BytesIO()
            pl.from_arrow(batch).with_columns(pl.lit(agent_type).alias("agent_type")).write_ndjson(
                buf
            )
            for line, key in zip(buf.getvalue().splitlines(), keys, strict=True):
                self._send(line, props, key)
        else:
            for off in range(0, batch.num_rows, self.rows_per_message):
                payload = arrow_payload(batch.slice(off, self.rows_per_message))
                self._send(payload, props, agent_type)

    def _send(self, payload: bytes, props: dict, key: str) -> None:
        if self.seq is None:
            self.producer.send_async(payload, self._done, properties=props, partition_key=key)
            self.sent += 1
        else:  # sent as one group at the end of the tick
            self._group.append((payload, props, key))

    def flush(self) -> None:
        """Send the tick's messages (sequenced sinks), wait until the broker acknowledged
        everything, raise the first error."""
        if self._group:
            group, self._group = self._group, []
            self.sent += self.seq.send_group(group, self._done)
        super().flush()

    def snapshot(self) -> dict:
        """The sink's part of a checkpoint (taken at a tick boundary, after ``flush``)."""
        return {"next_seq": self.seq.next if self.seq is not None else None}

    def resume(self, tick: int, state: dict | None) -> None:
        """Continue the sequence ids of checkpoint ``tick`` (what the broker has already is
        skipped); without a state (the sink was not in it) they continue the broker's."""
        if self.seq is not None and state is not None and state.get("next_seq") is not None:
            self.seq = _Sequence(self.producer, state["next_seq"], self.log)


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


def _create_producer(cl: pulsar.Client, topic: str, **kwargs):
    """``create_producer``; a named producer of a killed run keeps its name on the broker
    until the broker notices the dead connection, so ProducerBusy is retried for a while."""
    deadline = time.monotonic() + 60.0
    while True:
        try:
            return cl.create_producer(topic, **kwargs)
        except pulsar.ProducerBusy:
            if kwargs.get("producer_name") is None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def arrow_payload(batch: pa.RecordBatch | pa.Table) -> bytes:
    """Events as one Arrow IPC stream message payload."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, batch.schema) as w:
        w.write(batch)
    return sink.getvalue().to_pybytes()
