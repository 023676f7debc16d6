"""llmarket: a decentralized marketplace for LLM inference.

The package is a library first; ``node.cli`` is a thin command line over it.
Modules, one concern each:

- ``node.config``   data directory and other user-facing settings
- ``node.errors``   the exception hierarchy (root: ``NodeError``)
- ``node.payments`` the escrow contract's Python side: artifacts, deployments,
                    EIP-712 receipts and a web3 client
"""

__version__ = "0.1.0"
