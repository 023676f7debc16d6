"""``llmarket net status``: how others reach this node.

A running ``llmarket serve`` writes its network status to ``net-status.json``
in its data dir every few seconds; ``net status`` with the same data dir shows
that. With no node running there, it starts a short-lived node with the same
network flags, lets AutoNAT and the relays answer for ``--wait`` seconds, and
shows what it learnt: what a worker started here would see.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import trio

from node.cli.common import bootstrap_flag, json_flag, network_config

#: A status file older than this is from a node that is no longer running.
FRESH_S = 30.0


def register(commands: argparse._SubParsersAction) -> None:
    net = commands.add_parser("net", help="network diagnostics: `llmarket net status`")
    sub = net.add_subparsers(dest="net_command", metavar="SUBCOMMAND", required=True)
    status = sub.add_parser(
        "status",
        help="listen, announced and observed addresses; public or behind NAT; relays; connected peers",
        description="Show how other nodes reach this one: the addresses it listens on, announces and was seen "
        "at, the AutoNAT verdict (public, private or unknown) and why, relay reservations held and served, and "
        "the connected peers, each direct or relayed. A `llmarket serve` running with the same --data-dir is "
        "shown as it is; otherwise a node is started with the network flags for --wait seconds.",
    )
    status.add_argument(
        "--wait",
        type=float,
        default=6.0,
        metavar="S",
        help="with no node running: how long to let peers answer (default: %(default)s)",
    )
    bootstrap_flag(status, worker=True)
    json_flag(status)
    status.set_defaults(handler=_status)


def read_running(data_dir: Path) -> dict | None:
    """The status a running node wrote in ``data_dir``, or None if there is none that is fresh."""
    from node.app.worker import NET_STATUS_FILE

    try:
        status = json.loads((data_dir / NET_STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if time.time() - status.get("updated_at", 0) > FRESH_S or not _alive(status.get("pid", 0)):
        return None
    return status


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def _status(args: argparse.Namespace) -> int:
    from node.net.identity import Identity
    from node.net.network import Network

    logging.getLogger("libp2p").setLevel(logging.CRITICAL)  # its own failures are in the status

    status = read_running(Path(args.data_dir))
    if status is None:

        async def probe() -> dict:
            host = Network(Identity.load(Path(args.data_dir)), network_config(args))
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                with trio.move_on_after(args.wait):
                    while host.reachability == "unknown":
                        await trio.sleep(0.2)
                result = host.status()
                nursery.cancel_scope.cancel()
            return {"source": f"a node started for {args.wait:g}s", **result}

        status = trio.run(probe)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def format_status(status: dict) -> str:
    """The status as a few readable lines."""
    nat = status.get("nat", {})
    lines = [
        f"peer id      {status.get('peer_id', '?')}   ({status.get('source', '?')})",
        f"reachability {nat.get('reachability', 'unknown')}: {nat.get('reason', '')}",
    ]

    def block(title: str, values: list) -> None:
        lines.append(f"{title:<12} " + (values[0] if values else "-"))
        lines.extend(" " * 13 + str(v) for v in values[1:])

    block("listening", status.get("listen", []))
    block("announced", status.get("announce", []))
    block("observed", nat.get("observed_addrs", []))
    block("advertised", status.get("advertised", []))
    held = [f"{r['relay'][:16]}… (expires in {r.get('expires_in_s', '?')} s)" for r in nat.get("reservations", [])]
    block("relays used", held)
    served = nat.get("served", {})
    lines.append(
        f"relaying     {'on' if nat.get('relaying') else 'off'}"
        + ("" if nat.get("relay_service", True) else " (--no-relay)")
        + f"; {served.get('reservations', 0)} reservation(s) and {served.get('circuits', 0)} circuit(s) served"
    )
    peers = [f"{p['peer_id'][:16]}…  {p.get('connection') or '?'}" for p in status.get("peers", [])]
    block("peers", peers)
    disc = status.get("discovery", {})
    if disc:
        mdns, dht = disc.get("mdns") or {}, disc.get("dht") or {}
        lines.append(
            f"discovery    mDNS {mdns.get('state', 'off')}; DHT {dht.get('mode', '?')}, "
            f"{dht.get('routing_table', 0)} peer(s) in its table"
        )
    return "\n".join(lines)
