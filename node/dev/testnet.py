"""A local multi-node testnet on this machine: ``llmarket testnet up | status | down``.

``up`` starts, each as its own process that outlives the command:

- anvil (chain 31337), with LLMToken and the DepositEscrow deployed through
  ``deploy_contracts`` (the code ``scripts/deploy.py`` runs);
- a js-ipfs daemon with the default model added;
- N workers (``llmarket serve``), each with its own data dir, dev key, price and
  ETH for gas, bootstrapped to the first, and its web page (``--http``) on a free
  port. Only the first holds the model locally; the others fetch it by CID from the
  IPFS daemon;
- one funded requester account (1,000 tokens and ETH) that has made its one
  deposit (100 tokens) and funded a reserve (100 tokens, one slot per worker):
  it pays every worker from them, with no transaction per worker or per job.

The workers share this machine's cores: each gets ``max(1, cores // workers)``
llama.cpp threads (``--threads``), since workers that each take every core
oversubscribe them once they decode at the same time (libgomp's threads spin),
and all of them crawl.

Everything it started is recorded in ``<dir>/testnet.json`` (pids included);
``down`` stops exactly those processes, so nothing leaks and a second ``up``
works. Logs are in ``<dir>/logs``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import requests
from web3 import HTTPProvider, Web3

from node.dev.devchain import DevChain
from node.dev.ipfsd import IpfsDaemon
from node.errors import ConfigError, NodeError
from node.models.default import DEFAULT_MODEL_CID, default_model_file
from node.models.ipfs import IpfsSource
from node.net.identity import load_or_create_account
from node.payments.deployment import deploy_contracts, write_deployment
from node.payments.deposits import DepositClient
from node.services import pid_alive

STATE = "testnet.json"
TOKEN = 10**18
BASE_PRICE = 10**15  # per 1,000 tokens: 0.001 token; worker i charges (i + 1) × this
REQUESTER_TOKENS = 1_000 * TOKEN
REQUESTER_DEPOSIT = 100 * TOKEN  # the one deposit every worker is paid from
REQUESTER_RESERVE = 100 * TOKEN  # cut into one slot per worker
ETH_EACH = 100 * 10**18


@dataclass
class Testnet:
    dir: str
    rpc_url: str
    chain_id: int
    deployments: str
    token: str
    escrow: str  # the DepositEscrow
    ipfs_api: str
    requester: dict
    workers: list[dict] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    threads: int = 0  # llama.cpp threads per worker (0: a testnet.json written before this was recorded)

    def save(self) -> None:
        Path(self.dir, STATE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path) -> Testnet:
        try:
            return cls(**json.loads((Path(directory) / STATE).read_text()))
        except FileNotFoundError:
            raise ConfigError(
                f"no testnet in {directory}; start one with `llmarket testnet up --dir {directory}`"
            ) from None

    def request_command(self, prompt: str = "Why is the sky blue?") -> str:
        first = self.workers[0]["multiaddr"]
        return (
            f"llmarket --data-dir {self.requester['data_dir']} request --bootstrap {first} "
            f"--max-price {max(w['price'] for w in self.workers)} --rpc-url {self.rpc_url} "
            f'--deployments {self.deployments} --insecure-dev-key --verify "{prompt}"'
        )


def _stop(pid: int) -> None:
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return
            time.sleep(0.05)  # polling interval


def _wait_for_line(path: Path, proc: subprocess.Popen, what: str, timeout_s: float = 180.0, *, after: str = "") -> str:
    """The first word ``path`` holds (after the text ``after``, when given), once it is written."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if after and after in text:
            return text.split(after, 1)[1].split()[0]
        if not after and text.strip():
            return text.split()[0]
        if proc.poll() is not None:
            err = path.with_suffix(".err")
            raise NodeError(f"{what} exited early: {err.read_text()[-400:] if err.exists() else ''}")
        time.sleep(0.1)  # polling interval
    raise NodeError(f"{what} did not start within {timeout_s:.0f}s; see {path.with_suffix('.err')}")


