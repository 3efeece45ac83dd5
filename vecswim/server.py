"""The SQL endpoint of a running engine (HTTP).

Protocol (documented in the README):

- ``POST /sql`` with the query as the body (``text/plain``, or JSON ``{"query": "..."}``).
  ``Accept: application/vnd.apache.arrow.stream`` returns an Arrow IPC stream, ``text/csv``
  CSV, anything else JSON ``{"tick", "columns", "types", "rows", "truncated"}``. Headers
  ``X-Vecswim-Tick`` and ``X-Vecswim-Truncated`` carry the tick boundary and the row-limit
  flag. A bad or refused query is HTTP 400 ``{"error": "<DuckDB's message>"}``.
- ``GET /tables``: every table and its columns (JSON). ``GET /health``: the published tick
  and the query/error counts.
- With a token, every request needs ``Authorization: Bearer <token>`` (else 401).

Queries run on published snapshots (``vecswim.snapshot``) in the server's threads, so they
never stop the engine's ticks; each has a time limit and a row limit.
"""

from __future__ import annotations

import hmac
import io
import json
import math
import sys
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc

from vecswim.snapshot import Snapshots
from vecswim.sql import SQLError, execute, tables_for

ARROW_STREAM = "application/vnd.apache.arrow.stream"


class SQLServer:
    """Serves SQL over ``snapshots`` on ``bind:port`` (port 0: any free port) in a background
    thread until ``close()``; each query may use ``threads`` DuckDB threads."""

    def __init__(
        self,
        snapshots: Snapshots,
        bind: str = "127.0.0.1",
        port: int = 7654,
        token: str | None = None,
        timeout: float = 10.0,
        max_rows: int = 100_000,
        threads: int = 2,
    ) -> None:
        self.snapshots = snapshots
        self.threads = threads
        self.token = token
        self.timeout = timeout
        self.max_rows = max_rows
        self.queries = 0
        self.errors = 0
        server = self

        class Handler(_Handler):
            owner = server

        # The engine thread must not wait long for the GIL while a query thread runs Python:
        # hand it over every 0.5 ms instead of the default 5 ms.
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self.httpd = ThreadingHTTPServer((bind, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{bind}:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: SQLServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args) -> None:  # keep the engine's terminal clean
        pass

    def _send(self, code: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj: object, headers: dict | None = None) -> None:
        self._send(code, json.dumps(obj, default=str).encode(), "application/json", headers)

    def _authorized(self) -> bool:
        token = self.owner.token
        if token is None:
            return True
        got = self.headers.get("Authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return True
        self._json(401, {"error": "missing or wrong bearer token"}, {"WWW-Authenticate": "Bearer"})
        return False

    def do_GET(self) -> None:
        if not self._authorized():
            return
        if self.path == "/health":
            with self.owner.snapshots.reader() as view:
                self._json(
                    200,
                    {"tick": view.tick, "queries": self.owner.queries, "errors": self.owner.errors},
                )
        elif self.path == "/tables":
            with self.owner.snapshots.reader() as view:
                tables = tables_for(view)
                self._json(
                    200,
                    {
                        "tick": view.tick,
                        "tables": {
                            n: [{"name": f.name, "type": str(f.type)} for f in t.schema]
                            for n, t in tables.items()
                        },
                    },
                )
        else:
            self._json(404, {"error": f"no such endpoint {self.path}; use POST /sql"})

    def do_POST(self) -> None:
        if not self._authorized():
            return
        if self.path != "/sql":
            self._json(404, {"error": f"no such endpoint {self.path}; use POST /sql"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode("utf-8", errors="replace")
        query = body
        if self.headers.get("Content-Type", "").startswith("application/json"):
            try:
                query = json.loads(body)["query"]
            except (ValueError, KeyError, TypeError):
                self._json(400, {"error": 'JSON body must be {"query": "..."}'})
                return
        o = self.owner
        try:
            with o.snapshots.reader() as view:
                res = execute(
                    view, query, timeout=o.timeout, max_rows=o.max_rows, threads=o.threads
                )
        except SQLError as e:
            o.errors += 1
            self._json(400, {"error": str(e)})
            return
        o.queries += 1
        headers = {"X-Vecswim-Tick": str(res.tick), "X-Vecswim-Truncated": str(res.truncated)}
        accept = self.headers.get("Accept", "")
        if ARROW_STREAM in accept:
            sink = pa.BufferOutputStream()
            with ipc.new_stream(sink, res.table.schema) as w:
                w.write_table(res.table)
            self._send(200, sink.getvalue().to_pybytes(), ARROW_STREAM, headers)
        elif "text/csv" in accept:
            buf = io.BytesIO()
            pacsv.write_csv(res.table, buf)
            self._send(200, buf.getvalue(), "text/csv", headers)
        else:
            rows = [[_jsonable(v) for v in r.values()] for r in res.table.to_pylist()]
            self._json(
                200,
                {
                    "tick": res.tick,
                    "columns": res.table.column_names,
                    "types": [str(t) for t in res.table.schema.types],
                    "rows": rows,
                    "truncated": res.truncated,
                },
                headers,
            )


def _jsonable(v: object) -> object:
    if isinstance(v, Decimal):  # DuckDB sums integers as HUGEINT/DECIMAL
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("Infinity" if v > 0 else "-Infinity")
    return v
