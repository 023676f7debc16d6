"""The web page and its JSON API: what is on offer, what this node is doing, what it earned or spent.

``llmarket gateway`` serves it at ``/`` next to its OpenAI API, and ``llmarket
serve --http HOST:PORT`` serves it for a worker. The page is static files
(``node/api/web/``: HTML, one script, one style sheet, and uPlot for the plots,
copied from npm by ``scripts/setup``); everything it shows comes from
``/api/…`` (docs/gateway.md, "The web page"), which tests read as well:

- ``/api/node``: who this node is, its slots (a worker), wallet and totals;
- ``/api/market``: the offers it sees, by model, with what routing knows of each worker;
- ``/api/jobs``, ``/api/series``: its jobs and an hour of sums (``node.market.activity``);
- ``/api/payments``: what it was paid (a worker) or paid (a requester) per counterparty on the
  ``DepositEscrow``: signed, claimed on chain, pending, reserve slot;
- ``/api/events``: server-sent events (``job``, ``market``, ``node``) that keep the page live.

The payment side is one concern here too: a ``WorkerPayments`` or
``RequesterPayments`` reads balances, the deposit and the pairs, and a free node has none.
With an API key, ``/api/…`` needs ``Authorization: Bearer KEY`` (or ``?key=KEY``,
since a browser's EventSource cannot send headers); the page's static files are
open, and hold no data.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import trio

from node import __version__
from node.api.http import authorized, lifespan
from node.market.activity import Activity
from node.market.routing import Reputation
from node.protocol.messages import ModelInfo, Offer

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
WATCH_S = 1.0  # how often the market and the node are compared with what the feed last said
BALANCE_TTL_S = 5.0  # chain balances are read at most this often
PING_S = 15.0  # a comment on an idle event stream, so proxies and browsers keep it open
MAX_JOBS_LISTED = 500
PING_EVERY_S = 30.0  # how often the page's market view pings workers, for "latency from here"
PINGS_PER_ROUND = 32  # at most this many workers each round, least recently measured first
PING_TIMEOUT_S = 5.0


class Payments(Protocol):
    """A node's money, as the page shows it."""

    role: str  # "worker" (paid through claims) or "requester" (pays from its deposit)

    async def wallet(self) -> dict: ...

    async def payments(self) -> list[dict]: ...


def _token_info(client: Any) -> tuple[str, int]:
    """The token's symbol and decimals (``LLMToken``), read from the chain."""
    token = client.token.functions
    return token.symbol().call(), token.decimals().call()


def _amount(value: int | None) -> str | None:
    """Token amounts travel as decimal strings: base units exceed what a browser's JSON numbers hold exactly."""
    return None if value is None else str(value)


def _hex(raw: bytes) -> str:
    return "0x" + raw.hex()


@dataclass
class _Cached:
    """One blocking chain read (a balance), at most every ``ttl_s``; None when it fails.

    The read goes through ``io`` (the client's ``ChainIO``: its threads and its limit, shared with
    the node's own chain calls), and one refresh runs at a time: pages that ask together wait for
    the one read in flight and share its answer, so a reload storm reaches the chain once.
    """

    read: Callable[[], Any]
    io: Callable[..., Awaitable[Any]]
    ttl_s: float = BALANCE_TTL_S
    _value: Any = None
    _at: float = -1e18
    _key: Any = None
    _refreshing: trio.Lock = field(default_factory=trio.Lock)

    def refresh_on(self, key: Any) -> None:
        """Read again at the next ``get`` when ``key`` (what the value depends on) changed."""
        if key != self._key:
            self._key, self._at = key, -1e18

    async def get(self) -> Any:
        async with self._refreshing:  # a second caller waits here, then finds the value fresh
            now = trio.current_time()
            if now - self._at >= self.ttl_s:
                try:
                    self._value = await self.io(self.read)
                except Exception as err:  # a chain that is down shows as "unknown", never breaks the page
                    log.debug("balance read failed: %s", err)
                    self._value = None
                self._at = now
        return self._value


