"""The SQL endpoint of a running engine over the PostgreSQL wire protocol (v3).

``psql -h 127.0.0.1 -p PORT -U vecswim -c "SELECT ..."`` and drivers built on libpq (psycopg)
query the live state with the rules of the HTTP endpoint (``vecswim.server``): every query
takes its own published snapshot (``Snapshots.reader()``), so it sees exactly one tick
boundary; it runs through ``vecswim.sql.execute`` (one read-only SELECT, no files or network,
a time limit and a row limit) in a pool of ``max_concurrent`` threads, never on the event loop.

Protocol: SSL and GSS encryption requests are declined ('N', plaintext follows); startup;
authentication is trust without a token, else a cleartext password that must equal the token
(wrong: FATAL 28P01); ParameterStatus (server_version, client_encoding UTF8, DateStyle ISO,
integer_datetimes on, standard_conforming_strings on, TimeZone UTC, ...); the simple query
protocol (one statement per query) and the extended one (Parse, Bind, Describe, Execute with
row limits, Sync, Close, Flush). Results are in text format with type OIDs from the Arrow
types (``_TYPES``). Query parameters and binary result formats are refused (0A000): there is
no safe way to bind values through ``execute``; use literals (psycopg: ``ClientCursor``).
A CancelRequest is ignored (the time limit ends every query).

Answered here, without DuckDB: BEGIN/COMMIT/ROLLBACK and savepoints (no-ops whose status
follows PostgreSQL's: an error inside a transaction fails it until ROLLBACK; each statement in
one still sees its own snapshot, as under READ COMMITTED), SET/RESET, SHOW of PostgreSQL
settings, DISCARD ALL, DEALLOCATE and ``SELECT version()``. SET of a setting the output
depends on (TimeZone, DateStyle, client_encoding, ...) accepts only the value this server
produces; other settings are recorded for SHOW, with a NOTICE that they have no effect unless
drivers routinely send them. Any other SHOW is DuckDB's (``SHOW TABLES``, ``SHOW engine``).

Errors carry SQLSTATEs: 42601 syntax or more than one statement, 42501 a refused statement or
file/network access, 42P01/42703/42883 unknown names, 57014 the time limit, 53000 no query
slot freed within ``timeout``, 53300 ``max_connections`` reached, 57P05 idle too long, 08P01 a
protocol violation (FATAL: only that connection is closed). A result cut by the row limit
ends with a WARNING (01000).

One event loop in a background thread serves every connection (asyncio streams, no thread per
connection). A connection gets ``request_timeout`` seconds to complete startup and
authentication, to deliver the rest of a message once its header is in, and to accept each
part of an answer; between messages it may idle ``idle_timeout`` seconds. So a stalled client
holds its connection slot for a bounded time.

Why no library (checked 2026-11, for Python 3.11 on Debian 12, glibc 2.36):

- riffq 0.1.11 (released 2026-07-22, actively maintained; a Rust server on the ``pgwire``
  crate with a Python callback API, ``BaseConnection.handle_auth/handle_query`` answering
  with Arrow C streams, SQLSTATEs settable) has Linux wheels only for cp312
  ``manylinux_2_38`` (none for cp311; glibc 2.38 is newer than Debian 12's). Its sdist needs
  a Rust toolchain and a git dependency fetched from GitHub at build time
  (``datafusion_pg_catalog``): ``pip install riffq`` fails wherever that is unreachable, as
  here, and elsewhere compiles DataFusion.
- buenavista 0.5.0 (released 2024-10-12, its last commit) is pure Python and speaks the
  simple and the extended protocol, but on a thread per connection
  (``socketserver.ThreadingTCPServer``, not asyncio) with no startup or idle timeout and no
  connection limit. Its ErrorResponse has a message only (no severity, no SQLSTATE), so
  28P01, 57014 and 42601 look alike to a client; auth is md5 against a per-user dict; rows
  are converted value by value with ``Scalar.as_py``; its Arrow map sends every integer type
  but int64 (uint32 and uint64 too) as int4 and float32 as float8; Describe Statement runs
  the query with made-up parameters; it imports ``dateutil`` without declaring it and pulls
  in fastapi, pydantic and sqlglot. Using it would mean replacing most of it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from vecswim.loopthread import LoopThread
from vecswim.snapshot import Snapshots
from vecswim.sql import SQLError, execute

SERVER_VERSION = "16.0 (vecswim)"
_SSL_REQUEST, _GSSENC_REQUEST, _CANCEL_REQUEST = 80877103, 80877104, 80877102
_MAX_STARTUP = 10_000
_MAX_MESSAGE = 1 << 20  # a query text longer than 1 MiB is refused as a protocol violation
_MAX_STATEMENTS = 10_000  # prepared statements kept per connection
_NULL = b"\xff\xff\xff\xff"  # a NULL cell in a DataRow (length -1)
_CHUNK = 1 << 18  # bytes written between drains


class PgError(Exception):
    """An ErrorResponse: SQLSTATE ``code``, one-line ``message``; ``fatal`` closes the
    connection after sending it."""

    def __init__(
        self, code: str, message: str, hint: str | None = None, fatal: bool = False
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = " ".join(str(message).split())
        self.hint = hint
        self.fatal = fatal


class PgServer:
    """Serves SQL over ``snapshots`` with the PostgreSQL protocol on ``bind:port`` (port 0:
    any free port; the bound one is ``self.port``) from its own event loop thread until
    ``close()``. ``token``: the password every client must send (None: trust anyone).

    Each query runs with ``timeout`` seconds, ``max_rows`` rows and ``threads`` DuckDB
    threads; ``max_concurrent`` run at once and the others wait up to ``timeout`` seconds for
    a turn, then fail with 53000. ``max_connections`` clients at once (more: FATAL 53300).
    ``request_timeout`` and ``idle_timeout`` bound a stalled client (module docstring).
    ``queries``/``errors`` count statements run on DuckDB that succeeded/failed,
    ``rejected`` the queries and connections refused for want of a slot. Raises ``OSError``
    if the address cannot be bound.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        bind: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        timeout: float = 10.0,
        max_rows: int = 100_000,
        threads: int = 2,
        *,
        max_concurrent: int = 4,
        max_connections: int = 64,
        request_timeout: float = 10.0,
        idle_timeout: float = 300.0,
        backlog: int = 1024,
    ) -> None:
        self.snapshots = snapshots
        self.token = token
        self.timeout = timeout
        self.max_rows = max_rows
        self.threads = threads
        self.max_concurrent = max_concurrent
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.queries = 0
        self.errors = 0
        self.rejected = 0
        self.connections = 0  # open now, authenticated or not
        self.running = 0  # queries in the thread pool now
        self._bg = LoopThread("vecswim-pgwire", max_concurrent)
        self._pool = self._bg.pool
        self._bg.start(self._start(bind, port, backlog))

    async def _start(self, bind: str, port: int, backlog: int) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrent)
        self._server = await asyncio.start_server(
            self._serve, bind, port, backlog=backlog, limit=_MAX_MESSAGE + 16
        )
        self.port = self._server.sockets[0].getsockname()[1]

    def close(self) -> None:
        """Stop listening, end every connection (FATAL 57P01) and the loop thread; idempotent."""
        self._bg.close(self._stop)

    async def _stop(self) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except asyncio.CancelledError:  # close(): end normally, as 3.11's streams expect
            conn.send_error(
                PgError("57P01", "terminating connection: the server is stopping", fatal=True)
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away
        except Exception as e:  # a bug here must end only this connection, and quietly
            conn.send_error(
                PgError("XX000", f"internal error: {type(e).__name__}: {e}", fatal=True)
            )
        finally:
            self.connections -= 1
            writer.close()

    async def run_query(self, query: str) -> _Answer:
        """One SELECT on a fresh snapshot in the pool once a slot is free (loop thread)."""
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            self.rejected += 1
            raise PgError(
                "53000",
                f"too many queries: {self.max_concurrent} running, none finished within "
                f"{self.timeout:g}s",
                hint="retry shortly",
            ) from None
        self.running += 1
        try:
            answer = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._select, query
            )
        except Exception:
            self.errors += 1
            raise
        finally:
            self.running -= 1
            self._slots.release()
        self.queries += 1
        return answer

    def _select(self, query: str) -> _Answer:
        """Pool thread: run ``query`` on the published snapshot and encode the result."""
        try:
            with self.snapshots.reader() as view:
                res = execute(
                    view, query, timeout=self.timeout, max_rows=self.max_rows, threads=self.threads
                )
        except SQLError as e:
            raise _from_sql_error(str(e)) from None
        table = res.table
        notices = []
        if res.truncated:
            notices.append(
                _notice(
                    "01000",
                    f"result truncated to its first {self.max_rows:,} rows (the server's row "
                    "limit)",
                )
            )
        return _Answer(
            _row_description(table.schema),
            _data_rows(table),
            f"SELECT {table.num_rows}",
            notices,
        )


