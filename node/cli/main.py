"""The ``llmarket`` command (also ``python -m node``): a thin layer over the library.

Each subcommand lives in its own module with a ``register(subcommands)``
function that adds its parser and sets ``handler``. Handlers parse nothing
themselves, call library code and print. Every deliberate failure is a
``NodeError``; ``main`` prints it as one line and exits 1. Set
``LLMARKET_DEBUG=1`` to get the full traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence

from node import __version__
from node.config import data_dir
from node.errors import NodeError


def build_parser() -> argparse.ArgumentParser:
    # Imported here, inside main's error handling: a Ctrl-C while they load (a second or two) is one line too.
    from node.cli import chain, gateway, hardware, market, models, net, run, testnet, wallet

    parser = argparse.ArgumentParser(
        prog="llmarket",
        description="llmarket: a decentralized marketplace for LLM inference. "
        "Workers serve GGUF models over libp2p and are paid through an ERC-20 escrow.",
        epilog="Run `llmarket COMMAND --help` for a command's flags. Set LLMARKET_DEBUG=1 for tracebacks.",
    )
    parser.add_argument("--version", action="version", version=f"llmarket {__version__}")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="where keys, models and state live (default: $LLMARKET_HOME or ~/.local/share/llmarket)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (market, gateway, net, models, run, hardware, wallet, testnet, chain):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # ipfshttpclient passes urllib3 an argument urllib3 2.x warns about on every request.
    warnings.filterwarnings("ignore", message="The 'strict' parameter is no longer needed", category=FutureWarning)
    try:
        args = build_parser().parse_args(argv)
        args.data_dir = data_dir(args.data_dir)
        return args.handler(args) or 0
    except BaseException as err:
        cause = _the_cause(err)
        if isinstance(cause, NodeError) and not os.environ.get("LLMARKET_DEBUG"):
            print(f"llmarket: error: {cause}", file=sys.stderr)
            return 1
        if isinstance(cause, KeyboardInterrupt):
            print("\nllmarket: interrupted", file=sys.stderr)
            return 130
        raise


def _the_cause(err: BaseException) -> BaseException:
    """The one exception that ended a command, out of the exception groups trio's nurseries wrap it in.

    A failure in one task cancels its siblings, so a group holds the failure and
    ``Cancelled`` for the rest; anything else (two real failures) stays a group.
    """
    import trio

    while isinstance(err, BaseExceptionGroup):
        causes = [e for e in err.exceptions if not isinstance(e, trio.Cancelled)]
        if len(causes) != 1:
            return err
        err = causes[0]
    return err
