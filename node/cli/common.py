"""Flags shared by several commands, spelled the same everywhere."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from node.inference.sampling import SamplingParams
from node.models.ipfs import IpfsSource
from node.models.store import ModelStore

if TYPE_CHECKING:
    from node.net.host import HostConfig

_DEFAULTS = SamplingParams()


def model_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="default",
        metavar="M",
        help="'default' (the embedded SmolLM2-135M-Instruct), a CID (Qm…/bafy…) or a .gguf path (default: %(default)s)",
    )


def sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--max-tokens",
        type=int,
        default=_DEFAULTS.max_tokens,
        metavar="N",
        help="stop after N generated tokens (default: %(default)s)",
    )
    group.add_argument(
        "--temperature",
        type=float,
        default=_DEFAULTS.temperature,
        metavar="T",
        help="randomness; 0 = greedy, always the same answer (default: %(default)s)",
    )
    group.add_argument(
        "--top-p",
        type=float,
        default=_DEFAULTS.top_p,
        metavar="P",
        help="nucleus sampling: keep the smallest set of tokens with probability ≥ P (default: %(default)s)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        default=_DEFAULTS.top_k,
        metavar="K",
        help="sample among the K likeliest tokens; 0 = all (default: %(default)s)",
    )
    group.add_argument(
        "--min-p",
        type=float,
        default=_DEFAULTS.min_p,
        metavar="P",
        help="drop tokens less likely than P × the likeliest (default: %(default)s)",
    )
    group.add_argument(
        "--repeat-penalty",
        type=float,
        default=_DEFAULTS.repeat_penalty,
        metavar="R",
        help="penalise repeating recent tokens; 1 = off (default: %(default)s)",
    )
    group.add_argument(
        "--seed", type=int, default=None, metavar="S", help="random seed, for repeatable sampling (default: random)"
    )
    group.add_argument("--stop", action="append", default=[], metavar="TEXT",
                       help="stop when TEXT is generated (repeatable)")  # fmt: skip


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repeat_penalty=args.repeat_penalty,
        seed=args.seed,
        stop=tuple(args.stop),
    )
    params.validate()
    return params


def engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument(
        "--ctx-size",
        type=int,
        default=2048,
        metavar="N",
        help="context size in tokens, prompt + answer (default: %(default)s)",
    )
    group.add_argument(
        "--threads", type=int, default=None, metavar="N",
        help="CPU threads (default: every core for --engine batched; cores / slots for --engine contexts)",
    )  # fmt: skip
    group.add_argument("--engine", choices=("batched", "contexts"), default="batched",
                       help="batched: one llama.cpp context decodes every running job together (continuous "
                            "batching), and a prompt's prefix already in a cache is not computed again; "
                            "contexts: one context per slot, for answers that are bit-for-bit those of one job "
                            "alone, and with --threads 1 checkable exactly (default: %(default)s)")  # fmt: skip
    group.add_argument("--gpu-layers", type=int, default=None, metavar="N",
                       help="layers to offload to the GPU; -1 = all, 0 = CPU only "
                            "(default: all when llama.cpp has GPU support and a GPU is present)")  # fmt: skip


def ipfs_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ipfs-api",
        default=os.environ.get("LLMARKET_IPFS_API"),
        metavar="ADDR",
        help="an IPFS daemon's RPC API to fetch models from, as a multiaddr or URL, "
        "e.g. /ip4/127.0.0.1/tcp/5001/http (default: $LLMARKET_IPFS_API; none)",
    )


DEFAULT_RPC_URL = "http://127.0.0.1:8545"


def chain_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rpc-url",
        default=os.environ.get("LLMARKET_RPC_URL", DEFAULT_RPC_URL),
        help="the chain's JSON-RPC endpoint (default: $LLMARKET_RPC_URL or %(default)s)",
    )
    parser.add_argument(
        "--deployments",
        default=os.environ.get("LLMARKET_DEPLOYMENTS_DIR", "deployments"),
        metavar="DIR",
        help="directory of <chainId>.json deployment records written by scripts/deploy.py "
        "(default: $LLMARKET_DEPLOYMENTS_DIR or ./deployments)",
    )


def wallet_flags(parser: argparse.ArgumentParser) -> None:
    chain_flags(parser)
    parser.add_argument(
        "--insecure-dev-key",
        action="store_true",
        help="keep the Ethereum key unencrypted in the data dir (local dev chains 31337/1337 only); "
        "otherwise the key is an encrypted keystore unlocked with $LLMARKET_PASSPHRASE or a prompt",
    )


def bootstrap_flag(parser: argparse.ArgumentParser, *, worker: bool = False, listen_flag: str = "--listen") -> None:
    """The network flags every command that joins the market takes (``--bootstrap``, ``--listen``, ``--no-mdns``).

    A worker also gets ``--announce`` and ``--no-relay``. The gateway, whose
    ``--listen`` is its HTTP address, names the libp2p one ``--p2p-listen``.
    """
    net = parser.add_argument_group("network")
    net.add_argument(
        "--bootstrap",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="a peer to join the market through, e.g. a line `llmarket serve` prints (repeatable; "
        "not needed on a LAN, where peers find each other by mDNS)",
    )
    net.add_argument(
        listen_flag,
        dest="p2p_listen",
        action="append",
        default=[],
        metavar="MULTIADDR",
        help="address to listen on (repeatable; default /ip4/0.0.0.0/tcp/0: every interface, a free port). "
        + (
            "A worker others should reach at a known port uses e.g. /ip4/0.0.0.0/tcp/4001 and opens that port"
            if worker
            else "A requester listens so that a worker behind NAT can upgrade a relayed connection to a direct one"
        ),
    )
    if worker:
        net.add_argument(
            "--announce",
            action="append",
            default=[],
            metavar="MULTIADDR",
            help="advertise this address instead of the ones found on the interfaces (repeatable): a forwarded "
            "port or public IP, e.g. /ip4/203.0.113.7/tcp/4001, or a name, e.g. /dns4/gpu.example.org/tcp/4001",
        )
        net.add_argument(
            "--no-relay",
            dest="relay",
            action="store_false",
            help="do not relay connections for peers behind NAT (a publicly reachable worker relays by default)",
        )
    net.add_argument(
        "--no-mdns",
        dest="mdns",
        action="store_false",
        help="do not look for peers on the local network (mDNS), nor announce this node there",
    )


DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/0",)


def network_config(args: argparse.Namespace, **changes) -> HostConfig:
    """The ``HostConfig`` the network flags describe; ``--announce`` values are checked here."""
    from node.net.addresses import parse_announce
    from node.net.host import HostConfig  # libp2p loads only for commands that join the market

    return HostConfig(
        listen=tuple(args.p2p_listen) or DEFAULT_LISTEN,
        bootstrap=tuple(args.bootstrap),
        announce=tuple(parse_announce(a) for a in getattr(args, "announce", [])),
        mdns=args.mdns,
        relay_service=getattr(args, "relay", False),  # workers relay (--no-relay); requesters come and go
        **changes,
    )


def json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def model_store(args: argparse.Namespace) -> ModelStore:
    sources = [IpfsSource(args.ipfs_api)] if getattr(args, "ipfs_api", None) else []
    return ModelStore.in_data_dir(args.data_dir, sources)


def probability(text: str) -> float:
    """An argparse type: a number from 0 to 1 (``--spot-check``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a probability from 0 to 1") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability; give a number from 0 to 1 (1 = always)")
    return value
