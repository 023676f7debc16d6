"""The Python side of the escrow contract.

- ``artifacts``  the compiled contracts (ABI + bytecode) shipped with the package
- ``deployment`` where a chain's contracts live (``deployments/<chainId>.json``) and deploying them
- ``receipts``   EIP-712 receipts: signing and verification, byte-for-byte as the contract does it
- ``escrow``     a web3.py client for open / topUp / claim / close / refund and channel reads
- ``metering``   the worker's side of a paid job (a meter per job); ``payer`` the requester's side
- ``close``      closing a channel on the requester's request

The chain clients are blocking (web3 over HTTP). Async callers run them through
``EscrowClient.io``, one ``CapacityLimiter`` per client (``chainio``).

Nothing is imported here: a free worker or requester uses ``metering`` and
``payer`` without loading web3.
"""
