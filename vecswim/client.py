"""Client side of the SQL endpoint (used by ``vecswim sql``)."""

from __future__ import annotations

import io
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from vecswim.server import ARROW_STREAM


class ClientError(Exception):
    """The endpoint could not be reached or refused the query; one line for the user."""


@dataclass
class QueryResult:
    table: pa.Table
    tick: int
    truncated: bool


def _request(
    url: str, token: str | None, data: bytes | None = None, accept: str = "", busy_retries: int = 5
) -> tuple:
    """One request; an engine that answers 503 (too many queries) is asked again after its
    Retry-After, up to ``busy_retries`` times."""
    base = url.rsplit("/", 1)[0]
    try:
        req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    except ValueError as e:  # not a URL at all
        raise ClientError(f"bad --url {base!r} ({e}); e.g. http://127.0.0.1:7654") from None
    if data is not None:
        req.add_header("Content-Type", "text/plain; charset=utf-8")
    if accept:
        req.add_header("Accept", accept)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for attempt in range(busy_retries + 1):
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            if e.code == 503 and attempt < busy_retries:
                time.sleep(_retry_after(e.headers.get("Retry-After")))
                continue
            try:
                msg = json.loads(e.read())["error"]
            except (ValueError, KeyError, TypeError):
                msg = f"HTTP {e.code} from {url}"
            raise ClientError(msg) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, ConnectionRefusedError):
                raise ClientError(
                    f"no engine is listening at {base}: start one with 'vecswim run SCENARIO' "
                    "(it serves SQL on 127.0.0.1:7654; see --sql-port), give its --url, "
                    "or query a checkpoint offline with 'vecswim sql --checkpoint DIR'"
                ) from None
            raise ClientError(f"cannot reach {url}: {reason}") from None
    raise AssertionError("unreachable")


def _retry_after(value: str | None) -> float:
    try:
        return min(max(float(value or 1), 0.05), 10.0)
    except ValueError:
        return 1.0


def query(url: str, sql: str, token: str | None = None) -> QueryResult:
    """Run ``sql`` on the engine at ``url``; the result arrives as an Arrow stream."""
    body, headers = _request(f"{url.rstrip('/')}/sql", token, sql.encode(), ARROW_STREAM)
    table = ipc.open_stream(pa.py_buffer(body)).read_all()
    return QueryResult(
        table, int(headers.get("X-Vecswim-Tick", -1)), headers.get("X-Vecswim-Truncated") == "True"
    )


def tables(url: str, token: str | None = None) -> tuple[int, dict]:
    body, _ = _request(f"{url.rstrip('/')}/tables", token)
    d = json.loads(body)
    return d["tick"], d["tables"]


def write(result: QueryResult, fmt: str, output: str | None) -> None:
    """Print or save ``result`` as a table (rich), CSV, JSON lines or Parquet."""
    t = result.table
    if fmt == "parquet":
        pq.write_table(t, output)
    elif fmt == "csv":
        buf = io.BytesIO()
        pacsv.write_csv(t, buf)
        _out(buf.getvalue(), output)
    elif fmt == "json":
        lines = "".join(json.dumps(r, default=str) + "\n" for r in t.to_pylist())
        _out(lines.encode(), output)
    else:
        from rich.console import Console
        from rich.table import Table

        rt = Table(
            *t.column_names,
            caption=f"{t.num_rows:,} rows at tick {result.tick}"
            + (" (truncated by the row limit)" if result.truncated else ""),
        )
        for r in t.to_pylist():
            rt.add_row(*("NULL" if v is None else str(v) for v in r.values()))
        Console(file=open(output, "w") if output else sys.stdout).print(rt)  # noqa: SIM115


def _out(data: bytes, output: str | None) -> None:
    if output:
        with open(output, "wb") as fh:
            fh.write(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
