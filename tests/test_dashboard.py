"""The web page's data: ``node.market.activity`` (jobs, sums, the live feed) and every ``/api/…`` endpoint of
``node.api.dashboard``, called in-process as ASGI, with real ledgers and an in-process worker. The page itself, in
a real browser on a paid testnet, is tests/test_web.py."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
import trio
import trio.testing

from node.api.dashboard import WEB_DIR, Dashboard, DashboardApp, RequesterPayments, WorkerInfo, WorkerPayments
from node.market.activity import BUCKET_S, CANCELLED, DONE, FAILED, FEED_BUFFER, REJECTED, REQUESTED, SERVED, Activity
from node.market.requester import JobObserver, run_job
from node.market.routing import Reputation
from node.net.identity import Identity
from node.payments.chainio import ChainIO
from node.payments.deposits import DepositAccount
from node.payments.ledger import WalletLedger, WorkerLedger
from node.payments.wallet import Pending
from node.protocol.messages import ModelInfo

from .factories import MODEL, QUERY, SPEC, WORDS, ScriptedEngine, requester, signed_offer, worker

SELF = "12D3KooWSelfSelfSelfSelfSelfSelfSelfSelfSelfSelf"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ activity


def test_a_job_is_followed_from_start_to_end_and_summed_into_its_bucket():
    clock = Clock()
    activity = Activity(amount_label="earned", clock=clock, model_names={MODEL: "test model"})
    job = activity.started(SERVED, "j1", MODEL, "12D3KooWpeer")
    for _ in range(5):
        activity.progress(job.id, 3, prompt_tokens=812)
        clock.now += 0.1
    activity.ended(job.id, DONE, detail="stop", tokens=16, tokens_per_s=30.0, cost=9)  # 15 counted, 16 final
    [row] = activity.jobs()
    assert row["state"] == DONE and row["tokens"] == 16 and row["prompt_tokens"] == 812 and row["cost"] == "9"
    assert row["model_name"] == "test model" and row["ended_at"] == pytest.approx(clock.now)
    assert activity.totals == {"jobs": 1, "tokens": 16, "failovers": 0, "checks": 0, "checks_failed": 0, "amount": 9}
    series = activity.series()
    assert len(series["t"]) == 360 and series["t"][-1] <= clock.now < series["t"][-1] + BUCKET_S
    assert sum(series["tokens_per_s"]) * BUCKET_S == pytest.approx(16)
    assert sum(series["jobs_per_min"]) == pytest.approx(60 / BUCKET_S)
    assert sum(series["amount_per_min"]) == pytest.approx(9 * 60 / BUCKET_S) and series["amount_label"] == "earned"
    clock.now += 3700  # an hour later the job has left the plots, not the list
    assert sum(activity.series()["tokens_per_s"]) == 0 and activity.jobs()[0]["id"] == "j1"


def test_rejected_failed_and_cancelled_jobs_are_listed_but_not_counted_as_done():
    activity = Activity(clock=Clock())
    for state in (REJECTED, FAILED, CANCELLED):
        job = activity.started(SERVED, state, MODEL)
        activity.ended(job.id, state, detail="why")
    assert [j["state"] for j in activity.jobs()] == [CANCELLED, FAILED, REJECTED]  # newest first
    assert activity.totals["jobs"] == 0 and sum(activity.series()["jobs_per_min"]) == 0
    activity.ended("cancelled", DONE)  # an ended job stays ended
    assert activity.jobs(1)[0]["state"] == CANCELLED


def test_colliding_ids_get_their_own_rows_and_old_rows_are_dropped():
    activity = Activity(clock=Clock(), max_jobs=3)
    first, second = activity.started(SERVED, "same", MODEL, "a"), activity.started(SERVED, "same", MODEL, "b")
    assert first.id != second.id  # two requesters may pick the same id: neither row is overwritten
    activity.progress(second.id, 4)
    assert first.tokens == 0 and second.tokens == 4
    for k in range(3):
        activity.started(SERVED, f"new{k}", MODEL)
    assert [j["id"] for j in activity.jobs(10)] == ["new2", "new1", "new0"]
    activity.progress(first.id, 5)  # a dropped row: reporting on it does nothing, and does not fail
    assert activity.get(first.id).tokens == 0


def test_failovers_and_checks_show_on_the_row_and_a_spot_check_costs():
    activity = Activity(amount_label="spent", clock=Clock())
    job = activity.started(REQUESTED, "c1", MODEL)
    activity.failover(job.id, "12D3KooWdead", "no progress within 10s")
    assert activity.jobs()[0]["detail"] == "12D3KooWdead… failed: no progress within 10s"
    activity.ended(job.id, DONE, detail="stop", tokens=10, cost=5)
    activity.checked(job.id, False, "spot", "token 3: a logit is off by 4.1", cost=2)
    row = activity.jobs()[0]
    assert row["failovers"] == ["12D3KooWdead"] and row["detail"] == "stop" and activity.totals["failovers"] == 1
    assert row["verification"] == {"ok": False, "how": "spot", "reason": "token 3: a logit is off by 4.1"}
    assert row["cost"] == "7" and activity.totals["amount"] == 7 and activity.totals["checks_failed"] == 1


async def test_the_feed_delivers_events_and_drops_a_subscriber_that_falls_behind():
    activity = Activity(clock=Clock())
    with activity.subscribe() as fast, activity.subscribe() as stuck:
        job = activity.started(SERVED, "j", MODEL)
        assert (await fast.receive())[0] == "job"
        for k in range(FEED_BUFFER + 5):
            activity.notify("node", {"k": k})
            if k < FEED_BUFFER:
                await fast.receive()
        activity.ended(job.id, DONE)
        assert len(activity._feeds) == 1  # the stuck one was closed; the node never waited for it
        received = []
        with pytest.raises(trio.EndOfChannel):
            while True:
                received.append(await stuck.receive())
        assert len(received) == FEED_BUFFER


# ----------------------------------------------------------------- the API


class FakeClient:
    """A DepositClient as far as the page reads it."""

    def __init__(self, address: str, balance: int, *, io_limit: int = 4) -> None:
        self.io = ChainIO(io_limit)  # the client's threads for blocking chain calls, as DepositClient.io
        self.account = SimpleNamespace(address=address)
        self.address = "0xE"  # the DepositEscrow
        self.deployment = SimpleNamespace(token="0xT0ken", chain_id=31337)
        self.balance = balance
        reads = {"symbol": "LLM", "decimals": 18}  # the token contract's views
        functions = {name: (lambda v=value: SimpleNamespace(call=lambda: v)) for name, value in reads.items()}
        self.token = SimpleNamespace(functions=SimpleNamespace(**functions))

    def token_balance(self, address: str) -> int:
        assert address == self.account.address
        return self.balance


def fake_host(peer_id: str = SELF, kinds: dict | None = None):
    nat = SimpleNamespace(connection_kind=lambda peer: (kinds or {}).get(peer))
    return SimpleNamespace(peer_id=peer_id, advertised=lambda: ["/ip4/10.0.0.2/tcp/4001"], nat=nat)


@pytest.fixture
def market(tmp_path):
    """Three workers' offers (one relayed, one connected directly) for two models, a reputation, a clock."""
    clock = Clock()
    ids = [Identity.load(tmp_path / f"w{k}") for k in range(3)]
    other = ModelInfo("bafyother", "other model", 4096, "Q8_0")
    offers = [
        signed_offer(ids[0], 3, clock.now + 60, price_per_1k=20, addrs=["/ip4/10.0.0.5/tcp/4001"], slots_free=0),
        signed_offer(ids[1], 1, clock.now + 60, price_per_1k=10, hardware="RTX 4090",
                     addrs=[f"/ip4/10.0.0.9/tcp/4001/p2p/{ids[0].peer_id}/p2p-circuit"]),
        signed_offer(ids[2], 7, clock.now + 60, models=[other], tokens_per_s=55.5),
    ]  # fmt: skip
    reputation = Reputation()
    reputation.success(ids[0].peer_id)
    reputation.latency(ids[0].peer_id, 3.5)
    reputation.ban(ids[2].peer_id, clock.now, 3600)
    host = fake_host(kinds={ids[0].peer_id: "direct"})
    return SimpleNamespace(clock=clock, ids=ids, offers=offers, reputation=reputation, host=host)