# -- one connection ---------------------------------------------------------------------------


@dataclass
class _Answer:
    """What one statement returns: a RowDescription message (None: no rows, NoData), complete
    DataRow messages, the CommandComplete tag, NoticeResponse messages to send before it."""

    description: bytes | None
    rows: list[bytes]
    tag: str
    notices: list[bytes] = field(default_factory=list)


@dataclass
class _Portal:
    query: str
    answer: _Answer | None = None  # computed by Describe or the first Execute
    sent: int = 0  # rows sent by earlier Executes with a row limit
    done: bool = False


class _Connection:
    """The state of one client connection and its message loop (all on the loop thread)."""

    def __init__(
        self, srv: PgServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.srv = srv
        self.r = reader
        self.w = writer
        self.status = b"I"  # ReadyForQuery: I idle, T in a transaction, E failed transaction
        self.statements: dict[str, tuple[str, list[int]]] = {}
        self.portals: dict[str, _Portal] = {}
        self.settings: dict[str, str] = {}
        self.skip = False  # after an error in the extended protocol: ignore messages to Sync

    # -- startup -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.timeout(self.srv.request_timeout):
                params = await self._startup()
                if params is None:
                    return
                if self.srv.connections > self.srv.max_connections:
                    self.srv.rejected += 1
                    raise PgError(
                        "53300",
                        f"sorry, too many clients already (max_connections="
                        f"{self.srv.max_connections})",
                        fatal=True,
                    )
                await self._authenticate(params["user"])
        except TimeoutError:
            return  # never finished starting up: close without a word
        except PgError as e:
            self.send_error(e)
            await self._drain()
            return
        self.user = params["user"]
        self.settings = self._reported()
        self.settings["application_name"] = params.get("application_name", "")
        out = [struct.pack("!cii", b"R", 8, 0)]
        for name in (*_REPORTED, "application_name", "session_authorization"):
            out.append(_message(b"S", _cstr(name) + _cstr(self.settings[name])))
        out.append(_message(b"Z", self.status))
        self.w.write(b"".join(out))
        await self._drain()
        await self._loop()

    def _reported(self) -> dict[str, str]:
        return {**_REPORTED, "session_authorization": self.user}

    async def _startup(self) -> dict[str, str] | None:
        """Read the startup packet (after declining encryption); None: a cancel request."""
        while True:
            n = int.from_bytes(await self.r.readexactly(4), "big")
            if not 8 <= n <= _MAX_STARTUP:
                raise PgError("08P01", f"invalid startup packet length {n}", fatal=True)
            body = await self.r.readexactly(n - 4)
            code = int.from_bytes(body[:4], "big")
            if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                self.w.write(b"N")
                await self.w.drain()
                continue
            if code == _CANCEL_REQUEST:
                return None
            break
        major, minor = code >> 16, code & 0xFFFF
        if major != 3:
            raise PgError(
                "0A000",
                f"unsupported frontend protocol {major}.{minor}: server supports 3.0",
                fatal=True,
            )
        fields = body[4:].split(b"\x00")
        if len(fields) < 2 or fields[-1] != b"" or fields[-2] != b"" or len(fields) % 2:
            raise PgError("08P01", "invalid startup packet layout", fatal=True)
        try:
            pairs = [f.decode() for f in fields[:-2]]
        except UnicodeDecodeError:
            raise PgError("08P01", "startup packet is not UTF-8", fatal=True) from None
        params = dict(zip(pairs[::2], pairs[1::2], strict=True))
        if not params.get("user"):
            raise PgError("28000", "no user name specified in startup packet", fatal=True)
        unknown = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unknown:  # we speak 3.0 and know no protocol options
            body = struct.pack("!ii", 0, len(unknown)) + b"".join(_cstr(k) for k in unknown)
            self.w.write(_message(b"v", body))
        return params

    async def _authenticate(self, user: str) -> None:
        token = self.srv.token
        if token is None:
            return
        self.w.write(struct.pack("!cii", b"R", 8, 3))  # AuthenticationCleartextPassword
        await self._drain()
        head = await self.r.readexactly(5)
        n = int.from_bytes(head[1:], "big")
        if head[:1] != b"p" or not 5 <= n <= 4 + 1024:
            raise PgError("08P01", "expected a password message", fatal=True)
        password = (await self.r.readexactly(n - 4)).rstrip(b"\x00")
        if not hmac.compare_digest(password, token.encode()):
            raise PgError("28P01", f'password authentication failed for user "{user}"', fatal=True)

    # -- the message loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        handlers: dict[bytes, Callable] = {
            b"Q": self._query,
            b"P": self._parse,
            b"B": self._bind,
            b"D": self._describe,
            b"E": self._execute,
            b"C": self._close,
            b"F": self._function_call,
        }
        while True:
            try:
                async with asyncio.timeout(self.srv.idle_timeout):
                    head = await self.r.readexactly(5)
            except TimeoutError:
                self.send_error(
                    PgError(
                        "57P05",
                        f"terminating connection: idle for {self.srv.idle_timeout:g}s",
                        fatal=True,
                    )
                )
                await self._drain()
                return
            kind, n = head[:1], int.from_bytes(head[1:], "big")
            if kind not in handlers and kind not in (b"S", b"H", b"X", b"d", b"c", b"f"):
                self.send_error(
                    PgError("08P01", f"invalid message type {kind!r}: not PostgreSQL", fatal=True)
                )
                await self._drain()
                return
            if not 4 <= n <= _MAX_MESSAGE:
                self.send_error(PgError("08P01", f"invalid message length {n}", fatal=True))
                await self._drain()
                return
            try:
                async with asyncio.timeout(self.srv.request_timeout):
                    body = await self.r.readexactly(n - 4)
            except TimeoutError:
                return  # a message started and stalled: drop the connection
            if kind == b"X":
                return
            if kind == b"S":
                self.skip = False
                if self.status == b"I":
                    self.portals.clear()  # the implicit transaction ends
                self.w.write(_message(b"Z", self.status))
                await self._drain()
                continue
            if kind == b"H":
                await self._drain()
                continue
            if kind in b"dcf":
                continue  # COPY data outside COPY: PostgreSQL ignores it too
            if self.skip:
                continue
            try:
                await handlers[kind](_Reader(body))
            except PgError as e:
                if e.fatal:
                    self.send_error(e)
                    await self._drain()
                    return
                self._fail(e)
            except (ConnectionError, asyncio.IncompleteReadError):
                raise
            except Exception as e:  # a bug here must not end the connection
                self._fail(PgError("XX000", f"internal error: {type(e).__name__}: {e}"))
            if kind in (b"Q", b"F"):  # simple protocol: every message ends with ReadyForQuery
                if self.skip:  # it failed
                    self.skip = False
                    self.w.write(_message(b"Z", self.status))
                await self._drain()
            elif self.w.transport.get_write_buffer_size() > _CHUNK:
                await self._drain()

    def _fail(self, e: PgError) -> None:
        """Report a non-fatal error: the transaction fails, extended messages skip to Sync."""
        self.send_error(e)
        if self.status == b"T":
            self.status = b"E"
        self.skip = True

    def send_error(self, e: PgError) -> None:
        severity = b"FATAL" if e.fatal else b"ERROR"
        body = (
            b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(e.code)
            + b"M" + _cstr(e.message) + (b"H" + _cstr(e.hint) if e.hint else b"") + b"\x00"
        )  # fmt: skip
        self.w.write(_message(b"E", body))

    async def _drain(self) -> None:
        try:
            async with asyncio.timeout(self.srv.request_timeout):
                await self.w.drain()
        except TimeoutError:
            raise ConnectionError("the client does not read its answers") from None

    async def _write_rows(self, rows: list[bytes]) -> None:
        """DataRow messages, draining every ``_CHUNK`` bytes so a big result never piles up."""
        batch, size = [], 0
        for row in rows:
            batch.append(row)
            size += len(row)
            if size >= _CHUNK:
                self.w.write(b"".join(batch))
                await self._drain()
                batch, size = [], 0
        self.w.write(b"".join(batch))

    # -- simple query --------------------------------------------------------------------------

    async def _query(self, m: _Reader) -> None:
        query = m.text()
        answer = await self._answer(query, run=True)
        if answer is None:
            self.w.write(_message(b"I", b""))  # EmptyQueryResponse
        else:
            if answer.description is not None:
                self.w.write(answer.description)
            await self._write_rows(answer.rows)
            self.w.write(b"".join(answer.notices) + _complete(answer.tag))
        self.w.write(_message(b"Z", self.status))

    async def _function_call(self, m: _Reader) -> None:
        raise PgError("0A000", "function calls are not supported")

    # -- extended query ------------------------------------------------------------------------

    async def _parse(self, m: _Reader) -> None:
        name, query = m.cstr(), m.text()
        types = [m.int32() for _ in range(m.int16())]
        if name and name in self.statements:
            raise PgError("42P05", f'prepared statement "{name}" already exists')
        if name and len(self.statements) >= _MAX_STATEMENTS:
            raise PgError(
                "54000", f"too many prepared statements ({_MAX_STATEMENTS:,}); close some"
            )
        self.statements[name] = (query, types)
        self.w.write(_message(b"1", b""))

    async def _bind(self, m: _Reader) -> None:
        portal, name = m.cstr(), m.cstr()
        for _ in range(m.int16()):
            m.int16()  # parameter formats: parameters are refused whatever their format
        params = [m.bytes(m.int32()) for _ in range(m.int16())]
        results = [m.int16() for _ in range(m.int16())]
        if name not in self.statements:
            raise PgError("26000", f'prepared statement "{name}" does not exist')
        if params:
            raise PgError(
                "0A000",
                f"query parameters are not supported (got {len(params)}): put the values in "
                "the SQL text",
                hint="with psycopg, use a ClientCursor, which binds them on the client",
            )
        if any(results):
            raise PgError("0A000", "binary result format is not supported: request text")
        self.portals[portal] = _Portal(self.statements[name][0])
        self.w.write(_message(b"2", b""))

    async def _describe(self, m: _Reader) -> None:
        what, name = m.bytes(1), m.cstr()
        if what == b"S":
            if name not in self.statements:
                raise PgError("26000", f'prepared statement "{name}" does not exist')
            query, types = self.statements[name]
            self.w.write(_message(b"t", struct.pack(f"!h{len(types)}i", len(types), *types)))
            # the statement is not bound yet: its rows are not kept for a later Execute
            answer = await self._answer(query, run=False)
        elif what == b"P":
            portal = self._portal(name)
            answer = portal.answer
            if answer is None:
                answer = await self._answer(portal.query, run=False)
                # rows are kept for Execute; a session command takes effect only there
                if answer is not None and answer.description is not None:
                    portal.answer = answer
        else:
            raise PgError("08P01", f"invalid Describe target {what!r}", fatal=True)
        if answer is None or answer.description is None:
            self.w.write(_message(b"n", b""))  # NoData
        else:
            self.w.write(answer.description)

    async def _execute(self, m: _Reader) -> None:
        portal = self._portal(m.cstr())
        limit = m.int32()
        if portal.answer is None and not portal.done:
            portal.answer = await self._answer(portal.query, run=True)
        answer = portal.answer
        if answer is None:
            self.w.write(_message(b"I", b""))
            return
        if portal.done:  # PostgreSQL answers a finished portal with no rows
            self.w.write(_complete("SELECT 0" if answer.description is not None else answer.tag))
            return
        rows = answer.rows[portal.sent :]
        if 0 < limit < len(rows):
            await self._write_rows(rows[:limit])
            portal.sent += limit
            self.w.write(_message(b"s", b""))  # PortalSuspended
            return
        await self._write_rows(rows)
        portal.done = True
        tag = answer.tag if portal.sent == 0 else f"SELECT {len(rows)}"
        self.w.write(b"".join(answer.notices) + _complete(tag))

    async def _close(self, m: _Reader) -> None:
        what, name = m.bytes(1), m.cstr()
        if what == b"S":
            self.statements.pop(name, None)
        elif what == b"P":
            self.portals.pop(name, None)
        else:
            raise PgError("08P01", f"invalid Close target {what!r}", fatal=True)
        self.w.write(_message(b"3", b""))

    def _portal(self, name: str) -> _Portal:
        try:
            return self.portals[name]
        except KeyError:
            raise PgError("34000", f'portal "{name}" does not exist') from None

    # -- statements ----------------------------------------------------------------------------

    async def _answer(self, query: str, run: bool) -> _Answer | None:
        """The answer to one statement; None for an empty one. Session commands are answered
        here (their effect applied only if ``run``); anything else is a query for DuckDB."""
        text = query.strip(" \t\r\n\f;")
        if not text:
            return None
        local = self._session_command(text, run)
        if local is not None:
            return local
        if self.status == b"E":
            raise _aborted()
        return await self.srv.run_query(query)

    def _session_command(self, text: str, run: bool) -> _Answer | None:
        """BEGIN, COMMIT, SET, SHOW, ... (None: not one of them)."""
        for pattern, handler in _SESSION:
            match = pattern.fullmatch(text)
            if match is not None:
                return handler(self, match, run)
        return None

    def _begin(self, match: re.Match, run: bool) -> _Answer:
        notices = []
        if self.status == b"E":
            raise _aborted()
        _check_isolation(match.string)
        if self.status == b"T":
            notices.append(_notice("25001", "there is already a transaction in progress"))
        if run:
            self.status = b"T"
        return _Answer(None, [], "BEGIN", notices)

    def _end(self, match: re.Match, run: bool) -> _Answer:
        commit = match.group(1).lower() in ("commit", "end")
        notices = []
        if self.status == b"I":
            notices.append(_notice("25P01", "there is no transaction in progress"))
        tag = "COMMIT" if commit and self.status != b"E" else "ROLLBACK"
        if run:
            self.status = b"I"
            self.portals.clear()
        return _Answer(None, [], tag, notices)

    def _savepoint(self, match: re.Match, run: bool) -> _Answer:
        verb = match.group(1).lower()
        if self.status == b"I":
            raise PgError("25P01", f"{verb.upper()} can only be used in transaction blocks")
        if verb == "rollback":
            if run:
                self.status = b"T"  # rolling back to a savepoint heals a failed transaction
            return _Answer(None, [], "ROLLBACK")
        if self.status == b"E":
            raise _aborted()
        return _Answer(None, [], verb.upper())

    def _set(self, match: re.Match, run: bool) -> _Answer:
        if self.status == b"E":
            raise _aborted()
        name, value = match.group(1), match.group(2)
        if name is None and match.group(3) is not None:
            name, value = "TimeZone", match.group(3)
        if name is None:  # SET TRANSACTION ... / SET SESSION CHARACTERISTICS ...
            _check_isolation(match.string)
            return _Answer(None, [], "SET")
        value = _unquote(value)
        key = _CANONICAL.get(name.lower(), name.lower())
        default = value.upper() == "DEFAULT" or (key == "TimeZone" and value.upper() == "LOCAL")
        if key in _READ_ONLY:
            raise PgError("55P02", f'parameter "{key}" cannot be changed')
        if key in _FIXED and not default and not _FIXED[key](value.upper().replace(" ", "")):
            raise PgError(
                "22023", f"{key} {value} is not supported: this server answers in {_SHOW[key]}"
            )
        notices = []
        if key not in _FIXED and key not in _QUIET:
            notices.append(
                _notice("00000", f"SET {name} is accepted and has no effect here", "NOTICE")
            )
        if run:
            if default:
                self.settings.pop(key, None)
                self.settings.update({k: v for k, v in self._reported().items() if k == key})
            else:
                self.settings[key] = value
        return _Answer(None, [], "SET", notices)

    def _reset(self, match: re.Match, run: bool) -> _Answer:
        if self.status == b"E":
            raise _aborted()
        name = match.group(1)
        if run:
            if name.lower() == "all":
                app = self.settings.get("application_name", "")
                self.settings = {**self._reported(), "application_name": app}
            else:
                key = _CANONICAL.get(name.lower(), name.lower())
                self.settings.pop(key, None)
                self.settings.update({k: v for k, v in self._reported().items() if k == key})
        return _Answer(None, [], "RESET")

    def _show(self, match: re.Match, run: bool) -> _Answer | None:
        """PostgreSQL settings; None for anything else (DuckDB's SHOW TABLES, SHOW engine)."""
        name = " ".join(match.group(1).split()).lower()
        if self.status == b"E":
            raise _aborted()
        if name == "all":
            rows = sorted({**_SHOW, **self.settings}.items(), key=lambda kv: kv[0].lower())
            return _text_answer(["name", "setting"], [list(r) for r in rows], "SHOW")
        key = _CANONICAL.get(
            {"transaction isolation level": "transaction_isolation", "time zone": "timezone"}.get(
                name, name
            ),
            name,
        )
        value = self.settings.get(key, _SHOW.get(key))
        if value is None:
            return None
        return _text_answer([key], [[value]], "SHOW")

    def _discard(self, match: re.Match, run: bool) -> _Answer:
        if self.status != b"I":
            raise PgError("25001", "DISCARD ALL cannot run inside a transaction block")
        if run:
            self.statements.clear()
            self.portals.clear()
        return _Answer(None, [], "DISCARD ALL")

    def _deallocate(self, match: re.Match, run: bool) -> _Answer:
        name = match.group(1)
        if name.lower() == "all":
            if run:
                self.statements = {k: v for k, v in self.statements.items() if not k}
            return _Answer(None, [], "DEALLOCATE ALL")
        name = name.strip('"')
        if name not in self.statements:
            raise PgError("26000", f'prepared statement "{name}" does not exist')
        if run:
            del self.statements[name]
        return _Answer(None, [], "DEALLOCATE")

    def _version(self, match: re.Match, run: bool) -> _Answer:
        if self.status == b"E":
            raise _aborted()
        version = (
            f"PostgreSQL {SERVER_VERSION.split()[0]} compatible: vecswim live state, read-only "
            f"(DuckDB {duckdb.__version__})"
        )
        return _text_answer(["version"], [[version]], "SELECT 1")


