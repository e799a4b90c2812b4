"""The code passes the project's ruff configuration (pyproject.toml)."""
import shutil
import subprocess
import sys

import harness


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(__import__("pathlib").Path(sys.executable).parent / "ruff")
    run = subprocess.run([ruff, "check", str(harness.PACK_ROOT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
