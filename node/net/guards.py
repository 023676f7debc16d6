"""The host's guards: what keeps a hostile or broken peer from hurting the node through py-libp2p 0.8.1.

- **Guarded stream handlers** (``guarded``, ``run_guarded``). An exception
  escaping a stream handler can kill the process or wedge the connection in
  py-libp2p, so every handler runs inside a guard that logs, resets the stream
  and carries on. A peer's fault (a bad frame, a broken stream, silence past a
  deadline: ``PEER_FAULTS``) is one debug line with its peer id; anything else
  is a bug and logged with its traceback. With a ``StreamLimit`` a peer may
  hold at most so many open inbound streams; more are reset at once. The NAT
  traversal protocols (``node.net.autonat``, ``node.net.relay``,
  ``node.net.dcutr``) run in the same guard, without the limit, and so does
  every other handler py-libp2p registers (``guard_every_handler``: GossipSub,
  identify, ping, the DHT), where any exception is the peer's input.
- **Inbound connection limits** (``InboundGuard``). py-libp2p admits 250
  inbound connections in all, holds each one that does not speak for 10 s, and
  keeps every inbound connection's slot until the host stops, even after the
  connection closed. The guard gives each remote IP at most
  ``max_connections_per_ip`` inbound connections, ``connection_rate_per_ip``
  new ones a second (bursts of ``connection_burst_per_ip``) and
  ``max_pending_per_ip`` still upgrading (Noise + yamux); ``max_pending``
  upgrading in all; and ``upgrade_timeout_s`` to finish. When a limit on
  upgrading connections is reached, the oldest upgrading connection of the IP with the most of them is
  closed to make room, so a flood of idle connections cannot keep out a peer
  that completes its handshake. A slot is freed when its connection closes.
  (``libp2p.rcmgr`` does not serve here: it has no per-IP limit, only fixed
  CIDR totals; its pending-connection limit is not wired into the swarm; and a
  cancelled inbound upgrade leaks its admission slot, so that after 1,000 of
  them every inbound connection is refused. The host runs without it.)
- **Yamux flow control enforced** (``GuardedYamux``). py-libp2p's yamux logs
  "peer exceeded receive window" and keeps appending. Here a peer that sends a
  stream more than the receive window we granted loses its connection; and as
  a second line of defence a stream may buffer at most twice its window plus
  one frame, a connection ``max_buffered_per_connection``, all connections
  ``max_buffered_total``.
- **Whole writes** (``_WholeWrites``). py-libp2p's yamux locks each frame of a
  write, not the write, so two tasks writing one stream interleaved their
  messages; here a stream's writes go out one after the other.

The limits come from ``node.net.config.HostConfig``; ``node.net.host.Host``
installs all three. No state lives at module level: each host has its own.
"""

from __future__ import annotations

import logging
import math
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial

import trio
from libp2p.abc import IMuxedConn
from libp2p.stream_muxer.yamux.yamux import DEFAULT_WINDOW_SIZE, MAX_MESSAGE_SIZE, Yamux, YamuxStream

from node.concurrency import TokenBucket
from node.errors import NodeError
from node.net.config import HostConfig

log = logging.getLogger(__name__)

RawHandler = Callable[[object], Awaitable[None]]  # a py-libp2p stream handler (its INetStream)


# ------------------------------------------------------------------ faults

PEER_FAULTS = (EOFError, ConnectionError, NodeError, trio.TooSlowError)
#: For py-libp2p's own protocol code on raw streams (AutoNAT, relay, DCUtR), which raises many
#: types for a peer's bad input: every exception there is the peer's, one debug line.
ANY_FAULT = (Exception,)


def peer_fault(err: BaseException, faults: tuple[type[BaseException], ...] = PEER_FAULTS) -> bool:
    """Whether ``err`` is the peer's doing (bad input, a broken stream, silence past a deadline), not a bug.

    An exception group counts if every exception in it does.
    """
    if isinstance(err, BaseExceptionGroup):
        return all(peer_fault(e, faults) for e in err.exceptions)
    return isinstance(err, faults)


