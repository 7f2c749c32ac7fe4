"""The README opens with the two commands a newcomer runs; CI runs the second exactly as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)[:2]


def test_ci_runs_the_readme_test_command():
    demo, tests = _commands()
    assert "tmtseg demo" in demo and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert tests in ci