async def call(app, path: str, *, method: str = "GET", headers=()) -> tuple[int, dict, bytes]:
    """One request to an ASGI ``app``: (status, headers, body)."""
    target, _, query = path.partition("?")
    scope = {"type": "http", "method": method, "path": target, "query_string": query.encode(),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers]}  # fmt: skip
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


async def get_json(app, path: str, **kwargs) -> dict:
    status, headers, body = await call(app, path, **kwargs)
    assert status == 200, body
    assert headers[b"content-type"] == b"application/json"
    return json.loads(body)


async def test_api_market_groups_offers_by_model_with_what_routing_knows(market):
    dash = Dashboard("gateway", market.host, Activity(clock=market.clock), lambda: market.offers, market.reputation,
                     clock=market.clock)  # fmt: skip
    body = await get_json(DashboardApp(dash), "/api/market")
    assert [m["name"] for m in body["models"]] == ["other model", "test model"]
    other, test = body["models"]
    assert other == {**other, "cid": "bafyother", "quantization": "Q8_0", "context": 4096}
    assert [w["price_per_1k"] for w in test["workers"]] == ["10", "20"]  # cheapest first; amounts are strings
    relayed, direct = test["workers"]
    assert relayed["reachability"] == "relayed" and relayed["hardware"] == "RTX 4090" and relayed["latency_ms"] is None
    assert relayed["reputation"] is None and not relayed["banned"]
    # latency is a ping's round trip from here (test below), not the job time routing smooths into its record
    assert direct["reachability"] == "direct" and direct["latency_ms"] is None and direct["slots_free"] == 0
    assert direct["reputation"] == round(2 / 3, 3) and not direct["self"]
    assert other["workers"][0]["banned"] and other["workers"][0]["tokens_per_s"] == 55.5
    assert {w["age_s"] for m in body["models"] for w in m["workers"]} == {0.0}
    market.clock.now += 12.5  # the same offers, older; a new seq starts its age again
    market.offers[0] = signed_offer(market.ids[0], 4, market.clock.now + 60, price_per_1k=20)
    ages = {
        w["peer_id"]: w["age_s"] for w in (await get_json(DashboardApp(dash), "/api/market"))["models"][1]["workers"]
    }
    assert ages == {market.ids[0].peer_id: 0.0, market.ids[1].peer_id: 12.5}


