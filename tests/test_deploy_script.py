"""`brownie run scripts/deploy.py --network development` works offline and writes the record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from eth_utils import is_checksum_address, to_checksum_address

from node.errors import DeploymentNotFound
from node.payments.deployment import load_deployment, write_deployment

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
    assert is_checksum_address(record["token"]) and is_checksum_address(record["deposits"])
    assert record["token"] != record["deposits"] and record["block"] >= 1 and "escrow" not in record
    assert f"DepositEscrow   {record['deposits']}" in result.stdout
    assert "Terminating local RPC client" in result.stdout  # brownie stopped the anvil it started


def test_a_record_of_the_old_channel_escrow_says_to_redeploy_and_one_naming_both_loads(tmp_path):
    addresses = {"token": "0x" + "11" * 20, "escrow": "0x" + "22" * 20, "deployer": "0x" + "33" * 20}
    old = {"chainId": 31337, "block": 2, **addresses}
    (tmp_path / "31337.json").write_text(json.dumps(old))
    with pytest.raises(DeploymentNotFound, match="old channel escrow .* redeploy"):
        load_deployment(tmp_path, 31337)
    (tmp_path / "31337.json").write_text(json.dumps({**old, "deposits": "0x" + "44" * 20}))
    deployment = load_deployment(tmp_path, 31337)
    assert deployment.deposits == to_checksum_address("0x" + "44" * 20) and "escrow" not in deployment.to_json()
    write_deployment(replace(deployment, block=3), tmp_path)
    assert load_deployment(tmp_path, 31337).block == 3
    (tmp_path / "31337.json").write_text(json.dumps({**old, "deposits": "nope"}))
    with pytest.raises(DeploymentNotFound, match="deposits is not an address"):
        load_deployment(tmp_path, 31337)
