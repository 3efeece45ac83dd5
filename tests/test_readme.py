"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 3
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    assert capsys.readouterr().out.split("\n")[:2] == ["1 engine 2", "1 fleet 1"]
    eng = scope["eng"]
    # the reference engine block: same declarations, its own tick
    assert scope["out"].emitted["engine"] == [
        {"engine_id": 1, "tick": 1, "temp": 95.0, "status": 0}
    ]
    assert scope["ref"].state("fleet") == {7: {"engines": 1, "mean_temp": 95.0, "red": 0}}
    assert eng.sql("SELECT engines, mean_temp, red FROM fleet").to_pylist() == [
        {"engines": 2, "mean_temp": 107.5, "red": 1}
    ]