def _check_isolation(text: str) -> None:
    """Refuse a stronger isolation than each statement seeing its own tick boundary: holding
    one snapshot for a whole transaction would stop publication for everyone."""
    if re.search(r"isolation\s+level\s+(repeatable\s+read|serializable)", text, re.I):
        raise PgError(
            "0A000",
            "only READ COMMITTED transactions: every statement sees its own tick boundary",
            hint="to read several tables at one tick, query them in one SELECT",
        )


def _aborted() -> PgError:
    return PgError(
        "25P02",
        "current transaction is aborted, commands ignored until end of transaction block",
        hint="send ROLLBACK",
    )


_SESSION: list[tuple[re.Pattern, Callable]] = [
    (re.compile(p, re.I | re.S), handler)
    for p, handler in [
        (r"(?:begin|start\s+transaction)(?:\s.*)?", _Connection._begin),
        (
            r"(commit|end|rollback|abort)(?:\s+(?:work|transaction))?"
            r"(?:\s+and\s+(?:no\s+)?chain)?",
            _Connection._end,
        ),
        (
            r"(rollback)(?:\s+(?:work|transaction))?\s+to\s+(?:savepoint\s+)?\S+",
            _Connection._savepoint,
        ),
        (r"(savepoint)\s+\S+", _Connection._savepoint),
        (r"(release)\s+(?:savepoint\s+)?\S+", _Connection._savepoint),
        (
            r"set\s+(?:(?:session|local)\s+)?(?:([\w.]+)\s*(?:=|\s+to\s+)\s*(.+?)|"
            r"time\s+zone\s+(.+?)|(?:transaction|session\s+characteristics)\s.+)",
            _Connection._set,
        ),
        (r"reset\s+([\w.]+)", _Connection._reset),
        (r"show\s+(transaction\s+isolation\s+level|time\s+zone|[\w.]+)", _Connection._show),
        (r"discard\s+all", _Connection._discard),
        (r"deallocate\s+(?:prepare\s+)?(\S+)", _Connection._deallocate),
        (r"select\s+(?:pg_catalog\s*\.\s*)?version\s*\(\s*\)", _Connection._version),
    ]
]

