"""The network: identity, addresses, the libp2p host, NAT traversal, discovery."""
