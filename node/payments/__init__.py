"""The Python side of the escrow contract.

- ``artifacts``  the compiled contracts (ABI + bytecode) shipped with the package
- ``deployment`` where a chain's contracts live (``deployments/<chainId>.json``) and deploying them
- ``receipts``   EIP-712 receipts: signing and verification, byte-for-byte as the contract does it
- ``escrow``     a web3.py client for open / topUp / claim / close / refund and channel reads

Everything here is blocking (web3 over HTTP). Async callers run it through
``trio.to_thread.run_sync`` under a ``CapacityLimiter``.
"""

from node.payments.deployment import Deployment, deploy_contracts, load_deployment
from node.payments.escrow import ChannelState, ChannelStatus, EscrowClient
from node.payments.receipts import ReceiptDomain, receipt_digest, recover_receipt_signer, sign_receipt, verify_receipt

__all__ = [
    "ChannelState",
    "ChannelStatus",
    "Deployment",
    "EscrowClient",
    "ReceiptDomain",
    "deploy_contracts",
    "load_deployment",
    "receipt_digest",
    "recover_receipt_signer",
    "sign_receipt",
    "verify_receipt",
]
