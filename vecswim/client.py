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


# -- live lanes ------------------------------------------------------------------------------
def watch(
    url: str,
    node: str,
    lanes: list[str],
    token: str | None = None,
    sync: bool = True,
    count: int | None = None,
    seconds: float | None = None,
    raw: bool = False,
    out=None,
) -> int:
    """Print live changes of ``node``'s ``lanes`` (all of them when empty: every state
    column of an agent, ``agents`` of a type, ``pulse`` of the meta node) from the engine at
    ``url`` over the JSON WebSocket, one line per change, until ``count`` changes or
    ``seconds`` pass (or Ctrl-C). Returns the number of changes printed. Raises
    :class:`ClientError` with one line if the engine is unreachable or a lane does not
    exist."""
    import asyncio

    out = out or sys.stdout
    if not lanes:
        lanes = _default_lanes(url, node, token)
    return asyncio.run(_watch(url, node, lanes, token, sync, count, seconds, raw, out))


def _default_lanes(url: str, node: str, token: str | None) -> list[str]:
    if node == "swimos:meta:mesh":
        return ["pulse"]
    parts = node.split("/")
    if len(parts) == 2:
        return ["agents"]
    body, _ = _request(f"{url.rstrip('/')}/live/schema", token)
    types = json.loads(body)["types"]
    if len(parts) != 3 or parts[1] not in types:
        raise ClientError(f"no node {node}: use /<agent type>/<key> with one of {sorted(types)}")
    return list(types[parts[1]]["columns"])


async def _watch(url, node, lanes, token, sync, count, seconds, raw, out) -> int:
    import asyncio

    import aiohttp

    ws_url = "ws" + url.rstrip("/")[4:] + "/live"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    shown = 0
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(ws_url, headers=headers, heartbeat=30) as ws,
        ):
            for lane in lanes:
                op = {"op": "sync" if sync else "link", "node": node, "lane": lane}
                await ws.send_str(json.dumps(op))
            deadline = None if seconds is None else asyncio.get_running_loop().time() + seconds
            while count is None or shown < count:
                left = None if deadline is None else deadline - asyncio.get_running_loop().time()
                if left is not None and left <= 0:
                    break
                try:
                    msg = await ws.receive(timeout=left)
                except TimeoutError:
                    break
                if msg.type != aiohttp.WSMsgType.TEXT:
                    why = ws.close_code and f" ({ws.close_code}: {msg.extra or ''})"
                    raise ClientError(f"the engine closed the connection{why or ''}")
                frame = json.loads(msg.data)
                tag = frame.get("tag")
                if tag == "error":
                    raise ClientError(frame["error"])
                if tag == "unlinked" and frame.get("reason"):
                    what = "node" if frame["reason"] == "nodeNotFound" else "lane"
                    raise ClientError(f"no such {what}: {frame['node']} {frame['lane']}")
                if tag != "event":
                    continue
                for line in _lines(frame, raw, msg.data):
                    if count is not None and shown >= count:
                        break
                    print(line, file=out, flush=True)
                    shown += 1
    except aiohttp.ClientResponseError as e:
        raise ClientError(f"{ws_url}: HTTP {e.status} {e.message}") from None
    except (aiohttp.ClientConnectionError, OSError) as e:
        if isinstance(e, aiohttp.ClientConnectorError | ConnectionRefusedError):
            raise ClientError(
                f"no engine is listening at {url}: start one with 'vecswim run SCENARIO' "
                "(it serves on 127.0.0.1:7654; see --sql-port) or give its --url"
            ) from None
        raise ClientError(f"lost the connection to {url} ({e})") from None
    return shown


def _lines(frame: dict, raw: bool, text: str) -> list[str]:
    if raw:
        return [text]
    head = f"tick {frame['tick']}  {frame['node']} {frame['lane']}"
    if "value" in frame:
        return [f"{head} = {json.dumps(frame['value'])}"]
    lines = [f"{head}  {json.dumps(k)}: {json.dumps(v)}" for k, v in frame.get("updates", [])]
    lines += [f"{head}  {json.dumps(k)} removed" for k in frame.get("removes", [])]
    return lines
