"""Payment arithmetic and the worker's channel check."""

from __future__ import annotations

import dataclasses

from node.payments.escrow import ChannelState, ChannelStatus
from node.payments.policy import channel_problem, credit_left, deposit_for, job_cost, worst_case_cost

WORKER = "0x" + "11" * 20
CHANNEL = ChannelState(
    b"\1" * 32, "0x" + "22" * 20, WORKER, deposit=10_000, paid=1_000, expiry=10_000, status=ChannelStatus.OPEN
)


def test_costs_round_up_to_a_base_unit():
    assert job_cost(10, 5, 1000) == 15
    assert job_cost(1, 0, 1) == 1  # 0.001 rounds up
    assert job_cost(0, 0, 5) == 0
    assert job_cost(300, 700, 7) == 7
    assert worst_case_cost(100, 256, 50) == job_cost(100, 256, 50) == 18
    assert deposit_for(18) == 198 and deposit_for(18, margin=0) == 18


def check(**changes):
    args = dict(payee=WORKER, now=1_000, min_time_left_s=600, signed_total=2_000, needed=500)
    return channel_problem(dataclasses.replace(CHANNEL, **changes.pop("channel", {})), **{**args, **changes})


def test_the_worker_serves_only_against_a_good_channel():
    assert check() is None
    assert check(channel={"status": ChannelStatus.CLOSED}) == "channel is closed, not open"
    assert "not this worker" in check(payee="0x" + "33" * 20)
    assert check(payee=WORKER.upper().replace("0X", "0x")) is None  # addresses compare case-insensitively
    assert "expires in 500s" in check(now=9_500)
    assert "has 499 base units left" in check(signed_total=9_501)
    assert "has 0 base units left" in check(channel={"paid": 10_000}, signed_total=0)


def test_credit_window():
    assert credit_left(streamed_cost=100, receipted=80, window=50) == 30
    assert credit_left(streamed_cost=130, receipted=80, window=50) == 0
