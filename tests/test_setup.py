"""scripts/setup names the fix for a missing prerequisite in one line."""

import os
import subprocess

from .conftest import REPO_ROOT


def test_a_bad_python_is_one_clear_line():
    result = subprocess.run(
        [str(REPO_ROOT / "scripts/setup")],
        env={**os.environ, "PYTHON": "/bin/false"},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr
        == "scripts/setup: PYTHON=/bin/false is not a working Python 3.11: point it at python3.11, or unset it\n"
    )
