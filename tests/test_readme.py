"""The README's Python examples run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 2
    scope: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), scope)
    assert capsys.readouterr().out.split("\n")[:2] == ["1 engine 2", "1 fleet 1"]
    eng = scope["eng"]
    assert eng.sql("SELECT engines, mean_temp, red FROM fleet").to_pylist() == [
        {"engines": 2, "mean_temp": 107.5, "red": 1}
    ]