# Sent as ParameterStatus at startup (with application_name and session_authorization).
_REPORTED = {
    "server_version": SERVER_VERSION,
    "server_encoding": "UTF8",
    "client_encoding": "UTF8",
    "DateStyle": "ISO, MDY",
    "IntervalStyle": "postgres",
    "TimeZone": "UTC",
    "integer_datetimes": "on",
    "standard_conforming_strings": "on",
    "is_superuser": "off",
    "default_transaction_read_only": "on",
}
_SHOW = {
    **_REPORTED,
    "transaction_isolation": "read committed",
    "transaction_read_only": "on",
    "max_identifier_length": "63",
    "bytea_output": "hex",
}
_CANONICAL = {k.lower(): k for k in _SHOW} | {"application_name": "application_name"}
# SET of these is refused: they describe the server, or the client may rely on them
_READ_ONLY = {
    "server_version",
    "server_encoding",
    "integer_datetimes",
    "is_superuser",
    "session_authorization",
    "max_identifier_length",
}
# the output depends on these: only the values this server produces are accepted
_FIXED: dict[str, Callable[[str], bool]] = {
    "client_encoding": lambda v: v.replace("-", "") in ("UTF8", "UNICODE"),
    "DateStyle": lambda v: set(v.split(",")) <= {"ISO", "MDY", "DMY", "YMD"},
    "TimeZone": lambda v: v in ("UTC", "ETC/UTC", "GMT", "Z", "0", "+00", "+00:00", "UTC0"),
    "IntervalStyle": lambda v: v == "POSTGRES",
    "standard_conforming_strings": lambda v: v in ("ON", "TRUE", "1"),
    "default_transaction_read_only": lambda v: v in ("ON", "TRUE", "1"),
    "transaction_read_only": lambda v: v in ("ON", "TRUE", "1"),
    "transaction_isolation": lambda v: v in ("READCOMMITTED", "READ_COMMITTED"),
    "bytea_output": lambda v: v == "HEX",
}
# accepted without a notice (drivers send them at connect)
_QUIET = {"application_name", "extra_float_digits", "client_min_messages", "search_path"}


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1].replace(value[0] * 2, value[0])
    return value