def describe_fault(err: BaseException) -> str:
    if isinstance(err, BaseExceptionGroup):
        return "; ".join(describe_fault(e) for e in err.exceptions)
    if isinstance(err, trio.TooSlowError):
        return "it said nothing before the deadline"
    return str(err) or err.__class__.__name__


# ---------------------------------------------------------- stream handlers


class StreamLimit:
    """At most ``most`` open inbound streams per peer, over all the protocols it guards."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.open: Counter[str] = Counter()

    def take(self, peer: str) -> bool:
        if self.open[peer] >= self.most:
            return False
        self.open[peer] += 1
        return True

    def give_back(self, peer: str) -> None:
        self.open[peer] -= 1
        if not self.open[peer]:
            del self.open[peer]


async def run_guarded(
    protocol: str,
    handler: RawHandler,
    raw,
    *,
    limit: StreamLimit | None = None,
    faults: tuple[type[BaseException], ...] = PEER_FAULTS,
) -> None:
    """Serve one inbound py-libp2p stream with ``handler``; no exception from it escapes into libp2p.

    Over ``limit`` the stream is reset unserved. An exception from the handler
    resets the stream: one debug line if it is one of ``faults`` (the peer's
    doing), else the traceback. ``handler`` owns the stream otherwise.
    """
    peer = raw.muxed_conn.peer_id.to_base58()
    if limit is not None and not limit.take(peer):
        log.debug("peer %s… has too many open streams; resetting %s", peer[:12], protocol)
        await reset_stream(raw)
        return
    try:
        await handler(raw)
    except Exception as err:
        if peer_fault(err, faults):
            log.debug("%s from %s… ended: %s", protocol, peer[:12], describe_fault(err))
        else:
            log.exception("%s handler failed for peer %s…", protocol, peer[:12])
        await reset_stream(raw)
    finally:
        if limit is not None:
            limit.give_back(peer)


def guarded(
    protocol: str,
    handler: RawHandler,
    *,
    limit: StreamLimit | None = None,
    faults: tuple[type[BaseException], ...] = PEER_FAULTS,
) -> RawHandler:
    """``handler`` inside ``run_guarded``: what to give py-libp2p's ``set_stream_handler``."""
    return partial(run_guarded, protocol, handler, limit=limit, faults=faults)


def guard_every_handler(libp2p) -> None:
    """Run every stream handler of a py-libp2p host inside a guard, those registered later too: py-libp2p's
    own protocols (GossipSub, identify, …) let some exceptions from a peer's bad input escape, and one that
    escapes a handler takes down the connection's task group and, through the swarm, the whole node (one
    malformed GossipSub RPC did). Any exception there is the peer's input: one debug line, the stream reset."""
    handlers = libp2p.get_mux().handlers
    for protocol, handler in list(handlers.items()):
        if handler is not None:
            handlers[protocol] = _guard_once(protocol, handler)
    register = libp2p.set_stream_handler

    def set_guarded(protocol, handler) -> None:
        register(protocol, _guard_once(protocol, handler))

    libp2p.set_stream_handler = set_guarded


def _guard_once(protocol, handler):
    if isinstance(handler, partial) and handler.func is run_guarded:
        return handler
    return guarded(str(protocol), handler, faults=ANY_FAULT)


async def reset_stream(raw) -> None:
    """Reset a py-libp2p stream, shielded from cancellation; a dead stream fails to reset in several ways."""
    with trio.CancelScope(shield=True):
        try:
            await raw.reset()
        except Exception:  # it is dead either way
            pass


async def close_stream(raw, *, reset: bool = False) -> None:
    """Close (or reset) a py-libp2p stream, shielded, within 5 s; ``None`` is fine."""
    if raw is None:
        return
    with trio.CancelScope(shield=True), trio.move_on_after(5):
        try:
            await (raw.reset() if reset else raw.close())
        except Exception:  # a dead stream fails to close in several ways; it is closed either way
            pass


