"""A real Apache Pulsar standalone broker, started and stopped by vecswim.

``fetch()`` resolves ``org.apache.pulsar:pulsar-broker`` and its dependency closure from Maven
Central with Maven into a cache directory outside the repository (no jars are committed); a
second call finds them there. ``start()`` writes a minimal standalone configuration and runs
``org.apache.pulsar.PulsarStandaloneStarter`` (RocksDB metadata, one local bookie, no
functions worker, no stream storage) with a bounded heap, in its own process group, then
waits until the binary port accepts connections, the admin health check answers 200 and the
``public/default`` namespace exists.
``stop()`` ends it: SIGTERM, on which the JVM's shutdown hooks close the broker and the bookie
(about 5 s), then SIGKILL only if it is still running after a grace period. The broker is
reaped when it is our own child, so a finished process is never mistaken for a running one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vecswim.codegen import cache_dir

PULSAR_VERSION = "4.0.7"

_POM = """<project>
  <modelVersion>4.0.0</modelVersion>
  <groupId>vecswim</groupId>
  <artifactId>pulsar-standalone-deps</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.pulsar</groupId>
      <artifactId>pulsar-broker</artifactId>
      <version>{version}</version>
    </dependency>
  </dependencies>
</project>
"""
# Pulsar's poms name extra repositories that are not reachable here; block every repository
# but Maven's built-in central so resolution never waits on them.
_SETTINGS = """<settings>
  <mirrors>
    <mirror>
      <id>central-only</id>
      <mirrorOf>*,!central</mirrorOf>
      <url>http://0.0.0.0/blocked</url>
      <blocked>true</blocked>
    </mirror>
  </mirrors>
