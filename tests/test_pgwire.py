"""The PostgreSQL wire endpoint: results against `vecswim.sql.execute` at the same tick,
consistency under ticks, psql and psycopg as clients, and safety (token, read-only rules,
limits, stalled and garbage-speaking clients)."""

import datetime as dt
import math
import os
import socket
import struct
import subprocess
import threading
import time

import numpy as np
import psycopg
import pyarrow as pa
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import INVARIANT
from vecswim.engine import LiveView
from vecswim.pgwire import PgServer
from vecswim.snapshot import Snapshots
from vecswim.sql import execute

TOKEN = "s3cret"
PSQL = "/usr/bin/psql"


def dsn(srv, password=TOKEN):
    parts = {"host": "127.0.0.1", "port": srv.port, "user": "vecswim", "dbname": "vecswim"}
    if password is not None:
        parts["password"] = password
    return " ".join(f"{k}={v}" for k, v in parts.items())


def connect(srv, **kw):
    return psycopg.connect(dsn(srv), connect_timeout=10, **kw)


def psql(srv, *args, password=TOKEN):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["PGPASSWORD"] = password
    cmd = [PSQL, "-X", "-h", "127.0.0.1", "-p", str(srv.port), "-U", "vecswim", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=30)


# Arrow type -> the PostgreSQL type OID a client must see (pg_type.h), written out here
# independently of the server's table
OIDS = {
    pa.bool_(): 16,
    pa.uint8(): 21,
    pa.int8(): 21,
    pa.int16(): 21,
    pa.int32(): 23,
    pa.int64(): 20,
    pa.uint64(): 1700,
    pa.float32(): 700,
    pa.float64(): 701,
    pa.string(): 25,
    pa.date32(): 1082,
    pa.timestamp("us"): 1114,
    pa.timestamp("us", tz="Etc/UTC"): 1184,
    pa.time64("us"): 1083,
    pa.month_day_nano_interval(): 1186,
    pa.binary(): 17,
}


def oid_of(t):
    return 1700 if pa.types.is_decimal(t) else OIDS[t]


def canon(v, t):
    """Reference value (as_py of Arrow) and psycopg's value in one comparable form."""
    if v is None:
        return None
    if pa.types.is_floating(t):
        if math.isnan(v):
            return "nan"
        # float4 travels as its shortest decimal form; compare in float32
        return float(np.float32(v)) if t == pa.float32() else float(v)
    return v


def same(ref_table, description, got):
    """psycopg's result equals the reference Arrow table: names, type OIDs, every value."""
    assert [d.name for d in description] == ref_table.column_names
    assert [d.type_code for d in description] == [oid_of(t) for t in ref_table.schema.types]
    types = ref_table.schema.types
    ref = [list(r.values()) for r in ref_table.to_pylist()]
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        assert [canon(v, t) for v, t in zip(g, types, strict=True)] == [
            canon(v, t) for v, t in zip(r, types, strict=True)
        ]


REFERENCE = {
    "engine": "SELECT e.*, (SELECT value FROM metrics WHERE name = 'tick') AS at_tick "
    "FROM engine e ORDER BY engine_id",
    "fleet": "SELECT *, (SELECT value FROM metrics WHERE name = 'tick') AS at_tick "
    "FROM fleet ORDER BY fleet_id",
}