def _from_sql_error(message: str) -> PgError:
    """A ``vecswim.sql`` failure as an ErrorResponse with the closest SQLSTATE."""
    for prefix, code in _SQLSTATES:
        if message.startswith(prefix):
            several = prefix.startswith("expected exactly one")
            return PgError(code, message, hint="send one statement per query" if several else None)
    return PgError("XX000", message)


_SQLSTATES = [
    ("query exceeded the time limit", "57014"),
    ("only read-only SELECT", "42501"),
    ("expected exactly one statement", "42601"),
    ("Parser Error", "42601"),
    ("Permission Error", "42501"),
    ("Binder Error: Referenced column", "42703"),
    ("Binder Error: No function matches", "42883"),
    ("Binder Error", "42000"),
    ("Catalog Error: Table with name", "42P01"),
    ("Catalog Error: Scalar Function", "42883"),
    ("Catalog Error: Table Function", "42883"),
    ("Catalog Error: Aggregate Function", "42883"),
    ("Catalog Error", "42704"),
    ("Conversion Error", "22P02"),
    ("Out of Range Error", "22003"),
    ("Invalid Input Error", "22023"),
    ("Not implemented Error", "0A000"),
    ("Out of Memory Error", "53200"),
]


# -- messages ---------------------------------------------------------------------------------


