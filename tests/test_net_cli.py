"""The network flags and `llmarket net status` (issue 10, items 1 and 4), on this machine.

What crosses a network is tested between separate hosts in tests/test_across_hosts.py.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from node.app.worker import NET_STATUS_FILE
from node.cli.main import main
from node.cli.net import format_status, read_running


@pytest.mark.parametrize(
    "announce", ["/ip4/0.0.0.0/tcp/4001", "203.0.113.7:4001", "/ip4/203.0.113.7/udp/4001", "/dns4/x.example/tcp/0"]
)
def test_a_bad_announce_address_is_one_line_before_anything_starts(capsys, tmp_path, announce):
    assert main(["--data-dir", str(tmp_path), "serve", "--announce", announce]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmarket: error: --announce") and "\n" not in err and "e.g. /ip4/" in err


def test_a_requester_with_no_bootstrap_and_no_mdns_says_what_to_give(capsys, tmp_path):
    assert main(["--data-dir", str(tmp_path), "peers", "--no-mdns"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "llmarket: error: give at least one --bootstrap MULTIADDR (a worker prints its own when it starts)"


def test_net_status_of_a_node_alone_says_what_it_knows(capsys, tmp_path):
    """No node runs with this data dir: a node is started for --wait seconds; alone, it cannot know its NAT."""
    code = main(["--data-dir", str(tmp_path), "net", "status", "--no-mdns", "--wait", "0.5", "--json"])
    assert code == 0
    status = json.loads(capsys.readouterr().out)
    assert status["source"].startswith("a node started for")
    assert status["nat"]["reachability"] == "unknown" and status["nat"]["reason"]
    assert status["listen"][0].startswith("/ip4/0.0.0.0/tcp/")
    assert status["advertised"] and not any("/0.0.0.0/" in a for a in status["advertised"])
    assert status["peers"] == [] and status["discovery"]["mdns"]["state"] == "off"
    text = format_status(status)
    assert "reachability unknown" in text and "relaying" in text and status["peer_id"] in text


def test_net_status_shows_the_running_node_when_there_is_one(capsys, tmp_path):
    written = {
        "peer_id": "12D3KooWexample",
        "source": "the node running with this data dir",
        "listen": ["/ip4/0.0.0.0/tcp/4001"],
        "announce": [],
        "advertised": ["/ip4/192.168.1.9/tcp/4001", "/ip4/198.51.100.1/tcp/4001/p2p/12D3KooWrelay/p2p-circuit"],
        "nat": {"reachability": "private", "reason": "dial-back from 12D3… failed", "reservations": [
            {"relay": "12D3KooWrelayrelayrelay", "expires_in_s": 3500}], "relaying": False},
        "peers": [{"peer_id": "12D3KooWrelayrelayrelay", "connection": "direct"}],
        "pid": os.getpid(),
        "updated_at": time.time(),
    }  # fmt: skip
    (tmp_path / NET_STATUS_FILE).write_text(json.dumps(written))
    assert read_running(tmp_path) == written
    assert main(["--data-dir", str(tmp_path), "net", "status"]) == 0
    out = capsys.readouterr().out
    assert "reachability private: dial-back from 12D3… failed" in out and "expires in 3500 s" in out
    written["updated_at"] = time.time() - 300  # the node that wrote it is gone
    (tmp_path / NET_STATUS_FILE).write_text(json.dumps(written))
    assert read_running(tmp_path) is None