class Live:
    """An engine ticking in a background thread until ``stop()``, a PgServer on it, and the
    reference: each query in ``REFERENCE`` run by `vecswim.sql.execute` on the live engine
    right after every tick (on the engine thread, so exactly at that tick boundary)."""

    def __init__(self, agents=2000, events=500, reference=False, **kw):
        gen = engines.Generator(agents, seed=3, relink=0.2, period=10.0)
        self.eng = engines.build_engine(agents)
        self.refs = {name: {} for name in REFERENCE}
        if reference:
            self.eng.after_tick.append(self._record)
        self.eng.tick(gen.make(agents))  # compiles before the clock starts
        self.srv = PgServer(Snapshots(self.eng).attach(), port=0, **kw)
        self.done = threading.Event()
        source = vs.GeneratorSource(
            lambda n: None if self.done.is_set() else self._paced(gen, events)
        )
        self.runner = threading.Thread(
            target=self.eng.run, args=(source,), kwargs={"max_events": events, "tick_ms": 2}
        )
        self.runner.start()

    @staticmethod
    def _paced(gen, events):
        time.sleep(0.005)  # ticks still far outnumber queries, and leave the CPU to them
        return gen.make(events)

    def _record(self, stats):
        for name, query in REFERENCE.items():
            self.refs[name][self.eng.tick_id] = execute(LiveView(self.eng), query).table

    def stop(self):
        self.done.set()
        self.runner.join()
        self.srv.close()


def test_psycopg_results_equal_execute_at_the_same_tick():
    live = Live(agents=800, events=300, reference=True, token=TOKEN)
    ticks = set()
    try:
        with connect(live.srv, autocommit=True) as conn:
            for i in range(12):
                name = "engine" if i % 2 else "fleet"
                cur = conn.execute(REFERENCE[name])
                rows = cur.fetchall()
                tick = rows[0][-1]
                # the reference is recorded on the engine thread; wait until that tick's is in
                deadline = time.monotonic() + 10
                while tick not in live.refs[name]:
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                same(live.refs[name][tick], cur.description, rows)
                ticks.add(tick)
    finally:
        live.stop()
    assert len(ticks) > 3  # the state moved under the queries


def test_every_query_sees_one_tick_boundary_while_the_engine_ticks():
    """Parent aggregates equal their children's in every result while ticks with re-linking
    run, over psycopg's default (transactional, then prepared) path and psql's simple one."""
    live = Live(agents=1000, events=500)
    results, errors = [], []

    def client(autocommit):
        try:
            with connect(live.srv, autocommit=autocommit) as conn:
                for _ in range(20):
                    results.append(tuple(conn.execute(INVARIANT).fetchone()))
                    if not autocommit:
                        conn.commit()
        except Exception as e:
            errors.append(repr(e))

    clients = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(2)]
    try:
        for c in clients:
            c.start()
        for _ in range(2):
            r = psql(live.srv, "-At", "-c", " ".join(INVARIANT.split()))
            assert r.returncode == 0, r.stderr
            bad, lost, tick = r.stdout.strip().split("|")
            results.append((int(bad), int(lost), int(tick)))
        for c in clients:
            c.join()
    finally:
        live.stop()
    assert not errors
    assert len(results) == 42
    assert all(bad == 0 and lost == 0 for bad, lost, _ in results), results
    assert len({tick for _, _, tick in results}) > 1


@pytest.fixture(scope="module")
def server():
    eng = engines.build_engine(500)
    snaps = Snapshots(eng).attach()
    eng.tick(engines.Generator(500, seed=1).make(2000))
    srv = PgServer(snaps, token=TOKEN, timeout=1.0, max_rows=1000)
    srv.snaps = snaps
    yield srv
    srv.close()


def reference(srv, query):
    with srv.snaps.reader() as view:
        return execute(view, query).table