# ------------------------------------------------------- inbound connections


@dataclass(eq=False)
class _Inbound:
    ip: str
    order: int
    rwc: object  # the accepted TCP stream
    scope: trio.CancelScope  # around py-libp2p's handler; its deadline is the upgrade deadline
    muxed: object = None
    established: trio.Event = field(default_factory=trio.Event)
    dropped: str = ""


def _close_now(rwc) -> None:
    """Close an accepted TCP stream at once, whatever task is using it."""
    try:
        rwc.stream.socket.close()  # py-libp2p's TrioTCPStream around a trio SocketStream
    except Exception:  # another transport: its handler's own close will do
        pass


class InboundGuard:
    """Limits on inbound TCP connections, around py-libp2p's swarm (see the module docstring).

    It wraps two methods of the swarm instance: ``_handle_inbound_connection``
    (admission, the upgrade deadline, eviction, and ending the handler when its
    connection closes) and ``upgrade_inbound_raw_conn`` (to learn when the
    upgrade is done). A dropped connection's handler is cancelled and its socket
    closed. (Cancelling an upgrade leaks its admission slot in py-libp2p's
    default resource manager, and after 1,000 such leaks every inbound
    connection is refused; ``Host`` runs without it.) Connections that arrive
    already multiplexed (QUIC) are left to py-libp2p; llmarket listens on TCP only.
    """

    def __init__(self, config: HostConfig, swarm) -> None:
        self.config = config
        self.swarm = swarm
        self._handle = swarm._handle_inbound_connection
        self._upgrade = swarm.upgrade_inbound_raw_conn
        self.pending: dict[object, _Inbound] = {}  # by the task handling the connection
        self.per_ip: Counter[str] = Counter()  # inbound connections, upgrading or not
        self.refused: Counter[str] = Counter()  # why connections were refused or dropped before they were up
        self._arrivals = 0
        self._rates: dict[str, TokenBucket] = {}  # per remote IP

    def install(self) -> None:
        self.swarm._handle_inbound_connection = self.handle
        self.swarm.upgrade_inbound_raw_conn = self.upgrade

    async def handle(self, rwc, maddr) -> None:
        if isinstance(rwc, IMuxedConn):
            await self._handle(rwc, maddr)
            return
        try:
            ip = str(rwc.get_remote_address()[0])
        except Exception:  # no address: count it under one name
            ip = "?"
        reason = ""
        if self.per_ip[ip] >= self.config.max_connections_per_ip:
            reason = f"{self.config.max_connections_per_ip} connections from it already"
        elif not self._rate(ip).take(trio.current_time()):
            reason = "it connects too often"
        if reason:
            self.refused[reason] += 1
            log.debug("refusing an inbound connection from %s: %s", ip, reason)
            _close_now(rwc)
            return
        here = [r for r in self.pending.values() if r.ip == ip]
        if len(here) >= self.config.max_pending_per_ip:
            self._drop(min(here, key=lambda r: r.order), "evicted: too many upgrading connections per IP")
        if len(self.pending) >= self.config.max_pending:
            crowd = Counter(r.ip for r in self.pending.values())
            busiest = max(crowd, key=crowd.__getitem__)
            oldest = min((r for r in self.pending.values() if r.ip == busiest), key=lambda r: r.order)
            self._drop(oldest, "evicted: too many upgrading connections")
        self._arrivals += 1
        deadline = trio.current_time() + self.config.upgrade_timeout_s
        record = _Inbound(ip, self._arrivals, rwc, trio.CancelScope(deadline=deadline))
        task = trio.lowlevel.current_task()
        self.pending[task] = record
        self.per_ip[ip] += 1
        try:
            with record.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._end_with_connection, record, nursery.cancel_scope)
                    await self._handle(rwc, maddr)
                    nursery.cancel_scope.cancel()
        finally:
            self.pending.pop(task, None)
            self.per_ip[ip] -= 1
            if self.per_ip[ip] <= 0:
                del self.per_ip[ip]
            if record.scope.cancelled_caught and not record.established.is_set() and not record.dropped:
                self.refused["upgrade timeout"] += 1
                log.debug(
                    "closing an inbound connection from %s: no handshake within %gs", ip, self.config.upgrade_timeout_s
                )
            _close_now(rwc)

    async def upgrade(self, raw_conn, maddr):
        muxed = await self._upgrade(raw_conn, maddr)
        record = self.pending.pop(trio.lowlevel.current_task(), None)
        if record is not None:
            record.scope.deadline = math.inf
            record.muxed = muxed
            record.established.set()
        return muxed

    def _drop(self, record: _Inbound, reason: str) -> None:
        """Close an upgrading connection now."""
        for task, r in list(self.pending.items()):
            if r is record:
                del self.pending[task]
        record.dropped = reason
        self.refused[reason] += 1
        log.debug("closing an inbound connection from %s: %s", record.ip, reason)
        record.scope.cancel()
        _close_now(record.rwc)

    @staticmethod
    async def _end_with_connection(record: _Inbound, scope: trio.CancelScope) -> None:
        """Once the connection is up, end py-libp2p's handler when it closes (it would wait until the host stops)."""
        await record.established.wait()
        closed = getattr(record.muxed, "event_closed", None)
        shutting_down = getattr(record.muxed, "event_shutting_down", None)
        if closed is None:
            return
        while not closed.is_set():
            with trio.move_on_after(10):
                await closed.wait()
            if shutting_down is not None and shutting_down.is_set():
                break
        scope.cancel()

    def _rate(self, ip: str) -> TokenBucket:
        bucket = self._rates.get(ip)
        if bucket is None:
            if len(self._rates) >= 4096:  # forget addresses whose bucket has filled up again
                now = trio.current_time()
                for old in [a for a, b in self._rates.items() if now - (b.stamp or now) > b.burst / b.rate]:
                    del self._rates[old]
            bucket = self._rates[ip] = TokenBucket(
                self.config.connection_rate_per_ip, self.config.connection_burst_per_ip
            )
        return bucket


