"""The README's gradio_client example, run as printed against a served lab (only its URL changes)."""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
EXAMPLE = re.compile(r"<!-- client-example -->\s*```python\n(?P<code>.*?)```\s*<!-- /client-example -->", re.DOTALL)


def readme_example() -> str:
    match = EXAMPLE.search(README.read_text(encoding="utf-8"))
    assert match is not None, "the README lost its gradio_client example"
    return textwrap.dedent(match["code"])


def test_the_readme_client_example_runs_and_prints_every_step(served_app, capsys):
    code = readme_example()
    assert 'Client("http://127.0.0.1:7860/")' in code  # the address `python app.py` serves
    exec(compile(code.replace("http://127.0.0.1:7860/", served_app), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    steps = [line for line in printed if line.startswith("Step ")]
    assert [line.split(" (")[0] for line in steps] == [f"Step {t}/8" for t in range(1, 9)]
    final = ast.literal_eval(printed[-1])  # {"opcm": ACC, "task_arithmetic": ACC}, one decimal each
    assert set(final) == {"opcm", "task_arithmetic"} and all(50 < acc < 100 for acc in final.values())