def test_types_and_values_of_every_kind(server):
    query = """SELECT true AS b, NULL::BOOLEAN AS nb, 7::TINYINT AS i1, 200::UTINYINT AS u1,
        -3::SMALLINT AS i2, 70000::INTEGER AS i4, 9007199254740993::BIGINT AS i8,
        18446744073709551615::UBIGINT AS u8, 0.1::FLOAT AS f4, 'inf'::FLOAT AS f4inf,
        1e300::DOUBLE AS f8, '-inf'::DOUBLE AS f8inf, 'nan'::DOUBLE AS f8nan,
        -0.0::DOUBLE AS f8z, 12345678901234567890.123::DECIMAL(38, 3) AS dec,
        'héllo ''"\\' AS s, '' AS empty, DATE '2024-02-29' AS d,
        TIMESTAMP '2024-02-29 12:34:56.789' AS ts, TIMESTAMP '2024-01-01 00:00:00' AS ts0,
        TIMESTAMPTZ '2024-02-29 12:34:56.5+00' AS tstz, TIME '23:59:59.000001' AS t,
        INTERVAL '1 year 2 months -3 days 04:05:06.5' AS iv, INTERVAL '-90 minutes' AS ivn,
        '\\x00\\xff'::BLOB AS blob, NULL AS n"""
    ref = reference(server, query)
    with connect(server, autocommit=True) as conn:
        cur = conn.execute(query)
        got = dict(zip([d.name for d in cur.description], cur.fetchone(), strict=True))
        types = {d.name: d.type_code for d in cur.description}
    oids = {f.name: oid_of(f.type) for f in ref.schema if f.name != "n"}
    assert {k: v for k, v in types.items() if k != "n"} == oids
    assert types["n"] == 25
    expected = ref.to_pylist()[0]
    for name in ("b", "nb", "i1", "u1", "i2", "i4", "i8", "u8", "dec", "s", "empty", "d"):
        assert got[name] == expected[name], name
    assert got["f4"] == 0.1 and np.float32(got["f4"]) == np.float32(expected["f4"])
    assert got["f4inf"] == math.inf and got["f8inf"] == -math.inf and math.isnan(got["f8nan"])
    assert got["f8"] == 1e300 and math.copysign(1, got["f8z"]) == -1
    assert got["ts"] == expected["ts"] == dt.datetime(2024, 2, 29, 12, 34, 56, 789000)
    assert got["ts0"] == dt.datetime(2024, 1, 1)
    assert got["tstz"] == expected["tstz"]
    assert got["t"] == expected["t"] == dt.time(23, 59, 59, 1)
    # psycopg folds a year into 365 days and a month into 30 (as PostgreSQL's own clients do)
    assert got["iv"] == dt.timedelta(days=365 + 60 - 3, hours=4, minutes=5, seconds=6.5)
    assert got["ivn"] == dt.timedelta(minutes=-90)
    assert got["blob"] == expected["blob"] == b"\x00\xff"
    assert got["n"] is None


def test_psql_prints_the_rows(server):
    query = "SELECT engine_id, status FROM engine ORDER BY engine_id LIMIT 7"
    r = psql(server, "-At", "-F", ",", "-c", query)
    assert r.returncode == 0, r.stderr
    expected = [
        f"{row['engine_id']},{row['status']}" for row in reference(server, query).to_pylist()
    ]
    assert r.stdout.splitlines() == expected
    r = psql(server, "-c", "SELECT count(*) AS n FROM engine")
    assert r.returncode == 0
    n = reference(server, "SELECT count(*) AS n FROM engine").column("n")[0].as_py()
    assert r.stdout.split() == ["n", "-----", str(n), "(1", "row)"]


def test_psql_shows_postgresql_text_forms(server):
    query = (
        "SELECT true, false, NULL::INT, 'inf'::DOUBLE, 'nan'::FLOAT, 2.50::DECIMAL(4, 2), "
        "TIMESTAMP '2024-01-01 00:00:00', TIMESTAMPTZ '2024-01-01 10:00:00.25+02', "
        "INTERVAL '1 day', INTERVAL '-1 month 2 hours', '\\xff'::BLOB, [1, 2], {'a': 'x'}"
    )
    r = psql(server, "-At", "-c", query)
    assert r.returncode == 0, r.stderr
    assert r.stdout.rstrip("\n").split("|") == [
        "t",
        "f",
        "",
        "Infinity",
        "NaN",
        "2.50",
        "2024-01-01 00:00:00",
        "2024-01-01 08:00:00.25+00",
        "1 day",
        "-1 mons +02:00:00",
        "\\xff",
        "[1, 2]",
        '{"a": "x"}',
    ]


