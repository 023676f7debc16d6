"""``llmarket models …``: the local model cache, by CID."""

from __future__ import annotations

import argparse
import json
from datetime import datetime

from node.cli.common import ipfs_flag, json_flag, model_store
from node.errors import ModelError
from node.models.cid import parse_cid
from node.models.ipfs import IpfsSource
from node.progress import TerminalProgress


def register(commands: argparse._SubParsersAction) -> None:
    models = commands.add_parser(
        "models",
        help="add, fetch, list and remove models (by CID)",
        description="The local model cache. Models are named by their IPFS CID and are verified against it: "
        "a file is only ever stored under the CID its bytes hash to.",
    )
    sub = models.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)

    add = sub.add_parser(
        "add",
        help="hash a local GGUF file, cache it, and print its CID",
        description="Copy a GGUF file into the cache under its CID (the same CID `ipfs add` gives it). "
        "With --ipfs-api, also add and pin it on that daemon so peers can fetch it. "
        "Example: llmarket models add ./tinyllama.Q4_K_M.gguf",
    )
    add.add_argument("path", metavar="PATH", help="the .gguf file")
    add.add_argument("--name", help="a friendly name (default: the file name)")
    add.add_argument(
        "--cid-version",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: `ipfs add --cid-version=1` (bafy…); 0: plain `ipfs add` (Qm…) (default: %(default)s)",
    )
    ipfs_flag(add)
    json_flag(add)
    add.set_defaults(handler=_add)

    fetch = sub.add_parser(
        "fetch",
        help="fetch a model by CID into the cache, verifying every block",
        description="Fetch a model by CID from an IPFS daemon into the cache. Every block is checked against "
        "its CID as it arrives; a bad block aborts the fetch and nothing is kept. "
        "Example: llmarket models fetch bafybei… --ipfs-api /ip4/127.0.0.1/tcp/5001/http",
    )
    fetch.add_argument("cid", metavar="CID")
    fetch.add_argument("--name", help="a friendly name to list it under")
    ipfs_flag(fetch)
    json_flag(fetch)
    fetch.set_defaults(handler=_fetch)

    ls = sub.add_parser("ls", help="list cached models", description="List the models in the cache.")
    json_flag(ls)
    ls.set_defaults(handler=_ls)

    rm = sub.add_parser("rm", help="remove a model from the cache", description="Remove a model from the cache.")
    rm.add_argument("cid", metavar="CID")
    rm.set_defaults(handler=_rm)

    verify = sub.add_parser(
        "verify", help="re-hash a cached model", description="Re-hash a cached model and check it against its CID."
    )
    verify.add_argument("cid", metavar="CID")
    verify.set_defaults(handler=_verify)


def _show(entry, as_json: bool) -> None:
    if as_json:
        print(json.dumps(entry.to_json(), indent=2))
    else:
        print(entry.cid)


def _add(args: argparse.Namespace) -> None:
    store = model_store(argparse.Namespace(data_dir=args.data_dir))  # adding needs no source
    entry = store.add_file(args.path, cid_version=args.cid_version, name=args.name, progress=TerminalProgress())
    if args.ipfs_api:
        daemon_cid = IpfsSource(args.ipfs_api).add(entry.path, cid_version=args.cid_version)
        if parse_cid(daemon_cid) != parse_cid(entry.cid):
            raise ModelError(
                f"the IPFS daemon computed {daemon_cid} for this file but llmarket computed {entry.cid}; "
                "the daemon must use default import settings (256 KiB chunks, balanced DAG)"
            )
    _show(entry, args.json)


def _fetch(args: argparse.Namespace) -> None:
    entry = model_store(args).fetch(args.cid, name=args.name, progress=TerminalProgress())
    _show(entry, args.json)


def _ls(args: argparse.Namespace) -> None:
    entries = model_store(args).list()
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return
    if not entries:
        print("no models cached; `llmarket models add PATH` or `llmarket run` (which caches the default model)")
        return
    width = max(len(e.cid) for e in entries)
    print(f"{'CID':<{width}}  {'SIZE':>9}  {'ADDED':<16}  NAME")
    for e in entries:
        added = datetime.fromtimestamp(e.added_at).strftime("%Y-%m-%d %H:%M")
        print(f"{e.cid:<{width}}  {e.size / 1e6:>7.1f}MB  {added:<16}  {e.name}")


def _rm(args: argparse.Namespace) -> None:
    entry = model_store(args).remove(args.cid)
    print(f"removed {entry.cid} ({entry.name}, {entry.size / 1e6:.1f} MB)")


def _verify(args: argparse.Namespace) -> None:
    entry = model_store(args).verify(args.cid)
    print(f"ok: {entry.cid} ({entry.size / 1e6:.1f} MB) matches its CID")
