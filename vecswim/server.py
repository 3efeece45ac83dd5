"""The SQL endpoint of a running engine (HTTP, on aiohttp).

Protocol (documented in the README):

- ``POST /sql`` with the query as the body (``text/plain``, or JSON ``{"query": "..."}``).
  ``Accept: application/vnd.apache.arrow.stream`` returns an Arrow IPC stream, ``text/csv``
  CSV, anything else JSON ``{"tick", "columns", "types", "rows", "truncated"}``. Headers
  ``X-Vecswim-Tick`` and ``X-Vecswim-Truncated`` carry the tick boundary and the row-limit
  flag. A bad or refused query is HTTP 400 ``{"error": "<DuckDB's message>"}``.
- ``GET /tables``: every table and its columns (JSON). ``GET /health``: the published tick
  and the query/error counts.
- With a token, every request needs ``Authorization: Bearer <token>`` (else 401).

Every other answer is one line of JSON ``{"error": "..."}`` with the fitting status: 400 a
malformed request (bad JSON, a ``query`` that is not a string, no query, a bad
Content-Length, a body that is not UTF-8), 404 an unknown path, 405 a wrong method, 406 an
Accept naming nothing served, 408 a request not received within ``request_timeout``, 411 a
body without Content-Length (chunked is fine), 413 a body over ``max_body`` bytes, 415 a
Content-Type that is not text, JSON or form data, 503 (``Retry-After``) when
``max_concurrent`` queries run and ``max_queued`` more wait.

One asyncio event loop in a background thread serves every connection, so a slow or stalled
client never holds up another: a connection gets ``request_timeout`` seconds to deliver a
request's headers (from connecting or from its previous response) and as long again for the
body, then it is answered 408 and closed. Queries run on published snapshots
(``vecswim.snapshot``) in a pool of ``max_concurrent`` threads, never on the loop, so they
never stop the engine's ticks nor the other connections; each has a time limit (DuckDB is
interrupted) and a row limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import io
import json
import math
import os
import socket
from decimal import Decimal

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from vecswim.live import LiveHub
from vecswim.loopthread import LoopThread
from vecswim.snapshot import Snapshots
from vecswim.sql import SQLError, execute, tables_for

ARROW_STREAM = "application/vnd.apache.arrow.stream"
_TEXT_TYPES = ("application/x-www-form-urlencoded", "application/sql", "application/octet-stream")
_ENDPOINTS = (
    "POST /sql, GET /tables, /health, /metrics, /live/schema, / (the page; WebSocket: WARP), "
    "/warp (WARP) or /live (JSON)"
)


class SQLServer:
    """Serves SQL over ``snapshots`` on ``bind:port`` (port 0: any free port) in a background
    thread until ``close()``; each query may use ``threads`` DuckDB threads.

    ``max_concurrent`` queries run at once and up to ``max_queued`` more wait (each at most
    ``timeout`` seconds) for a turn; beyond that a request is answered 503. Bodies are limited
    to ``max_body`` bytes; ``backlog`` is the listen queue. Raises ``OSError`` if the address
    cannot be bound.
    """

    def __init__(
        self,
        snapshots: Snapshots,
        bind: str = "127.0.0.1",
        port: int = 7654,
        token: str | None = None,
        timeout: float = 10.0,
        max_rows: int = 100_000,
        threads: int = 2,
        *,
        max_concurrent: int = 4,
        max_queued: int = 64,
        max_body: int = 1 << 20,
        request_timeout: float = 10.0,
        backlog: int = 1024,
        live: bool = True,
        metrics: object | None = None,
    ) -> None:
        self.snapshots = snapshots
        self.metrics = metrics
        self.threads = threads
        self.token = token
        self.timeout = timeout
        self.max_rows = max_rows
        self.max_concurrent = max_concurrent
        self.max_queued = max_queued
        self.max_body = max_body
        self.request_timeout = request_timeout
        self.queries = 0
        self.errors = 0
        self.rejected = 0  # answered 503
        self.running = 0  # queries in the thread pool now
        self.waiting = 0  # queries waiting for a turn
        self._bg = LoopThread("vecswim-sql-http", max_concurrent)
        self._pool, self._loop = self._bg.pool, self._bg.loop
        self._bg.start(self._start(bind, port, backlog))
        host = f"[{bind}]" if ":" in bind else bind
        self.url = f"http://{host}:{self.port}"
        self.live: LiveHub | None = None
        if live:
            self.live = LiveHub(snapshots.engine, snapshots).attach(self._loop)

    async def _start(self, bind: str, port: int, backlog: int) -> None:
        self._slots = asyncio.Semaphore(self.max_concurrent)
        app = web.Application(client_max_size=self.max_body, middlewares=[self._guard])
        app.router.add_post("/sql", self._sql)
        app.router.add_get("/tables", self._tables)
        app.router.add_get("/health", self._health)
        app.router.add_get("/", self._root)
        app.router.add_get("/warp", self._warp)
        app.router.add_get("/live", self._json_live)
        app.router.add_get("/live/schema", self._schema)
        app.router.add_get("/static/{name}", self._static)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        manager = self._runner.server
        loop = asyncio.get_running_loop()
        deadline = self.request_timeout

        def protocol() -> _Protocol:
            # aiohttp's own idle timeout stays behind the deadline so that the deadline answers
            return _Protocol(
                manager,
                loop=loop,
                access_log=None,
                keepalive_timeout=2 * deadline,
                deadline=deadline,
            )

        try:
            self._server = await loop.create_server(protocol, bind, port, backlog=backlog)
        except OSError as e:
            await self._runner.cleanup()
            if e.errno is None or isinstance(e, socket.gaierror):
                raise
            raise OSError(e.errno, os.strerror(e.errno)) from None  # asyncio's is long-winded
        except BaseException:
            await self._runner.cleanup()
            raise
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        self._server.close()
        await self._runner.cleanup()

    def close(self) -> None:
        """Stop listening, end the connections and the loop thread (idempotent)."""
        if self._bg.closed:
            return
        if self.live is not None:
            with contextlib.suppress(ValueError):
                self.snapshots.engine.after_tick.remove(self.live.after_tick)
        self._bg.close(self._stop)
        if self.live is not None:
            self.live.close_encoder()

    # -- request handling (on the loop thread) ---------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        """Token check, and every failure as one line of JSON with the fitting status."""
        proto = request.protocol
        if isinstance(proto, _Protocol):
            proto.disarm()  # the headers are in; the handler times the body itself
        try:
            if not self._authorized(request):
                return _error(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
            return await handler(request)
        except web.HTTPException as e:  # the router's 404/405, aiohttp's 413
            if e.status == 404:
                return _error(404, f"no such endpoint {request.path}; use {_ENDPOINTS}")
            if e.status == 405:
                allow = e.headers.get("Allow", "")
                return _error(
                    405,
                    f"{request.method} is not allowed on {request.path}; use {allow}",
                    {"Allow": allow},
                )
            if e.status == 413:
                return self._too_large()
            return _error(e.status, e.reason, close=e.status >= 500)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug here must not be a traceback on the engine's terminal
            return _error(500, f"internal error: {type(e).__name__}: {e}", close=True)

    def _authorized(self, request: web.Request) -> bool:
        """The bearer token in ``Authorization``, or as ``?token=`` (browsers and SwimOS
        clients cannot set headers on a WebSocket upgrade)."""
        if self.token is None:
            return True
        want = self.token.encode()
        got = request.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), b"Bearer " + want):
            return True
        return hmac.compare_digest(request.query.get("token", "").encode(), want)

    # -- live agents, the page, metrics -------------------------------------------------

    async def _root(self, request: web.Request) -> web.StreamResponse:
        """``/``: a WebSocket upgrade speaks WARP (as a SwimOS server does); else the page."""
        if _is_upgrade(request):
            return await self._warp(request)
        return await self._static(request, "index.html")

    async def _warp(self, request: web.Request) -> web.StreamResponse:
        return await self._live_socket(request, "warp", "subprotocol warp0")

    async def _json_live(self, request: web.Request) -> web.StreamResponse:
        return await self._live_socket(request, "json", "JSON ops, see the README")

    async def _live_socket(self, request: web.Request, protocol: str, what: str):
        if self.live is None:
            return _error(404, "live subscriptions are off (--no-live)")
        if not _is_upgrade(request):
            return _error(400, f"{request.path} needs a WebSocket upgrade ({what})")
        return await self.live.handle(request, protocol)

    async def _schema(self, request: web.Request) -> web.Response:
        eng = self.snapshots.engine
        types = {}
        for name, at in eng.types.items():
            types[name] = {
                "key": at.key,
                "columns": [c.name for c in at.columns],
                "emitted": list(eng.tables[name].last),
                "links": [ln for ln, ls in eng.links.items() if ls.parent.name == name],
            }
        links = {
            ln: {"child": ls.child.name, "parent": ls.parent.name} for ln, ls in eng.links.items()
        }
        return _json(200, {"types": types, "links": links, "live": self.live is not None})

    async def _static(self, request: web.Request, name: str | None = None) -> web.StreamResponse:
        name = name or request.match_info["name"]
        if name not in _static_files():
            return _error(404, f"no such file /static/{name}")
        body, ctype = _static_files()[name]
        return web.Response(body=body, content_type=ctype, headers={"Cache-Control": "no-cache"})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return _error(404, "metrics are off")
        body, ctype = await asyncio.get_running_loop().run_in_executor(
            self._pool, self.metrics.render, request.headers.get("Accept")
        )
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = ctype
        return resp

    def _too_large(self) -> web.Response:
        return _error(413, f"request body larger than {self.max_body:,} bytes", close=True)

    async def _health(self, request: web.Request) -> web.Response:
        with self.snapshots.reader() as view:
            tick = view.tick
        return _json(
            200,
            {
                "tick": tick,
                "queries": self.queries,
                "errors": self.errors,
                "rejected": self.rejected,
                "running": self.running,
                "waiting": self.waiting,
            },
        )

    async def _tables(self, request: web.Request) -> web.StreamResponse:
        return await self._in_pool(self._list_tables)

    async def _sql(self, request: web.Request) -> web.StreamResponse:
        kind = _representation(request.headers.get("Accept", ""))
        if kind is None:
            return _error(
                406,
                f"cannot answer Accept: {request.headers['Accept']}; accept "
                f"application/json, text/csv or {ARROW_STREAM}",
            )
        ctype = request.headers.get("Content-Type")
        media = request.content_type.lower()
        if ctype is not None and not (
            media.startswith("text/") or media == "application/json" or media in _TEXT_TYPES
        ):
            return _error(415, f"unsupported Content-Type {media}; send text/plain or JSON")
        chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
        if request.content_length is None and not chunked:
            return _error(411, "Content-Length is required (the query is the body)")
        if (request.content_length or 0) > self.max_body:
            return self._too_large()
        try:
            async with asyncio.timeout(self.request_timeout):
                raw = await request.read()
        except TimeoutError:
            msg = f"request body not received within {self.request_timeout:g}s"
            return _error(408, msg, close=True)
        except web.HTTPRequestEntityTooLarge:
            return self._too_large()
        try:
            body = raw.decode("utf-8")
        except UnicodeDecodeError:
            return _error(400, "the body is not UTF-8 text")
        query = body
        if media == "application/json":
            try:
                doc = json.loads(body)
            except ValueError as e:
                return _error(400, f'bad JSON body ({e}); send {{"query": "SELECT ..."}}')
            if not isinstance(doc, dict) or not isinstance(doc.get("query"), str):
                got = (
                    f'"query" is {_json_type(doc["query"])}'
                    if isinstance(doc, dict) and "query" in doc
                    else "no query"
                    if isinstance(doc, dict)
                    else f"got {_json_type(doc)}"
                )
                return _error(400, f'JSON body must be {{"query": "SELECT ..."}} ({got})')
            query = doc["query"]
        if not query.strip():
            return _error(400, "no query: send the SQL as the body")
        if "\x00" in query:
            return _error(400, "the query contains a NUL character")
        return await self._in_pool(self._query, query, kind)

    async def _in_pool(self, fn, *args) -> web.StreamResponse:
        """Run ``fn`` in the query pool once a slot is free; 503 if too many wait already."""
        if self.running >= self.max_concurrent and self.waiting >= self.max_queued:
            return self._busy()
        self.waiting += 1
        try:
            async with asyncio.timeout(self.timeout):
                await self._slots.acquire()
        except TimeoutError:
            return self._busy()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            status, body, ctype, headers = await asyncio.get_running_loop().run_in_executor(
                self._pool, fn, *args
            )
        finally:
            self.running -= 1
            self._slots.release()
        if fn == self._query:
            if status == 200:
                self.queries += 1
            else:
                self.errors += 1
        return web.Response(status=status, body=body, content_type=ctype, headers=headers)

    def _busy(self) -> web.Response:
        self.rejected += 1
        return _error(
            503,
            f"too many queries ({self.max_concurrent} running, {self.max_queued} waiting); "
            "retry shortly",
            {"Retry-After": "1"},
        )

    # -- work in the query pool ------------------------------------------------------------

    def _query(self, query: str, kind: str) -> tuple[int, bytes, str, dict]:
        try:
            with self.snapshots.reader() as view:
                res = execute(
                    view, query, timeout=self.timeout, max_rows=self.max_rows, threads=self.threads
                )
        except SQLError as e:
            return 400, _error_body(str(e)), "application/json", {}
        headers = {"X-Vecswim-Tick": str(res.tick), "X-Vecswim-Truncated": str(res.truncated)}
        if kind == "arrow":
            sink = pa.BufferOutputStream()
            with ipc.new_stream(sink, res.table.schema) as w:
                w.write_table(res.table)
            return 200, sink.getvalue().to_pybytes(), ARROW_STREAM, headers
        if kind == "csv":
            buf = io.BytesIO()
            pacsv.write_csv(res.table, buf)
            return 200, buf.getvalue(), "text/csv", headers
        rows = [[_jsonable(v) for v in r.values()] for r in res.table.to_pylist()]
        doc = {
            "tick": res.tick,
            "columns": res.table.column_names,
            "types": [str(t) for t in res.table.schema.types],
            "rows": rows,
            "truncated": res.truncated,
        }
        return 200, json.dumps(doc, default=str).encode(), "application/json", headers

    def _list_tables(self) -> tuple[int, bytes, str, dict]:
        with self.snapshots.reader() as view:
            tables = tables_for(view)
            doc = {
                "tick": view.tick,
                "tables": {
                    n: [{"name": f.name, "type": str(f.type)} for f in t.schema]
                    for n, t in tables.items()
                },
            }
        return 200, json.dumps(doc).encode(), "application/json", {}


class _Protocol(RequestHandler):
    """aiohttp's HTTP/1.1 connection handler with a request deadline and JSON errors.

    A connection must deliver a complete request head within ``deadline`` seconds of
    connecting or of its previous response (aiohttp alone would wait for a trickled head as
    long as the client likes); the handler then times the body. A connection that misses it
    is answered 408 if it had started a request, and closed. Requests aiohttp cannot parse
    (a bad Content-Length, a malformed head) are answered with one line of JSON too.
    """

    def __init__(self, manager, *, deadline: float, **kw) -> None:
        super().__init__(manager, **kw)
        self._deadline = deadline
        self._timer: asyncio.TimerHandle | None = None
        self._partial = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._partial = True
        super().data_received(data)

    def arm(self) -> None:
        self.disarm()
        self._timer = self._loop.call_later(self._deadline, self._expired)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        transport = self.transport
        if transport is not None and self._partial:
            body = _error_body(f"request not received within {self._deadline:g}s")
            transport.write(
                b"HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        self.force_close()

    def log_access(self, request, response, time) -> None:  # called once a response is sent
        self._partial = False
        if self.transport is not None:
            self.arm()

    def handle_error(self, request, status=500, exc=None, message=None) -> web.StreamResponse:
        if status >= 500:
            message = "internal error"
        text = message or (str(exc) if exc is not None else "bad request")
        resp = _error(status, f"bad request: {text}" if status == 400 else text)
        resp.force_close()
        return resp


def _is_upgrade(request: web.Request) -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


_STATIC: dict[str, tuple[bytes, str]] | None = None
_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The page's files, shipped inside the package (read once)."""
    global _STATIC
    if _STATIC is None:
        from importlib import resources

        files = {}
        root = resources.files("vecswim") / "static"
        if root.is_dir():
            for f in root.iterdir():
                ext = "." + f.name.rsplit(".", 1)[-1]
                if f.is_file() and ext in _CONTENT_TYPES:
                    files[f.name] = (f.read_bytes(), _CONTENT_TYPES[ext])
        _STATIC = files
    return _STATIC


def _error_body(message: str) -> bytes:
    return json.dumps({"error": " ".join(str(message).split())}).encode()


def _error(
    status: int, message: str, headers: dict | None = None, close: bool = False
) -> web.Response:
    resp = web.Response(
        status=status, body=_error_body(message), content_type="application/json", headers=headers
    )
    if close:
        resp.force_close()
    return resp


def _json(status: int, obj: object) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(obj, default=str).encode(), content_type="application/json"
    )


def _json_type(v: object) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    return {list: "an array", dict: "an object", str: "a string"}.get(type(v), type(v).__name__)


def _representation(accept: str) -> str | None:
    """Arrow, CSV or JSON for an Accept header (arrow first, as before); None: none of them."""
    types = {part.split(";")[0].strip().lower() for part in accept.split(",")} - {""}
    if not types:
        return "json"
    if ARROW_STREAM in types:
        return "arrow"
    if "text/csv" in types:
        return "csv"
    if types & {"application/json", "*/*", "application/*", "*"}:
        return "json"
    if "text/*" in types:
        return "csv"
    return None


def _jsonable(v: object) -> object:
    if isinstance(v, Decimal):  # DuckDB sums integers as HUGEINT/DECIMAL
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v