def test_psql_reports_errors_in_one_line(server):
    r = psql(server, "-c", "SELECT nope FROM engine")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("ERROR:  Binder Error: Referenced column")
    r = psql(server, "-c", "DROP TABLE engine")
    assert r.returncode == 1 and "only read-only SELECT queries are allowed" in r.stderr
    r = psql(server, "-c", "SELECT 1", password="wrong")
    assert r.returncode == 2 and 'password authentication failed for user "vecswim"' in r.stderr


def test_psycopg_default_transactions_work(server):
    with connect(server) as conn:  # not autocommit: psycopg sends BEGIN first
        assert conn.execute("SELECT 1 AS x").fetchone() == (1,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        conn.commit()
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        with conn.transaction(), conn.transaction():  # a savepoint inside
            assert conn.execute("SELECT 2").fetchone() == (2,)
        with pytest.raises(psycopg.errors.SyntaxError):
            conn.execute("SELEC 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone() == (3,)
        for _ in range(8):  # past psycopg's prepare threshold: Parse once, then Bind/Execute
            assert conn.execute("SELECT count(*) FROM engine_fleet").fetchone()[0] > 0
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("read committed",)
        conn.execute("SET application_name = 'probe'")
        assert conn.execute("SHOW application_name").fetchone() == ("probe",)
        conn.execute("SET TIME ZONE 'UTC'")  # what this server answers in: fine
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="answers in UTC"):
            conn.execute("SET TimeZone = 'Europe/Paris'")
        conn.rollback()
        notices = []
        conn.add_notice_handler(lambda n: notices.append(n.message_primary))
        conn.execute("SET threads = 64")  # DuckDB's setting: no effect, and it says so
        assert notices == ["SET threads is accepted and has no effect here"]
        assert conn.execute("SHOW TABLES").fetchall() == [("engine",), ("fleet",)]  # DuckDB's
        assert "PostgreSQL" in conn.execute("SELECT version()").fetchone()[0]
        assert conn.info.server_version >= 150000
        assert conn.info.parameter_status("standard_conforming_strings") == "on"
    with connect(server) as conn:
        conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="only READ COMMITTED"):
            conn.execute("SELECT 1")


@pytest.mark.parametrize(
    "query, code",
    [
        ("INSERT INTO engine VALUES (1, 1, 1, 1, 1)", "42501"),
        ("UPDATE engine SET status = 0", "42501"),
        ("DELETE FROM engine", "42501"),
        ("CREATE TABLE x AS SELECT 1", "42501"),
        ("COPY engine TO '/tmp/vecswim-pg-leak.csv'", "42501"),
        ("COPY engine TO STDOUT", "42501"),
        ("ATTACH '/tmp/vecswim-pg.duckdb' AS x", "42501"),
        ("INSTALL httpfs", "42501"),
        ("PRAGMA threads = 64", "42501"),
        ("SELECT * FROM read_csv('/etc/passwd')", "42501"),
        ("SELECT * FROM read_text('/etc/hostname')", "42501"),
        ("SELECT * FROM glob('/*')", "42501"),
        ("SELECT 1; SELECT 2", "42601"),
        ("SELEC 1", "42601"),
        ("SELECT nope FROM engine", "42703"),
        ("SELECT * FROM nope", "42P01"),
        ("SELECT nope(1)", "42883"),
    ],
)
def test_refused_and_bad_statements_get_a_clear_error_and_the_connection_lives(server, query, code):
    with connect(server, autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as e:
            conn.execute(query)
        assert e.value.sqlstate == code
        message = e.value.diag.message_primary
        assert message and "\n" not in message
        assert conn.execute("SELECT count(*) FROM engine").fetchone()[0] > 0
    assert not os.path.exists("/tmp/vecswim-pg-leak.csv")


def test_parameters_and_binary_results_are_refused_clearly(server):
    with connect(server, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="parameters"):
            conn.execute("SELECT %s::INT AS x", (5,))
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="binary"):
            conn.execute("SELECT 1", binary=True)
        cur = psycopg.ClientCursor(conn)  # binds on the client: works
        assert cur.execute("SELECT %s + 1 AS x, %s AS s", (41, "it's")).fetchone() == (42, "it's")