class _Reader:
    """Fields of one frontend message; a malformed one is a protocol violation."""

    def __init__(self, body: bytes) -> None:
        self.b = body
        self.i = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self.i + n > len(self.b):
            raise PgError("08P01", "malformed message: fields run past its end", fatal=True)
        out = self.b[self.i : self.i + n]
        self.i += n
        return out

    def bytes(self, n: int) -> bytes:
        return b"" if n == -1 else self._take(n)

    def int16(self) -> int:
        return struct.unpack("!h", self._take(2))[0]

    def int32(self) -> int:
        return struct.unpack("!i", self._take(4))[0]

    def cstr(self) -> str:
        end = self.b.find(b"\x00", self.i)
        if end < 0:
            raise PgError("08P01", "malformed message: unterminated string", fatal=True)
        raw = self._take(end - self.i)
        self.i += 1
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise PgError("22021", "invalid byte sequence for encoding UTF8") from None

    text = cstr


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def _cstr(s: str | bytes) -> bytes:
    return (s.encode() if isinstance(s, str) else s) + b"\x00"


def _complete(tag: str) -> bytes:
    return _message(b"C", _cstr(tag))


def _notice(code: str, message: str, severity: str = "WARNING") -> bytes:
    sev = _cstr(severity)
    body = b"S" + sev + b"V" + sev + b"C" + _cstr(code) + b"M" + _cstr(message) + b"\x00"
    return _message(b"N", body)


