"""``llmarket gateway``: the market behind an OpenAI-compatible HTTP API.

A raw ASGI application served by Hypercorn's trio worker, inside the node's
trio world (no asyncio). It is a requester node: it keeps the offer book,
routes, fails over and pays exactly as ``llmarket request`` does
(``run_job``), one job per prompt of each HTTP request, all sharing one
``DepositPayer``: every worker is paid from the wallet's one deposit, with no
chain step, and concurrent jobs to one worker add up on its pair. A client
that disconnects, streaming or not, cancels its jobs, and the workers free
their slots. A stream's response starts with its first
text (or when its jobs end), so a request that fails before that gets a plain
error with the real HTTP status. Request and response shapes:
``node.api.openai_api``.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from node.api.dashboard import Dashboard, RequesterPayments
from node.api.http import authorized, lifespan
from node.api.openai_api import (
    ApiCall,
    Metrics,
    chunk_json,
    completion_json,
    error_for,
    model_json,
    models_json,
    parse_request,
    usage_chunk_json,
)
from node.app.requester import RequesterNode, VerifyBeforePaying, report_overcharges
from node.errors import ApiError
from node.inference.sampling import TokenLogprob
from node.market.activity import CANCELLED, DONE, FAILED, REQUESTED, Activity, JobRecord
from node.market.requester import JobObserver, JobResult, JobSpec, run_job
from node.market.routing import Reputation, RouteQuery
from node.market.trust import Trust
from node.payments.payer import DepositPayer, FreePayer
from node.verify.fraud import audit
from node.verify.local import LocalVerifier

if TYPE_CHECKING:
    from node.payments.wallet import DepositWallet

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
MAX_PENDING_AUDITS = 64  # finished jobs waiting to be checked; beyond that, answers go unchecked
CLIENT_GONE = 499  # the status recorded (never sent) when a client hangs up first, as nginx counts it


def client_gone() -> ApiError:
    return ApiError(CLIENT_GONE, "the client closed the request", type="client_closed_request")


@dataclass(frozen=True)
class _Text:
    index: int  # which job (choice)
    text: str
    logprobs: tuple[TokenLogprob, ...]  # this text's tokens, when the call asked for logprobs


@dataclass(frozen=True)
class _End:
    index: int
    result: JobResult | None = None
    error: BaseException | None = None


class _JobEvents(JobObserver):
    """One prompt's job as the gateway hears it: texts (with their logprobs) go to ``events``, and the
    job's row in ``activity`` follows its worker, tokens and failovers."""

    def __init__(self, index: int, events: trio.MemorySendChannel, activity: Activity, row: JobRecord) -> None:
        self.index, self.events, self.activity, self.row = index, events, activity, row
        self.pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not come yet

    def on_attempt(self, peer_id: str) -> None:
        self.row.peer = peer_id  # shown at the next event

    def on_tokens(self, prompt_tokens: int, tokens: int) -> None:
        self.activity.progress(self.row.id, tokens, prompt_tokens=prompt_tokens)

    def on_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> None:  # called just before on_text
        self.pending.extend(logprobs)

    def on_text(self, piece: str) -> None:
        self.events.send_nowait(_Text(self.index, piece, tuple(self.pending)))
        self.pending.clear()

    def on_failover(self, peer_id: str, reason: str, started: bool) -> None:
        self.activity.failover(self.row.id, peer_id, reason)


