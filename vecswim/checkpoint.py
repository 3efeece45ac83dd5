"""Checkpoints: the whole engine state at a tick boundary, atomically, in an open format.

Layout: ``DIR/ckpt-<tick>/`` holds one Arrow IPC file per agent type (``<type>.arrow``: the key,
the state columns under their names, and engine-owned columns prefixed ``__``: hidden
accumulators ``__h:``, last emitted values ``__last:``, parent rows ``__prow:``) and
``manifest.json`` (tick, time, agents, schema fingerprint, SHA-256 of every file, source
positions, counters). It is written as ``ckpt-<tick>.tmp`` (files fsynced, manifest last),
renamed, and the directory fsynced: a reader sees a complete checkpoint or none.

Writing is split so ticks are not stalled: ``capture`` copies the arrays at the tick boundary
(engine thread, a memcpy per column); ``write`` does the encoding, hashing and fsyncs, and
may run on a background thread. Links' CSR and key indexes are rebuilt on restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from vecswim.journal import TickJournal, fsync_dir
from vecswim.kernels import keyindex as kidx
from vecswim.kernels import links as klinks

FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint cannot be used; the message says which and why."""


class JournalUnavailable(CheckpointError):
    """The run was stopped while the tick journal could not be written."""


def instance_id(directory: str | Path) -> str:
    """A random id kept in ``directory`` (created on first use): names this engine's Pulsar
    producers, so that a restarted engine publishes under the same names."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "instance"
    if not path.exists():
        tmp = root / "instance.tmp"
        tmp.write_text(os.urandom(6).hex())
        os.replace(tmp, path)
        fsync_dir(root)
    return path.read_text().strip()


def fingerprint(engine) -> str:
    """A hash of the agent types and links, to refuse restoring into a different schema."""
    desc = {
        "types": {
            n: {
                "key": at.key,
                "key_dtype": at.key_dtype,
                "columns": [(c.name, c.dtype) for c in at.columns],
            }
            for n, at in engine.types.items()
        },
        "links": {
            n: [
                ls.link.child,
                ls.link.parent,
                sorted(ls.link.aggregates),
                sorted(ls.link.broadcast),
            ]
            for n, ls in engine.links.items()
        },
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def schema_summary(engine) -> dict:
    return {n: [c.name for c in at.columns] for n, at in engine.types.items()}


@dataclass
class Capture:
    """Copies of everything a checkpoint holds, taken at one tick boundary."""

    tick: int
    tables: dict[str, pa.Table]
    manifest: dict


def capture(
    engine, positions: dict | None = None, buffers: dict | None = None, sinks: dict | None = None
) -> Capture:
    """Copy the engine state at the current tick boundary (cost: one memcpy of every array).

    ``buffers`` (kept by the caller between checkpoints) are reused as copy targets, so
    repeated captures do not pay fresh page faults; only one capture may be in use at a time.
    ``sinks``: the sinks' snapshots (name -> state) at this boundary.
    """
    buffers = {} if buffers is None else buffers
    tables = {}
    agents = {}

    def copy(tag: str, a: np.ndarray, n: int) -> pa.Array:
        buf = _buffer(buffers, tag, a, n)
        np.copyto(buf[:n], a[:n])
        return pa.array(buf[:n])

    for name, t in engine.tables.items():
        n = t.n
        # keys are append-only: rows below n never change, so a view is a consistent copy
        cols = {t.type.key: t.key_array()}
        for c, a in t.cols.items():
            cols[c] = copy(f"{name}/{c}", a, n)
        for c, a in t.hidden.items():
            cols[f"__h:{c}"] = copy(f"{name}/h/{c}", a, n)
        for c, a in t.last.items():
            cols[f"__last:{c}"] = copy(f"{name}/last/{c}", a, n)
        for c, a in t.parent_row.items():
            cols[f"__prow:{c}"] = copy(f"{name}/prow/{c}", a, n)
        tables[name] = pa.table(cols)
        agents[name] = n
    manifest = {
        "format": FORMAT,
        "tick": engine.tick_id,
        "time": time.time(),
        "agents": agents,
        "fingerprint": fingerprint(engine),
        "schema": schema_summary(engine),
        "totals": dict(engine.totals),
        "positions": positions or {},
        "sinks": sinks or {},
        "keys": {n: at.key for n, at in engine.types.items()},
        "links": {
            n: {"child": ls.link.child, "parent": ls.link.parent} for n, ls in engine.links.items()
        },
        "files": {},
    }
    return Capture(engine.tick_id, tables, manifest)


def _buffer(buffers: dict, tag: str, a: np.ndarray, n: int) -> np.ndarray:
    buf = buffers.get(tag)
    if buf is None or len(buf) < n or buf.dtype != a.dtype:
        buf = buffers[tag] = np.empty(max(n, len(a)), a.dtype)
    return buf


def prefault(engine, buffers: dict) -> None:
    """Allocate and touch the capture buffers for the tables' current capacity, so the
    first capture is a plain memcpy too (fresh pages fault on first write)."""
    for name, t in engine.tables.items():
        groups = [("", t.cols), ("h/", t.hidden), ("last/", t.last), ("prow/", t.parent_row)]
        for prefix, group in groups:
            for c, a in group.items():
                _buffer(buffers, f"{name}/{prefix}{c}", a, len(a)).fill(0)


def write(cap: Capture, directory: str | Path, keep: int = 3) -> Path:
    """Write ``cap`` atomically under ``directory`` and drop all but the newest ``keep``
    complete checkpoints. Returns the checkpoint's folder."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{cap.tick:012d}"
    tmp = root / f"ckpt-{cap.tick:012d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _write_files(cap, tmp)
    except BaseException:
        # a full or failing disk: free what was written; older checkpoints stay valid
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("ckpt-*.tmp"):
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def _write_files(cap: Capture, tmp: Path) -> None:
    """The checkpoint's files and manifest into ``tmp``, each fsynced, then ``tmp`` itself."""
    manifest = dict(cap.manifest)
    files = {}
    for name, table in cap.tables.items():
        path = tmp / f"{name}.arrow"
        h = hashlib.sha256()
        with open(path, "wb") as fh:
            sink = pa.PythonFile(fh, mode="w")
            with ipc.new_file(sink, table.schema) as w:
                w.write_table(table)
            fh.flush()
            os.fsync(fh.fileno())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        files[f"{name}.arrow"] = {"sha256": h.hexdigest(), "bytes": path.stat().st_size}
    manifest["files"] = files
    with open(tmp / "manifest.json", "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)


def newest_name(directory: str | Path) -> str | None:
    """The folder name of the newest complete-looking checkpoint (not verified)."""
    found = list_checkpoints(directory)
    return found[-1].name if found else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete-looking checkpoint folders, oldest first (validity is checked on load)."""
    root = Path(directory)
    if not root.exists():
        return []
    return sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp"))


def read_manifest(path: Path) -> dict:
    """The manifest of one checkpoint, after verifying every file's size and checksum."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path.name}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT or "files" not in manifest:
        raise CheckpointError(f"{path.name}: not a vecswim checkpoint manifest")
    for fname, meta in manifest["files"].items():
        f = path / fname
        try:
            size = f.stat().st_size
        except OSError:
            raise CheckpointError(f"{path.name}: missing {fname}") from None
        if size != meta["bytes"]:
            raise CheckpointError(
                f"{path.name}: {fname} is {size} bytes, expected {meta['bytes']} (truncated?)"
            )
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
        if h.hexdigest() != meta["sha256"]:
            raise CheckpointError(f"{path.name}: {fname} fails its checksum")
    return manifest


def newest_valid(directory: str | Path, log=print) -> tuple[Path, dict] | None:
    """The newest checkpoint whose manifest and files verify; broken ones are skipped with a
    log line. None when there is none."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return path, read_manifest(path)
        except CheckpointError as e:
            log(f"vecswim: skipping checkpoint {e}")
    return None


def read_tables(path: Path, manifest: dict) -> dict[str, pa.Table]:
    return {f.removesuffix(".arrow"): ipc.open_file(path / f).read_all() for f in manifest["files"]}


def restore(engine, directory: str | Path, log=print) -> dict | None:
    """Load the newest valid checkpoint into a fresh ``engine``; returns its manifest (None:
    no usable checkpoint, the engine starts empty). A checkpoint of a different schema raises
    :class:`CheckpointError`."""
    found = newest_valid(directory, log)
    if found is None:
        return None
    path, manifest = found
    if manifest["fingerprint"] != fingerprint(engine):
        raise CheckpointError(
            f"{path.name} was written for another schema (agent types/columns "
            f"{manifest['schema']}, now {schema_summary(engine)}); use a new checkpoint "
            "directory or the matching scenario"
        )
    tables = read_tables(path, manifest)
    for name, t in engine.tables.items():
        data = tables[name]
        n = data.num_rows
        t.n = 0
        t._grow(max(n, 16))
        key = data.column(t.type.key)
        if t.string_keys:
            arr = key.combine_chunks().cast(pa.large_string())
            _, obuf, dbuf = arr.buffers()
            offs = np.frombuffer(obuf, np.int64)[arr.offset : arr.offset + n + 1]
            t.dict_offsets[: n + 1] = offs - offs[0]
            raw = np.frombuffer(dbuf, np.uint8) if dbuf is not None else np.empty(0, np.uint8)
            t.dict_data = raw[offs[0] : offs[-1]].copy()
        else:
            t.keys[:n] = key.to_numpy()
        for c in t.cols:
            t.cols[c][:n] = data.column(c).to_numpy(zero_copy_only=False)
        for c in t.hidden:
            t.hidden[c][:n] = data.column(f"__h:{c}").to_numpy(zero_copy_only=False)
        for c in t.last:
            t.last[c][:n] = data.column(f"__last:{c}").to_numpy(zero_copy_only=False)
        for link in t.parent_row:
            t.parent_row[link][:n] = data.column(f"__prow:{link}").to_numpy()
        t.n = n
        t.stamp[:] = 0
        t.slots = np.full(1, kidx.EMPTY, np.int32)
        t._grow_slots(t.cap)  # a fresh index over the restored keys
    for ls in engine.links.values():
        ls.reserve(0)
        ls.delta_head[:] = -1
        ls.n_delta = 0
        ls.indptr, ls.children = klinks.build_csr(
            ls.child.parent_row[ls.link.name], ls.child.n, ls.parent.n
        )
    engine.tick_id = manifest["tick"]
    engine.totals.update(manifest["totals"])
    return manifest


class Checkpointer:
    """Checkpoints an engine every ``every_seconds`` and/or ``every_ticks`` and acknowledges
    the source only once a checkpoint covering its messages is durable.

    At a due tick boundary it captures the state (engine thread), asks the source for its
    positions and a commit token, and writes in a background thread; on a later tick (or at
    ``close``) it commits the token of the last durable checkpoint. ``pauses`` records the
    capture time per checkpoint (the only part that stalls ticks), ``bytes`` their sizes.

    A write that fails with an OS error (disk full, file too large, read-only or vanished
    directory, I/O error) does not stop the engine: its partial files are removed, the last
    good checkpoint stays the one a restart loads, nothing more is acknowledged, and the next
    due checkpoint tries again. The failure is logged once per run of failures, and the
    recovery once (``failures`` counts them all). At ``close`` a failed final checkpoint
    raises :class:`CheckpointError` (nothing after the last good checkpoint is acknowledged,
    so a restart replays it).

    Exactly-once output (``journal``, on by default, for a source that is ``replayable``):
    ``resumed`` is the manifest ``restore`` returned (None: an empty start). The sinks that
    take part (``vecswim.sinks``) resume from their state in it, their snapshots go into every
    checkpoint, and the tick journal (``vecswim.journal``) records each tick's input, durably
    before its output leaves (``journal_begin``/``journal_wait``, called by ``Engine.run``);
    ``replay`` holds the journaled ticks after the restored checkpoint, which ``Engine.run``
    runs first.
    ``keep_journal``: keep every journal segment (an audit trail of tick boundaries) instead
    of removing those that no kept checkpoint needs.
    """

    def __init__(
        self,
        engine,
        directory,
        source=None,
        every_seconds=None,
        every_ticks=None,
        keep=3,
        log=print,
        resumed: dict | None = None,
        journal: bool = True,
        keep_journal: bool = False,
    ) -> None:
        import threading

        self.engine = engine
        self.directory = Path(directory)
        self.source = source
        self.every_seconds = every_seconds
        self.every_ticks = every_ticks
        self.keep = keep
        self.log = log
        self.pauses: list[float] = []
        self.write_seconds: list[float] = []
        self.bytes: list[int] = []
        self._last_time = time.monotonic()
        self._last_tick = engine.tick_id
        self._thread: threading.Thread | None = None
        self._done: tuple | None = None
        self._error: BaseException | None = None
        self._buffers: dict = {}
        self.failures = 0  # failed writes, in all
        self._failing = 0  # failed writes since the last good one
        self._failing_since = 0.0
        self.durable_tick: int | None = None  # tick of the newest durable checkpoint
        self.durable_time: float | None = None
        # Exactly-once output: the sinks that take part drop what they got after the
        # restored checkpoint, and the journal replays the ticks that produced it.
        tick = 0 if resumed is None else resumed["tick"]
        states = (resumed or {}).get("sinks", {})
        self.journal: TickJournal | None = None
        # records still to replay, consumed by Engine.run
        self.replay: deque[dict] = deque()
        self._journal_failing = False
        self._journal_pool: ThreadPoolExecutor | None = None
        self._journal_job: tuple | None = None
        self.keep_journal = keep_journal
        if journal and getattr(source, "replayable", False):
            self.journal = TickJournal(self.directory)
            self.replay = deque(self.journal.open(tick))
            if resumed is None:
                # An empty start: where output began is in the journal's start record (an
                # earlier empty start that was killed before its first checkpoint wrote it),
                # or this start writes it before any output leaves.
                start = self.journal.start
                if start is None:
                    start = {
                        "sinks": {s.name: s.snapshot() for s in self._sinks()},
                        "source": source.positions() if hasattr(source, "positions") else {},
                    }
                    self.journal.append(0, None, **start)
                states = start["sinks"]
                if hasattr(source, "resume_output"):
                    source.resume_output(start["source"])
        for s in self._sinks():
            if hasattr(s, "resume"):
                s.resume(tick, states.get(s.name))
            if self.replay:
                log(
                    f"vecswim: replaying {len(self.replay):,} journaled tick"
                    f"{'s' if len(self.replay) > 1 else ''} after checkpoint tick {tick:,} "
                    f"(up to tick {self.replay[-1]['tick']:,})"
                )
        # Touch the copy buffers now, in the background, so no capture pays page faults.
        self._thread = threading.Thread(
            target=prefault, args=(engine, self._buffers), name="vecswim-prefault", daemon=True
        )
        self._thread.start()

    def _sinks(self) -> list:
        """The engine's sinks that take part in checkpoints (see ``vecswim.sinks``)."""
        return [s for s in self.engine.sinks if getattr(s, "name", None) and hasattr(s, "snapshot")]

    def journal_begin(self, tick: int, boundary: dict | None) -> None:
        """Start making ``tick``'s journal record durable, in the background: the write and
        fdatasync overlap the tick's own work; ``journal_wait`` ends it before any output."""
        if self._journal_pool is None:
            self._journal_pool = ThreadPoolExecutor(1, thread_name_prefix="vecswim-journal")
        self._journal_job = (
            tick,
            boundary,
            self._journal_pool.submit(self.journal.append, tick, boundary),
        )

    def journal_wait(self, stop=None) -> None:
        """Return once the record of ``journal_begin`` is durable. While the journal cannot
        be written (disk full, read-only) it waits, retrying every second, logged once: the
        tick has run, but its output must not leave before its input is journaled. If
        ``stop`` is set meanwhile it raises :class:`JournalUnavailable`; the run then ends
        without a final checkpoint, and a restart resumes from the last one."""
        if self._journal_job is None:
            return
        tick, boundary, job = self._journal_job
        self._journal_job = None
        try:
            job.result()
            return
        except OSError as e:
            error = e
        while True:
            if not self._journal_failing:
                self._journal_failing = True
                self.log(
                    f"vecswim: cannot write the tick journal in {self.directory} ({error}); "
                    "waiting (nothing is emitted until it can)"
                )
            if stop is not None and stop.wait(1.0):
                raise JournalUnavailable(
                    f"stopped while the tick journal in {self.directory} could not be "
                    f"written ({error}); a restart resumes from "
                    f"{newest_name(self.directory) or 'an empty state'}"
                )
            if stop is None:
                time.sleep(1.0)
            try:
                self.journal.append(tick, boundary)
                break
            except OSError as e:
                error = e
        self._journal_failing = False
        self.log(f"vecswim: the tick journal in {self.directory} is writable again")

    def _due(self) -> bool:
        if self.every_ticks and self.engine.tick_id - self._last_tick >= self.every_ticks:
            return True
        return bool(self.every_seconds) and time.monotonic() - self._last_time >= self.every_seconds

    def after_tick(self) -> None:
        """Call after every tick (sinks flushed)."""
        self._collect(wait=False)
        if self._thread is None and self._due():
            self._start()

    def _start(self) -> None:
        import threading

        t0 = time.perf_counter()
        token = self.source.mark() if hasattr(self.source, "mark") else None
        positions = self.source.positions() if hasattr(self.source, "positions") else {}
        sinks = self._sinks()
        cap = capture(self.engine, positions, self._buffers, {s.name: s.snapshot() for s in sinks})
        failed = None
        if self.journal is not None:
            try:
                self.journal.rotate(cap.tick)
                # a checkpoint taken before the replay ended (stop, time limit): the records
                # still to replay belong after it
                for rec in self.replay:
                    self.journal.append(rec["tick"], rec["input"])
            except OSError as e:  # the checkpoint fails like a failed write
                failed = e
        self.pauses.append(time.perf_counter() - t0)
        self._last_time = time.monotonic()
        self._last_tick = self.engine.tick_id

        def work() -> None:
            t1 = time.perf_counter()
            if failed is not None:
                self._error = failed
                return
            try:
                for s in sinks:  # what the checkpoint's sink states cover is durable first
                    if hasattr(s, "sync"):
                        s.sync()
                path = write(cap, self.directory, self.keep)
                self.bytes.append(
                    sum(
                        f["bytes"]
                        for f in json.loads((path / "manifest.json").read_text())["files"].values()
                    )
                )
                self._done = (path, token)
            except BaseException as e:  # surfaced on the engine thread by _collect
                self._error = e
            self.write_seconds.append(time.perf_counter() - t1)

        self._thread = threading.Thread(target=work, name="vecswim-checkpoint", daemon=True)
        self._thread.start()

    def _collect(self, wait: bool) -> None:
        if self._thread is None or (not wait and self._thread.is_alive()):
            return
        self._thread.join()
        self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            if not isinstance(err, OSError):
                raise CheckpointError(f"checkpoint write failed: {err}") from err
            self.failures += 1
            self._failing += 1
            if self._failing == 1:
                self._failing_since = time.monotonic()
                good = newest_name(self.directory)
                self.log(
                    f"vecswim: checkpoint write to {self.directory} failed ({err}); ticks go "
                    "on without acknowledging, the last good checkpoint "
                    f"({good or 'none'}) stays valid; retrying at every checkpoint"
                )
            return
        if self._done is not None:
            path, token = self._done
            self._done = None
            self.durable_tick = int(path.name.removeprefix("ckpt-"))
            self.durable_time = time.time()
            if self._failing:
                self.log(
                    f"vecswim: checkpoint {path.name} written after {self._failing} failed "
                    f"attempt{'s' if self._failing > 1 else ''} over "
                    f"{time.monotonic() - self._failing_since:.0f} s; acknowledging resumes"
                )
                self._failing = 0
            if self.journal is not None and not self.keep_journal:
                kept = list_checkpoints(self.directory)
                if kept:
                    self.journal.prune(int(kept[0].name.removeprefix("ckpt-")))
            commit = getattr(self.source, "commit", None)
            if commit is not None:
                commit(token)

    def gauges(self) -> dict[str, int]:
        """For the ``metrics`` table: the newest durable checkpoint's tick and age, and
        failed writes."""
        age = -1 if self.durable_time is None else int((time.time() - self.durable_time) * 1000)
        return {
            "checkpoint_tick": -1 if self.durable_tick is None else self.durable_tick,
            "checkpoint_age_ms": age,
            "checkpoint_failures": self.failures,
        }

    def close(self) -> None:
        """Finish any write, take a final checkpoint, and commit it (clean shutdown). Raises
        :class:`CheckpointError` if the final checkpoint cannot be written."""
        self._collect(wait=True)
        failures = self.failures
        self._start()
        self._collect(wait=True)
        if self.journal is not None:
            self.journal.close()
        if self._journal_pool is not None:
            self._journal_pool.shutdown()
        if self.failures > failures:
            raise CheckpointError(
                f"the final checkpoint could not be written to {self.directory}; a restart "
                f"resumes from {newest_name(self.directory) or 'an empty state'} and replays "
                "what was not acknowledged"
            )


class CheckpointView:
    """A checkpoint as a SQL view (``vecswim sql --checkpoint DIR``): agent and link tables
    from its files, ``metrics`` from its counters; no recent ticks or emissions."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.tick = manifest["tick"]
        self._tables = read_tables(path, manifest)

    def agent_tables(self) -> dict[str, pa.Table]:
        return {
            n: t.select([c for c in t.column_names if not c.startswith("__")])
            for n, t in self._tables.items()
        }

    def link_names(self) -> list[str]:
        return list(self.manifest["links"])

    def link_table(self, name: str) -> pa.Table:
        link = self.manifest["links"][name]
        child, parent = self._tables[link["child"]], self._tables[link["parent"]]
        ck, pk = self.manifest["keys"][link["child"]], self.manifest["keys"][link["parent"]]
        prow = child.column(f"__prow:{name}").to_numpy()
        rows = np.flatnonzero(prow >= 0)
        return pa.table(
            {
                f"child_{ck}": child.column(ck).take(pa.array(rows)),
                f"parent_{pk}": parent.column(pk).take(pa.array(prow[rows])),
            }
        )

    def ticks(self) -> pa.Table:
        from vecswim.sql import ticks_table

        return ticks_table([])

    def metrics(self) -> pa.Table:
        from vecswim.sql import metrics_table

        return metrics_table(dict(self.manifest["totals"], tick=self.tick))

    def emissions(self) -> dict[str, pa.Table]:
        return {}
