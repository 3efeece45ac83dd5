"""The live page (``vecswim/static``) in a real headless Chromium, against a real engine.

The browser is Debian's ``chromium`` (or ``$VECSWIM_CHROMIUM``), driven over the Chrome
DevTools protocol with aiohttp's WebSocket client: no extra Python package, no browser
download, and only stable protocol methods (``Runtime.evaluate``, ``Input.dispatchMouseEvent``,
``Page.captureScreenshot``). A missing browser fails the test (CI installs it).

To make every comparison exact, the test feeds the engine itself, one batch per tick, and can
park the feed: the engine then runs empty ticks, so the state at every tick from the parking
tick P on is the same, and whatever the page shows at a tick >= P must equal SQL at any tick
>= P. Live map-lane updates follow SwimOS semantics (the sync value is the state at the sync
tick; then the emissions, deadbands applied; a child that moves in arrives with its last
emitted values), so the children table after live updates is checked against that model:
the synced state, the emission log (complete here) and the moves the test fed.

``VECSWIM_PAGE_SCREENSHOT=docs/live-page.png python -m pytest tests/test_page.py`` refreshes
the README's screenshot; otherwise it goes to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow as pa
import pytest
from vecswim.scenarios import engines, pollution

import vecswim as vs
from vecswim.server import SQLServer
from vecswim.snapshot import Snapshots

TOKEN = "page-test-token"
REFRESH_MS = 500  # the page's SQL refresh period (?refresh=), default 1000


# -- the browser -----------------------------------------------------------------------------
def chromium_executable() -> str:
    exe = os.environ.get("VECSWIM_CHROMIUM")
    if exe:
        return exe
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "no Chromium for the page test: apt-get install chromium (Debian/Ubuntu) or set "
        "VECSWIM_CHROMIUM to a Chrome/Chromium executable"
    )


class Browser:
    """One headless Chromium with one page, over the DevTools protocol (flattened session)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.events: list[dict] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._n = 0

    async def __aenter__(self) -> Browser:
        profile = self.workdir / "profile"
        profile.mkdir()
        self._log = open(self.workdir / "chromium.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                chromium_executable(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--no-default-browser-check",
                "--hide-scrollbars",
                "--mute-audio",
                # a page that is not the focused tab gets its timers and tasks throttled, the
                # more so the busier the machine: the page would stall
                "--disable-background-timer-throttling",
                "--disable-backgrounding-occluded-windows",
                "--disable-renderer-backgrounding",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and len(port_file.read_text().split()) == 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._log.flush()
                log = (self.workdir / "chromium.log").read_text(errors="replace")[-2000:]
                await self._kill(grace=0)
                raise AssertionError(f"Chromium did not start its DevTools endpoint:\n{log}")
            await asyncio.sleep(0.05)
        port, path = port_file.read_text().split()
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0)
        self._reader = asyncio.get_running_loop().create_task(self._read())
        target = await self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        att = await self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, page=False
        )
        self.session = att["sessionId"]
        for method in ("Page.enable", "Runtime.enable", "Network.enable", "Log.enable"):
            await self.send(method)
        await self.send("Page.bringToFront")
        await self.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        return self

    async def __aexit__(self, *exc) -> None:
        # Browser.close lets Chromium end and reap its own helper processes (killed from
        # outside, they would be left as zombies where PID 1 does not reap)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close", page=False), 5)
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader
        await self.ws.close()
        await self.http.close()
        await self._kill()

    async def _kill(self, grace: float = 10.0) -> None:
        """Wait ``grace`` seconds for the browser to exit; then end what is left of its
        session (only its own processes: it was started in a new session)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(self.proc.wait, grace)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self.proc.wait, 10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # helpers that outlived it, if any
        self._log.close()

    async def _read(self) -> None:
        async for msg in self.ws:
            d = json.loads(msg.data)
            if "id" in d:
                fut = self._pending.pop(d["id"], None)
                if fut is not None and not fut.done():
                    if "error" in d:
                        fut.set_exception(AssertionError(f"DevTools: {d['error']}"))
                    else:
                        fut.set_result(d.get("result", {}))
            else:
                self.events.append(d)

    async def send(self, method: str, params: dict | None = None, page: bool = True) -> dict:
        self._n += 1
        msg: dict = {"id": self._n, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._n] = fut
        await self.ws.send_str(json.dumps(msg))
        return await asyncio.wait_for(fut, 30)

    async def eval(self, expression: str) -> object:
        r = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in r:
            raise AssertionError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def open(self, url: str, width: int = 1280, height: int = 1000) -> None:
        await self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        seen = len(self.events)
        nav = await self.send("Page.navigate", {"url": url})
        assert "errorText" not in nav, nav
        deadline = time.monotonic() + 20
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events[seen:]):
            assert time.monotonic() < deadline, f"{url} did not load"
            await asyncio.sleep(0.02)

    async def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (scrolled into view)."""
        x, y = await self.eval(
            f"""(() => {{
                const e = document.querySelector({json.dumps(selector)});
                e.scrollIntoView({{block: 'center'}});
                const r = e.getBoundingClientRect();
                return [r.x + r.width / 2, r.y + r.height / 2];
            }})()"""
        )
        await self.send("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})
        for kind in ("mousePressed", "mouseReleased"):
            await self.send(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            )

    async def screenshot(self, path: Path) -> None:
        shot = await self.send("Page.captureScreenshot", {"format": "png"})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(shot["data"]))

    def problems(self) -> list[str]:
        """Uncaught exceptions, console errors and warnings, failed loads (browser log)."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {json.dumps(p['exceptionDetails'])[:500]}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning"):
                out.append(f"console.{p['type']}: {json.dumps(p.get('args'))[:500]}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def requested(self) -> list[str]:
        """Every URL the page asked for (HTTP and WebSocket)."""
        urls = []
        for e in self.events:
            if e.get("method") == "Network.requestWillBeSent":
                urls.append(e["params"]["request"]["url"])
            elif e.get("method") == "Network.webSocketCreated":
                urls.append(e["params"]["url"])
        return urls


# What the page shows, read from the DOM: texts as displayed, raw values as the page holds
# them (its data-value attributes: JSON text, parsed here so big integers stay exact).
SCRAPE = """(() => {
  const $$ = (sel, root = document) => [...root.querySelectorAll(sel)];
  const $ = (sel, root = document) => root.querySelector(sel);
  const txt = (e) => (e ? e.textContent.trim() : null);
  const tick = (e) => (e && e.dataset.tick ? Number(e.dataset.tick) : null);
  const val = (e) => (e && e.dataset.value !== undefined ? e.dataset.value : null);
  const fig = $('#figures');
  const kids = $('#children');
  return {
    now: tick($('#now-tick')),
    conn: txt($('#conn')),
    error: $('#error').hidden ? '' : txt($('#error')),
    refreshes: Number(document.body.dataset.refreshes || 0),
    figures: {
      src: txt($('.src', fig)),
      tick: tick($('.tick', fig)),
      cards: Object.fromEntries($$('.card', fig).map((c) =>
        [c.dataset.fig, {text: txt($('.value', c)), value: val(c)}])),
      links: {text: txt($('.sub[data-fig=links]', fig)),
              value: val($('.sub[data-fig=links]', fig))},
      bytype: Object.fromEntries($$('.bytype .chip', fig).map((c) =>
        [c.dataset.type, {text: txt($('b', c)), value: val(c)}])),
    },
    status: $$('#status .group').map((g) => ({
      type: g.dataset.type, column: g.dataset.column, tick: tick($('.tick', g)),
      rows: $$('tbody tr', g).map((r) => ({
        value: r.dataset.value, text: txt(r.cells[0]),
        count: val($('.count', r)), countText: txt($('.count', r))})),
    })),
    top: {
      type: $('#top table').dataset.type || null, column: $('#top table').dataset.column || null,
      tick: tick($('#top .tick')),
      rows: $$('#top tbody tr').map((r) => ({
        key: r.dataset.key, keyText: txt(r.cells[1]),
        value: val($('.v', r)), text: txt($('.v', r))})),
    },
    parents: $$('#parents .link').map((l) => ({
      link: l.dataset.link, tick: tick($('.tick', l)), count: txt($('.count', l)),
      buttons: $$('.parent-list button', l).map((b) => ({
        key: b.dataset.key, n: val($('.n', b)), nText: txt($('.n', b)),
        selected: b.classList.contains('selected')})),
    })),
    children: {
      hidden: kids.hidden, link: kids.dataset.link || null, parent: kids.dataset.parent || null,
      synced: kids.dataset.synced ? Number(kids.dataset.synced) : null,
      frames: Number(kids.dataset.frames || 0), tick: tick($('.tick', kids)),
      state: txt($('.state', kids)),
      cols: $$('thead th', kids).map(txt),
      rows: $$('tbody tr', kids).map((r) => ({
        key: r.dataset.key, keyText: txt(r.cells[0]),
        cells: Object.fromEntries($$('td[data-col]', r).map((c) =>
          [c.dataset.col, {text: txt(c), value: val(c)}])),
      })),
      parentValues: Object.fromEntries($$('.parent-values .chip', kids).map((c) =>
        [c.dataset.lane, {text: txt($('b', c)), value: val(c), tick: tick(c)}])),
    },
  };
})()"""


async def scrape(browser: Browser) -> dict:
    return await browser.eval(SCRAPE)


async def wait_for(browser: Browser, what: str, pred, timeout: float = 20.0) -> dict:
    """Scrape until ``pred(page)`` holds; fail with the last scrape."""
    deadline = time.monotonic() + timeout
    page = await scrape(browser)
    while not pred(page):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out waiting for {what}; page: {json.dumps(page)[:3000]}; "
                f"browser: {browser.problems()[:5]}"
            )
        await asyncio.sleep(0.1)
        page = await scrape(browser)
    return page


# -- SQL, formatting -------------------------------------------------------------------------
def sql(url: str, query: str) -> dict:
    req = urllib.request.Request(f"{url}/sql", data=query.encode(), method="POST")
    req.add_header("Accept", "application/json")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"SQL {query!r}: {e.code} {e.read()!r}") from None


async def asql(url: str, query: str) -> dict:
    return await asyncio.to_thread(sql, url, query)


def as_dicts(doc: dict) -> list[dict]:
    return [dict(zip(doc["columns"], r, strict=True)) for r in doc["rows"]]


def js_fixed2(v: float) -> str:
    """JavaScript's ``v.toFixed(2)``: the exact binary value, ties away from zero."""
    return str(Decimal(v).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def shown(v: object, arrow_type: str) -> str:
    """How the page shows a table value of an Arrow type (its ``fmt``)."""
    if v is None:
        return "–"
    if arrow_type in ("float", "double", "halffloat"):
        return js_fixed2(float(v))
    return str(v)


def same(page_raw: object, sql_value: object, arrow_type: str) -> bool:
    """A value the page got (JSON from the SQL or the live endpoint) equals SQL's. Live frames
    write float32 in its shortest form, SQL as the exact double: equal as float32."""
    if arrow_type == "float" and page_raw is not None and sql_value is not None:
        return np.float32(page_raw) == np.float32(sql_value)
    if isinstance(page_raw, str) and not isinstance(sql_value, str):
        return page_raw == str(sql_value)  # a big integer the page keeps as text
    return page_raw == sql_value


def grouped(n: int) -> str:
    return f"{n:,}"


# -- the engine's input ----------------------------------------------------------------------
class Feed:
    """The engine's source: one generated batch per tick (plus a few dead letters now and
    then), recorded with its tick; ``park()`` makes it return empty ticks (the state stops
    changing), ``resume()`` feeds again, ``stop()`` ends the run."""

    def __init__(self, engine: vs.Engine, gen, per_tick: int, pause: float) -> None:
        self.engine = engine
        self.gen = gen
        self.per_tick = per_tick
        self.pause = pause
        self.log: list[tuple[int, pa.RecordBatch]] = []
        self.dead = 0
        self._go = threading.Event()
        self._go.set()
        self._parked = threading.Event()
        self._stop = threading.Event()

    def poll(self, max_events: int, timeout: float):
        if self._stop.is_set():
            return None
        if not self._go.is_set():
            self._parked.set()
            time.sleep(timeout)
            return {}
        time.sleep(self.pause)
        batch = self.gen.make(self.per_tick)["engine"]
        self.log.append((self.engine.tick_id + 1, batch))
        if len(self.log) % 20 == 0:  # non-finite temperatures: dead letters, no state change
            bad = batch.slice(0, 2).set_column(
                1, "engine_temp", pa.array([float("nan"), float("inf")], pa.float32())
            )
            self.dead += 2
            return {"engine": [batch, bad]}
        return {"engine": batch}

    def park(self) -> int:
        """Stop feeding; returns the last tick that had events (the state is final from it)."""
        self._parked.clear()
        self._go.clear()
        assert self._parked.wait(10), "the engine did not come back for events"
        return self.log[-1][0]

    def resume(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._stop.set()
        self._go.set()


class Runner(threading.Thread):
    """``engine.run(feed)`` in a thread, keeping what it raised."""

    def __init__(self, engine: vs.Engine, feed: Feed) -> None:
        super().__init__(name="engine", daemon=True)
        self.engine, self.feed = engine, feed
        self.errors: list[BaseException] = []
        self.start()

    def run(self) -> None:
        try:
            self.engine.run(self.feed, max_events=10**6, tick_ms=10)
        except BaseException as e:
            self.errors.append(e)
            raise


async def wait_sql_tick(url: str, tick: int, timeout: float = 10.0) -> int:
    """Until the published snapshot is at ``tick`` or later (it only moves forward)."""
    deadline = time.monotonic() + timeout
    while True:
        got = (await asql(url, "SELECT 1"))["tick"]
        if got >= tick:
            return got
        assert time.monotonic() < deadline, f"SQL stayed at tick {got} < {tick}"
        await asyncio.sleep(0.02)


# -- comparisons -----------------------------------------------------------------------------
async def check_figures(url: str, page: dict, since: int, feed: Feed) -> None:
    fig = page["figures"]
    assert fig["src"] == "pulse" and fig["tick"] >= since, fig
    m = {r["name"]: r["value"] for r in as_dicts(await asql(url, "SELECT * FROM metrics"))}
    counts = as_dicts(
        await asql(
            url,
            "SELECT (SELECT count(*) FROM engine) AS engine, (SELECT count(*) FROM fleet) AS fleet",
        )
    )[0]
    cards = fig["cards"]
    for name in ("agents", "emitted", "dead_letters", "events"):
        assert json.loads(cards[name]["value"]) == m[name], (name, cards[name], m[name])
        assert cards[name]["text"] == grouped(m[name]), (name, cards[name])
    assert m["agents"] == counts["engine"] + counts["fleet"]
    assert m["dead_letters"] == feed.dead > 0
    for t, n in counts.items():
        assert json.loads(fig["bytype"][t]["value"]) == n, (t, fig["bytype"])
        assert fig["bytype"][t]["text"] == grouped(n)
    for name in ("tick_p50_ms", "tick_p99_ms"):
        v = json.loads(cards[name]["value"])
        assert isinstance(v, float) and v >= 0 and cards[name]["text"] == js_fixed2(v), cards
    assert json.loads(cards["connections"]["value"]) >= 1


async def check_status_and_top(url: str, page: dict, since: int, types: dict) -> None:
    (group,) = page["status"]  # engines: engine.status only
    assert (group["type"], group["column"]) == ("engine", "status") and group["tick"] >= since
    doc = await asql(url, 'SELECT "status", count(*) AS agents FROM "engine" GROUP BY 1 ORDER BY 1')
    assert doc["tick"] >= since
    want = [(r[0], r[1]) for r in doc["rows"]]
    got = [(json.loads(r["value"]), json.loads(r["count"])) for r in group["rows"]]
    assert got == want and len(want) == 2, (got, want)
    assert [r["countText"] for r in group["rows"]] == [str(n) for _, n in want]

    top = page["top"]
    col = top["column"]
    assert top["type"] == "engine" and top["tick"] >= since
    n = len(top["rows"])
    doc = await asql(
        url,
        f"SELECT engine_id, {col} FROM engine ORDER BY {col} DESC NULLS LAST, engine_id LIMIT {n}",
    )
    assert len(doc["rows"]) == n
    for shown_row, (key, v) in zip(top["rows"], doc["rows"], strict=True):
        assert shown_row["key"] == str(key) == shown_row["keyText"], (shown_row, key)
        raw = json.loads(shown_row["value"])
        assert same(raw, v, types["engine"][col]), (shown_row, v)
        assert shown_row["text"] == shown(raw, types["engine"][col]), shown_row


async def check_parents(url: str, page: dict, since: int) -> None:
    (pl,) = page["parents"]
    assert pl["link"] == "engine_fleet" and pl["tick"] >= since
    doc = await asql(
        url,
        "SELECT parent_fleet_id, count(*) FROM engine_fleet GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 50",
    )
    want = sorted(((str(k), n) for k, n in doc["rows"]), key=lambda kn: int(kn[0]))
    assert [(b["key"], json.loads(b["n"])) for b in pl["buttons"]] == want  # in key order
    assert [b["nText"] for b in pl["buttons"]] == [str(n) for _, n in want]
    assert pl["count"].startswith(f"{len(want)} parents")


async def children_in_sql(url: str, fleet: str) -> tuple[int, dict[str, dict]]:
    doc = await asql(
        url,
        "SELECT e.* FROM engine e JOIN engine_fleet l ON l.child_engine_id = e.engine_id "
        f"WHERE l.parent_fleet_id = {fleet}",
    )
    return doc["tick"], {str(r["engine_id"]): r for r in as_dicts(doc)}


def check_children(kids: dict, want: dict[str, dict], types: dict, cols: list[str]) -> None:
    """The children table shows exactly ``want`` (key -> row), sorted by key."""
    keys = [r["key"] for r in kids["rows"]]
    assert keys == sorted(want, key=int), "children differ from SQL: " + str(
        (set(keys) - set(want), set(want) - set(keys))
    )
    for row in kids["rows"]:
        assert row["keyText"] == row["key"]
        for c in cols:
            raw = json.loads(row["cells"][c]["value"])
            assert same(raw, want[row["key"]][c], types[c]), (row["key"], c, raw, want[row["key"]])
            assert row["cells"][c]["text"] == shown(raw, types[c]), (row["key"], c, row["cells"])


def check_parent_values(kids: dict, want: dict, types: dict) -> None:
    for c, v in want.items():
        if c == "fleet_id":
            continue
        chip = kids["parentValues"][c]
        raw = json.loads(chip["value"])
        assert same(raw, v, types[c]), (c, chip, v)
        assert chip["text"] == shown(raw, types[c]), (c, chip)


def moved_in(feed: Feed, after: int, fleet: int, members_then: set[str]) -> tuple[set, set]:
    """Replay the fed events after tick ``after``: the children that moved into ``fleet``
    (a tick whose last event for them named it while they were elsewhere) and the members at
    the end. Dead-letter rows are not in the log."""
    inside = dict.fromkeys(members_then, True)
    came = set()
    for tick, batch in feed.log:
        if tick <= after:
            continue
        ids = batch.column("engine_id").to_pylist()
        fleets = batch.column("fleet_id").to_pylist()
        last = dict(zip(ids, fleets, strict=True))  # the last event of each engine wins
        for e, f in last.items():
            k = str(e)
            now_in = f == fleet
            if now_in and not inside.get(k, False):
                came.add(k)
            inside[k] = now_in
    return came, {k for k, v in inside.items() if v}


def expected_live(
    synced: dict[str, dict],
    sync_tick: int,
    emissions: list[dict],
    came: set,
    members: set,
    cols: list[str],
) -> dict[str, dict]:
    """The lane after sync + live frames: a child that moved in or emitted since the sync
    shows its last emitted row (its latest emission: every agent emits when created), the
    others their state at the sync."""
    latest = {str(r["engine_id"]): r for r in emissions}  # oldest first: the last one wins
    out = {}
    for k in members:
        if k in came or k not in synced or latest[k]["tick"] > sync_tick:
            out[k] = {c: latest[k][c] for c in cols}
        else:
            out[k] = {c: synced[k][c] for c in cols}
    return out


# -- the test --------------------------------------------------------------------------------
def test_live_page_in_headless_chromium(tmp_path):
    chromium_executable()  # fail first and loudly without a browser
    agents, fleets = 2000, 20
    gen = engines.Generator(agents, seed=11, fleets=fleets, relink=0.03, period=8.0)
    eng = vs.Engine(
        engines.AGENT_TYPES, engines.LINKS, capacity={"engine": agents, "fleet": fleets}
    )
    srv = SQLServer(Snapshots(eng).attach(), port=0, token=TOKEN)
    feed = Feed(eng, gen, per_tick=400, pause=0.05)
    runner = Runner(eng, feed)
    shot = Path(os.environ.get("VECSWIM_PAGE_SCREENSHOT") or tmp_path / "live-page.png")
    try:
        asyncio.run(drive(srv.url, feed, tmp_path, shot))
    finally:
        feed.stop()
        runner.join(30)
        srv.close()
    assert not runner.errors, runner.errors
    assert shot.stat().st_size > 10_000


async def drive(url: str, feed: Feed, tmp: Path, shot: Path) -> None:
    tables = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/tables", headers={"Authorization": f"Bearer {TOKEN}"})
        ).read()
    )["tables"]
    types = {t: {c["name"]: c["type"] for c in tables[t]} for t in ("engine", "fleet")}
    cols = ["engine_temp", "fan_temp", "coolant_vol", "status"]
    async with Browser(tmp) as b:
        t0 = time.monotonic()
        await b.open(f"{url}/?token={TOKEN}&refresh={REFRESH_MS}")

        # 1. everything shows up, from the pulse lane and SQL, and the figures move
        first = await wait_for(
            b,
            "the page to fill",
            lambda p: (
                p["figures"]["src"] == "pulse"
                and p["status"]
                and p["status"][0]["rows"]
                and p["top"]["rows"]
                and p["parents"]
                and p["parents"][0]["buttons"]
                and p["conn"] == "live"
            ),
        )
        assert [g["type"] for g in first["status"]] == ["engine"]
        assert [pl["link"] for pl in first["parents"]] == ["engine_fleet"]
        ev0 = json.loads(first["figures"]["cards"]["events"]["value"])
        later = await wait_for(
            b,
            "the figures to change",
            lambda p: (
                p["figures"]["tick"] > first["figures"]["tick"]
                and json.loads(p["figures"]["cards"]["events"]["value"]) > ev0
                and p["top"]["tick"] > first["top"]["tick"]
                and p["status"][0]["tick"] > first["status"][0]["tick"]
            ),
            timeout=10,
        )
        assert json.loads(later["figures"]["cards"]["events_per_s"]["value"]) > 0
        assert later["now"] >= later["figures"]["tick"]

        # 2. park the feed, click the biggest fleet: its children equal SQL at its tick
        parked = feed.park()
        await wait_sql_tick(url, parked)
        page = await wait_for(
            b, "the parents list at the parked tick", lambda p: p["parents"][0]["tick"] >= parked
        )
        fleet_a = max(page["parents"][0]["buttons"], key=lambda bt: json.loads(bt["n"]))["key"]
        await b.click(f'#parents button[data-key="{fleet_a}"]')
        page = await wait_for(
            b,
            "fleet A's children to sync",
            lambda p: p["children"]["parent"] == fleet_a and p["children"]["synced"] is not None,
        )
        kids = page["children"]
        assert kids["synced"] >= parked and kids["state"] == "synced" and kids["tick"] >= parked
        assert kids["cols"] == ["engine_id", *cols]
        tick, synced = await children_in_sql(url, fleet_a)
        assert tick >= parked and len(synced) > 50
        check_children(kids, synced, types["engine"], cols)
        (fleet_row,) = as_dicts(await asql(url, f"SELECT * FROM fleet WHERE fleet_id = {fleet_a}"))
        page = await wait_for(
            b,
            "fleet A's own lanes",
            lambda p: all(v["tick"] is not None for v in p["children"]["parentValues"].values()),
        )
        check_parent_values(page["children"], fleet_row, types["fleet"])
        assert [bt["selected"] for bt in page["parents"][0]["buttons"]].count(True) == 1
        sync_tick = kids["synced"]

        # 3. feed again: the children update live (cells change, children come and go)
        feed.resume()
        await wait_for(
            b,
            "live frames for fleet A",
            lambda p: (
                p["children"]["frames"] >= kids["frames"] + 5
                and p["children"]["tick"] > kids["tick"] + 20
            ),
            timeout=15,
        )
        await asyncio.sleep(1.0)  # a while longer: children move in and out
        live = await scrape(b)
        by_key = {r["key"]: r["cells"] for r in kids["rows"]}
        rows = live["children"]["rows"]
        changed = sum(by_key.get(r["key"], r["cells"]) != r["cells"] for r in rows)
        assert changed > 0
        assert live["children"]["state"] == "synced" and live["top"]["column"] == "engine_temp"
        await b.screenshot(shot)

        # 4. park again, pick another top-N column and N: every panel at a tick >= the
        # parking tick equals SQL
        parked = feed.park()
        await wait_sql_tick(url, parked)
        await b.eval(
            """(() => {
              const f = document.querySelector('#top form');
              f.elements.column.value = 'fan_temp';
              f.elements.column.dispatchEvent(new Event('change'));
              f.elements.n.value = '7';
              f.elements.n.dispatchEvent(new Event('change'));
            })()"""
        )
        page = await wait_for(
            b,
            "every panel at the parked tick",
            lambda p: (
                p["top"]["column"] == "fan_temp"
                and len(p["top"]["rows"]) == 7
                and p["figures"]["tick"] >= parked
                and p["status"][0]["tick"] >= parked
                and p["top"]["tick"] >= parked
                and p["parents"][0]["tick"] >= parked
                and json.loads(p["figures"]["cards"]["events"]["value"])
                == sum(batch.num_rows for _, batch in feed.log)
            ),
        )
        await check_figures(url, page, parked, feed)
        await check_status_and_top(url, page, parked, types)
        await check_parents(url, page, parked)

        # the live-updated children: the sync state, then emissions and moves
        tick, now = await children_in_sql(url, fleet_a)
        came, members = moved_in(feed, sync_tick, int(fleet_a), set(synced))
        assert members == set(now), "the test's replay of the moves disagrees with SQL"
        counts = as_dicts(
            await asql(
                url,
                "SELECT (SELECT count(*) FROM emissions_engine) + (SELECT count(*) FROM "
                "emissions_fleet) AS logged, (SELECT value FROM metrics WHERE name = 'emitted') "
                "AS emitted",
            )
        )[0]
        assert counts["logged"] == counts["emitted"], "the emission log dropped rows"
        keys = ", ".join(now) or "NULL"
        emissions = as_dicts(
            await asql(
                url,
                f"SELECT * FROM emissions_engine WHERE engine_id IN ({keys}) ORDER BY tick",
            )
        )
        want = expected_live(synced, sync_tick, emissions, came, members, cols)
        assert came and set(synced) - members, "no child moved in or out while watched"
        check_children(page["children"], want, types["engine"], cols)
        assert page["children"]["tick"] <= parked

        # 5. another parent: the first is unlinked (the pulse counts the page's links), the
        # new one's children and values equal SQL
        fleet_b = next(bt["key"] for bt in page["parents"][0]["buttons"] if bt["key"] != fleet_a)
        await b.click(f'#parents button[data-key="{fleet_b}"]')
        page = await wait_for(
            b,
            "fleet B's children to sync",
            lambda p: (
                p["children"]["parent"] == fleet_b
                and p["children"]["synced"] is not None
                and all(v["tick"] is not None for v in p["children"]["parentValues"].values())
            ),
        )
        tick, want = await children_in_sql(url, fleet_b)
        check_children(page["children"], want, types["engine"], cols)
        (fleet_row,) = as_dicts(await asql(url, f"SELECT * FROM fleet WHERE fleet_id = {fleet_b}"))
        check_parent_values(page["children"], fleet_row, types["fleet"])
        lanes = 1 + 1 + len(page["children"]["parentValues"])  # pulse, children, fleet columns
        page = await wait_for(
            b,
            f"the pulse to count {lanes} links (fleet A's lanes unlinked)",
            lambda p: json.loads(p["figures"]["links"]["value"]) == lanes,
            timeout=5,
        )
        assert json.loads(page["figures"]["cards"]["connections"]["value"]) == 1
        selected = [bt["key"] for bt in page["parents"][0]["buttons"] if bt["selected"]]
        assert selected == [fleet_b]

        # 6. nothing failed, nothing came from elsewhere
        assert page["error"] == "", page["error"]
        assert b.problems() == []
        origin = url.split("://", 1)[1]
        foreign = [
            u
            for u in b.requested()
            if not u.startswith("data:") and u.split("://", 1)[-1].split("/")[0] != origin
        ]
        assert foreign == [], foreign
        assert any(u.startswith(f"ws://{origin}/live?token=") for u in b.requested())
        assert time.monotonic() - t0 < 50


