"""The market across separate hosts: real llmarket processes in network namespaces, behind real NATs.

Every node here is its own process in its own lab host (tests/netlab.py): public hosts on one bridge (the
internet), home hosts behind nftables NAT routers. Workers are the real ``llmarket serve`` with SmolLM2
where the model matters, and ``tests/scripted_worker.py`` (the same host, gossip and job service with a
scripted engine) where only the network does: a job that must take minutes, or must be quick. Requesters
are the real ``llmarket request``, ``peers`` and ``gateway``. mDNS is off (``--no-mdns``) except in the LAN
test, so that nodes meet only through the bootstrap peers each test names.

Nothing waits a fixed time: every wait polls a process's output, a node's ``net-status.json`` or the
market (``peers --json``) until a deadline, and every failure message carries the output of every process
of the lab (``netlab.outputs``).
"""

from __future__ import annotations

import functools
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from node.net.identity import Identity, load_or_create_account
from node.payments.policy import job_cost

from .netlab import (
    PYTHON,
    Lab,
    MarketNode,
    NetHost,
    Proc,
    WaitFailed,
    json_output,
    llmarket_argv,
    outputs,
    run_to_end,
    start_chain,
    start_scripted_worker,
    start_serve,
)
from .scripted_worker import scripted_model_cid, scripted_text

pytestmark = pytest.mark.netns

# A real-model worker, as every test here starts it; one slot, so that a worker with a job is busy (failover tests).
SERVE = ("--ctx-size", "1024", "--no-mdns", "--slots", "1")
PORT_4001 = ("--listen", "/ip4/0.0.0.0/tcp/4001")
GREEDY = ("--temperature", "0")
SCRIPTED = scripted_model_cid()  # what scripted workers offer (the relays offer another made-up model)
RELAY = ("--model", "relay", *PORT_4001, "--no-mdns")  # a public scripted node that relays (its default)

# A realistic prompt: QUESTION is about 310 tokens for SmolLM2 (chat template included).
PARAGRAPH = (
    "The harbour town of Merrow holds its market every Saturday on the long quay between the fish sheds and "
    "the customs house. Farmers from the valley bring cheese, apples, honey and wool; the boats bring cod, "
    "mackerel and crabs; and travelling traders set up stalls of cloth, pots, knives and old books. The market "
    "opens at six, when the first carts roll over the cobbles, and closes at two, when the tide turns and the "
    "harbour master rings the bell. Prices are written in chalk on slates, and haggling is expected, though "
    "the cheese sellers are famous for never lowering a price. In winter the stalls crowd under the arcade of "
    "the customs house, and the traders light braziers to warm their hands. In summer the market spills along "
    "the sea wall, and musicians play for coins near the lighthouse. The town council keeps a ledger of every "
    "stall, the rent it paid and the goods it sold, and once a year it publishes the totals in the parish "
    "newsletter. Last year the busiest stall sold more than four thousand jars of honey, and the quietest sold "
    "a single painting of the harbour at dawn, which now hangs in the council chamber. Many families have "
    "kept the same stall for generations, and children learn to weigh apples and count change before they "
    "can read."
)
QUESTION = PARAGRAPH + "\n\nIn two sentences: when does the market open and close, and why does it close then?"
STORY = PARAGRAPH + "\n\nNow write a long story about one Saturday at this market, from dawn until the bell."


def explain(lab: Lab, what: str) -> str:
    return f"{what}\n{outputs(lab)}"


def explained(test):
    """Decorates a test: a wait that gave up (with one process's output) fails with every process's output."""

    @functools.wraps(test)
    def run(lab: Lab, **kwargs):
        try:
            return test(lab, **kwargs)
        except WaitFailed as err:
            raise AssertionError(explain(lab, str(err).splitlines()[0])) from None
        except subprocess.TimeoutExpired as err:
            raise AssertionError(explain(lab, f"a process outlived its deadline: {err}")) from None

    return run


def wait_until(lab: Lab, predicate, timeout: float, what: str):
    """Poll ``predicate`` until it returns something true; fail with every process's output."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, explain(lab, f"no {what} within {timeout}s")
        time.sleep(0.05)  # polling interval
    return value


def llmarket(host: NetHost, data_dir: Path, *args: str, timeout: float = 120, label: str) -> Proc:
    """A one-shot ``llmarket`` command in ``host``, run to its end; its output joins the lab's."""
    return run_to_end(host, llmarket_argv(data_dir, *args), timeout=timeout, label=label)