def _text_answer(names: list[str], rows: list[list[str]], tag: str) -> _Answer:
    table = pa.table({n: pa.array([r[i] for r in rows], pa.string()) for i, n in enumerate(names)})
    return _Answer(_row_description(table.schema), _data_rows(table), tag)


# -- Arrow to PostgreSQL types ------------------------------------------------------------------


def _row_description(schema: pa.Schema) -> bytes:
    parts = [struct.pack("!h", len(schema))]
    for f in schema:
        oid, size, _ = _pg_type(f.type)
        parts.append(_cstr(f.name) + struct.pack("!ihihih", 0, 0, oid, size, -1, 0))
    return _message(b"T", b"".join(parts))


def _data_rows(table: pa.Table) -> list[bytes]:
    """One complete DataRow message per row, cells in PostgreSQL's text format."""
    head = struct.pack("!h", table.num_columns)
    if table.num_columns == 0:
        return [_message(b"D", head)] * table.num_rows
    columns = [_cells(_pg_type(col.type)[2](col)) for col in table.columns]
    out = []
    for cells in zip(*columns, strict=True):
        body = b"".join(cells)
        out.append(b"D" + (len(body) + 6).to_bytes(4, "big") + head + body)
    return out


def _cells(values: list[str | bytes | None]) -> list[bytes]:
    out = []
    append = out.append
    for v in values:
        if v is None:
            append(_NULL)
        else:
            b = v.encode() if isinstance(v, str) else v
            append(len(b).to_bytes(4, "big") + b)
    return out


def _cast_text(col: pa.ChunkedArray) -> list:
    return pc.cast(col, pa.string()).to_pylist()


def _bool_text(col: pa.ChunkedArray) -> list:
    return pc.if_else(col, "t", "f").to_pylist()


def _float_text(col: pa.ChunkedArray) -> list:
    if col.type == pa.float16():
        col = col.cast(pa.float32())
    text = pc.cast(col, pa.string())
    if pc.sum(pc.invert(pc.is_finite(col))).as_py():
        for raw, pg in (("inf", "Infinity"), ("-inf", "-Infinity"), ("nan", "NaN")):
            text = pc.replace_substring_regex(text, f"^{raw}$", pg)
    return text.to_pylist()


def _trim_fraction(text: pa.ChunkedArray) -> pa.ChunkedArray:
    """'12:00:00.500000' -> '12:00:00.5', '12:00:00.000000' -> '12:00:00' (as PostgreSQL)."""
    text = pc.replace_substring_regex(text, r"(\.\d*[1-9])0+$", r"\1")
    return pc.replace_substring_regex(text, r"\.0+$", "")


def _timestamp_text(col: pa.ChunkedArray) -> list:
    tz = col.type.tz is not None
    # microseconds are PostgreSQL's precision; the stored values are UTC instants
    col = pc.cast(col, pa.timestamp("us"), safe=False)
    text = _trim_fraction(pc.cast(col, pa.string()))
    if tz:
        text = pc.binary_join_element_wise(text, "+00", "")
    return text.to_pylist()