async def test_api_node_jobs_series_and_payments_of_a_paid_worker(tmp_path, market):
    ledger = WorkerLedger(tmp_path / "worker.db")
    ledger.credit_pair(31337, "0xE", "0xR1", 700, b"sig", 700, floor=0)
    ledger.credit_pair(31337, "0xE", "0xR2", 300, b"sig", 300, floor=0)
    ledger.credit_pair(31337, "0xOther", "0xR3", 999, b"sig", 999, floor=0)  # another escrow: not this worker's
    ledger.update_pair(31337, "0xE", "0xR1", claimed=700, has_slot=True)
    activity = Activity(clock=market.clock, model_names={MODEL: "test model"})
    job = activity.started(SERVED, "j1", MODEL, market.ids[0].peer_id)
    activity.ended(job.id, DONE, tokens=40, prompt_tokens=900, cost=9)
    engine = SimpleNamespace(slots=2, reproducible=True, numerics="8ecb")
    info = WorkerInfo(ModelInfo(MODEL, "test model", 2048, "Q4_1"), engine, SimpleNamespace(free_slots=1), 91.34, 10, 1)
    dash = Dashboard("worker", market.host, activity, lambda: market.offers, clock=market.clock, worker=info,
                     payments=WorkerPayments(FakeClient("0xW", 5_000), ledger))  # fmt: skip
    app = DashboardApp(dash)
    node = await get_json(app, "/api/node")
    assert node["role"] == "worker" and node["peer_id"] == SELF and node["addrs"] == ["/ip4/10.0.0.2/tcp/4001"]
    assert node["worker"] == {"model": {"cid": MODEL, "name": "test model"}, "slots_total": 2, "slots_free": 1,
                              "tokens_per_s": 91.3, "price_per_1k": "10", "verify_price_per_1k": "1",
                              "reproducible": True, "numerics": "8ecb"}  # fmt: skip
    assert node["wallet"] == {"address": "0xW", "token": "0xT0ken", "escrow": "0xE", "token_symbol": "LLM",
                              "token_decimals": 18, "token_balance": "5000", "receipted": "1000",
                              "claimed": "700"}  # fmt: skip
    assert node["totals"] == {"jobs": 1, "tokens": 40, "failovers": 0, "checks": 0, "checks_failed": 0, "earned": "9"}
    jobs = await get_json(app, "/api/jobs?limit=5")
    assert [(j["id"], j["kind"], j["tokens"], j["prompt_tokens"], j["cost"]) for j in jobs["jobs"]] == [
        ("j1", "served", 40, 900, "9")
    ]
    series = await get_json(app, "/api/series")
    assert set(series) == {"bucket_s", "start", "t", "tokens_per_s", "jobs_per_min", "amount_per_min", "amount_label"}
    assert len(series["t"]) == len(series["tokens_per_s"]) == 360 and max(series["amount_per_min"]) == 9 * 6
    payments = await get_json(app, "/api/payments")
    assert payments["role"] == "worker"
    assert sorted((p["counterparty"], p["signed"], p["claimed"], p["pending"], p["slot"], p["status"])
                  for p in payments["pairs"]) == [
        ("0xR1", "700", "700", "0", True, "claimed"), ("0xR2", "300", "0", "300", False, "pending")
    ]  # fmt: skip