def request_json(lab: Lab, host: NetHost, data_dir: Path, *args: str, timeout: float = 120) -> dict:
    """``request --json --no-mdns ARGS…`` in ``host``: its JSON answer."""
    proc = llmarket(host, data_dir, "request", "--json", "--no-mdns", *args, timeout=timeout, label="request")
    assert proc.returncode == 0, explain(lab, "request failed")
    return json_output(proc)


def wait_for_offer(
    lab: Lab, host: NetHost, data_dir: Path, bootstrap: str, peer_id: str, predicate=lambda offer: True, timeout=60
) -> dict:
    """``peers --json`` from ``host`` (joined through ``bootstrap``) until it lists ``peer_id``'s offer, as asked."""
    deadline = time.monotonic() + timeout
    while True:
        proc = llmarket(host, data_dir, "peers", "--bootstrap", bootstrap, "--json", "--wait", "1", "--no-mdns",
                        timeout=60, label="peers")  # fmt: skip
        rows = json.loads(proc.stdout()) if proc.returncode == 0 else []
        offer = next((row for row in rows if row["peer_id"] == peer_id), None)
        if offer is not None and predicate(offer):
            return offer
        assert time.monotonic() < deadline, explain(lab, f"no offer of {peer_id} as wanted within {timeout}s: {offer}")


def circuit_offer(lab: Lab, relay: MarketNode, worker: MarketNode) -> dict:
    """The worker's offer in the (scripted) relay's book, once it carries the worker's circuit address.

    A worker advertises every 10 s, so its offer names the relay up to 10 s after the reservation;
    requesters that join through the relay from then on get it.
    """
    circuit = f"{relay.multiaddr}/p2p-circuit"
    return relay.wait_for_offer(worker.peer_id, lambda offer: circuit in offer["addrs"], timeout=60)


def accepted(node: MarketNode) -> list[str]:
    """How each job the node accepted was connected: "direct" or "relayed", in order."""
    return [m.group(1) for line in node.job_lines() if (m := re.search(r": accepted \((\w+) connection\)", line))]


def assert_no_wildcards(lab: Lab, offer: dict) -> None:
    assert offer["addrs"], explain(lab, f"an offer with no address: {offer}")
    bad = [a for a in offer["addrs"] if "/ip4/0.0.0.0/" in a or "/ip6/::/" in a or "/127.0.0.1/" in a]
    assert not bad, explain(lab, f"the offer carries addresses nobody else can dial: {bad}")


# ---------------------------------------------------------------- (a) three public hosts


@pytest.mark.slow
@explained
def test_public_hosts_route_through_the_bootstrap_and_fail_over_when_it_dies(lab: Lab, tmp_path):
    """A and B serve SmolLM2 on port 4001 (B joined through A); C joins through A only.

    C is served by B when it asks for B; B's offer reaches C with B's real address. Then, with B busy
    (another requester's long job), a request goes to A; once A streams text, B is freed and A is killed
    mid-answer: the requester, which knew the market only through A, carries on with B.
    """
    host_a, host_b, host_c = lab.public_host("a"), lab.public_host("b"), lab.public_host("c")
    a = start_serve(host_a, tmp_path / "a", *PORT_4001, *SERVE)
    b = start_serve(host_b, tmp_path / "b", *PORT_4001, *SERVE, "--bootstrap", a.multiaddr)
    assert a.multiaddr == f"/ip4/{host_a.address}/tcp/4001/p2p/{a.peer_id}", explain(lab, "A's address")

    offer = wait_for_offer(lab, host_c, tmp_path / "c-peers", a.multiaddr, b.peer_id)
    assert_no_wildcards(lab, offer)
    assert f"/ip4/{host_b.address}/tcp/4001" in offer["addrs"], explain(lab, f"B's real address: {offer}")
    assert offer["latency_ms"] is not None, explain(lab, f"C could not ping B at its offer's addresses: {offer}")

    served = request_json(lab, host_c, tmp_path / "c0", "--bootstrap", a.multiaddr, "--peer", b.peer_id,
                          "--max-tokens", "32", *GREEDY, QUESTION)  # fmt: skip
    assert served["workers"] == [b.peer_id] and served["text"].strip(), explain(lab, f"served by B: {served}")
    assert served["connection"] == "direct" and served["usage"]["prompt_tokens"] > 250, explain(lab, str(served))

    # B busy with someone else's long job…
    keeps_b_busy = host_c.spawn(
        llmarket_argv(tmp_path / "c1", "request", "--bootstrap", a.multiaddr, "--peer", b.peer_id, "--no-mdns",
                      "--max-tokens", "900", *GREEDY, "Write a very long story about a dragon who keeps a market."),
        label="busy-request",
    )  # fmt: skip
    wait_until(lab, lambda: len(accepted(b)) == 2, 60, "B accepting the long job")
    # …so this request goes to A (text mode: its answer streams to stdout as it comes)
    streaming = host_c.spawn(
        llmarket_argv(tmp_path / "c2", "request", "--bootstrap", a.multiaddr, "--no-mdns", "--max-tokens", "160",
                      *GREEDY, STORY),
        label="failover-request",
    )  # fmt: skip
    a.proc.wait_for_line(r"job \w+ from \S+: accepted \(direct connection\)", 60)
    keeps_b_busy.kill()  # its requester goes away: B cancels that job and frees its slot
    b.proc.wait_for_line(r"job \w+: cancelled", 30)
    wait_until(lab, lambda: streaming.stdout().strip(), 60, "text from A")
    assert streaming.alive(), explain(lab, "A's job ended before A could be killed mid-answer")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)

    assert streaming.wait(120) == 0, explain(lab, "the request did not survive A's death")
    err = streaming.stderr()
    assert re.search(rf"worker {a.peer_id[:16]}… failed .*continuing on another worker", err), explain(lab, "")
    usage = re.search(r"\[(\d+) prompt \+ (\d+) completion tokens from (.+), finish: (\w+)\]", err)
    assert usage, explain(lab, "no usage line")
    assert usage.group(3) == f"{a.peer_id[:16]}…, {b.peer_id[:16]}…", explain(lab, "both workers, A first")
    assert len(streaming.stdout().strip()) > 100, explain(lab, "the answer")
    assert accepted(b)[-1] == "direct", explain(lab, "B took over on a direct connection")


