"""Paid jobs with prompts as users send them (≈1,500 tokens), on a real testnet with the real model.

A paid job used to deadlock for any prompt over about 64 tokens: the worker's
credit window was the price of 64 tokens, it would not send text until
receipts covered the prompt, and the requester signed only after text arrived.
Here a 1,500-token prompt goes through `llmarket request` and through the
gateway, and the chain shows the worker earned exactly usage × price.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from node.dev import testnet
from node.payments.deposits import DepositClient
from node.payments.policy import job_cost

from .factories import start_gateway

pytestmark = [pytest.mark.slow, pytest.mark.long]

TOPICS = ["rivers", "mountains", "markets", "harbours", "libraries", "forests", "bridges", "orchards"]


def long_document(words: int = 1100) -> str:
    """A plain-English document of about ``words`` words (≈1.35 tokens each for SmolLM2's tokenizer)."""
    sentences, i = [], 0
    while sum(len(s.split()) for s in sentences) < words:
        topic, other = TOPICS[i % len(TOPICS)], TOPICS[(i * 3 + 1) % len(TOPICS)]
        sentences.append(
            f"Note {i}: the town keeps records about its {topic}, and every record mentions the {other} "
            f"that were counted in year {1900 + i}, together with the name of the clerk who wrote it."
        )
        i += 1
    return " ".join(sentences)


SYSTEM = "You answer questions about the document below in one short sentence.\n\n" + long_document()
QUESTION = "What does the town keep records about?"


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    network = testnet.up(root / "net", workers=1, say=lambda line: None)
    try:
        yield network
    finally:
        testnet.down(root / "net")


def earned_once_settled(chain: DepositClient, address: str, before: int, expected: int, timeout_s: float = 60) -> int:
    """The worker's earnings, polled until its claims for ``expected`` are mined (claims follow each job)."""
    deadline = time.monotonic() + timeout_s
    while (earned := chain.token_balance(address) - before) < expected and time.monotonic() < deadline:
        time.sleep(0.2)  # polling interval: a claim is one transaction after the job
    return earned


def test_a_1500_token_paid_prompt_through_request_and_the_gateway_is_paid_exactly(net, tmp_path):
    worker = net.workers[0]
    chain = DepositClient.connect(net.rpc_url, deployments_dir=Path(net.deployments))
    before = chain.token_balance(worker["address"])

    request = subprocess.run(
        [sys.executable, "-m", "node", "--data-dir", net.requester["data_dir"], "request", "--spot-check", "0",
         "--bootstrap", worker["multiaddr"], "--max-price", str(worker["price"]), "--rpc-url", net.rpc_url,
         "--deployments", net.deployments, "--insecure-dev-key", "--json",
         "--system", SYSTEM, "--max-tokens", "24", "--temperature", "0", QUESTION],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert request.returncode == 0, request.stderr[-3000:]
    by_request = json.loads(request.stdout)
    assert by_request["usage"]["prompt_tokens"] >= 1400 and by_request["text"]
    cost_request = job_cost(by_request["usage"]["prompt_tokens"], by_request["usage"]["completion_tokens"],
                            worker["price"])  # fmt: skip
    assert by_request["cost"] == cost_request

    gateway, base_url = start_gateway(net, Path(net.requester["data_dir"]))
    try:
        client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model="default", temperature=0, max_tokens=24,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
        )  # fmt: skip
        streamed = client.chat.completions.create(
            model="default", temperature=0, max_tokens=24, stream=True, stream_options={"include_usage": True},
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who wrote the records?"}],
        )  # fmt: skip
        usage = [chunk.usage for chunk in streamed if chunk.usage][-1]
    finally:
        gateway.terminate()
        gateway.wait()
    assert answer.usage.prompt_tokens >= 1400 and answer.choices[0].message.content
    assert usage.prompt_tokens >= 1400 and usage.completion_tokens > 0
    price = worker["price"]
    expected = (
        cost_request
        + job_cost(answer.usage.prompt_tokens, answer.usage.completion_tokens, price)
        + job_cost(usage.prompt_tokens, usage.completion_tokens, price)
    )
    assert earned_once_settled(chain, worker["address"], before, expected) == expected