async def test_api_node_and_payments_of_a_paying_gateway_and_of_a_free_one(tmp_path, market):
    ledger = WalletLedger(tmp_path / "wallet.db")
    ledger.allocate(31337, "0xE", "0xW1", 1_200, peer_id="12D3KooWw1")
    ledger.allocate(31337, "0xE", "0xW2", 800)
    paid = {"0xW1": 1_000, "0xW2": 800}
    account = DepositAccount(deposit=5_000, reserve_left=900, reserve_total=1_000, slots=4, slots_used=1, unlock_at=0)
    wallet = SimpleNamespace(
        address="0xReq", escrow="0xE", client=FakeClient("0xReq", 42), ledger=ledger, account=lambda: account,
        pending=lambda: [Pending(p.worker, p.peer_id, p.signed, paid[p.worker], p.worker == "0xW1")
                         for p in ledger.pairs(31337, "0xE")],
    )  # fmt: skip
    activity = Activity(amount_label="spent", clock=market.clock)
    dash = Dashboard("gateway", market.host, activity, lambda: [], payments=RequesterPayments(wallet),
                     clock=market.clock)  # fmt: skip
    node = await get_json(DashboardApp(dash), "/api/node")
    assert node["worker"] is None and node["totals"]["spent"] == "0" and "earned" not in node["totals"]
    assert node["wallet"] == {"address": "0xReq", "token": "0xT0ken", "escrow": "0xE", "token_symbol": "LLM",
                              "token_decimals": 18, "token_balance": "42", "signed": "2000", "deposit": "5000",
                              "reserve_left": "900", "reserve_total": "1000", "slots": 4, "slots_used": 1,
                              "unlock_at": 0}  # fmt: skip
    payments = await get_json(DashboardApp(dash), "/api/payments")
    assert payments["role"] == "requester"
    assert sorted((p["counterparty"], p["signed"], p["claimed"], p["pending"], p["slot"], p["status"], p["peer_id"])
                  for p in payments["pairs"]) == [("0xW1", "1200", "1000", "200", True, "pending", "12D3KooWw1"),
                                                  ("0xW2", "800", "800", "0", False, "claimed", "")]  # fmt: skip
    free = Dashboard("gateway", market.host, Activity(), lambda: [])
    assert (await get_json(DashboardApp(free), "/api/node"))["wallet"] is None
    assert await get_json(DashboardApp(free), "/api/payments") == {"role": "requester", "pairs": []}
    assert (await get_json(DashboardApp(free), "/api/market")) == {"now": pytest.approx(free.clock(), abs=5),
                                                                 "models": []}  # fmt: skip


