"""The web3 client turns every mistake a user can make into one actionable error."""

from __future__ import annotations

import json
import socket

import pytest
from eth_account import Account

from node.errors import (
    ChainUnreachable,
    DeploymentNotFound,
    InsufficientAllowance,
    InsufficientBalance,
    NodeError,
    WrongChain,
)
from node.payments.deployment import Deployment, load_deployment, write_deployment
from node.payments.deposits import DepositClient

from .conftest import TOKEN

DEPLOYMENT = Deployment(
    chain_id=31337,
    token="0x5FbDB2315678afecb367f032d93F642f64180aa3",
    deposits="0xe7f1725E7734CE288F8367e1Bb143E90bb3F0512",
    block=2,
    deployer="0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
)


def test_deployment_records_round_trip(tmp_path):
    path = write_deployment(DEPLOYMENT, tmp_path)
    assert path == tmp_path / "31337.json"
    assert json.loads(path.read_text())["deposits"] == DEPLOYMENT.deposits
    assert load_deployment(tmp_path, 31337) == DEPLOYMENT
    assert [p.name for p in tmp_path.iterdir()] == ["31337.json"]  # no temp files left behind


def test_missing_or_broken_deployment_records_say_what_to_do(tmp_path):
    with pytest.raises(DeploymentNotFound, match=r"no deployment for chain 5 .*scripts/deploy.py"):
        load_deployment(tmp_path, 5)
    (tmp_path / "7.json").write_text("{not json")
    with pytest.raises(DeploymentNotFound, match="not valid JSON"):
        load_deployment(tmp_path, 7)
    (tmp_path / "8.json").write_text(json.dumps({**DEPLOYMENT.to_json(), "chainId": 8, "deposits": "nope"}))
    with pytest.raises(DeploymentNotFound, match="deposits is not an address"):
        load_deployment(tmp_path, 8)
    (tmp_path / "9.json").write_text(json.dumps(DEPLOYMENT.to_json()))
    with pytest.raises(DeploymentNotFound, match="says chainId 31337, expected 9"):
        load_deployment(tmp_path, 9)


def test_no_rpc_reachable(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ChainUnreachable, match=f"127.0.0.1:{port}"):
        DepositClient.connect(f"http://127.0.0.1:{port}", deployments_dir=tmp_path, timeout_s=2)


@pytest.mark.slow
def test_wrong_chain(chain, tmp_path):
    with pytest.raises(WrongChain, match="serves chain 31337, not chain 1"):
        DepositClient.connect(chain.chain.rpc_url, deployments_dir=tmp_path, chain_id=1)
    with pytest.raises(WrongChain, match="deployment is for chain 5"):
        DepositClient.connect(chain.chain.rpc_url, deployment=Deployment(5, *list(DEPLOYMENT.to_json().values())[1:]))


@pytest.mark.slow
def test_no_deployment_file_or_no_contracts_on_chain(chain, tmp_path):
    with pytest.raises(DeploymentNotFound, match="no deployment for chain 31337"):
        DepositClient.connect(chain.chain.rpc_url, deployments_dir=tmp_path)
    nowhere = Deployment(31337, "0x" + "12" * 20, "0x" + "34" * 20, 1, DEPLOYMENT.deployer)
    write_deployment(nowhere, tmp_path)
    with pytest.raises(DeploymentNotFound, match="was the chain reset"):
        DepositClient.connect(chain.chain.rpc_url, deployments_dir=tmp_path)
    write_deployment(chain.deployment, tmp_path)
    assert DepositClient.connect(chain.chain.rpc_url, deployments_dir=tmp_path).deployment == chain.deployment


@pytest.mark.slow
def test_insufficient_token_balance(chain):
    broke = chain.client(chain.other_worker)  # has ETH, no tokens
    with pytest.raises(InsufficientBalance, match="holds 0 token base units but this needs"):
        broke.deposit(TOKEN)


@pytest.mark.slow
def test_insufficient_eth_for_gas(chain):
    no_eth = Account.create()
    chain.client(chain.requester).w3.eth.wait_for_transaction_receipt(
        chain.client().token.functions.transfer(no_eth.address, TOKEN).transact({"from": chain.deployer.address})
    )
    client = chain.client(no_eth)
    with pytest.raises(InsufficientBalance, match="ETH"):
        client.deposit(TOKEN)


@pytest.mark.slow
def test_insufficient_allowance(chain):
    requester = chain.client(chain.requester)
    call = requester.escrow.functions.deposit(TOKEN)
    with pytest.raises(InsufficientAllowance) as info:
        requester.send(call, "deposit")  # skip the client's automatic approval
    assert info.value.error == "ERC20InsufficientAllowance"
    assert "approve the deposit escrow" in str(info.value)


@pytest.mark.slow
def test_signing_without_an_account(chain):
    with pytest.raises(NodeError, match="no account"):
        chain.client().sign_receipt(chain.worker.address, 1)
