"""Property-based (stateful) test of DepositEscrow on a real anvil, against a reference model.

Random sequences of deposit / fundReserve / unlock / cancelUnlock / withdraw /
claim / claimBatch / withdrawEarnings by random actors, with receipts signed by
random keys for random amounts, valid or not. A Python model of the contract
predicts each outcome (what it pays, or exactly which custom error); after
every step the invariants are checked on chain:

- conservation: tokens in = paid out + withdrawn + held, for every actor and
  for the escrow, which holds exactly the deposits, the reserves left and the
  earnings not yet withdrawn;
- the contract's accounts, pairs, earnings and guarantees are the model's;
- no worker was ever paid more than its requester signed to it;
- every slot holder's guarantee is honoured: the guarantees of a requester's
  slot holders fit in its reserve together, and a slot holder's claim within
  its guarantee is paid in full whatever the others claimed before.

Time moves in whole steps of a third of the unlock period, so the seconds that
real time adds never decide whether a withdrawal is early.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from web3 import HTTPProvider, Web3

from node.errors import PaymentError
from node.payments.deployment import DEFAULT_UNLOCK_PERIOD_S
from node.payments.deposit_receipts import sign_receipt
from node.payments.deposits import DepositAccount, DepositClient, PairState, claimable, guarantee

from .conftest import TOKEN

pytestmark = pytest.mark.slow

STEPS_PER_UNLOCK = 3
STEP = DEFAULT_UNLOCK_PERIOD_S // STEPS_PER_UNLOCK
#: LLMARKET_FUZZ_EXAMPLES=200 for a long run; the default keeps the suite's run near 30 s on 2 cores.
EXAMPLES = int(os.environ.get("LLMARKET_FUZZ_EXAMPLES", "16"))
LONG_RUN = "LLMARKET_FUZZ_EXAMPLES" in os.environ

REQUESTERS = (0, 1, 2)  # actors that hold tokens
WORKERS = (3, 4, 0)  # actors that claim; a requester may claim its own receipts too (a sock puppet)


@dataclass
class ModelAccount:
    deposit: int = 0
    reserve_left: int = 0
    reserve_total: int = 0
    slots: int = 0
    slots_used: int = 0
    unlock_at: int = 0  # model steps; 0 = not unlocking
    unlock_onchain: int = 0  # the contract's unlockAt, read back

    def view(self) -> DepositAccount:
        return DepositAccount(
            self.deposit, self.reserve_left, self.reserve_total, self.slots, self.slots_used, self.unlock_onchain
        )


@dataclass
class ModelPair:
    paid: int = 0
    from_reserve: int = 0
    has_slot: bool = False
    max_signed: int = 0  # the largest amount the requester signed to this worker

    def view(self) -> PairState:
        return PairState(self.paid, self.from_reserve, self.has_slot)


@dataclass
class Model:
    accounts: dict[int, ModelAccount] = field(default_factory=lambda: {r: ModelAccount() for r in REQUESTERS})
    pairs: dict[tuple[int, int], ModelPair] = field(default_factory=dict)
    earnings: dict[int, int] = field(default_factory=dict)

    def pair(self, requester: int, worker: int) -> ModelPair:
        return self.pairs.setdefault((requester, worker), ModelPair())


def test_random_deposit_histories_conserve_tokens_and_honour_guarantees(deployed):
    chain = deployed
    actors = [chain.requester, chain.other_requester, chain.stranger, chain.worker, chain.other_worker]
    w3 = Web3(HTTPProvider(chain.chain.rpc_url))
    clients = [DepositClient(w3, chain.deployment, a) for a in actors]
    reader = DepositClient(w3, chain.deployment)
    escrow = reader.address
    outcomes: dict[tuple[str, str | None], int] = {}

    class DepositMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.snapshot = chain.chain.rpc("evm_snapshot")
            self.steps = 0
            self.m = Model()
            self.start = [reader.token_balance(a.address) for a in actors]
            self.spent = [0] * len(actors)  # tokens each actor put into the escrow
            self.received = [0] * len(actors)  # tokens each actor got out of it
            self.escrow_start = reader.token_balance(escrow)

        def teardown(self):
            chain.chain.rpc("evm_revert", self.snapshot)

        def expect(self, error, name, action, *args):
            outcomes[name, error] = outcomes.get((name, error), 0) + 1
            if error is None:
                return action(*args)
            with pytest.raises(PaymentError) as info:
                action(*args)
            assert info.value.error == error, f"{name}: expected {error}, got {info.value}"
            return None

        def cancel_unlock_in_model(self, acct):
            acct.unlock_at = acct.unlock_onchain = 0

        # ------------------------------------------------------------ requester

        @rule(r=st.sampled_from(REQUESTERS), amount=st.integers(0, 30 * TOKEN), permit=st.booleans())
        def deposit(self, r, amount, permit):
            c = clients[r]
            if permit and amount:
                call = "deposit(permit)"
                v, rr, s, deadline = c.sign_permit(amount)
                fn = c.escrow.functions.depositWithPermit(amount, deadline, v, rr, s)
            else:
                call = "deposit"
                c.approve(amount)
                fn = c.escrow.functions.deposit(amount)
            error = "ZeroAmount" if amount == 0 else None
            self.expect(error, call, c.send, fn, call)
            if error is None:
                acct = self.m.accounts[r]
                acct.deposit += amount
                self.cancel_unlock_in_model(acct)
                self.spent[r] += amount

        @rule(r=st.sampled_from(REQUESTERS), amount=st.integers(0, 30 * TOKEN), slots=st.integers(0, 4))
        def fund_reserve(self, r, amount, slots):
            c = clients[r]
            acct = self.m.accounts[r]
            c.approve(amount)
            error = None
            if amount == 0:
                error = "ZeroAmount"
            elif slots == 0 or (acct.slots_used > 0 and slots != acct.slots):
                error = "InvalidSlots"
            self.expect(error, "fundReserve", c.send, c.escrow.functions.fundReserve(amount, slots), "fundReserve")
            if error is None:
                acct.reserve_total += amount
                acct.reserve_left += amount
                acct.slots = slots
                self.cancel_unlock_in_model(acct)
                self.spent[r] += amount

        @rule(r=st.sampled_from(REQUESTERS))
        def unlock(self, r):
            self.expect(None, "unlock", clients[r].unlock)
            acct = self.m.accounts[r]
            acct.unlock_at = self.steps + STEPS_PER_UNLOCK
            acct.unlock_onchain = reader.account_of(actors[r].address).unlock_at

        @rule(data=st.data())
        def cancel_unlock(self, data):
            unlocking = [r for r, a in self.m.accounts.items() if a.unlock_at]
            r = data.draw(st.sampled_from(unlocking or REQUESTERS), label="requester")
            acct = self.m.accounts[r]
            error = None if acct.unlock_at else "NotUnlocking"
            self.expect(error, "cancelUnlock", clients[r].cancel_unlock)
            self.cancel_unlock_in_model(acct)

        @rule(r=st.sampled_from(REQUESTERS))
        def withdraw(self, r):
            acct = self.m.accounts[r]
            error = None
            if not acct.unlock_at:
                error = "NotUnlocking"
            elif self.steps < acct.unlock_at:
                error = "UnlockPending"
            self.expect(error, "withdraw", clients[r].withdraw)
            if error is None:
                self.received[r] += acct.deposit + acct.reserve_left
                acct.deposit = acct.reserve_left = acct.reserve_total = 0
                self.cancel_unlock_in_model(acct)

        @rule(r=st.sampled_from(REQUESTERS))
        def unlock_wait_and_withdraw(self, r):
            """The whole exit at once (random sequences reach it too rarely): unlock, wait the period, withdraw."""
            self.unlock(r)
            self.advance_time(STEPS_PER_UNLOCK)
            self.withdraw(r)

        @rule(r=st.sampled_from(REQUESTERS), steps=st.integers(0, STEPS_PER_UNLOCK - 1))
        def withdraw_before_the_period_ends(self, r, steps):
            """An early exit is refused (a rule of its own: random sequences do not always reach it)."""
            self.unlock(r)
            if steps:
                self.advance_time(steps)
            self.withdraw(r)

        @rule(steps=st.integers(1, STEPS_PER_UNLOCK))
        def advance_time(self, steps):
            chain.advance(steps * STEP)
            self.steps += steps

        # --------------------------------------------------------------- worker

        def receipt(self, data, w, r):
            """A receipt to worker ``w`` on ``r``'s account: mostly ``r``'s own, sometimes a forgery."""
            pair = self.m.pair(r, w)
            amount = data.draw(
                st.sampled_from(
                    [
                        pair.paid,
                        max(pair.paid - TOKEN, 0),
                        pair.paid + TOKEN,
                        pair.paid + 15 * TOKEN,
                        pair.paid + 80 * TOKEN,
                        max(pair.max_signed, pair.paid + 1),
                    ]
                ),
                label="amount",
            )
            signer = data.draw(st.sampled_from([r, r, r, (r + 1) % len(actors)]), label="signer")
            if signer == r:
                pair.max_signed = max(pair.max_signed, amount)
            return amount, signer, sign_receipt(actors[signer], reader.domain, actors[w].address, amount)

        def settle(self, r, w, amount, signer):
            """The model's claim: returns (what it pays, error or None); updates the model if it pays."""
            pair, acct = self.m.pair(r, w), self.m.accounts[r]
            if amount <= pair.paid:
                return 0, "NothingToClaim"
            if signer != r:
                return 0, "InvalidSignature"
            before = guarantee(acct.view(), pair.view())
            had_slot = pair.has_slot
            pay = claimable(acct.view(), pair.view(), amount)
            if pay.amount == 0:
                return 0, "NothingAvailable"
            if had_slot and amount - pair.paid <= before:
                assert pay.amount == amount - pair.paid, "a slot holder within its guarantee must be paid in full"
            acct.deposit -= pay.from_deposit
            acct.reserve_left -= pay.from_reserve
            if pay.takes_slot:
                acct.slots_used += 1
                pair.has_slot = True
            pair.paid += pay.amount
            pair.from_reserve += pay.from_reserve
            return pay.amount, None

        @rule(data=st.data(), w=st.sampled_from(WORKERS), r=st.sampled_from(REQUESTERS))
        def claim_again(self, data, w, r):
            """Claims are most of what happens: a second rule doubles their share of the steps."""
            self.claim(data, w, r)

        @rule(data=st.data(), w=st.sampled_from(WORKERS), r=st.sampled_from(REQUESTERS))
        def claim(self, data, w, r):
            amount, signer, signature = self.receipt(data, w, r)
            paid, error = self.settle(r, w, amount, signer)
            self.expect(error, "claim", clients[w].claim, actors[r].address, amount, signature)
            if error is None:
                self.m.earnings[w] = self.m.earnings.get(w, 0) + paid

        @rule(r=st.sampled_from(REQUESTERS), w=st.sampled_from(WORKERS), amount=st.integers(1, 30 * TOKEN))
        def deposit_and_claim(self, r, w, amount):
            """A requester deposits and a worker claims part of it (a rule of its own, so every run pays claims)."""
            self.deposit(r, amount, False)
            pair = self.m.pair(r, w)
            owed = pair.paid + amount // 2 + 1
            pair.max_signed = max(pair.max_signed, owed)
            paid, error = self.settle(r, w, owed, r)
            signature = sign_receipt(actors[r], reader.domain, actors[w].address, owed)
            self.expect(error, "claim", clients[w].claim, actors[r].address, owed, signature)
            if error is None:
                self.m.earnings[w] = self.m.earnings.get(w, 0) + paid

        @rule(w=st.sampled_from(WORKERS), r=st.sampled_from(REQUESTERS))
        def claim_a_forged_receipt(self, w, r):
            """More than was ever paid, signed by someone other than the requester: refused, nothing moves."""
            forger = (r + 1) % len(actors)
            amount = self.m.pair(r, w).paid + TOKEN
            signature = sign_receipt(actors[forger], reader.domain, actors[w].address, amount)
            self.expect("InvalidSignature", "claim", clients[w].claim, actors[r].address, amount, signature)

        @rule(
            data=st.data(), w=st.sampled_from(WORKERS), rs=st.lists(st.sampled_from(REQUESTERS), min_size=1, max_size=3)
        )
        def claim_batch(self, data, w, rs):
            entries, forged = [], False
            for r in dict.fromkeys(rs):  # one receipt per pair
                amount, signer, signature = self.receipt(data, w, r)
                entries.append((r, amount, signer, signature))
                forged |= amount > self.m.pair(r, w).paid and signer != r
            if forged:  # the model must not move: a bad signature reverts the whole batch
                call = [(actors[r].address, a, s) for r, a, _, s in entries]
                self.expect("InvalidSignature", "claimBatch", clients[w].claim_batch, call)
                return
            total = sum(self.settle(r, w, a, signer)[0] for r, a, signer, _ in entries)
            call = [(actors[r].address, a, s) for r, a, _, s in entries]
            self.expect(None, "claimBatch", clients[w].claim_batch, call)
            self.received[w] += total

        @rule(data=st.data())
        def withdraw_earnings(self, data):
            earning = [w for w, amount in self.m.earnings.items() if amount]
            w = data.draw(st.sampled_from(earning or WORKERS), label="worker")
            amount = self.m.earnings.get(w, 0)
            self.expect(None if amount else "ZeroAmount", "withdrawEarnings", clients[w].withdraw_earnings)
            self.received[w] += amount
            self.m.earnings[w] = 0

        # ----------------------------------------------------------- invariants

        def read_all(self):
            """Everything the invariants compare, in one JSON-RPC batch (one round trip)."""
            pairs = sorted(self.m.pairs)
            esc, tok = reader.escrow.functions, reader.token.functions
            with w3.batch_requests() as batch:
                for a in actors:
                    batch.add(tok.balanceOf(a.address))
                batch.add(tok.balanceOf(escrow))
                for a in actors:
                    batch.add(esc.earnings(a.address))
                for r in REQUESTERS:
                    batch.add(esc.accountOf(actors[r].address))
                for r, w in pairs:
                    batch.add(esc.pairOf(actors[r].address, actors[w].address))
                    batch.add(esc.guaranteeOf(actors[r].address, actors[w].address))
                out = list(batch.execute())
            n = len(actors)
            balances, held, earnings = out[:n], out[n], out[n + 1 : 2 * n + 1]
            accounts = [DepositAccount(*x) for x in out[2 * n + 1 : 2 * n + 1 + len(REQUESTERS)]]
            rest = out[2 * n + 1 + len(REQUESTERS) :]
            pair_states = {
                k: (PairState(x[0], x[1], bool(x[2])), g) for k, x, g in zip(pairs, rest[::2], rest[1::2], strict=True)
            }
            return balances, held, earnings, dict(zip(REQUESTERS, accounts, strict=True)), pair_states

        @invariant()
        def conserved_and_the_models_and_guarantees_hold(self):
            balances, held, earnings, accounts, pairs = self.read_all()
            # conservation: tokens in = paid out + withdrawn + held
            assert sum(balances) + held == sum(self.start) + self.escrow_start
            for i, balance in enumerate(balances):
                assert balance == self.start[i] - self.spent[i] + self.received[i]
            owed = sum(a.deposit + a.reserve_left for a in self.m.accounts.values()) + sum(self.m.earnings.values())
            assert held - self.escrow_start == owed
            assert earnings == [self.m.earnings.get(i, 0) for i in range(len(actors))]
            # the chain is the model; every slot holder's guarantee fits in the reserve with the others'
            for r, acct in self.m.accounts.items():
                assert accounts[r] == acct.view()
                holders = [p for (pr, _), p in self.m.pairs.items() if pr == r and p.has_slot]
                assert len(holders) == acct.slots_used <= acct.slots
                assert sum(guarantee(acct.view(), p.view()) for p in holders) <= acct.reserve_left
            for key, pair in self.m.pairs.items():
                state, on_chain_guarantee = pairs[key]
                assert state == pair.view()
                assert pair.paid <= pair.max_signed or pair.paid == 0
                assert on_chain_guarantee == guarantee(self.m.accounts[key[0]].view(), pair.view())

    run_state_machine_as_test(
        DepositMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=25,
            deadline=None,
            database=None,
            derandomize=not LONG_RUN,  # the suite's run is the same every time; a long run explores
            suppress_health_check=list(HealthCheck),
        ),
    )
    for name in ("deposit", "fundReserve", "claim", "claimBatch", "withdraw", "withdrawEarnings"):
        assert outcomes.get((name, None)), f"no successful {name} in the whole run: {outcomes}"
    for name, error in (("claim", "NothingAvailable"), ("withdraw", "UnlockPending"), ("claim", "InvalidSignature")):
        assert outcomes.get((name, error)), f"no {name} reached {error}: {outcomes}"