async def test_a_chain_that_does_not_answer_shows_an_unknown_balance(tmp_path, market):
    class DownClient(FakeClient):
        def token_balance(self, address: str) -> int:
            raise ConnectionError("connection refused")

    payments = WorkerPayments(DownClient("0xW", 0), WorkerLedger(tmp_path / "w.db"))
    dash = Dashboard("worker", market.host, Activity(), lambda: [], payments=payments)
    assert (await get_json(DashboardApp(dash), "/api/node"))["wallet"]["token_balance"] is None


async def test_chain_reads_wait_for_the_clients_limiter_and_a_reload_storm_reads_once(tmp_path, market):
    """The page's balance read shares the client's ChainIO with the node's own chain calls (a page cannot take
    threads the settler needs), and eight pages asking at once cause one read, not eight."""
    reads = []

    class SlowClient(FakeClient):
        def token_balance(self, address: str) -> int:
            reads.append(address)
            time.sleep(0.1)  # a slow RPC, in the chain thread
            return self.balance

    client = SlowClient("0xW", 7, io_limit=1)
    ledger = WorkerLedger(tmp_path / "w.db")
    ledger.pairs()  # made once, as a running worker's is: a new SQLite file's first opens can race (WAL switch)
    app = DashboardApp(Dashboard("worker", market.host, Activity(), lambda: [],
                                 payments=WorkerPayments(client, ledger)))  # fmt: skip
    answers = []

    async def page() -> None:
        answers.append((await get_json(app, "/api/node"))["wallet"]["token_balance"])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            async with client.io.limiter:  # the node's own chain call holds the only thread
                for _ in range(8):
                    nursery.start_soon(page)
                await trio.testing.wait_all_tasks_blocked()  # every page is waiting on the lock or the limiter
                assert reads == [] and answers == []
    assert reads == ["0xW"] and answers == ["7"] * 8


async def test_the_api_key_guards_the_data_but_not_the_page(market):
    dash = Dashboard("gateway", market.host, Activity(), lambda: market.offers, api_key="k3y")
    app = DashboardApp(dash)
    status, _, body = await call(app, "/api/market")
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    assert (await call(app, "/api/market", headers=[("Authorization", "Bearer wrong")]))[0] == 401
    assert (await call(app, "/api/market", headers=[("Authorization", "Bearer k3y")]))[0] == 200
    assert (await call(app, "/api/jobs?key=k3y"))[0] == 200  # EventSource cannot send headers
    status, headers, body = await call(app, "/")
    assert status == 200 and headers[b"content-type"].startswith(b"text/html") and b"<html" in body.lower()


async def test_static_files_bad_paths_methods_and_parameters(market):
    app = DashboardApp(Dashboard("worker", market.host, Activity(), lambda: []))
    for name, kind in (("app.js", b"text/javascript"), ("style.css", b"text/css")):
        status, headers, body = await call(app, f"/static/{name}")
        assert status == 200 and headers[b"content-type"].startswith(kind) and body == (WEB_DIR / name).read_bytes()
    for bad in ("/static/../dashboard.py", "/static/%2e%2e/dashboard.py", "/static/nothing.js", "/api/nothing", "/v1"):
        assert (await call(app, bad))[0] == 404, bad
    assert (await call(app, "/api/jobs", method="POST"))[0] == 405
    status, _, body = await call(app, "/api/jobs?limit=lots")
    assert status == 400 and "whole number" in json.loads(body)["error"]["message"]
    assert (await get_json(app, "/api/jobs?limit=100000"))["jobs"] == []  # clamped, not refused


