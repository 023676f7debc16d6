"""Spot checks find a checker: every live verifier is tried, and offers of verifiers that went away do not count.

Real engines and real libp2p on 127.0.0.1 (the nodes of tests/test_fraud.py).
"""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import pytest
import trio

from node.inference.engine import open_engine
from node.market.requester import run_job
from node.market.routing import Reputation, RouteQuery
from node.market.trust import Trust
from node.verify.fraud import audit
from tests.factories import MODEL, signed_offer
from tests.test_fraud import SPEC, mesh, start_node


@pytest.mark.slow
async def test_a_stopped_verifiers_lingering_offer_does_not_stop_the_check_and_a_failure_names_who_was_tried(
    default_model_file, tmp_path
):
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(open_engine(default_model_file, slots=1, threads=1))
        verifying = await stack.enter_async_context(open_engine(default_model_file, slots=1, threads=1))
        nursery = await stack.enter_async_context(trio.open_nursery())
        with trio.fail_after(180):
            worker = await start_node(nursery, tmp_path, "worker", engine=engine, checker=engine)
            live = await start_node(nursery, tmp_path, "live", engine=engine, checker=verifying)
            requester = await start_node(nursery, tmp_path, "requester")
            async with trio.open_nursery() as gone:  # two verifiers that stop, leaving their offers behind
                stopped = [await start_node(gone, tmp_path, f"stopped-{i}") for i in range(2)]
                await mesh([worker, live, requester, *stopped])
                gone.cancel_scope.cancel()
            # the stopped ones claim to be far faster, so routing ranks them before the live one
            lingering = [signed_offer(n.identity, 1, time.time() + 600, addrs=n.host.addrs(), tokens_per_s=10_000.0,
                                      verify_price_per_1k=0) for n in stopped]  # fmt: skip
            live.offer = signed_offer(live.identity, 2, time.time() + 600, addrs=live.host.addrs(), tokens_per_s=1.0,
                                      verify_price_per_1k=0)  # fmt: skip
            requester.market = [worker.offer, *lingering, live.offer]
            query = RouteQuery(MODEL, free_only=True, pinned_peer=worker.id)
            result = await run_job(requester.host, requester.offers, query, SPEC, reputation=requester.reputation)

            trust = Trust()  # a stranger's first job: always checked, whatever the base probability
            checks = await audit(requester, result, spot_check_probability=0.01, query=query, trust=trust,
                                 draw=lambda: 0.5)  # fmt: skip
            assert checks.spot is not None and checks.spot.verifier == live.id, checks.notes
            assert checks.spot.verdict.ok and not checks.reported and checks.notes == []
            assert trust.verified(worker.id) == 1
            # each failure was recorded (a backoff ban, skipped by the next check while it lasts); whether the ban
            # still holds now depends on how long the check took, so the record is what is asserted
            assert all(requester.reputation.peers[n.id].consecutive_failures >= 1 for n in stopped)

            # only stopped verifiers left: no check, and the note says whom it tried
            requester.reputation = Reputation()
            requester.market = [worker.offer, *lingering]
            checks = await audit(requester, result, spot_check_probability=1.0, query=query)
            assert checks.spot is None and not checks.reported
            (note,) = checks.notes
            assert "tried 2" in note and all(n.id[:12] in note for n in stopped), note
        nursery.cancel_scope.cancel()
