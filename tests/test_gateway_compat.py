"""The gateway against what OpenAI clients expect (issue 9), fast: real HTTP (Hypercorn) and the official
``openai`` client, with ``run_job`` replaced by a scripted market so no worker, chain or model is needed."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from functools import partial

import httpx
import openai
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from node.api import gateway as gateway_module
from node.api.gateway import MAX_BODY, Gateway
from node.errors import DeadlineExceeded, InvalidRequest, NoWorker
from node.inference.sampling import TokenLogprob
from node.market.jobs import WorkerService
from node.market.offers import Advertiser, OfferBook, OfferGossip
from node.market.requester import JobObserver, JobResult
from node.models.default import DEFAULT_MODEL_CID
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import ModelInfo, Offer

from .factories import MODEL, ScriptedEngine, offer, requester, signed_offer, worker
from .factories import WORDS as WORKER_WORDS

NAME = "SmolLM2-135M-Instruct.Q4_1"
MARKET = [offer("w1", models=[ModelInfo(DEFAULT_MODEL_CID, NAME, 2048)])]
WORDS = ("Hello", ",", " world", "!")
CHAT = [{"role": "user", "content": "Hi"}]


@dataclass
class FakeHost:
    peer_id: str = "12D3KooWgateway"


@dataclass
class FakeRequester:
    market: list[Offer] = field(default_factory=lambda: list(MARKET))
    host: FakeHost = field(default_factory=FakeHost)

    def offers(self) -> list[Offer]:
        return list(self.market)


@dataclass
class ScriptedJobs:
    """Stands in for ``run_job``: streams WORDS (with logprobs when asked), or raises ``error``; records jobs."""

    words: tuple[str, ...] = WORDS
    tick_s: float = 0.0
    silent_last_token: bool = False  # a last token with a logprob but no text (as an end-of-generation token)
    error: BaseException | None = None
    started: list = field(default_factory=list)
    cancelled: list = field(default_factory=list)
    finished: list = field(default_factory=list)

    async def __call__(self, host, offers, query, spec, *, observer=None, **_) -> JobResult:
        observer = observer or JobObserver()
        self.started.append(spec)
        if self.error is not None:
            raise self.error
        words = self.words[: spec.params.max_tokens]
        try:
            for i, word in enumerate(words):
                await trio.sleep(self.tick_s)
                k = spec.params.logprobs
                if k is not None:
                    top = tuple((f"{word}~{j}", -0.5 * i - j) for j in range(k))
                    observer.on_logprobs((TokenLogprob(word, -0.5 * i, top),))
                observer.on_text(word)
            if self.silent_last_token and spec.params.logprobs is not None:
                observer.on_logprobs((TokenLogprob("", -0.25),))
        except trio.Cancelled:
            self.cancelled.append((spec, time.monotonic()))
            raise
        self.finished.append(spec)
        finish = "length" if len(words) < len(self.words) else "stop"
        return JobResult("".join(words), finish, prompt_tokens=5, completion_tokens=len(words), workers=["w1"])


@asynccontextmanager
async def serving(monkeypatch, jobs: ScriptedJobs | None, market: FakeRequester | None = None, **gateway_args):
    """The gateway over HTTP on a free port (``jobs`` stands in for run_job, if given); yields its base URL (…/v1)."""
    if jobs is not None:
        monkeypatch.setattr(gateway_module, "run_job", jobs)
    app = Gateway(market or FakeRequester(), **gateway_args)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))
        yield binds[0] + "/v1"
        nursery.cancel_scope.cancel()


def client(base_url: str, **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="anything", max_retries=0, **options)


async def in_thread(fn, *args, **kwargs):
    """Run a blocking client call off the event loop (the server runs on it)."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs))


async def test_models_retrieve(monkeypatch):
    async with serving(monkeypatch, ScriptedJobs()) as url:
        c = client(url)
        model = await in_thread(c.models.retrieve, DEFAULT_MODEL_CID)
        assert model.id == DEFAULT_MODEL_CID and model.object == "model"
        assert (await in_thread(c.models.retrieve, NAME.lower())).id == DEFAULT_MODEL_CID
        with pytest.raises(openai.NotFoundError) as info:
            await in_thread(c.models.retrieve, "gpt-4")
        assert info.value.body["code"] == "model_not_found"


