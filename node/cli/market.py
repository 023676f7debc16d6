"""``llmarket serve``, ``request`` and ``peers``: the market over libp2p."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path

import trio

from node.api.dashboard import DashboardApp, worker_dashboard
from node.api.http import bind, serve_asgi
from node.app.config import WorkerConfig
from node.app.paid import payer_for, paying_wallet
from node.app.requester import VerifyBeforePaying, model_cid_for_request, open_requester, report_overcharges
from node.app.worker import serve
from node.cli.common import (
    bootstrap_flag,
    engine_flags,
    ipfs_flag,
    json_flag,
    model_flag,
    network_config,
    probability,
    sampling_flags,
    sampling_params,
    wallet_flags,
)
from node.cli.interrupt import run_until_interrupted
from node.errors import NodeError, VerificationFailed
from node.inference.sampling import SamplingParams
from node.market.requester import JobObserver, JobSpec, run_job
from node.market.routing import RouteQuery
from node.payments.units import format_amount
from node.progress import TerminalProgress
from node.verify.fraud import audit
from node.verify.judge import describe
from node.verify.local import open_local_verifier


def register(commands: argparse._SubParsersAction) -> None:
    srv = commands.add_parser(
        "serve",
        help="run a worker: load a model, advertise it on the market, and serve jobs",
        description="Run a worker. It loads --model (cached, fetched by CID, or the embedded default), measures "
        "its speed, advertises a signed offer over libp2p and serves jobs until Ctrl-C. It prints the multiaddr "
        "other nodes pass to --bootstrap. Example: llmarket serve --slots 2",
    )
    model_flag(srv)
    bootstrap_flag(srv, worker=True)
    srv.add_argument("--price", type=int, default=0, metavar="UNITS",
                     help="price per 1,000 tokens (prompt + answer) in token base units; 0 = free (default). "
                          "A paid worker needs the chain: see the payment flags")  # fmt: skip
    srv.add_argument("--verify-price", type=int, default=None, metavar="UNITS",
                     help="price per 1,000 tokens checked (prompt + answer) for verification jobs: other "
                          "requesters' spot checks of other workers (default: --price / 10)")  # fmt: skip
    srv.add_argument("--slots", type=int, default=None, metavar="N",
                     help="jobs served at once (default: with --engine batched, as many as the KV cache has room "
                          "for in memory, up to 8; with --engine contexts, 1; the choice and why are printed at "
                          "start)")  # fmt: skip
    pay = srv.add_argument_group("payment (with --price > 0)")
    wallet_flags(pay)
    pay.add_argument("--settle-every", type=int, default=1, metavar="N",
                     help="claim on chain after every N paid jobs of a requester (default: %(default)s; a "
                          "requester whose reserve does not back this worker yet, or that unlocks, is claimed "
                          "at once)")  # fmt: skip
    pay.add_argument("--settle-interval", type=float, default=None, metavar="S",
                     help="also claim a requester's receipts at least every S seconds")  # fmt: skip
    engine_flags(srv)
    ipfs_flag(srv)
    web = srv.add_argument_group("web page (off by default)")
    web.add_argument("--http", metavar="HOST:PORT", default=None,
                     help="serve this worker's web page (market, jobs, slots, earnings, claims) and its JSON API "
                          "at http://HOST:PORT/, e.g. --http 127.0.0.1:8080; keep it on 127.0.0.1 unless you "
                          "set --api-key")  # fmt: skip
    web.add_argument("--api-key", default=os.environ.get("LLMARKET_API_KEY"), metavar="KEY",
                     help="require `Authorization: Bearer KEY` for the page's API (default: $LLMARKET_API_KEY; "
                          "none: open)")  # fmt: skip
    srv.set_defaults(handler=_serve)

    req = commands.add_parser(
        "request",
        help="send a prompt to the market and stream the answer",
        description="Join the market through --bootstrap, pick the best worker for the model (price, speed, "
        "latency, reputation), stream its answer to the terminal and fail over to the next worker if it dies. "
        'Example: llmarket request --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3… "Why is the sky blue?"',
    )
    req.add_argument(
        "prompt", metavar="PROMPT", help="the user message; '-' (or nothing) reads it from stdin", nargs="?"
    )
    req.add_argument("--system", metavar="TEXT", help="a system message to put first")
    model_flag(req)
    sampling_flags(req)
    bootstrap_flag(req)
    req.add_argument("--max-price", type=int, default=0, metavar="UNITS",
                     help="highest price per 1,000 tokens to pay (default: 0, free workers only); above 0 the "
                          "wallet pays from its deposit in the escrow, funded with `llmarket wallet deposit` "
                          "(see the payment flags)")  # fmt: skip
    req.add_argument("--peer", metavar="PEER_ID", help="use this worker and no other")
    req.add_argument("--spot-check", type=probability, default=0.05, metavar="P",
                     help="with probability P, pay another worker serving the model to check the answer "
                          "(at its verify price); 1 = always, 0 = never (default: %(default)s)")  # fmt: skip
    req.add_argument("--verify", action="store_true",
                     help="check the answer against the model on this machine (one batched pass over prompt + "
                          "answer; needs the model here, which the embedded default always is); a failed check "
                          "exits 1")  # fmt: skip
    pay = req.add_argument_group("payment (with --max-price > 0)")
    wallet_flags(pay)
    req.add_argument(
        "--timeout", type=float, default=120.0, metavar="S", help="deadline for the whole job (default: %(default)s)"
    )
    req.add_argument("--discovery-timeout", type=float, default=10.0, metavar="S",
                     help="how long to wait for offers for the model (default: %(default)s)")  # fmt: skip
    json_flag(req)
    req.set_defaults(handler=_request)

    peers = commands.add_parser(
        "peers",
        help="list the live market: workers, models, prices, free slots, speed, latency",
        description="Join the market through --bootstrap, collect offers for --wait seconds, ping each worker, "
        "and print the market.",
    )
    bootstrap_flag(peers)
    peers.add_argument(
        "--wait", type=float, default=3.0, metavar="S", help="how long to collect offers (default: %(default)s)"
    )
    json_flag(peers)
    peers.set_defaults(handler=_peers)


def _quiet_libp2p() -> None:
    logging.getLogger("libp2p").setLevel(logging.CRITICAL)


def _serve(args: argparse.Namespace) -> int:
    _quiet_libp2p()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    jobs_log = logging.getLogger("node.market.jobs")
    jobs_log.addHandler(handler)
    jobs_log.setLevel(logging.INFO)
    jobs_log.propagate = False  # libp2p configures the root logger; do not print twice
    config = WorkerConfig(
        data_dir=Path(args.data_dir),
        model=args.model,
        network=network_config(args, dht_server=True),  # workers are the market's bootstrap peers
        price_per_1k=args.price,
        verify_price_per_1k=args.verify_price,
        slots=args.slots,
        ctx_size=args.ctx_size,
        threads=args.threads,
        gpu_layers=args.gpu_layers,
        engine=args.engine,
        ipfs_api=args.ipfs_api,
        rpc_url=args.rpc_url,
        deployments_dir=Path(args.deployments),
        insecure_dev_key=args.insecure_dev_key,
        settle_every=args.settle_every,
        settle_interval_s=args.settle_interval,
    )
    http = bind(args.http, "--http") if args.http else None  # a port in use is one line, before the model loads

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            worker = await nursery.start(
                lambda task_status: serve(config, progress=TerminalProgress(), task_status=task_status)
            )
            if http is not None:
                dashboard = worker_dashboard(worker, api_key=args.api_key)
                await nursery.start(dashboard.run)
                for url in await nursery.start(partial(serve_asgi, DashboardApp(dashboard), *http)):
                    print(f"web page at {url}/", file=sys.stderr, flush=True)
            print(f"serving {worker.model.name} ({worker.model.cid})", file=sys.stderr)
            if worker.crowding:  # other llama.cpp workers on this machine: one line, with the --threads to use
                print(worker.crowding, file=sys.stderr)
            if config.slots is None:
                from node.inference.engine import slot_plan

                print(slot_plan(worker.engine).reason, file=sys.stderr)
            print(
                f"{worker.engine.slots} slot(s), {worker.speed.tokens_per_s:.0f} tokens/s, first token "
                f"{1000 * worker.speed.first_token_s:.0f} ms, gpu layers {worker.engine.gpu_layers}",
                file=sys.stderr,
            )
            print("bootstrap others with:", file=sys.stderr)
            for addr in worker.host.addrs():
                print(addr, flush=True)
            nursery.start_soon(report_reachability, worker.host)

    run_until_interrupted(main)
    return 0


async def report_reachability(host, *, every_s: float = 1.0) -> None:
    """Print one line to stderr whenever how others reach ``host`` changes (AutoNAT verdict, relays)."""
    said = None
    started = time.monotonic()
    while True:
        now = (host.reachability, tuple(host.circuit_addrs()[:1]), tuple(host.observed_addrs()))
        if now != said and (now[0] != "unknown" or time.monotonic() - started > 10):
            said = now
            reachability, circuits, observed = now
            if reachability == "public":
                line = f"reachable: public ({host.reachability_reason})"
            elif reachability == "private" and circuits:
                line = f"reachable: behind NAT, through relay {circuits[0]}/p2p/{host.peer_id}"
            elif reachability == "private":
                line = f"reachable: behind NAT ({host.reachability_reason}); looking for a relay among the peers"
            else:
                line = f"reachability: unknown ({host.reachability_reason}); `llmarket net status` shows it later"
            print(line, file=sys.stderr, flush=True)
        await trio.sleep(every_s)


class _Terminal(JobObserver):
    """``request`` on a terminal: the answer on stdout as it streams (unless ``quiet``), failovers on stderr."""

    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet

    def on_text(self, piece: str) -> None:
        if not self.quiet:
            sys.stdout.write(piece)
            sys.stdout.flush()

    def on_failover(self, peer_id: str, reason: str, started: bool) -> None:
        when = "mid-answer; continuing on another worker" if started else "trying the next one"
        print(f"\n[worker {peer_id[:16]}… failed ({reason}); {when}]", file=sys.stderr)


def _request(args: argparse.Namespace) -> int:
    _quiet_libp2p()
    params: SamplingParams = sampling_params(args)
    prompt = args.prompt if args.prompt not in (None, "-") else sys.stdin.read()
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": prompt}
    ]
    model = model_cid_for_request(args.model)
    spec = JobSpec(model=model, params=params, messages=messages, max_price_per_1k=args.max_price)
    wallet = None
    if args.max_price > 0:
        wallet = paying_wallet(
            Path(args.data_dir), args.rpc_url, Path(args.deployments), insecure_dev_key=args.insecure_dev_key
        )
    deployment = wallet.client.deployment if wallet else None
    query = RouteQuery(
        model=model,
        max_price_per_1k=args.max_price,
        pinned_peer=args.peer,
        chain_id=deployment.chain_id if deployment else 0,
        escrow=wallet.escrow if wallet else "",
        free_only=wallet is None,
    )

    async def main():
        async with AsyncExitStack() as stack:
            verifier = (
                await stack.enter_async_context(open_local_verifier(Path(args.data_dir), model))
                if args.verify
                else None
            )
            requester = await stack.enter_async_context(
                open_requester(Path(args.data_dir), network=network_config(args))
            )
            checker = VerifyBeforePaying(verifier) if verifier is not None else None
            if verifier is not None:
                requester.fraud.engines = verifier.engines  # re-check others' fraud reports too
            await requester.wait_for_model(model, args.discovery_timeout)
            payer = (
                payer_for(wallet, usage=requester.checked_usage, credit=requester.trust.credit_tokens)
                if wallet
                else None
            )
            routed = query
            if verifier is not None:  # workers whose answers this machine checks exactly come first
                routed = dataclasses.replace(query, numerics=next(iter(verifier.engines.values())).batch_numerics)
            result = await run_job(
                requester.host, requester.offers, routed, spec, reputation=requester.reputation,
                deadline_s=args.timeout, observer=_Terminal(quiet=args.json), payer=payer,
                gate=checker.gate if checker is not None else None,  # --verify: the last receipt after the verdict
            )  # fmt: skip
            checks = await audit(requester, result, verifier=checker, spot_check_probability=args.spot_check,
                                 payer=payer, query=query, trust=requester.trust)  # fmt: skip
            if await report_overcharges(requester, result):
                checks.reported = True
            if checks.reported:
                await trio.sleep(REPORT_FLUSH_S)  # let the fraud report leave before the node stops
            return result, requester.host.connection_kind(result.workers[-1]) if result.workers else None, checks

    result, connection, checks = trio.run(main)
    verdict = checks.verdict
    if args.json:
        print(json.dumps({
            "text": result.text, "finish_reason": result.finish_reason, "model": model,
            "usage": {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens},
            "workers": result.workers, "connection": connection, "cost": result.cost,
            "elapsed_s": round(result.elapsed_s, 3),
            "first_token_s": None if result.first_token_s is None else round(result.first_token_s, 3),
            "verification": checks.to_dict(), "withheld": result.withheld,
            "overcharged_by": [proof.worker for proof in result.overcharges],
        }, indent=2))  # fmt: skip
    else:
        print()
        print(
            f"[{result.prompt_tokens} prompt + {result.completion_tokens} completion tokens from "
            f"{', '.join(w[:16] + '…' for w in result.workers)}, "
            + (f"paid {format_amount(result.cost)}, " if result.cost else "")
            + f"finish: {result.finish_reason}]",
            file=sys.stderr,
        )
        if checks.local is not None:
            print(f"[{describe(checks.local)}]", file=sys.stderr)
        if checks.spot is not None:
            print(f"[spot check by {checks.spot.verifier[:16]}…: {describe(checks.spot.verdict)}]", file=sys.stderr)
    if not args.json:
        for note in checks.notes:
            print(f"[{note}]", file=sys.stderr)
    if args.verify and checks.local is None and not checks.notes:
        print("[not verified: the worker sent no fingerprints]", file=sys.stderr)
    if result.overcharges and not args.json:
        for proof in result.overcharges:
            print(f"[worker {proof.worker[:16]}… billed more than it used: banned and reported]", file=sys.stderr)
    if verdict is not None and not verdict.ok:
        reported = "; reported to the market" if checks.reported else ""
        withheld = "; its last receipt was not signed" if result.withheld else ""
        raise VerificationFailed(f"worker {result.proof.worker}: {verdict.reason}{withheld}{reported}")
    return 0


#: How long ``request`` lets a fraud report propagate before its node stops.
REPORT_FLUSH_S = 1.0


PING_DEADLINE_S = 5.0


def _peers(args: argparse.Namespace) -> int:
    _quiet_libp2p()

    async def main():
        async with open_requester(Path(args.data_dir), network=network_config(args)) as requester:
            await trio.sleep(args.wait)  # collecting gossip for the time the user asked for
            offers = requester.offers()
            latency = dict.fromkeys((o.peer_id for o in offers), None)  # an unreachable peer has none

            async def ping(offer) -> None:
                with trio.move_on_after(PING_DEADLINE_S):
                    try:
                        latency[offer.peer_id] = await requester.host.ping(offer.peer_id, offer.addrs)
                    except NodeError:
                        pass

            async with trio.open_nursery() as nursery:  # all at once: some addresses never answer
                for offer in offers:
                    nursery.start_soon(ping, offer)
            return offers, latency

    offers, latency = trio.run(main)
    rows = [
        {
            "peer_id": o.peer_id,
            "models": [{"cid": m.cid, "name": m.name, "context_size": m.context_size} for m in o.models],
            "price_per_1k": o.price_per_1k,
            "slots_free": o.slots_free,
            "slots_total": o.slots_total,
            "tokens_per_s": o.tokens_per_s,
            "latency_ms": None if latency[o.peer_id] is None else round(latency[o.peer_id], 1),
            "addrs": o.addrs,
            "hardware": o.hardware,
            "reproducible": o.reproducible,
            "verify_price_per_1k": o.verify_price_per_1k,
            "expires_in_s": round(o.expires_at - time.time(), 1),
        }
        for o in sorted(offers, key=lambda o: o.peer_id)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no offers seen; are workers running and reachable from the bootstrap peers?")
        return 0
    print(f"{'PEER':<18} {'MODELS':<34} {'PRICE/1K':>8} {'FREE':>6} {'TOK/S':>7} {'LATENCY':>9}")
    for r in rows:
        models = ", ".join(m["name"] for m in r["models"])[:34]
        lat = "-" if r["latency_ms"] is None else f"{r['latency_ms']:.1f} ms"
        free = f"{r['slots_free']}/{r['slots_total']}"
        peer = r["peer_id"][:16] + "…"
        print(f"{peer:<18} {models:<34} {r['price_per_1k']:>8} {free:>6} {r['tokens_per_s']:>7.0f} {lat:>9}")
    return 0