@dataclass
class WorkerPayments:
    """A paid worker's wallet: its token balance and the requesters' receipts it holds and claimed (the
    ``WorkerLedger``'s pairs on its ``DepositEscrow``)."""

    client: Any  # DepositClient, with the worker's account
    ledger: Any  # WorkerLedger
    role: str = "worker"

    def __post_init__(self) -> None:
        self._balance = _Cached(lambda: self.client.token_balance(self.client.account.address), self.client.io)
        self._token = _Cached(lambda: _token_info(self.client), self.client.io, ttl_s=3600.0)

    def _pairs(self) -> list:
        where = (self.client.deployment.chain_id, self.client.address)
        return [p for p in self.ledger.pairs() if (p.chain_id, p.escrow) == where]

    async def wallet(self) -> dict:
        pairs = await trio.to_thread.run_sync(self._pairs)
        self._balance.refresh_on(sum(p.claimed for p in pairs))  # a claim moves the balance: read it again
        symbol, decimals = await self._token.get() or ("", None)
        return {
            "address": self.client.account.address,
            "token": self.client.deployment.token,
            "escrow": self.client.address,
            "token_symbol": symbol,
            "token_decimals": decimals,
            "token_balance": _amount(await self._balance.get()),
            "receipted": str(sum(p.best for p in pairs)),
            "claimed": str(sum(p.claimed for p in pairs)),
        }

    async def payments(self) -> list[dict]:
        pairs = await trio.to_thread.run_sync(self._pairs)
        return [
            {
                "counterparty": p.requester,
                "peer_id": "",
                "signed": str(p.best),
                "claimed": str(p.claimed),
                "pending": str(p.claimable),
                "slot": p.has_slot,
                "status": "unlocking" if p.unlock_at else "pending" if p.claimable > 0 else "claimed",
                "error": p.last_error,
            }
            for p in pairs
        ]


@dataclass
class RequesterPayments:
    """A paying requester's wallet (a gateway's): its token balance, its deposit and reserve in the
    ``DepositEscrow``, and what it signed to each worker against what the chain paid (``DepositWallet``)."""

    wallet_: Any  # DepositWallet
    role: str = "requester"

    def __post_init__(self) -> None:
        io = self.wallet_.client.io
        self._balance = _Cached(lambda: self.wallet_.client.token_balance(self.wallet_.address), io)
        self._token = _Cached(lambda: _token_info(self.wallet_.client), io, ttl_s=3600.0)
        self._account = _Cached(self.wallet_.account, io)
        self._pending = _Cached(self.wallet_.pending, io)  # one chain read per worker: at most every TTL

    async def wallet(self) -> dict:
        d = self.wallet_.client.deployment
        pairs = await trio.to_thread.run_sync(self.wallet_.ledger.pairs, d.chain_id, self.wallet_.escrow)
        signed = sum(p.signed for p in pairs)
        self._pending.refresh_on(signed)  # a new receipt: read the pairs again
        symbol, decimals = await self._token.get() or ("", None)
        account = await self._account.get()
        return {
            "address": self.wallet_.address,
            "token": d.token,
            "escrow": self.wallet_.escrow,
            "token_symbol": symbol,
            "token_decimals": decimals,
            "token_balance": _amount(await self._balance.get()),
            "signed": str(signed),
            "deposit": _amount(account.deposit if account else None),
            "reserve_left": _amount(account.reserve_left if account else None),
            "reserve_total": _amount(account.reserve_total if account else None),
            "slots": account.slots if account else None,
            "slots_used": account.slots_used if account else None,
            "unlock_at": account.unlock_at if account else None,
        }

    async def payments(self) -> list[dict]:
        rows = await self._pending.get() or []
        return [
            {
                "counterparty": p.worker,
                "peer_id": p.peer_id,
                "signed": str(p.signed),
                "claimed": str(p.paid),
                "pending": str(p.pending),
                "slot": p.has_slot,
                "status": "pending" if p.pending > 0 else "claimed",
                "error": None,
            }
            for p in rows
        ]


