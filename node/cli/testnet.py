"""``llmarket testnet up | status | down``: a local chain, IPFS daemon and workers on this machine."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from node.cli.common import json_flag


def register(commands: argparse._SubParsersAction) -> None:
    net = commands.add_parser(
        "testnet",
        help="run a local multi-node testnet: anvil, the contracts, IPFS, paid workers and a funded requester",
        description="A whole market on this machine, for trying llmarket and for tests. Every process it starts "
        "outlives the command and is stopped by `testnet down`.",
    )
    sub = net.add_subparsers(dest="testnet_command", metavar="SUBCOMMAND", required=True)

    def dir_flag(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir", metavar="D", help="where the testnet keeps its state and logs (default: <data dir>/testnet)"
        )

    up = sub.add_parser(
        "up",
        help="start anvil, deploy, fund accounts, start IPFS and N workers",
        description="Start anvil (chain 31337) with LLMToken and the DepositEscrow deployed, a js-ipfs daemon with "
        "the default model, N paid workers (the first holds the model; the others fetch it by CID) and a requester "
        "account that has made one deposit and a reserve of N slots (it pays every worker from them, with no "
        "transaction per worker), then print how to send a paid request. Example: llmarket testnet up --workers 2",
    )
    up.add_argument("--workers", type=int, default=2, metavar="N", help="how many workers (default: %(default)s)")
    up.add_argument(
        "--threads",
        type=int,
        metavar="T",
        help="llama.cpp threads per worker (default: the cores divided among the workers, at least 1)",
    )
    dir_flag(up)
    json_flag(up)
    up.set_defaults(handler=_up)

    st = sub.add_parser(
        "status",
        help="show the testnet's processes and health",
        description="Show whether each process of the testnet is alive and whether the chain and IPFS answer.",
    )
    dir_flag(st)
    json_flag(st)
    st.set_defaults(handler=_status)

    dn = sub.add_parser(
        "down",
        help="stop everything the testnet started",
        description="Stop every process the testnet started (by the pids it recorded).",
    )
    dir_flag(dn)
    dn.set_defaults(handler=_down)


def _dir(args: argparse.Namespace) -> Path:
    return Path(args.dir) if args.dir else Path(args.data_dir) / "testnet"


def _testnet():
    from node.dev import testnet  # web3 is slow to import; only the testnet commands pay for it

    return testnet


def _up(args: argparse.Namespace) -> None:
    testnet = _testnet()
    net = testnet.up(
        _dir(args), workers=args.workers, threads=args.threads, say=lambda line: print(line, file=sys.stderr)
    )
    if args.json:
        print(json.dumps({**net.__dict__, "request_command": net.request_command()}, indent=2))
        return
    print()
    print(f"testnet up in {net.dir}")
    print(f"  chain     {net.rpc_url} (chain id {net.chain_id})")
    print(f"  token     {net.token}")
    print(f"  escrow    {net.escrow} (DepositEscrow)")
    print(f"  ipfs      {net.ipfs_api}")
    print(f"  requester {net.requester['address']} (data dir {net.requester['data_dir']}), its deposit and reserve "
          f"funded: `llmarket --data-dir {net.requester['data_dir']} wallet --rpc-url {net.rpc_url} "
          f"--deployments {net.deployments} --insecure-dev-key` shows them")  # fmt: skip
    print(f"  threads   {net.threads} llama.cpp thread(s) per worker, {len(net.workers)} worker(s) on this machine")
    for w in net.workers:
        print(f"  {w['name']:<9} {w['multiaddr']}")
        print(f"            paid at {w['address']}, price {w['price']} per 1k tokens")
        print(f"            web page {w['web']}/")
    print("\nsend a paid request:")
    print(f"  {net.request_command()}")
    print(f"\nstop it all with: llmarket testnet down --dir {net.dir}")


def _status(args: argparse.Namespace) -> int:
    testnet = _testnet()
    report = testnet.status(_dir(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, alive in report["processes"].items():
            print(f"{name:<10} {'running' if alive else 'STOPPED'}")
        print(
            f"chain      {'answers' if report['chain_answers'] else 'NOT ANSWERING'} at {report['testnet']['rpc_url']}"
        )
        print(
            f"ipfs       {'answers' if report['ipfs_answers'] else 'NOT ANSWERING'} at {report['testnet']['ipfs_api']}"
        )
    healthy = all(report["processes"].values()) and report["chain_answers"] and report["ipfs_answers"]
    return 0 if healthy else 1


def _down(args: argparse.Namespace) -> None:
    testnet = _testnet()
    stopped = testnet.down(_dir(args))
    print(f"stopped {', '.join(stopped)}")
