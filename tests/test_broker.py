"""The standalone broker helper: a clear line when Java or Maven is missing, progress while
Maven downloads, and a stop that is as quick as the broker's own shutdown."""

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vecswim import broker

VECSWIM = str(Path(sys.executable).parent / "vecswim")

FAKE_MVN = """#!/bin/sh
echo "[INFO] Scanning for projects..."
for i in 1 2 3 4 5 6 7 8; do
  echo "[INFO] Downloading from central: https://repo/x$i.jar"
  echo "[INFO] Downloaded from central: https://repo/x$i.jar (1.5 MB at 3.0 MB/s)"
  sleep 0.15
done
echo "[INFO] Downloaded from central: https://repo/y.pom (2.5 kB at 30 kB/s)"
exit ${FAKE_MVN_EXIT:-0}
"""


@pytest.fixture
def fake_maven(tmp_path, monkeypatch):
    """A PATH whose ``mvn`` prints Maven-like download lines, and an empty cache."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("mvn", FAKE_MVN), ("java", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("VECSWIM_CACHE_DIR", str(tmp_path / "cache"))
    return bin_dir


def test_fetch_without_maven_says_how_to_install_java_and_maven(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()
    env = {**os.environ, "PATH": str(empty), "VECSWIM_CACHE_DIR": str(tmp_path / "cache")}
    r = subprocess.run(
        [VECSWIM, "pulsar", "fetch"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vecswim: error: Maven (mvn) is not installed")
    assert "apt-get install openjdk-17-jre-headless maven" in lines[0]
    assert "brew install openjdk@17 maven" in lines[0]


def test_fetch_reports_download_progress(fake_maven):
    lines = []
    lib = broker.fetch(progress=lines.append, every=0.3)
    assert lib == broker.pulsar_home() / "lib" and (broker.pulsar_home() / ".complete").exists()
    assert len(lines) >= 2 and all(line.startswith("pulsar fetch: ") for line in lines)
    assert re.fullmatch(r"pulsar fetch: 12\.0 MB in 9 files downloaded in \d+s", lines[-1])
    mbs = [float(line.split()[2]) for line in lines]
    assert mbs == sorted(mbs)  # it grows


def test_fetch_is_silent_without_a_progress_callback_and_explains_a_failure(
    fake_maven, monkeypatch, capfd
):
    monkeypatch.setenv("FAKE_MVN_EXIT", "1")
    with pytest.raises(broker.BrokerError, match="mvn could not resolve pulsar-broker"):
        broker.fetch()
    assert capfd.readouterr().err == ""


def test_cli_fetch_shows_progress_on_stderr(fake_maven):
    r = subprocess.run([VECSWIM, "pulsar", "fetch"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "pulsar fetch: 12.0 MB in 9 files downloaded" in r.stderr
    assert r.stdout.startswith(f"pulsar {broker.PULSAR_VERSION} jars in ")


def test_stop_does_not_wait_for_a_broker_that_has_exited():
    """A broker started by this process and ended by SIGTERM stays a zombie until reaped;
    stop() used to take it for a running broker and wait out the whole 20 s grace."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    t = time.monotonic()
    broker._kill(child.pid)
    assert time.monotonic() - t < 3
    child.wait(timeout=5)  # _kill may have reaped it already; then the status is lost
    with pytest.raises(ProcessLookupError):  # ended, not left running
        os.kill(child.pid, 0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.pulsar
def test_a_real_broker_stops_gracefully_in_seconds(tmp_path):
    data = tmp_path / "pulsar"
    broker.start(data, port=_free_port(), http_port=_free_port(), bookie_port=_free_port())
    t = time.monotonic()
    assert broker.stop(data)
    took = time.monotonic() - t
    assert took < 15, took  # it shuts down in about 5 s; before, every stop took 20 s
    log = (data / "pulsar.log").read_text(errors="replace")
    assert "Broker service completely shut down" in log