async def test_api_events_streams_jobs_as_they_happen_until_the_browser_leaves(market):
    activity = Activity(clock=market.clock)
    app = DashboardApp(Dashboard("gateway", market.host, activity, lambda: []))
    scope = {"type": "http", "method": "GET", "path": "/api/events", "query_string": b"", "headers": []}
    left = trio.Event()
    chunks: list[bytes] = []
    got = trio.Event()

    async def receive():
        await left.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            assert message["status"] == 200 and (b"content-type", b"text/event-stream") in message["headers"]
        chunks.append(message.get("body", b""))
        if b"event: job" in b"".join(chunks) and b'"state":"done"' in b"".join(chunks):
            got.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(app, scope, receive, send)
            while not activity._feeds:
                await trio.sleep(0.01)  # until the stream subscribed
            job = activity.started(REQUESTED, "c1", MODEL)
            activity.ended(job.id, DONE, tokens=3)
            await got.wait()
            left.set()
    events = [block for block in b"".join(chunks).decode().split("\n\n") if block.startswith("event:")]
    states = [json.loads(block.split("data: ", 1)[1])["state"] for block in events]
    assert states == ["running", "done"] and not activity._feeds  # the browser left: unsubscribed


# ------------------------------------------------- real jobs through the service


async def test_a_worker_service_and_a_requester_report_a_real_job(tmp_path):
    """A served job, over libp2p on 127.0.0.1, shows on the worker's activity with the requester as its peer,
    and a requester that reports through run_job's observer sees the same tokens."""
    served, asked = Activity(), Activity(amount_label="spent")
    with trio.fail_after(20):
        async with (
            worker(tmp_path, "w", ScriptedEngine(prompt_tokens=321), activity=served) as (_, offer, _),
            requester(tmp_path) as host,
        ):
            row = asked.started(REQUESTED, "call-1", MODEL)

            class Reporting(JobObserver):
                def on_attempt(self, peer_id):
                    row.peer = peer_id

                def on_tokens(self, prompt_tokens, tokens):
                    asked.progress(row.id, tokens, prompt_tokens=prompt_tokens)

            result = await run_job(host, lambda: [offer], QUERY, SPEC, reputation=Reputation(), observer=Reporting())
            asked.ended(row.id, DONE, tokens=result.completion_tokens)
            while served.jobs()[0]["state"] != DONE:
                await trio.sleep(0.01)  # the worker ends the job after the requester has its answer
    [job] = served.jobs()
    assert job["kind"] == SERVED and job["peer"] == host.peer_id and job["tokens"] == len(WORDS)
    assert job["prompt_tokens"] == 321 and job["tokens_per_s"] is not None
    [mine] = asked.jobs()
    assert mine["peer"] == offer.peer_id and mine["tokens"] == len(WORDS) and mine["prompt_tokens"] == 321
    assert served.totals["tokens"] == asked.totals["tokens"] == len(WORDS)


async def test_the_market_view_pings_workers_it_has_not_used_for_latency_from_here(tmp_path):
    with trio.fail_after(20):
        async with worker(tmp_path, "w", ScriptedEngine()) as (_, offer, _), requester(tmp_path) as host:
            dash = Dashboard("gateway", host, Activity(), lambda: [offer])
            assert dash.market()["models"][0]["workers"][0]["latency_ms"] is None
            async with trio.open_nursery() as nursery:
                await nursery.start(dash.run)
                while dash.market()["models"][0]["workers"][0]["latency_ms"] is None:
                    await trio.sleep(0.05)
                nursery.cancel_scope.cancel()
    latency = dash.market()["models"][0]["workers"][0]["latency_ms"]
    assert 0 < latency < 5_000 and dash.market()["models"][0]["workers"][0]["reachability"] == "direct"


async def test_a_model_fetched_by_cid_is_shown_by_the_name_the_market_gives_it(market):
    activity = Activity()
    activity.started(SERVED, "j", MODEL)  # this worker knows the model by its CID only
    engine = SimpleNamespace(slots=1, reproducible=True, numerics="")
    info = WorkerInfo(ModelInfo(MODEL, MODEL, 2048), engine, SimpleNamespace(free_slots=1), 50.0, 0, 0)
    app = DashboardApp(Dashboard("worker", market.host, activity, lambda: market.offers, worker=info))
    assert (await get_json(app, "/api/node"))["worker"]["model"] == {"cid": MODEL, "name": "test model"}
    assert (await get_json(app, "/api/jobs"))["jobs"][0]["model_name"] == "test model"