# -------------------------------------------------------------------- yamux


class _StreamBuffer(bytearray):
    """A yamux stream's receive buffer that asks its connection before it grows."""

    def __init__(self, conn: GuardedYamux, stream_id: int, initial: bytes = b"") -> None:
        super().__init__(initial)
        self._conn = conn
        self._stream_id = stream_id

    def extend(self, data) -> None:
        if self._conn._may_buffer(self._stream_id, len(self), len(data)):
            super().extend(data)


class _StreamBuffers(dict):
    """Yamux's ``stream_buffers``: every buffer put in it becomes a ``_StreamBuffer``."""

    def __init__(self, conn: GuardedYamux) -> None:
        super().__init__()
        self._conn = weakref.proxy(conn)

    def __setitem__(self, stream_id: int, buffer) -> None:
        super().__setitem__(stream_id, _StreamBuffer(self._conn, stream_id, bytes(buffer)))


class _WholeWrites(YamuxStream):
    """A yamux stream whose writes go out whole. py-libp2p's ``YamuxStream.write`` sends a write in frames (of
    at most 64 KiB, and as the peer's window allows), taking its lock for each frame only, so two tasks writing
    one stream interleaved their frames, and the reader parsed garbage. GossipSub writes a peer's stream from
    several tasks (publish, forwarding, heartbeat); under load, with windows short, that happened."""

    _whole: trio.Lock

    async def write(self, data: bytes) -> None:
        async with self._whole:
            await super().write(data)


class _Streams(dict):
    """Yamux's ``streams``: every stream put in it writes whole (``_WholeWrites``)."""

    def __setitem__(self, stream_id: int, stream) -> None:
        if type(stream) is YamuxStream:
            stream.__class__ = _WholeWrites
            stream._whole = trio.Lock()
        super().__setitem__(stream_id, stream)


