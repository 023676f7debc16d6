"""The local testnet and the demo, for real: anvil, contracts, js-ipfs, paid `llmarket serve` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from node.app.worker import running_workers
from node.dev import testnet
from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME
from node.models.store import ModelStore
from node.services import pid_alive

from .conftest import REPO_ROOT
from .factories import start_gateway

pytestmark = pytest.mark.slow


def test_up_status_down_leaves_nothing_running_and_up_works_again(tmp_path):
    net = testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    try:
        report = testnet.status(tmp_path / "net")
        assert all(report["processes"].values()) and report["chain_answers"] and report["ipfs_answers"]
        assert net.workers[0]["multiaddr"].endswith(net.workers[0]["peer_id"])
        page = httpx.get(f"{net.workers[0]['web']}/api/node", timeout=10).json()  # its web page, on a free port
        assert page["role"] == "worker" and page["peer_id"] == net.workers[0]["peer_id"]
        with pytest.raises(Exception, match="already running"):
            testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    finally:
        stopped = testnet.down(tmp_path / "net")
    assert set(stopped) == {"anvil", "ipfs", "worker-1"}
    assert not any(pid_alive(pid) for pid in net.pids.values())
    again = testnet.up(tmp_path / "net", workers=1, say=lambda line: None)
    testnet.down(tmp_path / "net")
    assert not any(pid_alive(pid) for pid in again.pids.values())


@pytest.mark.long  # two more worker processes; the testnet's own start is the test above
def test_two_workers_share_the_cores_and_the_one_that_fetched_the_model_keeps_its_name(tmp_path, monkeypatch):
    """Issue 22: `testnet up` divides the cores among its workers (each notes its threads in the runtime dir), and
    worker-2, which fetched the model by CID from IPFS, serves it under the market's name: in its store, its log
    line and the gateway's /v1/models."""
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run))  # the workers note their threads here, not in the real one
    cores = os.cpu_count() or 1
    said: list[str] = []
    net = testnet.up(tmp_path / "net", workers=2, say=said.append)
    gateway = None
    try:
        share = max(1, cores // 2)
        assert net.threads == share and testnet.Testnet.load(tmp_path / "net").threads == share
        assert f"each worker gets {share} llama.cpp thread(s) ({cores} core(s) divided among 2 worker(s))" in said
        noted = {w.pid: w.threads for w in running_workers(run / "llmarket" / "workers")}
        assert noted == {net.pids["worker-1"]: share, net.pids["worker-2"]: share}
        logs = {w["name"]: (Path(net.dir) / "logs" / f"{w['name']}.err").read_text() for w in net.workers}
        if cores >= 2:
            assert not any("oversubscribe" in log or "warning: " in log for log in logs.values()), logs

        fetched = ModelStore.in_data_dir(Path(net.workers[1]["data_dir"])).get(DEFAULT_MODEL_CID)
        assert fetched.source.startswith("IPFS daemon") and fetched.name == DEFAULT_MODEL_NAME, fetched
        assert f"serving {DEFAULT_MODEL_NAME} ({DEFAULT_MODEL_CID})" in logs["worker-2"], logs["worker-2"]

        gateway, base_url = start_gateway(net, Path(net.requester["data_dir"]))
        deadline = time.monotonic() + 60
        while True:  # the gateway sees both workers' offers within a few seconds of starting
            (model,) = httpx.get(f"{base_url}/models", timeout=10).json()["data"]
            if model["workers"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)  # polling interval
        assert (model["id"], model["name"], model["workers"]) == (DEFAULT_MODEL_CID, DEFAULT_MODEL_NAME, 2), model
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait()
        testnet.down(tmp_path / "net")
    assert running_workers(run / "llmarket" / "workers") == []  # each removed its note when it stopped


async def _one_job_on_every_worker(net) -> dict[str, object]:
    """One paid job pinned to each worker of ``net``, all at once, from the testnet requester's deposit."""
    import trio

    from node.app.paid import payer_for, paying_wallet
    from node.app.requester import open_requester
    from node.inference.sampling import SamplingParams
    from node.market.requester import JobSpec, run_job
    from node.market.routing import RouteQuery
    from node.net.host import HostConfig

    data_dir = Path(net.requester["data_dir"])
    wallet = await trio.to_thread.run_sync(
        lambda: paying_wallet(data_dir, net.rpc_url, Path(net.deployments), insecure_dev_key=True)
    )
    max_price = max(w["price"] for w in net.workers)
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), bootstrap=(net.workers[0]["multiaddr"],), mdns=False)
    results = {}
    with trio.fail_after(300):
        async with open_requester(data_dir, network=config) as node:
            while {o.peer_id for o in node.offers()} < {w["peer_id"] for w in net.workers}:
                await trio.sleep(0.2)  # polling interval: the offers come by gossip
            payer = payer_for(wallet, usage=node.checked_usage)

            async def job(w: dict) -> None:
                spec = JobSpec(model=DEFAULT_MODEL_CID, params=SamplingParams(max_tokens=12, temperature=0.0),
                               messages=[{"role": "user", "content": f"Count to {w['name'][-1]}."}],
                               max_price_per_1k=max_price)  # fmt: skip
                query = RouteQuery(model=DEFAULT_MODEL_CID, max_price_per_1k=max_price, pinned_peer=w["peer_id"],
                                   chain_id=net.chain_id, escrow=net.escrow)  # fmt: skip
                results[w["address"]] = await run_job(node.host, node.offers, query, spec, reputation=node.reputation,
                                                      payer=payer)  # fmt: skip

            async with trio.open_nursery() as nursery:
                for w in net.workers:
                    nursery.start_soon(job, w)
    return results


