"""``llmarket gateway``: the market behind an OpenAI-compatible HTTP API.

A raw ASGI application served by Hypercorn's trio worker, inside the node's
trio world (no asyncio). It is a requester node: it keeps the offer book,
routes, fails over and pays exactly as ``llmarket request`` does
(``run_job``), one job per HTTP request, all sharing one wallet (channel
selection is serialised and every signature is recorded before use, so
concurrent requests never double-spend a channel; transactions share one
nonce lock). A client that disconnects mid-stream cancels its job, and the
worker frees the slot. Request and response shapes: ``node.openai_api``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field

import trio

from node.node import Requester
from node.openai_api import (
    ApiCall,
    ApiError,
    Metrics,
    chunk_json,
    completion_json,
    error_for,
    model_resolver,
    models_json,
    parse_request,
    usage_chunk_json,
)
from node.payments.wallet import Wallet
from node.requester import run_job
from node.routing import Reputation, RouteQuery

log = logging.getLogger("node.gateway")

MAX_BODY = 1 << 20


@dataclass
class Gateway:
    requester: Requester
    wallet: Wallet | None = None
    max_price_per_1k: int = 0
    api_key: str | None = None
    deadline_s: float = 120.0
    metrics: Metrics = field(default_factory=Metrics)
    reputation: Reputation = field(default_factory=Reputation)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if self.api_key and path != "/health":
                self._authorize(scope)
            if method == "GET" and path == "/health":
                live = self.requester.offers()
                await self._json(
                    send, 200, {"status": "ok", "workers": len(live), "peer_id": self.requester.host.peer_id}
                )
            elif method == "GET" and path == "/metrics":
                await self._respond(send, 200, self.metrics.render().encode(), "text/plain; version=0.0.4")
            elif method == "GET" and path == "/v1/models":
                await self._json(send, 200, models_json(self.requester.offers(), int(time.time())))
            elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
                await self._complete(scope, receive, send, chat=path.endswith("chat/completions"))
            else:
                raise ApiError(404, f"no route {method} {path}", type="invalid_request_error", code="not_found")
        except ApiError as err:
            self.metrics.error(err)
            await self._json(send, err.status, err.body())

    def _authorize(self, scope) -> None:
        headers = dict(scope.get("headers") or [])
        if headers.get(b"authorization", b"").decode() != f"Bearer {self.api_key}":
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer …)", type="invalid_request_error",
                           code="invalid_api_key")  # fmt: skip

    async def _respond(self, send, status: int, body: bytes, content_type: str) -> None:
        self.metrics.request(status)
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _json(self, send, status: int, payload: dict) -> None:
        await self._respond(send, status, json.dumps(payload).encode(), "application/json")

    async def _body(self, receive) -> object:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise (
                    trio.Cancelled._create()
                    if False
                    else ApiError(400, "client went away", type="invalid_request_error")
                )
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                raise ApiError(400, f"request body over {MAX_BODY} bytes", type="invalid_request_error")
            if not message.get("more_body"):
                break
        try:
            return json.loads(b"".join(chunks) or b"null")
        except json.JSONDecodeError as err:
            raise ApiError(400, f"the body is not JSON: {err}", type="invalid_request_error") from None

    # ------------------------------------------------------------ completions

    def _query(self, call: ApiCall) -> RouteQuery:
        deployment = self.wallet.client.deployment if self.wallet else None
        return RouteQuery(
            model=call.spec.model,
            max_price_per_1k=self.max_price_per_1k,
            chain_id=deployment.chain_id if deployment else 0,
            escrow=deployment.escrow if deployment else "",
            free_only=self.wallet is None,
        )

    async def _complete(self, scope, receive, send, *, chat: bool) -> None:
        body = await self._body(receive)
        call = parse_request(
            body,
            chat=chat,
            resolve_model=model_resolver(self.requester.offers()),
            max_price_per_1k=self.max_price_per_1k,
        )
        completion_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        if not call.stream:
            try:
                result = await run_job(
                    self.requester.host, self.requester.offers, self._query(call), call.spec,
                    reputation=self.reputation, deadline_s=self.deadline_s, wallet=self.wallet,
                )  # fmt: skip
            except Exception as err:  # every failure becomes an OpenAI error
                raise error_for(err) from None
            self.metrics.job(result)
            await self._json(send, 200, completion_json(call, completion_id, created, result))
            return
        await self._stream(call, completion_id, created, receive, send)

    async def _stream(self, call: ApiCall, completion_id: str, created: int, receive, send) -> None:
        self.metrics.request(200)
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

        async def event(payload) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        texts_in, texts_out = trio.open_memory_channel(math.inf)
        outcome: dict = {}

        async def produce() -> None:
            try:
                outcome["result"] = await run_job(
                    self.requester.host, self.requester.offers, self._query(call), call.spec,
                    reputation=self.reputation, deadline_s=self.deadline_s, wallet=self.wallet,
                    on_text=texts_in.send_nowait,
                )  # fmt: skip
            except Exception as err:  # after the headers, errors are reported in-band, as OpenAI does
                outcome["error"] = error_for(err)
            finally:
                texts_in.close()

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            log.info("client went away; cancelling %s", completion_id)
            cancel_scope.cancel()  # cancels the job: the worker stops and frees the slot

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            nursery.start_soon(produce)
            first = True
            async for text in texts_out:  # in order, until the job ends
                await event(chunk_json(call, completion_id, created, text, first=first))
                first = False
            if "error" in outcome:
                self.metrics.error(outcome["error"])
                await event(outcome["error"].body())
            else:
                result = outcome["result"]
                self.metrics.job(result)
                await event(chunk_json(call, completion_id, created, None, result.finish_reason))
                if call.include_usage:
                    await event(usage_chunk_json(call, completion_id, created, result))
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            nursery.cancel_scope.cancel()  # stop watching for a disconnect