async def test_chat_logprobs_streaming_and_not(monkeypatch):
    async with serving(monkeypatch, ScriptedJobs(silent_last_token=True)) as url:
        c = client(url)
        full = await in_thread(c.chat.completions.create, model="default", messages=CHAT, logprobs=True, top_logprobs=2)
        content = full.choices[0].logprobs.content
        assert [t.token for t in content] == [*WORDS, ""] and content[1].logprob == -0.5
        assert [a.token for a in content[1].top_logprobs] == [",~0", ",~1"]
        assert content[0].bytes == list(b"Hello")

        def streamed():
            chunks = c.chat.completions.create(model="default", messages=CHAT, logprobs=True, stream=True)
            return [t for chunk in chunks for ch in chunk.choices if ch.logprobs for t in ch.logprobs.content]

        tokens = await in_thread(streamed)
        assert [t.token for t in tokens] == [*WORDS, ""] and all(t.top_logprobs == [] for t in tokens)
        plain = await in_thread(c.chat.completions.create, model="default", messages=CHAT)
        assert plain.choices[0].logprobs is None


async def test_completion_logprobs_streaming_and_not(monkeypatch):
    async with serving(monkeypatch, ScriptedJobs()) as url:
        c = client(url)
        full = await in_thread(c.completions.create, model="default", prompt="Say", logprobs=1)
        lp = full.choices[0].logprobs
        assert lp.tokens == list(WORDS) and lp.token_logprobs == [0.0, -0.5, -1.0, -1.5]
        assert lp.top_logprobs[0] == {"Hello~0": 0.0} and lp.text_offset == [3, 8, 9, 15]

        def streamed():
            chunks = c.completions.create(model="default", prompt="Say", logprobs=0, stream=True)
            return [(t, o) for ch in chunks for c_ in ch.choices if c_.logprobs
                    for t, o in zip(c_.logprobs.tokens, c_.logprobs.text_offset, strict=True)]  # fmt: skip

        assert await in_thread(streamed) == [("Hello", 3), (",", 8), (" world", 9), ("!", 15)]


async def test_response_format_and_tools(monkeypatch):
    jobs = ScriptedJobs()
    async with serving(monkeypatch, jobs) as url:
        c = client(url)
        schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
        as_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        await in_thread(c.chat.completions.create, model="default", messages=CHAT, response_format=as_schema)
        await in_thread(c.chat.completions.create, model="default", messages=CHAT,
                        response_format={"type": "json_object"})  # fmt: skip
        assert [json.loads(s.params.json_schema) for s in jobs.started] == [schema, {"type": "object"}]
        with pytest.raises(openai.BadRequestError) as bad_format:
            await in_thread(c.chat.completions.create, model="default", messages=CHAT,
                            response_format={"type": "json_schema", "json_schema": {"name": "x"}})  # fmt: skip
        assert bad_format.value.body["param"] == "response_format"
        tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        with pytest.raises(openai.BadRequestError) as tools:
            await in_thread(c.chat.completions.create, model="default", messages=CHAT, tools=[tool])
        assert tools.value.body["param"] == "tools" and "not supported" in tools.value.body["message"]
        await in_thread(c.chat.completions.create, model="default", messages=CHAT, tool_choice="none")
        assert len(jobs.started) == 3


async def errors_both_ways(c, error_type) -> list:
    """The errors one chat call raises, non-streaming and then streaming."""
    errors = []
    for stream in (False, True):
        with pytest.raises(error_type) as info:
            await in_thread(lambda s=stream: list(
                c.chat.completions.create(model="default", messages=CHAT, stream=True)) if s else
                c.chat.completions.create(model="default", messages=CHAT))  # fmt: skip
        errors.append(info.value)
    return errors


@pytest.mark.parametrize(
    "error, status",
    [(NoWorker("nobody serves it"), 503), (DeadlineExceeded("too slow"), 504), (InvalidRequest("too long"), 400)],
)
async def test_a_stream_that_fails_before_its_first_token_gets_the_real_status(monkeypatch, error, status):
    async with serving(monkeypatch, ScriptedJobs(error=error)) as url:
        c = client(url)
        for raised in await errors_both_ways(c, openai.APIStatusError):
            assert raised.status_code == status and str(error) in raised.body["message"]
        with pytest.raises(openai.NotFoundError):
            await in_thread(c.chat.completions.create, model="gpt-4", messages=CHAT, stream=True)


async def test_an_unexpected_error_is_a_500_and_logged_with_its_traceback(monkeypatch, caplog):
    caplog.set_level(logging.ERROR, logger="node.api.gateway")
    async with serving(monkeypatch, ScriptedJobs(error=RuntimeError("boom"))) as url:
        c = client(url)
        for raised in await errors_both_ways(c, openai.InternalServerError):
            assert raised.status_code == 500 and raised.body["type"] == "server_error"
    records = [r for r in caplog.records if r.name == "node.api.gateway" and r.exc_info]
    assert len(records) == 2 and all("boom" in str(r.exc_info[1]) for r in records)