def threads_per_worker(cores: int, workers: int) -> int:
    """The llama.cpp threads each of ``workers`` workers on one machine of ``cores`` cores gets."""
    return max(1, cores // max(1, workers))


def up(directory: Path, *, workers: int = 2, threads: int | None = None, say=print) -> Testnet:
    """Start a testnet in ``directory`` (blocking, a minute or so).

    Args:
        threads: llama.cpp threads per worker; None divides the cores among the workers
            (``threads_per_worker``).
    """
    directory = Path(directory).resolve()
    if (directory / STATE).exists():
        existing = Testnet.load(directory)
        if any(pid_alive(pid) for pid in existing.pids.values()):
            raise ConfigError(
                f"a testnet is already running in {directory}; `llmarket testnet down --dir {directory}` first"
            )
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if threads is not None and threads < 1:
        raise ConfigError("--threads must be at least 1")
    cores = os.cpu_count() or 1
    if threads is None:
        threads = threads_per_worker(cores, workers)
        share = f"{cores} core(s) divided among {workers} worker(s)"
    else:
        share = f"as asked; this machine has {cores} core(s)"
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    pids: dict[str, int] = {}
    try:
        say("starting anvil (chain 31337)…")
        chain = DevChain.start(workdir=directory / "anvil", detach=True)
        pids["anvil"] = chain.process.pid
        w3 = Web3(HTTPProvider(chain.rpc_url))
        say("deploying LLMToken and DepositEscrow…")
        deployment = deploy_contracts(w3, chain.accounts[0].address)
        write_deployment(deployment, directory / "deployments")
        owner = DepositClient(w3, deployment, chain.accounts[0])

        say("starting the IPFS daemon and adding the default model…")
        ipfs = IpfsDaemon.start(repo=directory / "ipfs", detach=True)
        pids["ipfs"] = ipfs.process.pid
        cid = IpfsSource(ipfs.api_url, timeout_s=120).add(default_model_file())
        if cid != DEFAULT_MODEL_CID:
            raise NodeError(f"the IPFS daemon named the default model {cid}, expected {DEFAULT_MODEL_CID}")

        requester_dir = directory / "requester"
        requester = load_or_create_account(requester_dir, insecure_dev_key=True, chain_id=deployment.chain_id)
        chain.rpc("anvil_setBalance", requester.address, hex(ETH_EACH))
        owner.send(owner.token.functions.transfer(requester.address, REQUESTER_TOKENS), "fund the requester")
        say(f"the requester deposits {REQUESTER_DEPOSIT // TOKEN} tokens and a reserve of "
            f"{REQUESTER_RESERVE // TOKEN} in {workers} slot(s)…")  # fmt: skip
        payer = DepositClient(w3, deployment, requester)
        payer.deposit(REQUESTER_DEPOSIT, permit=True)
        payer.fund_reserve(REQUESTER_RESERVE, workers, permit=True)

        say(f"each worker gets {threads} llama.cpp thread(s) ({share})")
        started: list[dict] = []
        for i in range(workers):
            name = f"worker-{i + 1}"
            data_dir = directory / name
            account = load_or_create_account(data_dir, insecure_dev_key=True, chain_id=deployment.chain_id)
            chain.rpc("anvil_setBalance", account.address, hex(ETH_EACH))
            price = BASE_PRICE * (i + 1)
            cmd = [
                sys.executable, "-m", "node", "--data-dir", str(data_dir), "serve",
                "--price", str(price), "--rpc-url", chain.rpc_url,
                "--deployments", str(directory / "deployments"), "--insecure-dev-key",
                "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns",  # a market on this machine only
                "--http", "127.0.0.1:0",  # its web page, on a free port
                "--threads", str(threads),  # its share of the cores
            ]  # fmt: skip
            if i == 0:
                cmd += ["--model", "default"]  # holds the model locally (the embedded wheel)
            else:
                cmd += [
                    "--model",
                    DEFAULT_MODEL_CID,
                    "--ipfs-api",
                    ipfs.api_url,
                    "--bootstrap",
                    started[0]["multiaddr"],
                ]
            say(f"starting {name} (price {price} per 1k tokens)…")
            out, err = logs / f"{name}.out", logs / f"{name}.err"
            with open(out, "w") as stdout, open(err, "w") as stderr:
                proc = subprocess.Popen(
                    cmd, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, start_new_session=True
                )
            pids[name] = proc.pid
            multiaddr = _wait_for_line(out, proc, name)
            web = _wait_for_line(err, proc, name, after="web page at ").rstrip("/")
            started.append(
                {"name": name, "data_dir": str(data_dir), "address": account.address, "price": price,
                 "multiaddr": multiaddr, "peer_id": multiaddr.rsplit("/p2p/", 1)[1], "web": web}
            )  # fmt: skip
        net = Testnet(
            dir=str(directory),
            rpc_url=chain.rpc_url,
            chain_id=deployment.chain_id,
            deployments=str(directory / "deployments"),
            token=deployment.token,
            escrow=owner.address,
            ipfs_api=ipfs.api_url,
            requester={"data_dir": str(requester_dir), "address": requester.address},
            workers=started,
            pids=pids,
            threads=threads,
        )
        net.save()
        return net
    except BaseException:
        for pid in reversed(list(pids.values())):
            _stop(pid)
        raise


def status(directory: Path) -> dict:
    """Which of the testnet's processes are alive, and whether the chain and IPFS answer."""
    net = Testnet.load(directory)
    processes = {name: pid_alive(pid) for name, pid in net.pids.items()}
    try:
        chain_ok = Web3(HTTPProvider(net.rpc_url, request_kwargs={"timeout": 3})).eth.chain_id == net.chain_id
    except Exception:  # any failure means "not answering"
        chain_ok = False
    try:
        ipfs_ok = requests.post(f"{net.ipfs_api}/api/v0/version", timeout=3).ok
    except requests.RequestException:
        ipfs_ok = False
    return {"testnet": asdict(net), "processes": processes, "chain_answers": chain_ok, "ipfs_answers": ipfs_ok}


def down(directory: Path) -> list[str]:
    """Stop every process the testnet started; returns their names."""
    net = Testnet.load(directory)
    for pid in reversed(list(net.pids.values())):
        _stop(pid)
    (Path(directory) / STATE).unlink()
    return list(net.pids)