@dataclass
class WorkerInfo:
    """What a worker's page says about its own serving."""

    model: ModelInfo
    engine: Any  # Engine: slots, reproducibility
    service: Any  # WorkerService: free slots
    tokens_per_s: float  # measured when it started
    price_per_1k: int
    verify_price_per_1k: int

    def json(self, names: dict[str, str]) -> dict:
        name = self.model.name if self.model.name != self.model.cid else names.get(self.model.cid, self.model.name)
        return {
            "model": {"cid": self.model.cid, "name": name},
            "slots_total": self.engine.slots,
            "slots_free": self.service.free_slots,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "price_per_1k": str(self.price_per_1k),
            "verify_price_per_1k": str(self.verify_price_per_1k),
            "reproducible": bool(self.engine.reproducible),
            "numerics": self.engine.numerics,
        }


@dataclass
class Dashboard:
    """The page and ``/api/…`` over one node. ``handle`` answers a path it ``owns``; ``run`` keeps the feed live."""

    role: str  # "gateway" or "worker"
    host: Any  # Host: peer id, addresses, connections
    activity: Activity
    offers: Callable[[], list[Offer]]  # the live offers this node sees
    reputation: Reputation = field(default_factory=Reputation)
    payments: Payments | None = None
    worker: WorkerInfo | None = None
    api_key: str | None = None
    clock: Callable[[], float] = time.time
    started_at: float = field(default_factory=time.time)
    _first_seen: dict[tuple[str, int], float] = field(default_factory=dict)  # (peer, offer seq) → when
    _pinged: dict[str, tuple[float, float]] = field(default_factory=dict)  # peer → (round trip ms, when)

    @staticmethod
    def owns(path: str) -> bool:
        return path == "/" or path.startswith(("/static/", "/api/"))

    # ------------------------------------------------------------ the data

    def market(self) -> dict:
        now = self.clock()
        offers = self.offers()
        seen = {(o.peer_id, o.seq) for o in offers}
        self._first_seen = {key: at for key, at in self._first_seen.items() if key in seen}
        models: dict[str, dict] = {}
        for offer in sorted(offers, key=lambda o: (o.price_per_1k, o.peer_id)):
            first = self._first_seen.setdefault((offer.peer_id, offer.seq), now)
            record = self.reputation.peers.get(offer.peer_id)
            latency = self._pinged[offer.peer_id][0] if offer.peer_id in self._pinged else None
            worker = {
                "peer_id": offer.peer_id,
                "self": offer.peer_id == self.host.peer_id,
                "price_per_1k": str(offer.price_per_1k),
                "verify_price_per_1k": str(offer.verify_price_per_1k),
                "slots_free": offer.slots_free,
                "slots_total": offer.slots_total,
                "tokens_per_s": offer.tokens_per_s,
                "first_token_ms": offer.first_token_ms,
                "latency_ms": round(latency, 1) if latency is not None else None,  # a ping's round trip
                "reputation": round(self.reputation.reliability(offer.peer_id), 3) if record else None,
                "banned": self.reputation.banned(offer.peer_id, now),
                "reachability": self._reachability(offer),
                "hardware": offer.hardware,
                "reproducible": offer.reproducible,
                "age_s": round(max(0.0, now - first), 1),
                "addrs": list(offer.addrs),
            }
            for model in offer.models:
                entry = models.setdefault(
                    model.cid,
                    {"cid": model.cid, "name": model.name, "quantization": model.quantization,
                     "context": model.context_size, "workers": []},
                )  # fmt: skip
                entry["workers"].append(worker)
        return {"now": now, "models": sorted(models.values(), key=lambda m: m["name"])}

    def names(self) -> dict[str, str]:
        """Model CID → the friendly name most offers give it (a model fetched by CID is named by its CID)."""
        votes: dict[str, Counter] = {}
        for offer in self.offers():
            for model in offer.models:
                if model.name and model.name != model.cid:
                    votes.setdefault(model.cid, Counter())[model.name] += 1
        return {cid: counts.most_common(1)[0][0] for cid, counts in votes.items()}

    def jobs(self, limit: int) -> list[dict]:
        names = self.names()
        jobs = self.activity.jobs(limit)
        for job in jobs:
            if not job["model_name"] or job["model_name"] == job["model"]:
                job["model_name"] = names.get(job["model"], job["model_name"])
        return jobs

    def _reachability(self, offer: Offer) -> str:
        if offer.peer_id == self.host.peer_id:
            return "direct"
        nat = getattr(self.host, "nat", None)
        kind = nat.connection_kind(offer.peer_id) if nat is not None else None
        if kind:
            return kind
        if not offer.addrs:
            return "unknown"
        return "relayed" if all("/p2p-circuit" in a for a in offer.addrs) else "direct"

    async def node(self) -> dict:
        totals = dict(self.activity.totals)
        amount = totals.pop("amount")
        totals["earned" if self.role == "worker" else "spent"] = str(amount)
        return {
            "role": self.role,
            "peer_id": self.host.peer_id,
            "version": __version__,
            "started_at": self.started_at,
            "now": self.clock(),
            "addrs": list(self.host.advertised()),
            "worker": self.worker.json(self.names()) if self.worker else None,
            "wallet": await self.payments.wallet() if self.payments else None,
            "totals": totals,
        }

    async def pairs(self) -> dict:
        role = self.payments.role if self.payments else ("worker" if self.role == "worker" else "requester")
        return {"role": role, "pairs": await self.payments.payments() if self.payments else []}

    # ------------------------------------------------------------ live feed

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Tell the feed when the market or this node changed (checked every ``WATCH_S``), and measure the
        latency to workers this node has not used (libp2p ping, every ``PING_EVERY_S``)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._ping_workers)
            task_status.started()
            await self._watch()

    async def _ping_workers(self) -> None:
        while True:
            offers = [o for o in self.offers() if o.peer_id != self.host.peer_id]
            live = {o.peer_id for o in offers}
            self._pinged = {peer: seen for peer, seen in self._pinged.items() if peer in live}
            offers.sort(key=lambda o: self._pinged.get(o.peer_id, (0.0, 0.0))[1])
            async with trio.open_nursery() as nursery:
                for offer in offers[:PINGS_PER_ROUND]:
                    nursery.start_soon(self._ping, offer)
            await trio.sleep(PING_EVERY_S)

    async def _ping(self, offer: Offer) -> None:
        with trio.move_on_after(PING_TIMEOUT_S):
            try:
                self._pinged[offer.peer_id] = (await self.host.ping(offer.peer_id, offer.addrs), self.clock())
            except Exception as err:  # an unreachable worker just has no latency to show
                log.debug("ping %s failed: %s", offer.peer_id[:12], err)

    async def _watch(self) -> None:
        last_market = last_node = None
        while True:
            await trio.sleep(WATCH_S)
            market = self.market()
            shape = [(m["cid"], [(w["peer_id"], w["slots_free"], w["price_per_1k"], w["banned"], w["reachability"],
                                  w["latency_ms"]) for w in m["workers"]]) for m in market["models"]]  # fmt: skip
            if shape != last_market:
                last_market = shape
                self.activity.notify("market", market)
            if not self.activity.watched:  # no page open: no ledger or chain reads for nobody
                last_node = None
                continue
            node = await self.node()
            same = {k: v for k, v in node.items() if k != "now"}
            if same != last_node:
                last_node = same
                self.activity.notify("node", node)

    # ----------------------------------------------------------------- HTTP

    async def handle(self, scope, receive, send) -> None:
        """Answer one HTTP request for a path this dashboard ``owns``."""
        path = scope["path"]
        query = urllib.parse.parse_qs(scope.get("query_string", b"").decode(errors="replace"))
        if scope["method"] not in ("GET", "HEAD"):
            await _json(send, 405, _error("the page and its API are read-only: use GET", "method_not_allowed"))
            return
        if path == "/" or path.startswith("/static/"):
            await self._static(send, "index.html" if path == "/" else path.removeprefix("/static/"))
            return
        if not authorized(scope, self.api_key, query_key=query.get("key", [None])[0]):
            await _json(send, 401, _error("missing or wrong API key (Authorization: Bearer …)", "invalid_api_key"))
            return
        route = path.rstrip("/")
        if route == "/api/node":
            await _json(send, 200, await self.node())
        elif route == "/api/market":
            await _json(send, 200, self.market())
        elif route == "/api/jobs":
            try:
                limit = min(max(int(query.get("limit", ["100"])[0]), 1), MAX_JOBS_LISTED)
            except ValueError:
                await _json(send, 400, _error("limit must be a whole number, e.g. ?limit=50", "invalid_limit"))
                return
            await _json(send, 200, {"jobs": self.jobs(limit)})
        elif route == "/api/payments":
            await _json(send, 200, await self.pairs())
        elif route == "/api/series":
            await _json(send, 200, self.activity.series())
        elif route == "/api/events":
            await self._events(receive, send)
        else:
            await _json(send, 404, _error(f"no route {path}; see docs/gateway.md for the API", "not_found"))

    async def _static(self, send, name: str) -> None:
        target = (WEB_DIR / name).resolve()
        if not target.is_relative_to(WEB_DIR.resolve()) or not target.is_file():
            hint = " (run scripts/setup: it copies the chart library)" if name.startswith("vendor/") else ""
            await _json(send, 404, _error(f"no file {name}{hint}", "not_found"))
            return
        body = await trio.to_thread.run_sync(target.read_bytes)
        kind = CONTENT_TYPES.get(target.suffix, "application/octet-stream")
        await _respond(send, 200, body, kind, [(b"cache-control", b"no-cache")])

    async def _events(self, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]  # fmt: skip
        with self.activity.subscribe() as feed:
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            async with trio.open_nursery() as nursery:

                async def until_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                await send({"type": "http.response.body", "body": b"retry: 2000\n\n", "more_body": True})
                while True:
                    with trio.move_on_after(PING_S) as idle:
                        try:
                            event, data = await feed.receive()
                        except trio.EndOfChannel:  # fell too far behind: the browser reconnects
                            break
                    chunk = b": ping\n\n" if idle.cancelled_caught else _sse(event, data)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()


