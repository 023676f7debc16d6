"""Test data and builders shared by several test modules: offers, a scripted engine, in-process nodes."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import asynccontextmanager, contextmanager

import trio

from node.errors import ContextTooLong, InvalidRequest
from node.inference.sampling import Delta, Finished, SamplingParams, TokenLogprob, Usage, validate_messages
from node.market.jobs import WorkerService
from node.market.offers import sign_offer
from node.market.requester import JobObserver, JobSpec
from node.market.routing import RouteQuery
from node.net.host import HostConfig
from node.net.identity import Identity
from node.net.network import Network
from node.protocol.messages import ModelInfo, Offer

MODEL = "bafymodel"


async def gather(*calls):
    """Run zero-argument async callables at once; their results, in order."""
    results: list = [None] * len(calls)

    async def run(k):
        results[k] = await calls[k]()

    async with trio.open_nursery() as nursery:
        for k in range(len(calls)):
            nursery.start_soon(run, k)
    return results


def offer(peer_id: str = "12D3KooWtest", **changes) -> Offer:
    """An unsigned offer for MODEL: free, one free slot, expiring at 1e9 unless changed."""
    base = Offer(
        peer_id=peer_id,
        addrs=[],
        payee="",
        binding=b"",
        models=[ModelInfo(MODEL, "test model", 2048, "Q4_1")],
        price_per_1k=0,
        chain_id=0,
        escrow="",
        slots_total=2,
        slots_free=1,
        tokens_per_s=100.0,
        first_token_ms=10.0,
        hardware="test",
        version="test",
        seq=1,
        expires_at=1e9,
    )
    return dataclasses.replace(base, **changes)


def signed_offer(identity: Identity, seq: int, expires_at: float, **changes) -> Offer:
    """An offer published by ``identity``, signed and bound like a worker's."""
    fields = dict(peer_id=identity.peer_id, payee=identity.payee, binding=identity.binding, slots_total=1)
    return sign_offer(identity, offer(**{**fields, "seq": seq, "expires_at": expires_at, **changes}))


# ------------------------------------------------------------------- jobs

WORDS = ["Once", " upon", " a", " time", " there", " was", " a", " market", "."]
SPEC = JobSpec(model=MODEL, params=SamplingParams(max_tokens=50), messages=[{"role": "user", "content": "story"}])
QUERY = RouteQuery(model=MODEL, free_only=True)


class ScriptedEngine:
    """Streams WORDS, one per tick, as if the prompt had ``prompt_tokens`` tokens (a stand-in for llama.cpp).

    It records the assistant prefixes it was given (a failover's ``resume_text``)
    and the params of every job. With ``logprobs`` asked for, each word comes
    with a made-up logprob of -0.5 and its top alternatives.
    """

    def __init__(
        self,
        *,
        slots: int = 1,
        tick_s: float = 0.01,
        stall: bool = False,
        stall_after: int | None = None,
        words: list[str] = WORDS,
        prompt_tokens: int = 5,
        n_ctx: int = 2048,
    ):
        self.slots, self.tick_s, self.stall, self.words = slots, tick_s, stall, words
        self.stall_after, self.prompt_tokens, self.n_ctx = stall_after, prompt_tokens, n_ctx
        self.busy = 0
        self.prefixes: list[str] = []
        self.params: list[SamplingParams] = []

    @property
    def free_slots(self) -> int:
        return self.slots - self.busy

    def stream_chat(self, messages, params, *, assistant_prefix=""):
        validate_messages(messages)  # as the real engine does, before taking a slot
        self.prefixes.append(assistant_prefix)
        return self._stream(params)

    def stream_completion(self, prompt, params, *, resume_text=""):
        self.prefixes.append(resume_text)
        if not isinstance(prompt, str) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string")
        return self._stream(params)

    @asynccontextmanager
    async def _stream(self, params):
        if self.prompt_tokens + params.max_tokens > self.n_ctx:  # as the real engine does, once tokenized
            raise ContextTooLong(f"prompt + max_tokens exceeds the context size {self.n_ctx}")
        self.busy += 1
        self.params.append(params)
        send, recv = trio.open_memory_channel(math.inf)

        async def produce():
            if self.stall:
                await trio.sleep_forever()
            words = self.words[: params.max_tokens]
            for i, word in enumerate(words):
                if i == self.stall_after:
                    await trio.sleep_forever()
                await trio.sleep(self.tick_s)
                logprobs = ()
                if params.logprobs is not None:
                    logprobs = (TokenLogprob(word, -0.5, tuple((f"alt{k}", -1.0 - k) for k in range(params.logprobs))),)
                send.send_nowait(Delta(word, 1, self.prompt_tokens, logprobs))
            send.send_nowait(Finished("".join(words), Usage(self.prompt_tokens, len(words)), "stop", 0.0, 0.0))

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(produce)
                yield recv
                nursery.cancel_scope.cancel()
        finally:
            self.busy -= 1