@dataclass
class Gateway:
    requester: RequesterNode
    wallet: DepositWallet | None = None  # funded (node.app.paid.paying_wallet)
    max_price_per_1k: int = 0
    api_key: str | None = None
    deadline_s: float = 120.0
    metrics: Metrics = field(default_factory=Metrics)
    reputation: Reputation = field(default_factory=Reputation)
    verifier: LocalVerifier | None = None  # --verify: check every answer here, after it was sent
    spot_check: float = 0.0  # --spot-check P: have another worker check an answer, with probability P
    activity: Activity = field(default_factory=lambda: Activity(amount_label="spent"))  # for the web page

    def __post_init__(self) -> None:
        # Remember workers across requests with the node's reputation (its offer book keeps the ones that served us).
        self.reputation = getattr(self.requester, "reputation", None) or self.reputation
        # One payer for every request: concurrent jobs to one worker add up on the pair's one counter.
        self.trust: Trust = getattr(self.requester, "trust", None) or Trust()
        self.payer = (
            DepositPayer(
                self.wallet.client,
                self.wallet.ledger,
                self.requester.host.peer_id,  # the terms of its jobs are bound to the peer that sends them
                usage=self.requester.checked_usage,
                credit=self.trust.credit_tokens,
            )  # fmt: skip
            if self.wallet
            else FreePayer()
        )
        # --verify: each answer is checked here before its last receipt is signed (the client's stream ends
        # after the check: a check delays the end of a response, never its text).
        self.checker = VerifyBeforePaying(self.verifier) if self.verifier is not None else None
        self._audits_send, self._audits = trio.open_memory_channel(MAX_PENDING_AUDITS)
        self.dashboard = Dashboard(
            "gateway", self.requester.host, self.activity, self.requester.offers, self.reputation,
            payments=RequesterPayments(self.wallet) if self.wallet else None, api_key=self.api_key,
        )  # fmt: skip

    @property
    def auditing(self) -> bool:
        return self.verifier is not None or self.spot_check > 0

    async def run_audits(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Check finished jobs (``--verify``, ``--spot-check``) one at a time, after their answers were sent,
        so a check never delays a client; a failed one bans the worker and is reported (node/verify/fraud.py)."""
        task_status.started()
        async for result, spec, row in self._audits:
            try:
                checks = await audit(self.requester, result, verifier=self.checker, payer=self.payer, trust=self.trust,
                                     spot_check_probability=self.spot_check, query=self._query(spec))  # fmt: skip
            except Exception as err:  # a check that could not run (a chain error paying the verifier, say)
                log.warning("could not check job %s: %s", result.proof.request.job_id if result.proof else "?", err)
                continue
            self.metrics.audit(checks)
            verdict = checks.verdict
            if verdict is not None:
                how = "local" if checks.local is not None else "spot"
                self.activity.checked(row, verdict.ok, how, verdict.reason, cost=checks.spot.cost if checks.spot else 0)

    # ------------------------------------------------------------------ ASGI

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = False

        async def send_tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            await self._route(method, path, scope, receive, send_tracked)
        except ApiError as err:
            if err.status == CLIENT_GONE:  # nobody to answer
                if not started:
                    self.metrics.request(CLIENT_GONE)
                return
            self.metrics.error(err)
            await self._json(send_tracked, err.status, err.body())
        except Exception as err:  # a bug: log it whole, answer 500 if the response has not started
            log.exception("unexpected error answering %s %s", method, path)
            if not started:
                api = error_for(err)
                self.metrics.error(api)
                await self._json(send_tracked, api.status, api.body())

    async def _route(self, method: str, path: str, scope, receive, send) -> None:
        if self.dashboard.owns(path):  # the web page and its API (node.api.dashboard), which check the key themselves
            await self.dashboard.handle(scope, receive, send)
            return
        if path != "/health" and not authorized(scope, self.api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer …)", type="invalid_request_error",
                           code="invalid_api_key")  # fmt: skip
        if method == "GET" and path == "/health":
            live = self.requester.offers()
            await self._json(send, 200, {"status": "ok", "workers": len(live), "peer_id": self.requester.host.peer_id})
        elif method == "GET" and path == "/metrics":
            await self._respond(send, 200, self.metrics.render().encode(), "text/plain; version=0.0.4")
        elif method == "GET" and path == "/v1/models":
            await self._json(send, 200, models_json(self.requester.offers(), int(time.time())))
        elif method == "GET" and path.startswith("/v1/models/"):
            name = path.removeprefix("/v1/models/")
            await self._json(send, 200, model_json(self.requester.offers(), name, int(time.time())))
        elif method == "POST" and path in ("/v1/chat/completions", "/v1/completions"):
            await self._complete(receive, send, chat=path.endswith("chat/completions"))
        else:
            raise ApiError(404, f"no route {method} {path}", type="invalid_request_error", code="not_found")

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
                raise client_gone()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_BODY:
                raise ApiError(413, f"the request body is over {MAX_BODY} bytes; send a shorter one",
                               type="invalid_request_error", code="request_too_large")  # fmt: skip
            if not message.get("more_body"):
                break
        try:
            return json.loads(b"".join(chunks) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the body is not JSON: {err}", type="invalid_request_error") from None

    # ------------------------------------------------------------ completions

    def _query(self, spec: JobSpec) -> RouteQuery:
        deployment = self.wallet.client.deployment if self.wallet else None
        return RouteQuery(
            model=spec.model,
            max_price_per_1k=self.max_price_per_1k,
            chain_id=deployment.chain_id if deployment else 0,
            escrow=self.wallet.escrow if self.wallet else "",
            free_only=self.wallet is None,
        )

    def _failure(self, err: BaseException, completion_id: str) -> ApiError:
        """The API error for a job's exception; a bug (500) is logged with its traceback."""
        api = error_for(err)
        if api.status == 500:
            log.error("unexpected error in %s", completion_id, exc_info=err)
        return api

    async def _job(self, call: ApiCall, index: int, events: trio.MemorySendChannel, call_id: str) -> None:
        """Run one prompt's job; its texts (with their logprobs) and then its end go to ``events``."""
        spec = call.specs[index]
        row = self.activity.started(REQUESTED, f"{call_id}-{index}" if len(call.specs) > 1 else call_id, spec.model)
        heard = _JobEvents(index, events, self.activity, row)
        try:
            result = await run_job(
                self.requester.host, self.requester.offers, self._query(spec), spec, reputation=self.reputation,
                deadline_s=self.deadline_s, payer=self.payer, observer=heard,
                gate=self.checker.gate if self.checker is not None else None,
            )  # fmt: skip
        except Exception as err:
            self.activity.ended(row.id, FAILED, detail=str(err) or type(err).__name__)
            events.send_nowait(_End(index, error=err))
            return
        except BaseException:  # cancelled: the client went away (or the gateway stops)
            self.activity.ended(row.id, CANCELLED, detail="cancelled")
            raise
        if result.overcharges:  # workers that billed more than they used were banned; tell the market
            await report_overcharges(self.requester, result)
        decode_s = result.elapsed_s - (result.first_token_s or 0.0)
        rate = (result.completion_tokens - 1) / decode_s if result.completion_tokens > 1 and decode_s > 0 else None
        self.activity.ended(row.id, DONE, detail=result.finish_reason, tokens=result.completion_tokens,
                            prompt_tokens=result.prompt_tokens, tokens_per_s=rate and round(rate, 1),
                            cost=result.cost)  # fmt: skip
        if heard.pending:  # tokens with no text of their own (the end-of-generation token, say)
            events.send_nowait(_Text(index, "", tuple(heard.pending)))
        events.send_nowait(_End(index, result=result))
        if self.auditing:
            try:
                self._audits_send.send_nowait((result, spec, row.id))
            except trio.WouldBlock:
                log.warning("too many answers waiting to be checked; one goes unchecked")

    async def _complete(self, receive, send, *, chat: bool) -> None:
        body = await self._body(receive)
        call = parse_request(body, chat=chat, offers=self.requester.offers(), max_price_per_1k=self.max_price_per_1k)
        completion_id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        events_in, events_out = trio.open_memory_channel(math.inf)
        gone = False
        failure: ApiError | None = None

        async def watch_disconnect(cancel_scope: trio.CancelScope) -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            log.info("client went away; cancelling %s", completion_id)
            cancel_scope.cancel()  # cancels the jobs: the workers stop and free their slots

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_disconnect, nursery.cancel_scope)
            for index in range(len(call.specs)):
                nursery.start_soon(self._job, call, index, events_in, completion_id)
            if call.stream:
                failure = await self._stream(call, completion_id, created, events_out, send)
            else:
                failure = await self._collect(call, completion_id, created, events_out, send)
            nursery.cancel_scope.cancel()  # stop watching for a disconnect (and any job left after a failure)
        if gone:
            raise client_gone()
        if failure is not None:
            raise failure

    async def _collect(self, call: ApiCall, completion_id: str, created: int, events, send) -> ApiError | None:
        """The non-streaming answer, once every job ended; or the first job's failure, to answer instead."""
        results: dict[int, JobResult] = {}
        logprobs: list[list[TokenLogprob]] = [[] for _ in call.specs]
        async for event in events:
            if isinstance(event, _Text):
                logprobs[event.index].extend(event.logprobs)
            elif event.error is not None:
                return self._failure(event.error, completion_id)
            else:
                results[event.index] = event.result
                self.metrics.job(event.result)
                if len(results) == len(call.specs):
                    break
        ordered = [results[i] for i in range(len(call.specs))]
        await self._json(send, 200, completion_json(call, completion_id, created, ordered, logprobs))
        return None

    async def _stream(self, call: ApiCall, completion_id: str, created: int, events, send) -> ApiError | None:
        """Stream SSE chunks; a failure before the response started is returned, to answer with its status."""
        started = False
        sent: list[bool] = [False] * len(call.specs)  # whether a choice's first chunk (with its role) went out
        offsets = [len(spec.prompt or "") for spec in call.specs]  # legacy completions' text_offset
        results: list[JobResult] = []

        async def event(payload) -> None:
            nonlocal started
            if not started:
                self.metrics.request(200)
                headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                started = True
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        async for item in events:  # each job's texts in order, until every job ended or one failed
            if isinstance(item, _Text):
                chunk = chunk_json(
                    call, completion_id, created, item.text, index=item.index, first=not sent[item.index],
                    logprobs=item.logprobs if call.logprobs else None, offset=offsets[item.index],
                )  # fmt: skip
                sent[item.index] = True
                offsets[item.index] += len(item.text)
                await event(chunk)
            elif item.error is not None:
                failure = self._failure(item.error, completion_id)
                if not started:
                    return failure
                self.metrics.error(failure)  # after the headers, errors are reported in-band, as OpenAI does
                await event(failure.body())
                break
            else:
                result = item.result
                self.metrics.job(result)
                results.append(result)
                await event(chunk_json(call, completion_id, created, None, result.finish_reason, index=item.index,
                                       first=not sent[item.index]))  # fmt: skip
                sent[item.index] = True
                if len(results) == len(call.specs):
                    if call.include_usage:
                        await event(usage_chunk_json(call, completion_id, created, results))
                    break
        await event("[DONE]")
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return None
