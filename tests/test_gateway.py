"""The OpenAI gateway, through the official `openai` client, on a 2-worker paid testnet with the real model."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from node.models.default import DEFAULT_MODEL_CID, DEFAULT_MODEL_CID_V0
from node.net.identity import load_or_create_account
from node.payments.deposits import DepositClient
from node.payments.policy import job_cost

from .factories import paid_market, start_gateway

pytestmark = pytest.mark.slow

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    with paid_market(tmp_path_factory.mktemp("gateway"), "--api-key", KEY) as (net, base_url):
        yield net, base_url


class JobCancelledSince:
    """Whether a worker of ``net`` has logged a cancelled job since this object was made."""

    def __init__(self, net) -> None:
        self.logs = [Path(net.dir) / "logs" / f"{w['name']}.err" for w in net.workers]
        self.seen = {log: len(log.read_text()) for log in self.logs}

    def __call__(self) -> bool:
        return any(": cancelled" in log.read_text()[self.seen[log] :] for log in self.logs)

    def within(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self() and time.monotonic() < deadline:
            time.sleep(0.1)  # polling interval
        return self()


def client(base_url, key=KEY):
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def test_chat_streaming_and_not_completions_and_models(market):
    net, base_url = market
    c = client(base_url)
    models = c.models.list().data
    assert [m.id for m in models] == [DEFAULT_MODEL_CID]
    messages = [{"role": "user", "content": "Name three colors."}]
    full = c.chat.completions.create(model="default", messages=messages, temperature=0, max_tokens=30)
    assert full.choices[0].message.content and full.usage.completion_tokens > 0
    stream = c.chat.completions.create(
        model="SmolLM2-135M-Instruct.Q4_1", messages=messages, temperature=0, max_tokens=30,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content  # greedy: the same text either way
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens
    text = c.completions.create(model=DEFAULT_MODEL_CID, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert text.choices[0].text and text.usage.prompt_tokens > 0


def test_a_seeded_greedy_call_equals_llmarket_request(market):
    net, base_url = market
    via_gateway = client(base_url).chat.completions.create(
        model="default", messages=[{"role": "user", "content": "What is 2 + 2?"}], temperature=0, max_tokens=24, seed=7,
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", net.requester["data_dir"], "request", "--spot-check", "0",
         "--bootstrap", net.workers[0]["multiaddr"], "--max-price", str(max(w["price"] for w in net.workers)),
         "--rpc-url", net.rpc_url, "--deployments", net.deployments, "--insecure-dev-key",
         "--temperature", "0", "--top-p", "1", "--max-tokens", "24", "--seed", "7", "--json", "What is 2 + 2?"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["text"] == via_gateway.choices[0].message.content


def test_request_verify_and_a_paid_spot_check_pass_an_honest_sampled_answer(market):
    """`request --verify --spot-check 1` on the paid testnet: checked here, and by the other worker, paid at its
    verify price from the same deposit."""
    net, _ = market
    result = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", net.requester["data_dir"], "request", "--spot-check", "0",
         "--bootstrap", net.workers[0]["multiaddr"], "--max-price", str(max(w["price"] for w in net.workers)),
         "--rpc-url", net.rpc_url, "--deployments", net.deployments, "--insecure-dev-key",
         "--temperature", "0.8", "--max-tokens", "48", "--verify", "--spot-check", "1", "--json",
         "Describe a lighthouse at night."],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["cost"] > 0 and out["usage"]["completion_tokens"] > 0
    local, spot = out["verification"]["local"], out["verification"]["spot_check"]
    assert local["ok"] and local["tokens"] >= out["usage"]["completion_tokens"] and local["reason"] == ""
    assert spot["ok"] and spot["tokens"] == local["tokens"] and spot["verifier"] != out["workers"][-1]
    verifier = next(w for w in net.workers if w["peer_id"] == spot["verifier"])
    assert spot["cost"] == job_cost(out["usage"]["prompt_tokens"] + spot["tokens"], 0, verifier["price"] // 10)
    assert not out["verification"]["reported"]


def test_errors_come_back_as_openai_errors(market, tmp_path):
    net, base_url = market
    c = client(base_url)
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        client(base_url, key="wrong").models.list()
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="default", messages=messages, n=2)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="gpt-4", messages=messages)
    with pytest.raises(openai.InternalServerError) as unavailable:  # a real CID nobody serves
        c.chat.completions.create(model=DEFAULT_MODEL_CID_V0, messages=messages)
    assert unavailable.value.status_code == 503
    with pytest.raises(openai.InternalServerError) as unavailable:  # streaming: the status, not 200 then an event
        list(c.chat.completions.create(model=DEFAULT_MODEL_CID_V0, messages=messages, stream=True))
    assert unavailable.value.status_code == 503
    # a paying wallet with no deposit: the gateway does not start, and says in one line which command funds it
    load_or_create_account(tmp_path / "broke", insecure_dev_key=True, chain_id=net.chain_id)
    broke = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", str(tmp_path / "broke"), "gateway", "--listen", "127.0.0.1:0",
         "--bootstrap", net.workers[0]["multiaddr"], "--max-price", str(max(w["price"] for w in net.workers)),
         "--rpc-url", net.rpc_url, "--deployments", net.deployments, "--insecure-dev-key", "--no-mdns"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert broke.returncode == 1 and broke.stderr.count("\n") == 1, broke.stderr
    assert "has no deposit" in broke.stderr and "llmarket wallet deposit AMOUNT" in broke.stderr
    # a deadline too short for the answer: 504
    hurried, hurried_url = start_gateway(net, Path(net.requester["data_dir"]), "--timeout", "0.3")
    try:
        with pytest.raises(openai.APIStatusError) as late:
            client(hurried_url).chat.completions.create(
                model="default", messages=[{"role": "user", "content": "Write a long story."}], max_tokens=300
            )
        assert late.value.status_code == 504
    finally:
        hurried.terminate()
        hurried.wait()


def test_eight_concurrent_streams_across_two_paid_workers_reconcile(market, tmp_path):
    net, base_url = market
    requester_dir = tmp_path / "concurrent"
    account = load_or_create_account(requester_dir, insecure_dev_key=True, chain_id=net.chain_id)
    chain = DepositClient.connect(net.rpc_url, deployments_dir=net.deployments)
    owner_key = json.loads((Path(net.dir) / "anvil" / "anvil-accounts.json").read_text())["private_keys"][0]
    from eth_account import Account

    owner = DepositClient(chain.w3, chain.deployment, Account.from_key(owner_key))
    owner.send(owner.token.functions.transfer(account.address, 100 * 10**18), "fund")
    chain.w3.provider.make_request("anvil_setBalance", [account.address, hex(10**20)])
    DepositClient(chain.w3, chain.deployment, account).deposit(10 * 10**18)  # one deposit pays every stream
    gateway, url = start_gateway(net, requester_dir)
    workers_before = sum(chain.token_balance(w["address"]) for w in net.workers)
    try:

        def one(i):
            stream = client(url).chat.completions.create(
                model="default", messages=[{"role": "user", "content": f"Tell me fact number {i} about the sea."}],
                max_tokens=24, stream=True, temperature=0,
            )  # fmt: skip
            return "".join(choice.delta.content or "" for chunk in stream for choice in chunk.choices)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, range(8)))
        assert all(answers) and len(answers) == 8
        metrics = httpx.get(url.removesuffix("/v1") + "/metrics").text
        spend = int(
            next(line.split()[-1] for line in metrics.splitlines() if line.startswith("llmarket_gateway_spend"))
        )
    finally:
        gateway.terminate()
        gateway.wait()
    deadline = time.monotonic() + 120
    while chain.account_of(account.address).deposit > 10 * 10**18 - spend:  # the workers claim once idle
        assert time.monotonic() < deadline, chain.account_of(account.address)
        time.sleep(0.2)  # polling interval: claims are chain transactions
    earned = sum(chain.pair_of(account.address, w["address"]).paid for w in net.workers)  # this requester's pay
    assert spend > 0 and earned == spend == 10 * 10**18 - chain.account_of(account.address).deposit
    assert sum(chain.token_balance(w["address"]) for w in net.workers) - workers_before >= earned
    assert chain.w3.eth.get_transaction_count(account.address) == 2  # approve + deposit: none per worker or stream


def test_a_client_that_disconnects_frees_the_worker_slot(market):
    net, base_url = market
    cancelled = JobCancelledSince(net)
    with httpx.stream(
        "POST", f"{base_url}/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
        json={"model": "default", "messages": [{"role": "user", "content": "Write a very long story."}],
              "max_tokens": 1000, "stream": True},
    ) as response:  # fmt: skip
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the answer has started; hang up
    assert cancelled.within(30)


def test_a_non_streaming_client_that_times_out_frees_the_worker_slot(market):
    net, base_url = market
    impatient = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=1.5)
    # a sampled story can end within the client's 1.5 s (it did once in `scripts/test --all`); another one won't
    for seed in range(5):
        cancelled = JobCancelledSince(net)
        try:
            impatient.chat.completions.create(
                model="default", messages=[{"role": "user", "content": "Write a very long story."}], max_tokens=1000,
                seed=seed,
            )  # fmt: skip
        except openai.APITimeoutError:
            break
    else:
        pytest.fail("5 stories all ended within the client's 1.5 s timeout")
    assert cancelled.within(30)


def test_too_long_for_the_context_is_400_and_bans_nobody(market):
    net, base_url = market
    c = client(base_url)
    messages = [{"role": "user", "content": "hi"}]
    long_prompt = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 2000}]  # over 2,048 tokens
    for stream in (False, True):
        for changes in ({"messages": messages, "max_tokens": 100_000}, {"messages": long_prompt, "max_tokens": 8}):
            with pytest.raises(openai.BadRequestError):
                reply = c.chat.completions.create(model="default", stream=stream, **changes)
                list(reply) if stream else None
    full = c.chat.completions.create(model="default", messages=messages, max_tokens=4, temperature=0)
    assert full.choices[0].message.content and full.model == "SmolLM2-135M-Instruct.Q4_1"  # the model served


def test_logprobs_come_from_the_worker(market):
    net, base_url = market
    c = client(base_url)
    messages = [{"role": "user", "content": "Name a color."}]
    full = c.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0,
                                     logprobs=True, top_logprobs=3)  # fmt: skip
    content = full.choices[0].logprobs.content
    assert "".join(t.token for t in content) == full.choices[0].message.content
    assert content and all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)
    chunks = c.chat.completions.create(model="default", messages=messages, max_tokens=8, temperature=0,
                                       logprobs=True, stream=True)  # fmt: skip
    streamed = [t.token for chunk in chunks for ch in chunk.choices if ch.logprobs for t in ch.logprobs.content]
    assert streamed == [t.token for t in content]