class GuardedYamux(Yamux):
    """py-libp2p's yamux, with caps on what it buffers (see the module docstring).

    The caps are checked where a DATA frame's bytes would be appended to a
    stream's buffer; past a cap the bytes are dropped and the connection is
    closed (once), with one info line naming the peer. ``guarded_yamux`` makes
    the class for one host, carrying its limits and its set of connections.

    py-libp2p 0.8.1 ignores the muxer class it is given for ``/yamux/1.0.0``
    (``MuxerMultistream.new_conn`` constructs ``Yamux`` itself), so ``adopt``
    turns each new, not yet started ``Yamux`` into this class; it adds methods
    and two attributes, and makes every stream's writes whole (``_WholeWrites``).
    """

    config: HostConfig = HostConfig()
    connections: weakref.WeakSet | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._guard()

    @classmethod
    def adopt(cls, conn: Yamux) -> GuardedYamux:
        conn.__class__ = cls
        conn._guard()
        return conn

    def _guard(self) -> None:
        self.stream_buffers = _StreamBuffers(self)
        streams, self.streams = self.streams, _Streams()
        for stream_id, stream in streams.items():
            self.streams[stream_id] = stream
        self.violation: str = ""
        if self.connections is not None:
            self.connections.add(self)

    def buffered(self) -> int:
        return sum(len(b) for b in list(self.stream_buffers.values()))

    def _may_buffer(self, stream_id: int, buffered: int, size: int) -> bool:
        if self.violation:
            return False
        stream = self.streams.get(stream_id)
        if stream is not None and getattr(stream, "closed", False):
            return False  # py-libp2p keeps appending to a reset stream for up to 90 s; nobody will read it
        credit = getattr(stream, "recv_window", DEFAULT_WINDOW_SIZE)  # what we granted and it has not used
        window = getattr(stream, "target_recv_window", DEFAULT_WINDOW_SIZE)
        problem = ""
        if size > credit:
            problem = f"sent past the receive window of stream {stream_id} ({size - max(credit, 0)} bytes over)"
        elif buffered + size > 2 * window + MAX_MESSAGE_SIZE:
            problem = f"has {buffered + size} bytes unread on stream {stream_id}"
        else:
            mine = self.buffered() + size
            if mine > self.config.max_buffered_per_connection:
                problem = f"has {mine} bytes unread on one connection"
            elif mine > 1 << 20 and self.connections is not None:
                total = sum(c.buffered() for c in list(self.connections) if c is not self) + mine
                if total > self.config.max_buffered_total:
                    problem = f"has {mine} bytes unread while all connections hold {total}"
        if not problem:
            return True
        self.violation = problem
        log.info("closing the connection of peer %s…: it %s", self.peer_id.to_base58()[:12], problem)
        if self._nursery is not None:
            self._nursery.start_soon(self._close_for_violation)
        return False

    async def _close_for_violation(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            try:
                await self.secured_conn.close()  # the read loop then fails and tears the connection down
            except Exception:
                pass


def guarded_yamux(config: HostConfig) -> type[GuardedYamux]:
    """A ``GuardedYamux`` class for one host: its limits, and a set of its live connections."""
    return type("GuardedYamux", (GuardedYamux,), {"config": config, "connections": weakref.WeakSet()})


def adopt_yamux(swarm, cls: type[GuardedYamux]) -> None:
    """Make every new yamux connection of ``swarm`` a ``cls`` (py-libp2p ignores ``muxer_opt`` for yamux)."""
    muxers = swarm.upgrader.muxer_multistream
    new_conn = muxers.new_conn

    async def guarded_new_conn(conn, peer_id):
        muxed = await new_conn(conn, peer_id)
        if type(muxed) is Yamux:
            cls.adopt(muxed)
        return muxed

    muxers.new_conn = guarded_new_conn