def test_time_limit_row_limit_and_counters(server):
    queries, errors = server.queries, server.errors
    with connect(server, autocommit=True) as conn:
        notices = []
        # a Diagnostic is readable only inside the handler
        conn.add_notice_handler(lambda n: notices.append((n.sqlstate, n.message_primary)))
        t = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled, match="time limit of 1s"):
            conn.execute(
                "SELECT count(*) FROM range(1000000) a CROSS JOIN range(1000000) b "
                "WHERE a.range + b.range < 0"
            )
        assert time.monotonic() - t < 5
        rows = conn.execute("SELECT * FROM range(5000) ORDER BY 1").fetchall()
        assert rows == [(i,) for i in range(1000)]
        assert len(notices) == 1 and notices[0][0] == "01000"
        assert "truncated to its first 1,000 rows" in notices[0][1]
    assert (server.queries - queries, server.errors - errors) == (1, 1)


def test_a_query_waits_for_a_free_slot_and_gives_up_with_a_clear_error():
    """One slot: A runs into the time limit, B waits for it and runs, C waits as long as the
    time limit and is refused (53000) while B still runs."""
    eng = engines.build_engine(100)
    srv = PgServer(Snapshots(eng).attach(), timeout=1.0, max_concurrent=1)
    slow = "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range < 0"
    outcome = {}

    def client(name):
        t = time.monotonic()
        try:
            with connect(srv, autocommit=True) as conn:
                conn.execute(slow)
        except psycopg.Error as e:
            outcome[name] = (e.sqlstate, str(e), time.monotonic() - t)

    threads = {n: threading.Thread(target=client, args=(n,)) for n in "ABC"}
    try:
        threads["A"].start()
        deadline = time.monotonic() + 10
        while srv.running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)
        threads["B"].start()
        time.sleep(0.2)
        threads["C"].start()
        for t in threads.values():
            t.join()
        with connect(srv, autocommit=True) as conn:  # and it serves again
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        srv.close()
    assert outcome["A"][0] == outcome["B"][0] == "57014"
    code, message, waited = outcome["C"]
    assert code == "53000" and "too many queries" in message and 0.9 < waited < 1.8
    assert srv.rejected == 1


# -- the protocol by hand -----------------------------------------------------------------------


class Raw:
    """A PostgreSQL protocol client on a bare socket, to send what libpq never would."""

    def __init__(self, srv, timeout=10.0):
        self.s = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
        self.buf = b""

    def startup(self, password=TOKEN, user=b"vecswim"):
        body = struct.pack("!i", 196608) + b"user\x00" + user + b"\x00\x00"
        self.s.sendall(struct.pack("!i", len(body) + 4) + body)
        kind, body = self.recv()
        if kind == b"R" and body == struct.pack("!i", 3):
            self.send(b"p", password.encode() + b"\x00")
            kind, body = self.recv()
        return [(kind, body), *self.until(b"Z")] if kind == b"R" else [(kind, body)]

    def send(self, kind, body=b""):
        self.s.sendall(kind + struct.pack("!i", len(body) + 4) + body)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def recv(self):
        head = self._read(5)
        return head[:1], self._read(struct.unpack("!i", head[1:])[0] - 4)

    def until(self, kind):
        out = []
        while True:
            out.append(self.recv())
            if out[-1][0] == kind:
                return out

    def closed(self):
        """True if the server closed the connection (after any messages it still had)."""
        try:
            while True:
                self.recv()
        except EOFError:
            return True

    def close(self):
        self.s.close()


