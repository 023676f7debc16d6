"""The network's settings: ``HostConfig`` (the host, its guards, discovery) and ``NatConfig`` (NAT traversal).

Both are frozen dataclasses of plain values, so a config can be built from
command-line flags (``node.cli.common.network_config``) and compared in tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NatConfig:
    # AutoNAT client
    autonat_servers: int = 3  # peers asked at once
    autonat_interval_s: float = 300.0  # how often a peer is asked again
    autonat_retry_s: float = 30.0  # …while reachability is unknown
    autonat_timeout_s: float = 20.0  # for one answer
    verdict_ttl_s: float = 1800.0  # how long an answer counts
    # AutoNAT server
    dialback_timeout_s: float = 5.0  # per address
    # reservations (as a private node)
    max_relays: int = 2
    relay_backoff_s: float = 300.0  # after a relay refused or failed
    # dialling and relaying
    dial_timeout_s: float = 10.0
    punch_dial_timeout_s: int = 3  # DCUtR's dials (py-libp2p: 10 s, which delayed every hole punch by 10 s)
    relay_write_timeout_s: float = 60.0  # a destination that reads nothing this long loses its circuit
    # our relay's limits (node.net.relay's docstring); 0 is unlimited
    reservation_ttl_s: int = 3600
    max_reservations: int = 128
    max_reservations_per_ip: int = 16
    max_circuits: int = 128
    max_circuits_per_peer: int = 32  # to one reserved peer
    max_circuits_per_source: int = 8  # from one peer
    max_circuits_per_ip: int = 32  # from one IP
    circuit_duration_s: int = 0
    circuit_data_bytes: int = 0
    max_relayed_inbound: int = 64  # relayed connections to us (as a destination)


@dataclass(frozen=True)
class HostConfig:
    listen: tuple[str, ...] = ("/ip4/127.0.0.1/tcp/0",)
    bootstrap: tuple[str, ...] = ()
    announce: tuple[str, ...] = ()  # replaces the advertised direct addresses (node.net.addresses)
    mdns: bool = False  # find and announce peers on the LAN (node.net.mdns); the CLI turns it on
    mdns_service: str = ""  # the mDNS service type; "" is llmarket's (tests use their own, to meet only themselves)
    relay_service: bool = True  # relay for peers behind NAT unless AutoNAT finds us private (node.net.nat)
    dht_server: bool = False  # answer DHT queries (workers, which are the bootstrap peers); else a client
    find_peer_timeout_s: float = 5.0  # a DHT lookup when a peer's given addresses all fail
    nat: NatConfig = NatConfig()  # AutoNAT, relay and hole-punching timings and caps (node.net.nat)
    connect_timeout_s: float = 10.0  # per address dialled
    dial_stagger_s: float = 0.5  # the next address of a peer is tried after this long (or once one fails)
    stream_timeout_s: float = 10.0
    max_inbound_streams_per_peer: int = 16
    # inbound connections, per remote IP and in all (node.net.guards.InboundGuard)
    upgrade_timeout_s: float = 4.0  # from TCP accept to Noise + yamux done
    max_pending_per_ip: int = 8  # connections still upgrading, per remote IP
    max_pending: int = 64  # connections still upgrading, in all
    max_connections_per_ip: int = 32  # inbound connections, upgrading or not, per remote IP
    connection_rate_per_ip: float = 5.0  # new inbound connections a second per remote IP (on average)…
    connection_burst_per_ip: float = 20.0  # …in bursts of up to this many
    # what yamux may buffer unread (node.net.guards.GuardedYamux); a stream's own cap follows its window
    max_buffered_per_connection: int = 32 << 20
    max_buffered_total: int = 256 << 20
    # connections in all (py-libp2p's ConnectionConfig). Below ``low_watermark`` the auto-connector dials known
    # peers, up to half-way to ``high_watermark``; py-libp2p's 100/200 made every market of under 100 nodes
    # fully connected, and heads for 100 connections a node at scale (docs/benchmarks.md). Above
    # ``high_watermark`` idle connections may be pruned (one with an open stream, a GossipSub peer's say,
    # never is); ``max_connections`` is a hard cap, in and out: a worker at it turns requesters away.
    min_connections: int = 8
    low_watermark: int = 16
    high_watermark: int = 32
    max_connections: int = 300
    # GossipSub: the mesh degree D (and the bounds it is kept in) and the messages a second one peer may
    # forward us on one topic (more are dropped, not forwarded, and count against it); a topic can have its
    # own (``Host.set_topic_rate_limit``: the offers topic does, node.market.offers)
    gossip_degree: int = 6
    gossip_degree_low: int = 4
    gossip_degree_high: int = 12
    gossip_rate_limit: float = 10.0
    # seconds between GossipSub heartbeats (mesh upkeep and IHAVE gossip; py-libp2p takes whole seconds)
    gossip_heartbeat_s: int = 1
