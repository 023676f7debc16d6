"""Development set-ups: a local chain, an IPFS daemon, the local testnet."""
