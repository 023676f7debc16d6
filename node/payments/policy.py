"""Payment arithmetic and the checks both sides make, as pure functions.

Prices are in token base units per 1,000 tokens, and a job costs its prompt
plus completion tokens at that price, rounded up to a whole base unit:

    cost = ceil((prompt_tokens + completion_tokens) × price_per_1k / 1000)

A job's worst case is ``(prompt tokens + max_tokens) × price``, the prompt
bounded by its bytes before it is tokenized. A worker serves a job paid from a
requester's deposit only if the chain says the deposit can cover it and its
unclaimed exposure to that requester stays within its bound (what the reserve
guarantees it plus an unsecured allowance), and its unsecured exposure over all
requesters within its cap (``deposit_problem``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from node.inference.sampling import prompt_bytes
from node.protocol.messages import JobRequest

if TYPE_CHECKING:  # pure arithmetic: no web3 for callers that only price jobs (the requester)
    from node.payments.deposits import DepositAccount

PROMPT_TOKEN_OVERHEAD = 64  # chat-template tokens, on top of one token per prompt byte at most…
MESSAGE_TOKEN_OVERHEAD = 8  # …and the template's markers around each message


def prompt_token_bound(request: JobRequest) -> int:
    """An upper bound on the prompt's tokens, known before tokenizing: a BPE token covers at least one byte.

    Both sides use it: the requester to check the prompt size a worker
    announces, the worker to check the requester's deposit can pay for the
    job's worst case.
    """
    messages = [m for m in request.messages or [] if isinstance(m, dict)]
    roles = sum(len(str(m.get("role", "")).encode()) for m in messages)
    size = prompt_bytes(request.prompt, messages, request.resume_text) + roles
    return size + PROMPT_TOKEN_OVERHEAD + MESSAGE_TOKEN_OVERHEAD * len(request.messages or [])


def job_cost(prompt_tokens: int, completion_tokens: int, price_per_1k: int) -> int:
    """What a job owes, in token base units (rounded up)."""
    return -(-(prompt_tokens + completion_tokens) * price_per_1k // 1000)


def worst_case_cost(prompt_tokens: int, max_tokens: int, price_per_1k: int) -> int:
    return job_cost(prompt_tokens, max_tokens, price_per_1k)


def deposit_problem(
    account: DepositAccount,
    *,
    guarantee: int,
    has_slot: bool,
    exposure: int,
    needed: int,
    allowance: int,
    unsecured_elsewhere: int = 0,
    unsecured_cap: int | None = None,
) -> str | None:
    """Why a worker must not serve a job paid from ``account`` (a ``DepositEscrow`` requester), or None if it may.

    A worker's loss to a requester is bounded by what it lets the requester owe it unpaid. The deposit secures
    nothing: the requester may empty it at any time by signing a receipt to an address of its own and claiming
    it. Only the reserve's share bound to this worker (its ``guarantee``) is secured; beyond it the worker takes
    at most ``allowance`` unsecured, and at most ``unsecured_cap`` summed over every requester it serves.

    Args:
        guarantee: what the reserve guarantees this worker (``guaranteeOf``; 0 without a slot).
        has_slot: whether this worker holds one of the requester's reserve slots.
        exposure: what the requester owes this worker that is not paid on chain: the best receipt held above
            what the chain paid, plus what the jobs running now may still add (their worst cases).
        needed: the job's worst-case cost.
        allowance: the most this worker lets one requester owe it beyond its guarantee (unsecured).
        unsecured_elsewhere: the unsecured exposure to every other requester, summed.
        unsecured_cap: the most unsecured exposure over all requesters (None: no cap).
    """
    if account.unlocking:
        return f"the requester is unlocking its deposit (it may withdraw at {account.unlock_at}): no new jobs"
    # What claims could draw now: the deposit (first come, first served) and this worker's reserve share
    # (its guarantee, or a whole share if a slot is free for its first claim to take).
    potential = guarantee if has_slot else (min(account.share, account.reserve_left) if account.free_slots else 0)
    if account.deposit + potential < exposure + needed:
        return (
            f"the requester's deposit and reserve ({account.deposit + potential} base units for this worker) cannot "
            f"cover what it may owe this worker ({exposure}) and this job's worst case ({needed})"
        )
    secured = guarantee if has_slot else 0
    bound = secured + allowance
    if exposure + needed > bound:
        what = (
            f"what the requester's reserve guarantees it ({secured}) plus its allowance ({allowance})"
            if has_slot
            else "its allowance while no reserve slot backs it"
        )
        if exposure == 0:
            return (
                f"this job's worst case ({needed}) is over this worker's bound for the requester: {bound} ({what}); "
                "ask for fewer max_tokens, a shorter prompt, or fund a reserve this worker can hold a slot of"
            )
        return (
            f"this worker's unclaimed exposure to the requester would pass its bound: {exposure} owed + {needed} "
            f"for this job > {bound} ({what}); try again once its claims land"
        )
    unsecured = max(exposure + needed - secured, 0)
    if unsecured_cap is not None and unsecured and unsecured_elsewhere + unsecured > unsecured_cap:
        return (
            f"this worker's unsecured exposure over all requesters would pass its cap: {unsecured_elsewhere} + "
            f"{unsecured} for this requester > {unsecured_cap}; try again once its claims land"
        )
    return None