# ---------------------------------------------------------------- (b) a worker behind NAT, through a relay


@pytest.mark.slow
@explained
def test_a_worker_behind_nat_serves_through_a_public_relay(lab: Lab, tmp_path):
    relay_host, client_host = lab.public_host("relay"), lab.public_host("client")
    home = lab.nat_router("home", kind="eim").home_host("pc")
    relay = start_scripted_worker(relay_host, tmp_path / "relay", *RELAY)
    worker = start_serve(home, tmp_path / "worker", *SERVE, "--bootstrap", relay.multiaddr)

    circuit = worker.wait_relayed()
    assert circuit == f"{relay.multiaddr}/p2p-circuit/p2p/{worker.peer_id}", explain(lab, circuit)
    relay.wait_public()
    circuit_offer(lab, relay, worker)
    offer = wait_for_offer(lab, client_host, tmp_path / "peers", relay.multiaddr, worker.peer_id)  # as C sees it
    assert f"{relay.multiaddr}/p2p-circuit" in offer["addrs"], explain(lab, str(offer))
    assert_no_wildcards(lab, offer)

    result = request_json(lab, client_host, tmp_path / "client", "--bootstrap", relay.multiaddr,
                          "--peer", worker.peer_id, "--max-tokens", "40", *GREEDY, QUESTION)  # fmt: skip
    assert result["workers"] == [worker.peer_id] and result["text"].strip(), explain(lab, str(result))
    assert result["usage"]["prompt_tokens"] > 250 and result["finish_reason"] in ("stop", "length"), str(result)
    assert result["connection"] in ("direct", "relayed"), explain(lab, str(result))  # DCUtR may have upgraded
    assert len(accepted(worker)) == 1, explain(lab, "the worker's log of the job")


# ---------------------------------------------------------------- (c) the relayed connection goes direct

CHAT = r"""
import json, sys, urllib.error, urllib.request
url, model, prompt = sys.argv[1:4]
body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 50}
request = urllib.request.Request(url + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
try:
    print(urllib.request.urlopen(request, timeout=60).read().decode())
except urllib.error.HTTPError as err:
    sys.exit(f"HTTP {err.code}: {err.read().decode()}")
"""


def chat(lab: Lab, host: NetHost, api: str, prompt: str) -> dict:
    """One chat completion through the gateway at ``api``, by an HTTP client in ``host``."""
    result = host.run([PYTHON, "-c", CHAT, api, SCRIPTED, prompt], timeout=90)
    assert result.returncode == 0, explain(lab, f"the chat call failed: {result.stdout}{result.stderr}")
    return json.loads(result.stdout)


