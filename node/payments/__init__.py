"""The Python side of the payment contract (``DepositEscrow``: one deposit pays any worker).

- ``artifacts``         the compiled contracts (ABI + bytecode) shipped with the package
- ``deployment``        where a chain's contracts live (``deployments/<chainId>.json``) and deploying them
- ``deposit_receipts``  EIP-712 receipts: signing and verification, byte-for-byte as the contract does it
- ``deposits``          a web3.py client for deposit / fundReserve / unlock / withdraw / claim / claimBatch and reads
- ``metering``          the worker's side of a paid job (a meter per job; ``deposit_metering``), ``payer`` the
  requester's side, ``deposit_settlement`` the worker's batch claims, ``wallet`` the requester's deposit
- ``ledger``            what neither side may forget (SQLite), ``policy`` the arithmetic and admission checks

The chain client is blocking (web3 over HTTP). Async callers run it through
``DepositClient.io``, one ``CapacityLimiter`` per client (``chainio``).

Nothing is imported here: a free worker or requester uses ``metering`` and
``payer`` without loading web3.
"""
