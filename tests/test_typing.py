"""The typing contract: mypy --strict accepts tests/typing/api.py."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_decorated_functions_keep_parameter_and_return_types():
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    if mypy is None:
        pytest.fail("mypy is a test dependency (pip install -e '.[dev]')")
    result = subprocess.run(
        [mypy, "--strict", "--no-incremental", str(ROOT / "tests/typing/api.py")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_wrong_argument_types_are_reported(tmp_path):
    mypy = shutil.which("mypy", path=str(Path(sys.executable).parent))
    assert mypy is not None
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from buttress import retry_with_backoff\n"
        "@retry_with_backoff(max_attempts=2)\n"
        "def f(x: int) -> str:\n    return str(x)\n"
        "f('not an int')\n"
    )
    result = subprocess.run(
        [mypy, "--strict", "--no-incremental", str(bad)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 1
    assert 'Argument 1 to "f" has incompatible type "str"; expected "int"' in result.stdout