@explained
def test_behind_an_eim_nat_the_relayed_connection_goes_direct(lab: Lab, tmp_path):
    """A requester that stays (the gateway) reaches a worker behind NAT through the relay; DCUtR makes the
    connection direct, and the next job runs on it."""
    relay_host, client_host = lab.public_host("relay"), lab.public_host("client")
    home = lab.nat_router("home", kind="eim").home_host("pc")
    relay = start_scripted_worker(relay_host, tmp_path / "relay", *RELAY)
    worker = start_scripted_worker(home, tmp_path / "worker", "--bootstrap", relay.multiaddr, "--no-mdns")
    worker.wait_relayed()
    circuit_offer(lab, relay, worker)

    gateway_dir = tmp_path / "gateway"
    gateway_id = Identity.load(gateway_dir).peer_id
    gateway = client_host.spawn(
        llmarket_argv(gateway_dir, "gateway", "--listen", "127.0.0.1:8000", "--bootstrap", relay.multiaddr,
                      "--no-mdns"),
        label="gateway",
    )  # fmt: skip
    api = gateway.wait_for_line(r"^OpenAI-compatible API at (\S+)$", 60, stream="stdout").group(1)

    first = chat(lab, client_host, api, PARAGRAPH)
    assert first["choices"][0]["message"]["content"] == scripted_text(20, 16), explain(lab, str(first))
    worker.wait_net_status(
        lambda status: any(p == {"peer_id": gateway_id, "connection": "direct"} for p in status["peers"]),
        30,
        "direct connection to the gateway",
    )
    second = chat(lab, client_host, api, QUESTION)
    assert second["choices"][0]["message"]["content"] == scripted_text(20, 16), explain(lab, str(second))
    assert len(accepted(worker)) == 2 and accepted(worker)[-1] == "direct", explain(lab, "the second job ran direct")


# ---------------------------------------------------------------- (d) both behind NATs


@explained
def test_a_requester_behind_one_nat_is_served_by_a_worker_behind_another(lab: Lab, tmp_path):
    relay_host = lab.public_host("relay")
    worker_home = lab.nat_router("home1", kind="eim").home_host("pc")
    client_home = lab.nat_router("home2", kind="eim").home_host("laptop")
    relay = start_scripted_worker(relay_host, tmp_path / "relay", *RELAY)
    worker = start_scripted_worker(worker_home, tmp_path / "worker", "--bootstrap", relay.multiaddr, "--no-mdns")
    worker.wait_relayed()
    circuit_offer(lab, relay, worker)

    result = request_json(lab, client_home, tmp_path / "client", "--bootstrap", relay.multiaddr,
                          "--peer", worker.peer_id, "--model", SCRIPTED, "--max-tokens", "50", QUESTION)  # fmt: skip
    assert result["workers"] == [worker.peer_id], explain(lab, str(result))
    assert result["text"] == scripted_text(20, 16), explain(lab, str(result))
    assert result["connection"] in ("direct", "relayed"), explain(lab, str(result))
    assert len(accepted(worker)) == 1, explain(lab, "the worker's log of the job")


# ---------------------------------------------------------------- (e) one LAN, no bootstrap


@pytest.mark.slow
@explained
def test_on_one_lan_request_finds_serve_by_mdns(lab: Lab, tmp_path):
    server_host, client_host = lab.public_host("server"), lab.public_host("client")
    server = start_serve(server_host, tmp_path / "server", "--ctx-size", "1024")  # default flags: mDNS on
    proc = llmarket(client_host, tmp_path / "client", "request", "--json", "--max-tokens", "24", *GREEDY,
                    QUESTION, label="request")  # fmt: skip
    result = json_output(proc)
    assert result["workers"] == [server.peer_id] and result["text"].strip(), explain(lab, str(result))
    assert result["connection"] == "direct", explain(lab, str(result))


# ---------------------------------------------------------------- (f) paid, to a worker behind NAT

PRICE = 10**15  # token base units per 1,000 tokens
TOKEN = 10**18