def test_a_paid_four_worker_testnet_pays_every_worker_exactly_from_one_deposit(tmp_path):
    """Issue 20's "done when": jobs spread over all four workers, each paid exactly usage × price on chain (pairOf,
    the Claimed events, its balance), from the requester's one deposit, and not one transaction by the requester."""
    import trio

    from node.payments.deposits import DepositClient
    from node.payments.policy import job_cost

    net = testnet.up(tmp_path / "net", workers=4, say=lambda line: None)
    try:
        client = DepositClient.connect(net.rpc_url, deployments_dir=net.deployments)
        requester = net.requester["address"]
        start_block = client.block_number()
        account = client.account_of(requester)
        assert account.deposit > 0 and account.slots == 4 and client.address == net.escrow
        nonce = client.w3.eth.get_transaction_count(requester)
        before = {w["address"]: client.token_balance(w["address"]) for w in net.workers}

        results = trio.run(_one_job_on_every_worker, net)

        assert {a: r.workers for a, r in results.items()} == {w["address"]: [w["peer_id"]] for w in net.workers}
        owed = {}
        for w in net.workers:
            (receipt,) = results[w["address"]].receipts
            owed[w["address"]] = job_cost(receipt.prompt_tokens, receipt.completion_tokens, w["price"])
            assert owed[w["address"]] == results[w["address"]].cost > 0
        deadline = time.monotonic() + 120
        while any(client.pair_of(requester, a).paid < owed[a] for a in owed):
            assert time.monotonic() < deadline, {a: client.pair_of(requester, a) for a in owed}
            time.sleep(0.2)  # polling interval: each worker claims on its own, once idle
        logs = client.escrow.events.Claimed().get_logs(from_block=start_block)
        claimed = {a: sum(e["args"]["fromDeposit"] + e["args"]["fromReserve"] for e in logs
                          if e["args"]["worker"] == a) for a in owed}  # fmt: skip
        for a, amount in owed.items():
            assert client.pair_of(requester, a).paid == claimed[a] == amount  # exactly usage × price
            assert client.token_balance(a) - before[a] == amount  # and the worker holds it
        assert client.account_of(requester).deposit == account.deposit - sum(owed.values())  # from the one deposit
        assert client.w3.eth.get_transaction_count(requester) == nonce  # no transaction by the requester
    finally:
        testnet.down(tmp_path / "net")