</settings>
"""
_CONF = """clusterName=standalone
brokerServicePort={port}
webServicePort={http_port}
bindAddress=127.0.0.1
advertisedAddress=127.0.0.1
metadataStoreUrl=
managedLedgerDefaultEnsembleSize=1
managedLedgerDefaultWriteQuorum=1
managedLedgerDefaultAckQuorum=1
allowAutoTopicCreation=true
allowAutoTopicCreationType=non-partitioned
brokerDeleteInactiveTopicsEnabled=false
brokerDeduplicationEnabled=true
functionsWorkerEnabled=false
httpServerEnabled=false
journalSyncData=false
maxMessageSize={max_message_size}
dbStorage_writeCacheMaxSizeMb=64
dbStorage_readAheadCacheMaxSizeMb=64
dbStorage_rocksDB_blockCacheSize=33554432
"""


INSTALL_HINT = (
    "install Java 17 and Maven: 'apt-get install openjdk-17-jre-headless maven' "
    "(Debian/Ubuntu) or 'brew install openjdk@17 maven' (macOS)"
)
# "[INFO] Downloaded from central: https://.../x.jar (1.2 MB at 3.4 MB/s)"
_DOWNLOADED = re.compile(r"Downloaded from [^:]+: \S+ \(([\d.,]+) (B|kB|KB|MB|GB)\b")
_UNITS = {"B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9}


class BrokerError(RuntimeError):
    """The broker could not be fetched, started or stopped; the message says why."""


@dataclass(frozen=True)
class Broker:
    """A running standalone broker: where to reach it and where it keeps its files."""

    service_url: str
    admin_url: str
    data_dir: Path
    pid: int


def pulsar_home(version: str = PULSAR_VERSION) -> Path:
    return cache_dir() / "pulsar" / version


def fetch(
    version: str = PULSAR_VERSION,
    quiet: bool = True,
    progress: Callable[[str], None] | None = None,
    every: float = 3.0,
) -> Path:
    """Resolve the broker's jars into the cache (once); returns the folder of jars.

    A cold fetch downloads about 235 MB; ``progress`` (if given) is called about every
    ``every`` seconds with a line saying how much Maven has downloaded so far.
    """
    home = pulsar_home(version)
    lib = home / "lib"
    done = home / ".complete"
    if done.exists():
        return lib
    for tool, what in (("mvn", "Maven (mvn)"), ("java", "Java (java)")):
        if shutil.which(tool) is None:
            raise BrokerError(
                f"{what} is not installed; it is needed to fetch Pulsar: {INSTALL_HINT}"
            )
    try:
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_POM.format(version=version))
        (home / "settings.xml").write_text(_SETTINGS)
    except OSError as e:
        raise BrokerError(f"cannot write the Pulsar cache {home}: {e.strerror}") from None
    cmd = [
        "mvn", "-B", *(["-q"] if quiet and progress is None else []),
        "-s", str(home / "settings.xml"), "-f", str(home / "pom.xml"),
        "dependency:copy-dependencies", f"-DoutputDirectory={lib}", "-DincludeScope=runtime",
    ]  # fmt: skip
    code, tail = _maven(cmd, progress, every, timeout=1800)
    if code != 0:
        raise BrokerError(f"mvn could not resolve pulsar-broker {version}: {' | '.join(tail[-3:])}")
    done.write_text(version)
    return lib


def _maven(
    cmd: list[str], progress: Callable[[str], None] | None, every: float, timeout: float
) -> tuple[int, list[str]]:
    """Run Maven; report its downloads (count and size of the files it says it fetched)
    through ``progress`` every ``every`` seconds. Returns the exit code and the last lines."""
    try:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
        )
    except FileNotFoundError:
        raise BrokerError(f"Maven (mvn) is not installed: {INSTALL_HINT}") from None
    tail: deque[str] = deque(maxlen=20)
    got = {"files": 0, "bytes": 0.0}

    def read() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            tail.append(line)
            if m := _DOWNLOADED.search(line):
                got["files"] += 1
                got["bytes"] += float(m[1].replace(",", "")) * _UNITS[m[2]]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    start = time.monotonic()
    while True:
        try:
            proc.wait(timeout=every)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - start > timeout:
                proc.kill()
                proc.wait()
                raise BrokerError(f"mvn did not finish within {timeout:.0f}s") from None
            if progress is not None:
                progress(
                    f"pulsar fetch: {got['bytes'] / 1e6:,.1f} MB in {got['files']:,} files "
                    f"downloaded ({time.monotonic() - start:.0f}s)"
                )
    reader.join(timeout=5)
    if progress is not None and got["files"]:
        progress(
            f"pulsar fetch: {got['bytes'] / 1e6:,.1f} MB in {got['files']:,} files downloaded"
            f" in {time.monotonic() - start:.0f}s"
        )
    return proc.returncode, list(tail)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _healthy(http_port: int) -> bool:
    """Health check passes and the default namespace exists (a fresh standalone creates
    ``public/default`` only after the broker already answers health checks)."""
    base = f"http://127.0.0.1:{http_port}/admin/v2"
    try:
        with urllib.request.urlopen(f"{base}/brokers/health", timeout=5) as r:
            if r.status != 200:
                return False
        with urllib.request.urlopen(f"{base}/namespaces/public", timeout=5) as r:
            return "public/default" in json.loads(r.read())
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start(
    data_dir: str | Path | None = None,
    port: int = 6650,
    http_port: int = 8080,
    bookie_port: int = 3181,
    heap: str = "768m",
    max_message_size: int = 5 * 1024 * 1024,
    timeout: float = 180.0,
    version: str = PULSAR_VERSION,
    progress: Callable[[str], None] | None = None,
) -> Broker:
    """Start a standalone broker (fetching jars if needed, reporting the download through
    ``progress``) and wait until it is healthy.

    Raises :class:`BrokerError` with the end of the broker log if it does not come up within
    ``timeout`` seconds, or if one of the ports is already taken.
    """
    data = Path(data_dir) if data_dir else cache_dir() / "pulsar-data"
    try:
        data.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerError(
            f"cannot use {data} as the broker's data directory: {e.strerror}"
        ) from None
    for p in (port, http_port, bookie_port):
        if _port_open(p):
            raise BrokerError(
                f"port {p} is already in use (is a broker running? 'vecswim pulsar stop')"
            )
    lib = fetch(version, progress=progress)
    conf = data / "standalone.conf"
    conf.write_text(_CONF.format(port=port, http_port=http_port, max_message_size=max_message_size))
    log = open(data / "pulsar.log", "ab")  # noqa: SIM115 - handed to the child process
    cmd = [
        "java", f"-Xms{heap}", f"-Xmx{heap}", "-XX:MaxDirectMemorySize=512m",
        "-Dpulsar.log.level=warn", "-cp", f"{lib}/*",
        "org.apache.pulsar.PulsarStandaloneStarter", "--config", str(conf),
        "--no-functions-worker", "--no-stream-storage",
        "--metadata-dir", str(data / "metadata"), "--bookkeeper-dir", str(data / "bookkeeper"),
        "--bookkeeper-port", str(bookie_port),
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=data, start_new_session=True
        )
    except FileNotFoundError:
        raise BrokerError(
            f"Java (java) is not installed; Pulsar needs Java 17+: {INSTALL_HINT}"
        ) from None
    finally:
        log.close()
    (data / "pulsar.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerError(f"broker exited with {proc.returncode}: {_log_tail(data)}")
        if _port_open(port) and _healthy(http_port):
            return Broker(
                f"pulsar://127.0.0.1:{port}", f"http://127.0.0.1:{http_port}", data, proc.pid
            )
        time.sleep(0.5)
    _kill(proc.pid)
    raise BrokerError(f"broker not healthy after {timeout:.0f}s: {_log_tail(data)}")


def _log_tail(data: Path) -> str:
    try:
        lines = (data / "pulsar.log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(lines[-5:])


def _alive(pid: int) -> bool:
    """Whether the broker (process group ``pid``) still runs. A broker that has exited but
    is not yet reaped (a zombie) does not count: when it is our child it is reaped here,
    otherwise its state in /proc says so. (Counting zombies made every stop wait out the whole
    grace period although the JVM had shut down in about 5 s.)"""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != "Z"


def _kill(pid: int, grace: float = 20.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def stop(data_dir: str | Path | None = None) -> bool:
    """Stop the broker whose pid file is in ``data_dir``; False if none was running."""
    data = Path(data_dir) if data_dir else cache_dir() / "pulsar-data"
    pid_file = data / "pulsar.pid"
    if not pid_file.exists():
        return False
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError) as e:
        raise BrokerError(f"unreadable pid file {pid_file}: {e}") from None
    if not _alive(pid):
        pid_file.unlink(missing_ok=True)
        return False
    _kill(pid)
    pid_file.unlink(missing_ok=True)
    return True
