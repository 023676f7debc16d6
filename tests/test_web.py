"""The web page in a real browser (Debian's chromium, driven by Playwright) on a 2-worker paid testnet with the
real model: the gateway's page shows both workers and their prices, paid jobs appear live with their tokens
and cost, the plots get points, and a worker's earned figure equals its balance change on chain.

Screenshots are saved under a temp dir (printed); with ``LLMARKET_SCREENSHOTS=DIR`` they are copied there too
(``docs/img`` is refreshed that way)."""

from __future__ import annotations

import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from node.models.default import DEFAULT_MODEL_CID
from node.payments.deposits import DepositClient

from .factories import paid_market

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]  # fmt: skip  # this machine has no internet
KEY = "sk-web-test"
# A prompt of several hundred tokens, as users send: a document and a question about it.
DOCUMENT = " ".join(
    f"Section {k}: the harbour of Vell kept {k * 7} boats in winter and {k * 11} in summer; the ledger for "
    f"year {1900 + k} notes repairs to the {['north', 'south', 'east', 'west'][k % 4]} pier and a new crane."
    for k in range(1, 16)
)


def digits(text: str) -> str:
    return re.sub(r"\D", "", text)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: run scripts/setup")
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed: run scripts/setup as root, or apt-get install chromium")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    """A paid testnet with its workers' pages, a gateway with an API key, and the workers' balances at the start."""
    with paid_market(tmp_path_factory.mktemp("web"), "--api-key", KEY) as (net, base_url):
        chain = DepositClient.connect(net.rpc_url, deployments_dir=net.deployments)
        before = {w["peer_id"]: chain.token_balance(w["address"]) for w in net.workers}
        yield net, base_url.removesuffix("/v1"), chain, before


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """Where screenshots go: a temp dir, and ``$LLMARKET_SCREENSHOTS`` when set."""
    directory = tmp_path_factory.mktemp("screenshots")
    yield directory
    print(f"\nscreenshots: {directory}")
    if os.environ.get("LLMARKET_SCREENSHOTS"):
        target = Path(os.environ["LLMARKET_SCREENSHOTS"])
        target.mkdir(parents=True, exist_ok=True)
        for png in directory.glob("*.png"):
            shutil.copy(png, target / png.name)


def open_page(browser, url: str, *, key: str | None = None):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" and "401" not in msg.text else None)
    page.goto(url)
    if key is not None:  # the page asks for the API key the node wants
        page.fill("#api-key", key, timeout=30_000)
        page.click("#api-key-save")
    page.wait_for_function("window.llmarket && window.llmarket.ready === true", timeout=30_000)
    return page, errors


def ask(base_url: str, k: int) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0, timeout=180)
    question = f"How many boats did the harbour keep in winter in section {k + 3}?"
    messages = [{"role": "system", "content": DOCUMENT}, {"role": "user", "content": question}]
    return client.chat.completions.create(model="default", messages=messages, max_tokens=40, temperature=0.7, seed=k)


def api(url: str, path: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{url}{path}", headers=headers, timeout=10)
    response.raise_for_status()
    return response.json()


def test_the_gateway_page_shows_the_market_and_paid_jobs_live(market, browser, shots):
    net, base_url, _, _ = market
    page, errors = open_page(browser, f"{base_url}/", key=KEY)
    for w in net.workers:  # both workers, with their prices, under the default model
        row = page.locator(f'tr[data-peer="{w["peer_id"]}"][data-model="{DEFAULT_MODEL_CID}"]')
        row.wait_for(timeout=30_000)
        assert row.locator('td[data-field="price_per_1k"]').get_attribute("data-value") == str(w["price"])
        assert row.locator('td[data-field="price_per_1k"]').inner_text().strip() == f"{w['price'] / 10**18:g}"
    page.evaluate("window.__same_page = true")  # gone if anything reloads the page
    with ThreadPoolExecutor(2) as pool:  # two clients at once, long prompts, paid, sampled
        answers = [pool.submit(ask, base_url, k) for k in range(2)]
        page.wait_for_selector('#jobs tbody tr[data-job] td[data-field="state"]:text-is("running")', timeout=120_000)
        results = [a.result() for a in answers]
    assert all(r.usage.prompt_tokens > 300 and r.usage.completion_tokens > 0 for r in results)
    jobs = [j for j in api(base_url, "/api/jobs", KEY)["jobs"] if j["state"] == "done"]
    assert sorted(j["tokens"] for j in jobs) == sorted(r.usage.completion_tokens for r in results)
    for job in jobs:
        assert int(job["cost"]) > 0 and job["kind"] == "requested"
        assert job["peer"] in {w["peer_id"] for w in net.workers}
        row = page.locator(f'#jobs tbody tr[data-job="{job["id"]}"]')
        page.wait_for_function(
            "([id]) => document.querySelector(`#jobs tbody tr[data-job=\"${id}\"] td[data-field=state]`)"
            "?.textContent.trim() === 'done'", arg=[job["id"]], timeout=30_000,
        )  # fmt: skip
        assert digits(row.locator('td[data-field="tokens"]').inner_text()) == str(job["tokens"])
        assert row.locator('td[data-field="cost"]').get_attribute("data-value") == job["cost"]
    for chart in ("tokens", "jobs", "amount"):  # each plot has points with the jobs in them
        page.wait_for_function(f"window.llmarket.charts.{chart}.data[1].some(v => v > 0)", timeout=30_000)
    done_per_min = "window.llmarket.charts.jobs.data[1].reduce((a, b) => a + b, 0)"  # 10-s buckets, per minute
    page.wait_for_function(f"Math.round({done_per_min} / 6) === {len(jobs)}", timeout=30_000)
    spent = api(base_url, "/api/node", KEY)["totals"]["spent"]
    assert int(spent) == sum(int(j["cost"]) for j in jobs)
    page.wait_for_function(f"document.querySelector('#spent').dataset.value === '{spent}'", timeout=15_000)
    assert page.evaluate("window.__same_page") is True  # live, without a reload
    page.screenshot(path=str(shots / "gateway.png"), full_page=True)
    assert not errors, errors


@pytest.mark.long
def test_a_workers_page_shows_its_jobs_and_earned_equals_its_balance_change_on_chain(market, browser, shots):
    net, base_url, chain, before = market
    result = ask(base_url, 7)  # one more paid job, so this test stands alone
    assert result.usage.completion_tokens > 0
    served = 0
    for w in net.workers:
        page, errors = open_page(browser, f"{w['web']}/")
        jobs = [j for j in api(w["web"], "/api/jobs")["jobs"] if j["kind"] == "served" and j["state"] == "done"]
        served += len(jobs)
        for job in jobs:
            page.locator(f'#jobs tbody tr[data-job="{job["id"]}"]').wait_for(timeout=15_000)
        # The worker claims its receipts on chain after each paid job; the page's "earned" is what was claimed.
        deadline = time.monotonic() + 60
        while True:
            earned = int(page.locator("#earned").get_attribute("data-value") or -1)
            change = chain.token_balance(w["address"]) - before[w["peer_id"]]
            wallet = api(w["web"], "/api/node")["wallet"]
            if earned == change == int(wallet["claimed"]) and wallet["claimed"] == wallet["receipted"]:
                break
            assert time.monotonic() < deadline, (earned, change, wallet)
            time.sleep(0.5)  # polling interval: the claim is a chain transaction
        assert (earned > 0) == bool(jobs), (earned, jobs)
        balance = chain.token_balance(w["address"])  # the header and the payments table follow the claim, live
        page.wait_for_function(f"document.querySelector('#balance').dataset.value === '{balance}'", timeout=15_000)
        cells = "[...document.querySelectorAll('#payments td[data-field=claimed]')]"
        claimed = f"{cells}.map(td => BigInt(td.dataset.value || 0))"
        page.wait_for_function(f"{claimed}.reduce((a, b) => a + b, 0n) === {earned}n", timeout=15_000)
        page.screenshot(path=str(shots / f"{w['name']}.png"), full_page=True)
        assert not errors, errors
        page.close()
    assert served >= 1
