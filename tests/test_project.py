"""The project's own promises: one test command, a working console script."""

import re
import shutil
import subprocess
from pathlib import Path

import pagoda

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()]
    assert "bash scripts/test.sh" in commands
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert "bash scripts/test.sh" in ci


def test_console_script_reports_the_version():
    exe = shutil.which("pagoda") or str(Path(__file__).parents[1] / ".venv" / "bin" / "pagoda")
    run = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == f"pagoda {pagoda.__version__}"
