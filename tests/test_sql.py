"""In-process SQL: results against the reference model, tables, safety, errors."""

import duckdb
import polars as pl
import pytest
from vecswim.scenarios import engines

import vecswim as vs
from tests.helpers import canon_value


@pytest.fixture(scope="module")
def run():
    gen = engines.Generator(300, seed=11, relink=0.05)
    eng = engines.build_engine(300)
    ref = engines.Reference()
    for n in (500, 200, 700):
        b = gen.make(n)
        eng.tick(b)
        ref.tick(b)
    return eng, ref


def test_state_tables_match_reference(run):
    eng, ref = run
    rows = eng.sql("SELECT * FROM engine ORDER BY engine_id").to_pylist()
    assert len(rows) == len(ref.engines)
    for r in rows:
        e = ref.engines[r["engine_id"]]
        assert {c: r[c] for c in ("engine_temp", "fan_temp", "coolant_vol", "status")} == {
            c: e[c] for c in ("engine_temp", "fan_temp", "coolant_vol", "status")
        }


def test_aggregate_query_equals_duckdb_over_reference(run):
    eng, ref = run
    got = eng.sql(
        "SELECT status, count(*) AS n, sum(engine_temp) AS t FROM engine "
        "GROUP BY status ORDER BY status"
    ).to_pylist()
    con = duckdb.connect()
    con.execute("CREATE TABLE e(status UTINYINT, engine_temp REAL)")
    con.executemany(
        "INSERT INTO e VALUES (?, ?)",
        [(e["status"], e["engine_temp"]) for e in ref.engines.values()],
    )
    want = con.sql(
        "SELECT status, count(*) AS n, sum(engine_temp) AS t FROM e GROUP BY status ORDER BY status"
    ).fetchall()
    assert [(r["status"], r["n"], r["t"]) for r in got] == want


def test_link_table_and_fleet_consistency(run):
    eng, ref = run
    got = eng.sql("""
        SELECT f.fleet_id, f.engines, count(l.child_engine_id) AS linked
        FROM fleet f LEFT JOIN engine_fleet l ON l.parent_fleet_id = f.fleet_id
        GROUP BY ALL ORDER BY f.fleet_id""").to_pylist()
    assert all(r["engines"] == r["linked"] for r in got)
    assert {r["fleet_id"]: r["engines"] for r in got} == {
        k: f["engines"] for k, f in ref.fleets.items()
    }
    want = {k: canon_value(f["mean_engine_temp"]) for k, f in ref.fleets.items()}
    means = eng.sql("SELECT fleet_id, mean_engine_temp FROM fleet").to_pylist()
    assert {r["fleet_id"]: canon_value(r["mean_engine_temp"]) for r in means} == want


def test_ticks_metrics_and_polars_output(run):
    eng, _ = run
    ticks = eng.sql("SELECT tick, events FROM ticks ORDER BY tick").to_pylist()
    assert [(t["tick"], t["events"]) for t in ticks] == [(1, 500), (2, 200), (3, 700)]
    m = eng.sql("SELECT value FROM metrics WHERE name = 'events'", output="polars")
    assert isinstance(m, pl.DataFrame) and m.item() == 1400


@pytest.mark.parametrize(
    "query",
    [
        "CREATE TABLE x AS SELECT 1",
        "INSERT INTO engine VALUES (1)",
        "DELETE FROM engine",
        "UPDATE engine SET status = 0",
        "COPY engine TO '/tmp/out.csv'",
        "ATTACH '/tmp/db.duckdb'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "SET enable_external_access = true",
        "PRAGMA enable_profiling",
        "SELECT 1; SELECT 2",
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "SELECT * FROM no_such_table",
        "SELEC 1",
    ],
)
def test_forbidden_and_bad_queries_raise_one_line(run, query):
    eng, _ = run
    before = eng.sql("SELECT count(*) AS n FROM engine").column("n")[0].as_py()
    with pytest.raises(vs.SQLError) as err:
        eng.sql(query)
    assert "\n" not in str(err.value) and str(err.value)
    assert eng.sql("SELECT count(*) AS n FROM engine").column("n")[0].as_py() == before