def _time_text(col: pa.ChunkedArray) -> list:
    col = pc.cast(col, pa.time64("us"), safe=False)
    return _trim_fraction(pc.cast(col, pa.string())).to_pylist()


def _bytea_text(col: pa.ChunkedArray) -> list:
    return [None if v is None else b"\\x" + v.hex().encode() for v in col.to_pylist()]


def _json_text(col: pa.ChunkedArray) -> list:
    return [
        None if v is None else json.dumps(v, default=str, ensure_ascii=False)
        for v in col.to_pylist()
    ]


def _str_text(col: pa.ChunkedArray) -> list:
    return [None if v is None else str(v) for v in col.to_pylist()]


def _interval_text(col: pa.ChunkedArray) -> list:
    out = []
    for v in col.to_pylist():
        if v is None:
            out.append(None)
        else:
            ns = v.nanoseconds
            out.append(_interval(v.months, v.days, abs(ns) // 1000 * (1 if ns >= 0 else -1)))
    return out


def _duration_text(col: pa.ChunkedArray) -> list:
    per_us = {"s": 1_000_000, "ms": 1000, "us": 1, "ns": 0}[col.type.unit]
    raw = pc.cast(col, pa.int64()).to_pylist()
    return [
        None
        if v is None
        else _interval(0, 0, v * per_us if per_us else abs(v) // 1000 * (1 if v >= 0 else -1))
        for v in raw
    ]


def _interval(months: int, days: int, micros: int) -> str:
    """PostgreSQL's interval output (IntervalStyle postgres): '1 year 2 mons -3 days +04:05:06'."""
    years = abs(months) // 12 * (1 if months >= 0 else -1)
    parts, negative = [], False
    for value, unit in ((years, "year"), (months - 12 * years, "mon"), (days, "day")):
        if value:
            plus = "+" if negative and value > 0 else ""
            parts.append(f"{plus}{value} {unit}{'' if value == 1 else 's'}")
            negative = value < 0
    if micros or not parts:
        sign = "-" if micros < 0 else ("+" if negative else "")
        hours, rest = divmod(abs(micros), 3_600_000_000)
        minutes, rest = divmod(rest, 60_000_000)
        seconds, fraction = divmod(rest, 1_000_000)
        clock = f"{sign}{hours:02d}:{minutes:02d}:{seconds:02d}"
        if fraction:
            clock += f".{fraction:06d}".rstrip("0")
        parts.append(clock)
    return " ".join(parts)


# Arrow type -> (PostgreSQL type OID, typlen, text encoder of a column)
_TEXT = (25, -1, _cast_text)
_TYPES: list[tuple[Callable[[pa.DataType], bool], tuple[int, int, Callable]]] = [
    (pa.types.is_boolean, (16, 1, _bool_text)),
    (lambda t: t in (pa.int8(), pa.uint8(), pa.int16()), (21, 2, _cast_text)),
    (lambda t: t in (pa.uint16(), pa.int32()), (23, 4, _cast_text)),
    (lambda t: t in (pa.uint32(), pa.int64()), (20, 8, _cast_text)),
    (lambda t: t == pa.uint64(), (1700, -1, _cast_text)),  # beyond int8
    (lambda t: t in (pa.float16(), pa.float32()), (700, 4, _float_text)),
    (lambda t: t == pa.float64(), (701, 8, _float_text)),
    (pa.types.is_decimal, (1700, -1, _cast_text)),
    (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), _TEXT),
    (lambda t: pa.types.is_string_view(t), _TEXT),
    (pa.types.is_date, (1082, 4, _cast_text)),
    (lambda t: pa.types.is_timestamp(t) and t.tz is None, (1114, 8, _timestamp_text)),
    (pa.types.is_timestamp, (1184, 8, _timestamp_text)),
    (pa.types.is_time, (1083, 8, _time_text)),
    (lambda t: t == pa.month_day_nano_interval(), (1186, 16, _interval_text)),
    (pa.types.is_duration, (1186, 16, _duration_text)),
    (
        lambda t: (
            pa.types.is_binary(t)
            or pa.types.is_large_binary(t)
            or pa.types.is_fixed_size_binary(t)
            or pa.types.is_binary_view(t)
        ),
        (17, -1, _bytea_text),
    ),
    (
        lambda t: (
            pa.types.is_list(t)
            or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)
            or pa.types.is_struct(t)
            or pa.types.is_map(t)
        ),
        (114, -1, _json_text),
    ),
    (pa.types.is_null, (25, -1, lambda col: [None] * len(col))),
]


def _pg_type(t: pa.DataType) -> tuple[int, int, Callable]:
    """(OID, typlen, encoder) for an Arrow type; anything unknown is text via ``str``."""
    if isinstance(t, pa.ExtensionType):
        oid, size, enc = _pg_type(t.storage_type)
        return oid, size, lambda col: enc(pa.chunked_array([c.storage for c in col.chunks]))
    if pa.types.is_dictionary(t):
        oid, size, enc = _pg_type(t.value_type)
        return oid, size, lambda col: enc(pc.cast(col, t.value_type))
    for test, pg in _TYPES:
        if test(t):
            return pg
    return (25, -1, _str_text)