async def test_a_non_streaming_client_that_goes_away_cancels_its_job(monkeypatch):
    jobs = ScriptedJobs(words=("word ",) * 100, tick_s=0.1)  # a 10 s job
    async with serving(monkeypatch, jobs) as url:
        c = client(url, timeout=0.5)
        asked = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await in_thread(c.chat.completions.create, model="default", messages=CHAT)
        with trio.fail_after(3):
            while not jobs.cancelled:
                await trio.sleep(0.05)
        assert jobs.cancelled[0][1] - asked < 2 and not jobs.finished


async def test_nulls_content_parts_max_completion_tokens_and_the_model_served(monkeypatch):
    jobs = ScriptedJobs()
    async with serving(monkeypatch, jobs) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            nulls = {"n": None, "stream": None, "stream_options": None, "max_tokens": None, "temperature": None}
            reply = await http.post("/chat/completions", json={"model": "default", "messages": CHAT, **nulls})
            assert reply.status_code == 200, reply.text
            assert reply.json()["model"] == NAME  # the model served, not "default"
            bad_part = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
            reply = await http.post("/chat/completions", json={"model": "default", "messages": bad_part})
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "messages"
            assert "content[0].text" in reply.json()["error"]["message"]
            reply = await http.post(
                "/chat/completions", json={"model": "default", "messages": CHAT, "max_completion_tokens": -1}
            )
            assert reply.status_code == 400 and reply.json()["error"]["param"] == "max_completion_tokens"
            reply = await http.post(
                "/chat/completions", json={"model": "default", "messages": CHAT, "max_tokens": 100_000}
            )
            assert reply.status_code == 400 and "context of 2048" in reply.json()["error"]["message"]
        assert len(jobs.started) == 1  # only the good request reached the market


async def test_several_prompts_are_several_choices(monkeypatch):
    jobs = ScriptedJobs()
    async with serving(monkeypatch, jobs) as url:
        c = client(url)
        full = await in_thread(c.completions.create, model="default", prompt=["One", "Two"], max_tokens=2)
        assert [(ch.index, ch.text, ch.finish_reason) for ch in full.choices] == [
            (0, "Hello,", "length"),
            (1, "Hello,", "length"),
        ]
        assert full.usage.completion_tokens == 4 and sorted(s.prompt for s in jobs.started) == ["One", "Two"]

        def streamed():
            texts, finishes = {0: "", 1: ""}, {}
            for chunk in c.completions.create(model="default", prompt=["One", "Two"], stream=True,
                                              stream_options={"include_usage": True}):  # fmt: skip
                for ch in chunk.choices:
                    texts[ch.index] += ch.text
                    if ch.finish_reason:
                        finishes[ch.index] = ch.finish_reason
            return texts, finishes

        texts, finishes = await in_thread(streamed)
        assert texts == {0: "".join(WORDS), 1: "".join(WORDS)} and finishes == {0: "stop", 1: "stop"}


async def test_a_body_over_the_limit_is_413(monkeypatch):
    monkeypatch.setattr(gateway_module, "run_job", ScriptedJobs())
    app = Gateway(FakeRequester())
    incoming = [{"type": "http.request", "body": b"x" * (1 << 20), "more_body": True} for _ in range(20)]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
    await app(scope, receive, send)
    assert sent[0]["status"] == 413 and json.loads(sent[1]["body"])["error"]["code"] == "request_too_large"
    assert MAX_BODY < 20 << 20


# ------------------------------------------- the real requester and a scripted worker over libp2p


@asynccontextmanager
async def market_of_one(monkeypatch, tmp_path, engine: ScriptedEngine):
    """The gateway over the real run_job, with one in-process worker; yields (base URL, the engine)."""
    async with worker(tmp_path, "w", engine) as (_, worker_offer, _), requester(tmp_path) as host:
        async with serving(monkeypatch, None, FakeRequester([worker_offer], host)) as url:
            yield url


async def test_logprobs_come_from_the_worker(monkeypatch, tmp_path):
    async with market_of_one(monkeypatch, tmp_path, ScriptedEngine()) as url:
        c = client(url)
        full = await in_thread(c.chat.completions.create, model="test model", messages=CHAT, logprobs=True,
                               top_logprobs=2)  # fmt: skip
        content = full.choices[0].logprobs.content
        assert [t.token for t in content] == WORKER_WORDS and content[0].logprob == -0.5
        assert [(a.token, a.logprob) for a in content[0].top_logprobs] == [("alt0", -1.0), ("alt1", -2.0)]

        def streamed():
            chunks = c.completions.create(model="test model", prompt="Once", logprobs=1, stream=True)
            return [t for ch in chunks for c_ in ch.choices if c_.logprobs for t in c_.logprobs.tokens]

        assert await in_thread(streamed) == WORKER_WORDS