def fields(body):
    """An ErrorResponse/NoticeResponse body as {field code: text}."""
    return {f[:1]: f[1:].decode() for f in body.rstrip(b"\x00").split(b"\x00")}


def cstr(s):
    return s.encode() + b"\x00"


def test_authentication_errors_carry_28p01_and_close(server):
    r = Raw(server)
    kind, body = r.startup(password="wrong")[0]
    assert kind == b"E"
    err = fields(body)
    assert (err[b"S"], err[b"C"]) == ("FATAL", "28P01")
    assert err[b"M"] == 'password authentication failed for user "vecswim"'
    assert r.closed()
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(dsn(server, password="nope"), connect_timeout=10)
    r = Raw(server)
    msgs = r.startup()
    assert msgs[0] == (b"R", struct.pack("!i", 0)) and msgs[-1] == (b"Z", b"I")
    status = dict(b.split(b"\x00")[:2] for k, b in msgs if k == b"S")
    assert status[b"client_encoding"] == b"UTF8" and status[b"DateStyle"].startswith(b"ISO")
    assert status[b"integer_datetimes"] == b"on" and status[b"server_version"]
    r.close()


def test_without_a_token_anyone_may_connect_and_close_ends_every_connection(caplog):
    eng = engines.build_engine(100)
    srv = PgServer(Snapshots(eng).attach())
    try:
        conn = psycopg.connect(dsn(srv, password=None), autocommit=True)
        assert conn.execute("SELECT count(*) FROM engine").fetchone() == (0,)
    finally:
        srv.close()
        srv.close()  # idempotent
    with pytest.raises(psycopg.OperationalError, match="server is stopping"):
        conn.execute("SELECT 1")
    conn.close()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(srv, password=None), connect_timeout=5)
    assert not [r for r in caplog.records if r.name == "asyncio"]


def test_extended_protocol_statements_portals_and_row_limits(server):
    r = Raw(server)
    r.startup()
    query = "SELECT range AS i, range * 2 AS j FROM range(5) ORDER BY 1"
    r.send(b"P", cstr("st") + cstr(query) + struct.pack("!h", 0))
    r.send(b"D", b"S" + cstr("st"))
    r.send(b"B", cstr("po") + cstr("st") + struct.pack("!hhh", 0, 0, 0))
    r.send(b"E", cstr("po") + struct.pack("!i", 2))
    r.send(b"E", cstr("po") + struct.pack("!i", 0))
    r.send(b"C", b"P" + cstr("po"))
    r.send(b"S")
    msgs = r.until(b"Z")
    kinds = [k for k, _ in msgs]
    assert kinds == [b"1", b"t", b"T", b"2", b"D", b"D", b"s", b"D", b"D", b"D", b"C", b"3", b"Z"]
    assert msgs[1][1] == struct.pack("!h", 0)  # no parameters
    assert msgs[2][1].count(struct.pack("!i", 20)) == 2  # two int8 columns
    rows = [b for k, b in msgs if k == b"D"]
    assert rows[2] == struct.pack("!hi", 2, 1) + b"2" + struct.pack("!i", 1) + b"4"
    assert msgs[-3] == (b"C", b"SELECT 3\x00")
    # an error skips to Sync; the named statement survives and runs again
    r.send(b"B", cstr("") + cstr("nope") + struct.pack("!hhh", 0, 0, 0))
    r.send(b"E", cstr("") + struct.pack("!i", 0))
    r.send(b"S")
    msgs = r.until(b"Z")
    assert [k for k, _ in msgs] == [b"E", b"Z"] and fields(msgs[0][1])[b"C"] == "26000"
    r.send(b"B", cstr("") + cstr("st") + struct.pack("!hhh", 0, 0, 0))
    r.send(b"D", b"P" + cstr(""))
    r.send(b"E", cstr("") + struct.pack("!i", 0))
    r.send(b"S")
    assert [k for k, _ in r.until(b"Z")] == [b"2", b"T", *[b"D"] * 5, b"C", b"Z"]
    # BEGIN through the extended protocol, an empty query, Flush, Terminate
    r.send(b"P", cstr("") + cstr("BEGIN") + struct.pack("!h", 0))
    r.send(b"B", cstr("") + cstr("") + struct.pack("!hhh", 0, 0, 0))
    r.send(b"D", b"P" + cstr(""))
    r.send(b"E", cstr("") + struct.pack("!i", 0))
    r.send(b"S")
    assert r.until(b"Z") == [
        (b"1", b""),
        (b"2", b""),
        (b"n", b""),
        (b"C", b"BEGIN\x00"),
        (b"Z", b"T"),
    ]
    r.send(b"Q", cstr(" ; "))
    assert r.until(b"Z") == [(b"I", b""), (b"Z", b"T")]
    r.send(b"P", cstr("") + cstr("ROLLBACK") + struct.pack("!h", 0))
    r.send(b"H")
    assert r.recv() == (b"1", b"")
    r.send(b"X")
    assert r.closed()