def test_page_is_generic_over_scenarios(tmp_path):
    """pollution (three agent types, two links): the page finds its types, status columns,
    links and parents by itself; a city's regions (children that are parents) equal SQL and
    drill down to a region's sensors."""
    chromium_executable()
    agents = 4000
    gen = pollution.Generator(agents, seed=3)
    eng = pollution.build_engine(agents)
    gen.setup(eng)
    for _ in range(20):
        eng.tick(gen.make(2000))
    srv = SQLServer(Snapshots(eng).attach(), port=0, token=TOKEN)
    eng.tick(gen.make(2000))  # publishes a snapshot with the server attached; then idle
    try:
        asyncio.run(drive_pollution(srv.url, tmp_path))
    finally:
        srv.close()


async def drive_pollution(url: str, tmp: Path) -> None:
    tables = json.loads(
        urllib.request.urlopen(
            urllib.request.Request(f"{url}/tables", headers={"Authorization": f"Bearer {TOKEN}"})
        ).read()
    )["tables"]
    types = {t: {c["name"]: c["type"] for c in tables[t]} for t in ("sensor", "region", "city")}
    async with Browser(tmp) as b:
        await b.open(f"{url}/?token={TOKEN}&refresh={REFRESH_MS}")
        page = await wait_for(
            b,
            "the page to fill",
            lambda p: (
                len(p["parents"]) == 2
                and all(pl["buttons"] for pl in p["parents"])
                and p["status"]
                and p["status"][0]["rows"]
                and p["top"]["rows"]
            ),
        )
        assert [(g["type"], g["column"]) for g in page["status"]] == [("sensor", "status")]
        assert sorted(pl["link"] for pl in page["parents"]) == ["region_city", "sensor_region"]
        doc = await asql(url, 'SELECT "status", count(*) FROM "sensor" GROUP BY 1 ORDER BY 1')
        assert [
            (json.loads(r["value"]), json.loads(r["count"])) for r in page["status"][0]["rows"]
        ] == [tuple(r) for r in doc["rows"]]

        city = next(pl for pl in page["parents"] if pl["link"] == "region_city")["buttons"][0]
        await b.click(f'#parents .link[data-link="region_city"] button[data-key="{city["key"]}"]')
        page = await wait_for(
            b,
            "the city's regions",
            lambda p: (
                p["children"]["parent"] == city["key"] and p["children"]["synced"] is not None
            ),
        )
        emitted = page["children"]["cols"][1:]
        assert emitted == ["sensors", "mean_level", "max_level", "red_sensors", "city_mean_level"]
        doc = await asql(
            url,
            "SELECT r.* FROM region r JOIN region_city l ON l.child_region_id = r.region_id "
            f"WHERE l.parent_city_id = {city['key']}",
        )
        want = {str(r["region_id"]): r for r in as_dicts(doc)}
        assert len(want) == json.loads(city["n"])
        rows = page["children"]["rows"]
        assert [r["key"] for r in rows] == sorted(want, key=int)
        for r in rows:
            for c in emitted:
                raw = json.loads(r["cells"][c]["value"])
                assert same(raw, want[r["key"]][c], types["region"][c]), (r, c)
                assert r["cells"][c]["text"] == shown(raw, types["region"][c])

        region = rows[0]["key"]
        await b.click(f'#children tr[data-key="{region}"] a.drill')
        page = await wait_for(
            b,
            "the region's sensors",
            lambda p: (
                p["children"]["parent"] == region
                and p["children"]["link"] == "sensor_region"
                and p["children"]["synced"] is not None
            ),
        )
        doc = await asql(
            url,
            "SELECT s.* FROM sensor s JOIN sensor_region l ON l.child_sensor_id = s.sensor_id "
            f"WHERE l.parent_region_id = {region}",
        )
        want = {str(r["sensor_id"]): r for r in as_dicts(doc)}
        sensor_cols = page["children"]["cols"][1:]
        assert "level" in sensor_cols and "status" in sensor_cols
        assert [r["key"] for r in page["children"]["rows"]] == sorted(want, key=int)
        for r in page["children"]["rows"]:
            for c in sensor_cols:
                raw = json.loads(r["cells"][c]["value"])
                assert same(raw, want[r["key"]][c], types["sensor"][c]), (r, c)
        assert page["error"] == "" and b.problems() == []