@pytest.mark.slow
@explained
def test_a_paid_job_to_a_worker_behind_nat_is_paid_on_chain(lab: Lab, tmp_path):
    chain_host = lab.public_host("chain")
    relay_host, client_host = lab.public_host("relay"), lab.public_host("client")
    home = lab.nat_router("home", kind="eim").home_host("pc")
    worker_dir, client_dir = tmp_path / "worker", tmp_path / "client"
    worker_account = load_or_create_account(worker_dir, insecure_dev_key=True, chain_id=31337)
    client_account = load_or_create_account(client_dir, insecure_dev_key=True, chain_id=31337)
    chain = start_chain(
        chain_host,
        tmp_path / "chain",
        fund=[(worker_account.address, 0, 100 * TOKEN), (client_account.address, 1000 * TOKEN, 100 * TOKEN)],
    )
    pay = ("--rpc-url", chain.rpc_url, "--deployments", str(chain.deployments), "--insecure-dev-key")
    relay = start_scripted_worker(relay_host, tmp_path / "relay", *RELAY)
    worker = start_serve(home, worker_dir, *SERVE, "--bootstrap", relay.multiaddr, "--price", str(PRICE), *pay)
    worker.wait_relayed()
    offer = circuit_offer(lab, relay, worker)
    assert offer["price_per_1k"] == PRICE, explain(lab, str(offer))

    deposit = llmarket(client_host, client_dir, "wallet", "deposit", str(10 * TOKEN), *pay, label="deposit")
    assert deposit.returncode == 0, explain(lab, "the requester's deposit failed")  # its one transaction
    result = request_json(lab, client_host, client_dir, "--bootstrap", relay.multiaddr, "--peer", worker.peer_id,
                          "--max-price", str(PRICE), *pay, "--max-tokens", "32", *GREEDY, QUESTION)  # fmt: skip
    usage = result["usage"]
    owed = job_cost(usage["prompt_tokens"], usage["completion_tokens"], PRICE)
    assert result["workers"] == [worker.peer_id] and result["cost"] == owed > 0, explain(lab, str(result))
    balances = chain.balances(
        worker_account.address, client_account.address, at_least={worker_account.address: owed}, timeout=60
    )
    assert balances[worker_account.address] == owed, explain(lab, f"the worker's claim: {balances}, owed {owed}")
    assert balances[client_account.address] == 990 * TOKEN, explain(lab, f"paid from the deposit: {balances}")
    worker.proc.wait_for_line(r"job \w+: done, .*paid", 10)


# ---------------------------------------------------------------- (g) a long job through a relay

LONG_WORDS, LONG_WORD_BYTES, LONG_TICK = 1300, 110, 0.1  # 143,000 bytes over 130 s: ~1.1 KiB/s


@pytest.mark.slow  # two minutes and more, by design
@explained
def test_a_job_longer_than_two_minutes_and_128_kib_goes_through_a_relay(lab: Lab, tmp_path):
    """The circuit relay spec's "limited relay" defaults (2 min, 128 KiB) would cut this job; our relays set no
    limit. Symmetric NATs on both sides defeat hole punching, so the whole job runs relayed."""
    relay_host = lab.public_host("relay")
    worker_home = lab.nat_router("home1", kind="symmetric").home_host("pc")
    client_home = lab.nat_router("home2", kind="symmetric").home_host("laptop")
    relay = start_scripted_worker(relay_host, tmp_path / "relay", *RELAY)
    worker = start_scripted_worker(worker_home, tmp_path / "worker", "--bootstrap", relay.multiaddr, "--no-mdns",
                                   "--words", str(LONG_WORDS), "--word-bytes", str(LONG_WORD_BYTES),
                                   "--tick", str(LONG_TICK))  # fmt: skip
    worker.wait_relayed()
    circuit_offer(lab, relay, worker)

    request = client_home.spawn(
        llmarket_argv(tmp_path / "client", "request", "--json", "--no-mdns", "--bootstrap", relay.multiaddr,
                      "--peer", worker.peer_id, "--model", SCRIPTED, "--max-tokens", str(LONG_WORDS),
                      "--timeout", "400", QUESTION),
        label="request",
    )  # fmt: skip
    # the relay itself counts what its live circuits carried (net-status.json, every 5 s): past 128 KiB on one
    status = relay.wait_net_status(lambda s: s["nat"]["served"]["circuit_bytes"] > 128 * 1024, 400, "128 KiB")
    assert status["nat"]["served"]["circuits"] == 1, explain(lab, str(status))
    request.wait(200)
    result = json_output(request)
    text = result.pop("text")
    assert text == scripted_text(LONG_WORDS, LONG_WORD_BYTES), explain(lab, f"{len(text)} characters: {result}")
    assert len(text.encode()) > 128 * 1024 and result["elapsed_s"] > 120, explain(lab, str(result))
    assert result["connection"] == "relayed", explain(lab, str(result))
    assert accepted(worker) == ["relayed"], explain(lab, "the worker's log of the job")
    worker.proc.wait_for_line(rf"job \w+: done, {LONG_WORDS} tokens", 10)