GARBAGE = {
    "TLS hello as startup": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"x" * 40,
    "HTTP as startup": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "protocol 2": struct.pack("!ii", 8, 2 << 16),
    "startup without terminator": struct.pack("!ii", 12, 196608) + b"user",
}
AFTER_AUTH = {
    "HTTP": b"GET / HTTP/1.1\r\n\r\n",
    "unknown message type": b"z" + struct.pack("!i", 4),
    "huge length": b"Q" + struct.pack("!i", 0x7FFFFFF0),
    "negative length": b"Q" + struct.pack("!i", -1),
    "Bind with fields past its end": b"B"
    + struct.pack("!i", 12)
    + b"\x00\x00\x00\x05\x00\x00\x00\x00",
    "random bytes": bytes(range(256)),
}


@pytest.mark.parametrize("case", [*GARBAGE, *AFTER_AUTH])
def test_garbage_closes_only_that_connection(server, case):
    with connect(server, autocommit=True) as other:
        r = Raw(server)
        if case in GARBAGE:
            r.s.sendall(GARBAGE[case])
        else:
            assert r.startup()[-1] == (b"Z", b"I")
            r.s.sendall(AFTER_AUTH[case])
        kind, body = r.recv()
        assert kind == b"E"
        err = fields(body)
        assert err[b"S"] == "FATAL" and err[b"C"] in ("08P01", "0A000") and err[b"M"]
        assert r.closed()
        r.close()
        assert other.execute("SELECT count(*) FROM engine").fetchone()[0] > 0
    with connect(server, autocommit=True) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stalled_and_idle_clients_are_cut_and_free_their_slots():
    eng = engines.build_engine(100)
    srv = PgServer(
        Snapshots(eng).attach(), max_connections=2, request_timeout=0.5, idle_timeout=1.0
    )
    stalled = []
    try:
        stalled.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        half = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        half.sendall(struct.pack("!ii", 40, 196608) + b"user\x00")  # half a startup packet
        stalled.append(half)
        deadline = time.monotonic() + 5
        while srv.connections < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(psycopg.OperationalError, match="too many clients"):
            psycopg.connect(dsn(srv, password=None), connect_timeout=5)
        t = time.monotonic()
        for s in stalled:
            assert s.recv(100) == b""  # closed without a word
        assert time.monotonic() - t < 2
        r = Raw(srv)
        assert r.startup()[-1] == (b"Z", b"I")
        t = time.monotonic()
        kind, body = r.recv()  # idle: cut with 57P05
        assert kind == b"E" and fields(body)[b"C"] == "57P05" and 0.8 < time.monotonic() - t < 3
        assert r.closed()
        with psycopg.connect(dsn(srv, password=None), autocommit=True) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert srv.rejected == 1
    finally:
        for s in stalled:
            s.close()
        srv.close()