@pytest.mark.long
def test_the_demo_pays_exactly_usage_times_price():
    result = subprocess.run(
        [str(REPO_ROOT / "scripts" / "demo")], capture_output=True, text=True, timeout=600,
        env={**os.environ, "TMPDIR": os.environ.get("TMPDIR", "/tmp")},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "ok: the workers earned exactly usage × price" in result.stdout
    # amounts are shown as wallets do: base units, then the exact tokens
    assert re.search(r"requester  \d+ \(\d+(\.\d+)? LLM\)", result.stdout), result.stdout
    assert re.search(r"charges \d+ \(0\.\d+ LLM\) per 1,000 tokens", result.stdout), result.stdout
    assert "stopped anvil, ipfs, worker-1, worker-2" in result.stdout
    assert len(re.findall(r"its web page: http://127\.0\.0\.1:\d+/", result.stdout)) == 2, result.stdout


def test_the_demo_refuses_an_unknown_option_in_one_line():
    result = subprocess.run([str(REPO_ROOT / "scripts" / "demo"), "--kep"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == "scripts/demo: unknown option --kep (try --keep, or --help)"


def test_wallet_shows_exact_tokens_and_keeps_base_units_in_json(chain, tmp_path, capsys):
    """``llmarket wallet``: base units and the exact token amount (it was a float rounded to 6 places)."""
    from node.cli.main import main
    from node.payments.deployment import write_deployment
    from node.payments.units import format_units

    write_deployment(chain.deployment, tmp_path / "deployments")
    chain_flags = ["--rpc-url", chain.chain.rpc_url, "--deployments", str(tmp_path / "deployments")]
    wallet_cmd = ["--data-dir", str(tmp_path / "requester"), "wallet", *chain_flags, "--insecure-dev-key"]
    assert main([*wallet_cmd, "--json"]) == 0  # creates the account
    address = json.loads(capsys.readouterr().out)["address"]
    funds = 12_345_678_901_234_567_890_123  # 12345.678901234567890123 tokens: more digits than a float holds
    owner = chain.client(chain.deployer)
    owner.send(owner.token.functions.transfer(address, funds), "fund")
    chain.chain.rpc("anvil_setBalance", address, hex(10**18 + 5 * 10**13))

    assert main(wallet_cmd) == 0
    shown = capsys.readouterr().out
    assert "balance   12345678901234567890123 (12345.678901234567890123 LLM), 1.00005 ETH\n" in shown
    assert "deposit   0 (0 LLM)" in shown and "reserve   none" in shown

    assert main([*wallet_cmd[:2], "wallet", "deposit", "1.5LLM", *wallet_cmd[3:]]) == 0
    assert "deposited 1500000000000000000 (1.5 LLM)" in capsys.readouterr().out
    assert main([*wallet_cmd[:2], "wallet", "reserve", "102000000000000", "--slots", "4", *wallet_cmd[3:]]) == 0
    assert "4 slot(s) of 25500000000000 (0.0000255 LLM)" in capsys.readouterr().out

    assert main([*wallet_cmd, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)  # machine-readable: every amount an int of base units
    locked = 1_500_000_000_000_000_000 + 102_000_000_000_000
    assert info["tokens"] == funds - locked and info["eth"] < 10**18 + 5 * 10**13
    assert info["token"] == {"address": chain.deployment.token, "symbol": "LLM", "decimals": 18}
    assert info["display"]["tokens"] == format_units(funds - locked, 18, "LLM")
    assert info["deposit"] == 1_500_000_000_000_000_000
    assert info["reserve"] == {"total": 102_000_000_000_000, "left": 102_000_000_000_000, "slots": 4, "used": 0,
                               "share": 25_500_000_000_000}  # fmt: skip
    assert info["unlock"]["unlocking"] is False and info["pending"] == []


def test_wallet_shows_what_is_pending_per_worker_and_unlocks_and_withdraws(chain, tmp_path, capsys):
    from node.app.paid import requester_wallet
    from node.cli.main import main
    from node.payments.deployment import write_deployment
    from node.payments.deposits import DepositClient

    write_deployment(chain.deployment, tmp_path / "deployments")
    flags = ["--rpc-url", chain.chain.rpc_url, "--deployments", str(tmp_path / "deployments"), "--insecure-dev-key"]
    data = ["--data-dir", str(tmp_path / "requester")]
    wallet = requester_wallet(tmp_path / "requester", chain.chain.rpc_url, tmp_path / "deployments",
                              insecure_dev_key=True)  # fmt: skip
    owner = chain.client(chain.deployer)
    owner.send(owner.token.functions.transfer(wallet.address, 10**18), "fund")
    chain.chain.rpc("anvil_setBalance", wallet.address, hex(10**18))
    with pytest.raises(Exception, match="wallet deposit AMOUNT"):
        wallet.require_funded()  # the one line a request or the gateway prints
    assert main([*data, "wallet", "deposit", "1000000", *flags]) == 0
    capsys.readouterr()
    d = chain.deployment
    total = wallet.ledger.allocate(d.chain_id, wallet.escrow, chain.worker.address, 700, peer_id="12D3KooWw")
    signature = wallet.client.sign_receipt(chain.worker.address, total)
    DepositClient.connect(chain.chain.rpc_url, deployment=d, account=chain.worker).claim_batch(
        [(wallet.address, total, signature)]
    )
    wallet.ledger.allocate(d.chain_id, wallet.escrow, chain.worker.address, 300)  # signed, not claimed yet
    assert main([*data, "wallet", *flags, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["deposit"] == 1_000_000 - 700
    assert info["pending"] == [{"worker": chain.worker.address, "peer_id": "12D3KooWw", "signed": 1000, "paid": 700,
                                "pending": 300, "has_slot": False}]  # fmt: skip
    assert main([*data, "wallet", *flags]) == 0
    assert f"  {chain.worker.address}  pending 300 (0.0000000000000003 LLM)" in capsys.readouterr().out

    assert main([*data, "wallet", "unlock", *flags]) == 0
    assert "unlocking: `llmarket wallet withdraw` works from" in capsys.readouterr().out
    with pytest.raises(Exception, match="is unlocking"):
        wallet.require_funded()
    assert main([*data, "wallet", "withdraw", *flags]) == 1  # not yet: one line, the contract's reason
    assert "UnlockPending" in capsys.readouterr().err
    assert main([*data, "wallet", "cancel-unlock", *flags]) == 0
    assert main([*data, "wallet", "unlock", *flags]) == 0
    chain.advance(wallet.client.unlock_period())
    capsys.readouterr()
    assert main([*data, "wallet", "withdraw", *flags]) == 0
    assert "withdrew 999300 (" in capsys.readouterr().out
    assert wallet.account().deposit == 0


@pytest.mark.long
def test_a_paid_worker_killed_mid_stream_is_paid_only_what_it_was_signed(tmp_path):
    import json
    import signal
    import sys
    import time

    from node.payments.deposits import DepositClient
    from node.payments.ledger import WalletLedger, WorkerLedger

    net = testnet.up(tmp_path / "net", workers=2, say=lambda line: None)
    try:
        out, err = open(tmp_path / "req.out", "w"), open(tmp_path / "req.err", "w")
        cmd = [
            sys.executable, "-m", "node", "--data-dir", net.requester["data_dir"], "request", "--spot-check", "0",
            "--bootstrap", net.workers[0]["multiaddr"], "--max-price", str(max(w["price"] for w in net.workers)),
            "--rpc-url", net.rpc_url, "--deployments", net.deployments, "--insecure-dev-key",
            "--temperature", "0", "--max-tokens", "300", "--json", "Write a long story about a dragon.",
        ]  # fmt: skip
        request = subprocess.Popen(cmd, stdout=out, stderr=err)
        wallet = WalletLedger.in_data_dir(Path(net.requester["data_dir"]))
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline:  # the first receipt means tokens are flowing
            paying = wallet.pairs() if wallet.path.exists() else []
            victim = next((w for w in net.workers for p in paying if p.worker == w["address"] and p.signed > 0), None)
            time.sleep(0.02)  # polling interval
        assert victim is not None, (tmp_path / "req.err").read_text()
        os.killpg(net.pids[victim["name"]], signal.SIGKILL)
        assert request.wait(timeout=120) == 0, (tmp_path / "req.err").read_text()
        answer = json.loads((tmp_path / "req.out").read_text())
        survivor = next(w for w in net.workers if w is not victim)
        assert answer["workers"] == [victim["peer_id"], survivor["peer_id"]]
        assert "continuing on another worker" in (tmp_path / "req.err").read_text()

        pairs = {p.worker: p for p in wallet.pairs()}
        signed_victim, signed_survivor = pairs[victim["address"]].signed, pairs[survivor["address"]].signed
        assert answer["cost"] == signed_victim + signed_survivor
        held = WorkerLedger.in_data_dir(Path(victim["data_dir"])).pairs()
        assert 0 < held[0].best <= signed_victim  # the dead worker holds only what it was signed
        client = DepositClient.connect(net.rpc_url, deployments_dir=net.deployments)
        deadline = time.monotonic() + 60
        while client.token_balance(survivor["address"]) < signed_survivor and time.monotonic() < deadline:
            time.sleep(0.2)  # the survivor claims once idle
        assert client.token_balance(survivor["address"]) == signed_survivor
    finally:
        testnet.down(tmp_path / "net")
