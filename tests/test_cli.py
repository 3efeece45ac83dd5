"""The vecswim command line, run as a user runs it (subprocess of the console script)."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from vecswim.scenarios import engines

from tests.helpers import canon_ref, canon_rows

VECSWIM = str(Path(sys.executable).parent / "vecswim")


def vecswim(*args, cwd=None):
    return subprocess.run([VECSWIM, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_scenarios_lists_both():
    r = vecswim("scenarios")
    assert r.returncode == 0
    names = [line.split()[0] for line in r.stdout.splitlines()]
    assert names == ["engines", "pollution"]


def test_run_emits_exactly_what_the_reference_emits(tmp_path):
    r = vecswim(
        "run",
        "engines",
        "--agents",
        "500",
        "--rate",
        "0",
        "--events",
        "3000",
        "--max-events",
        "1000",
        "--seed",
        "5",
        "--seconds",
        "120",
        "--emit",
        str(tmp_path / "out.parquet"),
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    assert "events           3,000" in r.stderr
    gen = engines.Generator(500, seed=5)
    ref = engines.Reference()
    expected = {"engine": {}, "fleet": {}}
    for _ in range(3):
        for at, rows in ref.tick(gen.make(1000)).items():
            for k, row in canon_ref(rows).items():
                expected[at][(row["tick"], k)] = row
    for at, key in (("engine", "engine_id"), ("fleet", "fleet_id")):
        rows = pq.read_table(tmp_path / f"out.{at}.parquet").to_pylist()
        assert len(rows) == len(expected[at])
        got = {}
        for tick in sorted({r["tick"] for r in rows}):
            for k, v in canon_rows([r for r in rows if r["tick"] == tick], key).items():
                got[(tick, k)] = {"tick": tick, **v}
        assert got == expected[at]


def test_run_ndjson_to_stdout_and_live_status():
    r = vecswim(
        "run",
        "pollution",
        "--agents",
        "2000",
        "--rate",
        "200000",
        "--seconds",
        "2.5",
        "--emit",
        "-",
    )
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert {x["agent_type"] for x in lines} == {"sensor", "region", "city"}
    assert "events/s=" in r.stderr and "bytes/agent=" in r.stderr
    emitted = int(
        next(x for x in r.stderr.splitlines() if x.startswith("emitted rows"))
        .split()[2]
        .replace(",", "")
    )
    assert emitted == len(lines)


@pytest.mark.parametrize(
    "args",
    [
        ["run", "engines", "--agents", "-5"],
        ["run", "engines", "--agents", "lots"],
        ["run", "nope"],
        ["run"],
        ["run", "engines", "--emit", "out.txt"],
        ["run", "engines", "--tick-ms", "0"],
        ["run", "engines", "--bogus"],
        ["frobnicate"],
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(args):
    r = vecswim(*args)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vecswim: error: "), r.stderr


@pytest.mark.parametrize("cmd", [[], ["run"], ["scenarios"]])
def test_help_everywhere(cmd):
    r = vecswim(*cmd, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout


def test_emit_to_a_pipe_that_closes_ends_the_run_quietly():
    """`vecswim run engines --emit - | head`: the run ends at once when the reader goes away,
    like `yes | head` (status 141), with no traceback and no 'Exception ignored'."""
    t = time.monotonic()
    p = subprocess.Popen(
        [
            *(VECSWIM, "run", "engines", "--agents", "2000", "--seconds", "120"),
            *("--emit", "-", "--no-sql", "--quiet"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert json.loads(p.stdout.readline())["agent_type"] == "engine"
    p.stdout.close()
    err = p.stderr.read().decode()
    code = p.wait(timeout=60)
    assert code in (0, 141), err
    assert "Traceback" not in err and "Exception ignored" not in err and "Broken" not in err
    assert time.monotonic() - t < 60


@pytest.mark.parametrize(
    "args",
    [
        ["--emit", "/nonexistent/dir/out.parquet"],
        ["--emit", "/nonexistent/dir/out.ndjson"],
        ["--emit", "/proc/vecswim-out.ndjson"],  # a directory nobody can create files in
        ["--checkpoint-dir", "{file}/ckpt"],
        ["--checkpoint-dir", "/proc/vecswim-ckpt"],
    ],
)
def test_output_paths_are_checked_before_the_engine_starts(tmp_path, args):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [a.format(file=afile) for a in args]
    r = vecswim("run", "engines", "--agents", "1000", "--seconds", "30", "--no-sql", *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vecswim: error: Invalid value for '{args[0]}'")
    assert "running" not in r.stderr  # the engine never started


@pytest.mark.parametrize(
    "args, code",
    [
        (["run", "engines", "--pulsar", "nope://x", "--topic", "t"], 2),
        (["run", "engines", "--pulsar", "localhost:6650", "--topic", "t"], 2),
        (["produce", "engines", "--pulsar", "bad", "--topic", "t"], 2),
        (["sql", "--url", "nonsense", "SELECT 1"], 1),
        (["sql", "--output", "/nonexistent/dir/x.csv", "--format", "csv", "SELECT 1"], 2),
        (["sql", "--checkpoint", "{file}", "SELECT 1"], 2),
        (["checkpoint", "ls", "{file}"], 2),
        (["checkpoint", "inspect", "{dir}"], 1),
        (["pulsar", "standalone", "--data", "{file}/data"], 1),
        (["pulsar", "stop", "--data", "{file}"], 2),
    ],
)
def test_every_cli_error_is_one_line(tmp_path, args, code):
    afile = tmp_path / "afile"
    afile.write_text("x")
    args = [a.format(file=afile, dir=tmp_path) for a in args]
    r = vecswim(*args)
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vecswim: error: "), r.stderr


def test_sql_without_an_engine_says_how_to_start_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nobody listens here once the socket is closed
    r = vecswim("sql", "--url", f"http://127.0.0.1:{port}", "SELECT 1")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"vecswim: error: no engine is listening at http://127.0.0.1:{port}")
    assert "vecswim run" in lines[0] and "--checkpoint DIR" in lines[0]
