"""`brownie run scripts/deploy.py --network development` works offline and writes the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from eth_utils import is_checksum_address

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_brownie_deploys_to_its_development_network(tmp_path):
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}",
        "LLMARKET_DEPLOYMENTS_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [str(venv_bin / "brownie"), "run", "scripts/deploy.py", "--network", "development"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    record = json.loads((tmp_path / "31337.json").read_text())
    assert record["chainId"] == 31337
    assert is_checksum_address(record["token"]) and is_checksum_address(record["escrow"])
    assert record["token"] != record["escrow"] and record["block"] >= 1
    assert f"InferenceEscrow {record['escrow']}" in result.stdout
    assert "Terminating local RPC client" in result.stdout  # brownie stopped the anvil it started