def _sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": "invalid_request_error", "code": code}}


async def _respond(send, status: int, body: bytes, content_type: str, extra: list | None = None) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, payload: dict) -> None:
    await _respond(send, status, json.dumps(payload).encode(), "application/json", [(b"cache-control", b"no-store")])


@dataclass
class DashboardApp:
    """The dashboard alone as an ASGI app, for ``serve --http``."""

    dashboard: Dashboard

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "http":
            if self.dashboard.owns(scope["path"]):
                await self.dashboard.handle(scope, receive, send)
            else:
                await _json(send, 404, _error(f"no route {scope['path']}; the page is at /", "not_found"))


def worker_dashboard(worker: Any, *, api_key: str | None = None, clock: Callable[[], float] = time.time) -> Dashboard:
    """The page of a running worker (``node.app.worker.WorkerNode``): the market its offer book sees, its jobs, its
    slots and, when paid, its receipts and claims."""
    payments = worker.payments
    return Dashboard(
        "worker",
        worker.host,
        worker.activity,
        lambda: worker.gossip.book.live(clock()),
        payments=WorkerPayments(payments.client, payments.ledger) if payments is not None else None,
        worker=WorkerInfo(
            worker.model,
            worker.engine,
            worker.service,
            worker.speed.tokens_per_s,
            worker.service.price_per_1k,
            worker.verify_price_per_1k,
        ),  # fmt: skip
        api_key=api_key,
        clock=clock,
    )
