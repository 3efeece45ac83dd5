"""The vecswim command line, run as a user runs it (subprocess of the console script)."""

import json
import subprocess
import sys
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
