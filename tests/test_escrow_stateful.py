"""Property-based (stateful) test of InferenceEscrow on a real anvil.

Random sequences of open / topUp / claim / close / refund by random actors,
with receipts signed by random keys and random amounts, valid or not. A
Python model of the contract predicts each outcome (success, or exactly which
custom error); after every step the invariants are checked on-chain:

- tokens are conserved: actors + escrow always hold the same total;
- the escrow holds exactly what open channels have not paid out;
- no worker ever received more than its requester signed for, and no channel
  ever paid out more than was deposited.

Time is kept away from expiry boundaries: expiries sit at half-steps of
``STEP`` seconds from the model's clock, and the clock moves in whole steps,
so the few seconds that real time adds never decide an outcome.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from node.errors import PaymentError
from node.payments.escrow import ChannelStatus
from node.payments.receipts import sign_receipt

from .conftest import TOKEN

pytestmark = [pytest.mark.slow, pytest.mark.long]

STEP = 1000  # seconds


@dataclass
class ModelChannel:
    requester: int
    worker: int
    deposit: int
    paid: int
    expiry: int
    status: ChannelStatus
    max_signed: int = 0  # the largest cumulative amount the requester signed


def test_random_channel_histories_conserve_tokens(deployed):
    chain = deployed
    actors = [chain.requester, chain.stranger, chain.other_requester, chain.worker, chain.other_worker]
    clients = [chain.client(a) for a in actors]
    reader = chain.client()
    escrow = chain.deployment.escrow
    outcomes: dict[tuple[str, str | None], int] = {}  # (action, expected error) -> count

    class EscrowMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.snapshot = chain.chain.rpc("evm_snapshot")
            self.clock = reader.chain_time()
            self.channels: dict[bytes, ModelChannel] = {}
            self.start = [reader.token_balance(a.address) for a in actors]
            self.received = [0] * len(actors)  # tokens each actor got from the escrow
            self.spent = [0] * len(actors)  # tokens each actor put into the escrow
            self.escrow_start = reader.token_balance(escrow)

        def teardown(self):
            chain.chain.rpc("evm_revert", self.snapshot)

        def expiry(self, steps: int) -> int:
            return self.clock + steps * STEP + STEP // 2

        def expect(self, error, action, *args, **kwargs):
            """Run ``action``; it must fail with custom error ``error``, or succeed when ``error`` is None."""
            outcomes[action.__name__, error] = outcomes.get((action.__name__, error), 0) + 1
            if error is None:
                return action(*args, **kwargs)
            with pytest.raises(PaymentError) as info:
                action(*args, **kwargs)
            assert info.value.error == error, f"expected {error}, got {info.value}"
            return None

        def pick_channel(self, data):
            channel_id = data.draw(st.sampled_from(sorted(self.channels)), label="channel")
            return channel_id, self.channels[channel_id]

        @staticmethod
        def between(ch):
            return ch.paid + (ch.deposit - ch.paid) // 2

        def pick_actor(self, data, rightful):
            """Mostly the party entitled to act, sometimes anyone at all."""
            return data.draw(st.one_of(st.just(rightful), st.just(rightful), st.integers(0, len(actors) - 1)))

        # ------------------------------------------------------------ rules

        @rule(
            requester=st.integers(0, 2),
            worker=st.integers(0, 4),
            amount=st.integers(0, 50 * TOKEN),
            steps=st.integers(-1, 8),
            permit=st.booleans(),
        )
        def open(self, requester, worker, amount, steps, permit):
            expiry = self.expiry(steps)
            error = None
            if amount == 0:
                error = "ZeroAmount"
            elif worker == requester:
                error = "InvalidWorker"
            elif expiry <= self.clock:
                error = "ExpiryInPast"
            channel_id = self.expect(
                error, clients[requester].open_channel, actors[worker].address, amount, expiry, permit=permit
            )
            if error is None:
                self.channels[channel_id] = ModelChannel(requester, worker, amount, 0, expiry, ChannelStatus.OPEN)
                self.spent[requester] += amount

        @precondition(lambda self: self.channels)
        @rule(data=st.data(), amount=st.integers(0, 20 * TOKEN), steps=st.integers(-1, 4))
        def top_up(self, data, amount, steps):
            channel_id, ch = self.pick_channel(data)
            actor = self.pick_actor(data, ch.requester)
            new_expiry = self.expiry(steps)
            if actor > 2 and amount > 0:
                amount = 0  # workers hold no tokens of their own to top up with; keep the model simple
            error = None
            if ch.status != ChannelStatus.OPEN:
                error = "ChannelNotOpen"
            elif actor != ch.requester:
                error = "NotRequester"
            elif new_expiry < ch.expiry:
                error = "ExpiryShortened"
            elif amount == 0 and new_expiry == ch.expiry:
                error = "ZeroAmount"
            elif new_expiry <= self.clock:
                error = "ExpiryInPast"
            self.expect(error, clients[actor].top_up, channel_id, amount, new_expiry)
            if error is None:
                ch.deposit += amount
                ch.expiry = new_expiry
                self.spent[actor] += amount

        @precondition(lambda self: self.channels)
        @rule(data=st.data(), steps=st.integers(-1, 4))
        def top_up_beyond_128_bits(self, data, steps):
            """A deposit never passes 2**128 - 1, and amounts that overflow ``deposit + amount`` get the same error."""
            channel_id, ch = self.pick_channel(data)
            actor = self.pick_actor(data, ch.requester)
            new_expiry = self.expiry(steps)
            room = 2**128 - 1 - ch.deposit
            amount = data.draw(
                st.sampled_from([room + 1, 2**128, 2**256 - ch.deposit - 1, 2**256 - ch.deposit, 2**256 - 1])
            )
            error = "AmountTooLarge"
            if ch.status != ChannelStatus.OPEN:
                error = "ChannelNotOpen"
            elif actor != ch.requester:
                error = "NotRequester"
            elif new_expiry < ch.expiry:
                error = "ExpiryShortened"
            elif new_expiry <= self.clock:
                error = "ExpiryInPast"
            client = clients[actor]  # the raw call: the client's own top_up refuses for want of tokens first
            self.expect(error, client.send, client.escrow.functions.topUp(channel_id, amount, new_expiry), "topUp")

        def _redeem_error(self, ch, actor, amount, signer, *, closing):
            if ch.status != ChannelStatus.OPEN:
                return "ChannelNotOpen"
            if actor != ch.worker:
                return "NotWorker"
            if self.clock >= ch.expiry:
                return "ChannelExpired"
            if amount == ch.paid:
                return None if closing else "NothingToClaim"
            if amount < ch.paid:
                return "AmountBelowPaid"
            if amount > ch.deposit:
                return "AmountExceedsDeposit"
            if signer != ch.requester:
                return "InvalidSignature"
            return None

        def _sign(self, channel_id, ch, signer, amount):
            if signer == ch.requester:
                ch.max_signed = max(ch.max_signed, amount)
            return sign_receipt(actors[signer], reader.domain, channel_id, amount)

        @precondition(lambda self: self.channels)
        @rule(data=st.data(), extra=st.integers(0, 30 * TOKEN))
        def claim(self, data, extra):
            channel_id, ch = self.pick_channel(data)
            actor = self.pick_actor(data, ch.worker)
            signer = self.pick_actor(data, ch.requester)
            amount = data.draw(
                st.sampled_from([ch.paid, max(ch.paid - extra, 0), ch.paid + extra, self.between(ch), ch.deposit])
            )
            signature = self._sign(channel_id, ch, signer, amount)
            error = self._redeem_error(ch, actor, amount, signer, closing=False)
            self.expect(error, clients[actor].claim, channel_id, amount, signature)
            if error is None:
                self.received[actor] += amount - ch.paid
                ch.paid = amount

        @precondition(lambda self: self.channels)
        @rule(data=st.data(), extra=st.integers(0, 30 * TOKEN))
        def close(self, data, extra):
            channel_id, ch = self.pick_channel(data)
            actor = self.pick_actor(data, ch.worker)
            signer = self.pick_actor(data, ch.requester)
            amount = data.draw(st.sampled_from([ch.paid, ch.paid + extra, self.between(ch), ch.deposit]))
            signature = self._sign(channel_id, ch, signer, amount)
            error = self._redeem_error(ch, actor, amount, signer, closing=True)
            self.expect(error, clients[actor].close, channel_id, amount, signature)
            if error is None:
                self.received[actor] += amount - ch.paid
                self.received[ch.requester] += ch.deposit - amount
                ch.paid = amount
                ch.status = ChannelStatus.CLOSED

        @precondition(lambda self: self.channels)
        @rule(data=st.data())
        def refund(self, data):
            channel_id, ch = self.pick_channel(data)
            actor = self.pick_actor(data, ch.requester)
            error = None
            if ch.status != ChannelStatus.OPEN:
                error = "ChannelNotOpen"
            elif actor != ch.requester:
                error = "NotRequester"
            elif self.clock < ch.expiry:
                error = "NotExpired"
            self.expect(error, clients[actor].refund, channel_id)
            if error is None:
                self.received[actor] += ch.deposit - ch.paid
                ch.status = ChannelStatus.REFUNDED

        @rule(steps=st.integers(1, 3))
        def advance_time(self, steps):
            chain.advance(steps * STEP)
            self.clock += steps * STEP

        # ------------------------------------------------------- invariants

        @invariant()
        def tokens_are_conserved_and_accounted(self):
            balances = [reader.token_balance(a.address) for a in actors]
            held = reader.token_balance(escrow)
            assert sum(balances) + held == sum(self.start) + self.escrow_start
            for i, balance in enumerate(balances):
                assert balance == self.start[i] - self.spent[i] + self.received[i]
            outstanding = sum(c.deposit - c.paid for c in self.channels.values() if c.status == ChannelStatus.OPEN)
            assert held - self.escrow_start == outstanding

        @invariant()
        def nobody_gets_more_than_signed_or_deposited(self):
            for channel_id, ch in self.channels.items():
                state = reader.get_channel(channel_id)
                assert (state.deposit, state.paid, state.status) == (ch.deposit, ch.paid, ch.status)
                assert state.paid <= ch.max_signed or state.paid == 0
                assert state.paid <= state.deposit

    run_state_machine_as_test(
        EscrowMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    # The run must have reached the interesting states, not just refusals.
    for action in ("open_channel", "top_up", "claim", "close"):
        assert outcomes.get((action, None)), f"no successful {action} in the whole run: {outcomes}"
    assert outcomes.get(("send", "AmountTooLarge")), f"no top-up beyond 128 bits reached the check: {outcomes}"