async def test_a_non_streaming_client_that_goes_away_frees_the_worker_slot(monkeypatch, tmp_path):
    engine = ScriptedEngine(tick_s=0.2)  # 9 words: about 2 s
    async with market_of_one(monkeypatch, tmp_path, engine) as url:
        with pytest.raises(openai.APITimeoutError):
            await in_thread(client(url, timeout=0.6).chat.completions.create, model="test model", messages=CHAT)
        with trio.fail_after(1):  # well before the job would have ended
            while engine.busy:
                await trio.sleep(0.02)


async def test_too_long_for_the_context_is_400_streaming_or_not(monkeypatch, tmp_path):
    engine = ScriptedEngine(prompt_tokens=100)  # 100 + 2000 tokens do not fit its 2,048
    async with market_of_one(monkeypatch, tmp_path, engine) as url:
        c = client(url)
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError):
                await in_thread(c.chat.completions.create, model="test model", messages=CHAT, max_tokens=2000,
                                stream=stream)  # fmt: skip
        assert (await in_thread(c.chat.completions.create, model="test model", messages=CHAT)).choices


# ------------------------------------------------------------------- the command


def _gateway_command(tmp_path, *args: str) -> list[str]:
    return [sys.executable, "-m", "node", "--data-dir", str(tmp_path / "gw"), "gateway", "--spot-check", "0", *args]


async def test_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    boot = Network(Identity.load(tmp_path / "boot"))  # a peer that answers, so only the port can fail
    with socket.socket() as taken, trio.fail_after(60):
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(boot.run)
            command = _gateway_command(tmp_path, "--listen", f"127.0.0.1:{port}", "--bootstrap", boot.addrs()[0])
            result = await trio.run_process(command, capture_stdout=True, capture_stderr=True, check=False)
            nursery.cancel_scope.cancel()
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert err.startswith(f"llmarket: error: cannot listen on 127.0.0.1:{port}")


async def test_ctrl_c_with_streams_in_flight_is_one_line_and_exit_130(tmp_path):
    identity = Identity.load(tmp_path / "w")
    host = Network(identity)
    engine = ScriptedEngine(tick_s=0.05, words=["word "] * 400, slots=4)  # 20 s answers
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            WorkerService(host, identity, {MODEL: engine}).install()
            gossip = OfferGossip(host, OfferBook())
            await nursery.start(gossip.run)

            def make_offer(seq, expires_at):
                return signed_offer(identity, seq, expires_at, addrs=host.addrs(), slots_total=4, slots_free=4)

            await nursery.start(Advertiser(gossip, make_offer, interval_s=1, ttl_s=30).run)
            proc = subprocess.Popen(
                _gateway_command(tmp_path, "--listen", "127.0.0.1:0", "--bootstrap", host.addrs()[0]),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={k: v for k, v in os.environ.items() if k != "LLMARKET_DEBUG"},
            )  # fmt: skip
            try:
                line = await trio.to_thread.run_sync(proc.stdout.readline)
                assert line.startswith("OpenAI-compatible API at "), line + proc.stderr.read()
                url = line.split(" at ", 1)[1].strip()

                streaming: set[int] = set()  # the streams that have received text

                def stream(i: int) -> None:
                    body = {"model": "test model", "messages": CHAT, "max_tokens": 400, "stream": True}
                    with suppress(httpx.HTTPError):
                        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=60) as reply:
                            for line in reply.iter_lines():
                                if line.startswith("data: "):
                                    streaming.add(i)

                for i in range(3):
                    nursery.start_soon(trio.to_thread.run_sync, stream, i)
                while engine.busy < 3 or len(streaming) < 3:  # every stream is running, and its text flowing
                    await trio.sleep(0.05)  # polling interval
                proc.send_signal(signal.SIGINT)
                _, err = await trio.to_thread.run_sync(partial(proc.communicate, timeout=30))
                with trio.fail_after(5):
                    while engine.busy:  # the jobs were cancelled, the slots freed
                        await trio.sleep(0.05)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            nursery.cancel_scope.cancel()
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line] == ["market: 1 offer(s) so far", "llmarket: interrupted"]