@asynccontextmanager
async def worker(tmp_path, name, engine, *, metering=None, activity=None, **offer_changes):
    """A worker node running in its own task and cancel scope, so a test can kill it.

    Yields (host, its signed offer, the cancel scope that kills it). ``activity`` records its jobs.
    """
    identity = Identity.load(tmp_path / name)
    host = Network(identity)
    life = trio.CancelScope()

    async def serve(task_status=trio.TASK_STATUS_IGNORED):
        with life:
            async with trio.open_nursery() as inner:
                await inner.start(host.run)
                service = WorkerService(host, identity, {MODEL: engine})
                if metering is not None:
                    service.metering = metering
                if activity is not None:
                    service.activity = activity
                service.install()
                task_status.started()

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        offer = signed_offer(identity, 1, time.time() + 60, addrs=host.addrs(), slots_free=1, **offer_changes)
        yield host, offer, life
        nursery.cancel_scope.cancel()


def requester_peer(tmp_path) -> str:
    """The peer id of ``requester(tmp_path)``'s host: a deposit payer binds its jobs' terms to it."""
    return Identity.load(tmp_path / "requester").peer_id


@asynccontextmanager
async def requester(tmp_path):
    """A requester's host (no offer book: tests hand ``run_job`` the offers)."""
    host = Network(Identity.load(tmp_path / "requester"), HostConfig(connect_timeout_s=3, stream_timeout_s=3))
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        yield host
        nursery.cancel_scope.cancel()


class Recorder(JobObserver):
    """A ``run_job`` observer that keeps what it hears; ``then(piece)`` runs after each piece of text."""

    def __init__(self, then: Callable[[str], None] = lambda piece: None) -> None:
        self.then = then
        self.attempts: list[str] = []
        self.texts: list[str] = []
        self.logprobs: list[TokenLogprob] = []
        self.failovers: list[tuple[str, str, bool]] = []

    def on_attempt(self, peer_id: str) -> None:
        self.attempts.append(peer_id)

    def on_logprobs(self, logprobs: tuple[TokenLogprob, ...]) -> None:
        self.logprobs.extend(logprobs)

    def on_text(self, piece: str) -> None:
        self.texts.append(piece)
        self.then(piece)

    def on_failover(self, peer_id: str, reason: str, started: bool) -> None:
        self.failovers.append((peer_id, reason, started))


# ---------------------------------------------------------------- processes


def start_gateway(net, data_dir, *extra: str):
    """`llmarket gateway` as a process on a testnet ``net``, paying from ``data_dir``'s wallet.

    Returns (the process, the API's base URL); the caller terminates it.
    """
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "node", "--data-dir", str(data_dir), "gateway", "--listen", "127.0.0.1:0",
        "--spot-check", "0",  # no random verification jobs: tests count what is paid
        "--bootstrap", net.workers[0]["multiaddr"], "--max-price", str(max(w["price"] for w in net.workers)),
        "--rpc-url", net.rpc_url, "--deployments", net.deployments, "--insecure-dev-key",
        "--no-mdns",  # this testnet's market only, never another test's nodes found on the LAN
        *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline().strip()
    assert line.startswith("OpenAI-compatible API at "), line
    return proc, line.split(" at ", 1)[1]


@contextmanager
def paid_market(root, *gateway_args: str, workers: int = 2):
    """``llmarket testnet up`` in ``root`` (paid workers with their web pages) and a gateway paying from the
    testnet's requester wallet; yields (the testnet, the gateway's API base URL) and stops both."""
    from pathlib import Path

    from node.dev import testnet

    net = testnet.up(Path(root) / "net", workers=workers, say=lambda line: None)
    gateway = None
    try:
        gateway, base_url = start_gateway(net, Path(net.requester["data_dir"]), *gateway_args)
        yield net, base_url
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait()
        testnet.down(Path(root) / "net")
