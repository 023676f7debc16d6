"""The local testnet and the demo, for real: anvil, contracts, js-ipfs, paid `llmarket serve` processes."""

from __future__ import annotations

import os
import subprocess

import pytest

from node import testnet

from .conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_up_status_down_leaves_nothing_running_and_up_works_again(tmp_path):
    net = testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    try:
        report = testnet.status(tmp_path / "net")
        assert all(report["processes"].values()) and report["chain_answers"] and report["ipfs_answers"]
        assert net.workers[0]["multiaddr"].endswith(net.workers[0]["peer_id"])
        with pytest.raises(Exception, match="already running"):
            testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    finally:
        stopped = testnet.down(tmp_path / "net")
    assert set(stopped) == {"anvil", "ipfs", "worker-1"}
    assert not any(testnet._alive(pid) for pid in net.pids.values())
    again = testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    testnet.down(tmp_path / "net")
    assert not any(testnet._alive(pid) for pid in again.pids.values())


def test_the_demo_pays_exactly_usage_times_price():
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ok: the workers earned exactly usage × price" in result.stdout
    assert "stopped anvil, ipfs, worker-1, worker-2" in result.stdout
